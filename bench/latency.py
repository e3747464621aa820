"""Where a build's wall time goes, element by element, from its event stream.

A built element's life, as the scheduler records it (times from the
workers' and the sender's clocks, one machine here):

``ready``      its last build dependency finished (``built`` event)
``queued``     its chain was sent (``queued`` event: the finishing worker's
               ``finish`` script, which records the send, then the publish)
``stage S``    each stage task began (``stage`` event, ``start.lua``)
``timings``    each stage's own run time, measured by the stage
               (``info["timings"]``)
``finished``   the last stage marked it built (``finish.lua``)

From these: the sender's gap (ready -> queued), the pickup (queued -> the
first stage's start), each stage's work, each hop between stages (a stage's
end -> the next stage's start: Celery's publish, the broker, the consumer,
the pool, ``start.lua``), and the tail (the last stage's end -> finished:
the finish script). Along the critical path (from the last element to
finish back through the dependency that finished last, each time) the sum of
these segments is the build's wall time from the first element's queueing,
so a DAG's per-layer latency splits into them.

Used by :mod:`bench.vs_bst` (``--latency``) and on its own against a stack:
``.venv/bin/python -m bench.latency BUILD_ID`` (``REMEX_*`` or the stack's
configuration name the broker).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.scheduler import Scheduler

STAGES = ("stage_to_cas", "upload", "execute", "fetch_outputs", "push_artifact")
SEGMENTS = (
    "sender",
    "pickup",
    *(
        part
        for stage, after in zip(STAGES, (*STAGES[1:], ""), strict=True)
        for part in (stage, f"hop->{after}" if after else "tail")
    ),
)
"""The segments of one element's path, in order."""


@dataclass
class ElementTimes:
    """One element's recorded times (seconds since the epoch)."""

    name: str
    deps: list[str]
    queued: float | None = None
    finished: float | None = None
    stage_start: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def segments(self, ready: float | None) -> dict[str, float] | None:
        """Seconds per segment (None: the element was not built here).

        A worker records a stage's start in a batch, and only the latest
        stage of an element per batch (or none, when the element finishes
        before the batch goes out): a stage whose start was not recorded is
        taken to start when the one before it ended, and the wait before it
        is counted in the next hop whose end is known (or the tail). The
        segments still add up to queued -> finished."""
        if self.queued is None or self.finished is None:
            return None
        out: dict[str, float] = {}
        out["sender"] = self.queued - ready if ready is not None else 0.0
        cursor = self.queued
        for index, stage in enumerate(STAGES):
            before = "pickup" if index == 0 else f"hop->{stage}"
            start = self.stage_start.get(stage)
            if start is not None and start >= cursor:
                out[before] = start - cursor
                cursor = start
            else:
                out[before] = 0.0
            work = self.timings.get(stage, 0.0)
            out[stage] = work
            cursor += work
        out["tail"] = self.finished - cursor
        return out


def element_times(scheduler: Scheduler, build_id: str) -> dict[str, ElementTimes]:
    """Every element's times from the build's events, infos and dependents."""
    deps: dict[str, list[str]] = {}
    # Each element's dependents are in its raw info (issue 16), which
    # Scheduler.status leaves out; a build of an older remex has them in
    # B:dependents.
    infos: Any = scheduler.redis.hgetall(scheduler.keys.build(build_id, "info"))
    for name, encoded in dict(infos).items():
        deps.setdefault(str(name), [])
        try:
            dependents = json.loads(encoded).get("dependents") or []
        except (ValueError, AttributeError):
            continue
        for dependent in dependents:
            deps.setdefault(str(dependent), []).append(str(name))
    if not any(deps.values()):
        raw: Any = scheduler.redis.hgetall(scheduler.keys.build(build_id, "dependents"))
        for name, encoded in dict(raw).items():
            deps.setdefault(str(name), [])
            for dependent in json.loads(encoded) if encoded else []:
                deps.setdefault(str(dependent), []).append(str(name))
    times = {name: ElementTimes(name, d) for name, d in deps.items()}
    after = "0"
    while True:
        events = scheduler.read_events(build_id, after, count=10000)
        if not events:
            break
        after = events[-1].id
        for event in events:
            data = event.data
            name = data.get("element")
            if name not in times:
                continue
            kind = data.get("event")
            when = float(data.get("time") or 0.0)
            t = times[name]
            if kind == "queued":
                t.queued = when
                t.stage_start.clear()
            elif kind == "stage":
                t.stage_start[str(data.get("stage"))] = when
            elif kind == "built":
                t.finished = when
    for element in scheduler.status(build_id).elements:
        found = times.get(element.element)
        if found is not None:
            found.timings = {
                k: float(v) for k, v in (element.info.get("timings") or {}).items() if v is not None
            }
    return times


def critical_path(times: Mapping[str, ElementTimes]) -> list[tuple[ElementTimes, float | None]]:
    """From the element that finished last back through the dependency that
    finished last each time: (element, its ready time), first element first."""
    built = [t for t in times.values() if t.finished is not None]
    if not built:
        return []
    path: list[tuple[ElementTimes, float | None]] = []
    current: ElementTimes | None = max(built, key=lambda t: t.finished or 0.0)
    while current is not None:
        deps = [times[d] for d in current.deps if d in times and times[d].finished is not None]
        last = max(deps, key=lambda t: t.finished or 0.0) if deps else None
        path.append((current, last.finished if last else None))
        current = last
    path.reverse()
    return path


