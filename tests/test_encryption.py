"""Payloads encrypted in Temporal's history, read back through the codec server.

The suite's workers and clients encrypt with the suite's key (`TEST_KEYS`, set
in the session's environment); these tests read the same histories as someone
with only Web UI or CLI access would — raw, without the key — and through the
codec server (in-process, and the real `temporal` CLI's `--codec-endpoint`).
A failure reads as its type and fields without the key, whole with it; a
client and a worker whose keys differ fail on the client at once, naming the
key ids. Real dev server, PostgreSQL and simulator.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.client import Client, WorkflowFailureError

from konstruct.app.stack import temporal_cli
from konstruct.config import Settings
from konstruct.platform.errors import ConfigError, innermost_application_error
from konstruct.platform.naming import message_workflow_id
from konstruct.platform.temporal.codec import (
    ENCODING,
    KEY_ID,
    CodecError,
    EncryptionCodec,
    KeyRing,
    new_key_line,
)
from konstruct.platform.temporal.codec_server import codec_app
from konstruct.platform.temporal.failures import HINT
from konstruct.platform.temporal.plugin import KonstructPlugin
from konstruct.platform.temporal.results import workflow_result
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import KONSTRUCT, ROOT, TEST_KEYS, serve_locally, suite_codec
from tests.test_experiments import FAST, experiment, start
from tests.test_handle_message import message
from workers.main import build_worker
from workflows.experiment import Experiment
from workflows.handle_message import AGENT_STEPS, HandleMessage

SECRET_TEXT = "my passport number is X1234567, please keep it safe"


def payload(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


# --- the codec --------------------------------------------------------------------------


async def test_payloads_round_trip_and_name_their_key() -> None:
    codec = suite_codec()
    [sealed] = await codec.encode([payload(SECRET_TEXT)])
    assert sealed.metadata["encoding"] == ENCODING and sealed.metadata[KEY_ID] == b"test-1"
    assert b"passport" not in sealed.data
    [opened] = await codec.decode([sealed])
    assert opened == payload(SECRET_TEXT)
    # A payload written before encryption was on decodes as it is.
    assert await codec.decode([payload("plain")]) == [payload("plain")]


async def test_keys_rotate_new_payloads_use_the_newest_and_old_ones_still_decode() -> None:
    first = KeyRing.parse(new_key_line("k1"), "first")
    both = KeyRing.parse(new_key_line("k1").replace("k1:", "k0:") + "," + TEST_KEYS, "x")
    old = EncryptionCodec(first)
    [under_k1] = await old.encode([payload("a")])
    rotated = EncryptionCodec(
        KeyRing({"k1": first.keys["k1"], "k2": both.keys["test-1"]}, current="k2")
    )
    [under_k2] = await rotated.encode([payload("b")])
    assert under_k2.metadata[KEY_ID] == b"k2"
    assert await rotated.decode([under_k1, under_k2]) == [payload("a"), payload("b")]


async def test_a_wrong_or_missing_key_fails_with_a_clear_error_not_garbage() -> None:
    [sealed] = await suite_codec().encode([payload(SECRET_TEXT)])
    impostor = EncryptionCodec(KeyRing.parse(new_key_line("test-1"), "impostor"))
    with pytest.raises(CodecError, match="key 'test-1' does not decrypt"):
        await impostor.decode([sealed])
    stranger = EncryptionCodec(KeyRing.parse(new_key_line("other"), "stranger"))
    with pytest.raises(CodecError, match="key 'test-1', which this process does not have"):
        await stranger.decode([sealed])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("k1", "entry 1 must be <id>:<base64 key>"),
        ("k1:not base64!", "key 'k1' is not base64"),
        ("k1:" + base64.b64encode(b"short").decode(), "is 5 bytes; AES-256 needs 32"),
        ("# only a comment", "no key"),
    ],
)
def test_a_bad_key_names_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        KeyRing.parse(text, "KONSTRUCT_ENCRYPTION_KEYS")


def test_encryption_on_without_a_key_says_where_it_looked(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    with pytest.raises(ConfigError, match="encryption.keys does not exist"):
        settings.key_ring()
    off = settings.model_copy(
        update={"temporal": settings.temporal.model_copy(update={"encryption": False})}
    )
    assert off.key_ring() is None


# --- histories as the Web UI and the CLI see them ----------------------------------------


@pytest.fixture
async def codec_server() -> AsyncIterator[str]:
    """The codec server with the suite's key, on a free port, token required."""
    async with serve_locally(codec_app(suite_codec(), ["http://localhost:8233"], "s3cret")) as url:
        yield url


