"""How an experiment's progress reads for people, in the CLI and in the workflow's details.

Pure: the Experiment workflow imports it in its sandbox.
"""

from __future__ import annotations

from konstruct.experiments.models import BudgetProgress, usd


def budget_line(b: BudgetProgress | None) -> str | None:
    """The budgets of an experiment and its tenant, in one line (None: it has none)."""
    if b is None:
        return None
    parts = []
    if b.max_usd is not None:
        parts.append(f"{usd(b.spent_usd)} of {usd(b.max_usd)}")
    if b.max_tokens is not None:
        parts.append(f"{b.spent_tokens} of {b.max_tokens} tokens")
    if b.reserved_usd or b.reserved_tokens:
        parts.append(f"{usd(b.reserved_usd)} ({b.reserved_tokens} tokens) reserved in flight")
    if b.tenant_max_usd is not None:
        parts.append(
            f"tenant {b.tenant_month}: {usd(b.tenant_spent_usd)} of {usd(b.tenant_max_usd)}"
        )
    return "budget " + ", ".join(parts)
