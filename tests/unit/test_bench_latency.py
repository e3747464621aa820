"""bench.latency's split of an element's time into segments."""

from __future__ import annotations

import pytest

from bench.latency import STAGES, ElementTimes


def _element(starts: dict[str, float]) -> ElementTimes:
    t = ElementTimes("a.bst", ["dep.bst"], queued=10.0, finished=11.0)
    t.stage_start = dict(starts)
    t.timings = {stage: 0.1 for stage in STAGES}
    return t


def test_every_stage_start_recorded_gives_each_hop() -> None:
    # Given starts for every stage (0.05 s between one stage's end and the next)
    starts, when = {}, 10.02
    for stage in STAGES:
        starts[stage] = when
        when += 0.15
    seg = _element(starts).segments(ready=9.9)
    assert seg is not None
    # Then the sender, the pickup and each hop are what the times say
    assert seg["sender"] == pytest.approx(0.1)
    assert seg["pickup"] == pytest.approx(0.02)
    assert seg["hop->upload"] == pytest.approx(0.05)
    assert seg["tail"] == pytest.approx(11.0 - (10.02 + 4 * 0.15 + 0.1))
    # And the segments add up to ready -> finished
    assert sum(seg.values()) == pytest.approx(11.0 - 9.9)


def test_stage_starts_not_recorded_put_their_waits_in_the_next_known_hop() -> None:
    # Given only execute's start (a worker's batch recorded that stage alone)
    seg = _element({"execute": 10.5}).segments(ready=None)
    assert seg is not None
    # Then the wait before execute covers the unrecorded pickup and hops
    assert seg["pickup"] == 0.0 and seg["hop->upload"] == 0.0
    assert seg["hop->execute"] == pytest.approx(10.5 - (10.0 + 0.2))
    # And the segments still add up to queued -> finished
    assert sum(seg.values()) == pytest.approx(1.0)


def test_an_element_not_built_here_has_no_segments() -> None:
    t = ElementTimes("a.bst", [], queued=10.0)
    assert t.segments(ready=None) is None
