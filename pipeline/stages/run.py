"""Build in-process: one element's five stages in a row, or a list of elements in order.

What the Celery chain does across workers, done here in one process: for
tests, scripts and a build without a queue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal, TypedDict

from pipeline.digest import Digest, digest_to_json
from pipeline.errors import ExecutionError, MissingBlobsError, RemexError
from pipeline.spec import BuildSpec, DigestJson
from pipeline.stages.artifacts import lookup_artifact
from pipeline.stages.context import StageContext
from pipeline.stages.execution import execute, fetch_outputs
from pipeline.stages.push import push_artifact
from pipeline.stages.staging import stage_to_cas, upload
from pipeline.stages.state import State

__all__ = ["MAX_REUPLOADS", "ElementResult", "build_plan", "run_stages", "snapshot_sources"]

MAX_REUPLOADS = 2
"""How many times a MISSING precondition sends the element back through upload."""


Outcome = Literal["cached", "built", "failed", "skipped"]


class ElementResult(TypedDict):
    """What :func:`build_plan` did with one element."""

    element: str
    cache_key: str
    state: Outcome
    error: str | None
    artifact: DigestJson | None
    seconds: float


def run_stages(ctx: StageContext, spec: BuildSpec, state: State | None = None) -> State:
    """Run the five stages of one element in order; return the final state.

    A MissingBlobsError from ``execute`` (the execution CAS lost inputs) runs
    ``upload`` and ``execute`` again, at most :data:`MAX_REUPLOADS` times; so
    does a transient ExecutionError (buildbox-casd reports inputs it cannot
    stage as INTERNAL).

    Raises:
        BuildFailedError and the other errors of the stages.
    """
    state = stage_to_cas(ctx, spec, dict(state or {}))
    state = upload(ctx, spec, state)
    for attempt in range(MAX_REUPLOADS + 1):
        try:
            state = execute(ctx, spec, state)
            break
        except (MissingBlobsError, ExecutionError) as exc:
            if attempt == MAX_REUPLOADS or not (
                isinstance(exc, MissingBlobsError) or exc.transient
            ):
                raise
            state = upload(ctx, spec, {k: v for k, v in state.items() if k != "operation"})
    state = fetch_outputs(ctx, spec, state)
    return push_artifact(ctx, spec, state)


def build_plan(ctx: StageContext, specs: Sequence[BuildSpec]) -> list[ElementResult]:
    """Build elements in the order given (dependencies first), each once.

    An element whose artifact exists is a cache hit and is not built. An element
    that fails fails its reverse dependencies (skipped), while the others
    still build.

    Returns:
        One result per spec, in order.
    """
    results: list[ElementResult] = []
    broken: set[str] = set()  # elements without an artifact
    for spec in specs:
        started = time.monotonic()
        needs = [d["element"] for d in spec["dependencies"]] + list(spec["runtime_dependencies"])
        blocked = sorted({n for n in needs if n in broken})
        artifact: DigestJson | None = None
        error: str | None = None
        outcome: Outcome
        if blocked:
            outcome, error = "skipped", f"dependency failed: {', '.join(blocked)}"
        else:
            try:
                found = lookup_artifact(ctx, spec)
                if found is not None:
                    outcome, artifact = "cached", digest_to_json(found)
                else:
                    outcome, artifact = "built", run_stages(ctx, spec)["artifact"]
            except RemexError as exc:
                outcome, error = "failed", str(exc)
        if artifact is None:
            broken.add(spec["element"])
        results.append(
            ElementResult(
                element=spec["element"],
                cache_key=spec["cache_key"],
                state=outcome,
                error=error,
                artifact=artifact,
                seconds=round(time.monotonic() - started, 3),
            )
        )
    return results


def snapshot_sources(ctx: StageContext, trees: Sequence[Digest]) -> None:
    """Upload source trees from the local CAS to the artifact CAS (what the
    server lacks), so that any host can stage them by digest.

    Raises:
        LocalBlobMissingError: a tree is not complete in the local CAS.
        RemoteError: the artifact server failed (after retries).
    """
    for tree in trees:
        ctx.artifact_cas.upload_tree(ctx.local_cas, tree)
