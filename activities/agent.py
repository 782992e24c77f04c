"""The agent loop's activities: one model step, one tool call, a decision, a summary.

Every step reads the message's transcript back from PostgreSQL and writes what
the model said there before it returns, so a step retried after a crash finds
its row and does not call the model again; the workflow carries ids only. Each
activity outlasts an outage of PostgreSQL (HandleMessage's options give it
minutes) and gives up on any other failure after its attempts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import asyncpg
from opentelemetry import trace
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.base import ActivityClass, heartbeating, outlasting_outages
from activities.message_stream import TextPublisher, publish_tool
from konstruct.agents.models import (
    AgentProfile,
    AgentStepInput,
    AgentStepResult,
    AnnounceInput,
    HandleMessageResult,
    PlannedCall,
    RunToolInput,
    StoreTurnInput,
    SummarizeInput,
    ToolDecisionInput,
    ToolOutcome,
    ToolSpec,
)
from konstruct.agents.prompts import build_agent_messages, repair_request, summary_request
from konstruct.agents.store import steps as store
from konstruct.agents.store.agents import _stored_turn, insert_turn, select_agent
from konstruct.agents.store.tools import (
    replace_mcp_tools,
    select_hosts,
    select_tools,
    stale_mcp_servers,
    touch_mcp_server,
)
from konstruct.agents.tools import (
    BUILTIN_TOOLS,
    AddressPolicy,
    HttpLimits,
    WebhookSpec,
    calculate,
    call_webhook,
    http_request,
    truncate_result,
)
from konstruct.agents.tools.mcp_servers import McpServer, call_mcp_tool, server_of, server_specs
from konstruct.experiments.store.budgets import count_message_spend, month_spent
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import (
    AnswerDoesNotFit,
    InvalidInput,
    KnowledgeUnavailable,
    TenantBudgetSpent,
    ToolError,
)
from konstruct.providers.adapter import Completion, complete
from konstruct.providers.models import TokenUsage
from konstruct.providers.pricing import cost_usd, price_of
from konstruct.providers.router import RouterConfig
from konstruct.providers.structured import answer_problem

_tracer = trace.get_tracer("konstruct.agent")

# A tool call that fails (not an outage) this many times is told to the model:
# the last attempt records the failure instead of raising.
TOOL_ATTEMPTS = 3
# A model step or summary whose model call fails this many times gives up:
# HandleMessage answers the agent's fallback reply.
MODEL_ATTEMPTS = 3
# What the model gets back of one tool's answer, at most.
RESULT_CHARS = 4000
# The arguments shown to the person approving a call.
PREVIEW_CHARS = 500
AWAITING_CHANNEL = "konstruct_awaiting_approval"
HEARTBEAT_S = 1.0


def stop_reply(max_steps: int) -> str:
    return (
        f"I stopped after {max_steps} steps without a final answer. "
        "Please try again with a narrower request."
    )


def tool_specs(agent: AgentProfile, tools: Mapping[str, ToolSpec]) -> dict[str, ToolSpec]:
    """The agent's tools as the worker runs them: built-ins with the tenant's settings,
    webhooks, MCP tools by name (`SERVER__TOOL`), and an MCP server's name for all of
    its tools."""
    specs: dict[str, ToolSpec] = {}
    for name in agent.tools:
        served = [t for t in tools.values() if t.kind == "mcp" and t.mcp_server == name]
        if served and name not in tools:
            specs.update((t.name, t) for t in served)
            continue
        row = tools.get(name)
        if name in BUILTIN_TOOLS:
            builtin = BUILTIN_TOOLS[name]
            specs[name] = ToolSpec(
                name=name,
                kind="builtin",
                description=builtin["description"],
                parameters=builtin["parameters"],
                requires_approval=row.requires_approval if row else False,
                timeout_s=row.timeout_s if row else 30.0,
                approval_timeout_s=row.approval_timeout_s if row else 600.0,
            )
        elif row is not None and row.kind in ("webhook", "mcp"):
            specs[name] = row
        else:
            activity.logger.warning(
                "agent %s lists tool %r, which is not defined", agent.agent_id, name
            )
    return specs


def openai_tools(specs: Mapping[str, ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": spec.name,
                "description": spec.description,
                "parameters": spec.parameters,
            },
        }
        for spec in specs.values()
    ]


def transcript(
    stored_steps: list[store.StoredStep], calls: list[store.StoredCall]
) -> list[dict[str, Any]]:
    """This message's earlier steps as OpenAI messages: each assistant turn and its tool results."""
    by_step: dict[int, list[store.StoredCall]] = {}
    for call in calls:
        by_step.setdefault(call.step, []).append(call)
    messages: list[dict[str, Any]] = []
    for step in stored_steps:
        messages.append(step.assistant)
        for call in by_step.get(step.step, []):
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call.call_id,
                    "content": call.result if call.result is not None else "(no result)",
                }
            )
    return messages