async def raw_history(settings: Settings, workflow_id: str) -> str:
    """The history as someone without the key reads it: no codec at all."""
    reader = await Client.connect(
        settings.temporal.target, namespace=settings.temporal.namespace, plugins=[KonstructPlugin()]
    )
    history = await reader.get_workflow_handle(workflow_id).fetch_history()
    return history.to_json()


def history_payloads(history_json: str) -> list[dict]:
    """Every payload object in a history's JSON (`{"metadata": ..., "data": ...}`)."""
    found: list[dict] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "metadata" in node and "encoding" in node.get("metadata", {}):
                found.append(node)
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(history_json))
    return found


async def decode_through(url: str, payloads: list[dict], token: str | None) -> list[str]:
    headers = {"X-Namespace": "default", "Origin": "http://localhost:8233"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/decode", json={"payloads": payloads}, headers=headers) as response,
    ):
        body = await response.text()
        assert response.status == 200, body
        assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:8233"
    decoded = json_format.Parse(body, Payloads())
    return [p.data.decode(errors="replace") for p in decoded.payloads]


async def test_a_message_and_its_reply_are_not_in_history_but_the_codec_server_shows_them(
    client: Client, worker: str, settings: Settings, codec_server: str
) -> None:
    body = message(text=SECRET_TEXT)
    workflow_id = f"msg-demo-{body['message_id']}"
    result = await client.execute_workflow(
        HandleMessage.run, body, id=workflow_id, task_queue=worker
    )
    raw = await raw_history(settings, workflow_id)
    assert "passport" not in raw and result.response[:40] not in raw
    payloads = history_payloads(raw)
    # Plain are only what must be: the search attributes (filterable), and the SDK
    # core's own bookkeeping of each local activity's marker (its type, attempt and
    # times; the activity's result beside it is encrypted) and of a patch marker
    # (the patch's id, also the TemporalChangeVersion search attribute); and, once a
    # test file run earlier in the same process has installed a tracer provider, the
    # OpenTelemetry interceptor's trace context header (ids, no data of the message).
    plain = [
        json.loads(base64.b64decode(p["data"]))
        for p in payloads
        if base64.b64decode(p["metadata"]["encoding"]) != ENCODING
    ]
    assert plain, "the search attributes stay plain"
    for value in plain:
        marker = isinstance(value, dict) and {"seq", "activity_type"} <= set(value)
        patch = value == {"id": AGENT_STEPS, "deprecated": False} or value == [AGENT_STEPS]
        trace = isinstance(value, dict) and "traceparent" in value
        trace = trace and set(value) <= {"traceparent", "tracestate"}
        assert marker or patch or trace or value in ("message", "demo", "running", "completed"), (
            value
        )
    # Without the token the codec server refuses; with it, the plaintext is there.
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{codec_server}/decode", json={"payloads": payloads}) as refused:
            assert refused.status == 401
    decoded = " ".join(await decode_through(codec_server, payloads, "s3cret"))
    assert "passport" in decoded and result.response[:40] in decoded
    # The real CLI, pointed at the codec server, prints the workflow's input.
    code, out, err = await finished(
        temporal_cli(),
        "workflow",
        "show",
        "--workflow-id",
        workflow_id,
        "--address",
        settings.temporal.target,
        "--codec-endpoint",
        codec_server,
        "--codec-auth",
        "Bearer s3cret",
        "--output",
        "json",
        within_s=60,
    )
    assert code == 0, err
    shown_plain = [
        base64.b64decode(p["data"]).decode(errors="replace") for p in history_payloads(out)
    ]
    assert any("passport" in text for text in shown_plain), shown_plain[:5]


async def test_an_experiment_keeps_its_prompt_inputs_and_outputs_out_of_history(
    client: Client, worker: str, settings: Settings
) -> None:
    body = experiment(
        4, task={"model_group": "fast", "prompt_template": "Confidential briefing: {input}"}
    )
    handle = await start(client, worker, body)
    await handle.result()
    raw = await raw_history(settings, body["experiment_id"])
    assert "Confidential briefing" not in raw
    assert not any(item["input"] in raw for item in body["dataset"]["items"])
    # What must stay filterable stays plain: the search attributes.
    assert "KonstructTenant" in raw


