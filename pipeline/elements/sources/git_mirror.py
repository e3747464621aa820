"""Bare git mirrors on a worker: fetched with the system ``git``, shared by fetches on a host.

A repository's mirror is ``CACHE/git/<sha256 of its URL>``, a bare repository
that only ever grows: fetches add objects, and every read names a commit by
its id, so readers need no lock. Writers (creating the mirror, fetching into
it) hold an ``flock`` on ``<mirror>.lock``, so two processes on a host never
fetch into the same mirror at once; the second one finds the commit there and
does not fetch at all.

Every command runs with a clean environment (no ``GIT_*`` of the caller), no
terminal prompt, ssh in batch mode, and a timeout; a fetch is cut when it
receives nothing for the read timeout (http.lowSpeedTime over http(s), a
watch of git's progress over git:// and ssh).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.elements.sources.base import NetworkSettings

__all__ = [
    "FetchFailed",
    "GitRemoteError",
    "fetch_all",
    "fetch_commit",
    "git_network_env",
    "has_commit",
    "mirror_path",
    "network_git",
    "redact",
    "resolve_relative_url",
]

# A whole fetch of a large repository can take a while; a stalled transfer
# is cut much earlier, after the read timeout (see _run_watched).
_FETCH_TIMEOUT = 3600.0
_CREDENTIALS_RE = re.compile(r"(?<=://)[^/@\s]*@")


class GitRemoteError(Exception):
    """A git command against a remote failed (the message has no credentials).

    Attributes:
        missing: every URL answered, and none had the commit (trying again
            later will not help).
    """

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class FetchFailed:
    """Why one candidate URL did not give the commit."""

    url: str
    reason: str

    def __str__(self) -> str:
        return f"{redact(self.url)}: {self.reason}"


def redact(url: str) -> str:
    """``url`` without a ``user:password@`` part (for messages and logs)."""
    return _CREDENTIALS_RE.sub("", url)


def mirror_path(cache_dir: Path, url: str) -> Path:
    """Where the bare mirror of ``url`` is kept under a fetch cache folder."""
    return cache_dir / "git" / hashlib.sha256(url.encode()).hexdigest()


def git_network_env() -> dict[str, str]:
    """The environment git runs with: the caller's minus ``GIT_*``, no prompts,
    ssh never asking anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
    env["GIT_ASKPASS"] = "true"
    return env


