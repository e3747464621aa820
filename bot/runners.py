"""Runners: how ``remex bot`` runs one leased action.

``buildbox-run`` (the default) is buildbox's bubblewrap runner: it runs the
command chrooted into the input root in a sandbox, honours
``Action.timeout``, and writes the ActionResult to a file. With the bot's
local CAS (a buildbox-casd proxying the server's CAS, see
:mod:`bot.localcas`) it has casd stage the input root and capture the
outputs, which casd uploads; without it (``--disable-localcas``) it fetches
the input root whole from the server itself and uploads the outputs.

``host`` fetches the input root into a temporary folder and runs the command
there, directly on this machine: no sandbox, no chroot. The command sees the
host's whole filesystem and runs with the bot's own user. It is meant for
trusted actions only (tests, a private build farm of one's own projects):
never point a ``host`` bot at a server that accepts actions from others.

Both kill the whole process group of a run when the action's timeout passes
or the lease is cancelled.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from bot.errors import BadActionError, LeaseCancelled, MissingInputsError, RunnerError
from bot.localcas import buildbox_url
from pipeline.cas import LocalCas, checkout, import_directory, tree_digests, tree_message
from pipeline.digest import Digest, digest_to_str
from pipeline.errors import BlobNotFoundError, LocalCasError, RemexError
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.servers.process import kill_process_tree
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

__all__ = [
    "BuildboxRunner",
    "HostRunner",
    "RunOutcome",
    "RunRequest",
    "Runner",
    "find_missing_inputs",
]

BUILDBOX_TIMEOUT_EXIT = 142
"""buildbox-run's exit code when it killed the command at ``Action.timeout``."""

STAGING_ALLOWANCE = 300.0
"""Seconds buildbox-run may spend fetching inputs and uploading outputs on top
of the action's own timeout before the bot kills it (its timeout covers the
command only)."""

# buildbox-run's words for platform properties it cannot honour.
_UNSUPPORTED = re.compile(r'Unsupported (?:ISA|OSFamily|capability) "')

POLL_INTERVAL = 0.05
"""Seconds between checks of a run's cancel event and deadline. The run's
exit itself is seen at once where a pidfd can be opened (Linux >= 5.3);
elsewhere it is polled at this interval too."""
LOG_TAIL_BYTES = 4000


@dataclass(frozen=True)
class RunRequest:
    """One action to run.

    Attributes:
        action: the Action (from the lease).
        workdir: an empty folder of this run's own, removed after it.
        cancel: set when the run must stop at once (lease cancelled or
            given back); the runner then raises :class:`LeaseCancelled`.
    """

    action: re_pb2.Action
    workdir: Path
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class RunOutcome:
    """What a run produced: the ActionResult (logs and outputs already in the
    server's CAS), and whether the command was killed at its timeout."""

    result: re_pb2.ActionResult
    timed_out: bool = False


class Runner(Protocol):
    """Runs actions; one runner serves all the bot's leases, from several threads."""

    name: str

    def run(self, request: RunRequest) -> RunOutcome:
        """Run ``request.action`` to its end.

        Raises:
            MissingInputsError: the server's CAS lacks inputs.
            BadActionError: the action cannot run as given.
            LeaseCancelled: ``request.cancel`` was set.
            RunnerError, RemexError: the runner (not the command) failed.
        """
        ...


def timeout_seconds(action: re_pb2.Action) -> float | None:
    """``Action.timeout`` in seconds, or None when the action has none."""
    if not action.HasField("timeout"):
        return None
    seconds = action.timeout.seconds + action.timeout.nanos / 1e9
    return seconds if seconds > 0 else None


def find_missing_inputs(cas: CasClient, action: re_pb2.Action) -> list[str]:
    """The ``hash/size`` of the action's inputs the server lacks (empty: none lacks).

    When a folder below the input root is missing its digest is not known
    (GetTree just fails), so the root stands for it: the client uploads the
    whole tree again either way.
    """
    root = action.input_root_digest
    missing = cas.find_missing([action.command_digest, root])
    if missing:
        return [digest_to_str(d) for d in missing]
    try:
        directories = cas.get_tree(root)
    except BlobNotFoundError:
        return [digest_to_str(root)]
    files = [f.digest for d in directories for f in d.files]
    return [digest_to_str(d) for d in cas.find_missing(files)]


