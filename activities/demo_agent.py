"""DemoCascade's knowledge and agent steps: the RAG index, the agent's decision, its evaluation.

The agent's own LLM call is `call_llm` (activities/llm.py), scheduled by the
workflow; here are the embedding call of the RAG step and what the decision
changes in the registry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import asyncpg
from temporalio import activity

from activities.base import ActivityClass
from activities.demo_step import caller, demo_step, put_json
from konstruct.demo import store as sessions
from konstruct.demo.models import (
    DecisionApplyInput,
    DecisionApplyResult,
    EvalRecordInput,
    RagInput,
    RagResult,
    StepOutput,
)
from konstruct.platform.db import tenant_transaction
from konstruct.providers.adapter import embed
from konstruct.registry import store as registry
from konstruct.registry.models import MoveAliasInput

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs" / "demo-docs"
# The RAG step indexes this many documents of docs/demo-docs (sorted by name).
RAG_DOCS_SUBSET = 4
RAG_TOP_K = 2
EMBED_GROUP = "embed"


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


class DemoAgentActivities(ActivityClass):
    def __init__(
        self, pool: asyncpg.Pool, router: Any, groups: set[str], docs_dir: Path = DOCS_DIR
    ) -> None:
        self.pool = pool
        self.router = router
        self.groups = groups
        self.docs_dir = docs_dir

    # --- knowledge ------------------------------------------------------------------

    def _skip_rag(self) -> str | None:
        if EMBED_GROUP not in self.groups:
            return (
                "skipped: no embedding provider configured (the router has no active "
                f"`{EMBED_GROUP}` group; see deploy/llm-router.yaml)"
            )
        if not sorted(self.docs_dir.glob("*.md")):
            return f"skipped: no documents to index in {self.docs_dir}"
        return None

    @activity.defn(name="demo_rag_index")
    @demo_step
    async def rag_index(self, input: RagInput) -> RagResult:
        """Embed a subset of docs/demo-docs through the router's `embed` group."""
        skipped = self._skip_rag()
        if skipped is not None:
            return RagResult(skipped=True, detail=skipped)
        docs = sorted(self.docs_dir.glob("*.md"))[:RAG_DOCS_SUBSET]
        chunks: list[tuple[str, str]] = []
        for path in docs:
            for block in path.read_text().split("\n\n"):
                text = block.strip()
                if text and not text.startswith("#"):
                    chunks.append((path.name, text))
        vectors = await self._embed([c[1] for c in chunks] + [input.question])
        question = vectors[-1]
        scored = sorted(
            ((_cosine(v, question), chunks[i][0]) for i, v in enumerate(vectors[:-1])),
            key=lambda s: (-s[0], s[1]),
        )
        top: list[str] = []
        for _, name in scored:
            if name not in top:
                top.append(name)
            if len(top) == RAG_TOP_K:
                break
        index = {
            "docs": [p.name for p in docs],
            "chunks": [
                {"doc": c[0], "text": c[1], "vector": v}
                for c, v in zip(chunks, vectors[:-1], strict=True)
            ],
        }
        ref = await put_json(
            self.pool, input.tenant_id, input.session_prefix + "rag/index.json", index
        )
        return RagResult(
            chunks=len(chunks),
            uri=ref.uri,
            top_documents=top,
            detail=f"indexed {len(chunks)} chunks of {len(docs)} docs; "
            f"top for the question: {', '.join(top)}",
        )

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        return await embed(self.router, EMBED_GROUP, texts)

    # --- agents ---------------------------------------------------------------------

    @activity.defn(name="demo_apply_decision")
    @demo_step
    async def apply_decision(self, input: DecisionApplyInput) -> DecisionApplyResult:
        """Promote the challenger if proposed, approved and not worse; record the decision."""
        workflow_id, workflow_run_id = caller()
        promote = input.proposal == "PROMOTE" and input.approved
        note = input.how
        if promote and input.challenger.wape >= input.champion.wape:
            promote = False
            note += "; guardrail: the challenger is not better than the champion, hold"
        champion = input.challenger if promote else input.champion
        decision = "PROMOTE" if promote else "HOLD"
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            if promote:
                await registry.move_alias(
                    conn,
                    MoveAliasInput(
                        tenant_id=input.tenant_id,
                        alias=input.alias,
                        to_run_id=input.challenger.run_id,
                        reason=f"agent promote ({input.how}): {input.rationale[:200]}",
                        move_id=input.move_id,
                    ),
                    workflow_id,
                    workflow_run_id,
                )
            await sessions.record_champion(
                conn,
                input.tenant_id,
                workflow_run_id,
                champion.run_id,
                decision=f"{decision} ({note}): {input.rationale[:500]}",
            )
        return DecisionApplyResult(
            decision=decision,
            promoted=promote,
            champion_run_id=champion.run_id,
            detail=(
                f"promoted {input.challenger.name} (WAPE {input.challenger.wape:.4f})"
                if promote
                else f"hold: champion {input.champion.name} stays ({note})"
            ),
        )

    @activity.defn(name="demo_record_eval")
    @demo_step
    async def record_eval(self, input: EvalRecordInput) -> StepOutput:
        """Save the evaluation, and make its registry run demo-owned (reset cleans it)."""
        _, workflow_run_id = caller()
        uri = input.session_prefix + "eval.json"
        ref = await put_json(self.pool, input.tenant_id, uri, input.summary)
        adopted = False
        run_id = input.summary.get("registry_run_id")
        if run_id:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                adopted = await registry.adopt_demo_run(
                    conn, input.tenant_id, str(run_id), workflow_run_id
                )
        return StepOutput(
            detail=f"evaluation saved to {ref.uri}"
            + (f"; run {str(run_id)[:8]} is demo-owned" if adopted else "")
        )
