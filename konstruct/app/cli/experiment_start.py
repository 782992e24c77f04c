"""`konstruct experiments start`: the Experiment input built from a file or flags, checked, started."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from konstruct.app.cli.common import (
    CliState,
    pass_state,
    run_async,
    temporal_client,
    tenant_option,
    workflow_id_value,
)
from konstruct.platform.errors import InvalidInput

if TYPE_CHECKING:
    from temporalio.client import Client

    from konstruct.config import Settings
    from konstruct.experiments.models import ExperimentInput

DEFAULT_DATASET = "deploy/datasets/arithmetic.jsonl"
DEFAULT_TEMPLATE = "Answer with a number only: {input}"


def task_label(task: dict[str, Any]) -> str:
    """What a task runs, for a workflow's summary: its model group, or its agent."""
    if task.get("agent"):
        group = f" on {task['model_group']}" if task.get("model_group") else ""
        return f"agent {task['agent']}{group}"
    return str(task.get("model_group"))


F = TypeVar("F", bound=Callable[..., Any])


def _all(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(command: F) -> F:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


# The dataset and how an experiment runs: the same flags on `start` and `sweep`.
dataset_options = _all(
    click.option("--dataset", help=f"a .jsonl, .csv or .parquet file (default: {DEFAULT_DATASET})"),
    click.option("--input-field", help="the dataset's column of the input (default: input)"),
    click.option(
        "--expected-field", help="the dataset's column of the expected answer (default: expected)"
    ),
    click.option(
        "--id-field", help="the dataset's column of the item id (default: id, else row-N)"
    ),
)
run_options = _all(
    click.option(
        "--eval",
        "evals",
        multiple=True,
        help="eval kind (repeatable): exact_match, contains, regex, numeric_close, json_valid"
        " (json_schema and llm_judge take settings: put them in an input FILE)",
    ),
    click.option("--judge", help="add an llm_judge eval with this model group"),
    click.option(
        "--rubric", default="Is the answer correct? Score 1 if so, else 0.", show_default=True
    ),
    click.option("--max-concurrency", type=click.IntRange(min=1), help="slots per experiment"),
    click.option("--epochs", type=click.IntRange(1, 100), help="run each item N times (default 1)"),
    click.option(
        "--no-cache",
        is_flag=True,
        help="always call the provider (default: answer repeated calls from the cache)",
    ),
    click.option(
        "--budget-usd",
        type=click.FloatRange(min=0, min_open=True),
        help="pause once the calls have cost this many US dollars",
    ),
    click.option(
        "--budget-tokens",
        type=click.IntRange(min=1),
        help="pause once the calls have used this many tokens",
    ),
)


def _read_input_file(file: Path) -> dict[str, Any]:
    try:
        body = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput(f"{file} must hold a JSON object (the Experiment input)")
    return body


def _input_from_flags(
    tenant: str,
    dataset: str | None,
    mapping: dict[str, str | None],
    task: dict[str, Any],
    evals: tuple[str, ...],
    judge: str | None,
    rubric: str,
) -> dict[str, Any]:
    kinds: list[dict[str, Any]] = [{"kind": k} for k in (evals or ("exact_match",))]
    if judge:
        kinds.append({"kind": "llm_judge", "model_group": judge, "rubric": rubric})
    return {
        "tenant_id": tenant,
        "dataset": {
            "path": dataset or DEFAULT_DATASET,
            **{key: value for key, value in mapping.items() if value is not None},
        },
        "task": task,
        "evals": kinds,
    }


def _task_from_flags(
    model_group: str | None,
    template: str | None,
    agent: str | None,
    tools: str | None,
    approvals: str | None,
) -> dict[str, Any]:
    """A prompt task, or with `agent` an agent task (`--model-group` then overrides
    the agent's own group; `--template` is refused: the agent builds its prompt)."""
    if agent is None:
        for flag, value in (("--tools", tools), ("--approvals", approvals)):
            if value is not None:
                raise InvalidInput(f"{flag}: only for an agent task (--agent AGENT)", [flag])
        return {
            "model_group": model_group or "fast",
            "prompt_template": template or DEFAULT_TEMPLATE,
        }
    if template is not None:
        raise InvalidInput(
            "--template: an agent task takes its prompt from the agent; leave it out with --agent",
            ["--template"],
        )
    task: dict[str, Any] = {"agent": agent}
    for key, value in (("model_group", model_group), ("tools", tools), ("approvals", approvals)):
        if value is not None:
            task[key] = value
    return task


def _apply_flags(
    body: dict[str, Any],
    experiment_id: str | None,
    name: str | None,
    epochs: int | None,
    no_cache: bool,
    budget_usd: float | None,
    budget_tokens: int | None,
) -> None:
    """The flags that override what a file says (or fill in what flags left out)."""
    if experiment_id:
        body["experiment_id"] = experiment_id
    body.setdefault("experiment_id", f"exp-{time.strftime('%Y%m%d-%H%M%S')}")
    if name:
        body["name"] = name
    if epochs is not None:
        body["epochs"] = epochs
    if no_cache:
        body["cache"] = False
    if budget_usd is not None or budget_tokens is not None:
        body["budget"] = dict(body.get("budget") or {})
        if budget_usd is not None:
            body["budget"]["max_usd"] = budget_usd
        if budget_tokens is not None:
            body["budget"]["max_tokens"] = budget_tokens


def build_input(
    settings: Settings,
    *,
    file: Path | None = None,
    experiment_id: str | None = None,
    tenant: str = "demo",
    name: str | None = None,
    dataset: str | None = None,
    input_field: str | None = None,
    expected_field: str | None = None,
    id_field: str | None = None,
    model_group: str | None = None,
    template: str | None = None,
    agent: str | None = None,
    tools: str | None = None,
    approvals: str | None = None,
    evals: tuple[str, ...] = (),
    judge: str | None = None,
    rubric: str = "",
    max_concurrency: int | None = None,
    epochs: int | None = None,
    no_cache: bool = False,
    budget_usd: float | None = None,
    budget_tokens: int | None = None,
) -> dict[str, Any]:
    """The workflow input, with the experiment settings as its `options` defaults."""
    from pydantic import ValidationError

    from konstruct.experiments.models import ExperimentInput

    if file is not None:
        body = _read_input_file(file)
    else:
        mapping = {
            "input_field": input_field,
            "expected_field": expected_field,
            "id_field": id_field,
        }
        task = _task_from_flags(model_group, template, agent, tools, approvals)
        body = _input_from_flags(tenant, dataset, mapping, task, evals, judge, rubric)
    _apply_flags(body, experiment_id, name, epochs, no_cache, budget_usd, budget_tokens)
    s = settings.experiments
    body.setdefault("max_concurrency", max_concurrency or s.max_concurrency)
    body["options"] = {**s.workflow_options().model_dump(), **body.get("options", {})}
    try:
        validated = ExperimentInput.model_validate(body)
    except ValidationError as exc:
        raise InvalidInput.from_validation_error("Experiment", exc) from None
    _check_against_config(settings, body, validated)
    return body


def _check_against_config(
    settings: Settings, body: dict[str, Any], validated: ExperimentInput
) -> None:
    """What the input cannot say about itself: its model groups are in the router
    config, its dataset reads (the file exists and every row maps to an item, as the
    worker will read it) and the template names only fields the items have."""
    from konstruct.experiments.datasets import load_items
    from konstruct.experiments.models import LlmJudgeEval
    from konstruct.experiments.trajectory import check_agent_items
    from konstruct.providers.router import load_router_config

    config = load_router_config(settings.path(settings.llm.router_config))
    groups = sorted({d.model_name for d in config.model_list})
    task_group = [("task.model_group", validated.task.model_group)]
    named = [(f, g) for f, g in task_group if g is not None] + [
        (f"evals.{i}.model_group", e.model_group)
        for i, e in enumerate(validated.evals)
        if isinstance(e, LlmJudgeEval)
    ]
    for field, group in named:
        if group not in groups:
            raise InvalidInput(
                f"Experiment: {field}: {group!r} is not a model group of the router config"
                f" ({', '.join(groups)})"
            )
    try:
        items = load_items(validated.dataset, settings.base_dir, validated.task.prompt_template)
        if validated.task.agent is not None:
            check_agent_items(items)
    except InvalidInput as exc:
        raise InvalidInput(f"Experiment: {exc}", exc.fields) from None


async def start_experiment(
    client: Client, settings: Settings, body: dict[str, Any], workflow_id: str, summary: str
) -> None:
    """Start the Experiment workflow on `body`, on the configured task queue."""
    from workflows.experiment import Experiment

    await client.start_workflow(
        Experiment.run,
        body,
        id=workflow_id,
        task_queue=settings.temporal.task_queue,
        static_summary=summary,
    )


async def launch(
    client: Client,
    settings: Settings,
    body: dict[str, Any],
    workflow_id: str,
    *,
    summary: str,
    said: str,
    experiment: str,
) -> None:
    """Start the Experiment workflow on `body`; say so, and how to watch it."""
    await start_experiment(client, settings, body, workflow_id, summary)
    print(said)
    print(f"  watch: konstruct experiments watch {experiment}")


@click.command("start")
@click.argument(
    "file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--id", "experiment_id", callback=workflow_id_value, help="experiment id (default: new)"
)
@tenant_option
@click.option("--name")
@dataset_options
@click.option("--model-group", help="the task's model group (default: fast; an agent's own)")
@click.option("--template", help=f"the prompt template (default: {DEFAULT_TEMPLATE!r})")
@click.option("--agent", help="evaluate this agent of the tenant: each item a message to it")
@click.option(
    "--tools",
    type=click.Choice(["fixtures", "live"]),
    help="agent tasks: answer tools with side effects from the items' tool_results"
    " (default), or run them live",
)
@click.option(
    "--approvals",
    type=click.Choice(["approve", "reject"]),
    help="agent tasks: how calls needing approval are answered (default: reject)",
)
@run_options
@click.option("--watch", is_flag=True, help="watch it until it ends")
@pass_state
def start(state: CliState, watch: bool, **fields: Any) -> int:
    """Start an Experiment (from a JSON file or flags)."""
    settings = state.settings
    body = build_input(settings, **fields)
    workflow_id = body["experiment_id"]

    async def run() -> int:
        client = await temporal_client(settings)
        await launch(
            client,
            settings,
            body,
            workflow_id,
            summary=f"experiment {workflow_id} ({task_label(body['task'])})",
            said=f"started experiment {workflow_id} (workflow id {workflow_id})",
            experiment=workflow_id,
        )
        if watch:
            from konstruct.app.cli.experiment_watch import watch_experiment

            return await watch_experiment(client, workflow_id, 1.0)
        return 0

    return run_async(run())
