"""Reading a local git repository: plain ``git`` commands and one ``cat-file --batch``.

Every command runs with ``--no-replace-objects`` and a clean environment, so
what is read is the repository's own objects, whatever the caller's git
settings or hook environment.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.errors import LoadError
from pipeline.elements.staging import UnsafeArchiveError, store_stream

__all__ = ["GitError", "git", "git_path", "read_git_blobs", "stderr_of"]

# git blobs up to this size are also kept in memory: symlink targets are read
# from them (a target longer than PATH_MAX is refused anyway).
_SMALL_BLOB = 4096


class GitError(Exception):
    """``git cat-file --batch`` failed or answered something unexpected."""


def git(repo: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``git -C repo ARGS`` (``stdin`` on its standard input); the result
    is returned whatever its exit code.

    Raises:
        LoadError: git cannot be run at all.
    """
    try:
        return subprocess.run(
            ["git", "--no-replace-objects", "-C", str(repo), *args],
            input=stdin,
            capture_output=True,
            env=_git_env(repo),
            check=False,
        )
    except OSError as exc:
        raise LoadError(f"cannot run git: {exc.strerror}") from exc


def stderr_of(result: subprocess.CompletedProcess[bytes]) -> str:
    """What a failed git command said, for messages."""
    return result.stderr.decode("utf-8", "replace").strip() or f"exit code {result.returncode}"


def git_path(path: str) -> list[str]:
    """A tree entry's path as its parts.

    Raises:
        UnsafeArchiveError: an empty, ``.`` or ``..`` part, or a NUL.
    """
    parts = path.split("/")
    if any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise UnsafeArchiveError(f"git tree has an unsafe path {path!r}")
    return parts


def read_git_blobs(
    repo: Path, oids: list[str], cas: LocalCas
) -> dict[str, tuple[Digest, bytes | None]]:
    """Each blob's digest in ``cas`` and, for small blobs, its bytes (symlink targets).

    Everything is read through one ``git cat-file --batch``: the ids are fed
    by a thread while the answers are read here, so neither pipe can fill up.

    Raises:
        GitError: git failed or its output was not what was asked for.
    """
    unique = list(dict.fromkeys(oids))
    result: dict[str, tuple[Digest, bytes | None]] = {}
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            ["git", "--no-replace-objects", "-C", str(repo), "cat-file", "--batch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=_git_env(repo),
        )
        assert proc.stdin is not None and proc.stdout is not None
        feeder = threading.Thread(target=_feed, args=(proc.stdin, unique), daemon=True)
        feeder.start()
        try:
            for oid, size in _batch_headers(proc.stdout, len(unique)):
                if size <= _SMALL_BLOB:
                    data = proc.stdout.read(size)
                    if len(data) != size:
                        raise GitError("output ended inside a blob")
                    result[oid] = (cas.put(data), data)
                else:
                    result[oid] = (store_stream(cas, proc.stdout, size), None)
                if proc.stdout.read(1) != b"\n":
                    raise GitError("malformed output")
        finally:
            proc.stdout.close()
            code = proc.wait()
            feeder.join()
        if code != 0:
            errors.seek(0)
            raise GitError(errors.read().decode("utf-8", "replace").strip() or f"exit {code}")
    return result


def _git_env(repo: Path) -> dict[str, str]:
    # GIT_DIR and friends (set when running inside a git hook) would override -C;
    # the ceiling stops a plain folder inside some other repository from
    # passing for a repository.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_CEILING_DIRECTORIES"] = str(repo.resolve().parent)
    return env


def _feed(stdin: IO[bytes], oids: list[str]) -> None:
    try:
        for oid in oids:
            stdin.write(oid.encode() + b"\n")
        stdin.close()
    except OSError:
        pass  # git died; its exit code tells the reader


def _batch_headers(stdout: IO[bytes], count: int) -> Iterator[tuple[str, int]]:
    for _ in range(count):
        header = stdout.readline().decode("ascii", "replace").split()
        if len(header) != 3 or header[1] != "blob" or not header[2].isdigit():
            raise GitError(f"unexpected answer {' '.join(header)!r}")
        yield header[0], int(header[2])
