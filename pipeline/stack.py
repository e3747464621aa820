"""The embedded stack: ``remex up`` / ``remex down`` on one machine.

``remex up`` starts, on loopback only, redis-server (broker and result
backend, AOF on), buildbox-casd (REAPI server with local execution, also the
artifact server), N ``remex worker`` processes, each with its own local
CAS, and with ``flower=True`` Flower (basic auth, persistent state). It
records them in a state folder (``stack.json``), which
:func:`pipeline.config.load_config` reads, so ``remex build`` and the other
commands find the stack with no configuration. ``remex down`` stops exactly
the processes recorded there, checking each PID still runs what was started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.servers import (
    HOST,
    CasdServer,
    RedisServer,
    Server,
    ServerError,
    buildbox_dir,
    kill_process_tree,
    unmount_under,
)

STATE_FILE = "stack.json"
WORKER_READY_TIMEOUT = 60.0
FLOWER_USER = "remex"
# Flower writes its state (tasks, workers) to its database this often, not
# only at a clean exit, so a killed Flower loses a minute at most.
FLOWER_SAVE_INTERVAL_MS = 60_000
# The tasks page's columns: ``args`` shows "<element> [build <id>, attempt N]".
FLOWER_TASKS_COLUMNS = "name,args,state,received,runtime,worker"

# What each program is and which Debian package brings it.
_TOOLS = {
    "redis-server": "redis-server",
    "bwrap": "bubblewrap",
}


def stack_dir(environ: dict[str, str] | None = None) -> Path:
    """Where the embedded stack keeps its state: ``REMEX_STACK_DIR`` or
    ``$XDG_STATE_HOME/remex/stack`` (``~/.local/state/remex/stack``)."""
    env = os.environ if environ is None else environ
    if env.get("REMEX_STACK_DIR"):
        return Path(env["REMEX_STACK_DIR"]).expanduser()
    state_home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "remex" / "stack"


def read_stack(folder: Path) -> dict[str, Any] | None:
    """The recorded stack, or None when none is up."""
    path = folder / STATE_FILE
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable stack state: {exc}") from exc


def check_tools() -> None:
    """Raise ConfigError with one sentence per missing system tool."""
    missing = [
        f"'{tool}' is not installed: install the Debian package {package} "
        f"(apt-get install {package})"
        for tool, package in _TOOLS.items()
        if shutil.which(tool) is None
    ]
    try:
        buildbox_dir()
    except ServerError as exc:
        missing.append(str(exc))
    if missing:
        raise ConfigError("; ".join(missing))


class FlowerServer(Server):
    """Flower (``celery -A tasks.app flower``) on ``http://127.0.0.1:PORT``,
    watching the broker ``broker_url``: basic auth as ``user``/``password``
    (passed in the environment, not on the command line), its state in
    ``workdir/flower.db`` (persistent across restarts), its log in
    ``workdir/flower.log``. Healthy once ``/healthcheck`` answers ``OK``.
    """

    name = "flower"
    scheme = "http"
    start_timeout = 60.0
    probe_timeout = 2.0

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


@dataclass
class Stack:
    """A running embedded stack (what ``stack.json`` records)."""

    folder: Path
    state: dict[str, Any]

    @property
    def broker_url(self) -> str:
        return str(self.state["redis"]["url"])

    @property
    def execution_url(self) -> str:
        return str(self.state["casd"]["url"])

    @property
    def flower(self) -> dict[str, Any] | None:
        """Flower's record (``url``, ``user``, ``password_file``, ``db``, ...),
        or None when the stack runs without Flower."""
        entry = self.state.get("flower")
        return dict(entry) if entry else None


def up(
    folder: Path,
    *,
    workers: int = 2,
    jobs: int = 4,
    concurrency: int = 4,
    flower: bool = False,
) -> Stack:
    """Start the embedded stack and record it; return once everything answers.

    With ``flower``, Flower starts before the workers (so it sees them come
    online) on a free loopback port, with basic auth (user ``remex``, the
    password from :func:`flower_password`) and persistent state.

    Raises:
        ConfigError: a stack is already up here, or a system tool is missing.
        ServerError: a server did not start (the message has its log's tail).
    """
    check_tools()
    if flower and importlib.util.find_spec("flower") is None:
        raise ConfigError("Flower is not installed: pip install 'flower>=2.0,<3'")
    current = read_stack(folder)
    if current is not None and any(_alive(p) for p in _recorded(current)):
        raise ConfigError(f"a remex stack is already up ({folder / STATE_FILE}); run 'remex down'")
    folder.mkdir(parents=True, exist_ok=True)
    started: list[tuple[int, str]] = []
    try:
        redis = RedisServer(folder / "redis", appendonly=True).start()
        started.append((redis.detach(), "redis-server"))
        casd = CasdServer(folder / "casd", jobs=jobs).start()
        started.append((casd.detach(), "buildbox-casd"))
        env = dict(os.environ)
        env.update(
            {
                "REMEX_BROKER_URL": redis.url,
                "REMEX_EXECUTION_URL": casd.url,
                "REMEX_CONFIG": os.devnull,
            }
        )
        env.pop("REMEX_ARTIFACTS_URL", None)
        flower_record: dict[str, Any] | None = None
        if flower:
            flower_server = FlowerServer(
                folder / "flower",
                broker_url=redis.url,
                user=FLOWER_USER,
                password=flower_password(folder),
                env=env,
            ).start()
            started.append((flower_server.detach(), "celery"))
            flower_record = {
                "name": "flower",
                "url": flower_server.url,
                "pid": started[-1][0],
                "cmd": "celery",
                "user": FLOWER_USER,
                "password_file": str(folder / "flower" / "password"),
                "db": str(flower_server.db_path),
                "log": str(flower_server.log_path),
            }
        worker_records: list[dict[str, Any]] = []
        for index in range(workers):
            name = f"embedded-{index}"
            wdir = folder / name
            wdir.mkdir(exist_ok=True)
            worker_env = dict(env, REMEX_CAS_DIR=str(wdir / "cas"))
            log_path = wdir / "worker.log"
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [_remex(), "worker", "--name", name, "--concurrency", str(concurrency)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=worker_env,
                    cwd=wdir,
                    start_new_session=True,
                )
            started.append((proc.pid, "remex"))
            worker_records.append({"name": name, "pid": proc.pid, "log": str(log_path)})
        for record in worker_records:
            _wait_worker_ready(Path(record["log"]), int(record["pid"]))
    except BaseException:
        for pid, _ in reversed(started):
            _stop_pid(pid)
        unmount_under(folder / "casd")
        raise
    state = {
        "created": time.time(),
        "redis": {"url": redis.url, "pid": started[0][0], "cmd": "redis-server"},
        "casd": {
            "url": casd.url,
            "pid": started[1][0],
            "cmd": "buildbox-casd",
            "workdir": str(casd.workdir),
        },
        "workers": [{**w, "cmd": "remex"} for w in worker_records],
    }
    if flower_record is not None:
        state["flower"] = flower_record
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
    return Stack(folder, state)


def down(folder: Path) -> list[str]:
    """Stop the processes recorded in ``folder``; return what was stopped."""
    state = read_stack(folder)
    if state is None:
        return []
    stopped = []
    entries = [
        *state.get("workers", []),
        state.get("flower") or {},
        state.get("casd", {}),
        state.get("redis", {}),
    ]
    for entry in entries:
        pid, cmd = entry.get("pid"), entry.get("cmd", "")
        if pid and _runs(int(pid), cmd):
            _stop_pid(int(pid))
            stopped.append(f"{entry.get('name') or cmd} (pid {pid})")
    if state.get("casd", {}).get("workdir"):
        unmount_under(Path(state["casd"]["workdir"]))
    (folder / STATE_FILE).unlink(missing_ok=True)
    return stopped


def _remex() -> str:
    found = Path(sys.executable).with_name("remex")
    return str(found) if found.exists() else (shutil.which("remex") or "remex")


def _recorded(state: dict[str, Any]) -> list[int]:
    pids = [
        state.get("redis", {}).get("pid"),
        state.get("casd", {}).get("pid"),
        (state.get("flower") or {}).get("pid"),
    ]
    pids += [w.get("pid") for w in state.get("workers", [])]
    return [int(p) for p in pids if p]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _runs(pid: int, program: str) -> bool:
    """True when ``pid`` is alive and its command line names ``program``
    (a recycled PID running something else is never signalled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(program.encode() in part for part in cmdline[:3])


def _stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group ``pid`` leads, wait up to ``grace`` s, then
    SIGKILL what is left of its tree (buildbox-run puts itself in a group of
    its own, so the group alone is not enough)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid) or _zombie(pid):
            break
        time.sleep(0.05)
    kill_process_tree(pid, pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _wait_worker_ready(log_path: Path, pid: int) -> None:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if " ready." in text:
            return
        if not _alive(pid) or _zombie(pid):
            raise ServerError(f"remex worker exited during start; log {log_path}:\n{text[-3000:]}")
        time.sleep(0.1)
    raise ServerError(f"remex worker not ready within {WORKER_READY_TIMEOUT:.0f} s; log {log_path}")
