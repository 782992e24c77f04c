"""Pure naming: task queues, workflow ids, run ids, move ids.

No I/O and no side effects, so workflows may import it. Every id that must be
the same on a retry, a restart or a replay is derived here from stable inputs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

# Registry runs of experiments get a stable id: a restart records the same run.
_REGISTRY_NAMESPACE = uuid.UUID("5b0c1f0e-6d1e-4c59-9a51-6b6f6e737472")
_PROVIDER_INFIX = "-llm-"


@dataclass(frozen=True)
class ProviderQueue:
    """The activity task queue of one provider: the server rate-limits it.

    `base` is the worker's main task queue; `name` the queue the provider's
    calls are scheduled on. Built from its parts, never parsed back from a name.
    """

    base: str
    provider: str

    @property
    def name(self) -> str:
        return f"{self.base}{_PROVIDER_INFIX}{self.provider}"

    @property
    def batch_name(self) -> str:
        """The queue of the provider's batches: no server-side limit (a batch is many
        calls); their calls book slots on the provider's schedule instead."""
        return f"{self.name}-batch"

    def __str__(self) -> str:
        return self.name


def provider_queue(task_queue: str, provider: str) -> str:
    """The name of `ProviderQueue(task_queue, provider)`."""
    return ProviderQueue(task_queue, provider).name


def registry_run_id(tenant_id: str, experiment_id: str) -> str:
    """The registry run an experiment records: the same on every attempt."""
    return str(uuid.uuid5(_REGISTRY_NAMESPACE, f"{tenant_id}/{experiment_id}"))


def message_workflow_id(tenant_id: str, message_id: str) -> str:
    """The suggested `HandleMessage` workflow id: one turn per delivered message."""
    return f"msg-{tenant_id}-{message_id}"


def move_id(workflow_run_id: str, what: str) -> str:
    """An alias move chosen by the workflow run that makes it (idempotent on retry)."""
    return f"{workflow_run_id}/{what}"
