"""DemoCascade's in-memory state and how it is shown: progress, status, step table, notes."""

from __future__ import annotations

from typing import Any, Literal

from temporalio import workflow
from temporalio.exceptions import ApplicationError

from workflows.demo_cascade._options import Handoff

with workflow.unsafe.imports_passed_through():
    from konstruct.demo import content as demo_content
    from konstruct.demo.models import (
        DEMO_TENANT,
        CompensationRecord,
        DemoCascadeInput,
        DemoProgress,
        DemoStep,
        PendingApproval,
        RegisteredRun,
        RunStatus,
    )
    from konstruct.platform.temporal.saga import Saga
    from konstruct.platform.temporal.search_attributes import KIND, STATUS, TENANT
    from konstruct.platform.temporal.validation import parse_input


class CascadeState:
    """The run's fields; every part of the workflow is a mixin over them."""

    def __init__(self, raw_input: dict[str, Any]) -> None:
        self._invalid: ApplicationError | None = None
        try:
            self._input = parse_input(DemoCascadeInput, raw_input, "DemoCascade")
        except ApplicationError as error:
            # `run` fails with it; until then progress shows the defaults.
            self._invalid = error
            self._input = DemoCascadeInput()
        self._steps: list[DemoStep] = []
        self._status: RunStatus = "running"
        self._current: str | None = None
        self._next_step: str | None = None
        self._paused = False
        self._notes: list[str] = []
        self._error: str | None = None
        self._saga = Saga(self._record_compensation)
        self._compensation_records: list[CompensationRecord] = []
        self._alias_touched = False
        self._pre_run_alias: str | None = None
        self._history_mark = 0
        self._champion: RegisteredRun | None = None
        self._alias_run_id: str | None = None
        self._decision: str | None = None
        # Human in the loop.
        self._pending: PendingApproval | None = None
        self._answer: Literal["approve", "reject"] | None = None
        self._handoff = Handoff()

    def _progress(self) -> DemoProgress:
        return DemoProgress(
            workflow_id=workflow.info().workflow_id,
            scenario=self._input.scenario,
            approval=self._input.approval,
            fail_at=self._input.fail_at,
            status=self._status,
            current_step=self._current,
            steps=[s.model_copy() for s in self._steps],
            pending_approval=self._pending,
            decision=self._decision,
            compensations=list(self._compensation_records),
            champion_run_id=self._champion.run_id if self._champion else None,
            pre_run_alias_run_id=self._pre_run_alias,
            alias_run_id=self._alias_run_id,
            error=self._error,
            notes=list(self._notes),
        )

    def _note(self, text: str) -> None:
        self._notes.append(f"{workflow.now().isoformat(timespec='seconds')} {text}")

    def _row(self, name: str) -> DemoStep:
        return next(s for s in self._steps if s.name == name)

    def _set_status(self, status: RunStatus) -> None:
        self._status = status
        workflow.upsert_search_attributes(
            [TENANT.value_set(DEMO_TENANT), KIND.value_set("demo"), STATUS.value_set(status)]
        )
        self._show()

    def _show(self) -> None:
        waiting = self._pending if self._answer is None else None
        workflow.set_current_details(
            demo_content.current_details(
                self._status, self._steps, waiting, self._compensation_records
            )
        )

    def _record_compensation(self, step: str, action: str, passed: bool, detail: str) -> None:
        """The saga's record of one compensation: in `progress`, and on its step's row."""
        self._compensation_records.append(
            CompensationRecord(
                step=step, action=action, status="pass" if passed else "fail", detail=detail
            )
        )
        for row in self._steps:
            if passed and row.name == step and row.status == "pass":
                row.status = "compensated"
                row.detail = f"{row.detail} | compensated: {detail}".strip(" |")
        self._show()
