"""DemoCascade: the forecasting registry showcase as a saga.

Every step is one or more activities; every registry change pushes its
compensation on the saga (`konstruct.platform.temporal.saga`) *before* it is made (so a change
whose activity committed but never reported back is still undone). However
the run ends - a step failing, `fail_at`, a cancel from the CLI or the Web UI -
the compensations run in reverse and `demo-production` is settled on the
champion this run recorded, or on what it pointed at before the run when no
champion was recorded. Then the workflow fails with the original error; a
compensation that fails is logged and shown in `progress`, and never replaces it.

Champion semantics. `promote` records the best run as this run's champion:
from then on the alias belongs on it, so the promote move is not undone (it is
the saga's pivot; a promote by the agent step is a second one). Scenario
planning reads the recorded champion, never the live alias. Alias moves are
serialised by a row lock, and an undo or the final settle only moves the alias
if no other workflow run moved it after this one: with demo runs at once, the
last run to move the alias wins, and the alias always ends on a champion some
run recorded (see docs/demo.md).

One concept a module, each a mixin over the run's state (`_state`, which also
shows it): `_workflow` (the messages, the run, the step table `_STEP_RUNS`),
`_saga` (running a step's activities, their undo, the unwind), the steps by
kind (`_data_steps`, `_registry_steps`, `_agent_steps`), `_options`
(timeouts, what the steps return and hand each other). Prompts and texts are
`konstruct.demo.content`.
"""

from workflows.demo_cascade._options import APPROVAL_TIMEOUT
from workflows.demo_cascade._workflow import DemoCascade

__all__ = ["APPROVAL_TIMEOUT", "DemoCascade"]