# --------------------------------------------------------------------------- processes


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``, its process group and every descendant (bwrap puts the
    sandboxed command in a session of its own), wait until they are gone, reap."""
    kill_process_tree(proc.pid, proc.pid)
    proc.wait()


def _wait(proc: subprocess.Popen[bytes], cancel: threading.Event, deadline: float | None) -> str:
    """Wait for ``proc``: ``"exited"``, or ``"cancelled"``/``"timeout"`` after killing it."""
    pidfd = _open_pidfd(proc.pid)
    try:
        while True:
            if proc.poll() is not None:
                # The leader is gone; helpers left in its group (bwrap) go too.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return "exited"
            if cancel.is_set():
                _kill_group(proc)
                return "cancelled"
            if deadline is not None and time.monotonic() >= deadline:
                _kill_group(proc)
                return "timeout"
            if pidfd is None:
                cancel.wait(POLL_INTERVAL)
            else:
                # Readable as soon as the process exits: a finished action is
                # reported at once, not up to a poll interval later (that
                # interval is a slot left idle, for every action).
                select.select([pidfd], [], [], POLL_INTERVAL)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid``, or None where the system has none (then ``_wait`` polls)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:  # ENOSYS on old kernels, EPERM under some seccomp filters
        return None
    return fd


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def remove_tree(path: Path) -> None:
    """Remove a run's folder even where the command made parts of it read-only."""

    def make_writable_and_retry(function: object, name: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            parent = os.path.dirname(name)
            os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, os.stat(name).st_mode | stat.S_IRWXU)
                shutil.rmtree(name, ignore_errors=True)
            else:
                os.unlink(name)

    if path.exists():
        shutil.rmtree(path, onerror=make_writable_and_retry)


# --------------------------------------------------------------------------- buildbox-run


