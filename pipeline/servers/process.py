"""Processes on this machine, by PID: alive or not, process trees, killing a
tree, mounts left behind, log tails.

Shared by the server launchers of this package, ``remex down``
(:mod:`pipeline.stack`) and ``remex bot``'s runners, so a process tree is
found and killed the same way everywhere. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

from pipeline.servers.errors import ServerError

__all__ = [
    "ProcStat",
    "kill_process_tree",
    "listening_inodes",
    "lower_cpu_priority",
    "mounts_under",
    "pid_alive",
    "proc_stat",
    "process_tree",
    "runs_program",
    "socket_inodes",
    "stop_process_group",
    "tail",
    "tcp_accepts",
    "unmount_under",
    "wait_until",
]

LOG_TAIL_LINES = 40
LOG_HEAD_LINES = 6


class ProcStat:
    """The fields of /proc/PID/stat this module uses."""

    __slots__ = ("pgrp", "ppid", "starttime", "state")

    def __init__(self, state: str, ppid: int, pgrp: int, starttime: int) -> None:
        self.state, self.ppid, self.pgrp, self.starttime = state, ppid, pgrp, starttime

    @property
    def dead(self) -> bool:
        """A zombie (exited, not reaped) or dead process."""
        return self.state in ("Z", "X")


def proc_stat(pid: int) -> ProcStat | None:
    """State, ppid, process group and start time of ``pid``, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return ProcStat(fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def _all_stats() -> dict[int, ProcStat]:
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                stats[int(entry)] = stat
    return stats


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = proc_stat(pid)
    return stat is not None and not stat.dead


def runs_program(pid: int, program: str) -> bool:
    """True when ``pid`` is alive and its command line names ``program``
    (a recycled PID running something else is never signalled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(program.encode() in part for part in cmdline[:3])


def process_tree(pid: int, pgid: int | None) -> dict[int, int]:
    """{pid: start time} of ``pid``, its live descendants and the members of
    process group ``pgid`` (buildbox-run puts itself in a group of its own)."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for child, child_stat in stats.items():
        children.setdefault(child_stat.ppid, []).append(child)
    found: dict[int, int] = {}
    todo = [pid]
    todo += [p for p, member in stats.items() if pgid is not None and member.pgrp == pgid]
    while todo:
        current = todo.pop()
        st = stats.get(current)
        if current in found or st is None or st.dead:
            continue
        found[current] = st.starttime
        todo += children.get(current, [])
    return found


def kill_process_tree(
    pid: int, pgid: int | None = None, *, known: Mapping[int, int] | None = None
) -> None:
    """SIGKILL ``pid``, its descendants, the members of process group ``pgid``
    and the ``known`` processes ({pid: start time}, found earlier), and wait
    until they are gone. A PID reused by another process is never signalled."""
    tree = dict(known or {})
    for _ in range(3):
        if pid_alive(pid):
            tree.update(process_tree(pid, pgid))
        if pgid is not None:
            tree.update(process_tree(pgid, pgid))
        left = {p: t for p, t in tree.items() if _same_process(p, t)}
        if not left:
            return
        for member, starttime in left.items():
            if _same_process(member, starttime):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
        wait_until(partial(_none_alive, left), 10)


def stop_process_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group ``pid`` leads, wait up to ``grace`` s, then
    SIGKILL what is left of its tree (buildbox-run puts itself in a group of
    its own, so the group alone is not enough)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), grace)
    kill_process_tree(pid, pid)


def _none_alive(processes: Mapping[int, int]) -> bool:
    return not any(_same_process(pid, start) for pid, start in processes.items())


