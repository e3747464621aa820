"""Artifacts and failure records on the artifact server.

An artifact is a Directory pushed (Remote Asset PushDirectory) under the
element's artifact URI::

    files/              the element's output (what checkout writes)
    logs/stdout         the command's output (empty for import and stack)
    logs/stderr
    meta/artifact.json  project, element, cache key, dependencies, action, timings

A failed build leaves no artifact but a failure record: a JSON blob pushed
(PushBlob) under the element's failure URI, naming the logs' blobs.

Remote Asset v1 has no way to remove a name. A deleted artifact
(:func:`delete_artifact`) is its URI pushed again to the *withdrawn* tree
(:data:`WITHDRAWN_ARTIFACT`: one empty file ``remex-deleted``, which no real
artifact is, having ``files/``, ``logs/`` and ``meta/``); every lookup here
(:func:`fetch_artifact_root`) reads that as "not there", so the next build
makes the artifact again and pushes it over the withdrawn one.

Everything read back from the server is verified (digests) and checked
(hostile Directory names) by the CAS client.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import __version__
from pipeline.cas import check_directory
from pipeline.digest import (
    EMPTY_DIGEST,
    Digest,
    digest_from_str,
    digest_of_message,
    digest_to_str,
)
from pipeline.errors import ProtocolError
from pipeline.reapi.cas import MemoryBlobs
from pipeline.spec import BuildSpec, failure_uri, normal_name
from pipeline.stages.context import StageContext
from pipeline.stages.errors import ArtifactNotFoundError
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
)

__all__ = [
    "ARTIFACT_META_FILE",
    "WITHDRAWN_ARTIFACT",
    "ArtifactSummary",
    "artifact_summary",
    "build_artifact_tree",
    "delete_artifact",
    "fetch_artifact_files",
    "fetch_artifact_root",
    "lookup_artifact",
    "push_failure_record",
    "read_artifact_logs",
    "read_artifact_meta",
    "read_logs",
    "spec_failure_uri",
]

ARTIFACT_META_FILE = "artifact.json"
WITHDRAWN_MARKER = "remex-deleted"
WITHDRAWN_ARTIFACT = Directory(files=[FileNode(name=WITHDRAWN_MARKER, digest=EMPTY_DIGEST)])
"""The tree a deleted artifact's URI names (see the module docstring)."""
WITHDRAWN_DIGEST, _WITHDRAWN_BYTES = digest_of_message(WITHDRAWN_ARTIFACT)


@dataclass(frozen=True)
class ArtifactSummary:
    """What ``remex artifact list/show`` say about one stored artifact."""

    uri: str
    root: Digest
    files: int
    """Regular files in ``files/`` (symlinks and folders not counted)."""
    size_bytes: int
    """Their total size (each distinct blob as often as it appears)."""
    meta: dict[str, Any]
    """``meta/artifact.json`` (empty when the artifact has none)."""


def fetch_artifact_root(ctx: StageContext, uri: str) -> Digest | None:
    """The root digest of the artifact named ``uri``, or None when there is
    none or it was deleted (the one lookup every artifact read goes through).

    Raises:
        RemoteError: the artifact server failed (after retries).
    """
    fetched = ctx.assets.fetch_directory([uri])
    if fetched is None or is_withdrawn(fetched.digest):
        return None
    return fetched.digest


def is_withdrawn(root: Digest) -> bool:
    """Whether ``root`` is the tree of a deleted artifact."""
    return root.hash == WITHDRAWN_DIGEST.hash and root.size_bytes == WITHDRAWN_DIGEST.size_bytes


def delete_artifact(ctx: StageContext, uri: str) -> bool:
    """Withdraw the artifact named ``uri``: push the name again to
    :data:`WITHDRAWN_ARTIFACT`. Its blobs stay on the server until its own
    expiry removes them; a build that finds the name withdrawn makes the
    artifact again.

    Returns:
        False when there was no artifact to delete.

    Raises:
        RemoteError: the artifact server failed (after retries).
    """
    if fetch_artifact_root(ctx, uri) is None:
        return False
    root = ctx.artifact_cas.upload_blob(_WITHDRAWN_BYTES)
    ctx.assets.push_directory([uri], root)
    ctx.forget_artifacts()
    return True


