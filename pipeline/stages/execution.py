"""Stages 3 and 4: run the action remotely, bring its outputs home.

``execute`` may return before the action is done (``max_wait``): the state
then names the operation, and calling ``execute`` again with that state
follows the same operation instead of starting another. A MissingBlobsError
is left to the caller, who runs ``upload`` again and then ``execute``.

``fetch_outputs`` trusts nothing the execution server sends: every blob is
verified against its digest and every Directory checked for hostile names by
the CAS client, and nothing is written to disk.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.cas import store_tree_message, tree_digests
from pipeline.digest import EMPTY_DIGEST, Digest
from pipeline.errors import ExecutionError, RemexError
from pipeline.reapi.execution import Pending
from pipeline.spec import BuildSpec
from pipeline.stages.artifacts import push_failure_record
from pipeline.stages.context import StageContext
from pipeline.stages.errors import BuildFailedError, SpecError
from pipeline.stages.recovery import rederives_lost_blobs
from pipeline.stages.select import filter_tree, path_selector
from pipeline.stages.staging import dependency_files
from pipeline.stages.state import (
    State,
    decode_action_result,
    digest_in,
    dj,
    encode_action_result,
    timestamp_iso,
    with_timing,
)
from pipeline.stages.trees import empty_tree, split_path, tree_paths
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    ActionResult,
    ExecutedActionMetadata,
    OutputDirectory,
    Tree,
)

__all__ = [
    "LOG_TAIL_LINES",
    "download_outputs",
    "execute",
    "fetch_outputs",
    "log_tail",
    "select_outputs",
]

LOG_TAIL_LINES = 40
# A tail is also cut to this many characters: one line may be megabytes.
LOG_TAIL_CHARS = 8000

# Output Tree messages and logs up to this much in all are read into memory
# (one BatchReadBlobs); beyond it they are downloaded into the local CAS,
# streamed, as big blobs must be.
_IN_MEMORY_BYTES = 1 << 20


# --- stage 3 -------------------------------------------------------------------


@rederives_lost_blobs
def execute(
    ctx: StageContext,
    spec: BuildSpec,
    state: State,
    *,
    max_wait: float | None = None,
    on_operation: Callable[[str], None] | None = None,
) -> State:
    """Stage 3: run the action on the execution server (or resume following it).

    A no-op without a command, for a cached action, or for a state that
    already holds ``action_result``.

    Args:
        max_wait: seconds to follow the operation before returning it as
            pending; None waits until it is done.
        on_operation: called with the operation's name as soon as it is known.

    Returns:
        Done: the state with ``action_result`` and ``remote_cache_hit`` (the
        server answered from its cache), without ``operation``/``remote_stage``. Not done yet:
        the state with ``operation`` (its name) and ``remote_stage``; pass it back.

    Raises:
        MissingBlobsError: the execution CAS lacks inputs: run ``upload`` again.
        BuildFailedError: the action ran past its timeout.
        ExecutionError, OperationLostError, RemoteError: as ExecutionClient.run.
    """
    started = time.monotonic()
    new = state.copy()
    if spec["command"] is None or state.get("cached") or "action_result" in state:
        return with_timing(new, "execute", time.monotonic() - started)
    action = digest_in(spec["element"], state, "action")
    skip = bool(state.get("skip_cache_lookup"))
    operation = state.get("operation") or None
    priority = int(spec.get("priority", 0))
    if skip and operation is None:
        # Run twice, do the work once: a result cached since stage_to_cas
        # looked (by this stage's first run, say) is reused.
        cached = ctx.action_cache.get_action_result(action)
        if cached is not None and cached.exit_code == 0:
            return with_timing(
                _done(new, cached, cached=True), "execute", time.monotonic() - started
            )
    try:
        outcome = ctx.executor.run(
            action,
            skip_cache_lookup=skip,
            priority=priority,
            operation_name=operation,
            max_wait=max_wait,
            on_operation=on_operation,
        )
        if (
            not isinstance(outcome, Pending)
            and outcome.cached_result
            and outcome.result.exit_code != 0
        ):
            # A failure cached after stage_to_cas looked: not an answer either.
            new["skip_cache_lookup"] = True
            outcome = ctx.executor.run(
                action, skip_cache_lookup=True, priority=priority, max_wait=max_wait
            )
    except ExecutionError as exc:
        if exc.code == "DEADLINE_EXCEEDED" and not exc.transient:
            _fail_timeout(ctx, spec, state, exc)
        raise
    if isinstance(outcome, Pending):
        new["operation"] = outcome.operation_name
        new["remote_stage"] = outcome.remote_stage
        return with_timing(new, "execute", time.monotonic() - started)
    return with_timing(
        _done(new, outcome.result, cached=outcome.cached_result),
        "execute",
        time.monotonic() - started,
    )


def _done(state: State, result: ActionResult, *, cached: bool) -> State:
    state.pop("operation", None)
    state.pop("remote_stage", None)
    state["action_result"] = encode_action_result(result)
    # An observation, not a result: running execute twice gives a cache hit the
    # second time, and the state must otherwise stay the same.
    state["remote_cache_hit"] = bool(cached)
    return state


# --- stage 4 -------------------------------------------------------------------


@rederives_lost_blobs
def fetch_outputs(ctx: StageContext, spec: BuildSpec, state: State) -> State:
    """Stage 4: download the output tree and the logs into the local CAS.

    Without a command the files are already there and the logs empty.
    A command that produced no output folder gives an empty ``files`` tree.
    A non-zero exit code pushes a failure record to the artifact server and
    fails the element.

    Returns:
        The state with ``files``, ``stdout``, ``stderr``, ``exit_code`` and
        ``execution`` (worker, ISO timestamps, seconds).

    Raises:
        BuildFailedError: the command exited non-zero (with the tail of its logs).
        DigestMismatchError, UnsafePathError, ProtocolError: the server sent
            something wrong or hostile.
        RemoteError: a server failed (after retries).
    """
    started = time.monotonic()
    new = state.copy()
    element = spec["element"]
    if spec["command"] is None:
        digest_in(element, state, "files")  # set by stage_to_cas
        new.update({"stdout": dj(EMPTY_DIGEST), "stderr": dj(EMPTY_DIGEST), "exit_code": None})
        new["execution"] = None
        return with_timing(new, "fetch_outputs", time.monotonic() - started)
    text = state.get("action_result")
    if not isinstance(text, str):
        raise SpecError(element, "fetch_outputs needs 'action_result' (did execute finish?)")
    result = decode_action_result(element, text)
    # The output Tree messages come with the logs, in one request.
    stdout, stderr, trees = _download_logs(ctx, result, _tree_messages(result))
    if result.exit_code != 0:
        _fail(ctx, spec, state, result, stdout, stderr)
    files = _download_output_tree(ctx, spec, result, trees)
    if spec["select_outputs"]:
        files = select_outputs(ctx, spec, digest_in(element, state, "input_root"), files)
    new.update(
        {
            "files": dj(files),
            "stdout": dj(stdout),
            "stderr": dj(stderr),
            "exit_code": result.exit_code,
            "execution": _execution_metadata(result.execution_metadata),
        }
    )
    return with_timing(new, "fetch_outputs", time.monotonic() - started)


def download_outputs(
    ctx: StageContext, spec: BuildSpec, result: ActionResult, input_root: Digest
) -> Digest:
    """Download the logs and the output tree of ``result`` into the local CAS
    (its Directory messages only with ``ctx.minimal``); return the artifact's
    files (for a host that lacks them)."""
    _, _, trees = _download_logs(ctx, result, _tree_messages(result))
    files = _download_output_tree(ctx, spec, result, trees)
    if spec["select_outputs"]:
        files = select_outputs(ctx, spec, input_root, files)
    return files


def log_tail(data: bytes, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log, decoded leniently, at most a few KB."""
    text = data.decode("utf-8", errors="replace")
    tail = "\n".join(text.splitlines()[-lines:])
    if len(tail) > LOG_TAIL_CHARS:
        tail = "[...]" + tail[-LOG_TAIL_CHARS:]
    return tail