def ready_time(times: Mapping[str, ElementTimes], t: ElementTimes) -> float | None:
    """When the element's last dependency built in this build finished
    (None: none was, they were all cached)."""
    done = [f for d in t.deps if d in times and (f := times[d].finished) is not None]
    return max(done) if done else None


def report(times: Mapping[str, ElementTimes], label: str = "") -> list[str]:
    """Lines: the critical path's segments (sum and per element on it) and
    every element's medians."""
    lines: list[str] = []
    path = critical_path(times)
    on_path = [seg for t, ready in path if (seg := t.segments(ready)) is not None]
    # The first element's sender gap is the submit's, not a layer's.
    if on_path:
        on_path[0]["sender"] = 0.0
    every = [
        seg
        for t in times.values()
        if (seg := t.segments(ready_time(times, t))) is not None and t.deps
    ]
    if on_path:
        total = sum(sum(s.values()) for s in on_path)
        lines.append(
            f"{label}critical path: {len(on_path)} elements, {total:.2f} s from the first "
            f"queued to the last finished; per element on it (mean ms / sum s):"
        )
        lines.append(
            "  "
            + ", ".join(
                f"{k} {1000 * statistics.mean(s[k] for s in on_path):.0f}/"
                f"{sum(s[k] for s in on_path):.2f}"
                for k in SEGMENTS
            )
        )
    if every:
        lines.append(f"{label}all {len(every)} elements with dependencies, median ms:")
        lines.append(
            "  "
            + ", ".join(
                f"{k} {1000 * statistics.median(s[k] for s in every):.0f}" for k in SEGMENTS
            )
        )
    return lines


def executor_timeline(
    ctx: Any, scheduler: Scheduler, build_id: str, times: Mapping[str, ElementTimes], jobs: int
) -> list[str]:
    """Lines on the execution server's side, from each built element's
    ExecutedActionMetadata (``meta/artifact.json`` of its artifact): how long
    an action held a slot of the server (worker start -> completed), how many
    ran at once, and how much of the build's span all ``jobs`` slots were busy
    (a build capacity-bound on the server has them busy nearly always)."""
    from datetime import datetime

    from pipeline.stages import read_artifact_meta

    spans: list[tuple[float, float]] = []
    errors: list[str] = []
    # the execute stage's start -> the server's worker start; the worker's
    # completion -> the execute stage's end
    sides: dict[str, list[float]] = {
        "stage start -> worker start": [],
        "worker done -> stage end": [],
    }
    for name, t in times.items():
        if t.finished is None:
            continue
        try:
            uri = scheduler.spec(build_id, name)["artifact_uri"]
            timings = read_artifact_meta(ctx, uri).get("timings") or {}
            start, end = timings.get("worker_start"), timings.get("worker_completed")
        except Exception as exc:
            errors.append(f"{name}: {exc}")
            continue
        if not (start and end):
            continue
        s, e = datetime.fromisoformat(start).timestamp(), datetime.fromisoformat(end).timestamp()
        spans.append((s, e))
        if "execute" in t.stage_start:
            begun = t.stage_start["execute"]
            sides["stage start -> worker start"].append(s - begun)
            sides["worker done -> stage end"].append(begun + t.timings.get("execute", 0.0) - e)
    queued = [t.queued for t in times.values() if t.queued is not None]
    finished = [t.finished for t in times.values() if t.finished is not None]
    if not spans or not queued or not finished:
        why = f" (first error: {errors[0]})" if errors else ""
        return [f"executor: no ExecutedActionMetadata{why}"]
    first, last = min(queued), max(finished)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running, full, area, prev = 0, 0.0, 0.0, first
    for when, delta in events:
        when = min(max(when, first), last)
        if running >= jobs:
            full += when - prev
        area += running * (when - prev)
        running += delta
        prev = when
    span = last - first
    held = statistics.median(e - s for s, e in spans)
    return [
        f"executor: {len(spans)} actions, each held a slot median {1000 * held:.0f} ms; "
        f"over the {span:.2f} s from the first queued to the last finished, "
        f"{area / span:.1f} ran at once on average, all {jobs} slots busy "
        f"{100 * full / span:.0f} % of the time; {len(spans)} x {held:.2f} s / {jobs} = "
        f"{len(spans) * held / jobs:.2f} s",
        "executor: the execute stage, median ms: "
        + ", ".join(f"{k} {1000 * statistics.median(v):.0f}" for k, v in sides.items() if v)
        + f", slot held {1000 * held:.0f}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build_id")
    parser.add_argument("--broker", default=None, help="the Redis URL (default: the config's)")
    args = parser.parse_args(argv)
    url = args.broker
    if url is None:
        from pipeline.config import load_config

        url = load_config().require_broker()
    scheduler = Scheduler.from_url(url)
    for line in report(element_times(scheduler, args.build_id)):
        print(line)


if __name__ == "__main__":
    main()
