"""Agent experiments: each item through the tenant's agent, on the real stack.

Real PostgreSQL, dev server and simulator over HTTP through litellm; the simulator's
scripted model calls a tool for each `/tool NAME {json}` line of the user's message
and, given the tool's result, answers "Tool NAME returned: RESULT". Webhook tools
are served by the test (`hooks`), so a call that reached one is seen.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowFailureError

from konstruct.agents.store.tools import put_tool
from konstruct.app.cli import main as cli_main
from konstruct.config import Settings
from konstruct.experiments.evals import judge_messages
from konstruct.experiments.models import ExperimentResult, LlmJudgeEval
from konstruct.experiments.store.budgets import set_monthly
from konstruct.experiments.trajectory import Transcript
from konstruct.platform.db import tenant_transaction
from konstruct.providers.simulator.admin import SimulatorAdmin
from konstruct.providers.simulator.responders import content_key
from tests.support import Hooks, WorkerRelay, replay_all, replayer, wait_for_calls
from tests.test_agent_tools import make_agent, new_tenant, webhook
from tests.test_experiment_replay import _runs, uncached_worker
from tests.test_experiments import FAST, experiment, start, wait_for
from workflows.experiment import Experiment

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

CALC = '/tool calculator {"expression": "6*7"}'


async def agent_tenant(pool: asyncpg.Pool, hooks: Hooks) -> str:
    """A new tenant whose agent `helper` has the calculator, a `lookup` webhook and a
    `refund` webhook that needs a person's approval."""
    tenant = new_tenant()
    await make_agent(pool, tenant, [])
    async with tenant_transaction(pool, tenant) as conn:
        await put_tool(conn, tenant, webhook("lookup", f"{hooks.url}/lookup"))
        await put_tool(
            conn, tenant, webhook("refund", f"{hooks.url}/refund", requires_approval=True)
        )
    await make_agent(pool, tenant, ["calculator", "lookup", "refund"])
    return tenant


def agent_experiment(
    tenant: str, items: list[dict[str, Any]], evals: list[dict[str, Any]], **task: Any
) -> dict[str, Any]:
    return experiment(
        tenant_id=tenant,
        dataset={"items": items},
        task={"agent": "helper", **task},
        evals=evals,
    )


async def run(client: Client, task_queue: str, body: dict[str, Any]) -> ExperimentResult:
    result: ExperimentResult = await (await start(client, task_queue, body)).result()
    return result


async def stored(pool: asyncpg.Pool, tenant: str, experiment_id: str) -> dict[str, Any]:
    """Each item's result row, by item id."""
    async with tenant_transaction(pool, tenant) as conn:
        rows = await conn.fetch(
            "select * from experiment_results where experiment_id = $1", experiment_id
        )
    return {r["item_id"]: r for r in rows}


def scores(row: Any) -> dict[str, bool]:
    return {name: s["passed"] for name, s in json.loads(row["scores"]).items()}


def transcript(row: Any) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(row["transcript"])
    return value


def calls_of(row: Any) -> list[dict[str, Any]]:
    return [c for t in transcript(row)["turns"] for s in t["steps"] for c in s["calls"]]


