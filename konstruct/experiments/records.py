"""An experiment as read back for analysis: its evals, items and results.

What `konstruct.experiments.store.analysis.load_experiment` reads and what
`compare`, `report` and `statistics` take; plain values, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvalInfo:
    """One eval of an experiment's spec."""

    name: str
    kind: str
    # llm_judge only: the score at or above which an item passes.
    pass_threshold: float | None = None


@dataclass(frozen=True)
class ItemResult:
    """One dataset item with its result (status `pending`: no result yet)."""

    item_id: str
    seq: int
    status: str
    input: str = ""
    expected: Any = None
    output: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The Temporal attempt of the call that stored the result (1: first try).
    attempt: int | None = None
    error_kind: str | None = None
    error: str | None = None
    model: str | None = None
    provider: str | None = None
    # When the result was stored, in seconds after the experiment was created.
    finished_s: float | None = None
    # The task call's cost plus its judges' (None: unknown, or not stored at all).
    cost_usd: float | None = None
    # The output came from the output cache (None: not stored).
    cached: bool | None = None
    # An agent's item: its transcript (`trajectory.Transcript` as JSON).
    transcript: dict[str, Any] | None = None
    # The dataset's id of the item and which run of it this is (epochs, from 1).
    dataset_id: str = ""
    epoch: int = 1


@dataclass(frozen=True)
class RetrySecond:
    """The 429s and failed provider calls counted in one second of the experiment."""

    # Seconds after the experiment was created.
    at_s: float
    throttled: int = 0
    call_failures: int = 0


@dataclass(frozen=True)
class ExperimentData:
    experiment_id: str
    tenant_id: str
    name: str
    status: str
    total: int
    evals: list[EvalInfo]
    items: list[ItemResult]
    created_at: str = ""
    completed_at: str | None = None
    # From creation to completion (or to the last stored result).
    duration_s: float | None = None
    # 429s and failed provider calls counted by the calls (experiment totals).
    throttled: int = 0
    call_failures: int = 0
    # The results carry a `cost_usd` column.
    has_cost: bool = False
    # 429s and failed provider calls per second, as they happened (None: stored
    # before migration 011, when only the totals were kept).
    retry_seconds: list[RetrySecond] | None = None

    def eval_names(self) -> list[str]:
        """The spec's evals, then any other eval found in the stored scores."""
        names = [e.name for e in self.evals]
        extra = sorted({n for i in self.items for n in i.scores if n not in names})
        return names + extra

    def eval_kind(self, name: str) -> str:
        return next((e.kind for e in self.evals if e.name == name), "unknown")
