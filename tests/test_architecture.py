"""The layers and packages of docs/architecture.md, checked on every module's imports.

Every import counts, function-local ones included; `if TYPE_CHECKING:` blocks
count too (a type is a dependency). The rules:

- `konstruct/platform/` imports nothing else of Konstruct.
- A feature package (`providers`, `agents`, `experiments`, `registry`, `demo`)
  imports the platform and the features listed for it in `FEATURE_DEPENDS`
  (a graph without cycles), never the application, the composed settings,
  another feature's SQL (`konstruct.<feature>.store`) or a layer above.
- SQL modules (a feature's `store`) talk to PostgreSQL only.
- Workflows import no I/O client, no SQL and no settings.
- `konstruct/app/` is the only package of the core that reaches up to
  `workflows` (typed query and signal references) and `workers.main`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

FEATURES = ("providers", "agents", "experiments", "registry", "demo")
# feature -> the other features it may import (never their SQL)
FEATURE_DEPENDS: dict[str, tuple[str, ...]] = {
    "providers": (),
    "registry": (),
    "agents": ("providers",),
    "experiments": ("providers",),
    "demo": ("registry", "experiments", "providers"),
}
ABOVE_THE_CORE = ("activities", "workflows", "workers")
SQL_MODULES = [f"konstruct/{feature}/store" for feature in FEATURES]
MAX_ROOT_MODULES = 10


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


def _sources(place: str) -> list[Path]:
    path = ROOT / place
    return [path.with_suffix(".py")] if not path.is_dir() else sorted(path.rglob("*.py"))


def _forbidden() -> dict[str, tuple[str, ...]]:
    """path under the repository -> module prefixes it must not import"""
    rules: dict[str, tuple[str, ...]] = {
        "konstruct": ("activities",),
        "konstruct/platform": (
            "konstruct.config",
            "konstruct.app",
            *(f"konstruct.{feature}" for feature in FEATURES),
            *ABOVE_THE_CORE,
        ),
        "workflows": (
            "asyncpg",
            "litellm",
            "httpx",
            "aiohttp",
            "konstruct.platform.db",
            "konstruct.config",
            "konstruct.app",
            *(f"konstruct.{feature}.store" for feature in FEATURES),
            "workers",
        ),
        "activities": ("workflows", "workers", "konstruct.app"),
    }
    for feature in FEATURES:
        others = [f for f in FEATURES if f != feature]
        not_allowed = [f for f in others if f not in FEATURE_DEPENDS[feature]]
        rules[f"konstruct/{feature}"] = (
            "konstruct.config",
            "konstruct.app",
            *ABOVE_THE_CORE,
            *(f"konstruct.{f}" for f in not_allowed),
            *(f"konstruct.{f}.store" for f in others),
        )
    for sql in SQL_MODULES:
        rules[sql] = rules[sql.rsplit("/", 1)[0]] + ("temporalio", "litellm", "httpx", "aiohttp")
    return rules


FORBIDDEN = _forbidden()


@pytest.mark.parametrize("place", sorted(FORBIDDEN))
def test_layer_imports(place: str) -> None:
    problems = []
    for path in _sources(place):
        if not path.exists():
            continue
        hits = _hits(_imports(path), FORBIDDEN[place])
        if hits:
            problems.append(f"{path.relative_to(ROOT)} imports {', '.join(hits)}")
    assert not problems, "\n".join(problems)


def test_every_sql_module_is_checked() -> None:
    """A feature's SQL has one home, `store` (a module or a package)."""
    for feature in FEATURES:
        for path in (ROOT / "konstruct" / feature).rglob("*.py"):
            text = path.read_text()
            runs_sql = "asyncpg.Connection" in text or "conn.fetch" in text
            in_store = "store" in path.relative_to(ROOT / "konstruct" / feature).parts[0]
            assert not runs_sql or in_store, f"{path.relative_to(ROOT)} runs SQL outside store"


def test_feature_graph_has_no_cycle() -> None:
    seen: set[str] = set()

    def visit(feature: str, path: tuple[str, ...]) -> None:
        assert feature not in path, f"cycle: {' -> '.join((*path, feature))}"
        for other in FEATURE_DEPENDS[feature]:
            visit(other, (*path, feature))
        seen.add(feature)

    for feature in FEATURES:
        visit(feature, ())
    assert seen == set(FEATURES)


def test_the_core_root_is_small() -> None:
    modules = sorted(p.name for p in (ROOT / "konstruct").glob("*.py"))
    assert len(modules) <= MAX_ROOT_MODULES, modules
    packages = sorted(
        p.name for p in (ROOT / "konstruct").iterdir() if (p / "__init__.py").is_file()
    )
    assert packages == sorted(("platform", "app", *FEATURES)), packages


def test_every_module_says_what_it_is_for() -> None:
    missing = []
    for top in ("konstruct", "activities", "workflows", "workers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "__main__.py":
                continue
            if not ast.get_docstring(ast.parse(path.read_text())):
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules without a docstring: {missing}"


# The two modules that may call litellm; everything else goes through them.
LITELLM_HOMES = {"konstruct/providers/adapter.py", "konstruct/providers/router.py"}


def test_litellm_is_called_from_one_place() -> None:
    callers = []
    for top in ("konstruct", "activities", "workers", "workflows"):
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            if relative not in LITELLM_HOMES and _hits(_imports(path), ("litellm",)):
                callers.append(relative)
    assert not callers, f"litellm imported outside {sorted(LITELLM_HOMES)}: {callers}"