async def test_tools_from_fixtures_a_live_calculator_and_trajectory_evals(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    tenant = await agent_tenant(app_pool, hooks)
    fixture = [{"tool": "lookup", "arguments": {"x": 1}, "result": "one"}]
    items: list[dict[str, Any]] = [
        {"id": "calc", "input": CALC, "expected": "Tool calculator returned: 42"},
        {
            "id": "look",
            "input": '/tool lookup {"x": 1}',
            "expected": "Tool lookup returned: one",
            "tool_results": fixture,
        },
        {
            "id": "nofix",
            "input": '/tool lookup {"x": 2}',
            "expected": "-",
            "tool_results": fixture,
        },
        {"id": "plain", "input": "hello there", "expected": "-"},
    ]
    evals: list[dict[str, Any]] = [
        {"kind": "exact_match"},
        {"kind": "tool_called", "name": "calc", "tool": "calculator"},
        {
            "kind": "tool_called",
            "name": "calc67",
            "tool": "calculator",
            "arguments": {"expression": "6*7"},
            "count": 1,
        },
        {"kind": "tool_not_called", "name": "no_lookup", "tool": "lookup"},
        {"kind": "max_steps", "name": "one_step", "max": 1},
        {"kind": "final_answer", "name": "says_42", "check": {"kind": "contains", "value": "42"}},
    ]
    body = agent_experiment(tenant, items, evals)
    result = await run(client, worker, body)
    assert (result.summary.completed, result.summary.failed) == (4, 0)
    rows = await stored(app_pool, tenant, body["experiment_id"])
    assert scores(rows["calc"]) == {
        "exact_match": True,
        "calc": True,
        "calc67": True,
        "no_lookup": True,
        "one_step": False,  # a tool step, then the answer
        "says_42": True,
    }
    assert scores(rows["look"]) == {
        "exact_match": True,
        "calc": False,
        "calc67": False,
        "no_lookup": False,
        "one_step": False,
        "says_42": False,
    }
    assert scores(rows["plain"])["one_step"] and not scores(rows["plain"])["calc"]
    # The calculator ran live; the webhook was answered by the fixture, never called.
    (calc,) = calls_of(rows["calc"])
    assert (calc["tool"], calc["status"], calc["result"], calc["source"]) == (
        "calculator",
        "ok",
        "42",
        "live",
    )
    (look,) = calls_of(rows["look"])
    assert (look["status"], look["result"], look["source"]) == ("ok", "one", "fixture")
    (missing,) = calls_of(rows["nofix"])
    assert missing["status"] == "error" and "no fixture for tool 'lookup'" in missing["result"]
    assert "no fixture" in rows["nofix"]["output"]  # the model was told, and said so
    assert hooks.requests == []
    # Each item's transcript holds its steps: two for a tool call, one for a reply.
    steps = [len(t["steps"]) for t in transcript(rows["calc"])["turns"]]
    assert steps == [2]
    assert rows["calc"]["prompt_tokens"] > 0 and rows["calc"]["output"] == (
        "Tool calculator returned: 42"
    )


async def test_a_conversation_is_answered_turn_by_turn_in_a_thread_of_its_own(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    tenant = await agent_tenant(app_pool, hooks)
    items: list[dict[str, Any]] = [
        {"id": "a", "input": "my name is Ada", "turns": [CALC, "thanks"], "expected": "-"},
        {"id": "b", "input": "my name is Bo", "expected": "-"},
    ]
    evals = [{"kind": "max_steps", "max": 4}, {"kind": "max_steps", "name": "tight", "max": 3}]
    body = agent_experiment(tenant, items, evals)
    body["epochs"] = 2
    result = await run(client, worker, body)
    assert (result.summary.completed, result.summary.failed) == (4, 0)
    rows = await stored(app_pool, tenant, body["experiment_id"])
    assert len(rows) == 4
    for item_id, row in rows.items():
        turns = transcript(row)["turns"]
        users = [t["user"] for t in turns]
        if item_id.startswith("a"):
            assert users == ["my name is Ada", CALC, "thanks"]
            assert turns[1]["reply"] == "Tool calculator returned: 42"
            # Steps over all turns: 1 + 2 (a tool call, then the answer) + 1.
            assert scores(row) == {"max_steps": True, "tight": False}
        else:
            assert users == ["my name is Bo"]
            assert scores(row) == {"max_steps": True, "tight": True}
    # Every item and epoch has a thread of its own, holding only its own turns.
    async with tenant_transaction(app_pool, tenant) as conn:
        threads = await conn.fetch(
            "select thread_id, array_agg(user_text order by created_at) as texts from message_turns"
            " where tenant_id = $1 group by thread_id",
            tenant,
        )
    by_thread = {r["thread_id"]: r["texts"] for r in threads}
    assert len(by_thread) == 4
    assert sorted(len(t) for t in by_thread.values()) == [1, 1, 3, 3]
    for texts in by_thread.values():
        assert len({t.split()[-1] for t in texts if t.startswith("my name")}) <= 1


async def test_approvals_follow_the_policy_and_live_tools_run_only_when_asked(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    tenant = await agent_tenant(app_pool, hooks)
    items = [{"id": "r", "input": '/tool refund {"x": 5}', "expected": "-"}]
    evals = [{"kind": "tool_called", "tool": "refund"}]
    rejected = agent_experiment(tenant, items, evals, approvals="reject", tools="live")
    await run(client, worker, rejected)
    (call,) = calls_of((await stored(app_pool, tenant, rejected["experiment_id"]))["r"])
    assert (call["status"], call["source"]) == ("rejected", "experiment approvals policy")
    assert hooks.requests == []
    approved = agent_experiment(tenant, items, evals, approvals="approve", tools="live")
    await run(client, worker, approved)
    row = (await stored(app_pool, tenant, approved["experiment_id"]))["r"]
    (call,) = calls_of(row)
    assert (call["status"], call["source"]) == ("ok", "live")
    assert [r["path"] for r in hooks.requests] == ["/refund"]
    assert call["result"] == 'hook /refund got {"x": 5}'
    async with tenant_transaction(app_pool, tenant) as conn:
        decided = await conn.fetchval(
            "select decided_by from tool_calls where call_id = $1", call["call_id"]
        )
    assert decided == "experiment approvals policy"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"evals": [{"kind": "tool_called", "tool": "calculator"}]}, "evals.0.kind"),
        ({"task": {"agent": "nobody"}}, "task.agent"),
        ({"task": {"agent": "helper", "prompt_template": "{input}"}}, "task.prompt_template"),
        ({"dataset": {"items": [{"id": "1", "input": "x", "turns": "no"}]}}, "turns"),
        (
            {"dataset": {"items": [{"id": "1", "input": "x", "tool_results": [{"tool": ""}]}]}},
            "tool_results.0",
        ),
    ],
)
async def test_bad_agent_inputs_fail_at_once_naming_the_field(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks, change: dict, field: str
) -> None:
    tenant = await agent_tenant(app_pool, hooks)
    body = agent_experiment(tenant, [{"id": "1", "input": "x"}], [])
    if "evals" in change:  # a trajectory eval on a prompt task
        body["task"] = {"model_group": "fast", "prompt_template": "{input}"}
    body.update(change)
    body["experiment_id"] = f"bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(WorkflowFailureError) as failure:
        await run(client, worker, body)
    message = str(failure.value.cause)
    assert field in message, message