async def connect_with(settings: Settings, keys: str) -> Client:
    codec = EncryptionCodec(KeyRing.parse(keys, "test"))
    return await Client.connect(
        settings.temporal.target,
        namespace=settings.temporal.namespace,
        plugins=[KonstructPlugin(codec)],
    )


async def test_a_workflow_started_under_one_key_completes_after_the_worker_gains_another(
    settings: Settings, sim: SimulatorAdmin
) -> None:
    await sim.set_profile(FAST, latency_ms=100)
    task_queue = f"rotate-{uuid.uuid4().hex[:8]}"
    old_client = await connect_with(settings, TEST_KEYS)
    new_client = await connect_with(settings, TEST_KEYS + "," + new_key_line("test-2"))
    body = experiment(30, max_concurrency=2)
    async with build_worker(old_client, settings, task_queue) as w, w:
        handle = await start(old_client, task_queue, body)
        for _ in range(400):
            if (await handle.query(Experiment.progress)).completed >= 3:
                break
            await asyncio.sleep(0.05)
    async with build_worker(new_client, settings, task_queue) as w, w:
        result = await new_client.get_workflow_handle_for(
            Experiment.run, body["experiment_id"]
        ).result()
    assert result.summary.completed == 30 and result.summary.failed == 0
    raw = await raw_history(settings, body["experiment_id"])
    key_ids = {
        base64.b64decode(p["metadata"][KEY_ID]).decode()
        for p in history_payloads(raw)
        if KEY_ID in p["metadata"]
    }
    assert key_ids == {"test-1", "test-2"}, key_ids


async def test_a_demo_cascade_keeps_its_steps_and_decision_out_of_history(
    client: Client, worker: str, settings: Settings
) -> None:
    from tests.test_demo import demo_input
    from tests.test_demo import start as start_demo

    handle = await start_demo(client, worker, demo_input())
    result = await handle.result()
    raw = await raw_history(settings, handle.id)
    # The steps' details and the decision, written by the workflow's activities.
    details = [step.detail for step in result.steps if len(step.detail or "") > 12]
    assert details, result.steps
    assert not any(detail in raw for detail in details)
    if result.decision:
        assert result.decision not in raw
    # With the key, the same history holds them.
    payloads = [json_format.ParseDict(p, Payload()) for p in history_payloads(raw)]
    plain = " ".join(p.data.decode(errors="replace") for p in await suite_codec().decode(payloads))
    assert all(json.dumps(detail)[1:-1] in plain for detail in details), details


async def test_a_failure_message_and_stack_trace_are_encrypted_too(
    client: Client, worker: str, settings: Settings
) -> None:
    body = message(tenant_id="Not A Tenant!")
    workflow_id = f"msg-bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(WorkflowFailureError) as failed:
        await client.execute_workflow(HandleMessage.run, body, id=workflow_id, task_queue=worker)
    # With the key, the failure names the field and the problem, as always.
    assert "tenant_id" in str(failed.value.cause)
    raw = await raw_history(settings, workflow_id)
    # Without it: the type and the field (no user data), never the value or the trace.
    assert f"InvalidInput at tenant_id ({HINT})" in raw
    assert "Not A Tenant" not in raw and "Traceback" not in raw


async def finished(
    *command: str, within_s: float, stderr: int = asyncio.subprocess.PIPE, **options: Any
) -> tuple[int, str, str]:
    """`command` run to its end: exit code, stdout, stderr ("" when `stderr` is sent to
    stdout); killed if it outlives `within_s`. Asynchronously: a codec server it calls
    answers from this event loop."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=stderr, **options
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), within_s)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode is not None
    return process.returncode, out.decode(), (err or b"").decode()


async def temporal(settings: Settings, *args: str) -> tuple[int, str]:
    """The real `temporal` CLI against the suite's dev server: exit code, stdout + stderr."""
    code, out, _ = await finished(
        temporal_cli(),
        *args,
        "--address",
        settings.temporal.target,
        within_s=120,
        stderr=asyncio.subprocess.STDOUT,
    )
    return code, out


