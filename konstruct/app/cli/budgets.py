"""`konstruct budgets set | show`: a tenant's monthly budget for its experiment calls."""

from __future__ import annotations

from typing import Any

import click

from konstruct.app.cli.common import CliState, in_tenant, json_option, pass_state, tenant_argument


@click.group("budgets")
def group() -> None:
    """A tenant's monthly budget (US dollars) over its experiments' calls."""


def _paused(data: dict[str, Any], tenant: str) -> None:
    for paused in data["paused"]:
        print(f"  paused: {paused['experiment_id']}: {paused['reason']}")
        print(
            f"    resume: konstruct experiments resume {paused['experiment_id']} --tenant {tenant}"
        )


@group.command("set")
@tenant_argument
@click.option(
    "--monthly-usd",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    metavar="N",
    help="at most N US dollars a month (this month on; a month's first budget counts"
    " what the month's calls already cost)",
)
@json_option()
@pass_state
def set_(state: CliState, tenant: str, monthly_usd: float, as_json: bool) -> int:
    """Set the tenant's monthly budget: a call that would go over it pauses its experiment."""
    from konstruct.app.cli.output import print_json
    from konstruct.experiments.models import usd
    from konstruct.experiments.store.budgets import set_monthly, tenant_budget

    month = in_tenant(state.settings, tenant, lambda conn: set_monthly(conn, tenant, monthly_usd))
    data = in_tenant(state.settings, tenant, lambda conn: tenant_budget(conn, tenant))
    if as_json:
        print_json(data)
        return 0
    print(
        f"tenant {tenant!r}: {usd(month['max_usd'])} a month; {month['month']}:"
        f" {usd(month['spent_usd'])} spent, {usd(month['left_usd'])} left"
    )
    _paused(data, tenant)
    return 0


@group.command("show")
@tenant_argument
@json_option()
@pass_state
def show(state: CliState, tenant: str, as_json: bool) -> int:
    """The tenant's monthly budget: this month, the months before, paused experiments."""
    from konstruct.app.cli.output import print_json, print_table
    from konstruct.experiments.models import usd
    from konstruct.experiments.store.budgets import tenant_budget

    data = in_tenant(state.settings, tenant, lambda conn: tenant_budget(conn, tenant))
    if as_json:
        print_json(data)
        return 0
    if data["month"] is None:
        print(f"tenant {tenant!r} has no monthly budget (set one with `konstruct budgets set`)")
        return 0
    print_table(
        ["month", "max", "spent", "reserved", "left"],
        [
            (
                m["month"],
                usd(m["max_usd"]),
                usd(m["spent_usd"]),
                usd(m["reserved_usd"]),
                usd(m["left_usd"]),
            )
            for m in [
                data["month"],
                *[h for h in data["history"] if h["month"] != data["month"]["month"]],
            ]
        ],
    )
    _paused(data, tenant)
    return 0
