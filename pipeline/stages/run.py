"""Build in-process: one element's five stages in a row, or a list of elements in order.

What the Celery chain does across workers, done here in one process: for
tests, scripts and a build without a queue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal, TypedDict

from pipeline.digest import Digest, digest_to_json
from pipeline.errors import RemexError
from pipeline.spec import BuildSpec, DigestJson
from pipeline.stages.artifacts import lookup_artifact
from pipeline.stages.context import StageContext
from pipeline.stages.execution import execute, fetch_outputs
from pipeline.stages.pins import pin_state, pinned_stage
from pipeline.stages.policy import DEFAULT_POLICY, Decision, FailurePolicy
from pipeline.stages.push import push_artifact
from pipeline.stages.staging import stage_to_cas, upload
from pipeline.stages.state import State, without_operation

__all__ = ["ElementResult", "build_plan", "run_stages", "snapshot_sources"]


Outcome = Literal["cached", "built", "failed", "skipped"]


class ElementResult(TypedDict):
    """What :func:`build_plan` did with one element."""

    element: str
    cache_key: str
    state: Outcome
    error: str | None
    artifact: DigestJson | None
    seconds: float


def run_stages(
    ctx: StageContext,
    spec: BuildSpec,
    state: State | None = None,
    *,
    policy: FailurePolicy = DEFAULT_POLICY,
) -> State:
    """Run the five stages of one element in order; return the final state.

    When ``execute`` fails, ``policy`` decides (see :mod:`pipeline.stages.policy`):
    a re-upload runs ``upload`` and ``execute`` again (a MISSING precondition,
    or a transient ExecutionError: buildbox-casd reports inputs it cannot
    stage as INTERNAL); anything else is raised, as in-process there is no
    queue to retry on later.

    Raises:
        BuildFailedError and the other errors of the stages.
    """
    # One pin for the whole chain: what each stage hands on is kept for the next.
    with pinned_stage(ctx.local_cas, state or {}) as pin:
        state = stage_to_cas(ctx, spec, state.copy() if state else State())
        pin_state(pin, state)
        state = upload(ctx, spec, state)
        reuploads = 0
        while True:
            try:
                state = execute(ctx, spec, state)
                break
            except Exception as exc:
                verdict = policy.decide("execute", exc, failures=1, reuploads=reuploads)
                if verdict.decision is not Decision.REUPLOAD:
                    raise
                reuploads += 1
                # As the task runner does: ``reupload`` makes upload ask the
                # server what it lacks instead of trusting what staging knows.
                again = without_operation(state)
                again["reupload"] = True
                state = upload(ctx, spec, again)
                state.pop("reupload", None)
        state = fetch_outputs(ctx, spec, state)
        pin_state(pin, state)
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
