"""The embedded stack: ``remex up`` / ``remex down`` on one machine.

``remex up`` starts, on loopback only, redis-server (broker and result
backend, AOF on), buildbox-casd (REAPI server with local execution, also the
artifact server), N ``remex worker`` processes, each with its own local
CAS, and with ``flower=True`` Flower (basic auth, persistent state). It
records them in a state folder (``stack.json``), which
:func:`pipeline.config.load_config` reads, so ``remex build`` and the other
commands find the stack with no configuration. ``remex down`` stops exactly
the processes recorded there, checking each PID still runs what was started.

The processes are started by :class:`pipeline.servers.RemexStack` (the one
stack builder) in the embedded layout of :class:`EmbeddedStack`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.errors import ConfigError
from pipeline.servers.casd import buildbox_dir
from pipeline.servers.errors import ServerError
from pipeline.servers.flower import FLOWER_USER, FlowerServer, flower_password
from pipeline.servers.process import pid_alive, runs_program, stop_process_group, unmount_under
from pipeline.servers.stack import RemexStack

__all__ = [
    "FLOWER_USER",
    "STATE_FILE",
    "EmbeddedStack",
    "FlowerServer",
    "Stack",
    "check_tools",
    "down",
    "flower_password",
    "read_stack",
    "stack_dir",
    "up",
]

STATE_FILE = "stack.json"

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


class EmbeddedStack(RemexStack):
    """The layout of ``remex up``: ``redis/`` (AOF on), ``casd/`` (execution
    and artifacts), ``flower/``, workers ``embedded-0`` ... in folders of
    those names; the user's environment is kept (minus any artifact server),
    with an empty config, and the workers' timings are the production ones."""

    dirs: ClassVar[Mapping[str, str]] = {**RemexStack.dirs, "execution": "casd"}

    def __init__(
        self,
        folder: Path,
        *,
        workers: int,
        jobs: int,
        concurrency: int,
        flower: bool,
        worker_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            folder,
            workers=workers,
            concurrency=concurrency,
            jobs=jobs,
            separate_artifacts=False,
            flower=flower,
            flower_password=flower_password(folder) if flower else None,
            persistent_redis=True,
            heartbeat_timeout=None,
            reconcile_interval=None,
            extra_env=worker_env,
        )

    def worker_name(self, index: int) -> str:
        return f"embedded-{index}"

    def worker_dir(self, name: str) -> Path:
        return self.workdir / name

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The execution casd is also the artifact server (the config's default).
        env.pop("REMEX_ARTIFACTS_URL", None)
        # Each worker has a local CAS of its own (in its folder), never a shared one.
        env.pop("REMEX_CAS_DIR", None)
        env.update(self._server_env(), REMEX_CONFIG=os.devnull)
        env.update(self.extra_env)  # the user's local CAS settings (see up())
        return env


def up(
    folder: Path,
    *,
    workers: int = 2,
    jobs: int = 4,
    concurrency: int = 4,
    flower: bool = False,
    worker_env: Mapping[str, str] | None = None,
) -> Stack:
    """Start the embedded stack and record it; return once everything answers.

    ``worker_env`` is added to the workers' environment (the user's
    ``REMEX_CAS_QUOTA`` and ``REMEX_CAS_DIR``, see ``remex up``).

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
    if current is not None and any(pid_alive(p) for p in _recorded(current)):
        raise ConfigError(f"a remex stack is already up ({folder / STATE_FILE}); run 'remex down'")
    folder.mkdir(parents=True, exist_ok=True)
    stack = EmbeddedStack(
        folder,
        workers=workers,
        jobs=jobs,
        concurrency=concurrency,
        flower=flower,
        worker_env=worker_env,
    ).start()
    # Started and healthy: from now on `remex down` stops them, by PID.
    stack.detach()
    casd = stack.execution
    state: dict[str, Any] = {
        "created": time.time(),
        "redis": {"url": stack.redis.url, "pid": stack.redis.pid, "cmd": "redis-server"},
        "casd": {
            "url": casd.url,
            "pid": casd.pid,
            "cmd": "buildbox-casd",
            "workdir": str(casd.workdir),
        },
        "workers": [
            {"name": w.worker_name, "pid": w.pid, "log": str(w.log_path), "cmd": "remex"}
            for w in stack.workers
        ],
    }
    if stack.flower is not None:
        state["flower"] = {
            "name": "flower",
            "url": stack.flower.url,
            "pid": stack.flower.pid,
            "cmd": "celery",
            "user": FLOWER_USER,
            "password_file": str(folder / "flower" / "password"),
            "db": str(stack.flower.db_path),
            "log": str(stack.flower.log_path),
        }
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
        if pid and runs_program(int(pid), cmd):
            stop_process_group(int(pid))
            stopped.append(f"{entry.get('name') or cmd} (pid {pid})")
    if state.get("casd", {}).get("workdir"):
        unmount_under(Path(state["casd"]["workdir"]))
    (folder / STATE_FILE).unlink(missing_ok=True)
    return stopped


def _recorded(state: dict[str, Any]) -> list[int]:
    pids = [
        state.get("redis", {}).get("pid"),
        state.get("casd", {}).get("pid"),
        (state.get("flower") or {}).get("pid"),
    ]
    pids += [w.get("pid") for w in state.get("workers", [])]
    return [int(p) for p in pids if p]
