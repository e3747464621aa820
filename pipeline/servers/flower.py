"""Flower, the Celery task monitor, watching the broker of a stack."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from pipeline.servers.base import HOST, Server

__all__ = ["FLOWER_USER", "FlowerServer", "flower_password"]

FLOWER_USER = "remex"
# Flower writes its state (tasks, workers) to its database this often, not
# only at a clean exit, so a killed Flower loses a minute at most.
FLOWER_SAVE_INTERVAL_MS = 60_000
# The tasks page's columns: ``args`` shows "<element> [build <id>, attempt N]".
FLOWER_TASKS_COLUMNS = "name,args,state,received,runtime,worker"


class FlowerServer(Server):
    """Flower (``celery -A tasks.app flower``) on ``http://127.0.0.1:PORT``,
    watching the broker ``broker_url``: basic auth as ``user``/``password``
    (passed in the environment, not on the command line; ``/metrics`` needs
    it too, see :mod:`tasks.flower`), its state in
    ``workdir/flower.db`` (persistent across restarts), its log in
    ``workdir/flower.log``. Healthy once ``/healthcheck`` answers ``OK``.
    """

    name = "flower"
    scheme = "http"
    start_timeout = 60.0
    probe_timeout = 2.0
    umask = 0o077  # flower.db holds every task's arguments and results

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        broker_url: str,
        user: str,
        password: str,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.broker_url = broker_url
        self.user = user
        self.password = password
        self.env = dict(os.environ if env is None else env)
        self.db_path = self.workdir / "flower.db"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _launch(self) -> None:
        env = {k: v for k, v in self.env.items() if not k.startswith("FLOWER_")}
        env.update(
            {
                "REMEX_BROKER_URL": self.broker_url,
                "FLOWER_BASIC_AUTH": f"{self.user}:{self.password}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self._popen(
            [
                sys.executable, "-m", "celery", "-A", "tasks.app", "flower",
                f"--address={HOST}",
                f"--port={self.port}",
                "--persistent=True",
                f"--db={self.db_path}",
                f"--state_save_interval={FLOWER_SAVE_INTERVAL_MS}",
                f"--tasks_columns={FLOWER_TASKS_COLUMNS}",
            ],
            env,
        )  # fmt: skip

    def _probe(self, timeout: float) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=timeout) as answer:
                return bool(answer.read().strip() == b"OK")
        except (OSError, urllib.error.URLError):
            return False


def flower_password(folder: Path) -> str:
    """The Flower password of the stack in ``folder``: made on first use
    (random, 128 bits) and kept in ``folder/flower/password`` (mode 0600), so
    it stays the same across ``remex up`` and a bookmarked login keeps working."""
    path = folder / "flower" / "password"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    if not password:
        password = secrets.token_urlsafe(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(password + "\n")
    return password