def _new_calls(
    tool_calls: tuple[dict[str, Any], ...],
    specs: Mapping[str, ToolSpec],
    taken: set[str],
    step: int,
) -> tuple[list[dict[str, Any]], list[store.NewCall]]:
    """The assistant's tool calls as stored (unique ids) and the rows to insert."""
    assistant_calls: list[dict[str, Any]] = []
    rows: list[store.NewCall] = []
    for position, raw in enumerate(tool_calls):
        call_id = str(raw.get("id") or f"call-{step}-{position}")[:150]
        if call_id in taken:
            call_id = f"{call_id}~{step}.{position}"
        taken.add(call_id)
        name = str(raw["function"]["name"])
        text = str(raw["function"].get("arguments") or "{}")
        assistant_calls.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}
        )
        try:
            arguments = json.loads(text)
            problem = None if isinstance(arguments, dict) else "the arguments are not a JSON object"
        except ValueError:
            arguments, problem = {}, "the arguments are not valid JSON"
        if not isinstance(arguments, dict):
            arguments = {}
        spec = specs.get(name)
        if spec is None:
            problem = f"there is no tool {name!r}; available: {', '.join(specs) or 'none'}"
        if problem is not None:
            rows.append(store.NewCall(call_id, name, arguments, "error", f"error: {problem}"))
        else:
            status = "awaiting_approval" if spec and spec.requires_approval else "pending"
            rows.append(store.NewCall(call_id, name, arguments, status))
    return assistant_calls, rows