def artifact_summary(ctx: StageContext, uri: str) -> ArtifactSummary | None:
    """The artifact named ``uri``: its file count, size and meta, read from
    the artifact server (Directory messages and the meta file, no file
    content); None when it is not there.

    Raises:
        ProtocolError: the stored artifact is malformed.
        RemoteError: the artifact server failed (after retries).
    """
    root = fetch_artifact_root(ctx, uri)
    if root is None:
        return None
    top = _remote_directory(ctx, root, "")
    files_root = _child(top, "files", uri)
    directories = {_key(digest_of_message(d)[0]): d for d in ctx.artifact_cas.get_tree(files_root)}
    count, size = 0, 0
    stack = [files_root]
    while stack:
        directory = directories.get(_key(stack.pop()))
        if directory is None:
            raise ProtocolError(f"artifact {uri}: its files/ tree is incomplete on the server")
        check_directory(directory, "files")
        count += len(directory.files)
        size += sum(f.digest.size_bytes for f in directory.files)
        stack.extend(d.digest for d in directory.directories)
    meta: dict[str, Any] = {}
    if any(d.name == "meta" for d in top.directories):
        meta_dir = _remote_directory(ctx, _child(top, "meta", uri), "meta")
        if any(f.name == ARTIFACT_META_FILE for f in meta_dir.files):
            blob = _file(meta_dir, ARTIFACT_META_FILE, f"{uri} meta/")
            meta = _json_object(
                ctx.artifact_cas.read_blob(blob), f"{uri} meta/{ARTIFACT_META_FILE}"
            )
    return ArtifactSummary(uri, root, count, size, meta)


def lookup_artifact(ctx: StageContext, spec: BuildSpec) -> Digest | None:
    """The root digest of the element's artifact, or None when it is not built
    yet (or was deleted).

    Raises:
        RemoteError: the artifact server failed (after retries).
    """
    return fetch_artifact_root(ctx, spec["artifact_uri"])


def fetch_artifact_files(ctx: StageContext, uri: str) -> Digest:
    """Fetch the ``files/`` tree of the artifact at ``uri`` into the local CAS.

    Returns:
        The digest of the ``files/`` Directory.

    Raises:
        ArtifactNotFoundError: nothing is stored under ``uri``.
        ProtocolError: the artifact has no ``files/`` folder.
        UnsafePathError, DigestMismatchError, RemoteError: as the CAS client.
    """
    return artifact_files(ctx, resolve_artifact(ctx, uri), uri)


def read_artifact_meta(ctx: StageContext, uri: str) -> dict[str, Any]:
    """The ``meta/artifact.json`` of the artifact at ``uri``.

    Raises:
        ArtifactNotFoundError: nothing is stored under ``uri``.
        ProtocolError: the artifact lacks the file or it is not a JSON object.
    """
    root = resolve_artifact(ctx, uri)
    meta = _child(_remote_directory(ctx, root, ""), "meta", uri)
    blob = _file(_remote_directory(ctx, meta, "meta"), ARTIFACT_META_FILE, f"{uri} meta/")
    return _json_object(ctx.artifact_cas.read_blob(blob), f"{uri} meta/{ARTIFACT_META_FILE}")


def read_logs(ctx: StageContext, spec: BuildSpec) -> tuple[bytes, bytes]:
    """The stdout and stderr of the element's build: from its artifact, or else
    from its failure record.

    Raises:
        ArtifactNotFoundError: there is neither.
        ProtocolError: what is stored is malformed.
    """
    return read_artifact_logs(ctx, spec["artifact_uri"], spec_failure_uri(spec))


def read_artifact_logs(ctx: StageContext, uri: str, record_uri: str) -> tuple[bytes, bytes]:
    """The stdout and stderr stored in the artifact named ``uri``, or else in
    the failure record named ``record_uri``.

    Raises:
        ArtifactNotFoundError: there is neither.
        ProtocolError: what is stored is malformed.
    """
    root = fetch_artifact_root(ctx, uri)
    if root is not None:
        logs = _child(_remote_directory(ctx, root, ""), "logs", uri)
        directory = _remote_directory(ctx, logs, "logs")
        stdout = _file(directory, "stdout", f"{uri} logs/")
        stderr = _file(directory, "stderr", f"{uri} logs/")
    else:
        record_blob = ctx.assets.fetch_blob([record_uri])
        if record_blob is None:
            raise ArtifactNotFoundError(f"{uri} or {record_uri}", "artifact or failure record")
        record = _json_object(ctx.artifact_cas.read_blob(record_blob.digest), record_uri)
        try:
            stdout = digest_from_str(str(record["stdout"]))
            stderr = digest_from_str(str(record["stderr"]))
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"failure record {record_uri} names no valid logs") from exc
    return _read_or_empty(ctx, stdout), _read_or_empty(ctx, stderr)


def spec_failure_uri(spec: BuildSpec) -> str:
    """The Remote Asset URI of the element's failure record."""
    return failure_uri(spec["project"], normal_name(spec["element"]), spec["cache_key"])


