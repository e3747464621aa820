"""BuildGrid 0.4.4 (``bgd server start``): the distributed REAPI server.

Used by the tests, the benchmarks and the compose checks, not by ``remex up``.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

from pipeline.servers.base import Server, ServerError, reapi_answers, venv_program
from pipeline.servers.testing.postgres import PostgresServer

__all__ = ["MIGRATED_TEMPLATE", "BuildGridServer", "buildgrid_config"]


_BUILDGRID_CONFIG = """\
# Written by pipeline/servers/testing/buildgrid.py for BuildGrid 0.4.4.
server:
  - !channel
    address: "{address}"
    insecure-mode: true

# gRPC sets SO_REUSEPORT by default: two servers on one port would then
# silently share the connections.
grpc-server-options:
  grpc.so_reuseport: 0

connections:
  - !sql-connection &sql
    connection-string: {dsn}
    pool-size: 5
    max-overflow: 10

storages:
  - !lru-storage &cas-storage
    size: {cas_size}

caches:
  - !lru-action-cache &action-cache
    storage: *cas-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true

schedulers:
  - !sql-scheduler &scheduler
    sql: *sql
    storage: *cas-storage
    action-cache: *action-cache
    bot-session-keepalive-timeout: {keepalive}
    session-expiry-timer-interval: 2
    poll-interval: 0.25
    bot-poll-interval: 0.25
    # proactive-fetch-to-capacity stays false: with it every UpdateBotSession
    # bumps the bot's version, so BuildGrid never holds a long poll, and a
    # job the assigner gives a bot waits for the bot's next heartbeat (the
    # wide bench: 8.3 s instead of 6.0 s). Without it a finished lease is
    # refilled in the same call when a job is waiting out a failure-backoff.
    property-set: !dynamic-property-set
      match-property-keys: [OSFamily, ISA]
      # Sent by elements with sandbox build-uid/build-gid; buildbox-run
      # applies them, so they need not match a bot's properties.
      wildcard-property-keys: [unixUID, unixGID]
    assigners:
      - !priority-age-assigner
        count: 1
        # An idle assigner looks at the queue this often: a job sent while
        # every bot is idle waits up to this long (a chain of trivial actions
        # took 256 ms an action with 0.25 s, 130 ms with 0.1 s; BuildGrid +
        # PostgreSQL idle: 1.2 % of a core with 0.25 s, 2.5 % with 0.1 s).
        interval: 0.1
        # The default jitter (1.0) adds up to a second to every action.
        jitter-factor: 0.0
        # The assigner locks the chosen bot's row with SKIP LOCKED; a bot busy
        # updating its session at that instant (every assignment wakes it)
        # makes the job wait this long before the next try (default 5 s).
        failure-backoff: {failure_backoff}

# BuildGrid serves at most 5 x cores RPCs at once by default (10 on 2 cores)
# and answers RESOURCE_EXHAUSTED beyond; every bot long poll and every
# Execute/WaitExecution stream holds one.
thread-pool-size: {thread_pool_size}

instances:
  - name: ""
    description: remex test instance
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
      - !action-cache
        cache: *action-cache
      - !execution
        scheduler: *scheduler
        endpoints: [execution, operations, bots]
"""


def buildgrid_config(
    address: str,
    dsn: str,
    *,
    cas_size: str = "1G",
    bot_session_keepalive_timeout: int = 10,
    thread_pool_size: int = 128,
    failure_backoff: float = 0.25,
) -> str:
    """The YAML config :class:`BuildGridServer` starts BuildGrid with (its
    defaults are the server's; deploy/buildgrid.yml schedules alike)."""
    return _BUILDGRID_CONFIG.format(
        address=address,
        dsn=dsn,
        cas_size=cas_size,
        keepalive=bot_session_keepalive_timeout,
        thread_pool_size=thread_pool_size,
        failure_backoff=failure_backoff,
    )


#: Database migrated once per cluster; each BuildGrid start copies it.
MIGRATED_TEMPLATE = "bgd_migrated_template"
_template_lock = threading.Lock()


class BuildGridServer(Server):
    """BuildGrid 0.4.4 (``bgd server start``) on ``grpc://127.0.0.1:PORT``:
    CAS, ByteStream, ActionCache, Execution, Operations, Bots, Capabilities
    for instance ``""``; in-memory CAS/ActionCache, scheduler in ``postgres``
    (database ``database``, default ``bgd``).

    Every start() -- including restart() -- drops and recreates the database
    (jobs kept in PostgreSQL would otherwise outlive the in-memory CAS), as a
    copy of ``bgd_migrated_template``, a database on which ``bgd migrate
    apply`` ran once per PostgreSQL cluster.  restart() keeps the port only.  The config is
    written to ``config_path`` (``workdir/buildgrid.yml``).
    """

    name = "buildgrid"
    scheme = "grpc"
    start_timeout = 90.0
    stop_grace = 10.0
    exclusive_port_check = True

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        postgres: PostgresServer,
        *,
        database: str = "bgd",
        cas_size: str = "1G",
        bot_session_keepalive_timeout: int = 10,
        thread_pool_size: int = 128,
        failure_backoff: float = 0.25,
    ) -> None:
        super().__init__(workdir)
        self.thread_pool_size = thread_pool_size
        self.failure_backoff = failure_backoff
        self.postgres = postgres
        self.database = database
        self.cas_size = cas_size
        self.bot_session_keepalive_timeout = bot_session_keepalive_timeout
        self.config_path: Path = self.workdir / "buildgrid.yml"

    @property
    def dsn(self) -> str:
        return self.postgres.dsn_for(self.database)

    def _bgd(self) -> str:
        return venv_program("bgd", "pip install 'buildgrid[database]==0.4.4' (extra 'test')")

    def _launch(self) -> None:
        if not self.postgres.running:
            raise ServerError("BuildGridServer needs its PostgresServer started first")
        bgd = self._bgd()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # A fresh database each start, copied from a template migrated once per
        # PostgreSQL cluster (`bgd migrate apply` alone takes 2-3 s).
        with _template_lock:
            if not self.postgres.database_exists(MIGRATED_TEMPLATE):
                self._migrate(bgd, env, MIGRATED_TEMPLATE)
        self.postgres.create_database(self.database, recreate=True, template=MIGRATED_TEMPLATE)
        self.config_path.write_text(
            buildgrid_config(
                self.address,
                self.dsn,
                cas_size=self.cas_size,
                bot_session_keepalive_timeout=self.bot_session_keepalive_timeout,
                thread_pool_size=self.thread_pool_size,
                failure_backoff=self.failure_backoff,
            )
        )
        self._popen([bgd, "server", "start", str(self.config_path)], env)

    def _probe(self, timeout: float) -> bool:
        return reapi_answers(self.url, timeout)

    def _migrate(self, bgd: str, env: Mapping[str, str], database: str) -> None:
        """Create ``database`` and run ``bgd migrate apply`` on it."""
        self.postgres.create_database(database, recreate=True)
        dsn = self.postgres.dsn_for(database)
        self._mark_log(f"bgd migrate apply {dsn}")
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                [bgd, "migrate", "apply", dsn],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env), cwd=self.workdir, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            self.postgres.drop_database(database)
            raise ServerError(
                f"bgd migrate apply failed (exit code {result.returncode}); "
                f"log {self.log_path}:\n{self._log_tail()}"
            )