async def assert_each_item_once(
    pool: asyncpg.Pool, tenant: str, body: dict[str, Any], result: ExperimentResult, eval_name: str
) -> None:
    """Every item of `body` completed, with one stored result that passed `eval_name`
    and one stored turn (its thread's single message)."""
    items = body["dataset"]["items"]
    n = len(items)
    assert (result.summary.completed, result.summary.failed) == (n, 0)
    rows = await stored(pool, tenant, body["experiment_id"])
    assert sorted(rows) == sorted(i["id"] for i in items)
    assert all(scores(r) == {eval_name: True} for r in rows.values())
    async with tenant_transaction(pool, tenant) as conn:
        assert await conn.fetchval("select count(*) from message_turns") == n


async def test_kill_9_mid_item_leaves_one_result_one_turn_and_no_step_asked_twice(
    client: Client, relay: WorkerRelay, task_queue: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    """Workers killed with items between their two steps: the next attempt walks the
    stored steps again without asking the model for them."""
    tenant = await agent_tenant(app_pool, hooks)
    run_id = uuid.uuid4().hex[:8]  # the simulator counts requests by their text: this run's
    items: list[dict[str, Any]] = [
        {
            "id": f"c{i}",
            "input": f'run {run_id}\n/tool calculator {{"expression": "{i}*7"}}',
            "expected": f"Tool calculator returned: {i * 7}",
        }
        for i in range(12)
    ]
    body = agent_experiment(tenant, items, [{"kind": "exact_match"}])
    body["max_concurrency"] = 6
    body["options"]["heartbeat_timeout_s"] = 3
    before = (await relay.sim.model_stats(FAST)).get("ok", 0)
    await relay.start_slow(FAST, latency_ms=600)
    handle = await start(client, task_queue, body)
    await wait_for_calls(relay.sim, FAST, ok=before + 8, in_flight=3)
    # And an item's turn stored, with calls still in flight: answers alone may have
    # stored none yet on a busy machine (ci69).
    for _ in range(1200):
        async with tenant_transaction(app_pool, tenant) as conn:
            if await conn.fetchval("select count(*) from message_turns"):
                if (await relay.sim.model_stats(FAST)).get("in_flight", 0) >= 1:
                    break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("no turn was stored with calls in flight")
    await relay.kill_first()
    async with tenant_transaction(app_pool, tenant) as conn:
        done_at_kill = await conn.fetchval(
            "select count(*) from message_turns where thread_id like 'x:%'"
        )
        steps_at_kill = await conn.fetchval("select count(*) from agent_steps")
    await relay.take_over(latency_ms=20)
    await assert_each_item_once(app_pool, tenant, body, await handle.result(), "exact_match")
    async with tenant_transaction(app_pool, tenant) as conn:
        calls = await conn.fetch("select status from tool_calls")
    assert [c["status"] for c in calls] == ["ok"] * 12
    # Two model calls an item (both keyed by its message), one at a time: the kill
    # loses at most the call an item had in progress, and a step stored before it is
    # never asked again.
    assert 0 < done_at_kill < 12 and steps_at_kill > 0
    requests = (await relay.sim.requests_by_content(FAST))["requests"]
    made = {i["id"]: requests.get(content_key(i["input"]), 0) for i in items}
    assert {i: n for i, n in made.items() if not 2 <= n <= 3} == {}
    assert sum(made.values()) <= 24 + (12 - done_at_kill)


@pytest.fixture
async def cli_tenant(cli_worker: str, app_pool: asyncpg.Pool, hooks: Hooks) -> str:
    """A tenant with the `helper` agent, and the CLI pointed at this test's worker."""
    return await agent_tenant(app_pool, hooks)


async def test_the_cli_runs_an_agent_experiment_from_a_jsonl_file_and_shows_an_item(
    cli_tenant: str, hooks: Hooks, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A JSONL file's `turns` and `tool_results` keep their JSON (other extra columns are
    text), `start --agent` evaluates the agent, `show EXP ITEM` prints the transcript."""
    tenant = cli_tenant
    data = tmp_path / "agent.jsonl"
    rows = [
        {
            "id": "look",
            "input": "hello",
            "turns": ['/tool lookup {"x": 1}'],
            "tool_results": {"lookup": {"name": "one"}},
            "expected": 'Tool lookup returned: {"name": "one"}',
        },
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    experiment_id = f"exp-agent-{uuid.uuid4().hex[:6]}"
    argv = ["experiments", "start", "--id", experiment_id, "--tenant", tenant]
    argv += ["--agent", "helper", "--dataset", str(data), "--eval", "exact_match", "--watch"]
    assert await asyncio.to_thread(cli_main, argv) == 0
    assert "1/1" in capsys.readouterr().out
    show = ["experiments", "show", experiment_id, "look", "--tenant", tenant]
    assert await asyncio.to_thread(cli_main, show) == 0
    out = capsys.readouterr().out
    assert "exact_match: 1.0 pass" in out
    assert "[turn 2] user: /tool lookup" in out
    assert '  step 1: tool lookup {"x": 1}' in out
    assert '    -> ok, fixture: {"name": "one"}' in out
    assert hooks.requests == []
    # The HTML report shows each agent item's transcript behind its output.
    page = tmp_path / "report.html"
    report = ["experiments", "report", experiment_id, "--tenant", tenant, "--out", str(page)]
    assert await asyncio.to_thread(cli_main, report) == 0
    html = page.read_text()
    assert '<details class="transcript" id="t-look">' in html
    assert "[turn 2] user: /tool lookup {&quot;x&quot;: 1}" in html
    missing = ["experiments", "show", experiment_id, "nope", "--tenant", tenant]
    assert await asyncio.to_thread(cli_main, missing) != 0
    assert "no item 'nope'" in capsys.readouterr().err


async def test_a_sweep_runs_an_agent_on_each_model_group(
    cli_tenant: str, app_pool: asyncpg.Pool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = cli_tenant
    data = tmp_path / "calc.jsonl"
    data.write_text(json.dumps({"id": "1", "input": CALC, "expected": "42"}) + "\n")
    sweep_id = f"sw-{uuid.uuid4().hex[:6]}"
    argv = ["experiments", "sweep", "--id", sweep_id, "--tenant", tenant, "--agent", "helper"]
    argv += ["--model-group", "fast", "--model-group", "quality", "--dataset", str(data)]
    argv += ["--eval", "contains", "--watch"]
    assert await asyncio.to_thread(cli_main, argv) == 0
    out = capsys.readouterr().out
    assert f"{sweep_id}-fast-helper: completed 1/1" in out
    assert f"{sweep_id}-quality-helper: completed 1/1" in out
    async with tenant_transaction(app_pool, tenant) as conn:
        models = await conn.fetch(
            "select experiment_id, model from experiment_results order by experiment_id"
        )
    assert [r["experiment_id"] for r in models] == [
        f"{sweep_id}-fast-helper",
        f"{sweep_id}-quality-helper",
    ]
    assert models[0]["model"] != models[1]["model"]  # each ran on its own group
    both = ["experiments", "sweep", "--agent", "helper", "--template", "{input}"]
    both += ["--model-group", "fast"]
    assert await asyncio.to_thread(cli_main, both) == 2
    assert "give --template (prompt tasks) or --agent" in capsys.readouterr().err


async def test_an_agent_experiment_replays_without_cache(
    client: Client, settings: Settings, task_queue: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    """Every workflow task of an agent experiment replays from scratch (no cache), with a
    continue-as-new, then each run's history replays (KONSTRUCT_RECORD_HISTORIES=1 records
    them for tests/test_experiment_replay.py)."""
    tenant = await agent_tenant(app_pool, hooks)
    items: list[dict[str, Any]] = [
        {"id": "calc", "input": CALC, "expected": "42"},
        {"id": "talk", "input": "hello", "turns": [CALC], "expected": "42"},
        {"id": "look", "input": '/tool lookup {"x": 1}', "tool_results": {"lookup": "one"}},
    ]
    body = agent_experiment(tenant, items, [{"kind": "tool_called", "tool": "calculator"}])
    body["max_concurrency"] = 2
    body["options"]["continue_as_new_every"] = 2
    async with uncached_worker(client, settings, task_queue):
        result: ExperimentResult = await (await start(client, task_queue, body)).result()
        runs = await _runs(client, body["experiment_id"])
    assert (result.summary.completed, result.summary.failed) == (3, 0)
    assert len(runs) >= 2
    await replay_all(
        replayer(Experiment),
        {f"agent_{index}": history for index, history in enumerate(runs)},
        record_as="experiment_",
    )


async def test_an_llm_judge_reads_the_whole_transcript(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks, sim: SimulatorAdmin
) -> None:
    """The judge is asked about the transcript (every turn, tool call and result),
    not only the last reply: the simulator saw exactly that request."""
    tenant = await agent_tenant(app_pool, hooks)
    items: list[dict[str, Any]] = [
        {"id": "j", "input": f"hi {uuid.uuid4().hex[:6]}", "turns": [CALC], "expected": "42"}
    ]
    judge = {"kind": "llm_judge", "model_group": "judge", "rubric": "Did it use the tool?"}
    body = agent_experiment(tenant, items, [judge])
    result = await run(client, worker, body)
    assert (result.summary.completed, result.summary.failed) == (1, 0)
    row = (await stored(app_pool, tenant, body["experiment_id"]))["j"]
    told = Transcript.model_validate(transcript(row)).render()
    assert "[turn 2] user: " + CALC in told and "-> ok, live: 42" in told
    question = judge_messages(LlmJudgeEval.model_validate(judge), items[0]["input"], told, "42")
    requests = (await sim.requests_by_content("sim-judge"))["requests"]
    assert requests.get(content_key(question[-1]["content"])) == 1
    assert json.loads(row["scores"])["llm_judge"]["score"] is not None


async def test_a_calls_cost_counts_once_to_the_experiment_and_once_to_the_tenants_month(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    """The experiment's budget hold settles each call to the experiment and the month;
    the message path's own count (a message's calls) must not add them again."""
    tenant = await agent_tenant(app_pool, hooks)
    async with tenant_transaction(app_pool, tenant) as conn:
        await set_monthly(conn, tenant, 5.0)
    items: list[dict[str, Any]] = [{"id": "c", "input": CALC, "turns": ["thanks"]}]
    body = agent_experiment(tenant, items, [])
    result = await run(client, worker, body)
    assert result.summary.completed == 1 and result.summary.cost_usd > 0
    async with tenant_transaction(app_pool, tenant) as conn:
        month = await conn.fetchrow(
            "select spent_usd, reserved_usd from tenant_budgets where tenant_id = $1", tenant
        )
        stored = await conn.fetchval(
            "select cost_usd from experiment_results where experiment_id = $1",
            body["experiment_id"],
        )
    assert month["spent_usd"] == pytest.approx(result.summary.cost_usd, rel=1e-9)
    assert stored == pytest.approx(result.summary.cost_usd, rel=1e-9)
    assert month["reserved_usd"] == pytest.approx(0.0, abs=1e-12)


async def test_a_spent_month_pauses_an_agent_experiment_instead_of_failing_its_items(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    """The message path answers a spent month with the agent's fallback; an experiment
    pauses (its budget hold asks the month), as a prompt experiment does."""
    tenant = await agent_tenant(app_pool, hooks)
    async with tenant_transaction(app_pool, tenant) as conn:
        await set_monthly(conn, tenant, 0.001)
        await conn.execute(
            "update tenant_budgets set spent_usd = max_usd where tenant_id = $1", tenant
        )
    body = agent_experiment(tenant, [{"id": "c", "input": CALC}], [])
    handle = await start(client, worker, body)
    progress = await wait_for(handle, lambda p: p.status == "paused")
    assert progress.failed == 0 and progress.paused_kind == "budget", progress
    assert "monthly budget" in (progress.paused_reason or ""), progress
    await handle.terminate("the test is over")


async def test_stop_and_resume_of_an_agent_experiment_leave_one_result_an_item(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks, sim: SimulatorAdmin
) -> None:
    tenant = await agent_tenant(app_pool, hooks)
    await sim.set_profile(FAST, latency_ms=150)
    items: list[dict[str, Any]] = [
        {
            "id": f"s{i}",
            "input": f'/tool calculator {{"expression": "{i}+1"}}',
            "expected": str(i + 1),
        }
        for i in range(8)
    ]
    body = agent_experiment(tenant, items, [{"kind": "contains"}])
    body["max_concurrency"] = 2
    body["options"]["toggle_cooldown_s"] = 0.0
    handle = await start(client, worker, body)
    await wait_for(handle, lambda p: p.evaluated >= 1)
    await handle.signal(Experiment.stop)
    stopped = await wait_for(handle, lambda p: p.status == "stopped")
    assert stopped.evaluated < 8
    await handle.signal(Experiment.resume)
    await assert_each_item_once(app_pool, tenant, body, await handle.result(), "contains")
