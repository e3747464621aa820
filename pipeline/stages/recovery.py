"""A stage whose local CAS loses blobs under it derives them again.

The local CAS is a cache; the remote CAS is the truth. Blobs can vanish from
under a running stage: the folder wiped by hand, a tmpfs lost, a cleanup by
another worker sharing the folder. What the process remembers about the
local CAS (which trees it holds whole) then lies. A stage that meets a blob
gone (:class:`~pipeline.errors.LocalBlobMissingError`) forgets those
memories and runs once more, fetching from the servers what it lacks. Should
the blobs vanish again, the error is raised as transient: the stage's runner
retries it later, with backoff, as any transient failure.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Concatenate, ParamSpec

from pipeline.errors import LocalBlobMissingError
from pipeline.spec import BuildSpec
from pipeline.stages.context import StageContext
from pipeline.stages.state import State

__all__ = ["rederives_lost_blobs"]

log = logging.getLogger(__name__)

P = ParamSpec("P")


def rederives_lost_blobs(
    stage: Callable[Concatenate[StageContext, BuildSpec, State, P], State],
) -> Callable[Concatenate[StageContext, BuildSpec, State, P], State]:
    """Wrap a stage function so that blobs lost from the local CAS while it
    runs are fetched or derived again (see the module docstring).

    The stage must be idempotent and work from its arguments alone (every
    stage is): running it again on the same state is safe.
    """

    @functools.wraps(stage)
    def run(
        ctx: StageContext, spec: BuildSpec, state: State, /, *args: P.args, **kwargs: P.kwargs
    ) -> State:
        try:
            return stage(ctx, spec, state, *args, **kwargs)
        except LocalBlobMissingError as exc:
            log.warning(
                "%s of %s: %s; the local CAS lost blobs, deriving them again",
                stage.__name__,
                spec["element"],
                exc,
            )
            ctx.forget_local()
        try:
            return stage(ctx, spec, state, *args, **kwargs)
        except LocalBlobMissingError as exc:
            ctx.forget_local()
            raise LocalBlobMissingError(
                f"{spec['element']}: {stage.__name__}: the local CAS lost blobs twice "
                f"in a row ({exc})",
                transient=True,
            ) from exc

    return run
