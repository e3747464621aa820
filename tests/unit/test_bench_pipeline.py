"""bench.pipeline's note on the executor's timeline (slots, idle time, refills)."""

from __future__ import annotations

import re

from bench.pipeline import casd_timeline


def _figure(note: str, pattern: str) -> float:
    match = re.search(pattern, note)
    assert match, f"{pattern!r} not in {note!r}"
    return float(match.group(1))


def test_two_slots_four_actions_give_idle_time_and_refills() -> None:
    # Given 2 slots: two actions 0..1 s and 0.5..1.5 s, then the two that
    # took their slots, at 1.1..2.1 s and 1.8..2.8 s
    spans = [(0.0, 1.0, 1.0), (0.5, 1.5, 1.0), (1.1, 2.1, 1.0), (1.8, 2.8, 1.0)]
    note = casd_timeline(spans, t0=0.0, jobs=2)
    # Then the second slot filled at +0.5 s, and the last ended at +2.8 s
    assert _figure(note, r"the 2th \+([\d.]+) s") == 0.5
    assert _figure(note, r"last done \+([\d.]+) s") == 2.8
    # And the idle slot-seconds split where the slots filled and where the last started:
    # filling 0.5 (one slot idle 0..0.5); between 0.1 + 0.3 (1.0..1.1, 1.5..1.8);
    # draining 0.7 (one slot idle 2.1..2.8)
    assert _figure(note, r"([\d.]+) filling") == 0.5
    assert _figure(note, r"([\d.]+) between") == 0.4
    assert _figure(note, r"([\d.]+) draining") == 0.7
    # And a freed slot was refilled 100 ms (1.0 -> 1.1) and 300 ms (1.5 -> 1.8) later
    assert _figure(note, r"refilled after median (\d+) ms") == 200
    assert _figure(note, r"\(max (\d+) ms\)") == 300


def test_no_refill_is_reported_when_every_action_started_at_once() -> None:
    # Given as many actions as slots
    note = casd_timeline([(0.0, 1.0, 1.0), (0.1, 1.0, 0.9)], t0=0.0, jobs=2)
    # Then the note has no refill figure
    assert "refilled" not in note
