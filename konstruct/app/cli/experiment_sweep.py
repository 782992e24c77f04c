"""`konstruct experiments sweep`: one experiment per model group × prompt template.

Every combination is built and checked before any starts (a bad one starts
nothing). They share the dataset, the tenant's output cache and the providers'
limits; the provider queues serve experiments round-robin, so the combinations
share a provider fairly. `--watch` waits for all of them and prints
`experiments compare`'s matrix.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from konstruct.app.cli.common import (
    CliState,
    pass_state,
    run_async,
    temporal_client,
    tenant_option,
    workflow_id_value,
)
from konstruct.app.cli.experiment_start import (
    build_input,
    dataset_options,
    run_options,
    start_experiment,
)
from konstruct.platform.errors import InvalidInput

if TYPE_CHECKING:
    from temporalio.client import Client

# How often `--watch` asks each experiment how it is doing.
WATCH_INTERVAL_S = 1.0


def template_text(value: str) -> str:
    """`--template`: the template itself when it names a field (`{input}`), else a file
    holding one."""
    if "{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise InvalidInput(
            f"experiments sweep: --template {value!r}: no such file, and not a template"
            " (a template names a field, as in {input})",
            ["--template"],
        )
    return path.read_text(encoding="utf-8").strip()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def combinations(
    sweep_id: str, groups: tuple[str, ...], templates: tuple[str, ...]
) -> list[tuple[str, str, str, int]]:
    """(experiment id, model group, template text, template number) per combination,
    groups outermost, in the order given."""
    texts = [template_text(t) for t in templates]
    return [
        (f"{sweep_id}-{_slug(group)}-t{n}", group, text, n)
        for group in groups
        for n, text in enumerate(texts, 1)
    ]


def _unique(option: str, values: tuple[str, ...]) -> None:
    if len(set(values)) < len(values):
        raise InvalidInput(f"experiments sweep: {option}: a value is given twice", [option])


@click.command("sweep")
@click.option(
    "--id",
    "sweep_id",
    callback=workflow_id_value,
    help="the sweep's id; its experiments are ID-GROUP-tN (default: sweep-TIME)",
)
@tenant_option
@click.option(
    "--model-group", "groups", multiple=True, required=True, help="a model group (repeatable)"
)
@click.option(
    "--template",
    "templates",
    multiple=True,
    help="a prompt template, or a file holding one (repeatable; a template names a"
    " field, as in {input})",
)
@click.option(
    "--agent",
    "agents",
    multiple=True,
    help="instead of templates: an agent of the tenant (repeatable), run on each model group",
)
@dataset_options
@run_options
@click.option("--watch", is_flag=True, help="wait for all to end, then print the matrix")
@pass_state
def sweep(
    state: CliState,
    sweep_id: str | None,
    groups: tuple[str, ...],
    templates: tuple[str, ...],
    agents: tuple[str, ...],
    watch: bool,
    **fields: Any,
) -> int:
    """Start one experiment per model group × prompt template (or agent), on one dataset."""
    settings = state.settings
    _unique("--model-group", groups)
    _unique("--template", templates)
    _unique("--agent", agents)
    if bool(templates) == bool(agents):
        raise InvalidInput(
            "experiments sweep: give --template (prompt tasks) or --agent (agent tasks),"
            " one of the two",
            ["--template"],
        )
    sweep_id = sweep_id or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    if agents:
        bodies = [
            build_input(
                settings,
                experiment_id=f"{sweep_id}-{_slug(group)}-{_slug(agent)}",
                name=f"sweep {sweep_id}: agent {agent} on {group}",
                model_group=group,
                agent=agent,
                **fields,
            )
            for group in groups
            for agent in agents
        ]
    else:
        bodies = [
            build_input(
                settings,
                experiment_id=experiment_id,
                name=f"sweep {sweep_id}: {group} x template {n}",
                model_group=group,
                template=text,
                **fields,
            )
            for experiment_id, group, text, n in combinations(sweep_id, groups, templates)
        ]

    ids = [b["experiment_id"] for b in bodies]

    async def run() -> int:
        client = await temporal_client(settings)
        for body in bodies:
            await start_experiment(client, settings, body, body["experiment_id"], body["name"])
            print(f"started {body['experiment_id']}  ({body['name']})")
        print(f"  compare: konstruct experiments compare {' '.join(ids)}")
        if not watch:
            return 0
        return await _watch_all(client, ids)

    code = run_async(run())
    if code == 0 and watch and len(bodies) > 1:
        from konstruct.app.cli.experiment_reports import compare_runs

        return compare_runs(settings, fields["tenant"], ids)
    return code


async def _watch_all(client: Client, ids: list[str]) -> int:
    """Until every experiment has ended (or waits for a person): a line as each ends.
    0 when all completed, 1 when one did not, else 3 when one waits for a resume."""
    from konstruct.app.cli.experiment_watch import (
        EXIT_PAUSED,
        FINISHED,
        experiment_progress,
        waits_for_you,
    )

    seen: dict[str, str] = {}
    while True:
        progress = await asyncio.gather(*(experiment_progress(client, i) for i in ids))
        for p in progress:
            said = f"{p.status} {p.evaluated + p.failed}/{p.total}, {p.failed} failed"
            if p.status in FINISHED and seen.get(p.experiment_id) != said:
                print(f"{p.experiment_id}: {said}")
            seen[p.experiment_id] = said
        waiting = [p for p in progress if waits_for_you(p)]
        if all(p.status in FINISHED for p in progress if p not in waiting):
            for p in waiting:
                print(f"{p.experiment_id}: paused: {p.paused_reason or p.paused_kind}")
            if any(p.status in FINISHED and p.status != "completed" for p in progress):
                return 1
            return EXIT_PAUSED if waiting else 0
        await asyncio.sleep(WATCH_INTERVAL_S)
