"""Which Redis lists the reconciler reads to find the messages still queued."""

from __future__ import annotations

from pipeline.broker import PRIORITY_SEP, PRIORITY_STEPS, message_priority, queue_lists


def test_a_queue_has_one_list_per_priority_step() -> None:
    lists = queue_lists("remex")
    assert len(lists) == len(PRIORITY_STEPS)
    assert lists[0] == "remex" and lists[1] == f"remex{PRIORITY_SEP}{PRIORITY_STEPS[1]}"


def test_only_the_lists_of_the_builds_priorities_are_read() -> None:
    # Given builds of priorities 2 and 5 in flight
    lists = queue_lists("remex.host.w1", [2, 5])
    # Then only the lists their stage messages go to are read (3 per build priority)
    steps = sorted(
        {
            message_priority(p, s)
            for p in (2, 5)
            for s in ("stage_to_cas", "execute", "fetch_outputs")
        }
    )
    assert lists == [f"remex.host.w1{PRIORITY_SEP}{step}" for step in steps]
    assert len(lists) == 6
    # And priority 0 is the queue's own name
    assert queue_lists("remex", [0])[0] == "remex"
    # And none when no build is in flight
    assert queue_lists("remex", []) == []
