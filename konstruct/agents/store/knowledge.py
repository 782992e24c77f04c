"""A tenant's knowledge base: documents, their chunks and embeddings (pgvector).

Chunks are embedded through the router group `embed`, before the transaction
that stores them (no transaction waits on a provider): so `add_document` and
`search` take the pool and open their own transactions, the named exceptions to
the store's rule; the other functions take a connection in a transaction the
caller scoped to the tenant. Vectors go to
PostgreSQL as pgvector's text form `'[x,y,...]'::vector`, so no Python
package of pgvector is needed.

The tables exist only where migration 008 could run (the server has the
`vector` extension); elsewhere every function raises `KnowledgeUnavailable`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel

from konstruct.agents.knowledge import chunk_text
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import (
    EmbeddingFailed,
    InvalidInput,
    KnowledgeUnavailable,
    UnknownTenant,
)
from konstruct.platform.rows import fetch_all, from_row, row_count

EMBED_GROUP = "embed"
# The most texts one embedding request carries.
EMBED_BATCH = 64
_DOC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,199}$")


class KnowledgeHit(BaseModel):
    doc_id: str
    title: str
    chunk_no: int
    content: str
    # 1 - cosine distance: 1 is the same direction, 0 unrelated.
    score: float


class KnowledgeDocument(BaseModel):
    doc_id: str
    title: str
    source: str
    sha256: str
    chunks: int
    created_at: datetime


@contextmanager
def _knowledge_tables() -> Iterator[None]:
    """A missing knowledge table said in one sentence (`KnowledgeUnavailable`)."""
    try:
        yield
    except asyncpg.UndefinedTableError as exc:
        if "knowledge_" not in str(exc):
            raise
        raise KnowledgeUnavailable(
            "the knowledge base needs PostgreSQL's vector extension (pgvector): install it"
            " on the database server, then run `konstruct migrate` (its output says whether"
            " migration 008_knowledge.sql was applied)"
        ) from None


@asynccontextmanager
async def _knowledge_transaction(
    pool: asyncpg.Pool, tenant_id: str
) -> AsyncIterator[asyncpg.Connection]:
    """`tenant_transaction`, with a missing knowledge table said in one sentence."""
    with _knowledge_tables():
        async with tenant_transaction(pool, tenant_id) as conn:
            yield conn


def vector_literal(vector: Sequence[float]) -> str:
    """pgvector's text form of a vector, to pass as `$n::vector`."""
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


async def _embed(router: Any, texts: list[str]) -> list[list[float]]:
    """One vector per text, in order, in requests of at most EMBED_BATCH texts."""
    vectors: list[list[float]] = []
    for start in range(0, len(texts), EMBED_BATCH):
        batch = texts[start : start + EMBED_BATCH]
        try:
            response = await router.aembedding(model=EMBED_GROUP, input=batch)
        except Exception as exc:
            raise EmbeddingFailed(
                f"embedding call to group {EMBED_GROUP!r} failed: {type(exc).__name__}:"
                f" {str(exc)[:300]}"
            ) from exc
        data = sorted(response.data, key=lambda d: d["index"] if isinstance(d, dict) else d.index)
        got = [
            [float(x) for x in (d["embedding"] if isinstance(d, dict) else d.embedding)]
            for d in data
        ]
        if len(got) != len(batch):
            raise EmbeddingFailed(
                f"group {EMBED_GROUP!r} returned {len(got)} embeddings for {len(batch)} texts"
            )
        vectors.extend(got)
    dims = {len(v) for v in vectors}
    if len(dims) > 1 or 0 in dims:
        raise EmbeddingFailed(
            f"group {EMBED_GROUP!r} returned vectors of dimensions {sorted(dims)}"
        )
    return vectors


def _check_doc_id(doc_id: str) -> None:
    if not _DOC_ID.match(doc_id):
        raise InvalidInput(
            f"{doc_id!r} is not a document id: 1-200 letters, digits or '_.:/@-',"
            " starting with a letter or digit",
            ["doc_id"],
        )


