"""Agent experiments: an item's conversation and tool fixtures, its transcript, and the
trajectory evals that read it.

Pure data and functions: the activity that runs an agent item
(`activities.agent_items`) builds the transcript from the agent's stored steps and
calls; this module says what an item asks for and how a transcript scores.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, ValidationError

from konstruct.experiments.evals import Score, score_local
from konstruct.experiments.models import (
    AGENT_ITEM_FIELDS,
    DatasetItem,
    FinalAnswerEval,
    MaxStepsEval,
    ToolCalledEval,
    ToolNotCalledEval,
)
from konstruct.platform.errors import InvalidInput, field_problems
from konstruct.platform.models import StrictModel

# An item's extra fields an agent task reads (kept as JSON in a JSONL file).
TURNS, TOOL_RESULTS = AGENT_ITEM_FIELDS
# Tools without side effects: they run live in an experiment, fixtures or not.
READ_ONLY_TOOLS = frozenset({"calculator", "knowledge_search"})


class ToolFixture(StrictModel):
    """What a tool answers during an evaluation: `result` for a call of `tool` whose
    arguments include `arguments` (any call of it, when left out)."""

    tool: str = Field(min_length=1)
    arguments: dict[str, Any] | None = None
    result: Any


def conversation(item_input: str, metadata: dict[str, Any], where: str) -> list[str]:
    """The user messages of an item: its input, then its `turns`, each answered before
    the next."""
    turns = metadata.get(TURNS)
    if turns is None:
        return [item_input]
    if not isinstance(turns, list) or not all(isinstance(t, str) and t.strip() for t in turns):
        raise InvalidInput(
            f"{where}.{TURNS}: a list of non-empty texts (the user messages after `input`)",
            [f"{where}.{TURNS}"],
        )
    return [item_input, *turns]


def fixtures(metadata: dict[str, Any], where: str) -> list[ToolFixture]:
    """An item's tool fixtures: a list of {tool, arguments?, result}, or {tool: result}."""
    raw = metadata.get(TOOL_RESULTS)
    if raw is None:
        return []
    if isinstance(raw, dict):
        raw = [{"tool": name, "result": result} for name, result in raw.items()]
    if not isinstance(raw, list):
        raise InvalidInput(
            f"{where}.{TOOL_RESULTS}: a list of {{tool, arguments, result}} or an object"
            " {tool: result}",
            [f"{where}.{TOOL_RESULTS}"],
        )
    found = []
    for index, entry in enumerate(raw):
        try:
            found.append(ToolFixture.model_validate(entry))
        except ValidationError as exc:
            at = f"{where}.{TOOL_RESULTS}.{index}"
            problems = "; ".join(f"{at}.{f}: {t}" for f, t in field_problems(exc, root="entry"))
            raise InvalidInput(problems, [f"{where}.{TOOL_RESULTS}"]) from None
    return found


def check_agent_items(items: list[DatasetItem]) -> None:
    """Every item's turns and tool fixtures are well formed, before any item runs."""
    for index, item in enumerate(items):
        where = f"dataset.items.{index}"
        conversation(item.input, item.metadata, where)
        fixtures(item.metadata, where)


def fixture_for(
    found: list[ToolFixture], tool: str, arguments: dict[str, Any]
) -> ToolFixture | None:
    """The first fixture of `tool` whose arguments are a subset of the call's."""
    for fixture in found:
        if fixture.tool == tool and _includes(arguments, fixture.arguments or {}):
            return fixture
    return None


def fixture_text(fixture: ToolFixture) -> str:
    result = fixture.result
    return result if isinstance(result, str) else json.dumps(result)


def _includes(arguments: dict[str, Any], subset: dict[str, Any]) -> bool:
    return all(key in arguments and arguments[key] == value for key, value in subset.items())


# --- the transcript ----------------------------------------------------------------


class TranscriptCall(StrictModel):
    call_id: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    # ok, error, rejected, timed_out
    status: str
    result: str = ""
    # "fixture", "live", or who decided (the approvals policy)
    source: str = ""


class TranscriptStep(StrictModel):
    step: int
    content: str = ""
    model: str = ""
    calls: list[TranscriptCall] = Field(default_factory=list)


class TranscriptTurn(StrictModel):
    user: str
    steps: list[TranscriptStep] = Field(default_factory=list)
    reply: str = ""


class Transcript(StrictModel):
    turns: list[TranscriptTurn] = Field(default_factory=list)

    @property
    def final_answer(self) -> str:
        return self.turns[-1].reply if self.turns else ""

    @property
    def steps(self) -> int:
        return sum(len(t.steps) for t in self.turns)

    def calls(self) -> list[TranscriptCall]:
        return [c for t in self.turns for s in t.steps for c in s.calls]

    def render(self) -> str:
        """The transcript as text: for a judge, and for `experiments show EXP ITEM`."""
        lines = []
        for number, turn in enumerate(self.turns, 1):
            lines.append(f"[turn {number}] user: {turn.user}")
            for step in turn.steps:
                for call in step.calls:
                    arguments = json.dumps(call.arguments, sort_keys=True)
                    lines.append(f"  step {step.step + 1}: tool {call.tool} {arguments}")
                    source = f", {call.source}" if call.source else ""
                    lines.append(f"    -> {call.status}{source}: {call.result}")
            lines.append(f"[turn {number}] assistant: {turn.reply}")
        return "\n".join(lines)


# --- trajectory evals ----------------------------------------------------------------


def score_trajectory(spec: Any, transcript: Transcript, expected: Any) -> Score:
    """Score a trajectory eval (`models.TRAJECTORY_KINDS`) of one item's transcript."""
    if isinstance(spec, ToolCalledEval):
        made = [
            c
            for c in transcript.calls()
            if c.tool == spec.tool and _includes(c.arguments, spec.arguments or {})
        ]
        wanted = f"{spec.count} time(s)" if spec.count is not None else "at least once"
        ok = len(made) == spec.count if spec.count is not None else bool(made)
        return _scored(ok, f"{spec.tool} called {len(made)} time(s), wanted {wanted}")
    if isinstance(spec, ToolNotCalledEval):
        made = [c for c in transcript.calls() if c.tool == spec.tool]
        return _scored(not made, f"{spec.tool} called {len(made)} time(s), wanted none")
    if isinstance(spec, MaxStepsEval):
        steps = transcript.steps
        return _scored(steps <= spec.max, f"{steps} model step(s), at most {spec.max} wanted")
    if isinstance(spec, FinalAnswerEval):
        return score_local(spec.check, transcript.final_answer, expected)
    raise ValueError(f"not a trajectory eval: {getattr(spec, 'kind', spec)!r}")


def _scored(ok: bool, detail: str) -> Score:
    return Score(1.0 if ok else 0.0, ok, detail)
