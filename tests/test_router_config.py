import subprocess
import sys
from pathlib import Path

import pytest

from konstruct.config import load_settings
from konstruct.platform.db import app_url
from konstruct.platform.errors import ConfigError
from konstruct.providers.router import build_router, load_router_config

ROUTER_YAML = Path(__file__).resolve().parent.parent / "deploy" / "llm-router.yaml"


def test_only_deployments_with_their_env_are_active() -> None:
    config = load_router_config(ROUTER_YAML)
    sim_only = config.active({"SIMULATOR_API_BASE": "http://x/v1", "SIMULATOR_API_KEY": "k"})
    assert {d.deployment_id for d in sim_only} == {
        "sim-fast",
        "sim-quality",
        "sim-judge",
        "sim-arith",
        "sim-embed",
    }
    with_openai = config.active({"OPENAI_API_KEY": "sk-real"})
    assert [d.deployment_id for d in with_openai] == ["openai-gpt-4o"]
    assert with_openai[0].litellm_params["api_key"] == "sk-real"


def test_groups_fast_and_quality_with_fallback() -> None:
    config = load_router_config(ROUTER_YAML)
    assert {"fast", "quality"} <= {d.model_name for d in config.model_list}
    assert config.fallbacks() == {"quality": ["fast"]}
    # Real providers are there, switched on by their keys.
    ids = {d.deployment_id for d in config.model_list}
    assert {"ollama-qwen3-8b", "anthropic-claude-sonnet-4", "openai-gpt-4o"} <= ids


def test_router_without_any_active_deployment_names_the_variables() -> None:
    with pytest.raises(ConfigError, match="SIMULATOR_API_BASE"):
        build_router(load_router_config(ROUTER_YAML), environ={})


def test_a_built_router_has_loaded_what_the_first_call_would_import() -> None:
    # The OpenAI client imports its resource modules on a client's first `.chat`: a
    # fresh worker's first call took 0.74 s instead of 0.04 s. A fresh interpreter,
    # so that nothing another test imported counts.
    env = {"SIMULATOR_API_BASE": "http://x/v1", "SIMULATOR_API_KEY": "k"}
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from konstruct.providers.router import build_router, load_router_config\n"
        f"build_router(load_router_config(Path({str(ROUTER_YAML)!r})), environ={env!r})\n"
        "print('openai.resources.chat' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True"], done.stdout + done.stderr[-3000:]


def test_litellm_does_not_retry_inside_an_activity() -> None:
    router = build_router(
        load_router_config(ROUTER_YAML),
        environ={"SIMULATOR_API_BASE": "http://127.0.0.1:9/v1", "SIMULATOR_API_KEY": "k"},
    )
    assert router.num_retries == 0
    assert all(d["litellm_params"]["max_retries"] == 0 for d in router.model_list)


def test_missing_router_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_router_config(tmp_path / "nope.yaml")


def test_app_url_swaps_in_the_app_role() -> None:
    settings = load_settings(
        None,
        environ={
            "KONSTRUCT_DATABASE_URL": "postgresql://admin:secret@db.local:6543/k",
            "KONSTRUCT_APP_DB_PASSWORD": "p@ss word",
        },
    )
    assert app_url(settings) == "postgresql://konstruct_app:p%40ss%20word@db.local:6543/k"


def test_without_an_app_password_the_app_url_says_how_to_get_one(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        environ={
            "KONSTRUCT_DATABASE_URL": "postgresql://admin:secret@db.local:6543/k",
            "KONSTRUCT_STATE_DIR": str(tmp_path),
        },
    )
    with pytest.raises(ConfigError, match="the app role has no password"):
        app_url(settings)
