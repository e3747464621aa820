"""The one place a whole remex stack is put together.

:class:`RemexStack` starts redis-server, an execution server (a buildbox-casd
of its own unless one is given, e.g. a BuildGrid), an artifact buildbox-casd
(or the execution casd serves artifacts too), Flower if asked, N ``remex
bot`` processes and N ``remex worker`` processes, and gives the environment
that names them. ``remex up`` (:mod:`pipeline.stack`), the tests and the
benchmarks all build their stacks with it::

    with RemexStack(tmp_path, workers=2) as stack:
        result = stack.cli("build", "-C", project, "app.bst", "--json")
        assert result.returncode == 0, result.stderr

Every process is stopped by PID with its process tree, the workers first (all
at once), then the bots, then the servers, the last started first. A server
passed in (``execution=``) belongs to the caller: the stack starts it if it
is not running, and never stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from pipeline.servers.base import Server, remex_program
from pipeline.servers.bot import BotProcess
from pipeline.servers.casd import CasdServer
from pipeline.servers.flower import FLOWER_USER, FlowerServer
from pipeline.servers.redis import RedisServer
from pipeline.servers.worker import RemexWorker

__all__ = [
    "STACK_WORKER_NICE",
    "STACK_WORKER_STAGING",
    "TEST_HEARTBEAT_TIMEOUT",
    "TEST_RECONCILE_INTERVAL",
    "RemexStack",
]

# Heartbeat timeout the stack gives its workers by default (production
# default: 30 s): a SIGKILLed worker's elements are re-sent within ~2x this.
TEST_HEARTBEAT_TIMEOUT = 5.0
# How often the stack's workers run the reconciler by default (production: 5 s).
TEST_RECONCILE_INTERVAL = 1.0
#: The CPU priority (nice) a stack gives its workers unless told otherwise.
#: The actions run on this host too, in buildbox-casd's (or the bots')
#: sandboxes; at each wave's end the workers' fetch, push and staging of the
#: next elements would otherwise slow the sandboxes' start and end (the wide
#: case of bench.pipeline: a slot refilled after 37-70 ms at nice 0, 27-50
#: ms at 10, the floor 28 ms). See lower_cpu_priority for why a session.
STACK_WORKER_NICE = 10
#: How many elements each of a stack's workers stages at once unless told
#: otherwise (``[worker] staging``; see tasks.runtime.StagingWindow). On one
#: host staging is CPU work that competes with the sandboxes. In
#: bench.pipeline's wide case remex took 1.037-1.060 x the Execute floor
#: with no limit (eight sets of 5 runs, medians), 1.022-1.061 with 2 places
#: a worker (five sets) and 1.020-1.031 with 1 (four sets).
STACK_WORKER_STAGING = 1


class RemexStack:
    """redis-server, an execution server, an artifact server, Flower, bots and workers.

    Args:
        workdir: everything lives below it (``redis/``, ``casd-execution/``,
            ``casd-artifacts/``, ``flower/``, ``botN/``, ``worker-NAME/``,
            ``cli-cas/``).
        workers: how many workers to start, named ``w1``, ``w2`` ...
        concurrency: threads per worker.
        jobs: actions the execution casd runs at once (when the stack makes it).
        execution: the execution server to use instead of a casd of the
            stack's own (the caller's: started if need be, never stopped).
        separate_artifacts: False: the execution casd serves artifacts too.
        bots: how many ``remex bot`` processes to start against the execution
            server (named ``bot1``, ``bot2`` ...; for a BuildGrid).
        bot_capacity: ``remex bot --capacity``.
        flower: also start Flower (before the workers, so it sees them come up).
        flower_password: its basic-auth password (user ``remex``); random if None.
        persistent_redis: AOF on, so a restarted Redis has its queues back.
        redis_password: Redis then requires it (``requirepass``); the
            stack's URLs carry it.
        execution_socket: the execution casd (when the stack makes it)
            listens on this unix socket instead of a TCP port.
        heartbeat_timeout, reconcile_interval: given to the workers
            (``REMEX_HEARTBEAT_TIMEOUT``, ``REMEX_RECONCILE_INTERVAL``);
            None leaves the production defaults.
        extra_env: added to every process's environment.
        worker_nice: the workers' CPU priority (``REMEX_WORKER_NICE``) unless
            ``extra_env`` sets it; 0 leaves them at the default priority.
        worker_staging: how many elements each worker stages at once
            (``REMEX_WORKER_STAGING``) unless ``extra_env`` sets it; 0: no limit.

    Attributes:
        env: the environment for ``remex`` commands (the CLI's own local CAS
            is ``cli-cas/``); set by :meth:`start`.
    """

    #: Folder (below ``workdir``) of each server the stack makes.
    dirs: ClassVar[Mapping[str, str]] = {
        "redis": "redis",
        "execution": "casd-execution",
        "artifacts": "casd-artifacts",
        "flower": "flower",
    }

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        workers: int = 2,
        concurrency: int = 4,
        jobs: int = 4,
        execution: Server | None = None,
        separate_artifacts: bool = True,
        bots: int = 0,
        bot_capacity: int = 1,
        flower: bool = False,
        flower_password: str | None = None,
        persistent_redis: bool = False,
        redis_password: str | None = None,
        execution_socket: str | os.PathLike[str] | None = None,
        heartbeat_timeout: float | None = TEST_HEARTBEAT_TIMEOUT,
        reconcile_interval: float | None = TEST_RECONCILE_INTERVAL,
        extra_env: Mapping[str, str] | None = None,
        worker_nice: int = STACK_WORKER_NICE,
        worker_staging: int = STACK_WORKER_STAGING,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.worker_count = workers
        self.concurrency = concurrency
        self.bot_count = bots
        self.bot_capacity = bot_capacity
        self.redis = RedisServer(
            self.workdir / self.dirs["redis"], appendonly=persistent_redis, password=redis_password
        )
        self._owned: list[Server] = [self.redis]
        if execution is None:
            execution = CasdServer(
                self.workdir / self.dirs["execution"], jobs=jobs, socket_path=execution_socket
            )
            self._owned.append(execution)
        self.execution: Server = execution
        self.artifacts: CasdServer | None = None
        if separate_artifacts:
            self.artifacts = CasdServer(self.workdir / self.dirs["artifacts"], jobs=1)
            self._owned.append(self.artifacts)
        self.flower: FlowerServer | None = None
        self._flower_wanted = flower
        self._flower_password = flower_password
        self.bots: list[BotProcess] = []
        self.workers: list[RemexWorker] = []
        self.heartbeat_timeout = heartbeat_timeout
        self.reconcile_interval = reconcile_interval
        self.extra_env = dict(extra_env or {})
        self.worker_nice = worker_nice
        self.worker_staging = worker_staging
        self.env: dict[str, str] = {}

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Start every server, bot and worker (what is already running stays).

        Raises:
            ServerError: something did not start (its log's tail in the
                message); everything started so far is stopped again.
        """
        try:
            for server in (self.redis, self.execution, self.artifacts):
                if server is not None:
                    server.start()
            self.env = self.base_env() | {"REMEX_CAS_DIR": str(self.workdir / "cli-cas")}
            if self._flower_wanted and self.flower is None:
                self.flower = FlowerServer(
                    self.workdir / self.dirs["flower"],
                    broker_url=self.redis.url,
                    user=FLOWER_USER,
                    password=self._flower_password or secrets.token_urlsafe(16),
                    env=self.base_env(),
                )
                self._owned.append(self.flower)
                self.flower.start()
            self._start_all(
                [self._new_bot(index) for index in range(len(self.bots), self.bot_count)]
            )
            self._start_all(
                [
                    self._new_worker(self.worker_name(index))
                    for index in range(len(self.workers), self.worker_count)
                ]
            )
        except BaseException:
            self.close()
            raise
        return self

    def add_worker(self, name: str | None = None, *, concurrency: int | None = None) -> RemexWorker:
        """Start one more worker (named ``wN`` unless ``name`` is given)."""
        worker = self._new_worker(name or self.worker_name(len(self.workers)), concurrency)
        worker.start()
        return worker

    def close(self) -> None:
        """Stop the workers (SIGTERM, then SIGKILL; all at once), then the bots,
        then the servers the stack made, the last started first."""
        _in_parallel(_close_quietly, self.workers)
        _in_parallel(_close_quietly, self.bots)
        for server in reversed(self._owned):
            _close_quietly(server)

    def detach(self) -> None:
        """Leave every process running after this process exits (no stop at
        exit); ``remex up`` records their PIDs and ``remex down`` stops them."""
        for server in [*self._owned, *self.bots, *self.workers]:
            if server.running:
                server.detach()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- using it

    @property
    def artifacts_url(self) -> str:
        return (self.artifacts or self.execution).url

    def worker_name(self, index: int) -> str:
        """The name of worker number ``index`` (0-based): ``w1``, ``w2`` ..."""
        return f"w{index + 1}"

    def worker_dir(self, name: str) -> Path:
        """The folder of worker ``name``."""
        return self.workdir / f"worker-{name}"

    def base_env(self) -> dict[str, str]:
        """The environment of every process of the stack: this process's,
        without its ``REMEX_*`` settings (nor a user's config file or embedded
        stack), naming the stack's servers."""
        empty_config = self.workdir / "remex.toml"
        empty_config.touch()
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("REMEX_") and key not in ("CELERY_CONFIG_MODULE",)
        }
        env.update(
            REMEX_CONFIG=str(empty_config),
            # No embedded stack (remex up) of the user's either.
            REMEX_STACK_DIR=str(self.workdir / "no-embedded-stack"),
            REMEX_ARTIFACTS_URL=self.artifacts_url,
            **self._server_env(),
        )
        env.update(self.extra_env)
        return env

    def cli(
        self,
        *args: str | os.PathLike[str],
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``remex ARGS...`` with the stack's environment; never raises on
        a non-zero exit (look at ``returncode``), raises on ``timeout``."""
        return subprocess.run(
            [remex_program(), *map(str, args)],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def cli_popen(self, *args: str | os.PathLike[str]) -> subprocess.Popen[str]:
        """Start ``remex ARGS...`` in the background (output piped)."""
        return subprocess.Popen(
            [remex_program(), *map(str, args)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def build_json(
        self, project: str | os.PathLike[str], *targets: str, timeout: float = 180.0
    ) -> tuple[int, dict[str, Any]]:
        """``remex build -C PROJECT TARGETS --json``: (exit code, parsed output).

        Raises:
            AssertionError: the output is not JSON (with stderr and the logs).
        """
        result = self.cli("build", "-C", project, *targets, "--json", timeout=timeout)
        try:
            return result.returncode, json.loads(result.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"remex build --json exited {result.returncode} without JSON:\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n{self.logs()}"
            ) from None

    def scheduler(self) -> Any:
        """A :class:`pipeline.scheduler.Scheduler` on the stack's Redis."""
        from pipeline.scheduler import Scheduler

        return Scheduler.from_url(self.redis.url)

    def logs(self, lines: int = 30) -> str:
        """Every bot's and worker's log tail, for assertion messages."""
        parts = [f"--- bot {b.bot_id} ({b.log_path}):\n{b.log_tail(lines)}" for b in self.bots]
        parts += [
            f"--- worker {w.worker_name} ({w.log_path}):\n{w.log_tail(lines)}" for w in self.workers
        ]
        return "\n".join(parts)

    # ----------------------------------------------------------------- private

    def _server_env(self) -> dict[str, str]:
        """The settings naming the broker and execution server, and the
        workers' timings (those not left at their defaults)."""
        env = {
            "REMEX_BROKER_URL": self.redis.url,
            "REMEX_EXECUTION_URL": self.execution.url,
            "PYTHONUNBUFFERED": "1",
        }
        if self.heartbeat_timeout is not None:
            env["REMEX_HEARTBEAT_TIMEOUT"] = str(self.heartbeat_timeout)
        if self.reconcile_interval is not None:
            env["REMEX_RECONCILE_INTERVAL"] = str(self.reconcile_interval)
        return env

    def _new_worker(self, name: str, concurrency: int | None = None) -> RemexWorker:
        env = self.base_env()
        if self.worker_nice and "REMEX_WORKER_NICE" not in env:
            env["REMEX_WORKER_NICE"] = str(self.worker_nice)
        if self.worker_staging and "REMEX_WORKER_STAGING" not in env:
            env["REMEX_WORKER_STAGING"] = str(self.worker_staging)
        worker = RemexWorker(
            self.worker_dir(name),
            name=name,
            env=env,
            concurrency=concurrency or self.concurrency,
        )
        self.workers.append(worker)
        return worker

    def _new_bot(self, index: int) -> BotProcess:
        name = f"bot{index + 1}"
        bot = BotProcess(
            self.workdir / name,
            remote=self.execution.url,
            bot_id=name,
            capacity=self.bot_capacity,
            env=self.base_env(),
        )
        self.bots.append(bot)
        return bot

    @staticmethod
    def _start_all(servers: Sequence[Server]) -> None:
        """Start ``servers`` at once (each waits for its own readiness);
        raise the first failure once all are done."""
        errors: list[BaseException] = []

        def start(server: Server) -> None:
            try:
                server.start()
            except BaseException as exc:
                errors.append(exc)

        _in_parallel(start, servers)
        if errors:
            raise errors[0]


def _close_quietly(server: Server) -> None:
    with contextlib.suppress(Exception):
        server.close()


def _in_parallel(action: Callable[[Server], None], servers: Sequence[Server]) -> None:
    """Run ``action(server)`` for every server, each in a thread of its own."""
    threads = [
        threading.Thread(target=action, args=(server,), name=f"stack-{server.name}")
        for server in servers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
