"""pipeline.api.wait rides out a Redis restart (tests/deploy/ restarts the
compose stack's Redis mid-build for real) but not a lasting outage."""

from __future__ import annotations

from typing import Any

import pytest
import redis.exceptions

from pipeline import api
from pipeline.config import RemexConfig, load_config
from pipeline.scheduler import BuildStatus


class FlakyScheduler:
    """``status`` fails with the given errors first, then reports ``final``."""

    def __init__(self, errors: list[Exception], final: str = "succeeded") -> None:
        self.errors = list(errors)
        self.final = final
        self.calls = 0

    def status(self, build_id: str) -> BuildStatus:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return BuildStatus(build_id, self.final, {}, [])


def config() -> RemexConfig:
    env = {"REMEX_CONFIG": "/dev/null", "REMEX_STACK_DIR": "/nonexistent"}
    env["REMEX_BROKER_URL"] = "redis://127.0.0.1:1/0"
    return load_config(environ=env)


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(api.time, "sleep", slept.append)
    return slept


def use(monkeypatch: pytest.MonkeyPatch, scheduler: FlakyScheduler) -> None:
    def from_url(url: str, **_: Any) -> FlakyScheduler:
        return scheduler

    monkeypatch.setattr(api.Scheduler, "from_url", from_url)


def test_wait_follows_the_build_through_a_redis_restart(
    monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    # Given Redis refusing, then loading its AOF, then answering
    errors: list[Exception] = [
        redis.exceptions.ConnectionError("Connection refused"),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
    ]
    scheduler = FlakyScheduler(errors)
    use(monkeypatch, scheduler)
    # When a build is followed
    final = api.wait("b1", config=config())
    # Then the follower waited the outage out and got the final status
    assert final.status == "succeeded"
    assert scheduler.calls == 4
    assert no_sleep == [1.0, 1.0, 1.0]


def test_wait_gives_up_when_redis_stays_unreachable(
    monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    # Given Redis unreachable for longer than the tolerance (a clock that
    # moves 10 s per look)
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(api.time, "monotonic", lambda: float(next(clock)))
    scheduler = FlakyScheduler([redis.exceptions.ConnectionError("refused")] * 100)
    use(monkeypatch, scheduler)
    # When a build is followed, then the error reaches the caller
    with pytest.raises(redis.exceptions.ConnectionError):
        api.wait("b1", config=config())
    assert scheduler.calls < 20


def test_wait_keeps_its_timeout_during_an_outage(
    monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    # Given Redis unreachable and a follower with a 5 s timeout
    clock = iter(range(0, 10_000, 2))
    monkeypatch.setattr(api.time, "monotonic", lambda: float(next(clock)))
    use(monkeypatch, FlakyScheduler([redis.exceptions.ConnectionError("refused")] * 100))
    # Then it times out as it would with Redis up
    with pytest.raises(TimeoutError, match="not done after 5"):
        api.wait("b1", config=config(), timeout=5)
