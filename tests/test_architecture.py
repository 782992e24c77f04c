"""The layers of docs/architecture.md, checked on every module's imports.

Each rule names a package and the top-level modules it must never import
directly (anywhere in the file, function-local imports included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

# package (a path under the repository) -> modules it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The core never reaches into activities (the CLI's `konstruct worker` runs
    # workers.main, the one place the core starts the layer above it).
    "konstruct": ("activities",),
    # SQL only: no Temporal, no providers, no activity context.
    "konstruct/store": ("temporalio", "litellm", "httpx", "activities", "workflows", "workers"),
    # Deterministic code: no I/O clients, no store, no settings loaded from the environment.
    "workflows": (
        "asyncpg",
        "litellm",
        "httpx",
        "aiohttp",
        "konstruct.store",
        "konstruct.db",
        "konstruct.config",
        "workers",
    ),
    # Activities are called by workflows, never the other way round.
    "activities": ("workflows", "workers"),
}
# The one module that may call litellm; everything else goes through it.
LITELLM_HOMES = {"konstruct/provider_adapter.py", "konstruct/router.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _hits(imported: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        name for name in imported for f in forbidden if name == f or name.startswith(f + ".")
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports(package: str) -> None:
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = _hits(_imports(path), FORBIDDEN[package])
        if hits:
            problems.append(f"{path.relative_to(ROOT)} imports {', '.join(hits)}")
    assert not problems, "\n".join(problems)


def test_litellm_is_called_from_one_place() -> None:
    callers = []
    for top in ("konstruct", "activities", "workers", "workflows"):
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            if relative not in LITELLM_HOMES and _hits(_imports(path), ("litellm",)):
                callers.append(relative)
    assert not callers, f"litellm imported outside {sorted(LITELLM_HOMES)}: {callers}"
