"""Connection settings per endpoint (BuildStream's ``connection-config``):
parsing from remex.toml and REMEX_*, and what they make of retries and channels."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.reapi.channel import ConnectionSettings, channel_options
from pipeline.reapi.remote import DEFAULT_RPC_TIMEOUT, request_timeout, retry_policy
from pipeline.reapi.retry import RetryPolicy


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "REMEX_STACK_DIR": str(tmp_path / "no-stack"),
        **extra,
    }


def write(tmp_path: Path, text: str) -> Path:
    project = tmp_path / "p"
    project.mkdir(exist_ok=True)
    (project / "remex.toml").write_text(text)
    return project


def test_every_endpoint_takes_the_four_settings_in_bst_units(tmp_path: Path) -> None:
    # Given connection settings on two endpoints, in BuildStream's units
    project = write(
        tmp_path,
        '[remote.execution]\nurl = "grpc://x:1"\nrequest-timeout = 2.5\nretry-limit = 3\n'
        "retry-delay = 250\nkeepalive-time = 0\n"
        '[remote.action-cache]\nurl = "grpc://ac:3"\nrequest-timeout = 7\n',
    )
    # When loaded
    config = load_config(project, env_for(tmp_path))
    # Then they are in seconds, on their endpoint only
    assert config.execution.connection == ConnectionSettings(
        request_timeout=2.5, retry_limit=3, retry_delay=0.25, keepalive_time=0.0
    )
    assert config.action_cache is not None
    assert config.action_cache.connection == ConnectionSettings(request_timeout=7.0)
    # And an endpoint that defaults to the execution server shares its settings
    assert config.artifact_endpoint.connection == config.execution.connection


def test_environment_wins_key_by_key(tmp_path: Path) -> None:
    project = write(tmp_path, '[remote.storage]\nurl = "grpc://s:1"\nretry-limit = 5\n')
    env = env_for(
        tmp_path,
        REMEX_EXECUTION_URL="grpc://x:1",
        REMEX_STORAGE_REQUEST_TIMEOUT="3",
        REMEX_ARTIFACTS_URL="grpc://a:2",
        REMEX_ARTIFACTS_RETRY_DELAY="0",
        REMEX_ARTIFACTS_KEEPALIVE_TIME="12",
    )
    config = load_config(project, env)
    assert config.storage is not None
    assert config.storage.connection == ConnectionSettings(request_timeout=3.0, retry_limit=5)
    assert config.artifacts is not None
    assert config.artifacts.connection == ConnectionSettings(retry_delay=0.0, keepalive_time=12.0)
    assert "REMEX_STORAGE_REQUEST_TIMEOUT" in config.sources[-1]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("request-timeout = 0", "above 0, not 0"),
        ('request-timeout = "soon"', "above 0, not 'soon'"),
        ("retry-limit = -1", "whole number from 0 up, not -1"),
        ("retry-limit = 1.5", "whole number from 0 up, not 1.5"),
        ("retry-limit = true", "whole number from 0 up, not True"),
        ("retry-delay = -5", "milliseconds from 0 up, not -5"),
        ("keepalive-time = nan", "seconds from 0 up, not nan"),
    ],
)
def test_a_bad_value_names_the_file_line_and_key(tmp_path: Path, line: str, expected: str) -> None:
    project = write(tmp_path, f'[remote.execution]\nurl = "grpc://x:1"\n\n{line}\n')
    with pytest.raises(ConfigError) as info:
        load_config(project, env_for(tmp_path))
    key = line.split(" =")[0]
    assert str(info.value).startswith(f"{project / 'remex.toml'}:4: remote.execution.{key}: ")
    assert expected in str(info.value)


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    env = env_for(tmp_path, REMEX_EXECUTION_URL="grpc://x:1", REMEX_EXECUTION_RETRY_LIMIT="many")
    with pytest.raises(ConfigError) as info:
        load_config(None, env)
    assert str(info.value) == (
        "REMEX_EXECUTION_RETRY_LIMIT: must be a whole number from 0 up, not 'many'"
    )


def test_an_unknown_connection_key_is_refused(tmp_path: Path) -> None:
    project = write(tmp_path, '[remote.execution]\nurl = "grpc://x:1"\nretry-limits = 2\n')
    with pytest.raises(ConfigError, match=r"unknown key remote\.execution\.retry-limits"):
        load_config(project, env_for(tmp_path))


def test_without_settings_the_retry_policy_is_the_default() -> None:
    assert retry_policy(ConnectionSettings()) == RetryPolicy()
    assert request_timeout(ConnectionSettings()) == DEFAULT_RPC_TIMEOUT


def test_retry_limit_and_delay_make_the_policy() -> None:
    # Given 2 retries from 0.5 s, 3 s per attempt
    policy = retry_policy(ConnectionSettings(request_timeout=3.0, retry_limit=2, retry_delay=0.5))
    # Then there are 3 attempts, the first wait is 0.5 s (before jitter)
    assert policy.max_attempts == 3
    assert policy.initial_backoff == 0.5
    # And the deadline is the default one: 3 attempts fit in it
    assert policy.deadline == RetryPolicy().deadline


def test_long_timeouts_stretch_the_deadline_so_the_limit_bounds_attempts() -> None:
    policy = retry_policy(ConnectionSettings(request_timeout=100.0, retry_limit=1))
    assert policy.max_attempts == 2
    assert policy.deadline >= 2 * 100.0


def test_retry_limit_zero_is_one_attempt() -> None:
    assert retry_policy(ConnectionSettings(retry_limit=0)).max_attempts == 1


def test_keepalive_time_sets_the_channel_option() -> None:
    def keepalive(settings: ConnectionSettings) -> int:
        [value] = [v for k, v in channel_options(settings) if k == "grpc.keepalive_time_ms"]
        return int(value)

    assert keepalive(ConnectionSettings()) == 30_000
    assert keepalive(ConnectionSettings(keepalive_time=5)) == 5_000
    # 0: no pings at all (gRPC's "never")
    assert keepalive(ConnectionSettings(keepalive_time=0)) == 2**31 - 1


def test_a_remote_takes_its_endpoints_settings() -> None:
    from pipeline.reapi.channel import Endpoint
    from pipeline.reapi.remote import Remote

    settings = ConnectionSettings(request_timeout=4.0, retry_limit=1, retry_delay=0.2)
    # A channel connects lazily: no server is needed to build one
    with Remote(Endpoint("grpc://127.0.0.1:9", connection=settings)) as remote:
        assert remote.request_timeout == 4.0
        assert remote.retrier.policy == retry_policy(settings)
        assert remote.retrier.policy.max_attempts == 2
