"""A message's live events: the text its model steps write as they write it, and its
tool calls as they start and end, from the worker to whoever streams the reply.

The worker publishes them with PostgreSQL `NOTIFY` on `STREAM_CHANNEL` (see
`activities/message_stream.py`); the gateway and `konstruct send --stream` listen.
Workflow history never holds them: it keeps ids and the final reply.

A step that runs again (its worker was killed, or its model call failed midway)
publishes under a new `run` id. `StreamView` turns the events into what a client
is shown, so that no character is shown twice and no two runs' text interleave:

- the text of a step's first run is shown as it arrives;
- a later run of the same step is shown only past what the client already has, as
  long as it agrees with it (a provider asked the same thing, at temperature 0 or
  by a simulator, writes the same text again);
- if a later run writes something else, nothing more of that step's live text is
  shown (a client cannot take characters back); `finish` then shows the rest of
  the stored reply when what was shown is a prefix of it, and otherwise a
  `konstruct` event `step_restarted` says which characters were superseded.

The stored reply is the truth: `finish` always completes the shown text to it when
it can, so a client that missed events (a listener reconnecting) still ends with
the whole reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

STREAM_CHANNEL = "konstruct_message_stream"
# PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more: text is sent in pieces
# of at most this many characters (4 bytes each at worst in UTF-8, plus the JSON).
MAX_TEXT_PER_EVENT = 1500

EventKind = Literal["text", "tool"]


@dataclass(frozen=True)
class StreamEvent:
    """One live event of a message's workflow."""

    workflow_id: str
    kind: EventKind
    step: int
    run: str = ""  # which run of the step wrote the text
    text: str = ""
    call_id: str = ""
    tool: str = ""
    status: str = ""  # a tool call's: "started", then its outcome

    def encode(self) -> str:
        """`WORKFLOW_ID` + newline + JSON: a listener reads the id before the JSON."""
        body: dict[str, Any] = {"k": self.kind, "s": self.step}
        if self.kind == "text":
            body.update(r=self.run, t=self.text)
        else:
            body.update(c=self.call_id, n=self.tool, st=self.status)
        return self.workflow_id + "\n" + json.dumps(body, ensure_ascii=False)

    @classmethod
    def decode(cls, payload: str) -> StreamEvent | None:
        """The event in a payload; None for one this version cannot read."""
        workflow_id, _, raw = payload.partition("\n")
        try:
            body = json.loads(raw)
            if body["k"] == "text":
                return cls(workflow_id, "text", int(body["s"]), str(body["r"]), str(body["t"]))
            if body["k"] == "tool":
                return cls(
                    workflow_id,
                    "tool",
                    int(body["s"]),
                    call_id=str(body["c"]),
                    tool=str(body["n"]),
                    status=str(body["st"]),
                )
        except (ValueError, KeyError, TypeError):
            return None
        return None


def workflow_of(payload: str) -> str:
    """The workflow id a payload is for, without decoding the rest."""
    return payload.partition("\n")[0]


@dataclass(frozen=True)
class Shown:
    """One thing to show the client: text, or a `konstruct` event (a tool call
    starting or ending, a step whose text was superseded)."""

    text: str = ""
    event: dict[str, Any] | None = None


@dataclass
class _Step:
    run: str = ""
    shown: str = ""  # what the client has of this step
    written: str = ""  # what the step's current run has written so far
    diverged: bool = False


@dataclass
class StreamView:
    """What one client has been shown of one message, step by step."""

    _steps: dict[int, _Step] = field(default_factory=dict)

    def feed(self, event: StreamEvent) -> list[Shown]:
        if event.kind == "tool":
            return [
                Shown(
                    event={
                        "type": f"tool_call.{'started' if event.status == 'started' else 'ended'}",
                        "step": event.step,
                        "call_id": event.call_id,
                        "tool": event.tool,
                        **({} if event.status == "started" else {"status": event.status}),
                    }
                )
            ]
        step = self._steps.setdefault(event.step, _Step(run=event.run))
        if event.run != step.run:
            # The step runs again: compare what it writes with what was shown.
            step.run, step.written = event.run, ""
        step.written += event.text
        if step.diverged:
            return []
        if len(step.written) <= len(step.shown):
            if not step.shown.startswith(step.written):
                step.diverged = True
            return []
        if not step.written.startswith(step.shown):
            step.diverged = True
            return []
        new = step.written[len(step.shown) :]
        step.shown = step.written
        return [Shown(text=new)]

    def finish(self, reply: str, last_step: int) -> list[Shown]:
        """What is left to show once the reply is stored (`last_step`: its step):
        the rest of it, or, when the live text of that step is not a prefix of it,
        the event that says so and the reply whole."""
        shown = self._steps[last_step].shown if last_step in self._steps else ""
        if reply.startswith(shown):
            rest = reply[len(shown) :]
            return [Shown(text=rest)] if rest else []
        return [
            Shown(
                event={
                    "type": "step_restarted",
                    "step": last_step,
                    "superseded_chars": len(shown),
                }
            ),
            Shown(text=reply),
        ]