def encoded_messages(node: object) -> list[str]:
    """The `message` of every failure's decoded `encodedAttributes` in the CLI's JSON."""
    found: list[str] = []
    if isinstance(node, dict):
        attributes = node.get("encodedAttributes")
        if isinstance(attributes, dict) and isinstance(attributes.get("message"), str):
            found.append(attributes["message"])
        for value in node.values():
            found += encoded_messages(value)
    elif isinstance(node, list):
        for value in node:
            found += encoded_messages(value)
    return found


async def test_a_failed_workflow_reads_clearly_in_the_temporal_cli_its_values_still_encrypted(
    client: Client, worker: str, settings: Settings, codec_server: str
) -> None:
    codec = ["--codec-endpoint", codec_server, "--codec-auth", "Bearer s3cret"]
    body = experiment(evals=[{"kind": "bogus_eval"}])
    workflow_id = body["experiment_id"]
    # Started by the CLI itself (its input encrypted through the codec server's /encode).
    code, executed = await temporal(
        settings,
        "workflow",
        "execute",
        "--type",
        "Experiment",
        "--task-queue",
        worker,
        "--workflow-id",
        workflow_id,
        "--input",
        json.dumps(body),
        *codec,
    )
    assert code != 0, executed
    readable = f"InvalidInput at evals ({HINT})"
    assert readable in executed, executed
    # What a client with the key reads: the whole message, the user's value in it.
    with pytest.raises(WorkflowFailureError) as failed:
        await client.get_workflow_handle(workflow_id).result()
    cause = innermost_application_error(failed.value)
    assert cause is not None and "unknown eval kind 'bogus_eval'" in cause.message
    # `describe` and `show` say the type, the field and where the rest is.
    for command in ("describe", "show"):
        code, shown = await temporal(settings, "workflow", command, "-w", workflow_id, *codec)
        assert code == 0 and f"Message: {readable}" in shown, shown
    # Their JSON, through the codec server, holds the whole message.
    code, described = await temporal(
        settings, "workflow", "describe", "-w", workflow_id, "-o", "json", *codec
    )
    assert code == 0, described
    assert cause.message in encoded_messages(json.loads(described)), described
    # The history, read without the key: neither the value nor the message.
    raw = await raw_history(settings, workflow_id)
    assert "bogus_eval" not in raw and "unknown eval kind" not in raw and readable in raw
    code, plain = await temporal(settings, "workflow", "describe", "-w", workflow_id, "-o", "json")
    assert code == 0 and "bogus_eval" not in plain and readable in plain, plain


async def test_a_client_whose_key_the_workers_lack_fails_at_once_naming_the_key(
    client: Client, worker: str, environ: dict[str, str]
) -> None:
    """`konstruct send` with a key the worker lacks: before, it waited as long as the
    workflow may run (the worker failing its task over and over)."""
    message_id = f"m-{uuid.uuid4().hex[:8]}"
    env = dict(
        environ,
        KONSTRUCT_ENCRYPTION_KEYS=new_key_line("stranger"),
        KONSTRUCT_TASK_QUEUE=worker,
    )
    code, out, said = await finished(
        *KONSTRUCT,
        "send",
        "demo",
        "assistant",
        SECRET_TEXT,
        "--message-id",
        message_id,
        # Generous for a CLI's start on a busy machine; it used to wait for ever.
        within_s=90,
        env=env,
        cwd=str(ROOT),
    )
    assert code == 2, (out, said)
    assert "key 'stranger'" in said and "it has test-1" in said, said
    assert "Traceback" not in said, said
    # The workflow stays open (a worker given the key would run it): end it here.
    await client.get_workflow_handle(message_workflow_id("demo", message_id)).terminate()


async def test_a_client_lacking_the_workers_newer_key_is_told_which(
    settings: Settings, task_queue: str
) -> None:
    old_client = await connect_with(settings, TEST_KEYS)
    new_client = await connect_with(settings, TEST_KEYS + "," + new_key_line("test-2"))
    async with build_worker(new_client, settings, task_queue) as w, w:
        body = message()
        handle = await old_client.start_workflow(
            HandleMessage.run, body, id=f"msg-keys-{body['message_id']}", task_queue=task_queue
        )
        with pytest.raises(ConfigError, match="encrypted with key 'test-2'.*it has test-1"):
            await asyncio.wait_for(workflow_result(handle), 90)
