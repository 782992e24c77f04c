from pathlib import Path

import pytest

from konstruct.config import ExperimentSettings, load_settings
from konstruct.experiments.models import ExperimentOptions
from konstruct.platform.errors import ConfigError
from tests.support import ROOT


def test_env_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "k.yaml"
    config.write_text("temporal:\n  port: 7300\n")
    settings = load_settings(config, environ={"KONSTRUCT_TASK_QUEUE": "q2"})
    assert settings.temporal.port == 7300
    assert settings.temporal.target == "localhost:7300"
    assert settings.temporal.task_queue == "q2"


def test_contract_env_names_are_honoured(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        environ={
            "TEMPORAL_ADDRESS": "temporal.example:7233",
            "TEMPORAL_NAMESPACE": "prod",
            "KONSTRUCT_DATABASE_URL": "postgresql://u:p@db:5432/k",
            "KONSTRUCT_ROUTER_CONFIG": "/etc/router.yaml",
        },
    )
    assert settings.temporal.target == "temporal.example:7233"
    assert settings.temporal.namespace == "prod"
    assert settings.postgres.url == "postgresql://u:p@db:5432/k"
    assert settings.llm.router_config == Path("/etc/router.yaml")


def test_a_wrong_value_names_the_key_and_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"postgres\.port \(from KONSTRUCT_POSTGRES_PORT\)"):
        load_settings(None, environ={"KONSTRUCT_POSTGRES_PORT": "many"})


def test_an_unknown_key_names_it(tmp_path: Path) -> None:
    config = tmp_path / "k.yaml"
    config.write_text("temporal:\n  prot: 7300\n")
    with pytest.raises(ConfigError, match=r"temporal\.prot"):
        load_settings(config, environ={})


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        load_settings(tmp_path / "does-not-exist.yaml", environ={})


def test_experiment_options_default_to_the_settings_defaults() -> None:
    # A workflow started without `options` (Temporal CLI) must behave like one
    # started by `konstruct experiments start` on default settings.
    settings = ExperimentSettings()
    for name, field in ExperimentOptions.model_fields.items():
        assert getattr(settings, name) == field.default, name


def test_every_rate_constant_is_a_setting_with_the_same_default() -> None:
    import dataclasses

    from konstruct.providers.control import AimdConfig

    assert ExperimentSettings().aimd_config() == AimdConfig()
    changed = ExperimentSettings.model_validate({"min_offered": 0.5, "ceiling_rise": 2.0})
    assert (changed.aimd_config().min_offered, changed.aimd_config().ceiling_rise) == (0.5, 2.0)
    missing = [
        f.name
        for f in dataclasses.fields(AimdConfig)
        if f.name not in ExperimentSettings.model_fields
    ]
    assert missing == []


def test_a_rate_setting_out_of_bounds_names_its_flat_key(tmp_path: Path) -> None:
    config = tmp_path / "k.yaml"
    config.write_text("experiments:\n  headroom: 2\n")
    with pytest.raises(ConfigError, match=r"experiments\.headroom"):
        load_settings(config, environ={})


def test_the_workflow_options_are_the_settings_values() -> None:
    settings = ExperimentSettings.model_validate({"page_size": 7, "min_rps": 2.0})
    assert settings.workflow_options() == ExperimentOptions(page_size=7)


def test_tools_reach_no_non_public_address_unless_the_config_says(tmp_path: Path) -> None:
    config = tmp_path / "k.yaml"
    config.write_text("{}\n")
    assert load_settings(config, environ={}).tools.allow_addresses == []
    dev = load_settings(ROOT / "temporal-dev.yaml", environ={})
    assert dev.tools.allow_addresses == ["loopback"]
    both = {"KONSTRUCT_TOOLS_ALLOW_ADDRESSES": "loopback, private"}
    assert load_settings(config, environ=both).tools.allow_addresses == ["loopback", "private"]
    none = {"KONSTRUCT_TOOLS_ALLOW_ADDRESSES": "none"}
    assert load_settings(ROOT / "temporal-dev.yaml", environ=none).tools.allow_addresses == []
    with pytest.raises(
        ConfigError, match=r"tools\.allow_addresses\.0 \(from KONSTRUCT_TOOLS_ALLOW_ADDRESSES\)"
    ):
        load_settings(config, environ={"KONSTRUCT_TOOLS_ALLOW_ADDRESSES": "metadata"})
