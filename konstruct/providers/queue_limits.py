"""The server-side dispatch rate of a task queue (Temporal's task queue config API)."""

from __future__ import annotations

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import RateLimit
from temporalio.api.workflowservice.v1 import UpdateTaskQueueConfigRequest
from temporalio.client import Client


async def push_rate(client: Client, queue: str, rps: float, reason: str = "") -> None:
    """Set the activity dispatch rate of `queue` on the Temporal server."""
    request = UpdateTaskQueueConfigRequest(
        namespace=client.namespace,
        identity=client.identity,
        task_queue=queue,
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    )
    request.update_queue_rate_limit.rate_limit.CopyFrom(RateLimit(requests_per_second=rps))
    request.update_queue_rate_limit.reason = reason or "konstruct adaptive rate"
    await client.workflow_service.update_task_queue_config(request)
