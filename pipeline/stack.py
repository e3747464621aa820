"""The embedded stack: ``remex up`` / ``remex down`` on one machine.

``remex up`` starts, on loopback only, redis-server (broker and result
backend, AOF on), buildbox-casd (REAPI server with local execution, also the
artifact server), N ``remex worker`` processes, each with its own local
CAS, and with ``flower=True`` Flower (basic auth, persistent state). It
records them in a state folder (``stack.json``), which
:func:`pipeline.config.load_config` reads, so ``remex build`` and the other
commands find the stack with no configuration. ``remex down`` stops exactly
the processes recorded there, checking each PID still runs what was started.

The stack is its owner's alone (whoever can write to its Redis can run
builds and push artifacts): the state folder is mode 0700 and must belong to
the user; Redis requires a password made afresh on every ``up`` (kept in
``redis/password``, mode 0600, and named in ``stack.json``, itself 0600);
Redis's AOF is written with umask 077; buildbox-casd listens on a unix
socket in the folder (``casd.sock``), not on a TCP port. When that path is
too long for a unix socket (107 bytes), the socket goes into a private
folder of its own (mode 0700) under ``$XDG_RUNTIME_DIR`` or ``/tmp``, which
``stack.json`` records and ``remex down`` removes.

The processes are started by :class:`pipeline.servers.RemexStack` (the one
stack builder) in the embedded layout of :class:`EmbeddedStack`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.errors import ConfigError
from pipeline.servers.casd import MAX_SOCKET_PATH, buildbox_dir
from pipeline.servers.errors import ServerError
from pipeline.servers.flower import FLOWER_USER, FlowerServer, flower_password
from pipeline.servers.process import pid_alive, runs_program, stop_process_group, unmount_under
from pipeline.servers.redis import redis_url
from pipeline.servers.stack import RemexStack

__all__ = [
    "CASD_SOCKET",
    "FLOWER_USER",
    "REDIS_PASSWORD_FILE",
    "STATE_FILE",
    "EmbeddedStack",
    "FlowerServer",
    "Stack",
    "casd_socket_path",
    "check_tools",
    "down",
    "flower_password",
    "read_stack",
    "stack_broker_url",
    "stack_dir",
    "up",
]

STATE_FILE = "stack.json"
#: buildbox-casd's socket, in the state folder.
CASD_SOCKET = "casd.sock"
#: Redis's password, below the state folder (mode 0600).
REDIS_PASSWORD_FILE = "redis/password"

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


def stack_broker_url(state: Mapping[str, Any]) -> str:
    """The broker URL of a recorded stack, with its Redis password (read
    from the file ``stack.json`` names).

    Raises:
        ConfigError: the password file cannot be read (it is the owner's alone).
    """
    redis = state["redis"]
    url = str(redis["url"])
    if not redis.get("password_file"):
        return url  # a stack from before passwords, or one without
    path = Path(redis["password_file"])
    try:
        password = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the stack's Redis password: {exc}") from exc
    return redis_url(str(redis["address"]), password)


def casd_socket_path(
    folder: Path, *, runtime_dir: str | None = None, fallback: str = "/tmp"
) -> tuple[Path, Path | None]:
    """Where buildbox-casd's unix socket goes: ``folder/casd.sock``, or, when
    that is longer than a unix socket path may be, ``casd.sock`` in a new
    private folder (mode 0700, made by :func:`tempfile.mkdtemp`) under
    ``runtime_dir`` (``$XDG_RUNTIME_DIR``) or ``fallback`` (``/tmp``).

    Returns:
        (the socket path, the private folder made for it or None).

    Raises:
        ConfigError: no place gives a path short enough.
    """
    path = folder.absolute() / CASD_SOCKET
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path, None
    for base in (runtime_dir, fallback):
        if not base or _private_socket_length(base) > MAX_SOCKET_PATH:
            continue
        private = Path(tempfile.mkdtemp(prefix=_PRIVATE_PREFIX, dir=base))
        return private / CASD_SOCKET, private
    raise ConfigError(
        f"{path} is longer than a unix socket path may be ({MAX_SOCKET_PATH} bytes); "
        "set REMEX_STACK_DIR to a shorter folder"
    )


_PRIVATE_PREFIX = "remex-"
_MKDTEMP_NAME_LENGTH = 8
"""How many characters mkdtemp adds after the prefix."""


def _private_socket_length(base: str) -> int:
    """The length in bytes of the socket path in a private folder made under ``base``."""
    folder = len(os.fsencode(_PRIVATE_PREFIX)) + _MKDTEMP_NAME_LENGTH
    return len(os.fsencode(Path(base))) + 1 + folder + 1 + len(os.fsencode(CASD_SOCKET))


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
        """The broker URL without the password (to show)."""
        return str(self.state["redis"]["url"])

    @property
    def redis_password_file(self) -> str | None:
        """The file holding Redis's password (mode 0600)."""
        entry = self.state["redis"].get("password_file")
        return str(entry) if entry else None

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
        redis_password: str | None = None,
        casd_socket: Path | None = None,
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
            redis_password=redis_password,
            execution_socket=casd_socket,
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

    The folder is made private first (see the module docstring): Redis gets
    a new random password, buildbox-casd a unix socket.

    Raises:
        ConfigError: a stack is already up here, a system tool is missing,
            or the folder belongs to another user.
        ServerError: a server did not start (the message has its log's tail).
    """
    check_tools()
    if flower and importlib.util.find_spec("flower") is None:
        raise ConfigError("Flower is not installed: pip install 'flower>=2.0,<3'")
    current = read_stack(folder)
    if current is not None and any(pid_alive(p) for p in _recorded(current)):
        raise ConfigError(f"a remex stack is already up ({folder / STATE_FILE}); run 'remex down'")
    _make_private(folder)
    password_file = folder / REDIS_PASSWORD_FILE
    password = secrets.token_urlsafe(24)
    _write_private(password_file, password + "\n")
    socket_path, socket_dir = casd_socket_path(
        folder, runtime_dir=os.environ.get("XDG_RUNTIME_DIR")
    )
    try:
        stack = EmbeddedStack(
            folder,
            workers=workers,
            jobs=jobs,
            concurrency=concurrency,
            flower=flower,
            redis_password=password,
            casd_socket=socket_path,
            worker_env=worker_env,
        ).start()
    except BaseException:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    # Started and healthy: from now on `remex down` stops them, by PID.
    stack.detach()
    casd = stack.execution
    state: dict[str, Any] = {
        "created": time.time(),
        "redis": {
            # The password is not written here: clients read password_file.
            "url": stack.redis.public_url,
            "address": stack.redis.address,
            "password_file": str(password_file),
            "pid": stack.redis.pid,
            "cmd": "redis-server",
        },
        "casd": {
            "url": casd.url,
            "socket": str(socket_path),
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
    if socket_dir is not None:
        state["casd"]["socket_dir"] = str(socket_dir)
    _write_private(folder / STATE_FILE, json.dumps(state, indent=2))
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
    if state.get("casd", {}).get("socket_dir"):
        shutil.rmtree(state["casd"]["socket_dir"], ignore_errors=True)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return stopped


def _make_private(folder: Path) -> None:
    """Create ``folder`` (mode 0700) or check that it is the user's own, and
    take group and other permissions off it and off what the servers keep in
    it (an older stack's AOF may be 0644).

    Raises:
        ConfigError: it belongs to another user, or is not a folder.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.lstat()
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise ConfigError(f"{folder}: the stack folder must be a folder, not a link or a file")
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"{folder}: the stack folder belongs to uid {info.st_uid}, not to you "
            f"(uid {os.getuid()}); set REMEX_STACK_DIR to a folder of your own"
        )
    os.chmod(folder, 0o700)
    for sub in ("redis", "flower"):
        for root, dirs, files in os.walk(folder / sub):
            for name in [*dirs, *files]:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, os.lstat(path).st_mode & 0o700)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable and writable by the owner only
    (from the first byte: the file is created 0600, an old one is fixed first)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)
        out.write(text)


def _recorded(state: dict[str, Any]) -> list[int]:
    pids = [
        state.get("redis", {}).get("pid"),
        state.get("casd", {}).get("pid"),
        (state.get("flower") or {}).get("pid"),
    ]
    pids += [w.get("pid") for w in state.get("workers", [])]
    return [int(p) for p in pids if p]
