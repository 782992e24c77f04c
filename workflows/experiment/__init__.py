"""Experiment: run a task over every item of a dataset, score it, summarise it.

The workflow holds ids and counters, never outputs: items and results live in
PostgreSQL. Each item is one activity on its provider's task queue (the task
call plus its deterministic evals), then one per `llm_judge` eval on the
judge's provider queue. The Temporal server dispatches each provider queue at
the provider's adaptive rate and round-robin across experiments (fairness key
= experiment id), so an item waiting for capacity holds no worker slot.

One concept a module, each a mixin over the one state they share (`_state`):
`_workflow` (the messages and the run), `_dispatch` (pages of pending items),
`_item` (one item's calls), `_batches` (several items in one call),
`_calls` (starting and cancelling calls, counting their results), `_toggles`
(stop, resume, pause), `_monitor` (provider samples), `_publish` (progress,
status, details), `_options` (timeouts, retries, patch markers).
"""

from workflows.experiment._workflow import Experiment

__all__ = ["Experiment"]
