"""The one retry policy: which errors are retried, how long we wait, when we stop.

Time is a :class:`FakeClock`, jitter a seeded ``random.Random``: nothing here
sleeps. gRPC errors are made without a server by :class:`FakeRpcError`, except
in the last test, which retries against a real in-process gRPC server.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from pipeline.errors import (
    BlobNotFoundError,
    ConfigError,
    ProtocolError,
    RemexError,
    RemoteError,
)
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.reapi.retry import (
    NO_RETRY,
    TRANSIENT_CODES,
    Retrier,
    RetryPolicy,
    retry_delay_hint,
    translate_rpc_error,
)
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from protos.build.bazel.semver import semver_pb2
from tests.fakeserver import serve_capabilities

TRANSIENT = [
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
]
PERMANENT = [
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.CANCELLED,
]


# ------------------------------------------------------------------ helpers


class FakeClock:
    """A clock whose time only moves when the code under test sleeps."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, f"negative sleep {seconds}"
        self.sleeps.append(seconds)
        self.now += seconds


class FakeRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a failed unary call raises, without a server behind it."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str = "boom",
        trailers: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailers

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return ()

    # grpc.RpcContext / grpc.Future parts nobody here uses.
    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        raise NotImplementedError


class Script:
    """A callable that raises the given errors in turn, then returns ``result``."""

    def __init__(self, errors: list[BaseException], result: object = "ok") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


