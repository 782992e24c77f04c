"""The built-in tools an agent may call, and the webhook call of a tenant's own tools.

Pure async code: no Temporal, no database. Every failure is a `ToolError`
(`konstruct.platform.errors`) whose `retryable` says whether another attempt
may help (timeout, connection error, 5xx, 429) or whether the model must be
told at once (bad arguments, a host off the allow-list, 4xx).

    calculator     calculate(expression): safe arithmetic, no eval
    web_requests   http_request(arguments, allowed_hosts, ...): GET/POST to an allow-listed host
    webhooks       call_webhook(spec, arguments, key, ...): POST to a tenant's webhook
    results        truncate_result(text, limit): a result cut to what a prompt can hold
    specs          BUILTIN_TOOLS: what the model is told about each built-in tool
                   (`knowledge_search` runs in the agent's activity, on its knowledge base)
    transport      the one HTTP exchange both HTTP tools share
    addresses      AddressPolicy: the non-public addresses tools may not reach (SSRF)
"""

from konstruct.agents.tools.addresses import AddressPolicy
from konstruct.agents.tools.calculator import calculate
from konstruct.agents.tools.results import truncate_result
from konstruct.agents.tools.specs import BUILTIN_TOOLS
from konstruct.agents.tools.web_requests import HttpLimits, host_allowed, http_request
from konstruct.agents.tools.webhooks import WebhookSpec, call_webhook
from konstruct.platform.errors import ToolError

__all__ = [
    "AddressPolicy",
    "BUILTIN_TOOLS",
    "HttpLimits",
    "ToolError",
    "WebhookSpec",
    "calculate",
    "call_webhook",
    "host_allowed",
    "http_request",
    "truncate_result",
]
