"""The one retry policy for every RPC remex makes.

Transient gRPC codes are retried with exponential backoff and equal jitter,
bounded by a number of attempts and by an overall deadline; a server's
``google.rpc.RetryInfo`` delay is honoured (never shortened). Time comes from
an injectable :class:`Clock`, so tests drive the backoff without sleeping.

This module and :mod:`pipeline.reapi.channel` are where grpc errors are
translated into the project's own exceptions; nothing above this layer sees a
``grpc.RpcError``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from pipeline.errors import RemexError, RemoteError

T = TypeVar("T")

# Codes that say "the same call may succeed later". NOT_FOUND, INVALID_ARGUMENT,
# FAILED_PRECONDITION, PERMISSION_DENIED ... are answers about the request itself.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class Clock(Protocol):
    """Where the retry loop reads time and waits."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure.

    After failed attempt ``n`` (counting from 0) the wait is a random time in
    ``[c/2, c]`` with ``c = min(max_backoff, initial_backoff * multiplier**n)``
    ("equal jitter": spread out, yet growing, so a handful of unlucky draws
    cannot spend all attempts within a second of a server restart), or the
    server's RetryInfo delay when that is longer. No wait may end past
    ``deadline`` seconds after the first attempt started. The defaults ride
    out about 10 s of a server being away.
    """

    max_attempts: int = 10
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    deadline: float = 60.0
    jitter: bool = True

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return rng.uniform(ceiling / 2, ceiling) if self.jitter else ceiling


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass
class Retrier:
    """Runs calls under a :class:`RetryPolicy`.

    Args:
        policy: the bounds.
        clock: time source; tests pass a fake one.
        rng: jitter source; tests pass a seeded one.
    """

    policy: RetryPolicy
    clock: Clock
    rng: random.Random

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()

    def call(self, fn: Callable[[], T], *, what: str = "RPC") -> T:
        """Run ``fn`` until it succeeds, fails permanently, or the bounds are spent.

        ``fn`` may raise ``grpc.RpcError`` (translated here) or a
        :class:`RemexError` (retried when ``transient``).

        Raises:
            RemexError: the last error, translated; permanent errors at once.
        """
        attempts = self.attempts()
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                attempts.failed(translate_rpc_error(exc, what=what), retry_delay_hint(exc))
            except RemexError as exc:
                attempts.failed(exc)

    def attempts(self) -> Attempts:
        """A fresh attempt counter for a retry loop written by hand (see execution)."""
        return Attempts(self)


class Attempts:
    """The state of one retry loop: how many attempts, since when.

    Call :meth:`failed` after each failure: it raises when the error is
    permanent or the bounds are spent, and otherwise sleeps the backoff.
    """

    def __init__(self, retrier: Retrier) -> None:
        self._retrier = retrier
        self._start = retrier.clock.monotonic()
        self.count = 0

    def failed(self, error: RemexError, delay_hint: float | None = None) -> None:
        """Account for a failed attempt; wait before the next one, or raise ``error``."""
        policy, clock = self._retrier.policy, self._retrier.clock
        if not error.transient:
            raise error
        self.count += 1
        if self.count >= policy.max_attempts:
            raise _exhausted(error, "1 attempt" if self.count == 1 else f"{self.count} attempts")
        delay = policy.backoff(self.count - 1, self._retrier.rng)
        if delay_hint is not None:
            delay = max(delay, delay_hint)
        if clock.monotonic() - self._start + delay > policy.deadline:
            raise _exhausted(error, f"the {policy.deadline:g} s retry deadline")
        clock.sleep(delay)


def _exhausted(error: RemexError, bound: str) -> RemexError:
    # Keep the error's class and transient flag (a task-level retry may still
    # succeed later) but say why we stopped.
    error.args = (f"{error.args[0]} (gave up after {bound})", *error.args[1:])
    return error


def status_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The code and details of a gRPC error."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    return code, details


def rich_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a server attached to an error, if any."""
    if not isinstance(exc, grpc.Call):
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a malformed trailer is ignored, not fatal
                return None
            return status
    return None


def retry_delay_hint(exc: grpc.RpcError) -> float | None:
    """Seconds a server asked us to wait through ``google.rpc.RetryInfo``."""
    status = rich_status(exc)
    return retry_delay_of_status(status) if status is not None else None


def retry_delay_of_status(status: status_pb2.Status) -> float | None:
    """The RetryInfo delay inside a ``google.rpc.Status``, in seconds."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def translate_rpc_error(exc: grpc.RpcError, *, what: str = "RPC") -> RemoteError:
    """Turn a ``grpc.RpcError`` into a :class:`RemoteError` marked transient or not."""
    code, details = status_of(exc)
    return RemoteError(
        f"{what} failed: {code.name}: {details}",
        code=code.name,
        transient=code in TRANSIENT_CODES,
    )