class Always:
    """A callable that raises ``error`` on every call."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        raise self.error


def retry_info_trailer(seconds: int, nanos: int = 0) -> tuple[str, bytes]:
    """A ``grpc-status-details-bin`` trailer asking the client to wait."""
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], details=[detail])
    return ("grpc-status-details-bin", status.SerializeToString())


def make_retrier(policy: RetryPolicy, seed: int = 7) -> tuple[Retrier, FakeClock]:
    clock = FakeClock()
    return Retrier(policy, clock=clock, rng=random.Random(seed)), clock


# ------------------------------------------------------------ classification


def test_the_transient_code_set_is_exactly_the_documented_one() -> None:
    # Given the module's set of retryable codes
    # Then it holds the six transient codes and nothing else
    assert set(TRANSIENT_CODES) == set(TRANSIENT)


@pytest.mark.parametrize("code", TRANSIENT, ids=lambda c: c.name)
def test_translate_marks_transient_codes_transient(code: grpc.StatusCode) -> None:
    # Given a gRPC error with a transient code
    exc = FakeRpcError(code, "server hiccup")
    # When it is translated
    error = translate_rpc_error(exc, what="FindMissingBlobs")
    # Then it is a transient RemoteError carrying the code name and details
    assert type(error) is RemoteError
    assert error.code == code.name
    assert error.transient is True
    assert "FindMissingBlobs" in str(error)
    assert "server hiccup" in str(error)
    assert code.name in str(error)


@pytest.mark.parametrize("code", PERMANENT, ids=lambda c: c.name)
def test_translate_marks_other_codes_permanent(code: grpc.StatusCode) -> None:
    # Given a gRPC error with a code about the request itself
    # When it is translated
    error = translate_rpc_error(FakeRpcError(code))
    # Then it is a permanent RemoteError with that code
    assert error.code == code.name
    assert error.transient is False


def test_translate_of_a_bare_rpc_error_is_unknown_and_transient() -> None:
    # Given an RpcError that is not a grpc.Call (no code() to ask)
    exc = grpc.RpcError("socket closed")
    # When it is translated
    error = translate_rpc_error(exc)
    # Then it is UNKNOWN, transient, and keeps the message
    assert error.code == "UNKNOWN"
    assert error.transient is True
    assert "socket closed" in str(error)


@pytest.mark.parametrize("code", TRANSIENT, ids=lambda c: c.name)
def test_transient_codes_are_retried_until_success(code: grpc.StatusCode) -> None:
    # Given a call that fails twice with a transient code, then succeeds
    retrier, clock = make_retrier(RetryPolicy(max_attempts=5))
    fn = Script([FakeRpcError(code), FakeRpcError(code)], result="answer")
    # When it runs under the retrier
    result = retrier.call(fn)
    # Then the third call's answer comes back, after two waits
    assert result == "answer"
    assert fn.calls == 3
    assert len(clock.sleeps) == 2


@pytest.mark.parametrize("code", PERMANENT, ids=lambda c: c.name)
def test_permanent_codes_are_raised_after_one_call(code: grpc.StatusCode) -> None:
    # Given a call that fails with a permanent code
    retrier, clock = make_retrier(RetryPolicy(max_attempts=5))
    fn = Always(FakeRpcError(code, "no such thing"))
    # When it runs under the retrier
    with pytest.raises(RemoteError) as info:
        retrier.call(fn, what="GetActionResult")
    # Then it was called once, nobody waited, and the error is translated
    assert fn.calls == 1
    assert clock.sleeps == []
    assert info.value.code == code.name
    assert info.value.transient is False
    assert "GetActionResult" in str(info.value)
    assert "no such thing" in str(info.value)
    assert "gave up" not in str(info.value)
    assert not isinstance(info.value, grpc.RpcError)


def test_a_transient_remex_error_raised_by_fn_is_retried() -> None:
    # Given a call that raises the project's own transient error once
    retrier, clock = make_retrier(RetryPolicy(max_attempts=5))
    fn = Script([BlobNotFoundError("blob vanished mid-read", transient=True)], result=42)
    # When it runs under the retrier
    result = retrier.call(fn)
    # Then it is retried, and the second call's answer comes back
    assert result == 42
    assert fn.calls == 2
    assert len(clock.sleeps) == 1


def test_a_permanent_remex_error_raised_by_fn_is_raised_as_is() -> None:
    # Given a call that raises a permanent RemexError subclass
    retrier, clock = make_retrier(RetryPolicy(max_attempts=5))
    error = ProtocolError("digest mismatch")
    fn = Always(error)
    # When it runs under the retrier
    with pytest.raises(ProtocolError) as info:
        retrier.call(fn)
    # Then the very same exception is raised after one call
    assert info.value is error
    assert fn.calls == 1
    assert clock.sleeps == []


def test_a_transient_flag_alone_decides_for_any_remex_error() -> None:
    # Given a ConfigError (permanent by class) forced transient
    retrier, _ = make_retrier(RetryPolicy(max_attempts=3))
    fn = Script([ConfigError("token file being rotated", transient=True)], result="ok")
    # When it runs under the retrier
    # Then it is retried
    assert retrier.call(fn) == "ok"
    assert fn.calls == 2


def test_other_exceptions_are_not_caught() -> None:
    # Given a call that raises something that is neither RpcError nor RemexError
    retrier, clock = make_retrier(RetryPolicy(max_attempts=5))
    fn = Always(KeyError("bug"))
    # When it runs under the retrier
    # Then the exception passes through untouched, after one call
    with pytest.raises(KeyError):
        retrier.call(fn)
    assert fn.calls == 1
    assert clock.sleeps == []


def test_no_retry_policy_makes_exactly_one_call() -> None:
    # Given the NO_RETRY policy and a transient failure
    retrier, clock = make_retrier(NO_RETRY)
    fn = Always(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    # When it runs
    with pytest.raises(RemoteError) as info:
        retrier.call(fn)
    # Then there was one call, no wait, and the error stays transient
    assert fn.calls == 1
    assert clock.sleeps == []
    assert info.value.transient is True


# ------------------------------------------------------------------ backoff


def test_backoff_without_jitter_grows_exponentially_up_to_max_backoff() -> None:
    # Given a policy without jitter, 0.1 s doubling, capped at 1 s
    policy = RetryPolicy(
        max_attempts=10, initial_backoff=0.1, multiplier=2.0, max_backoff=1.0, jitter=False
    )
    retrier, clock = make_retrier(policy)
    fn = Always(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    # When a call keeps failing transiently
    with pytest.raises(RemoteError):
        retrier.call(fn)
    # Then the waits are 0.1, 0.2, 0.4, 0.8 and then 1.0 for ever
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_backoff_with_jitter_stays_within_zero_and_the_ceiling() -> None:
    # Given the default jittered policy and a seeded random source
    policy = RetryPolicy(
        max_attempts=12, initial_backoff=0.1, multiplier=2.0, max_backoff=2.0, deadline=1e9
    )
    retrier, clock = make_retrier(policy, seed=1234)
    fn = Always(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED))
    # When a call keeps failing transiently
    with pytest.raises(RemoteError):
        retrier.call(fn)
    # Then each wait n lies in [0, min(max_backoff, 0.1 * 2**n)]
    assert len(clock.sleeps) == 11
    for n, wait in enumerate(clock.sleeps):
        ceiling = min(2.0, 0.1 * 2.0**n)
        assert 0.0 <= wait <= ceiling, (n, wait, ceiling)
    # And the jitter is real: the waits are not all at the ceiling
    ceilings = [min(2.0, 0.1 * 2.0**n) for n in range(11)]
    assert clock.sleeps != pytest.approx(ceilings)


def test_backoff_is_reproducible_for_a_given_seed() -> None:
    # Given two retriers with the same seed
    policy = RetryPolicy(max_attempts=6)
    first, first_clock = make_retrier(policy, seed=99)
    second, second_clock = make_retrier(policy, seed=99)
    # When each retries the same failing call
    for retrier in (first, second):
        with pytest.raises(RemoteError):
            retrier.call(Always(FakeRpcError(grpc.StatusCode.ABORTED)))
    # Then they waited the same times
    assert first_clock.sleeps == second_clock.sleeps
    assert len(first_clock.sleeps) == 5


def test_policy_backoff_matches_the_documented_formula() -> None:
    # Given a policy and a random source that always picks the upper end
    policy = RetryPolicy(initial_backoff=0.5, multiplier=3.0, max_backoff=10.0)

    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    # When asked for the backoff after each attempt
    waits = [policy.backoff(n, Top()) for n in range(5)]
    # Then it is min(max_backoff, initial * multiplier**n)
    assert waits == pytest.approx([0.5, 1.5, 4.5, 10.0, 10.0])


# ------------------------------------------------------------------- bounds


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 8])
def test_max_attempts_bounds_the_number_of_calls(max_attempts: int) -> None:
    # Given a call that always fails transiently
    retrier, clock = make_retrier(RetryPolicy(max_attempts=max_attempts, deadline=1e9))
    fn = Always(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down"))
    # When it runs under the retrier
    with pytest.raises(RemoteError) as info:
        retrier.call(fn, what="BatchReadBlobs")
    # Then it was called exactly max_attempts times, waiting between calls only
    assert fn.calls == max_attempts
    assert len(clock.sleeps) == max_attempts - 1
    # And the last error is raised, still transient, saying why we stopped
    assert info.value.code == "UNAVAILABLE"
    assert info.value.transient is True
    if max_attempts > 1:
        assert f"gave up after {max_attempts} attempts" in str(info.value)


def test_deadline_stops_retrying_before_it_is_exceeded() -> None:
    # Given a 10 s deadline, no jitter, and waits of 1, 2, 4, 8 ... s
    policy = RetryPolicy(
        max_attempts=100,
        initial_backoff=1.0,
        multiplier=2.0,
        max_backoff=100.0,
        deadline=10.0,
        jitter=False,
    )
    retrier, clock = make_retrier(policy)
    start = clock.now
    fn = Always(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED))
    # When a call keeps failing
    with pytest.raises(RemoteError) as info:
        retrier.call(fn)
    # Then it waited 1 + 2 + 4 = 7 s and stopped: another 8 s would pass 10 s
    assert clock.sleeps == [1.0, 2.0, 4.0]
    assert fn.calls == 4
    assert clock.now - start <= policy.deadline
    assert "10 s retry deadline" in str(info.value)
    assert info.value.transient is True


def test_deadline_counts_the_time_calls_themselves_take() -> None:
    # Given calls that each take 3 s of (fake) time and a 10 s deadline
    policy = RetryPolicy(
        max_attempts=100, initial_backoff=1.0, multiplier=1.0, deadline=10.0, jitter=False
    )
    retrier, clock = make_retrier(policy)
    start = clock.now
    calls = 0

    def slow_failure() -> None:
        nonlocal calls
        calls += 1
        clock.now += 3.0
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

    # When it runs under the retrier
    with pytest.raises(RemoteError):
        retrier.call(slow_failure)
    # Then the loop stops once the next wait would end past the deadline:
    # 3 + 1 + 3 + 1 = 8 s, then 8 + 3 = 11 s would leave no room to wait
    assert calls == 3
    assert clock.sleeps == [1.0, 1.0]
    assert clock.now - start == pytest.approx(11.0)


def test_deadline_never_lets_a_wait_end_past_it_with_jitter() -> None:
    # Given many seeds, a 5 s deadline and large jittered waits
    for seed in range(50):
        policy = RetryPolicy(max_attempts=1000, initial_backoff=0.5, max_backoff=3.0, deadline=5.0)
        retrier, clock = make_retrier(policy, seed=seed)
        start = clock.now
        # When a call keeps failing
        with pytest.raises(RemoteError):
            retrier.call(Always(FakeRpcError(grpc.StatusCode.UNAVAILABLE)))
        # Then the total of the waits never passes the deadline
        assert clock.now - start <= 5.0
        assert sum(clock.sleeps) <= 5.0


def test_attempts_can_drive_a_hand_written_loop() -> None:
    # Given a hand-written loop using the retrier's attempt counter
    retrier, clock = make_retrier(RetryPolicy(max_attempts=3, jitter=False))
    attempts = retrier.attempts()
    # When two transient failures are reported
    attempts.failed(RemoteError("x", code="UNAVAILABLE", transient=True))
    attempts.failed(RemoteError("y", code="UNAVAILABLE", transient=True))
    # Then it waited twice, and the third failure spends the bound
    assert attempts.count == 2
    assert clock.sleeps == pytest.approx([0.1, 0.2])
    with pytest.raises(RemoteError, match="gave up after 3 attempts"):
        attempts.failed(RemoteError("z", code="UNAVAILABLE", transient=True))
    # And a permanent failure is raised without counting or waiting
    fresh = retrier.attempts()
    with pytest.raises(RemoteError, match=r"^nope$"):
        fresh.failed(RemoteError("nope", code="NOT_FOUND", transient=False))
    assert fresh.count == 0


# ---------------------------------------------------------------- RetryInfo


def test_retry_info_in_the_trailer_is_read() -> None:
    # Given an error whose status details carry RetryInfo of 3.25 s
    exc = FakeRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, trailers=(retry_info_trailer(3, 250_000_000),)
    )
    # When its delay hint is read
    # Then it is 3.25 s
    assert retry_delay_hint(exc) == pytest.approx(3.25)


@pytest.mark.parametrize(
    "trailers",
    [
        (),
        (("some-key", "some-value"),),
        (("grpc-status-details-bin", b"\xff\xff not a proto"),),
        (("grpc-status-details-bin", status_pb2.Status(code=14).SerializeToString()),),
    ],
    ids=["no-trailers", "unrelated", "malformed", "status-without-retry-info"],
)
def test_no_retry_info_means_no_hint(trailers: tuple[tuple[str, Any], ...]) -> None:
    # Given an error without a usable RetryInfo
    exc = FakeRpcError(grpc.StatusCode.UNAVAILABLE, trailers=trailers)
    # When its delay hint is read
    # Then there is none
    assert retry_delay_hint(exc) is None


def test_retry_info_makes_the_wait_at_least_that_long() -> None:
    # Given a server that asks for 3 s, while our backoff would wait <= 0.1 s
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=0.1)
    retrier, clock = make_retrier(policy)
    busy = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, trailers=(retry_info_trailer(3),))
    fn = Script([busy, busy], result="done")
    # When the call runs under the retrier
    result = retrier.call(fn)
    # Then each wait was the server's 3 s, although it exceeds max_backoff
    assert result == "done"
    assert clock.sleeps == pytest.approx([3.0, 3.0])


def test_retry_info_does_not_shorten_a_longer_backoff() -> None:
    # Given our backoff of 2 s (no jitter) and a server asking for 1 s
    policy = RetryPolicy(max_attempts=3, initial_backoff=2.0, jitter=False)
    retrier, clock = make_retrier(policy)
    fn = Script([FakeRpcError(grpc.StatusCode.UNAVAILABLE, trailers=(retry_info_trailer(1),))])
    # When the call runs
    retrier.call(fn)
    # Then we waited our own, longer 2 s
    assert clock.sleeps == [2.0]


def test_retry_info_longer_than_the_deadline_stops_at_once() -> None:
    # Given a server asking for 30 s and a 10 s deadline
    retrier, clock = make_retrier(RetryPolicy(max_attempts=5, deadline=10.0))
    fn = Always(FakeRpcError(grpc.StatusCode.UNAVAILABLE, trailers=(retry_info_trailer(30),)))
    # When the call runs
    with pytest.raises(RemoteError, match="retry deadline"):
        retrier.call(fn)
    # Then we did not wait past the deadline: one call, no sleep
    assert fn.calls == 1
    assert clock.sleeps == []


def test_retry_info_on_a_permanent_error_is_ignored() -> None:
    # Given a permanent error that (oddly) carries RetryInfo
    retrier, clock = make_retrier(RetryPolicy(max_attempts=5))
    fn = Always(FakeRpcError(grpc.StatusCode.NOT_FOUND, trailers=(retry_info_trailer(1),)))
    # When the call runs
    with pytest.raises(RemoteError):
        retrier.call(fn)
    # Then it is not retried
    assert fn.calls == 1
    assert clock.sleeps == []


# ----------------------------------------------------- a real gRPC server


class FlakyCapabilities(re_grpc.CapabilitiesServicer):
    """Answers UNAVAILABLE ``failures`` times, then real capabilities."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> re_pb2.ServerCapabilities:
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"warming up ({self.calls})")
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=[re_pb2.DigestFunction.SHA256],
                max_batch_total_size_bytes=1024 * 1024,
            ),
            low_api_version=semver_pb2.SemVer(major=2),
            high_api_version=semver_pb2.SemVer(major=2, minor=3),
        )


