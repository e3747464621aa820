"""What to do when a stage fails: the one failure policy of remex.

The Celery tasks (:mod:`tasks.stages`) and the in-process runner
(:func:`pipeline.stages.run_stages`) both ask :meth:`FailurePolicy.decide`
and act on the answer; the limits live here and nowhere else:

* a :class:`~pipeline.stages.BuildFailedError` (the command failed) or any
  other permanent :class:`~pipeline.errors.RemexError` fails the element now;
* in ``execute``, a MISSING precondition (:class:`MissingBlobsError`: the
  execution CAS lost inputs) or a transient :class:`ExecutionError`
  (buildbox-casd reports inputs it cannot stage as INTERNAL) sends the
  element back through ``upload``, at most ``max_reuploads`` times;
* a transient error, or one that is not remex's (a bug, a full disk), runs
  the same stage again after a backoff, at most ``max_transient_retries``
  times in a row; then the element fails (the retries are spent).

The backoff is :class:`pipeline.reapi.retry.RetryPolicy`'s (exponential,
capped, equal jitter), with task-sized numbers: RPCs are already retried
within a stage, so a task retry waits seconds, not milliseconds.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from pipeline.errors import ExecutionError, MissingBlobsError, RemexError
from pipeline.reapi.retry import RetryPolicy
from pipeline.stages.errors import BuildFailedError

__all__ = ["DEFAULT_POLICY", "Decision", "FailurePolicy", "Verdict", "is_transient"]


class Decision(enum.Enum):
    """What the runner of a stage does after the stage raised."""

    RETRY = "retry"
    """Run the same stage again, here, after ``Verdict.delay`` seconds."""
    REUPLOAD = "reupload"
    """Go back through ``upload``, then run ``execute`` again."""
    FAIL = "fail"
    """A permanent error: the element fails now."""
    GIVE_UP = "give_up"
    """Worth retrying, but the retries are spent: the element fails."""


@dataclass(frozen=True)
class Verdict:
    """A decision, how long to wait before acting on it, and the reason to record."""

    decision: Decision
    reason: str
    delay: float = 0.0

    @property
    def fails_element(self) -> bool:
        """True when the element fails (FAIL or GIVE_UP)."""
        return self.decision in (Decision.FAIL, Decision.GIVE_UP)


def is_transient(exc: BaseException) -> bool:
    """Whether trying again may succeed: a RemexError says so itself; an error
    that is not remex's (a bug, the host's trouble) is given the benefit of
    the doubt, bounded by the retry limit."""
    return exc.transient if isinstance(exc, RemexError) else True


@dataclass(frozen=True)
class FailurePolicy:
    """The limits and the decisions for a failed stage.

    Args:
        max_transient_retries: transient failures of one stage in a row
            retried before the element fails.
        max_reuploads: how often ``execute`` may send the element back
            through ``upload``.
        backoff: the wait before retry ``n`` (see :meth:`delay`).
        max_deliveries: how often one task message may be delivered (its
            worker died holding it) before the element fails.
        max_sends: how often the reconciler may send an element's chain
            (its workers kept dying) before the element fails.
    """

    max_transient_retries: int = 5
    max_reuploads: int = 2
    backoff: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(initial_backoff=1.0, max_backoff=60.0, multiplier=2.0)
    )
    max_deliveries: int = 3
    max_sends: int = 5

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``failures`` (>= 1) transient failures in a row."""
        return self.backoff.backoff(max(failures, 1) - 1, rng or _RNG)

    def decide(
        self,
        stage: str,
        exc: BaseException,
        *,
        failures: int,
        reuploads: int = 0,
        rng: random.Random | None = None,
    ) -> Verdict:
        """What to do after ``stage`` raised ``exc``.

        Args:
            stage: the stage's name (``execute`` may re-upload).
            exc: what it raised.
            failures: transient failures of this stage in a row, this one included.
            reuploads: re-uploads this element has had already.
            rng: jitter source (tests pass a seeded one).
        """
        if isinstance(exc, BuildFailedError):
            return Verdict(Decision.FAIL, exc.reason)
        if stage == "execute" and isinstance(exc, MissingBlobsError):
            if reuploads >= self.max_reuploads:
                return Verdict(
                    Decision.GIVE_UP,
                    f"execute: {exc} (after {self.max_reuploads} re-uploads)",
                )
            return Verdict(Decision.REUPLOAD, f"execute: {exc}")
        if (
            stage == "execute"
            and isinstance(exc, ExecutionError)
            and exc.transient
            and reuploads < self.max_reuploads
        ):
            return Verdict(Decision.REUPLOAD, f"execute: {exc}", self.delay(failures, rng))
        if not is_transient(exc):
            return Verdict(Decision.FAIL, f"{stage}: {exc}")
        if failures > self.max_transient_retries:
            return Verdict(Decision.GIVE_UP, f"{stage} failed {failures} times: {exc}")
        return Verdict(Decision.RETRY, f"{stage}: {exc}", self.delay(failures, rng))


DEFAULT_POLICY = FailurePolicy()
"""The policy remex runs with."""

_RNG = random.Random()
