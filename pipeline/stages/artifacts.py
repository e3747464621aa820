"""Artifacts and failure records on the artifact server.

An artifact is a Directory pushed (Remote Asset PushDirectory) under the
element's artifact URI::

    files/              the element's output (what checkout writes)
    logs/stdout         the command's output (empty for import and stack)
    logs/stderr
    meta/artifact.json  project, element, cache key, dependencies, action, timings

A failed build leaves no artifact but a failure record: a JSON blob pushed
(PushBlob) under the element's failure URI, naming the logs' blobs.

Everything read back from the server is verified (digests) and checked
(hostile Directory names) by the CAS client.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from pipeline import __version__
from pipeline.cas import LocalCas, check_directory
from pipeline.digest import EMPTY_DIGEST, Digest, digest_from_str, digest_to_str
from pipeline.errors import ProtocolError
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
    "build_artifact_tree",
    "fetch_artifact_files",
    "lookup_artifact",
    "push_failure_record",
    "read_artifact_meta",
    "read_logs",
    "spec_failure_uri",
]

ARTIFACT_META_FILE = "artifact.json"


def lookup_artifact(ctx: StageContext, spec: BuildSpec) -> Digest | None:
    """The root digest of the element's artifact, or None when it is not built yet.

    Raises:
        RemoteError: the artifact server failed (after retries).
    """
    fetched = ctx.assets.fetch_directory([spec["artifact_uri"]])
    return None if fetched is None else fetched.digest


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
    uri = spec["artifact_uri"]
    fetched = ctx.assets.fetch_directory([uri])
    if fetched is not None:
        logs = _child(_remote_directory(ctx, fetched.digest, ""), "logs", uri)
        directory = _remote_directory(ctx, logs, "logs")
        stdout = _file(directory, "stdout", f"{uri} logs/")
        stderr = _file(directory, "stderr", f"{uri} logs/")
    else:
        record_uri = spec_failure_uri(spec)
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
    cas: LocalCas, files: Digest, stdout: Digest, stderr: Digest, meta: Mapping[str, Any]
) -> Digest:
    """Store the artifact's Directory messages and meta file; return the root digest.

    ``files`` must already be in ``cas``; the logs need not be (only their digests).
    """
    meta_blob = cas.put(_json_bytes(meta))
    logs = cas.put_message(
        Directory(
            files=[FileNode(name="stderr", digest=stderr), FileNode(name="stdout", digest=stdout)]
        )
    )
    meta_dir = cas.put_message(
        Directory(files=[FileNode(name=ARTIFACT_META_FILE, digest=meta_blob)])
    )
    return cas.put_message(
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
    fetched = ctx.assets.fetch_directory([uri])
    if fetched is None:
        raise ArtifactNotFoundError(uri)
    return fetched.digest


def artifact_files(ctx: StageContext, root: Digest, uri: str) -> Digest:
    """Fetch the ``files/`` tree of the artifact ``root`` into the local CAS; its digest.

    The artifact's root Directory is read from the server, not stored locally:
    a stored Directory should mean a complete tree there.
    """
    files = artifact_files_digest(ctx, root, uri)
    ctx.artifact_cas.fetch_tree(ctx.local_cas, files)
    return files


def artifact_files_digest(ctx: StageContext, root: Digest, uri: str) -> Digest:
    """The digest of the ``files/`` Directory of the artifact ``root`` (read
    from the artifact server; nothing is stored locally)."""
    return _child(_remote_directory(ctx, root, ""), "files", uri)


# --- private -----------------------------------------------------------------


def _remote_directory(ctx: StageContext, digest: Digest, path: str) -> Directory:
    directory = ctx.artifact_cas.read_message(digest, Directory)
    check_directory(directory, path)
    return directory


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