@pytest.fixture
def flaky_server() -> Iterator[tuple[FlakyCapabilities, int]]:
    servicer = FlakyCapabilities(failures=2)
    with serve_capabilities(servicer) as port:
        yield servicer, port


def test_remote_retries_a_real_server_that_is_unavailable_twice(
    flaky_server: tuple[FlakyCapabilities, int],
) -> None:
    # Given a real server answering UNAVAILABLE twice before succeeding
    servicer, port = flaky_server
    clock = FakeClock()
    retrier = Retrier(RetryPolicy(max_attempts=5), clock=clock, rng=random.Random(3))
    # When a Remote asks for its capabilities
    with Remote(Endpoint(f"grpc://127.0.0.1:{port}"), retrier=retrier) as remote:
        caps = remote.capabilities()
        # Then the third call succeeded after two (fake) waits
        assert servicer.calls == 3
        assert len(clock.sleeps) == 2
        assert caps.high_api == (2, 3)
        # And the answer is cached: asking again makes no call
        assert remote.capabilities() is caps
        assert servicer.calls == 3


def test_remote_gives_up_on_a_real_server_after_max_attempts(
    flaky_server: tuple[FlakyCapabilities, int],
) -> None:
    # Given a real server answering UNAVAILABLE twice, and only two attempts allowed
    servicer, port = flaky_server
    retrier = Retrier(RetryPolicy(max_attempts=2), clock=FakeClock(), rng=random.Random(3))
    # When a Remote asks for its capabilities
    with (
        Remote(Endpoint(f"grpc://127.0.0.1:{port}"), retrier=retrier) as remote,
        pytest.raises(RemoteError) as info,
    ):
        remote.capabilities()
    # Then the server's error comes back translated, naming the call and the URL
    assert servicer.calls == 2
    assert info.value.code == "UNAVAILABLE"
    assert info.value.transient is True
    assert "GetCapabilities" in str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "warming up (2)" in str(info.value)
    assert isinstance(info.value, RemexError)
