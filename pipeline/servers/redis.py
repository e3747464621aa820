"""Redis (Debian ``redis-server``): the broker and result backend."""

from __future__ import annotations

import os
from urllib.parse import quote

from pipeline.servers.base import HOST, Server, ServerError, require_program

__all__ = ["RedisServer", "redis_url"]


def redis_url(address: str, password: str | None = None, db: int = 0) -> str:
    """``redis://[:PASSWORD@]ADDRESS/DB`` (the password URL-quoted)."""
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{address}/{db}"


class RedisServer(Server):
    """Debian ``redis-server`` on 127.0.0.1:``port``, data folder ``workdir``.

    ``appendonly=True`` turns AOF on (``--dir workdir``), so a ``restart()``
    brings the data back; otherwise nothing is persisted. With ``password``,
    clients must AUTH (``requirepass``); the password goes to redis-server in
    a config file of mode 0600 (``workdir/redis.conf``), never on its command
    line, which every local user can read in ``/proc``. Redis runs with umask
    077: its AOF and snapshots are readable by their owner only.
    ``url`` is ``redis://[:PASSWORD@]127.0.0.1:PORT/0``; ``public_url`` the
    same without the password (to show or record).
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
    ) -> None:
        super().__init__(workdir)
        self.appendonly = appendonly
        if password and any(c in password for c in '"\\\n\r'):
            raise ServerError("a Redis password must not contain quotes, backslashes or newlines")
        self.password = password or None
        self.config_path = self.workdir / "redis.conf"

    @property
    def url(self) -> str:
        return redis_url(self.address, self.password)

    @property
    def public_url(self) -> str:
        """The URL without the password."""
        return redis_url(self.address)

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
        self._popen(
            [
                redis_server,
                str(self.config_path),
                "--port", str(self.port),
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

        client = redis.Redis(
            host=HOST,
            port=self._require_port(),
            password=self.password,
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
