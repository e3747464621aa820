"""Real ``remex worker`` processes and a whole local stack, for tests and benchmarks.

Plain Python (no pytest): ``bench/`` imports it too.

:class:`RemexWorker` runs ``remex worker --name NAME -c N`` (the console script
next to the running interpreter) as a process in a session of its own, its
output in ``workdir/worker.log``, its local CAS in ``workdir/cas``; ``start()``
returns once the worker answers a Celery control ping. ``stop()`` is SIGTERM
then SIGKILL, ``kill()`` SIGKILL at once (the worker uses the thread pool: one
process). Both go by PID (the process tree and its process group), like the
servers of :mod:`pipeline.servers`, whose base class it shares.

:class:`RemexStack` is redis-server + an execution buildbox-casd + a separate
artifact buildbox-casd (so every artifact blob crosses from one to the other)
+ N workers, with :meth:`RemexStack.cli` running ``remex ...`` as a user would,
with an environment naming those servers and nothing else (``REMEX_CONFIG``
points at an empty file, so no user config leaks in)::

    with RemexStack(tmp_path, workers=2) as stack:
        result = stack.cli("build", "-C", project, "app.bst", "--json")
        assert result.returncode == 0, result.stderr
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from pipeline.servers import (
    CasdServer,
    RedisServer,
    Server,
    ServerError,
    _tail,
)

__all__ = ["RemexStack", "RemexWorker", "remex_program"]

# Heartbeat timeout the stack gives its workers (production default: 30 s):
# a SIGKILLed worker's elements are re-sent within ~2x this.
TEST_HEARTBEAT_TIMEOUT = 5.0
# How often the stack's workers run the reconciler (production default: 5 s).
TEST_RECONCILE_INTERVAL = 1.0


def remex_program() -> str:
    """The ``remex`` console script next to the running interpreter (the venv's bin/)."""
    candidate = Path(sys.executable).parent / "remex"  # not resolved: keep the venv path
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise ServerError(f"{candidate} not found: pip install -e . in this venv")


class RemexWorker(Server):
    """One ``remex worker`` process (Celery, thread pool) named ``name``.

    Args:
        workdir: its folder: ``worker.log``, and ``cas/`` as its local CAS
            unless ``env`` sets ``REMEX_CAS_DIR``.
        name: the worker name (its own queue is ``remex.host.NAME``).
        env: the environment (``REMEX_BROKER_URL`` ... ); ``REMEX_WORKER_NAME``
            and, unless given, ``REMEX_CAS_DIR`` are added.
        concurrency: tasks at once (threads).
        ready_timeout: seconds ``start()`` waits for the worker to answer a ping.
    """

    name = "worker"
    scheme = "celery"
    listens = False
    stop_grace = 15.0

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        name: str,
        env: Mapping[str, str],
        concurrency: int = 4,
        ready_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.worker_name = name
        self.concurrency = concurrency
        self.start_timeout = ready_timeout
        self.extra_args = list(extra_args)
        self.cas_dir = Path(env.get("REMEX_CAS_DIR") or self.workdir / "cas")
        self.env = {**env, "REMEX_WORKER_NAME": name, "REMEX_CAS_DIR": str(self.cas_dir)}
        self.log_path = self.workdir / "worker.log"

    @property
    def hostname(self) -> str:
        """The Celery node name (``remex-NAME@host``), as control commands address it."""
        return f"remex-{self.worker_name}@{socket.gethostname()}"

    @property
    def url(self) -> str:
        return f"celery://{self.hostname}"

    @property
    def address(self) -> str:
        return self.hostname

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the worker's log (since its last start)."""
        return _tail(self.log_path, self._log_offset, lines)

    def ping(self, timeout: float = 0.5) -> bool:
        """True if the worker answers a Celery control ping within ``timeout`` s."""
        from celery import Celery

        app = Celery("remex-test-ping", broker=self.env["REMEX_BROKER_URL"])
        app.conf.update(broker_connection_retry_on_startup=True, accept_content=["json"])
        try:
            replies = app.control.ping(destination=[self.hostname], timeout=timeout)
        except Exception:
            return False
        finally:
            app.close()
        return any(self.hostname in reply for reply in replies or [])

    def __repr__(self) -> str:
        return f"<RemexWorker {self.worker_name} pid={self._pid} workdir={self.workdir}>"

    # ----------------------------------------------------------------- hooks

    def _launch(self) -> None:
        args = [
            remex_program(),
            "worker",
            "--name",
            self.worker_name,
            "-c",
            str(self.concurrency),
            *self.extra_args,
        ]
        self._popen(args, self.env)

    def _probe(self, timeout: float) -> bool:
        """Ready when it answers a Celery control ping."""
        return self.ping(timeout=min(timeout, 0.5))


def _close_quietly(server: Server) -> None:
    with contextlib.suppress(Exception):
        server.close()


class RemexStack:
    """redis-server, two buildbox-casd (execution, artifacts) and N remex workers.

    Args:
        workdir: everything lives below it (``redis/``, ``casd-execution/``,
            ``casd-artifacts/``, ``worker-NAME/``, ``cli-cas/``).
        workers: how many workers to start, named ``w1``, ``w2`` ...
        concurrency: threads per worker.
        jobs: actions the execution casd runs at once.
        heartbeat_timeout, reconcile_interval: given to the workers
            (``REMEX_HEARTBEAT_TIMEOUT``, ``REMEX_RECONCILE_INTERVAL``).
        separate_artifacts: False: one casd serves execution and artifacts.
        extra_env: added to every process's environment.

    Attributes:
        env: the environment for ``remex`` commands (the CLI's own local CAS
            is ``cli-cas/``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        workers: int = 2,
        concurrency: int = 4,
        jobs: int = 4,
        heartbeat_timeout: float = TEST_HEARTBEAT_TIMEOUT,
        reconcile_interval: float = TEST_RECONCILE_INTERVAL,
        separate_artifacts: bool = True,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.worker_count = workers
        self.concurrency = concurrency
        self.redis = RedisServer(self.workdir / "redis")
        self.execution = CasdServer(self.workdir / "casd-execution", jobs=jobs)
        self.artifacts: CasdServer | None = (
            CasdServer(self.workdir / "casd-artifacts", jobs=1) if separate_artifacts else None
        )
        self.workers: list[RemexWorker] = []
        self.heartbeat_timeout = heartbeat_timeout
        self.reconcile_interval = reconcile_interval
        self.extra_env = dict(extra_env or {})
        self.env: dict[str, str] = {}
        self._empty_config = self.workdir / "remex.toml"

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Start every server and worker (what is already running stays)."""
        try:
            self.redis.start()
            self.execution.start()
            if self.artifacts is not None:
                self.artifacts.start()
            self._empty_config.write_text("")
            self.env = self._base_env() | {"REMEX_CAS_DIR": str(self.workdir / "cli-cas")}
            while len(self.workers) < self.worker_count:
                self.add_worker()
        except BaseException:
            self.close()
            raise
        return self

    def add_worker(self, name: str | None = None, *, concurrency: int | None = None) -> RemexWorker:
        """Start one more worker (named ``wN`` unless ``name`` is given)."""
        name = name or f"w{len(self.workers) + 1}"
        worker = RemexWorker(
            self.workdir / f"worker-{name}",
            name=name,
            env=self._base_env(),
            concurrency=concurrency or self.concurrency,
        )
        self.workers.append(worker)
        worker.start()
        return worker

    def close(self) -> None:
        """Stop the workers (SIGTERM, then SIGKILL; all at once), then the servers."""
        stopping = [
            threading.Thread(
                target=_close_quietly, args=(worker,), name=f"stop-{worker.worker_name}"
            )
            for worker in self.workers
        ]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        for server in (self.artifacts, self.execution, self.redis):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- using it

    @property
    def artifacts_url(self) -> str:
        return (self.artifacts or self.execution).url

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
            AssertionError: the output is not JSON (with stderr and the workers' logs).
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
        """Every worker's log tail, for assertion messages."""
        return "\n".join(
            f"--- worker {w.worker_name} ({w.log_path}):\n{w.log_tail(lines)}" for w in self.workers
        )

    # ----------------------------------------------------------------- private

    def _base_env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("REMEX_") and key not in ("CELERY_CONFIG_MODULE",)
        }
        env.update(
            REMEX_CONFIG=str(self._empty_config),
            # No embedded stack (remex up) of the user's either.
            REMEX_STACK_DIR=str(self.workdir / "no-embedded-stack"),
            REMEX_BROKER_URL=self.redis.url,
            REMEX_EXECUTION_URL=self.execution.url,
            REMEX_ARTIFACTS_URL=self.artifacts_url,
            REMEX_HEARTBEAT_TIMEOUT=str(self.heartbeat_timeout),
            REMEX_RECONCILE_INTERVAL=str(self.reconcile_interval),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env
