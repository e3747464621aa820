"""Redis (Debian ``redis-server``): the broker and result backend."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pipeline.servers.base import HOST, Server, ServerError, require_program

__all__ = ["RedisServer", "RedisTls", "redis_url"]


@dataclass(frozen=True)
class RedisTls:
    """TLS files (PEM) of a Redis server: its certificate and key, and the CA
    its clients' certificates must be signed by (clients must present one)."""

    cert: Path
    key: Path
    ca: Path


def redis_url(address: str, password: str | None = None, db: int = 0, *, tls: bool = False) -> str:
    """``redis[s]://[:PASSWORD@]ADDRESS/DB`` (the password URL-quoted)."""
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"{'rediss' if tls else 'redis'}://{auth}{address}/{db}"


class RedisServer(Server):
    """Debian ``redis-server`` on 127.0.0.1:``port``, data folder ``workdir``.

    ``appendonly=True`` turns AOF on (``--dir workdir``), so a ``restart()``
    brings the data back; otherwise nothing is persisted. With ``password``,
    clients must AUTH (``requirepass``); the password goes to redis-server in
    a config file of mode 0600 (``workdir/redis.conf``), never on its command
    line, which every local user can read in ``/proc``. Redis runs with umask
    077: its AOF and snapshots are readable by their owner only.
    ``url`` is ``redis://[:PASSWORD@]127.0.0.1:PORT/0``; ``public_url`` the
    same without the password (to show or record). With ``tls``, Redis
    speaks TLS only (``rediss://``) and asks clients for a certificate.
    """

    name = "redis"
    scheme = "redis"
    start_timeout = 30.0
    probe_timeout = 1.0  # PING answers at once; a stranger on the port does not
    umask = 0o077

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        appendonly: bool = False,
        *,
        password: str | None = None,
        tls: RedisTls | None = None,
    ) -> None:
        super().__init__(workdir)
        self.appendonly = appendonly
        if password and any(c in password for c in '"\\\n\r'):
            raise ServerError("a Redis password must not contain quotes, backslashes or newlines")
        self.password = password or None
        self.tls = tls
        self.config_path = self.workdir / "redis.conf"

    @property
    def url(self) -> str:
        return redis_url(self.address, self.password, tls=self.tls is not None)

    @property
    def public_url(self) -> str:
        """The URL without the password."""
        return redis_url(self.address, tls=self.tls is not None)

    def _prepare(self) -> None:
        # Written even without a password, so a password set before does not linger.
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as conf:
            conf.write("# written by remex; the command line adds the rest\n")
            if self.password:
                conf.write(f'requirepass "{self.password}"\n')

    def _launch(self) -> None:
        redis_server = require_program("redis-server", "install the Debian package 'redis-server'")
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            ports = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "yes",
            ]  # fmt: skip
        self._popen(
            [
                redis_server,
                str(self.config_path),
                *ports,
                "--bind", HOST,
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--dir", str(self.workdir),
                "--daemonize", "no",
            ]
        )  # fmt: skip

    def _probe(self, timeout: float) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        tls: dict[str, object] = {}
        if self.tls is not None:
            # The server's own certificate and key serve as the probe's client pair.
            tls = {
                "ssl": True,
                "ssl_ca_certs": str(self.tls.ca),
                "ssl_certfile": str(self.tls.cert),
                "ssl_keyfile": str(self.tls.key),
            }
        client = redis.Redis(
            host=HOST,
            port=self._require_port(),
            password=self.password,
            **tls,  # type: ignore[arg-type]
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # redis-py's default retries turn 2 s into 25 s
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