class AgentActivities(ActivityClass):
    def __init__(
        self,
        pool: asyncpg.Pool,
        router: Any,
        config: RouterConfig,
        *,
        environ: Mapping[str, str] = os.environ,
        http_limits: HttpLimits | None = None,
        address_policy: AddressPolicy | None = None,
        mcp_refresh_s: float = 3600.0,
    ) -> None:
        self.pool = pool
        # How old an MCP server's stored listing may get before a step lists it again.
        self.mcp_refresh_s = mcp_refresh_s
        # What the tools may reach (public addresses only unless configured).
        self.address_policy = address_policy or AddressPolicy()
        self.router = router
        self.group_of = {d.deployment_id: d.model_name for d in config.model_list}
        self.deployments = {d.deployment_id: d for d in config.model_list}
        self.environ = environ
        self.http_limits = http_limits or HttpLimits()

    # --- one model step ---------------------------------------------------------

    @activity.defn(name="agent_step")
    @outlasting_outages(MODEL_ATTEMPTS)
    async def agent_step(self, input: AgentStepInput) -> AgentStepResult:
        """One step of a message's agent loop (`step`)."""
        return await self.step(input)

    async def step(self, input: AgentStepInput) -> AgentStepResult:
        """Ask the model once; store what it said; plan its tool calls or store the turn.

        Two transactions for a plain reply: one reads the agent and the thread's
        memory (and records the message at step 0), one stores the step and the turn.
        """
        tenant = input.tenant_id
        async with tenant_transaction(self.pool, tenant) as conn:
            fresh = False
            if input.message is not None:
                existing = await _stored_turn(conn, tenant, input.message_id)
                if existing is not None:
                    return AgentStepResult(reply=existing)
                fresh = await store.record_inbound(conn, input.message, input.workflow_id)
            inbound: store.Inbound | None
            if fresh:
                assert input.message is not None
                inbound = store.Inbound.of(input.message)
                stored_steps: list[store.StoredStep] = []
                calls: list[store.StoredCall] = []
            else:
                inbound = await store.inbound(conn, tenant, input.message_id)
                if inbound is None:
                    raise InvalidInput(
                        f"message {input.message_id!r} has no step 0 (no inbound record)",
                        ["message_id"],
                    )
                stored_steps = await store.steps(conn, tenant, input.message_id)
                calls = await store.calls(conn, tenant, input.message_id)
            agent = await select_agent(conn, tenant, inbound.agent_id)
            specs = tool_specs(agent, await select_tools(conn, tenant)) if agent.tools else {}
            current = next((s for s in stored_steps if s.step == input.step), None)
            # A model call is to be made: not once the tenant's month is spent.
            spent = await self._month_spent(conn, tenant) if current is None else None
            stale: list[ToolSpec] = []
            if current is None and spent is None:
                stale = await self._stale_servers(conn, tenant, specs)
                memory = await store.memory(
                    conn,
                    tenant,
                    inbound.thread_id,
                    input.message_id,
                    agent.history_turns,
                    agent.memory_tokens,
                )
        if spent is not None:
            # The workflow answers with the agent's polite fallback, degraded.
            raise TenantBudgetSpent(spent)
        if stale:
            specs = await self._refresh_servers(tenant, agent, stale)
        if current is None:
            earlier = [s for s in stored_steps if s.step < input.step]
            messages = build_agent_messages(
                agent, memory.summary, memory.turns, inbound.text, transcript(earlier, calls)
            )
            last = input.step >= agent.max_steps - 1
            step, rows, cost = await self._ask(
                input, agent, messages, specs, {c.call_id for c in calls}, last
            )
            async with tenant_transaction(self.pool, tenant) as conn:
                if await store.record_step(
                    conn, tenant, input.message_id, step, rows, input.workflow_id
                ):
                    await count_message_spend(conn, tenant, cost)
                    current = step
                    stored_steps = [*earlier, step]
                    calls = [*calls, *(row.stored(step.step) for row in rows)]
                    if not rows:
                        # The common case: the answer and its turn in one transaction.
                        return await self._final(conn, input, inbound, agent, stored_steps, calls)
                else:
                    # Another attempt stored this step first: its answer is the one.
                    stored_steps = await store.steps(conn, tenant, input.message_id)
                    calls = await store.calls(conn, tenant, input.message_id)
                    current = next(s for s in stored_steps if s.step == input.step)
        step_calls = [c for c in calls if c.step == input.step]
        if step_calls:
            return AgentStepResult(calls=[self._planned(c, specs.get(c.tool)) for c in step_calls])
        async with tenant_transaction(self.pool, tenant) as conn:
            return await self._final(conn, input, inbound, agent, stored_steps, calls)

    async def _stale_servers(
        self, conn: asyncpg.Connection, tenant: str, specs: Mapping[str, ToolSpec]
    ) -> list[ToolSpec]:
        """The MCP servers of the offered tools whose listing is due a refresh."""
        servers = sorted({spec.mcp_server for spec in specs.values() if spec.mcp_server})
        if not servers or self.mcp_refresh_s <= 0:
            return []
        return await stale_mcp_servers(conn, tenant, servers, self.mcp_refresh_s)

    async def _refresh_servers(
        self, tenant: str, agent: AgentProfile, stale: list[ToolSpec]
    ) -> dict[str, ToolSpec]:
        """List each stale server's tools again and store them (new ones added, gone
        ones removed); a server that cannot say keeps its listing for another
        interval. The agent's tools, as stored now."""
        listed: dict[str, list[ToolSpec] | None] = {}
        for first in stale:
            server = server_of(first)
            try:
                listed[server.name] = await server_specs(
                    server,
                    first.requires_approval,
                    policy=self.address_policy,
                    environ=self.environ,
                )
            except ToolError as error:
                activity.logger.warning(
                    "MCP server %s/%s not listed again: %s", tenant, server.name, error
                )
                listed[server.name] = None
        async with tenant_transaction(self.pool, tenant) as conn:
            for name, specs in listed.items():
                if specs is None:
                    await touch_mcp_server(conn, tenant, name)
                    continue
                try:
                    async with conn.transaction():
                        dropped = await replace_mcp_tools(conn, tenant, name, specs)
                except ValueError as error:  # a name another tool of the tenant has
                    activity.logger.warning(
                        "MCP server %s/%s not stored again: %s", tenant, name, error
                    )
                    await touch_mcp_server(conn, tenant, name)
                    continue
                activity.logger.info(
                    "MCP server %s/%s listed again: %d tools%s",
                    tenant,
                    name,
                    len(specs),
                    f", no longer listed: {', '.join(dropped)}" if dropped else "",
                )
            return tool_specs(agent, await select_tools(conn, tenant))

    async def _ask(
        self,
        input: AgentStepInput,
        agent: AgentProfile,
        messages: list[dict[str, Any]],
        specs: Mapping[str, ToolSpec],
        taken: set[str],
        last: bool,
    ) -> tuple[store.StoredStep, list[store.NewCall], float]:
        """Call the model: its answer as a step, the tool calls to store (none on the
        `last` step: those stay in its message but are not run), and what it cost
        (0 when the deployment's price is not known). For a streamed message the
        answer is streamed and its text published as it comes.

        With a response format (the message's, else the agent's), a final answer
        that does not fit it gets one repair step (the model is told why, without
        tools); a second answer that does not fit fails the message (AnswerDoesNotFit).
        """
        wanted = input.response_format or agent.response_format
        if wanted is not None and wanted.get("type") == "text":
            wanted = None
        offered = openai_tools(specs)
        answer = await self._complete(input, agent, messages, offered, wanted)
        answers = [answer]
        problem = None if answer.tool_calls else answer_problem(wanted, answer.content)
        if problem is not None:
            repair = [
                *messages,
                {"role": "assistant", "content": answer.content},
                {"role": "user", "content": repair_request(problem)},
            ]
            answer = await self._complete(input, agent, repair, [], wanted)
            answers.append(answer)
            still = None if answer.tool_calls else answer_problem(wanted, answer.content)
            if answer.tool_calls or still is not None:
                raise AnswerDoesNotFit(
                    f"the model's answer does not fit the response format, after one"
                    f" repair step: {still or 'it asked for tools instead'}"
                )
        assistant_calls, rows = _new_calls(answer.tool_calls, specs, taken, input.step)
        assistant: dict[str, Any] = {"role": "assistant", "content": answer.content or None}
        if assistant_calls:
            assistant["tool_calls"] = assistant_calls
        step = store.StoredStep(
            input.step,
            assistant,
            self.group_of.get(answer.deployment_id, agent.model_group),
            answer.model,
            {
                name: sum(getattr(a, name) for a in answers)
                for name in ("prompt_tokens", "completion_tokens", "total_tokens")
            },
        )
        return step, ([] if last else rows), sum(self._cost(a) for a in answers)

    async def _complete(
        self,
        input: AgentStepInput,
        agent: AgentProfile,
        messages: list[dict[str, Any]],
        offered: list[dict[str, Any]],
        wanted: dict[str, Any] | None,
    ) -> Completion:
        """One model call of the step, streamed (and published) for a streamed message:
        each call is a run of its own, so a client sees a repaired answer replace the
        first (`konstruct.agents.streaming`)."""
        publisher = (
            TextPublisher(self.pool, input.workflow_id, input.step) if input.stream else None
        )
        with _tracer.start_as_current_span("llm.completion") as span:
            span.set_attribute("llm.model_group", agent.model_group)
            span.set_attribute("agent.step", input.step)
            span.set_attribute("llm.stream", publisher is not None)
            span.set_attribute("llm.response_format", (wanted or {}).get("type", "text"))
            try:
                answer = await complete(
                    self.router,
                    agent.model_group,
                    messages,
                    tools=offered or None,
                    on_text=None if publisher is None else publisher.write,
                    response_format=wanted,
                )
            finally:
                if publisher is not None:
                    await publisher.close()
            span.set_attribute("llm.deployment", answer.deployment_id)
            span.set_attribute("llm.tool_calls", len(answer.tool_calls))
        return answer

    async def _month_spent(self, conn: asyncpg.Connection, tenant: str) -> str | None:
        """Why the tenant's month admits no model call now (None: it does)."""
        return await month_spent(conn, tenant)

    def _cost(self, answer: Completion) -> float:
        """What a model call of a message cost, counted to the tenant's month."""
        deployment = self.deployments.get(answer.deployment_id)
        price = price_of(deployment) if deployment is not None else None
        if price is None:
            return 0.0
        return cost_usd(price, answer.prompt_tokens, answer.completion_tokens)

    @staticmethod
    def _planned(call: store.StoredCall, spec: ToolSpec | None) -> PlannedCall:
        approval = call.status == "awaiting_approval"
        return PlannedCall(
            call_id=call.call_id,
            tool=call.tool,
            requires_approval=approval,
            timeout_s=spec.timeout_s if spec else 30.0,
            approval_timeout_s=spec.approval_timeout_s if spec else 600.0,
            preview=json.dumps(call.arguments)[:PREVIEW_CHARS] if approval else "",
        )

    @staticmethod
    async def _final(
        conn: asyncpg.Connection,
        input: AgentStepInput,
        inbound: store.Inbound,
        agent: AgentProfile,
        stored_steps: list[store.StoredStep],
        calls: list[store.StoredCall],
    ) -> AgentStepResult:
        """Store the turn: the last step's text, or the polite stop when the last step
        still asked for tools (they are not run) or said nothing."""
        step = stored_steps[-1]
        text = str(step.assistant.get("content") or "")
        if step.assistant.get("tool_calls") or not text:
            text = stop_reply(agent.max_steps)
        message = inbound.message(input.tenant_id)
        result = HandleMessageResult.reply_to(
            message,
            response=text,
            model_group=step.model_group,
            model=step.model,
            fallback_used=step.model_group != agent.model_group,
            degraded=False,
            usage=TokenUsage(
                prompt_tokens=sum(s.usage.get("prompt_tokens", 0) for s in stored_steps),
                completion_tokens=sum(s.usage.get("completion_tokens", 0) for s in stored_steps),
                total_tokens=sum(s.usage.get("total_tokens", 0) for s in stored_steps),
            ),
            steps=step.step + 1,
            tool_calls=len(calls),
        )
        stored = await insert_turn(
            conn, StoreTurnInput(message=message, result=result, workflow_id=input.workflow_id)
        )
        due = await store.summary_due(conn, input.tenant_id, inbound.thread_id, agent.memory_tokens)
        return AgentStepResult(reply=stored, summarize=due)

    # --- tools --------------------------------------------------------------------

    @activity.defn(name="run_tool")
    @outlasting_outages(TOOL_ATTEMPTS)
    async def run_tool(self, input: RunToolInput) -> ToolOutcome:
        """One tool call of a message (`run_call`)."""
        return await self.run_call(input)

    async def run_call(self, input: RunToolInput) -> ToolOutcome:
        """Run one tool call once per call id: a stored outcome is returned as it is."""
        tenant = input.tenant_id
        async with tenant_transaction(self.pool, tenant) as conn:
            call = await store.call(conn, tenant, input.message_id, input.call_id)
            if call is None:
                raise InvalidInput(f"no tool call {input.call_id!r}", ["call_id"])
            if call.status in store.TERMINAL:
                return _outcome(call)
            inbound = await store.inbound(conn, tenant, input.message_id)
            assert inbound is not None
            agent = await select_agent(conn, tenant, inbound.agent_id)
            spec = tool_specs(agent, await select_tools(conn, tenant)).get(call.tool)
            hosts = await select_hosts(conn, tenant) if call.tool == "http_request" else []
            await store.start_attempt(
                conn, tenant, input.message_id, input.call_id, input.approved_by
            )
        if input.stream_to:
            await publish_tool(
                self.pool, input.stream_to, call.step, call.call_id, call.tool, "started"
            )
        with _tracer.start_as_current_span("tool.call") as span:
            span.set_attribute("tool.name", call.tool)
            span.set_attribute("tool.call_id", call.call_id)
            try:
                if spec is None:
                    raise ToolError(
                        f"the agent no longer has the tool {call.tool!r}", retryable=False
                    )
                # Heartbeats every second: a dead worker is noticed in seconds.
                result = await heartbeating(
                    self._execute(tenant, call, spec, hosts),
                    HEARTBEAT_S,
                    spec.timeout_s,
                    ToolError(
                        f"the tool did not answer within {spec.timeout_s:g} s", retryable=True
                    ),
                )
                status, text = "ok", truncate_result(result, RESULT_CHARS)
            except ToolError as exc:
                span.set_attribute("tool.error", exc.message)
                if exc.retryable and activity.info().attempt < TOOL_ATTEMPTS:
                    raise ApplicationError(exc.message, type="ToolFailed") from None
                status, text = "error", truncate_result(f"error: {exc.message}", RESULT_CHARS)
            span.set_attribute("tool.status", status)
        async with tenant_transaction(self.pool, tenant) as conn:
            stored = await store.finish_call(
                conn, tenant, input.message_id, input.call_id, status, text
            )
        if input.stream_to:
            await publish_tool(
                self.pool, input.stream_to, call.step, call.call_id, call.tool, status
            )
        return _outcome(stored)

    async def _execute(
        self, tenant: str, call: store.StoredCall, spec: ToolSpec, hosts: list[str]
    ) -> str:
        if spec.kind == "webhook":
            assert spec.url is not None
            webhook = WebhookSpec(
                name=spec.name,
                url=spec.url,
                secret_header=spec.secret_header,
                secret_env=spec.secret_env,
                timeout_s=spec.timeout_s,
            )
            return await call_webhook(
                webhook,
                call.arguments,
                call.call_id,
                policy=self.address_policy,
                environ=self.environ,
            )
        if spec.kind == "mcp":
            assert spec.url and spec.mcp_server and spec.remote_name
            server = McpServer(
                spec.mcp_server, spec.url, spec.secret_header, spec.secret_env, spec.timeout_s
            )
            return await call_mcp_tool(
                server,
                spec.remote_name,
                call.arguments,
                call.call_id,
                policy=self.address_policy,
                environ=self.environ,
            )
        if call.tool == "calculator":
            expression = call.arguments.get("expression")
            if not isinstance(expression, str):
                raise ToolError("calculator needs a string argument `expression`", retryable=False)
            return calculate(expression)
        if call.tool == "http_request":
            limits = HttpLimits(
                timeout_s=min(spec.timeout_s, self.http_limits.timeout_s),
                max_response_bytes=self.http_limits.max_response_bytes,
                max_body_bytes=self.http_limits.max_body_bytes,
            )
            return await http_request(call.arguments, hosts, limits, policy=self.address_policy)
        if call.tool == "knowledge_search":
            return await self._knowledge_search(tenant, call.arguments)
        raise ToolError(f"no runner for tool {call.tool!r}", retryable=False)

    async def _knowledge_search(self, tenant: str, arguments: dict[str, Any]) -> str:
        from konstruct.agents.store import knowledge

        query = arguments.get("query")
        k = arguments.get("k", 5)
        if not isinstance(query, str) or not query.strip():
            raise ToolError("knowledge_search needs a non-empty string `query`", retryable=False)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 10:
            raise ToolError(
                "knowledge_search: `k` must be an integer from 1 to 10", retryable=False
            )
        try:
            hits = await knowledge.search(self.pool, self.router, tenant, query, k)
        except KnowledgeUnavailable as exc:
            raise ToolError(str(exc), retryable=False) from None
        return knowledge.format_hits(hits)

    @activity.defn(name="record_tool_decision")
    async def record_tool_decision(self, input: ToolDecisionInput) -> ToolOutcome:
        """A call that was not run (rejected, no answer in time) or failed for good."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            stored = await store.finish_call(
                conn,
                input.tenant_id,
                input.message_id,
                input.call_id,
                input.status,
                input.note,
                input.decided_by,
            )
        return _outcome(stored)

    @activity.defn(name="announce_approval")
    async def announce_approval(self, input: AnnounceInput) -> None:
        """Tell listeners (the gateway) that a message now waits for a person."""
        async with self.pool.acquire() as conn:
            await conn.execute("select pg_notify($1, $2)", AWAITING_CHANNEL, input.workflow_id)

    # --- when every provider failed, and the thread's memory -----------------------

    @activity.defn(name="store_fallback")
    async def store_fallback(self, input: StoreTurnInput) -> HandleMessageResult:
        """Store the agent's polite fallback as the turn (`input.result.response` is replaced)."""
        message = input.message
        async with tenant_transaction(self.pool, message.tenant_id) as conn:
            agent = await select_agent(conn, message.tenant_id, message.agent_id)
            result = input.result.model_copy(
                update={"response": agent.fallback_reply, "model_group": agent.model_group}
            )
            return await insert_turn(
                conn, StoreTurnInput(message=message, result=result, workflow_id=input.workflow_id)
            )

    @activity.defn(name="summarize_thread")
    @outlasting_outages(MODEL_ATTEMPTS)
    async def summarize_thread(self, input: SummarizeInput) -> int:
        """Fold the thread's older turns into its rolling summary; the turns folded."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            agent = await select_agent(conn, input.tenant_id, input.agent_id)
            keep = max(1, agent.history_turns // 2)
            summary, rows = await store.turns_to_fold(conn, input.tenant_id, input.thread_id, keep)
        if not rows:
            return 0
        # The summary may take half the memory budget; its input twice the budget.
        budget_chars = agent.memory_tokens * 4
        answer = await complete(
            self.router,
            "fast",
            summary_request(
                summary, [(r["user_text"], r["reply_text"]) for r in rows], 2 * budget_chars
            ),
            max_tokens=agent.memory_tokens // 2,
        )
        text = answer.content.strip()[: budget_chars // 2]
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            await store.save_summary(
                conn, input.tenant_id, input.thread_id, text, rows[-1]["seq"], len(rows)
            )
        return len(rows)


def _outcome(call: store.StoredCall) -> ToolOutcome:
    status = call.status if call.status in store.TERMINAL else "error"
    return ToolOutcome(call_id=call.call_id, status=status, chars=len(call.result or ""))  # type: ignore[arg-type]
