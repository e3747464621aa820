"""Sources: ``local``, ``tar`` and ``git``, checked when loaded, staged into the local CAS.

Loading a source checks everything a build would trip over later: a local
path exists inside the project, a tarball's sha256 is its ref, a git commit
exists. Each source then gives a :meth:`Source.content_key` for its element's
cache key and can :meth:`Source.stage` its content as a Directory tree.

As in BuildStream, every string field but ``kind`` and ``directory`` has its
``%{variables}`` expanded, and a URL ``alias:rest`` is the project's alias
value followed by ``rest``. Only local files are fetched here: tarballs by
``file://`` URL, git repositories by path or ``file://`` URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import subprocess
import tarfile
import tempfile
import threading
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

from pipeline.cas import LocalCas, import_directory
from pipeline.digest import Digest, digest_to_str
from pipeline.elements.errors import LoadError, SourceError
from pipeline.elements.nodes import MappingNode, Mark, ScalarNode
from pipeline.elements.staging import (
    TreeBuilder,
    UnsafeArchiveError,
    store_stream,
    tree_from_tar,
)
from pipeline.elements.variables import Variables
from pipeline.errors import LocalCasError
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory, FileNode

__all__ = [
    "SOURCE_KINDS",
    "GitSource",
    "LocalSource",
    "Source",
    "TarSource",
    "load_source",
    "project_path",
    "resolve_alias",
]

_COMMON_KEYS = ("kind", "directory", "provenance")
# git blobs up to this size are also kept in memory: symlink targets are read
# from them (a target longer than PATH_MAX is refused anyway).
_SMALL_BLOB = 4096
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# A full commit id (SHA-1 or SHA-256 repositories), alone or at the end of
# BuildStream git's `git describe` form: `v1.2-3-g<commit>`.
_GIT_REF_RE = re.compile(r"(?:.*-g)?([0-9a-f]{40}|[0-9a-f]{64})")


class Source(ABC):
    """One source of an element.

    Attributes:
        kind: ``local``, ``tar`` or ``git``.
        directory: the sub-folder of the element's sources to stage it in ("" = top).
        mark: where the source is written; ``field`` its path (``sources[0]``).
    """

    kind: ClassVar[str]

    def __init__(self, *, directory: str, mark: Mark, field: str) -> None:
        self.directory = directory
        self.mark = mark
        self.field = field

    @abstractmethod
    def content_key(self) -> str:
        """What identifies the content, for the element's cache key."""

    @abstractmethod
    def stage(self, cas: LocalCas, workdir: Path) -> Digest:
        """Store the content as a Directory tree in ``cas``; return the root digest.

        Args:
            cas: the store to write to.
            workdir: scratch space (the built-in kinds need none).

        Raises:
            SourceError: the content is refused or changed since the project was loaded.
        """

    def key_description(self) -> dict[str, Any]:
        """This source's part of the cache key."""
        return {"kind": self.kind, "directory": self.directory, "content": self.content_key()}

    def describe(self) -> str:
        """A short human name, for logs."""
        return f"{self.kind} source {self.field}"

    def _error(self, message: str) -> SourceError:
        return SourceError(message, file=self.mark.file, line=self.mark.line, field=self.field)


