"""Stage 5: make the artifact and push it to the artifact server."""

from __future__ import annotations

import datetime
import socket
import time
from typing import Any

from pipeline import __version__
from pipeline.cas import tree_digests
from pipeline.digest import EMPTY_DIGEST, Digest, digest_to_str
from pipeline.reapi.cas import MemoryBlobs
from pipeline.spec import BuildSpec
from pipeline.stages.artifacts import build_artifact_tree, fetch_artifact_root
from pipeline.stages.context import StageContext
from pipeline.stages.errors import SpecError
from pipeline.stages.execution import download_outputs
from pipeline.stages.recovery import rederives_lost_blobs
from pipeline.stages.staging import stage_files
from pipeline.stages.state import (
    State,
    decode_action_result,
    digest_in,
    dj,
    with_timing,
)
from pipeline.stages.trees import directories_complete, tree_complete

__all__ = ["artifact_meta", "push_artifact"]


@rederives_lost_blobs
def push_artifact(
    ctx: StageContext, spec: BuildSpec, state: State, *, check_existing: bool = True
) -> State:
    """Stage 5: build the artifact (``files/``, ``logs/``, ``meta/``), upload its
    blobs to the artifact CAS, then name it by the artifact URI (PushDirectory).
    With ``ctx.minimal`` the output files are not on this host: only what the
    artifact server lacks moves, server to server.

    Done already when the URI resolves (another run, another host): that
    artifact is kept and returned. On a host that lacks the outputs, they are
    fetched (or, without a command, derived) again first.

    Args:
        check_existing: look the URI up first (one FetchDirectory). A caller
            that knows this is the element's first push (the first delivery
            of its chain's first attempt) may pass False to save the round
            trip: pushing again under a URI that resolves would only name
            an equivalent artifact (the same files and logs, another meta).

    Returns:
        The state with ``artifact`` (the root digest).

    Raises:
        RemoteError: a server failed (after retries).
    """
    started = time.monotonic()
    new = state.copy()
    # A deleted (withdrawn) artifact counts as absent: it is made again.
    existing = fetch_artifact_root(ctx, spec["artifact_uri"]) if check_existing else None
    if existing is not None:
        new["artifact"] = dj(existing)
        return with_timing(new, "push_artifact", time.monotonic() - started)
    element = spec["element"]
    files = digest_in(element, state, "files")
    stdout = digest_in(element, state, "stdout") if state.get("stdout") else EMPTY_DIGEST
    stderr = digest_in(element, state, "stderr") if state.get("stderr") else EMPTY_DIGEST
    _ensure_local_outputs(ctx, spec, state, files, [stdout, stderr])
    # The meta records this stage's time so far (a copy: the state's is added at the end).
    meta = artifact_meta(spec, with_timing(dict(new), "push_artifact", time.monotonic() - started))
    own = MemoryBlobs(below=ctx.local_cas)
    root = build_artifact_tree(own, files, stdout, stderr, meta)
    # One FindMissingBlobs for the whole artifact. Its own small blobs are
    # sent from memory; output files the local CAS does not hold (built
    # without the bytes) are on the execution CAS: when that is the artifact
    # server nothing moves, otherwise they are copied server to server.
    ctx.artifact_cas.upload_missing_from(
        own,
        [*own.digests(), stdout, stderr, *tree_digests(ctx.local_cas, files)],
        fallback=None if ctx.artifacts_on_storage else ctx.execution_cas,
    )
    # Named only once every blob is there: a fetched artifact is complete.
    ctx.assets.push_directory([spec["artifact_uri"]], root)
    # A dependent staged on this worker finds the files without asking.
    ctx.remember_artifact_files(spec["artifact_uri"], files)
    new["artifact"] = dj(root)
    return with_timing(new, "push_artifact", time.monotonic() - started)


def artifact_meta(spec: BuildSpec, state: State) -> dict[str, Any]:
    """The content of ``meta/artifact.json``."""
    execution = state.get("execution") or {}
    action = state.get("action")
    return {
        "remex_version": __version__,
        "project": spec["project"],
        "element": spec["element"],
        "kind": spec["kind"],
        "cache_key": spec["cache_key"],
        "artifact_uri": spec["artifact_uri"],
        "dependencies": {d["element"]: d["cache_key"] for d in spec["dependencies"]},
        "runtime_dependencies": list(spec["runtime_dependencies"]),
        "action": None
        if not action
        else digest_to_str(digest_in(spec["element"], state, "action")),
        "action_cached": bool(state.get("cached")),
        "exit_code": state.get("exit_code"),
        # Who made it and when (``remex artifact show``): the host that
        # pushed it and the execution service's worker that ran the action.
        "host": socket.gethostname(),
        "worker": execution.get("worker"),
        "pushed": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "overlaps": (state.get("overlaps") or {}).get("count", 0),
        # Staging warnings (overlaps, unstaged files), as BuildStream logs them.
        "warnings": list((state.get("overlaps") or {}).get("warnings") or []),
        "timings": {
            "queued": execution.get("queued"),
            "worker_start": execution.get("worker_start"),
            "worker_completed": execution.get("worker_completed"),
            "execution_seconds": execution.get("execution_seconds"),
            "stages": dict(state.get("timings") or {}),
        },
    }


def _ensure_local_outputs(
    ctx: StageContext, spec: BuildSpec, state: State, files: Digest, logs: list[Digest]
) -> None:
    """Fetch or derive the files and logs again when this host's local CAS lacks them."""
    cas = ctx.local_cas
    present = directories_complete if ctx.minimal else tree_complete
    if present(cas, files) and not cas.missing(logs):
        return
    element = spec["element"]
    if spec["command"] is not None:
        text = state.get("action_result")
        if not isinstance(text, str):
            raise SpecError(element, "push_artifact needs 'action_result' (did execute run?)")
        result = decode_action_result(element, text)
        got = download_outputs(ctx, spec, result, digest_in(element, state, "input_root"))
    else:
        got = stage_files(ctx, spec)
    if got != files:
        raise SpecError(
            element,
            f"the files derived again ({digest_to_str(got)}) differ from the state's "
            f"({digest_to_str(files)})",
        )