def _same_process(pid: int, starttime: int) -> bool:
    """True if ``pid`` is still the live process that started at ``starttime``."""
    st = proc_stat(pid)
    return st is not None and not st.dead and st.starttime == starttime


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` s passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------- sockets


def listening_inodes(port: int) -> set[int]:
    """Socket inodes of every TCP socket listening on ``port`` (any address)."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(int(inode))
    return inodes


def socket_inodes(pids: Sequence[int]) -> set[int]:
    """Inodes of the sockets the processes ``pids`` hold open."""
    inodes: set[int] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def tcp_accepts(host: str, port: int, timeout: float = 0.25) -> bool:
    """True if a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- mounts


def _unescape_mount_path(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts_under(root: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mounts), deepest first."""
    base = os.path.realpath(root)
    found = []
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 2:
            continue
        mount_point = _unescape_mount_path(fields[1])
        if mount_point == base or mount_point.startswith(base.rstrip("/") + "/"):
            found.append(mount_point)
    return sorted(set(found), key=lambda p: (p.count("/"), len(p)), reverse=True)


def unmount_under(root: str | os.PathLike[str], attempts: int = 5) -> None:
    """Unmount everything mounted at or below ``root``, deepest first.

    buildbox-casd (as root) stages inputs through buildbox-fuse mounts under its
    cache folder; a killed casd leaves them behind, and removing the folder
    while they are mounted fails (or worse, walks into them).  Uses
    ``fusermount3 -u -z`` / ``fusermount -u -z`` when available, else
    ``umount -l``.

    Raises:
        ServerError: something stays mounted.
    """
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    umount = shutil.which("umount")
    for _ in range(attempts):
        mounts = mounts_under(root)
        if not mounts:
            return
        for mount_point in mounts:
            commands: list[list[str]] = []
            if fusermount:
                commands.append([fusermount, "-u", "-z", mount_point])
            if umount:
                commands.append([umount, "-l", mount_point])
            for command in commands:
                result = subprocess.run(command, capture_output=True, check=False)
                if result.returncode == 0:
                    break
        time.sleep(0.1)
    left = mounts_under(root)
    if left:
        raise ServerError(f"could not unmount {left} (left by a stopped server)")


# --------------------------------------------------------------------------- priority

#: How long :func:`lower_cpu_priority` retries a refused autogroup write:
#: Linux takes one such write a tenth of a second from a process without
#: CAP_SYS_ADMIN (EAGAIN meanwhile), and a stack starts its workers at once.
AUTOGROUP_RETRY_SECONDS = 3.0


def lower_cpu_priority(nice: int, *, autogroup: Path = Path("/proc/self/autogroup")) -> bool:
    """Run this process at ``nice`` (0-19, as nice(1)): its threads made from
    now on and its children inherit it. Call it before making any thread.

    Under Linux's autogroup scheduling (``kernel.sched_autogroup_enabled``)
    the CPU is shared between sessions first, and a nice value only counts
    within its session. So a process that leads its own session (as a stack
    starts its workers) also sets its session's autogroup nice; else the
    executor's sandboxes, all in buildbox-casd's one session, would weigh as
    much as each single worker. A process in someone else's session (a
    worker started from a shell) leaves that session's autogroup alone.

    Returns whether this session's autogroup now runs at ``nice`` (or a
    lower priority).

    Raises:
        ValueError: ``nice`` is not within 0-19.
    """
    if not 0 <= nice <= 19:
        raise ValueError(f"nice must be within 0-19, not {nice}")
    if nice == 0:
        return False
    # (Only ever lower: raising a priority back takes privileges.)
    if os.getpriority(os.PRIO_PROCESS, 0) < nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    if os.getsid(0) != os.getpid():
        return False
    try:
        current = int(autogroup.read_text().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return False  # no autogroup scheduling in this kernel
    if current >= nice:
        return True
    deadline = time.monotonic() + AUTOGROUP_RETRY_SECONDS
    while True:
        try:
            autogroup.write_text(f"{nice}\n")
            return True
        except BlockingIOError:  # EAGAIN: another session's write was just now
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        except OSError:  # no autogroup here, or not allowed
            return False


# --------------------------------------------------------------------------- logs


def tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The log since ``offset``: its first lines (errors about the command line
    come before a usage text) and its last ``lines`` lines."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            offset = offset if offset <= size else 0
            f.seek(offset)
            head = f.read(4096).decode(errors="replace").splitlines()[:LOG_HEAD_LINES]
            f.seek(max(offset, size - 64 * 1024))
            all_lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log file)"
    if not all_lines:
        return "(log is empty)"
    if size - offset <= 64 * 1024 and len(all_lines) <= LOG_HEAD_LINES + lines:
        return "\n".join(all_lines)
    return "\n".join([*head, "[...]", *all_lines[-lines:]])
