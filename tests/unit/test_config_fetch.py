"""``[fetch]`` configuration: defaults, file, environment, errors, NetworkSettings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config, network_settings
from pipeline.elements.sources import NetworkSettings
from pipeline.errors import ConfigError


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "REMEX_STACK_DIR": str(tmp_path / "no-stack"),
        **extra,
    }


def test_defaults_are_the_network_settings_defaults(tmp_path: Path) -> None:
    config = load_config(None, env_for(tmp_path))
    assert network_settings(config) == NetworkSettings()
    assert config.fetch.default_mirror is None


def test_the_file_then_the_environment(tmp_path: Path) -> None:
    # Given a project remex.toml with [fetch] and a CA bundle next to it
    (tmp_path / "ca.pem").write_text("pem")
    (tmp_path / "remex.toml").write_text(
        "[fetch]\nconnect-timeout = 2.5\nread-timeout = 30\nretries = 0\nbackoff = 0.5\n"
        'ca-bundle = "ca.pem"\ndefault-mirror = "eu"\n'
    )
    config = load_config(tmp_path, env_for(tmp_path))
    assert network_settings(config) == NetworkSettings(
        connect_timeout=2.5, read_timeout=30, retries=0, backoff=0.5, ca_bundle=tmp_path / "ca.pem"
    )
    assert config.fetch.default_mirror == "eu"
    # When REMEX_FETCH_* variables are set, they win, key by key
    env = env_for(tmp_path, REMEX_FETCH_RETRIES="5", REMEX_FETCH_DEFAULT_MIRROR="us")
    config = load_config(tmp_path, env)
    assert (config.fetch.retries, config.fetch.default_mirror) == (5, "us")
    assert config.fetch.connect_timeout == 2.5
    assert "REMEX_FETCH_RETRIES" in config.sources[-1]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("retries = -1", "fetch.retries: must be a whole number (0 or more), not -1"),
        ("retries = 1.5", "fetch.retries: must be a whole number"),
        ("read-timeout = 0", "fetch.read-timeout: must be a positive number of seconds"),
        ('backoff = "x"', "fetch.backoff: must be a positive number of seconds"),
        ('ca-bundle = "missing.pem"', "fetch.ca-bundle: no such CA bundle file"),
        ("default-mirror = 3", "fetch.default-mirror must be a string"),
        ("timeout = 3", "unknown key fetch.timeout"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "remex.toml").write_text(f"[fetch]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env_for(tmp_path))
    assert str(tmp_path / "remex.toml") in str(info.value)
    assert words in str(info.value)


def test_bad_environment_values_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="REMEX_FETCH_CONNECT_TIMEOUT: must be a positive"):
        load_config(None, env_for(tmp_path, REMEX_FETCH_CONNECT_TIMEOUT="soon"))
    with pytest.raises(ConfigError, match="REMEX_FETCH_RETRIES: must be a whole number"):
        load_config(None, env_for(tmp_path, REMEX_FETCH_RETRIES="-2"))
