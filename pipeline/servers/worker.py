"""``remex worker`` (a Celery worker, thread pool) as a managed process.

:class:`RemexWorker` runs ``remex worker --name NAME -c N`` (the console script
next to the running interpreter) in a session of its own, its output in
``workdir/worker.log``, its local CAS in ``workdir/cas``; ``start()`` returns
once the worker answers a Celery control ping. ``stop()`` is SIGTERM then
SIGKILL, ``kill()`` SIGKILL at once (the worker uses the thread pool: one
process), both by PID with its process tree.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.servers.base import Server, remex_program

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["RemexWorker"]


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
        # Imported when a worker is made (in the thread that makes the stack),
        # not in ping(): workers start in parallel threads, and two threads
        # importing celery at once can see it half initialized. Not at the
        # top: `remex status` reads the stack's settings through this package.
        from celery import Celery

        self._celery: type[Celery] = Celery
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

    def ping(self, timeout: float = 0.5) -> bool:
        """True if the worker answers a Celery control ping within ``timeout`` s."""
        app = self._celery("remex-test-ping", broker=self.env["REMEX_BROKER_URL"])
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