def network_git(
    cwd: Path,
    args: list[str],
    settings: NetworkSettings,
    *,
    timeout: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``git ARGS`` in ``cwd`` with the network settings; any exit code is returned.

    Args:
        progress: called with the bytes received so far, as ``git fetch
            --progress`` reports them (only for a fetch).

    Raises:
        GitRemoteError: git could not be run, or it ran past its timeout.
    """
    options = [
        "-c", "http.lowSpeedLimit=1",
        "-c", f"http.lowSpeedTime={max(1, int(settings.read_timeout))}",
        "-c", f"core.sshCommand=ssh -o BatchMode=yes -o ConnectTimeout="
              f"{max(1, int(settings.connect_timeout))}",
        "-c", "gc.auto=0",
    ]  # fmt: skip
    if settings.ca_bundle is not None:
        options += ["-c", f"http.sslCAInfo={settings.ca_bundle}"]
    command = ["git", "--no-replace-objects", *options, *args]
    limit = timeout if timeout is not None else _FETCH_TIMEOUT
    if args[:1] == ["fetch"]:
        command.insert(command.index("fetch") + 1, "--progress")
        # http(s) has http.lowSpeedTime. Over git:// and ssh, git has no
        # such limit; with --progress the server and git report as data
        # comes in, so silence there is a stall, cut after the read timeout
        # (else a server that stops answering holds the fetch for the hour).
        http = any(arg.startswith(("http://", "https://")) for arg in args)
        stall = limit if http else settings.read_timeout
        return _run_watched(command, cwd, limit, stall, progress)
    try:
        return subprocess.run(
            command, cwd=cwd, capture_output=True, env=git_network_env(), timeout=limit,
            check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise GitRemoteError(f"git {args[0]} timed out") from None
    except OSError as exc:
        raise GitRemoteError(f"cannot run git: {exc.strerror}") from exc


_RECEIVED_RE = re.compile(rb"Receiving objects: .*?([0-9.]+) (bytes|KiB|MiB|GiB)")
_UNITS = {b"bytes": 1, b"KiB": 1 << 10, b"MiB": 1 << 20, b"GiB": 1 << 30}


def _run_watched(
    command: list[str],
    cwd: Path,
    limit: float,
    stall: float,
    progress: Callable[[int], None] | None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a fetch with ``--progress``: killed when it runs past ``limit``
    seconds or says nothing for ``stall`` seconds; its progress lines become
    ``progress(bytes)`` calls.

    Returns:
        What git did; killed, its exit code is -9 and its stderr says why
        (the caller tries the next URL).

    Raises:
        GitRemoteError: git could not be run.
    """
    try:
        proc = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=git_network_env(),
        )  # fmt: skip
    except OSError as exc:
        raise GitRemoteError(f"cannot run git: {exc.strerror}") from exc
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    start = last = time.monotonic()
    killed = ""
    said = bytearray()
    pending = b""
    try:
        while True:
            now = time.monotonic()
            wait = min(start + limit, last + stall) - now
            readable = select.select([fd], [], [], max(0.0, wait))[0] if wait > 0 else []
            if not readable:
                killed = (
                    f"git fetch timed out after {limit:g} s"
                    if time.monotonic() - start >= limit
                    else f"git fetch stalled: nothing received for {stall:g} s"
                )
                proc.kill()
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            last = time.monotonic()
            said += chunk
            del said[: max(0, len(said) - 65536)]  # keep the end: the error is there
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            if progress is not None:
                for line in lines:
                    match = _RECEIVED_RE.search(line)
                    if match:
                        progress(int(float(match.group(1)) * _UNITS[match.group(2)]))
        code = proc.wait()
    finally:
        proc.stderr.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if killed:
        return subprocess.CompletedProcess(command, -9, b"", killed.encode())
    # Only the last state of each progress line matters in messages.
    text = re.sub(rb"[^\n]*\r", b"", bytes(said))
    return subprocess.CompletedProcess(command, code, b"", text)


def has_commit(mirror: Path, commit: str) -> bool:
    """Whether the bare repository ``mirror`` holds ``commit`` (as a commit)."""
    if not (mirror / "HEAD").is_file():
        return False
    result = subprocess.run(
        ["git", "--no-replace-objects", "--git-dir", str(mirror), "cat-file", "-e",
         f"{commit}^{{commit}}"],
        capture_output=True, env=git_network_env(), check=False,
    )  # fmt: skip
    return result.returncode == 0


