"""StagingWindow (tasks/runtime.py): how many elements a worker process
stages at once, with real threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tasks.runtime import StagingWindow


def enter_in_thread(
    window: StagingWindow, key: tuple[str, str], log: list[str]
) -> threading.Thread:
    def run() -> None:
        window.enter(key)
        log.append(key[1])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_without_a_limit_nothing_waits() -> None:
    window = StagingWindow(0)
    for index in range(50):
        assert window.enter(("b", f"e{index}")) == 0.0
    assert window.holding() == 0


def test_a_full_window_makes_the_next_element_wait_for_a_place() -> None:
    # Given a window of two, both places taken
    window = StagingWindow(2, lease=30.0)
    assert window.enter(("b", "a")) < 0.05
    assert window.enter(("b", "b")) < 0.05
    assert window.holding() == 2
    # When a third element comes, then it waits
    entered: list[str] = []
    thread = enter_in_thread(window, ("b", "c"), entered)
    time.sleep(0.2)
    assert entered == []
    # Until a holder gives its place up (an unknown key gives nothing)
    window.leave(("b", "nobody"))
    time.sleep(0.1)
    assert entered == []
    window.leave(("b", "a"))
    thread.join(5)
    assert entered == ["c"] and window.holding() == 2
    # And the window counts that one wait (remex_stats reports it)
    stats = window.stats()
    assert stats["staging_size"] == 2 and stats["staging_peak"] == 2
    assert stats["staging_waits"] == 1 and 250 <= stats["staging_waited_ms"] < 5000


def test_an_element_that_holds_a_place_enters_again_without_waiting() -> None:
    window = StagingWindow(1, lease=30.0)
    window.enter(("b", "a"))
    started = time.monotonic()
    assert window.enter(("b", "a")) < 0.05
    assert time.monotonic() - started < 0.05 and window.holding() == 1


def test_waiting_elements_enter_in_the_order_they_came() -> None:
    window = StagingWindow(1, lease=30.0)
    window.enter(("b", "first"))
    entered: list[str] = []
    threads = []
    for name in ("second", "third", "fourth"):
        threads.append(enter_in_thread(window, ("b", name), entered))
        time.sleep(0.05)  # (arrival order)
    # As each holder gives its place up, the longest waiting takes it
    expected: list[str] = []
    for held, following in (("first", "second"), ("second", "third"), ("third", "fourth")):
        window.leave(("b", held))
        expected.append(following)
        wait_until(lambda: len(entered) == len(expected))
        assert entered == expected
    for thread in threads:
        thread.join(5)
    assert entered == ["second", "third", "fourth"]


def test_a_place_never_given_up_ends_with_its_lease() -> None:
    # Given a holder whose next stage never comes (no leave)
    window = StagingWindow(1, lease=0.3)
    window.enter(("b", "lost"))
    # When another element comes, then it gets the place once the lease ends
    started = time.monotonic()
    waited = window.enter(("b", "next"))
    assert 0.2 <= waited <= 2.0 and 0.2 <= time.monotonic() - started <= 2.0
    assert window.holding() == 1
