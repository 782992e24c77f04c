"""What DemoCascade says and shows: the agent's prompts, the evaluation, the Web UI details.

Pure and deterministic (workflows import it): text in, text out.
"""

from __future__ import annotations

import re
from typing import Any

from konstruct.demo.models import (
    DEMO_TENANT,
    CompensationRecord,
    Decision,
    DemoStep,
    PendingApproval,
    RegisteredRun,
)
from konstruct.experiments.models import ExperimentInput, ExperimentResult

# What the RAG step asks of the demo docs it indexes.
RAG_QUESTION = "How does the demo keep demo-production on the champion?"

AGENT_SYSTEM_PROMPT = (
    "You are the release agent of a forecasting model registry. You decide whether a "
    "challenger model replaces the production champion; a smaller backtest WAPE (weighted "
    "absolute percentage error) means a more accurate model."
)

# The evaluation's rubric: what a good rationale of a release decision looks like.
EVAL_RUBRIC = (
    "Score 1 if the answer gives a clear promote-or-hold decision and a reason grounded in "
    "the backtest metrics; 0.5 if the reason is vague; 0 if there is no decision."
)

_ANSWER_FORMAT = "Decision: PROMOTE or HOLD\nRationale: one sentence."
_DECISION_LINE = re.compile(r"decision\s*:\s*\**\s*(promote|hold)", re.IGNORECASE)
_RATIONALE_LINE = re.compile(r"rationale\s*:\s*(.+)", re.IGNORECASE | re.DOTALL)


def agent_prompt(champion: RegisteredRun, challenger: RegisteredRun) -> str:
    if challenger.wape < champion.wape:
        comparison = (
            f"The challenger has the lower WAPE: it improves on the champion by "
            f"{(champion.wape - challenger.wape) / champion.wape:.1%}."
        )
    else:
        comparison = "The challenger's WAPE is not below the champion's."
    return (
        "Should we promote or hold?\n"
        f"Champion: {champion.name} ({champion.model}), backtest WAPE {champion.wape:.4f}.\n"
        f"Challenger: {challenger.name} ({challenger.model}), backtest WAPE "
        f"{challenger.wape:.4f}.\n{comparison}\n"
        f"Answer in exactly two lines:\n{_ANSWER_FORMAT}"
    )


def parse_proposal(text: str) -> tuple[Decision, str]:
    """`Decision: PROMOTE|HOLD` and `Rationale: ...` from the agent's answer; hold if unclear."""
    decision_match = _DECISION_LINE.search(text)
    rationale_match = _RATIONALE_LINE.search(text)
    rationale = rationale_match.group(1).strip() if rationale_match else text.strip()
    if decision_match is None:
        return "HOLD", f"(no decision in the answer, holding) {rationale}"[:1000]
    decision: Decision = "PROMOTE" if decision_match.group(1).upper() == "PROMOTE" else "HOLD"
    return decision, rationale[:1000]


def evaluation(
    experiment_id: str, group: str, judge: str, rationale: str, decision: str | None
) -> ExperimentInput:
    """A two-item dataset built from the rationale: restate it, and challenge it."""
    expected = decision or "HOLD"
    return ExperimentInput.model_validate(
        {
            "experiment_id": experiment_id,
            "tenant_id": DEMO_TENANT,
            "name": "demo: agent rationale",
            "dataset": {
                "items": [
                    {"id": "restate", "input": rationale, "expected": expected},
                    {
                        "id": "challenge",
                        "input": f"{rationale} (a reviewer doubts this)",
                        "expected": expected,
                    },
                ]
            },
            "task": {
                "model_group": group,
                "prompt_template": "A release agent justified its decision with: {input}\n"
                f"Should we promote or hold? Answer in two lines:\n{_ANSWER_FORMAT}",
            },
            "evals": [
                {"kind": "contains", "name": "has_decision", "value": "Decision:"},
                {
                    "kind": "llm_judge",
                    "name": "judge",
                    "model_group": judge,
                    "rubric": EVAL_RUBRIC,
                    "pass_threshold": 0.5,
                },
            ],
            "max_concurrency": 2,
        }
    )


def evaluation_report(
    experiment_id: str, evaluated: ExperimentResult
) -> tuple[dict[str, Any], str]:
    """What the evaluation step records of the Experiment (scores per eval), and its detail."""
    scores = {e.name: {"mean": e.mean, "pass_rate": e.pass_rate} for e in evaluated.summary.evals}
    recorded = {
        "registry_run_id": evaluated.registry_run_id,
        "total": evaluated.summary.total,
        "failed": evaluated.summary.failed,
        "scores": scores,
    }
    detail = f"Experiment {experiment_id}: " + ", ".join(
        f"{name} mean {v['mean'] if v['mean'] is None else round(v['mean'], 3)}"
        f" pass {v['pass_rate'] if v['pass_rate'] is None else round(v['pass_rate'], 3)}"
        for name, v in scores.items()
    )
    return recorded, detail


_MARKS = {
    "pending": "·",
    "running": "▶",
    "pass": "✔",
    "fail": "✘",
    "skip": "↷",
    "compensated": "↺",
}


def current_details(
    status: str,
    steps: list[DemoStep],
    waiting: PendingApproval | None,
    compensations: list[CompensationRecord],
) -> str:
    """The Web UI's current details: the step table and what the run waits for."""
    lines = [f"**DemoCascade {status}**", ""]
    if waiting is not None:
        lines += [
            f"**Waiting for approval** (until {waiting.deadline.isoformat(timespec='seconds')}):"
            f" agent proposes **{waiting.proposal}**",
            f"challenger WAPE {waiting.challenger_wape:.4f} vs champion "
            f"{waiting.champion_wape:.4f}",
            f"> {waiting.rationale}",
            f"{waiting.how}",
            "",
        ]
    lines += ["| step | status | detail |", "|---|---|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {_MARKS[s.status]} {s.status} | {s.detail[:120]} |")
    failed = [c for c in compensations if c.status == "fail"]
    if failed:
        lines += ["", "**Compensations that failed:**"]
        lines += [f"- {c.step}: {c.action}: {c.detail[:200]}" for c in failed]
    return "\n".join(lines)
