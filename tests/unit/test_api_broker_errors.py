"""A Redis that cannot be reached: bounded retries, then one clear error;
``wait`` follows a build across a Redis restart. No network: the scheduler
is replaced by a stand-in whose reads fail as redis-py's do."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from pipeline import api
from pipeline.config import RemexConfig
from pipeline.errors import BrokerUnavailableError, RemexError
from pipeline.scheduler import BuildStatus, reconnect_retries

CONFIG = RemexConfig(broker_url="redis://:secret@127.0.0.1:9/0")


class FlakyScheduler:
    """status() raises ConnectionError ``failures`` times, then reports ``final``."""

    def __init__(self, failures: int, final: str = "succeeded") -> None:
        self.failures = failures
        self.final = final
        self.calls = 0

        # wait() also reads the build's status field between full reads.
        self.keys = self
        self.redis = self

    def status(self, build_id: str) -> BuildStatus:
        self.calls += 1
        if self.calls <= self.failures:
            raise redis.exceptions.ConnectionError("Error 111 connecting. Connection refused.")
        return BuildStatus(build_id, self.final, {}, [])

    def build(self, build_id: str, part: str) -> str:
        return f"remex:build:{build_id}:{part}"

    def hget(self, key: str, field: str) -> str:
        if self.calls <= self.failures:
            raise redis.exceptions.ConnectionError("Error 111 connecting. Connection refused.")
        return self.final


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(scheduler: FlakyScheduler) -> FlakyScheduler:
        monkeypatch.setattr(api.Scheduler, "from_url", lambda *a, **k: scheduler)
        return scheduler

    return install


def test_wait_follows_a_build_across_a_redis_outage(flaky: Any) -> None:
    # Given a Redis that refuses three reads, then is back
    scheduler = flaky(FlakyScheduler(failures=3))
    # Then wait returns the build's final status, without an error
    status = api.wait("b1", config=CONFIG, poll=0.0)
    assert status.status == "succeeded"
    assert scheduler.calls == 4


def test_wait_gives_up_after_the_bound_with_one_clear_error(
    flaky: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a Redis that never comes back, and a bound of 0 s
    flaky(FlakyScheduler(failures=10**6))
    monkeypatch.setattr(api, "WAIT_RECONNECT_SECONDS", 0.0)
    # Then wait raises a RemexError naming Redis, without its password
    with pytest.raises(BrokerUnavailableError) as raised:
        api.wait("b1", config=CONFIG, poll=0.0)
    assert isinstance(raised.value, RemexError) and raised.value.transient
    message = str(raised.value)
    assert "cannot reach Redis at redis://:**@127.0.0.1:9/0" in message
    assert "secret" not in message


def test_status_turns_an_unreachable_redis_into_one_error(flaky: Any) -> None:
    flaky(FlakyScheduler(failures=1))
    with pytest.raises(BrokerUnavailableError, match="Connection refused"):
        api.status("b1", config=CONFIG)


def test_the_reconnect_backoff_fills_the_bound() -> None:
    # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 = 3.1 s, then 2 s each
    assert reconnect_retries(0) == 0
    assert reconnect_retries(3.0) == 5
    assert reconnect_retries(30.0) == 19


def test_wait_keeps_its_own_timeout_during_an_outage(flaky: Any) -> None:
    # Given a Redis that never comes back within the bound, and a follower
    # that asked to give up after 0 s
    flaky(FlakyScheduler(failures=10**6))
    # Then its timeout wins over riding out the outage
    with pytest.raises(TimeoutError, match=r"not done after 0\.0 s"):
        api.wait("b1", config=CONFIG, poll=0.0, timeout=0.0)


class SlowScheduler(FlakyScheduler):
    """A build whose whole status takes 0.05 s to read and that ends after 0.6 s."""

    def __init__(self) -> None:
        super().__init__(failures=0, final="running")
        self.ends = time.monotonic() + 0.6

    def status(self, build_id: str) -> BuildStatus:
        time.sleep(0.05)
        self.final = "succeeded" if time.monotonic() >= self.ends else "running"
        return super().status(build_id)

    def hget(self, key: str, field: str) -> str:
        return "succeeded" if time.monotonic() >= self.ends else "running"


def test_wait_reads_a_costly_status_less_often(flaky: Any) -> None:
    # Given a build whose status takes 0.05 s to read, followed with a 1 ms poll
    scheduler = flaky(SlowScheduler())
    # Then wait spends at most about a fifth of the time reading it (0.6 s at a
    # 1 ms poll would be 12 reads), and still sees the end
    assert api.wait("b1", config=CONFIG, poll=0.001).status == "succeeded"
    assert scheduler.calls <= 5, scheduler.calls