# --- private -------------------------------------------------------------------


def _download_logs(
    ctx: StageContext, result: ActionResult, trees: Sequence[Digest] = ()
) -> tuple[Digest, Digest, dict[tuple[str, int], bytes]]:
    """The logs of ``result`` in the local CAS, and the Tree messages
    ``trees``, in one download.

    Returns:
        stdout, stderr, and the bytes of ``trees`` (verified) by ``(hash,
        size_bytes)`` when they were read into memory; with big blobs all
        were downloaded into the local CAS instead, and that is empty.
    """
    cas = ctx.local_cas
    found: list[Digest] = []
    logs: list[Digest] = []
    for raw_field, digest_field in (
        ("stdout_raw", "stdout_digest"),
        ("stderr_raw", "stderr_digest"),
    ):
        if result.HasField(digest_field):
            digest: Digest = getattr(result, digest_field)
            logs.append(digest)
        else:
            digest = cas.put(getattr(result, raw_field))
        found.append(digest)
    wanted = [*trees, *logs]
    kept: dict[tuple[str, int], bytes] = {}
    if sum(d.size_bytes for d in wanted) <= _IN_MEMORY_BYTES:
        # A Tree message is parsed once and its Directory messages stored:
        # storing the Tree blob itself too would cost a file for nothing.
        logs = cas.missing(logs)
        got = ctx.execution_cas.read_blobs([*trees, *logs]) if trees or logs else {}
        for digest in logs:
            cas.put_verified(got[(digest.hash, digest.size_bytes)], digest)
        kept = {(d.hash, d.size_bytes): got[(d.hash, d.size_bytes)] for d in trees}
    elif wanted:
        ctx.execution_cas.download_into(cas, wanted)
    return found[0], found[1], kept