class LocalSource(Source):
    """A file or folder of the project (``path``, relative to the project folder)."""

    kind = "local"

    def __init__(
        self, *, path: Path, relative: str, cas: LocalCas, directory: str, mark: Mark, field: str
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.path = path
        self.relative = relative
        self._digest = self._import(cas)

    def content_key(self) -> str:
        """The tree digest of the content, taken when the project was loaded."""
        return digest_to_str(self._digest)

    def stage(self, cas: LocalCas, workdir: Path) -> Digest:
        """Import the path again; it must not have changed since it was loaded."""
        digest = self._import(cas)
        if digest != self._digest:
            raise self._error(
                f"local source {self.relative!r} changed since the project was loaded "
                f"({digest_to_str(self._digest)} then, {digest_to_str(digest)} now)"
            )
        return digest

    def _import(self, cas: LocalCas) -> Digest:
        try:
            if self.path.is_dir():
                return import_directory(cas, self.path)
            # A single file is staged under its own name, as BuildStream does.
            blob = cas.put_file(self.path)
            executable = bool(self.path.stat().st_mode & 0o100)
            return cas.put_message(
                Directory(
                    files=[FileNode(name=self.path.name, digest=blob, is_executable=executable)]
                )
            )
        except (LocalCasError, OSError) as exc:
            raise self._error(f"cannot import local source {self.relative!r}: {exc}") from exc


class TarSource(Source):
    """A tarball fetched by ``file://`` URL; ``ref`` is its sha256."""

    kind = "tar"

    def __init__(
        self,
        *,
        url: str,
        path: Path,
        ref: str,
        base_dir: str,
        directory: str,
        mark: Mark,
        field: str,
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.url = url
        self.path = path
        self.ref = ref
        self.base_dir = base_dir

    def content_key(self) -> str:
        return json.dumps([self.ref, self.base_dir])

    def stage(self, cas: LocalCas, workdir: Path) -> Digest:
        try:
            with open(self.path, "rb") as f:
                # Hash then read the same open file, so what is staged is what was checked.
                actual = _sha256_of(f)
                if actual != self.ref:
                    raise self._error(
                        f"tarball {self.url} changed since the project was loaded: "
                        f"its sha256 is now {actual}, the ref is {self.ref}"
                    )
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:*") as tar:
                    return tree_from_tar(cas, tar, self.base_dir)
        except UnsafeArchiveError as exc:
            raise self._error(f"tarball {self.url}: {exc}") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise self._error(f"cannot read tarball {self.url}: {exc}") from exc


class GitSource(Source):
    """A commit of a local git repository (``url``: a path or ``file://``)."""

    kind = "git"

    def __init__(
        self, *, url: str, repo: Path, commit: str, directory: str, mark: Mark, field: str
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.url = url
        self.repo = repo
        self.commit = commit

    def content_key(self) -> str:
        return self.commit

    def stage(self, cas: LocalCas, workdir: Path) -> Digest:
        """Store the commit's tree, read with ``git ls-tree`` and ``git cat-file``.

        Not ``git archive``: it applies the repository's ``export-ignore`` and
        ``export-subst`` attributes, so its output is not the commit's content.
        Submodules become empty folders (they are not fetched).
        """
        listing = _git(self.repo, "ls-tree", "-r", "-z", "--full-tree", self.commit)
        if listing.returncode != 0:
            raise self._error(f"git ls-tree {self.commit} failed: {_stderr(listing)}")
        entries: list[tuple[str, str, list[str]]] = []
        try:
            for record in listing.stdout.split(b"\0"):
                if not record:
                    continue
                meta, _, raw_path = record.partition(b"\t")
                raw_mode, _, rest = meta.partition(b" ")
                _, _, raw_oid = rest.partition(b" ")
                try:
                    path = raw_path.decode("utf-8")
                except UnicodeDecodeError:
                    raise UnsafeArchiveError(f"path {raw_path!r} is not valid UTF-8") from None
                entries.append((raw_mode.decode(), raw_oid.decode(), _git_path(path)))
            builder = TreeBuilder(cas)
            blob_ids = [oid for mode, oid, _ in entries if mode != "160000"]
            blobs = _read_git_blobs(self.repo, blob_ids, cas)
            for mode, oid, parts in entries:
                if mode == "160000":
                    builder.add_folder(parts)
                elif mode == "120000":
                    target = blobs[oid][1]
                    if target is None:
                        raise UnsafeArchiveError(f"symlink {'/'.join(parts)!r}: target too long")
                    try:
                        text = target.decode("utf-8")
                    except UnicodeDecodeError:
                        raise UnsafeArchiveError(
                            f"symlink {'/'.join(parts)!r}: target is not valid UTF-8"
                        ) from None
                    builder.add_symlink(parts, text)
                elif mode in ("100644", "100755"):
                    builder.add_file(parts, blobs[oid][0], mode == "100755")
                else:
                    raise UnsafeArchiveError(f"entry {'/'.join(parts)!r} has git mode {mode}")
            return builder.finish()
        except UnsafeArchiveError as exc:
            raise self._error(f"git commit {self.commit} of {self.url}: {exc}") from None
        except _GitError as exc:
            raise self._error(f"git cat-file in {self.repo} failed: {exc}") from None


SOURCE_KINDS: dict[str, type[Source]] = {
    "local": LocalSource,
    "tar": TarSource,
    "git": GitSource,
}


def load_source(
    node: MappingNode,
    *,
    project_dir: Path,
    aliases: dict[str, str],
    variables: Variables,
    cas: LocalCas,
) -> Source:
    """Read one ``sources`` entry and check it against the disk.

    Raises:
        LoadError: a bad key or value, a missing local path, a tarball whose
            sha256 is not its ref, a git commit not in the repository, ...; the
            message names the file, line and field.
    """
    kind_node = node.require_str("kind")
    kind = kind_node.as_str()
    if kind not in SOURCE_KINDS:
        raise kind_node.error(
            f"unknown source kind {kind!r} (remex supports {', '.join(SOURCE_KINDS)})"
        )
    directory = _source_directory(node.get_scalar("directory"))
    if kind == "local":
        return _load_local(node, directory, project_dir, variables, cas)
    if kind == "tar":
        return _load_tar(node, directory, aliases, variables)
    return _load_git(node, directory, project_dir, aliases, variables)


def _load_local(
    node: MappingNode, directory: str, project_dir: Path, variables: Variables, cas: LocalCas
) -> LocalSource:
    node.validate_keys(("path", *_COMMON_KEYS))
    path_node = node.require_str("path")
    relative = variables.expand_node(path_node)
    path = project_path(project_dir, relative, path_node)
    return LocalSource(
        path=path, relative=relative, cas=cas, directory=directory, mark=node.mark, field=node.path
    )


def _load_tar(
    node: MappingNode, directory: str, aliases: dict[str, str], variables: Variables
) -> TarSource:
    node.validate_keys(("url", "ref", "base-dir", *_COMMON_KEYS))
    url_node = node.require_str("url")
    url = resolve_alias(variables.expand_node(url_node), aliases)
    path = _file_url_path(url, url_node, "only file:// URLs (directly or through a project "
                          "alias) are supported for tar sources")  # fmt: skip
    ref_node = _require_ref(node)
    ref = variables.expand_node(ref_node).lower()
    if not _SHA256_RE.fullmatch(ref):
        raise ref_node.error(f"expected the tarball's sha256 (64 hex digits), got {ref!r}")
    base_node = node.get_scalar("base-dir")
    base_dir = "*"  # BuildStream's default: the first top-level folder
    if base_node is not None:
        base_dir = variables.expand(
            base_node.value or "", mark=base_node.mark, field=base_node.path
        )
    if not path.is_file():
        raise url_node.error(f"tarball not found: {path}")
    try:
        with open(path, "rb") as f:
            actual = _sha256_of(f)
    except OSError as exc:
        raise url_node.error(f"cannot read tarball {path}: {exc.strerror}") from exc
    if actual != ref:
        raise ref_node.error(
            f"sha256 mismatch for {url}: the ref is {ref} but the file's sha256 is {actual}"
        )
    return TarSource(
        url=url,
        path=path,
        ref=ref,
        base_dir=base_dir,
        directory=directory,
        mark=node.mark,
        field=node.path,
    )


def _load_git(
    node: MappingNode,
    directory: str,
    project_dir: Path,
    aliases: dict[str, str],
    variables: Variables,
) -> GitSource:
    node.validate_keys(
        ("url", "ref", "track", *_COMMON_KEYS),
        unsupported=("submodules", "checkout-submodules", "track-tags", "tags", "ref-format"),
    )
    url_node = node.require_str("url")
    url = resolve_alias(variables.expand_node(url_node), aliases)
    repo = _git_repo_path(url, url_node, project_dir)
    ref_node = _require_ref(node)
    ref = variables.expand_node(ref_node)
    match = _GIT_REF_RE.fullmatch(ref)
    if match is None:
        raise ref_node.error(f"expected a full commit id (40 or 64 hex digits), got {ref!r}")
    commit = match.group(1)
    if not repo.is_dir():
        raise url_node.error(f"git repository not found: {repo}")
    probe = _git(repo, "rev-parse", "--git-dir")
    if probe.returncode != 0:
        raise url_node.error(f"not a git repository: {repo} ({_stderr(probe)})")
    exists = _git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
    if exists.returncode != 0:
        raise ref_node.error(f"commit {commit} not found in git repository {repo}")
    return GitSource(
        url=url, repo=repo, commit=commit, directory=directory, mark=node.mark, field=node.path
    )


def resolve_alias(url: str, aliases: dict[str, str]) -> str:
    """``alias:rest`` -> the alias's value + ``rest``; other URLs unchanged."""
    alias, sep, rest = url.partition(":")
    if sep and alias in aliases:
        return aliases[alias] + rest
    return url


def project_path(project_dir: Path, relative: str, node: ScalarNode) -> Path:
    """A path inside the project, checked as BuildStream checks project paths.

    It must be relative, not start with ``..``, not be a symlink, exist, and
    (symlinks in its folders resolved) stay inside the project folder.

    Raises:
        LoadError: at ``node``, saying which rule was broken.
    """
    pure = Path(relative)
    if pure.is_absolute():
        raise node.error(f"path {relative!r} must be relative to the project folder")
    if pure.parts and pure.parts[0] == "..":
        raise node.error(f"path {relative!r} must not start with '..'")
    full = project_dir / pure
    if full.is_symlink():
        raise node.error(f"path {relative!r} must not be a symlink")
    try:
        resolved = full.resolve(strict=True)
    except FileNotFoundError:
        raise node.error(f"path {relative!r} does not exist in the project folder") from None
    except OSError as exc:
        raise node.error(f"path {relative!r} cannot be resolved: {exc.strerror}") from None
    root = project_dir.resolve()
    if resolved != root and root not in resolved.parents:
        raise node.error(f"path {relative!r} leads outside the project folder")
    if not (resolved.is_dir() or resolved.is_file()):
        raise node.error(f"path {relative!r} is not a regular file or folder")
    return resolved


def _source_directory(node: ScalarNode | None) -> str:
    if node is None or node.value is None:
        return ""
    value = node.value
    if value.startswith("/") or "\0" in value:
        raise node.error(f"directory {value!r} must be a relative path")
    normal = posixpath.normpath(value)
    if normal == "..":
        raise node.error(f"directory {value!r} must stay inside the source folder")
    if normal.startswith("../"):
        raise node.error(f"directory {value!r} must stay inside the source folder")
    return "" if normal == "." else normal


def _require_ref(node: MappingNode) -> ScalarNode:
    ref_node = node.get_scalar("ref")
    if ref_node is None or ref_node.value is None:
        raise node.error(
            "missing required key 'ref' (remex does not track sources: write the ref)",
            field=node.child_path("ref"),
        )
    return ref_node


def _file_url_path(url: str, node: ScalarNode, refusal: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file":
        raise node.error(f"{refusal}; got {url!r}")
    if parts.netloc not in ("", "localhost"):
        raise node.error(f"file:// URL {url!r} names a host; only local files are supported")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise node.error(f"file:// URL {url!r} must hold an absolute path")
    return Path(path)


def _git_repo_path(url: str, node: ScalarNode, project_dir: Path) -> Path:
    if "://" in url:
        return _file_url_path(url, node, "only local git repositories (a path or a file:// URL, "
                              "directly or through a project alias) are supported")  # fmt: skip
    path = Path(url)
    return path if path.is_absolute() else project_dir / path


def _sha256_of(f: IO[bytes]) -> str:
    hasher = hashlib.sha256()
    while chunk := f.read(1 << 20):
        hasher.update(chunk)
    return hasher.hexdigest()


def _git_env(repo: Path) -> dict[str, str]:
    # GIT_DIR and friends (set when running inside a git hook) would override -C;
    # the ceiling stops a plain folder inside some other repository from
    # passing for a repository.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_CEILING_DIRECTORIES"] = str(repo.resolve().parent)
    return env


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            ["git", "--no-replace-objects", "-C", str(repo), *args],
            capture_output=True,
            env=_git_env(repo),
            check=False,
        )
    except OSError as exc:
        raise LoadError(f"cannot run git: {exc.strerror}") from exc


def _stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode("utf-8", "replace").strip() or f"exit code {result.returncode}"


def _git_path(path: str) -> list[str]:
    parts = path.split("/")
    if any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise UnsafeArchiveError(f"git tree has an unsafe path {path!r}")
    return parts


class _GitError(Exception):
    pass


def _read_git_blobs(
    repo: Path, oids: list[str], cas: LocalCas
) -> dict[str, tuple[Digest, bytes | None]]:
    """Each blob's digest in ``cas`` and, for small blobs, its bytes (symlink targets).

    Everything is read through one ``git cat-file --batch``: the ids are fed
    by a thread while the answers are read here, so neither pipe can fill up.
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
                        raise _GitError("output ended inside a blob")
                    result[oid] = (cas.put(data), data)
                else:
                    result[oid] = (store_stream(cas, proc.stdout, size), None)
                if proc.stdout.read(1) != b"\n":
                    raise _GitError("malformed output")
        finally:
            proc.stdout.close()
            code = proc.wait()
            feeder.join()
        if code != 0:
            errors.seek(0)
            raise _GitError(errors.read().decode("utf-8", "replace").strip() or f"exit {code}")
    return result


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
            raise _GitError(f"unexpected answer {' '.join(header)!r}")
        yield header[0], int(header[2])
