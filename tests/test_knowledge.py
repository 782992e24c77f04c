"""The knowledge base: chunking, pgvector search through the real simulator, isolation by
row-level security, the migration that a server without pgvector skips, and the CLI."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from konstruct.agents.knowledge import chunk_text, first_heading
from konstruct.agents.store.knowledge import (
    KnowledgeHit,
    add_document,
    delete_document,
    format_hits,
    list_documents,
    search,
)
from konstruct.app.cli import main
from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.config import Settings
from konstruct.platform import db
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import KnowledgeUnavailable
from konstruct.providers.router import build_router, load_router_config
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import konstruct

KEYS = """# API keys

Every tenant calls the gateway with an API key. Rotate the API key every ninety days:
create a new key, deploy it, then revoke the old key.

## Revoking a key

A revoked key stops working at once; requests with it get a 401 answer.
"""

BILLING = """# Billing

Invoices are sent on the first day of each month and are payable within thirty days.
Refunds for unused seats are credited to the next invoice.
"""


# --- chunking ---
def test_chunks_keep_headings_with_their_sections() -> None:
    text = "# Title\n\nIntro.\n\n## One\n\n" + "a " * 200 + "\n\n## Two\n\n" + "b " * 200
    chunks = chunk_text(text, max_chars=500, overlap=50)
    assert len(chunks) == 2
    assert chunks[0].startswith("# Title\n\nIntro.\n\n## One\n\na a")
    assert chunks[1].startswith("## Two\n\nb b")
    assert all(len(c) <= 500 for c in chunks)


def test_small_sections_share_a_chunk_and_nothing_is_empty() -> None:
    text = "# A\n\none\n\n\n\n## B\n\ntwo\n\n   \n\n## C\n\nthree\n"
    assert chunk_text(text) == ["# A\n\none\n\n## B\n\ntwo\n\n## C\n\nthree"]
    assert chunk_text("") == [] and chunk_text(" \n\n\t\n") == []


def test_a_heading_is_not_left_at_the_end_of_a_chunk() -> None:
    text = "x" * 300 + "\n\n## Next\n\n" + "y" * 300
    chunks = chunk_text(text, max_chars=400, overlap=0)
    assert chunks == ["x" * 300, "## Next\n\n" + "y" * 300]


def test_only_a_paragraph_too_long_is_cut_and_its_pieces_overlap() -> None:
    sentences = [f"Sentence number {i} says something." for i in range(60)]
    long = " ".join(sentences)
    text = f"# Long\n\n{long}\n\nShort closing paragraph."
    chunks = chunk_text(text, max_chars=300, overlap=60)
    assert chunks[0].startswith("# Long\n\nSentence number 0 ")
    assert all(0 < len(c) <= 300 for c in chunks)
    body = [c.removeprefix("# Long\n\n") for c in chunks]
    for before, after in zip(body, body[1:-1], strict=False):
        # The next piece starts inside the end of the one before.
        assert after[:20] in before, (before, after)
    # Every sentence is whole in some chunk.
    assert all(any(s in c for c in chunks) for s in sentences)
    assert chunks[-1].endswith("Short closing paragraph.")


def test_paragraphs_are_not_cut_or_overlapped_when_they_fit() -> None:
    paragraphs = [f"paragraph {i} " + "w" * 90 for i in range(20)]
    chunks = chunk_text("\n\n".join(paragraphs), max_chars=250, overlap=100)
    assert sum(c.count("paragraph ") for c in chunks) == 20
    assert all(p in "".join(chunks) for p in paragraphs)


def test_a_word_longer_than_a_chunk_is_cut_hard() -> None:
    chunks = chunk_text("z" * 25, max_chars=10, overlap=3)
    assert all(0 < len(c) <= 10 for c in chunks)
    assert chunks[0] == "z" * 10 and len(chunks) == 4


def test_code_fences_are_one_block_and_their_hashes_are_not_headings() -> None:
    text = "```bash\n# install\n\npip install x\n```\n\n# Real heading\n\nbody"
    assert first_heading(text) == "Real heading"
    assert chunk_text(text, max_chars=40, overlap=0) == [
        "```bash\n# install\n\npip install x\n```",
        "# Real heading\n\nbody",
    ]


def test_chunk_text_refuses_impossible_sizes() -> None:
    with pytest.raises(ValueError):
        chunk_text("x", max_chars=0)
    with pytest.raises(ValueError):
        chunk_text("x", max_chars=10, overlap=10)


def test_format_hits() -> None:
    assert format_hits([]) == "no matching documents"
    hits = [
        KnowledgeHit(doc_id="keys", title="API keys", chunk_no=0, content="Rotate.", score=0.9),
        KnowledgeHit(doc_id="bill", title="Billing", chunk_no=2, content="Invoices.", score=0.1),
    ]
    assert format_hits(hits) == "[1] API keys (keys#0): Rotate.\n\n[2] Billing (bill#2): Invoices."


# --- the store, on the session's PostgreSQL and simulator ---
@pytest.fixture(scope="module")
def router(settings: Settings) -> Any:
    return build_router(load_router_config(settings.path(settings.llm.router_config)))


async def new_tenant(pool: asyncpg.Pool) -> str:
    tenant = f"kb-{uuid.uuid4().hex[:8]}"
    async with tenant_transaction(pool, tenant) as conn:
        await conn.execute("insert into tenants (tenant_id, name) values ($1, $1)", tenant)
    return tenant


async def test_search_finds_the_relevant_chunk_first(app_pool: asyncpg.Pool, router: Any) -> None:
    tenant = await new_tenant(app_pool)
    assert await add_document(app_pool, router, tenant, "keys", "API keys", KEYS, "keys.md") == 1
    assert await add_document(app_pool, router, tenant, "billing", "Billing", BILLING, "b.md") == 1
    hits = await search(app_pool, router, tenant, "how do I rotate an API key", k=5)
    assert [h.doc_id for h in hits] == ["keys", "billing"]
    assert hits[0].title == "API keys" and "Rotate the API key" in hits[0].content
    assert hits[0].score > hits[1].score and -1 <= hits[1].score <= 1
    hits = await search(app_pool, router, tenant, "when are invoices payable", k=1)
    assert [(h.doc_id, h.chunk_no) for h in hits] == [("billing", 0)]
    async with tenant_transaction(app_pool, tenant) as conn:
        docs = await list_documents(conn, tenant)
    assert [(d.doc_id, d.title, d.chunks, d.source) for d in docs] == [
        ("billing", "Billing", 1, "b.md"),
        ("keys", "API keys", 1, "keys.md"),
    ]


async def test_embeddings_go_in_batches_of_64(
    app_pool: asyncpg.Pool, router: Any, sim: SimulatorAdmin
) -> None:
    tenant = await new_tenant(app_pool)
    text = "\n\n".join(f"Paragraph {i}. " + "lorem ipsum " * 85 for i in range(70))
    assert await add_document(app_pool, router, tenant, "big", "Big", text, "") == 70
    assert (await sim.model_stats("sim-embed"))["ok"] == 2


async def test_adding_a_document_again_replaces_its_chunks(
    app_pool: asyncpg.Pool, router: Any
) -> None:
    tenant = await new_tenant(app_pool)
    old = "\n\n".join(f"Old paragraph {i} about zebras. " + "stripes " * 100 for i in range(3))
    assert await add_document(app_pool, router, tenant, "doc", "Doc", old, "v1") == 3
    new = "# Doc\n\nNew text about giraffes."
    assert await add_document(app_pool, router, tenant, "doc", "Doc v2", new, "v2") == 1
    hits = await search(app_pool, router, tenant, "zebras stripes", k=10)
    assert [(h.chunk_no, h.content) for h in hits] == [(0, new)]
    async with tenant_transaction(app_pool, tenant) as conn:
        [doc] = await list_documents(conn, tenant)
        assert (doc.title, doc.chunks, doc.source) == ("Doc v2", 1, "v2")
        assert await delete_document(conn, tenant, "doc") is True
        assert await delete_document(conn, tenant, "doc") is False
    assert await search(app_pool, router, tenant, "giraffes", k=10) == []


async def test_tenants_are_isolated_by_row_level_security(
    app_pool: asyncpg.Pool, router: Any, postgres: EmbeddedPostgres
) -> None:
    a, b = await new_tenant(app_pool), await new_tenant(app_pool)
    await add_document(app_pool, router, a, "keys", "A's keys", KEYS, "")
    await add_document(app_pool, router, b, "billing", "B's billing", BILLING, "")
    # B searching for A's very words gets only B's document, and A the other way round.
    hits = await search(app_pool, router, b, KEYS, k=10)
    assert {(h.doc_id, h.title) for h in hits} == {("billing", "B's billing")}
    hits = await search(app_pool, router, a, BILLING, k=10)
    assert {(h.doc_id, h.title) for h in hits} == {("keys", "A's keys")}
    # It is the policy that does it: no WHERE, and the app role counts B's rows only...
    async with tenant_transaction(app_pool, b) as conn:
        assert await conn.fetchval("select count(*) from knowledge_chunks") == 1
        assert await conn.fetchval("select count(*) from knowledge_documents") == 1
        assert await conn.fetchval("select count(distinct tenant_id) from knowledge_chunks") == 1
        # ...and cannot write rows of A.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "insert into knowledge_documents (tenant_id, doc_id, title, sha256, chunks)"
                " values ($1, 'x', 'x', 'x', 0)",
                a,
            )
    async with app_pool.acquire() as conn:  # no tenant set: nothing at all
        assert await conn.fetchval("select count(*) from knowledge_chunks") == 0
    # The owner (a superuser, past RLS) sees both tenants' rows.
    owner = await asyncpg.connect(postgres.owner_url)
    try:
        count = await owner.fetchval(
            "select count(*) from knowledge_chunks where tenant_id = any($1::text[])", [a, b]
        )
        assert count == 2
    finally:
        await owner.close()


# --- migration 008 on a server with or without the extension ---
def test_the_knowledge_migration_declares_pgvector() -> None:
    path = db.migrations_dir() / "008_knowledge.sql"
    [(name, package, feature)] = db.required_extensions(path)
    assert (name, package, feature) == ("vector", "pgvector", "knowledge_search")
    assert db.skipped_migration_message(path.name, name, package, feature) == (
        "migration 008_knowledge.sql skipped: this PostgreSQL server has no 'vector' extension"
        " (pgvector); knowledge_search is unavailable until it is installed and"
        " `konstruct migrate` runs again"
    )


async def test_the_session_server_has_pgvector_and_applied_008(postgres: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(postgres.owner_url)
    try:
        names = {r["name"] for r in await conn.fetch("select name from schema_migrations")}
        assert "008_knowledge.sql" in names
    finally:
        await conn.close()


async def test_a_migration_needing_a_missing_extension_is_skipped(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    (tmp_path / "001_first.sql").write_text("create table first_table (id int primary key);\n")
    (tmp_path / "002_needs_ext.sql").write_text(
        "-- requires-extension: no_such_ext\n-- A feature on an extension.\n\n"
        "create extension no_such_ext;\ncreate table needs_ext (id int);\n"
    )
    (tmp_path / "003_after.sql").write_text("create table after_table (id int primary key);\n")
    database = f"kb_skip_{uuid.uuid4().hex[:8]}"
    role = f"kb_app_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(postgres.owner_url)
    await admin.execute(f"create database {database}")
    url = postgres.owner_url.rsplit("/", 1)[0] + f"/{database}"
    try:
        skipped: list[str] = []
        applied = await db.migrate(
            url, app_role=role, app_password="pw", directory=tmp_path, skipped=skipped
        )
        assert applied == ["001_first.sql", "003_after.sql"]
        assert skipped == [
            "migration 002_needs_ext.sql skipped: this PostgreSQL server has no 'no_such_ext'"
            " extension; what it adds is unavailable until it is installed and"
            " `konstruct migrate` runs again"
        ]
        conn = await asyncpg.connect(url)
        try:
            versions = [
                r["version"]
                for r in await conn.fetch("select version from schema_migrations order by 1")
            ]
            assert versions == ["001", "003"]
            assert await conn.fetchval("select to_regclass('needs_ext')") is None
        finally:
            await conn.close()
        # Still pending, so the next run says it again (and applies nothing new).
        again: list[str] = []
        assert (
            await db.migrate(
                url, app_role=role, app_password="pw", directory=tmp_path, skipped=again
            )
            == []
        )
        assert again == skipped
        # Without the knowledge tables, the store says what is missing.
        pool = await db.create_pool(url, min_size=1, max_size=1)
        try:
            with pytest.raises(KnowledgeUnavailable, match="vector extension"):
                async with db.tenant_transaction(pool, "demo") as conn:
                    await list_documents(conn, "demo")
        finally:
            await pool.close()
    finally:
        await admin.execute(f"drop database if exists {database} with (force)")
        await admin.execute(f"drop role if exists {role}")
        await admin.close()


def test_cli_migrate_says_on_stderr_what_it_skipped(
    environ: dict[str, str],
    postgres: EmbeddedPostgres,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    for path in db.migration_files():
        shutil.copy(path, migrations / path.name)
    (migrations / "999_needs_ext.sql").write_text(
        "-- requires-extension: no_such_ext (no-such-package) for the_feature\nselect 1;\n"
    )
    database = f"kb_cli_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres.owner_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"create database {database}"))
    try:
        url = postgres.owner_url.rsplit("/", 1)[0] + f"/{database}"
        monkeypatch.setenv("KONSTRUCT_DATABASE_URL", url)
        monkeypatch.setattr(db, "migrate", functools.partial(db.migrate, directory=migrations))
        assert main(["migrate"]) == 0
        out, err = capsys.readouterr()
        assert "008_knowledge.sql" in out and "999_needs_ext.sql" not in out
        assert err.strip() == (
            "warning: migration 999_needs_ext.sql skipped: this PostgreSQL server has no"
            " 'no_such_ext' extension (no-such-package); the_feature is unavailable until it is"
            " installed and `konstruct migrate` runs again"
        )
    finally:
        asyncio.run(admin(f"drop database if exists {database} with (force)"))


# --- the CLI ---
def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_cli_add_names_a_missing_file_and_a_pdf(environ: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.md"
    line = one_line_error(konstruct(environ, "knowledge", "add", "demo", str(missing)))
    assert f"{missing}: no such file" in line
    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    line = one_line_error(konstruct(environ, "knowledge", "add", "demo", str(pdf)))
    assert str(pdf) in line and ".md" in line and ".txt" in line


def test_cli_add_names_an_empty_or_non_utf8_file(environ: dict[str, str], tmp_path: Path) -> None:
    good, empty, latin = tmp_path / "good.md", tmp_path / "empty.txt", tmp_path / "latin.txt"
    good.write_text("# Good\n\nfine")
    empty.write_text("  \n")
    latin.write_bytes("caf\xe9".encode("latin-1"))
    for path, words in ((empty, "empty"), (latin, "not UTF-8")):
        # Every file is checked before any is added.
        line = one_line_error(konstruct(environ, "knowledge", "add", "demo", str(good), str(path)))
        assert str(path) in line and words in line


async def test_cli_add_search_list_delete(
    environ: dict[str, str], app_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant = await new_tenant(app_pool)
    keys = tmp_path / "API Keys.md"
    keys.write_text(KEYS)
    notes = tmp_path / "notes.txt"
    notes.write_text(BILLING.replace("# Billing\n\n", ""))
    added = konstruct(environ, "knowledge", "add", tenant, str(keys), str(notes))
    assert added.returncode == 0, added.stderr
    assert f"{keys}: 1 chunks as {tenant}/api-keys" in added.stdout
    assert f"{notes}: 1 chunks as {tenant}/notes" in added.stdout
    found = konstruct(
        environ, "knowledge", "search", tenant, "rotate the API key", "-k", "1", "--json"
    )
    assert found.returncode == 0, found.stderr
    [hit] = json.loads(found.stdout)
    assert (hit["doc_id"], hit["title"], hit["chunk_no"]) == ("api-keys", "API keys", 0)
    table = konstruct(environ, "knowledge", "search", tenant, "invoices payable", "-k", "1")
    assert table.returncode == 0 and "notes#0" in table.stdout and "api-keys" not in table.stdout
    listed = konstruct(environ, "knowledge", "list", tenant, "--json")
    assert [(d["doc_id"], d["title"]) for d in json.loads(listed.stdout)] == [
        ("api-keys", "API keys"),
        ("notes", "notes.txt"),
    ]
    deleted = konstruct(environ, "knowledge", "delete", tenant, "notes")
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    again = one_line_error(konstruct(environ, "knowledge", "delete", tenant, "notes"))
    assert "no document 'notes'" in again
