"""A ``rediss://`` broker with a CA and client certificates: the scheduler's
Redis client, Celery's broker (kombu) and Celery's result backend all connect
with the ``[broker]`` TLS keys, and without them they do not.

A real redis-server with TLS only (``--port 0 --tls-port P``) that asks every
client for a certificate signed by the test's CA.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from pipeline.broker import make_celery
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.scheduler import Scheduler
from pipeline.servers.redis import RedisServer, RedisTls


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server: RedisTls
    client_cert: Path
    client_key: Path
    stranger_ca: Path
    """A CA that signed nothing here."""


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
            "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


def sign(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions + "\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
            "-subj", f"/CN={name}")  # fmt: skip
    openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder, "remex-test-ca")
    server = sign(folder, "server", ca, "subjectAltName=IP:127.0.0.1")
    client = sign(folder, "client", ca, "extendedKeyUsage=clientAuth")
    stranger, _ = make_ca(folder, "stranger-ca")
    return Certificates(
        ca=ca[0],
        server=RedisTls(cert=server[0], key=server[1], ca=ca[0]),
        client_cert=client[0],
        client_key=client[1],
        stranger_ca=stranger,
    )


@pytest.fixture(scope="module")
def tls_redis(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[RedisServer]:
    with RedisServer(
        tmp_path_factory.mktemp("redis-tls"), password="tls-test-pass", tls=certificates.server
    ) as server:
        yield server


def config_file(folder: Path, url: str, **keys: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["[broker]", f'url = "{url}"']
    lines += [f'{key.replace("_", "-")} = "{value}"' for key, value in keys.items()]
    (folder / "remex.toml").write_text("\n".join(lines) + "\n")
    return folder / "remex.toml"


def env_for(tmp_path: Path, config: Path) -> dict[str, str]:
    return {
        "REMEX_CONFIG": str(config),
        "REMEX_STACK_DIR": str(tmp_path / "no-stack"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }


def test_scheduler_broker_and_backend_connect_with_the_tls_keys(
    tmp_path: Path, tls_redis: RedisServer, certificates: Certificates
) -> None:
    # Given a remex.toml naming the CA and the client certificate and key
    toml = config_file(
        tmp_path / "conf",
        tls_redis.url,
        server_ca=certificates.ca,
        client_cert=certificates.client_cert,
        client_key=certificates.client_key,
    )
    config = load_config(None, env_for(tmp_path, toml))
    assert config.require_broker().startswith("rediss://")

    # Then the scheduler's Redis client talks to the server
    scheduler = Scheduler.from_url(config.require_broker())
    assert scheduler.redis.ping()
    assert scheduler.active_builds() == []

    # And a message goes through Celery's broker connection (kombu) and back
    app = make_celery(config)
    try:
        with app.connection_for_write() as connection:
            queue = connection.SimpleQueue("remex.tls-test")
            queue.put({"hello": "tls"})
            message = queue.get(timeout=10)
            message.ack()
            assert message.payload == {"hello": "tls"}
            queue.close()
        # And through the result backend
        app.backend.store_result("tls-test-task", {"ok": True}, "SUCCESS")
        assert app.backend.get_task_meta("tls-test-task")["result"] == {"ok": True}
    finally:
        app.close()


def test_without_the_client_certificate_or_with_another_ca_nothing_connects(
    tmp_path: Path, tls_redis: RedisServer, certificates: Certificates
) -> None:
    # Given the right CA but no client certificate: the server refuses the handshake
    toml = config_file(tmp_path / "a", tls_redis.url, server_ca=certificates.ca)
    no_cert = load_config(None, env_for(tmp_path, toml))
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(no_cert.require_broker(), socket_timeout=5).ping()
    # Given a client certificate but a CA that did not sign the server's: refused here
    wrong_ca = load_config(
        None,
        env_for(
            tmp_path,
            config_file(
                tmp_path / "b",
                tls_redis.url,
                server_ca=certificates.stranger_ca,
                client_cert=certificates.client_cert,
                client_key=certificates.client_key,
            ),
        ),
    )
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(wrong_ca.require_broker(), socket_timeout=5).ping()


def test_tls_keys_with_a_plain_redis_url_are_refused(
    tmp_path: Path, certificates: Certificates
) -> None:
    # Given TLS keys next to a redis:// (not rediss://) URL
    toml = config_file(tmp_path, "redis://127.0.0.1:1/0", server_ca=certificates.ca)
    # Then loading the configuration says so instead of sending in the clear
    with pytest.raises(ConfigError, match=r"broker\.server-ca .*given, but .*not a rediss://"):
        load_config(None, env_for(tmp_path, toml))