def fetch_commit(
    cache_dir: Path,
    upstream: str,
    urls: list[str],
    commit: str,
    settings: NetworkSettings,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """The mirror of ``upstream`` holding ``commit``, fetched from ``urls`` if needed.

    The candidates are tried in order; the first that gives the commit wins.

    Raises:
        GitRemoteError: no candidate gave the commit; says what each one did.
    """
    mirror = mirror_path(cache_dir, upstream)
    if has_commit(mirror, commit):
        return mirror
    with _locked(mirror):
        if has_commit(mirror, commit):  # another process fetched it meanwhile
            return mirror
        _ensure_bare(mirror)
        failures: list[FetchFailed] = []
        for url in urls:
            reason = _fetch_into(mirror, url, commit, settings, progress)
            if reason is None:
                return mirror
            failures.append(FetchFailed(url, reason))
        raise GitRemoteError(
            "; ".join(str(f) for f in failures) or "no URL to fetch from",
            missing=bool(failures) and all(f.reason == _MISSING for f in failures),
        )


def fetch_all(cache_dir: Path, upstream: str, urls: list[str], settings: NetworkSettings) -> Path:
    """The mirror of ``upstream`` with every branch and tag fetched again (for tracking).

    Raises:
        GitRemoteError: no candidate could be fetched from.
    """
    mirror = mirror_path(cache_dir, upstream)
    with _locked(mirror):
        _ensure_bare(mirror)
        failures: list[FetchFailed] = []
        for url in urls:
            result = network_git(mirror, ["fetch", "--prune", url, *_ALL_REFS], settings)
            if result.returncode == 0:
                return mirror
            failures.append(FetchFailed(url, _said(result)))
        raise GitRemoteError("; ".join(str(f) for f in failures) or "no URL to fetch from")


def resolve_relative_url(base: str, relative: str) -> str:
    """A submodule URL ``./x`` or ``../x`` made absolute against its superproject's URL,
    as git does (each ``../`` drops one component of the superproject's URL)."""
    if not relative.startswith(("./", "../")):
        return relative
    base = base.rstrip("/")
    rest = relative
    while rest.startswith(("./", "../")):
        if rest.startswith("./"):
            rest = rest[2:]
            continue
        rest = rest[3:]
        scheme = base.find("://")
        floor = scheme + 3 if scheme >= 0 else 0
        cut = max(base.rfind("/"), base.rfind(":"))
        if cut < floor:  # nothing left to drop but the host (or a bare name)
            base = base[:floor] if scheme >= 0 else ""
            break
        base = base[:cut] if base[cut] == "/" else base[: cut + 1]
    if not base:
        return rest
    separator = "" if base.endswith((":", "/")) else "/"
    return f"{base}{separator}{rest}"


_MISSING = "the commit is not there"
_ALL_REFS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")


def _fetch_into(
    mirror: Path,
    url: str,
    commit: str,
    settings: NetworkSettings,
    progress: Callable[[int], None] | None,
) -> str | None:
    """Fetch from one URL until the commit is there; None on success, else why not."""
    before = _objects_size(mirror) if progress is not None else 0
    result = network_git(mirror, ["fetch", url, *_ALL_REFS], settings, progress=progress)
    if progress is not None:
        # git prints byte counts only on slow transfers: say what arrived.
        progress(_objects_size(mirror) - before)
    if result.returncode != 0:
        return _said(result)  # the server failed: asking again for one commit would too
    if has_commit(mirror, commit):
        return None
    # The commit may be on no branch or tag: ask for it by id (protocol v2
    # servers and uploadpack.allowReachableSHA1InWant allow that).
    direct = network_git(mirror, ["fetch", url, commit], settings, progress=progress)
    if direct.returncode == 0 and has_commit(mirror, commit):
        return None
    return _MISSING


def _objects_size(mirror: Path) -> int:
    total = 0
    for path in (mirror / "objects").rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _said(result: subprocess.CompletedProcess[bytes]) -> str:
    text = result.stderr.decode("utf-8", "replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return redact(" / ".join(lines[-3:])) if lines else f"git exit code {result.returncode}"


def _ensure_bare(mirror: Path) -> None:
    """Create the bare repository (atomically: a half-made one is never seen)."""
    if (mirror / "HEAD").is_file():
        return
    mirror.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".new-", dir=mirror.parent))
    result = subprocess.run(
        ["git", "init", "--quiet", "--bare", str(scratch)],
        capture_output=True, env=git_network_env(), check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise GitRemoteError(f"git init --bare failed: {_said(result)}")
    if mirror.exists():  # a leftover without HEAD: never a usable mirror
        shutil.rmtree(mirror, ignore_errors=True)
    os.rename(scratch, mirror)


@contextlib.contextmanager
def _locked(mirror: Path) -> Iterator[None]:
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{mirror}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