class BuildboxRunner:
    """Runs actions with ``buildbox-run`` (bubblewrap), against the server's CAS.

    Args:
        program: the ``buildbox-run`` executable.
        endpoint: the server whose CAS holds the inputs (and gets the outputs).
        cas: a CAS client of that server (to name missing inputs on failure).
        local_cas: the bot's casd proxying that CAS (``unix:PATH``); None:
            buildbox-run talks to the server alone (``--disable-localcas``).
        extra_args: more ``buildbox-run`` options.
    """

    name = "buildbox-run"

    def __init__(
        self,
        program: str | os.PathLike[str],
        endpoint: Endpoint,
        cas: CasClient,
        *,
        local_cas: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.program = os.fspath(program)
        self.endpoint = endpoint
        self.cas = cas
        self.local_cas = local_cas
        self.extra_args = list(extra_args)

    def command_line(self, action_path: Path, result_path: Path) -> list[str]:
        """The buildbox-run command for one action file."""
        tail = [f"--action={action_path}", f"--action-result={result_path}", "--log-level=warning"]
        if self.local_cas is not None:
            # casd holds the server's instance, TLS files and token itself.
            return [self.program, f"--remote={self.local_cas}", *tail, *self.extra_args]
        endpoint = self.endpoint
        args = [
            self.program,
            f"--remote={buildbox_url(endpoint.url)}",
            "--disable-localcas",
            *tail,
        ]
        if endpoint.instance_name:
            args.append(f"--instance={endpoint.instance_name}")
        if endpoint.server_ca:
            args.append(f"--server-cert={endpoint.server_ca}")
        if endpoint.client_cert and endpoint.client_key:
            args += [f"--client-cert={endpoint.client_cert}", f"--client-key={endpoint.client_key}"]
        if endpoint.token_file:
            args.append(f"--access-token={endpoint.token_file}")
        return args + self.extra_args

    def run(self, request: RunRequest) -> RunOutcome:
        action_path = request.workdir / "action"
        result_path = request.workdir / "action-result"
        log_path = request.workdir / "buildbox-run.log"
        staging = request.workdir / "tmp"
        staging.mkdir()
        action_path.write_bytes(request.action.SerializeToString(deterministic=True))
        timeout = timeout_seconds(request.action)
        env = dict(os.environ, TMPDIR=str(staging))
        with log_path.open("wb") as log:
            try:
                proc = subprocess.Popen(
                    self.command_line(action_path, result_path),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=request.workdir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise RunnerError(f"cannot start {self.program}: {exc}") from exc
            deadline = None if timeout is None else time.monotonic() + timeout + STAGING_ALLOWANCE
            how = _wait(proc, request.cancel, deadline)
        if how == "cancelled":
            raise LeaseCancelled("cancelled while buildbox-run ran")
        if how == "timeout":
            # buildbox-run itself stops the command at the timeout; this is
            # staging or uploading that took far too long.
            return RunOutcome(re_pb2.ActionResult(exit_code=128 + signal.SIGKILL), timed_out=True)
        code = proc.returncode
        result = re_pb2.ActionResult()
        if code in (0, BUILDBOX_TIMEOUT_EXIT) and result_path.is_file():
            result.ParseFromString(result_path.read_bytes())
            return RunOutcome(result, timed_out=code == BUILDBOX_TIMEOUT_EXIT)
        missing = find_missing_inputs(self.cas, request.action)
        if missing:
            raise MissingInputsError(missing)
        tail = _tail(log_path)
        if _UNSUPPORTED.search(tail):
            # The action asks for what this sandbox cannot give: no retry helps.
            raise BadActionError(f"buildbox-run cannot run this action: {tail}")
        raise RunnerError(f"buildbox-run failed (exit code {code}): {tail}")


# --------------------------------------------------------------------------- host


class HostRunner:
    """Runs actions on the host, in a temporary folder holding the input root.

    UNSAFE for untrusted actions: there is no sandbox (see the module
    docstring). Inputs are fetched into ``local_cas`` (a cache shared by the
    bot's runs) and checked out safely; outputs are imported from the folder
    and uploaded to the server's CAS.
    """

    name = "host"

    def __init__(self, cas: CasClient, local_cas: LocalCas) -> None:
        self.cas = cas
        self.local_cas = local_cas

    def run(self, request: RunRequest) -> RunOutcome:
        action = request.action
        metadata = re_pb2.ExecutedActionMetadata()
        metadata.input_fetch_start_timestamp.CopyFrom(_now())
        try:
            command = self.cas.read_message(action.command_digest, re_pb2.Command)
            self.cas.fetch_tree(self.local_cas, action.input_root_digest)
        except BlobNotFoundError:
            raise MissingInputsError(find_missing_inputs(self.cas, action)) from None
        root = request.workdir / "root"
        checkout(self.local_cas, action.input_root_digest, root)
        cwd = _inside(
            root, command.working_directory, "working directory", last_may_be_symlink=False
        )
        cwd.mkdir(parents=True, exist_ok=True)
        outputs = _output_paths(command)
        for output in outputs:
            _inside(cwd, output, "output path").parent.mkdir(parents=True, exist_ok=True)
        metadata.input_fetch_completed_timestamp.CopyFrom(_now())
        if request.cancel.is_set():
            raise LeaseCancelled("cancelled before the command started")

        stdout_path = request.workdir / "stdout"
        stderr_path = request.workdir / "stderr"
        env = {v.name: v.value for v in command.environment_variables}
        timeout = timeout_seconds(action)
        metadata.execution_start_timestamp.CopyFrom(_now())
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            try:
                proc = subprocess.Popen(
                    list(command.arguments),
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                )
            except OSError as exc:
                # The command cannot be started (not found, not executable): its
                # failure, reported like a shell would.
                stderr.write(f"remex bot: cannot run {list(command.arguments)}: {exc}\n".encode())
                proc = None
            if proc is None:
                exit_code, how = 127, "exited"
            else:
                deadline = None if timeout is None else time.monotonic() + timeout
                how = _wait(proc, request.cancel, deadline)
                code = proc.returncode
                exit_code = code if code >= 0 else 128 - code
        metadata.execution_completed_timestamp.CopyFrom(_now())
        if how == "cancelled":
            raise LeaseCancelled("cancelled while the command ran")

        metadata.output_upload_start_timestamp.CopyFrom(_now())
        result = re_pb2.ActionResult(exit_code=exit_code)
        uploads: list[Digest] = []
        result.stdout_digest.CopyFrom(self.local_cas.put_file(stdout_path))
        result.stderr_digest.CopyFrom(self.local_cas.put_file(stderr_path))
        uploads += [result.stdout_digest, result.stderr_digest]
        if how != "timeout":
            legacy = not command.output_paths
            for output in outputs:
                uploads += self._collect(result, cwd, output, command, legacy=legacy)
        try:
            self.cas.upload_missing(self.local_cas, uploads)
        except RemexError as exc:
            raise RunnerError(f"cannot upload the outputs: {exc}") from exc
        metadata.output_upload_completed_timestamp.CopyFrom(_now())
        result.execution_metadata.CopyFrom(metadata)
        return RunOutcome(result, timed_out=how == "timeout")

    def _collect(
        self,
        result: re_pb2.ActionResult,
        cwd: Path,
        output: str,
        command: re_pb2.Command,
        *,
        legacy: bool,
    ) -> list[Digest]:
        """Add one output path to ``result``; return the blobs to upload."""
        path = _inside(cwd, output, "output path")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return []  # an output the command did not make is simply absent
        try:
            if stat.S_ISLNK(st.st_mode):
                symlink = re_pb2.OutputSymlink(path=output, target=os.readlink(path))
                if not legacy:
                    result.output_symlinks.append(symlink)
                elif output in command.output_directories:
                    result.output_directory_symlinks.append(symlink)
                else:
                    result.output_file_symlinks.append(symlink)
                return []
            if stat.S_ISDIR(st.st_mode):
                root = import_directory(self.local_cas, path)
                tree_digest = self.local_cas.put_message(tree_message(self.local_cas, root))
                result.output_directories.append(
                    re_pb2.OutputDirectory(
                        path=output, tree_digest=tree_digest, root_directory_digest=root
                    )
                )
                return [tree_digest, *tree_digests(self.local_cas, root)]
            if stat.S_ISREG(st.st_mode):
                digest = self.local_cas.put_file(path)
                result.output_files.append(
                    re_pb2.OutputFile(
                        path=output, digest=digest, is_executable=bool(st.st_mode & stat.S_IXUSR)
                    )
                )
                return [digest]
        except LocalCasError as exc:
            raise BadActionError(f"cannot capture output {output!r}: {exc}") from exc
        raise BadActionError(f"output {output!r} is a special file (socket, fifo, device)")


def _output_paths(command: re_pb2.Command) -> list[str]:
    if command.output_paths:
        return list(command.output_paths)
    return [*command.output_files, *command.output_directories]


def _inside(base: Path, relative: str, what: str, *, last_may_be_symlink: bool = True) -> Path:
    """``base/relative``, refusing paths that leave ``base`` or go through a symlink
    (the last component may be one when ``last_may_be_symlink``: an output symlink).

    Raises:
        BadActionError: ``relative`` is absolute, has ``..``, or crosses a symlink.
    """
    if not relative:
        return base
    normal = posixpath.normpath(relative)
    if relative.startswith("/") or normal == ".." or normal.startswith("../"):
        raise BadActionError(f"{what} {relative!r} leaves the input root")
    path = base
    parts = [p for p in normal.split("/") if p not in ("", ".")]
    for index, part in enumerate(parts):
        path = path / part
        last = index == len(parts) - 1
        if (not last or not last_may_be_symlink) and path.is_symlink():
            raise BadActionError(f"{what} {relative!r} goes through a symlink")
    return path
