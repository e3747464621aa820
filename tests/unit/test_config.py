"""Configuration: defaults, files, environment, precedence and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import load_config, parse_size
from pipeline.errors import ConfigError


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    # No user config and no embedded stack leak in from the machine.
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "REMEX_STACK_DIR": str(tmp_path / "no-stack"),
        **extra,
    }


def test_without_a_stack_or_settings_there_is_no_broker_nor_server(tmp_path: Path) -> None:
    # Given no configuration and no stack up
    config = load_config(None, env_for(tmp_path))
    # Then nothing points at a well-known port (it may be somebody else's Redis)
    assert config.broker_url == "" and config.execution.url == ""
    assert config.artifact_endpoint == config.execution
    # And asking for them is one sentence saying what to do
    with pytest.raises(ConfigError) as broker:
        config.require_broker()
    assert str(broker.value) == "no remex stack is up here; run 'remex up' or set broker.url"
    with pytest.raises(ConfigError) as execution:
        config.require_execution()
    assert "run 'remex up' or set remote.execution.url" in str(execution.value)


def test_a_configured_broker_and_server_are_used(tmp_path: Path) -> None:
    env = env_for(
        tmp_path, REMEX_BROKER_URL="redis://127.0.0.1:7/0", REMEX_EXECUTION_URL="grpc://h:1"
    )
    config = load_config(None, env)
    assert config.require_broker() == "redis://127.0.0.1:7/0"
    assert config.backend_url == config.broker_url
    assert config.require_execution().url == "grpc://h:1"


def test_user_file_then_project_file_then_environment(tmp_path: Path) -> None:
    # Given a user file, a project file and environment variables
    user = tmp_path / "config" / "remex"
    user.mkdir(parents=True)
    (user / "remex.toml").write_text(
        '[broker]\nurl = "redis://:secret@user:1/0"\n'
        '[remote.execution]\nurl = "grpc://user:1"\ninstance-name = "main"\n'
        '[cas]\nquota = "2G"\n'
    )
    project = tmp_path / "project"
    project.mkdir()
    (project / "remex.toml").write_text(
        '[remote.execution]\nurl = "grpcs://project:443"\nserver-ca = "ca.pem"\n'
        '[remote.artifacts]\nurl = "grpc://artifacts:2"\n[worker]\nconcurrency = 8\n'
    )
    env = env_for(tmp_path, REMEX_CAS_DIR=str(tmp_path / "cas"), REMEX_ARTIFACTS_URL="unix:/a.sock")
    # When loaded
    config = load_config(project, env)
    # Then later sources win, key by key
    assert config.broker_url == "redis://:secret@user:1/0"
    assert config.execution.url == "grpcs://project:443"
    assert config.execution.instance_name == "main"
    assert config.execution.server_ca == project / "ca.pem"
    assert config.artifact_endpoint.url == "unix:/a.sock"
    assert config.cas_quota_bytes == 2 * 1024**3
    assert config.cas_dir == tmp_path / "cas"
    assert config.worker_concurrency == 8
    assert len(config.sources) == 3


def test_unknown_key_names_the_file_and_key(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / "remex.toml").write_text('[remote.execution]\nurl = "grpc://x:1"\nurll = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(project, env_for(tmp_path))
    assert str(project / "remex.toml") in str(info.value)
    assert "remote.execution.urll" in str(info.value)


def test_bad_toml_and_bad_values_are_errors(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / "remex.toml").write_text("[broker\n")
    with pytest.raises(ConfigError, match=r"remex\.toml"):
        load_config(project, env_for(tmp_path))
    with pytest.raises(ConfigError, match="REMEX_WORKER_CONCURRENCY"):
        load_config(None, env_for(tmp_path, REMEX_WORKER_CONCURRENCY="zero"))
    with pytest.raises(ConfigError, match="REMEX_CAS_QUOTA"):
        load_config(None, env_for(tmp_path, REMEX_CAS_QUOTA="lots"))


def test_a_running_embedded_stack_gives_the_defaults(tmp_path: Path) -> None:
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "stack.json").write_text(
        json.dumps(
            {"redis": {"url": "redis://127.0.0.1:7/0"}, "casd": {"url": "grpc://127.0.0.1:8"}}
        )
    )
    config = load_config(None, env_for(tmp_path, REMEX_STACK_DIR=str(stack)))
    assert config.broker_url == "redis://127.0.0.1:7/0"
    assert config.execution.url == "grpc://127.0.0.1:8"
    # and the environment still wins over it
    config = load_config(
        None, env_for(tmp_path, REMEX_STACK_DIR=str(stack), REMEX_BROKER_URL="redis://other:1/0")
    )
    assert config.broker_url == "redis://other:1/0"


@pytest.mark.parametrize(
    ("text", "size"),
    [("10G", 10 * 1024**3), ("512M", 512 * 1024**2), ("1.5GiB", int(1.5 * 1024**3)), ("100", 100)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text, where="x") == size


def test_storage_and_action_cache_endpoints_are_separate_keys(tmp_path: Path) -> None:
    # Given a split REAPI deployment: execution, its CAS and its ActionCache apart
    project = tmp_path / "p"
    project.mkdir()
    (project / "remex.toml").write_text(
        '[remote.execution]\nurl = "grpc://exec:1"\n'
        '[remote.storage]\nurl = "grpc://cas:2"\ninstance-name = "cas"\n'
    )
    env = env_for(tmp_path, REMEX_ACTION_CACHE_URL="grpc://ac:3")
    # When loaded
    config = load_config(project, env)
    # Then each is where it was said to be, and artifacts default to execution
    assert config.execution.url == "grpc://exec:1"
    assert config.storage is not None and config.storage.url == "grpc://cas:2"
    assert config.storage.instance_name == "cas"
    assert config.action_cache is not None and config.action_cache.url == "grpc://ac:3"
    assert config.artifact_endpoint.url == "grpc://exec:1"


def test_the_stage_context_routes_cas_and_action_cache_to_their_endpoints(
    tmp_path: Path,
) -> None:
    from pipeline.cas import LocalCas
    from pipeline.reapi.channel import Endpoint
    from pipeline.stages import StageContext

    # Given four endpoints (channels open lazily: nothing listens there)
    ctx = StageContext.connect(
        LocalCas(tmp_path / "cas"),
        Endpoint("grpc://127.0.0.1:1"),
        Endpoint("grpc://127.0.0.1:2"),
        storage=Endpoint("grpc://127.0.0.1:3"),
        action_cache=Endpoint("grpc://127.0.0.1:4"),
    )
    with ctx:
        # Then each client talks to its own server
        assert ctx.executor.remote.endpoint.url.endswith(":1")
        assert ctx.assets.remote.endpoint.url.endswith(":2")
        assert ctx.artifact_cas.remote.endpoint.url.endswith(":2")
        assert ctx.execution_cas.remote.endpoint.url.endswith(":3")
        assert ctx.action_cache.remote.endpoint.url.endswith(":4")


def test_the_stack_broker_url_gets_its_password_from_the_file_stack_json_names(
    tmp_path: Path,
) -> None:
    # Given a stack whose stack.json names a password file and a casd socket
    stack = tmp_path / "stack"
    (stack / "redis").mkdir(parents=True)
    (stack / "redis" / "password").write_text("s3cret-pw\n")
    (stack / "stack.json").write_text(
        json.dumps(
            {
                "redis": {
                    "url": "redis://127.0.0.1:7/0",
                    "address": "127.0.0.1:7",
                    "password_file": str(stack / "redis" / "password"),
                },
                "casd": {"url": f"unix:{stack / 'casd.sock'}"},
            }
        )
    )
    # When the configuration is read with no settings
    config = load_config(None, env_for(tmp_path, REMEX_STACK_DIR=str(stack)))
    # Then the broker URL carries the password, and the server is the socket
    assert config.require_broker() == "redis://:s3cret-pw@127.0.0.1:7/0"
    assert config.require_execution().url == f"unix:{stack / 'casd.sock'}"
    # And without the password file, it says which file it could not read
    (stack / "redis" / "password").unlink()
    with pytest.raises(
        ConfigError, match=r"redis/password: cannot read the stack's Redis password"
    ):
        load_config(None, env_for(tmp_path, REMEX_STACK_DIR=str(stack)))


def test_rediss_urls_carry_the_tls_files_as_parameters(tmp_path: Path) -> None:
    # Given a rediss:// broker and the TLS keys, relative to the config file
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("pem\n")
    (tmp_path / "remex.toml").write_text(
        '[broker]\nurl = "rediss://:pw@redis.example:6380/0"\n'
        'server-ca = "ca.pem"\nclient-cert = "client.pem"\nclient-key = "client.key"\n'
    )
    config = load_config(None, env_for(tmp_path, REMEX_CONFIG=str(tmp_path / "remex.toml")))
    # Then every Redis client gets them, and certificates are verified
    for url in (config.require_broker(), config.backend_url):
        assert url.startswith("rediss://:pw@redis.example:6380/0?")
        assert "ssl_cert_reqs=required" in url
        assert f"ssl_ca_certs={tmp_path / 'ca.pem'}".replace("/", "%2F") in url
        assert f"ssl_certfile={tmp_path / 'client.pem'}".replace("/", "%2F") in url
        assert f"ssl_keyfile={tmp_path / 'client.key'}".replace("/", "%2F") in url
    # And the URL shown stays as written
    assert config.broker_url == "rediss://:pw@redis.example:6380/0"
    # And a plain redis:// URL is left alone
    plain = load_config(None, env_for(tmp_path, REMEX_BROKER_URL="redis://127.0.0.1:1/0"))
    assert plain.require_broker() == "redis://127.0.0.1:1/0"


def test_a_rediss_url_says_how_to_verify_even_without_keys(tmp_path: Path) -> None:
    config = load_config(None, env_for(tmp_path, REMEX_BROKER_URL="rediss://h:1/0"))
    assert config.require_broker() == "rediss://h:1/0?ssl_cert_reqs=required"
    # unless the URL says it itself
    config = load_config(
        None, env_for(tmp_path, REMEX_BROKER_URL="rediss://h:1/0?ssl_cert_reqs=optional")
    )
    assert config.require_broker() == "rediss://h:1/0?ssl_cert_reqs=optional"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"REMEX_BROKER_URL": "redis://h:1/0", "REMEX_BROKER_SERVER_CA": "ca.pem"}, "not a rediss"),
        (
            {"REMEX_BROKER_URL": "rediss://h:1/0", "REMEX_BROKER_CLIENT_CERT": "ca.pem"},
            "client-cert and broker.client-key .* go together",
        ),
        (
            {"REMEX_BROKER_URL": "rediss://h:1/0", "REMEX_BROKER_SERVER_CA": "missing.pem"},
            r"broker.server-ca \(REMEX_BROKER_SERVER_CA\): no such file",
        ),
    ],
    ids=["plain-url", "cert-without-key", "missing-file"],
)
def test_wrong_broker_tls_settings_are_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.pem").write_text("pem\n")
    with pytest.raises(ConfigError, match=message):
        load_config(None, env_for(tmp_path, **extra))


def test_cas_download_is_minimal_by_default_and_set_by_file_or_environment(
    tmp_path: Path,
) -> None:
    project = tmp_path / "p"
    project.mkdir()
    assert load_config(project, env_for(tmp_path)).cas_download == "minimal"
    (project / "remex.toml").write_text('[cas]\ndownload = "all"\n')
    assert load_config(project, env_for(tmp_path)).cas_download == "all"
    env = env_for(tmp_path, REMEX_CAS_DOWNLOAD="all")
    assert load_config(project, env).cas_download == "all"
    env = env_for(tmp_path, REMEX_CAS_DOWNLOAD="minimal")
    assert load_config(project, env).cas_download == "minimal"


def test_a_wrong_cas_download_names_the_file_and_the_choices(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / "remex.toml").write_text('[cas]\ndownload = "some"\n')
    with pytest.raises(
        ConfigError, match=r"remex.toml: cas.download: must be one of 'minimal', 'all', not 'some'"
    ):
        load_config(project, env_for(tmp_path))
    with pytest.raises(ConfigError, match="REMEX_CAS_DOWNLOAD"):
        load_config(None, env_for(tmp_path, REMEX_CAS_DOWNLOAD="none"))


def test_the_bots_local_cas_is_on_by_default_and_set_by_file_or_environment(
    tmp_path: Path,
) -> None:
    project = tmp_path / "p"
    project.mkdir()
    config = load_config(project, env_for(tmp_path))
    assert config.bot_local_cas is True and config.bot_cas_dir is None
    assert config.bot_cas_quota_bytes == 10 * 1024**3
    (project / "remex.toml").write_text(
        '[bot]\nlocal-cas = false\ncas-dir = "bot-cas"\ncas-quota = "512M"\n'
    )
    config = load_config(project, env_for(tmp_path))
    assert config.bot_local_cas is False and config.bot_cas_dir == project / "bot-cas"
    assert config.bot_cas_quota_bytes == 512 * 1024**2
    env = env_for(tmp_path, REMEX_BOT_LOCAL_CAS="true", REMEX_BOT_CAS_QUOTA="2G")
    config = load_config(project, env)
    assert config.bot_local_cas is True and config.bot_cas_quota_bytes == 2 * 1024**3


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[bot]\nlocal-cas = "yes"\n', "bot.local-cas must be true or false"),
        ('[bot]\ncas-quota = "lots"\n', "bot.cas-quota: not a size"),
        ("[bot]\nquota = 1\n", "unknown key bot.quota"),
    ],
)
def test_a_wrong_bot_setting_names_the_file_and_the_key(
    tmp_path: Path, text: str, words: str
) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / "remex.toml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(words)) as caught:
        load_config(project, env_for(tmp_path))
    assert str(project / "remex.toml") in str(caught.value)


def test_the_workers_nice_is_unset_by_default_and_set_by_file_or_environment(
    tmp_path: Path,
) -> None:
    project = tmp_path / "p"
    project.mkdir()
    assert load_config(project, env_for(tmp_path)).worker_nice is None
    (project / "remex.toml").write_text("[worker]\nnice = 5\n")
    assert load_config(project, env_for(tmp_path)).worker_nice == 5
    assert load_config(project, env_for(tmp_path, REMEX_WORKER_NICE="0")).worker_nice == 0


def test_the_workers_staging_is_unset_by_default_and_set_by_file_or_environment(
    tmp_path: Path,
) -> None:
    project = tmp_path / "p"
    project.mkdir()
    assert load_config(project, env_for(tmp_path)).worker_staging is None
    (project / "remex.toml").write_text("[worker]\nstaging = 3\n")
    assert load_config(project, env_for(tmp_path)).worker_staging == 3
    env = env_for(tmp_path, REMEX_WORKER_STAGING="0")
    assert load_config(project, env).worker_staging == 0


@pytest.mark.parametrize("value", ["-1", "true", '"two"', "2.5"])
def test_a_wrong_staging_names_the_file_and_the_field(tmp_path: Path, value: str) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / "remex.toml").write_text(f"[worker]\nstaging = {value}\n")
    words = r"worker\.staging: must be a whole number \(0 or more\)"
    with pytest.raises(ConfigError, match=words) as caught:
        load_config(project, env_for(tmp_path))
    assert str(project / "remex.toml") in str(caught.value)
    with pytest.raises(ConfigError, match="REMEX_WORKER_STAGING"):
        load_config(None, env_for(tmp_path, REMEX_WORKER_STAGING="-2"))


@pytest.mark.parametrize("value", ["20", "-1", "true", '"high"', "2.5"])
def test_a_wrong_nice_names_the_file_and_the_range(tmp_path: Path, value: str) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / "remex.toml").write_text(f"[worker]\nnice = {value}\n")
    words = r"worker\.nice: must be a whole number from 0 to 19"
    with pytest.raises(ConfigError, match=words) as caught:
        load_config(project, env_for(tmp_path))
    assert str(project / "remex.toml") in str(caught.value)
    with pytest.raises(ConfigError, match="REMEX_WORKER_NICE"):
        load_config(None, env_for(tmp_path, REMEX_WORKER_NICE="25"))
