"""`konstruct knowledge add | list | search | delete`: a tenant's knowledge base."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from konstruct.agents.knowledge import first_heading
from konstruct.app.cli.common import (
    CliState,
    Query,
    in_tenant,
    json_option,
    listing,
    pass_state,
    tenant_and_argument,
    tenant_argument,
    with_pool,
)
from konstruct.platform.errors import ConfigError, InvalidInput, NotFound

if TYPE_CHECKING:
    import asyncpg

    from konstruct.config import Settings

SUFFIXES = (".md", ".markdown", ".txt")
_EXCERPT = 200


@dataclass(frozen=True)
class _File:
    path: Path
    doc_id: str
    title: str
    text: str


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:200]


def read_document(path: Path, doc_id: str | None = None) -> _File:
    """A text or Markdown file as a document; InvalidInput naming the file otherwise."""
    if path.suffix.lower() not in SUFFIXES:
        raise InvalidInput(
            f"{path}: not a {'/'.join(SUFFIXES)} file; only text and Markdown can be added"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise InvalidInput(f"{path}: the file is empty")
    chosen = doc_id or _slug(path.stem)
    if not chosen:
        raise InvalidInput(f"{path}: no document id can be made from its name; pass --doc-id")
    return _File(path, chosen, first_heading(text) or path.name, text)


def _router(settings: Settings) -> Any:
    """The LLM router as the workers build it (reaching the stack's simulator as they
    do); its `embed` group must be active."""
    import os

    from konstruct.agents.store.knowledge import EMBED_GROUP
    from konstruct.app.stack import simulator_environ
    from konstruct.providers.router import build_router, load_router_config

    environ = {**os.environ, **simulator_environ(settings)}
    config = load_router_config(settings.path(settings.llm.router_config))
    if EMBED_GROUP not in config.groups(environ):
        wanted = sorted(
            {n for d in config.model_list if d.model_name == EMBED_GROUP for n in d.required_env()}
        )
        raise ConfigError(
            f"no deployment of the router group {EMBED_GROUP!r} is active: set "
            + (", ".join(wanted) or f"an {EMBED_GROUP!r} entry in the router config")
            + " (with the simulator on, `konstruct up` sets them)"
        )
    return build_router(config, environ)


@click.group("knowledge")
def group() -> None:
    """A tenant's knowledge base: documents its agents can search."""


@group.command("add")
@tenant_argument
@click.argument(
    "files", metavar="FILE...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.option("--doc-id", help="the document's id (one FILE only; default: the file name's slug)")
@pass_state
def add(state: CliState, tenant: str, files: tuple[Path, ...], doc_id: str | None) -> int:
    """Add .md or .txt files (a document again replaces its earlier version)."""
    from konstruct.agents.store.knowledge import add_document

    if doc_id is not None and len(files) > 1:
        raise click.UsageError("--doc-id names one document: give one FILE with it")
    documents = [read_document(path, doc_id) for path in files]
    seen: dict[str, Path] = {}
    for document in documents:
        if document.doc_id in seen:
            raise InvalidInput(
                f"{seen[document.doc_id]} and {document.path} would both be document"
                f" {document.doc_id!r}; add one of them with --doc-id"
            )
        seen[document.doc_id] = document.path
    router = _router(state.settings)

    async def work(pool: asyncpg.Pool) -> None:
        for document in documents:
            count = await add_document(
                pool,
                router,
                tenant,
                document.doc_id,
                document.title,
                document.text,
                str(document.path.resolve()),
            )
            print(f"{document.path}: {count} chunks as {tenant}/{document.doc_id}")

    with_pool(state.settings, work)
    return 0


@group.command("list")
@tenant_argument
@listing(
    "tenant {tenant!r} has no documents",
    ["document", "title", "chunks", "added", "source"],
    lambda d: (d.doc_id, d.title, d.chunks, f"{d.created_at:%Y-%m-%d %H:%M}", d.source),
)
def list_(tenant: str) -> Query:
    """List a tenant's documents."""
    from konstruct.agents.store.knowledge import list_documents

    return lambda conn: list_documents(conn, tenant)


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT else flat[: _EXCERPT - 1] + "…"


@group.command("search")
@tenant_argument
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(1, 100), default=5, show_default=True, help="hits")
@json_option("print the hits as JSON (with their whole text)")
@pass_state
def search_(state: CliState, tenant: str, query: str, k: int, as_json: bool) -> int:
    """Search a tenant's documents."""
    from konstruct.agents.store.knowledge import search
    from konstruct.app.cli.output import print_json, print_table

    router = _router(state.settings)
    hits = with_pool(state.settings, lambda pool: search(pool, router, tenant, query, k))
    if as_json:
        print_json(hits)
    elif not hits:
        print(f"no document of tenant {tenant!r} matches")
    else:
        print_table(
            ["#", "score", "document", "title", "text"],
            [
                (n, f"{h.score:.3f}", f"{h.doc_id}#{h.chunk_no}", h.title, _excerpt(h.content))
                for n, h in enumerate(hits, 1)
            ],
        )
    return 0


@group.command("delete")
@tenant_and_argument("doc_id")
def delete(state: CliState, tenant: str, doc_id: str) -> int:
    """Delete a document and its chunks."""
    from konstruct.agents.store.knowledge import delete_document

    if not in_tenant(state.settings, tenant, lambda conn: delete_document(conn, tenant, doc_id)):
        raise NotFound(
            f"tenant {tenant!r} has no document {doc_id!r}; see `konstruct knowledge list {tenant}`"
        )
    print(f"document {tenant}/{doc_id} deleted")
    return 0