def _download_output_tree(
    ctx: StageContext,
    spec: BuildSpec,
    result: ActionResult,
    trees: dict[tuple[str, int], bytes],
) -> Digest:
    command_spec = spec["command"]
    if command_spec is None:
        raise SpecError(spec["element"], "only an element with a command has outputs")
    cas = ctx.local_cas
    wanted = posixpath.normpath("/".join(split_path(command_spec["output_path"])))
    workdir = "/".join(split_path(command_spec["working_directory"]))

    def resolved(path: str) -> str:
        # The server echoes the path as the Command gave it (relative to the
        # working directory); compare it resolved against the input root.
        return posixpath.normpath(posixpath.join(workdir, path))

    for output in result.output_directories:
        if resolved(output.path) == wanted:
            return _download_directory(ctx, output, trees)
    if any(resolved(f.path) == wanted for f in result.output_files) or any(
        resolved(s.path) == wanted for s in result.output_symlinks
    ):
        raise BuildFailedError(
            spec["element"], f"the install root {command_spec['output_path']!r} is not a folder"
        )
    return empty_tree(cas)


def _tree_messages(result: ActionResult) -> list[Digest]:
    return [
        d.tree_digest
        for d in result.output_directories
        if d.HasField("tree_digest") and d.tree_digest.size_bytes
    ]


def _download_directory(
    ctx: StageContext, output: OutputDirectory, trees: dict[tuple[str, int], bytes]
) -> Digest:
    """An output folder's tree in the local CAS: whole, or with ``ctx.minimal``
    its Directory messages only (the files stay on the execution CAS).
    ``trees``: Tree messages already read (see :func:`_download_logs`)."""
    cas = ctx.local_cas
    if output.HasField("tree_digest") and output.tree_digest.size_bytes:
        read = trees.get((output.tree_digest.hash, output.tree_digest.size_bytes))
        if read is not None:  # read with the logs
            tree = ctx.execution_cas.parse_message(read, Tree, output.tree_digest)
        elif cas.contains(output.tree_digest):  # downloaded with the logs
            tree = cas.get_message(output.tree_digest, Tree)
        else:
            tree = ctx.execution_cas.read_message(output.tree_digest, Tree)
        root = store_tree_message(cas, tree)
        if not ctx.minimal:
            # Directories are all local now (checked); fetch the files, verified.
            ctx.execution_cas.download_into(cas, tree_digests(cas, root))
        return root
    if output.HasField("root_directory_digest"):
        if ctx.minimal:
            ctx.execution_cas.fetch_directories(cas, output.root_directory_digest)
        else:
            ctx.execution_cas.fetch_tree(cas, output.root_directory_digest)
        return output.root_directory_digest
    return empty_tree(cas)