def push_failure_record(
    ctx: StageContext,
    spec: BuildSpec,
    *,
    action: Digest | None,
    exit_code: int | None,
    reason: str,
    stdout: Digest,
    stderr: Digest,
) -> str:
    """Upload the logs (from the local CAS) and a JSON record to the artifact
    server, and name the record by the failure URI. Returns that URI.

    Raises:
        LocalBlobMissingError: a log is in neither the local nor the artifact CAS.
        RemoteError: the artifact server failed (after retries).
    """
    ctx.artifact_cas.upload_missing(ctx.local_cas, [stdout, stderr])
    record = {
        "project": spec["project"],
        "element": spec["element"],
        "cache_key": spec["cache_key"],
        "reason": reason,
        "exit_code": exit_code,
        "action": None if action is None else digest_to_str(action),
        "stdout": digest_to_str(stdout),
        "stderr": digest_to_str(stderr),
        "time": datetime.datetime.now(datetime.UTC).isoformat(),
        "remex_version": __version__,
    }
    blob = ctx.artifact_cas.upload_blob(_json_bytes(record))
    uri = spec_failure_uri(spec)
    ctx.assets.push_blob([uri], blob, references_blobs=[stdout, stderr])
    return uri


def build_artifact_tree(
    blobs: MemoryBlobs, files: Digest, stdout: Digest, stderr: Digest, meta: Mapping[str, Any]
) -> Digest:
    """Put the artifact's own blobs (the meta file and the root, ``logs/`` and
    ``meta/`` Directory messages) into ``blobs``; return the root digest.

    They are held in memory to be sent to the artifact server, not written
    to the local CAS: nothing on this host reads them again, and each new
    file in a CAS is a new inode (0.5-0.7 ms of kernel time on a busy ext4
    without a journal).
    """
    meta_blob = blobs.put(_json_bytes(meta))
    logs = blobs.put_message(
        Directory(
            files=[FileNode(name="stderr", digest=stderr), FileNode(name="stdout", digest=stdout)]
        )
    )
    meta_dir = blobs.put_message(
        Directory(files=[FileNode(name=ARTIFACT_META_FILE, digest=meta_blob)])
    )
    return blobs.put_message(
        Directory(
            directories=[
                DirectoryNode(name="files", digest=files),
                DirectoryNode(name="logs", digest=logs),
                DirectoryNode(name="meta", digest=meta_dir),
            ]
        )
    )


# --- shared with the stages --------------------------------------------------


def resolve_artifact(ctx: StageContext, uri: str) -> Digest:
    """The root digest pushed under ``uri``.

    Raises:
        ArtifactNotFoundError: nothing is stored under ``uri``.
    """
    root = fetch_artifact_root(ctx, uri)
    if root is None:
        raise ArtifactNotFoundError(uri)
    return root


def artifact_files(ctx: StageContext, root: Digest, uri: str, *, whole: bool = True) -> Digest:
    """Fetch the ``files/`` tree of the artifact ``root`` into the local CAS; its digest.

    One GetTree of the artifact's root gives every Directory of the artifact
    (files/, logs/, meta/: a few more small messages than files/ alone), so
    the root need not be read first. ``whole``: the files too, or only the
    Directory messages (build without the bytes).

    The artifact's root Directory is read from the server, not stored locally:
    a stored Directory should mean a complete tree there.

    Raises:
        ProtocolError: the artifact has no ``files/`` folder.
        BlobNotFoundError: the server lacks part of the artifact.
        UnsafePathError, DigestMismatchError, RemoteError: as the CAS client.
    """
    tree = ctx.artifact_cas.read_tree(root)  # verified and checked
    files = _child(tree.directories[0], "files", uri)
    if whole:
        ctx.artifact_cas.fetch_tree(ctx.local_cas, files, within=tree)
    else:
        ctx.artifact_cas.fetch_directories(ctx.local_cas, files, within=tree)
    return files


# --- private -----------------------------------------------------------------


def _remote_directory(ctx: StageContext, digest: Digest, path: str) -> Directory:
    directory = ctx.artifact_cas.read_message(digest, Directory)
    check_directory(directory, path)
    return directory


def _key(digest: Digest) -> tuple[str, int]:
    return (digest.hash, digest.size_bytes)


def _child(directory: Directory, name: str, uri: str) -> Digest:
    for node in directory.directories:
        if node.name == name:
            return node.digest
    raise ProtocolError(f"artifact {uri} has no {name}/ folder")


def _file(directory: Directory, name: str, where: str) -> Digest:
    for node in directory.files:
        if node.name == name:
            return node.digest
    raise ProtocolError(f"{where} has no file {name!r}")


def _read_or_empty(ctx: StageContext, digest: Digest) -> bytes:
    if digest.size_bytes == 0 and digest.hash == EMPTY_DIGEST.hash:
        return b""
    return ctx.artifact_cas.read_blob(digest)


def _json_object(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} is not a JSON object")
    return value


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=2) + "\n").encode()