# Takes the pool, as a named exception: its chunks are embedded between two transactions
# (no transaction waits on a provider).
async def add_document(
    pool: asyncpg.Pool,
    router: Any,
    tenant_id: str,
    doc_id: str,
    title: str,
    text: str,
    source: str,
) -> int:
    """Chunk, embed and store a document, replacing any earlier version of `doc_id`.

    Returns the number of chunks. Raises UnknownTenant, InvalidInput (a bad id or
    no text), EmbeddingFailed, or KnowledgeUnavailable.
    """
    _check_doc_id(doc_id)
    chunks = chunk_text(text)
    if not chunks:
        raise InvalidInput(f"document {doc_id!r} has no text", ["text"])
    # Fail before spending embedding calls when the document could not be stored.
    async with _knowledge_transaction(pool, tenant_id) as conn:
        if not await conn.fetchval("select 1 from tenants where tenant_id = $1", tenant_id):
            raise UnknownTenant(
                f"tenant {tenant_id!r} does not exist; create it with "
                f"`konstruct agents put {tenant_id} AGENT ...`"
            )
        await conn.execute("select 1 from knowledge_chunks limit 0")
    vectors = await _embed(router, chunks)
    digest = hashlib.sha256(text.encode()).hexdigest()
    async with _knowledge_transaction(pool, tenant_id) as conn:
        # The document row first: a concurrent add of the same id waits on its lock.
        await conn.execute(
            "insert into knowledge_documents (tenant_id, doc_id, title, source, sha256, chunks)"
            " values ($1, $2, $3, $4, $5, $6)"
            " on conflict (tenant_id, doc_id) do update set title = excluded.title,"
            " source = excluded.source, sha256 = excluded.sha256, chunks = excluded.chunks,"
            " created_at = now()",
            tenant_id,
            doc_id,
            title or doc_id,
            source,
            digest,
            len(chunks),
        )
        await conn.execute(
            "delete from knowledge_chunks where tenant_id = $1 and doc_id = $2", tenant_id, doc_id
        )
        await conn.executemany(
            "insert into knowledge_chunks (tenant_id, doc_id, chunk_no, content, embedding, dims)"
            " values ($1, $2, $3, $4, $5::vector, $6)",
            [
                (tenant_id, doc_id, no, content, vector_literal(vector), len(vector))
                for no, (content, vector) in enumerate(zip(chunks, vectors, strict=True))
            ],
        )
    return len(chunks)


# Takes the pool, as a named exception: the query is embedded before its transaction.
async def search(
    pool: asyncpg.Pool, router: Any, tenant_id: str, query: str, k: int = 5
) -> list[KnowledgeHit]:
    """The `k` chunks of the tenant's documents nearest to `query` (cosine), best first.

    Only chunks embedded with the query's dimension are compared (another model's
    vectors are not comparable).
    """
    if not query.strip():
        raise InvalidInput("the search query is empty", ["query"])
    if not 1 <= k <= 100:
        raise InvalidInput(f"k must be between 1 and 100, not {k}", ["k"])
    [vector] = await _embed(router, [query])
    if not any(vector):
        return []  # a zero vector has no direction: nothing is near it
    async with _knowledge_transaction(pool, tenant_id) as conn:
        # Deliberately no `tenant_id = ...` here: which rows this transaction
        # sees is the row-level-security policy's job (konstruct.tenant_id is
        # set by tenant_transaction), and tests/test_knowledge.py relies on it.
        rows = await conn.fetch(
            "select c.doc_id, d.title, c.chunk_no, c.content,"
            " 1 - (c.embedding <=> $1::vector) as score"
            " from knowledge_chunks c join knowledge_documents d using (tenant_id, doc_id)"
            " where c.dims = $2 order by c.embedding <=> $1::vector limit $3",
            vector_literal(vector),
            len(vector),
            k,
        )
    # A stored zero vector has no distance to anything (NaN).
    return [from_row(KnowledgeHit, row) for row in rows if not math.isnan(row["score"])]


async def list_documents(conn: asyncpg.Connection, tenant_id: str) -> list[KnowledgeDocument]:
    with _knowledge_tables():
        return await fetch_all(
            conn,
            KnowledgeDocument,
            "select doc_id, title, source, sha256, chunks, created_at from knowledge_documents"
            " where tenant_id = $1 order by doc_id",
            tenant_id,
        )


async def delete_document(conn: asyncpg.Connection, tenant_id: str, doc_id: str) -> bool:
    """Delete a document and its chunks; False if the tenant has no such document."""
    with _knowledge_tables():
        status = await conn.execute(
            "delete from knowledge_documents where tenant_id = $1 and doc_id = $2",
            tenant_id,
            doc_id,
        )
    return row_count(status) > 0


def format_hits(hits: Sequence[KnowledgeHit]) -> str:
    """Search hits as the text a model reads: `[n] title (doc_id#chunk): content`."""
    if not hits:
        return "no matching documents"
    return "\n\n".join(
        f"[{n}] {hit.title} ({hit.doc_id}#{hit.chunk_no}): {hit.content}"
        for n, hit in enumerate(hits, 1)
    )