def select_outputs(ctx: StageContext, spec: BuildSpec, input_root: Digest, files: Digest) -> Digest:
    """The outputs the element keeps: those its dependencies' ``select`` takes from
    their own files, and those the command created (BuildStream's compose
    with integration: the manifest plus the files integration added)."""
    cas = ctx.local_cas
    manifest: set[str] = set()
    for index, dependency in enumerate(spec["dependencies"]):
        dep_files = dependency_files(ctx, spec, index)
        prefix = "/".join(split_path(dependency["path"]))
        keep = path_selector(dependency["select"]) if dependency["select"] else None
        for path in tree_paths(cas, dep_files):
            if keep is None or keep(path):
                manifest.add(f"{prefix}/{path}" if prefix else path)
    before = set(tree_paths(cas, input_root))
    return filter_tree(cas, files, lambda path: path in manifest or path not in before)


def _fail(
    ctx: StageContext,
    spec: BuildSpec,
    state: State,
    result: ActionResult,
    stdout: Digest,
    stderr: Digest,
) -> None:
    reason = f"the command exited with code {result.exit_code}"
    uri = push_failure_record(
        ctx,
        spec,
        action=digest_in(spec["element"], state, "action"),
        exit_code=result.exit_code,
        reason=reason,
        stdout=stdout,
        stderr=stderr,
    )
    raise BuildFailedError(
        spec["element"],
        reason,
        exit_code=result.exit_code,
        stdout_tail=log_tail(ctx.local_cas.get(stdout)),
        stderr_tail=log_tail(ctx.local_cas.get(stderr)),
        failure_uri=uri,
    )


def _fail_timeout(ctx: StageContext, spec: BuildSpec, state: State, exc: ExecutionError) -> None:
    """The action ran past its timeout: keep what it printed, fail the element."""
    command_spec = spec["command"]
    reason = (
        f"the command ran past its timeout ({command_spec and command_spec['timeout_seconds']} s)"
    )
    response = getattr(exc, "response", None)
    result = response.result if response is not None else ActionResult()
    try:
        stdout, stderr, _ = _download_logs(ctx, result)
    except RemexError:
        # Partial logs are a courtesy; the timeout is the news.
        stdout = stderr = ctx.local_cas.put(b"")
    uri = push_failure_record(
        ctx,
        spec,
        action=digest_in(spec["element"], state, "action"),
        exit_code=None,
        reason=reason,
        stdout=stdout,
        stderr=stderr,
    )
    raise BuildFailedError(
        spec["element"],
        reason,
        stdout_tail=log_tail(ctx.local_cas.get(stdout)),
        stderr_tail=log_tail(ctx.local_cas.get(stderr)),
        failure_uri=uri,
    ) from exc


def _execution_metadata(metadata: ExecutedActionMetadata) -> dict[str, Any]:
    times = {
        "queued": timestamp_iso(metadata.queued_timestamp),
        "worker_start": timestamp_iso(metadata.worker_start_timestamp),
        "worker_completed": timestamp_iso(metadata.worker_completed_timestamp),
        "execution_start": timestamp_iso(metadata.execution_start_timestamp),
        "execution_completed": timestamp_iso(metadata.execution_completed_timestamp),
    }
    info: dict[str, Any] = {"worker": metadata.worker or None}
    info.update({k: v for k, v in times.items() if v is not None})
    start, end = metadata.execution_start_timestamp, metadata.execution_completed_timestamp
    if start.seconds and end.seconds:
        info["execution_seconds"] = round(
            (end.seconds - start.seconds) + (end.nanos - start.nanos) / 1e9, 4
        )
    start, end = metadata.worker_start_timestamp, metadata.worker_completed_timestamp
    if start.seconds and end.seconds:
        info["worker_seconds"] = round(
            (end.seconds - start.seconds) + (end.nanos - start.nanos) / 1e9, 4
        )
    return info
