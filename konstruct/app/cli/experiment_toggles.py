"""`konstruct experiments stop | resume`: the workflow's update, answered accepted or refused."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from konstruct.app.cli.common import (
    CliState,
    app_pool,
    pass_state,
    run_async,
    temporal_client,
    tenant_option,
)
from konstruct.app.cli.experiment_ids import experiment_argument, experiment_workflow_id
from konstruct.platform.errors import NotFound

if TYPE_CHECKING:
    from konstruct.config import Settings


async def _raise_budget(
    settings: Settings, tenant: str, experiment: str, usd_more: float, tokens_more: int
) -> None:
    from konstruct.experiments.models import usd
    from konstruct.experiments.store.budgets import raise_budget as raise_experiment_budget
    from konstruct.platform.db import tenant_transaction

    # In PostgreSQL first: the calls after the resume reserve against it.
    async with app_pool(settings) as pool, tenant_transaction(pool, tenant) as conn:
        now = await raise_experiment_budget(
            conn, tenant, experiment, usd_more=usd_more, tokens_more=tokens_more
        )
    print(
        f"budget of {experiment} raised: {usd(now['spent_usd'])} spent of"
        f" {usd(now['budget_max_usd'])}"
        + (
            f", {now['spent_tokens']} of {now['budget_max_tokens']} tokens"
            if now["budget_max_tokens"] is not None
            else ""
        )
    )


async def send_toggle(settings: Settings, tenant: str, experiment: str, action: str) -> int:
    """Send the `stop` or `resume` update; print its answer; 0 if it was accepted."""
    from temporalio.service import RPCError

    from konstruct.experiments.models import ToggleInput
    from workflows.experiment import Experiment

    update = Experiment.request_stop if action == "stop" else Experiment.request_resume
    workflow_id = await experiment_workflow_id(settings, tenant, experiment)
    client = await temporal_client(settings)
    handle = client.get_workflow_handle(workflow_id)
    try:
        result = await handle.execute_update(update, ToggleInput(by="cli"))
    except RPCError as exc:
        try:
            status = (await handle.describe()).status
        except RPCError:
            raise NotFound(f"no experiment workflow {workflow_id!r}: {exc.message}") from None
        word = status.name.lower() if status is not None else "closed"
        print(f"{action} refused: the experiment's workflow is {word}")
        return 1
    if not result.accepted:
        print(f"{action} refused: {result.reason}")
        return 1
    # The workflow answers before the stop or resume takes effect: say what follows.
    follows = (
        "the experiment stops once its calls in flight have finished"
        if action == "stop"
        else "the experiment runs again"
    )
    queued = f" ({result.reason})" if result.reason != "accepted" else ""
    print(f"{action} accepted{queued}: {follows}")
    return 0


def _with_raise_options(command: click.Command) -> click.Command:
    """`resume --raise-budget USD --raise-tokens N`: raise the budget before resuming."""
    command = click.option(
        "--raise-budget",
        type=click.FloatRange(min=0, min_open=True),
        metavar="USD",
        help="first raise the experiment's budget.max_usd by USD (a budget pause)",
    )(command)
    return click.option(
        "--raise-tokens",
        type=click.IntRange(min=1),
        metavar="N",
        help="first raise the experiment's budget.max_tokens by N",
    )(command)


def _toggle_command(action: str) -> click.Command:
    """`stop` or `resume`: the update's answer, accepted or refused with its reason."""

    @click.command(action, help=f"{action.capitalize()} an experiment (answers accepted/refused).")
    @experiment_argument
    @tenant_option
    @pass_state
    def toggle(
        state: CliState,
        experiment: str,
        tenant: str,
        raise_budget: float | None = None,
        raise_tokens: int | None = None,
    ) -> int:
        settings = state.settings

        async def run() -> int:
            if raise_budget is not None or raise_tokens is not None:
                await _raise_budget(
                    settings, tenant, experiment, raise_budget or 0.0, raise_tokens or 0
                )
            return await send_toggle(settings, tenant, experiment, action)

        return run_async(run())

    return _with_raise_options(toggle) if action == "resume" else toggle


# The commands `konstruct.app.cli.experiments` loads when they are called.
stop = _toggle_command("stop")
resume = _toggle_command("resume")
