"""Redis (Debian ``redis-server``): the broker and result backend."""

from __future__ import annotations

import os

from pipeline.servers.base import HOST, Server, require_program

__all__ = ["RedisServer"]


class RedisServer(Server):
    """Debian ``redis-server`` on 127.0.0.1:``port``, data folder ``workdir``.

    ``appendonly=True`` turns AOF on (``--dir workdir``), so a ``restart()``
    brings the data back; otherwise nothing is persisted.
    ``url`` is ``redis://127.0.0.1:PORT/0``.
    """

    name = "redis"
    scheme = "redis"
    start_timeout = 30.0
    probe_timeout = 1.0  # PING answers at once; a stranger on the port does not

    def __init__(self, workdir: str | os.PathLike[str], appendonly: bool = False) -> None:
        super().__init__(workdir)
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://{self.address}/0"

    def _launch(self) -> None:
        redis_server = require_program("redis-server", "install the Debian package 'redis-server'")
        self._popen(
            [
                redis_server,
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
