"""Pipeline benchmark: wide, chained and no-op builds through Celery workers.

Starts redis-server, one buildbox-casd (``--jobs=8``; execution and
artifacts) and two ``remex worker`` processes (``-c 8`` each, their own local
CAS) with :class:`pipeline.servers.RemexStack` (production heartbeat and
reconciler settings), and builds projects made by
:func:`pipeline.testing.dag.make_dag_project` through the scripting API
(``pipeline.api.submit`` + ``pipeline.api.wait`` in this process: what a
script sees; the CLI adds Python start-up, shown in an extra row for the
no-op rebuild):

1. wide: 32 independent ``manual`` elements that each ``sleep 1`` (the base
   ``import`` element is built first: a row of its own, not in the timing).
   Limit: 32 / 8 jobs x 1 s = 4 s. Target: within 25 % of it (<= 5 s).
   The same 32 actions sent straight to casd at once (no Celery, no
   scheduler) are shown as casd's own floor: staged and uploaded first, only
   the Execute calls timed. A second floor times the whole pipeline without
   Celery or Redis: the project planned and its sources stored, then each
   element's five stage functions in a thread of its own, at once.
2. chain: 20 trivial ``manual`` elements, each build-depending on the one
   before. Target: < 150 ms per element on top of the action's own run
   time (the execute stage: the Execute RPC as the worker sees it, ~0.1 s on
   casd). The same chain built in-process (``pipeline.stages.build_plan``,
   no Celery, no Redis) is shown as the floor.
3. no-op rebuild of 100 elements (base, 98 elements in a DAG, a stack on
   top; built once first, then submitted again with everything cached).
   Target: < 5 s.
4. wide-buildgrid: the wide build of case 1 on the BuildGrid stack of its
   own: BuildGrid 0.4.4 on PostgreSQL (execution, CAS, ActionCache), a
   buildbox-casd as the artifact server (Remote Asset + its CAS), redis, two
   ``remex bot`` processes (``--capacity 4``, buildbox-run) and two ``remex
   worker`` processes. Limit: 32 / (2 bots x 4) x 1 s = 4 s; target within
   25 % (<= 5 s). The same 32 actions sent straight to BuildGrid at once are
   shown as the stack's own floor; the notes give the bots' timeline
   (ExecutedActionMetadata: queued, worker start/completed, the command) and
   how many actions each bot ran.
5. chain-buildgrid: the chain of case 2 on that BuildGrid stack (each
   action waits for BuildGrid to hand it to an idle bot: its assigner's
   interval shows here); its floor is the chain built in-process against
   BuildGrid.

Every build uses a fresh salt (an environment variable of every command), so
runs never hit each other's caches. Wall time is submit start to the build's
``finished`` time (written by the worker that finished the last element);
``wait()`` polls every 20 ms. Each case runs ``--repeat`` times (fresh
salts); the table shows the median run, the notes every run's wall time.
Other processes on the machine skew the figures: the header shows the load.

Run: ``.venv/bin/python -m bench.pipeline [--repeat 3]
[--cases wide,chain,noop,wide-buildgrid,chain-buildgrid] [--workers 2] [--concurrency 8] [--jobs 8]
[--bots 2] [--capacity 4] [--wide 32] [--chain 20] [--noop 100] [--keep]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import api
from pipeline.config import RemexConfig, load_config
from pipeline.scheduler import BuildStatus
from pipeline.servers import BotProcess, RemexStack, remex_program
from pipeline.servers.stack import STACK_WORKER_NICE, STACK_WORKER_STAGING
from pipeline.servers.testing import BuildGridServer, PostgresServer
from pipeline.spec import BuildSpec
from pipeline.stages import (
    StageContext,
    build_plan,
    execute,
    read_artifact_meta,
    run_stages,
    snapshot_sources,
    stage_to_cas,
    upload,
)
from pipeline.stages.state import decode_action_result
from pipeline.testing.dag import DagProject, make_dag_project
from pipeline.testing.sysroot import make_busybox_sysroot
from tasks.stages import EXECUTE_WAIT

BUILD_TIMEOUT = 600.0
STAGES = ("stage_to_cas", "upload", "execute", "fetch_outputs", "push_artifact")
CASD_CASES = ("wide", "chain", "noop")
GRID_CASES = ("wide-buildgrid", "chain-buildgrid")
# Production settings for the workers (the tests use shorter ones).
HEARTBEAT_TIMEOUT = 30.0
RECONCILE_INTERVAL = 5.0


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One build through the API."""

    status: BuildStatus
    start: float  # time.time() at submit start
    submit_seconds: float
    wall: float  # submit start -> the build's "finished" time (a worker's clock: ours)
    wait_wall: float  # submit start -> wait() returned

    def info(self, element: str) -> dict[str, Any]:
        for e in self.status.elements:
            if e.element == element:
                return e.info
        raise KeyError(element)


def api_build(project: Path, targets: Sequence[str], config: RemexConfig) -> Run:
    """Submit and wait; raise unless the build succeeded."""
    start = time.time()
    t0 = time.perf_counter()
    build_id = api.submit(project, targets, config=config)
    submitted = time.perf_counter() - t0
    # Followed as ``remex build`` follows it (the API's default polling: the
    # whole status every 0.25 s, the build's status field every 0.02 s). A
    # whole status every 0.02 s cost this process and Redis 0.33 s of CPU
    # per wide build instead of 0.15 s, on the cores the build runs on; the
    # wall time is the build's own "finished" time either way.
    status = api.wait(build_id, config=config, timeout=BUILD_TIMEOUT)
    wait_wall = time.perf_counter() - t0
    if status.status != "succeeded":
        failed = {
            e.element: e.info.get("error")
            for e in status.elements
            if e.state not in ("built", "cached")
        }
        raise RuntimeError(f"build {build_id} {status.status}: {failed}")
    finished = float(status.meta.get("finished", time.time()))
    return Run(status, start, submitted, max(finished - start, submitted), wait_wall)


@dataclass
class Row:
    case: str
    elements: int
    wall: float
    limit: str
    per_element: str
    verdict: str
    notes: list[str] = field(default_factory=list)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _iso(text: str | None) -> float | None:
    return None if not text else datetime.datetime.fromisoformat(text).timestamp()


def _hosts(infos: Sequence[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for info in infos:
        for host in info.get("hosts", []):
            counts[host] = counts.get(host, 0) + 1
    return ", ".join(f"{h} x{c}" for h, c in sorted(counts.items()))


def artifact_metas(
    project: Path, names: Sequence[str], config: RemexConfig
) -> dict[str, dict[str, Any]]:
    """``meta/artifact.json`` of each element (ExecutedActionMetadata timings)."""
    out = {}
    with api.open_context(config) as ctx:
        by_name = {e.name: e for e in api.plan(project, list(names), cas=ctx.local_cas)}
        for name in names:
            with contextlib.suppress(Exception):
                out[name] = read_artifact_meta(ctx, by_name[name].artifact_uri)
    return out


def casd_timeline(
    spans: Sequence[tuple[float, float, float]], t0: float, jobs: int, label: str = "casd"
) -> str:
    """A note on the executor's timeline: ``spans`` holds (worker_start,
    worker_completed, command seconds) of each action, from its
    ExecutedActionMetadata; ``jobs`` is how many can run at once."""
    if not spans:
        return f"{label}: no ExecutedActionMetadata"
    events = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    running = peak = 0
    full = 0.0
    last = events[0][0]
    for when, delta in events:
        if running >= jobs:
            full += when - last
        running += delta
        peak = max(peak, running)
        last = when
    first, final = min(s for s, _, _ in spans), max(e for _, e, _ in spans)
    starts = sorted(s for s, _, _ in spans)
    ends = sorted(e for _, e, _ in spans)
    # Idle slot-seconds (jobs - running, integrated), split where the first
    # wave filled every slot and where the last action that ever starts began.
    marks = (starts[min(jobs, len(starts)) - 1], starts[-1])
    idle = [0.0, 0.0, 0.0]
    points = sorted({*starts, *ends, *marks})
    for a, b in itertools.pairwise(points):
        mid = (a + b) / 2
        running = sum(1 for s, e, _ in spans if s <= mid < e)
        part = 0 if mid < marks[0] else (1 if mid < marks[1] else 2)
        idle[part] += max(jobs - running, 0) * (b - a)
    # The first wave: when the jobs-th action started (every slot had had work).
    wave = starts[min(jobs, len(starts)) - 1]
    # A freed slot's refill: the k-th action to end against the (jobs+k)-th
    # to start, the one that took its slot (the executor runs at most
    # ``jobs``). With every later action already waiting in the executor's
    # queue, this is the executor's own turnaround plus whatever else
    # competes for the machine at that moment.
    refills = [b - a for a, b in zip(ends, starts[jobs:], strict=False)]
    refill = (
        f"; a freed slot refilled after median {fmt_ms(statistics.median(refills))} "
        f"(max {fmt_ms(max(refills))})"
        if refills
        else ""
    )
    return (
        f"{label}: first action started +{first - t0:.2f} s, the {min(jobs, len(starts))}th "
        f"+{wave - t0:.2f} s, last done +{final - t0:.2f} s; "
        f"runner (worker_start..completed) median "
        f"{statistics.median(e - s for s, e, _ in spans):.2f} s, command median "
        f"{statistics.median(x for *_, x in spans):.2f} s; {jobs} running at once for "
        f"{full:.2f} s of {final - first:.2f} s (peak {peak}); idle slot-seconds: "
        f"{idle[0]:.2f} filling, {idle[1]:.2f} between, {idle[2]:.2f} draining{refill}"
    )


def prepared_specs(ctx: StageContext, project: Path, targets: Sequence[str]) -> list[BuildSpec]:
    """The build specs of ``targets`` (dependencies first), sources snapshotted."""
    elements = api.plan(project, list(targets), cas=ctx.local_cas)
    specs = []
    with tempfile.TemporaryDirectory(prefix="remex-bench-src-") as tmp:
        for k, element in enumerate(elements):
            digests = [
                source.stage(ctx.local_cas, Path(tmp) / f"{k}-{i}")
                for i, source in enumerate(element.sources)
            ]
            snapshot_sources(ctx, digests)
            specs.append(element.build_spec(digests))
    return specs


def system_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over the next ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        values = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(values), values[3] + values[4]

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


# --------------------------------------------------------------------------- cases


@dataclass
class Bench:
    work: Path
    sysroot: Path
    config: RemexConfig
    env: dict[str, str]
    jobs: int  # actions the execution side runs at once
    executor: str = ""  # how the table names it ("casd --jobs=8")
    label: str = "casd"  # how the notes name it
    bots: list[BotProcess] = field(default_factory=list)
    counter: int = 0

    def leases_started(self) -> dict[str, int]:
        """Leases each bot has started since its start (from its log)."""
        return {b.bot_id: b.log_text().count(": started (") for b in self.bots}

    def project(self, n: int, shape: str, sleep: float = 0.0) -> DagProject:
        self.counter += 1
        return make_dag_project(
            self.work / "projects" / f"{shape}-{self.counter}",
            n,
            shape=shape,
            sleep=sleep,
            salt=uuid.uuid4().hex,
            sysroot=self.sysroot,
        )


def case_wide(bench: Bench, n: int, case: str = "wide") -> list[Row]:
    project = bench.project(n, "wide", sleep=1.0)
    base = api_build(project.path, ["base.bst"], bench.config)
    rows = [Row(f"{case}: base.bst (setup; cached after run 1)", 1, base.wall, "-", "-", "info")]
    targets = project.elements
    leases_before = bench.leases_started()
    run = api_build(project.path, targets, bench.config)
    leases_after = bench.leases_started()
    jobs = bench.jobs
    limit = (n + jobs - 1) // jobs * 1.0
    infos = [run.info(t) for t in targets]
    started = [float(i["started"]) for i in infos]
    queued = [float(i["queued_at"]) for i in infos]
    execute_s = [float(i["timings"].get("execute", 0)) for i in infos]
    metas = artifact_metas(project.path, targets, bench.config)
    spans, gaps, waits = [], [], []
    for name, info in zip(targets, infos, strict=True):
        timings = metas.get(name, {}).get("timings") or {}
        start, end = _iso(timings.get("worker_start")), _iso(timings.get("worker_completed"))
        if start and end:
            spans.append((start, end, float(timings.get("execution_seconds") or 0)))
            gaps.append(float(info["finished"]) - end)
            queued_at = _iso(timings.get("queued"))
            if queued_at:
                waits.append(start - queued_at)
    t0 = run.start
    label = bench.label
    notes = [
        f"submit {run.submit_seconds:.2f} s; chains started +{min(started) - t0:.2f}"
        f"..+{max(started) - t0:.2f} s (queued->started median "
        f"{fmt_ms(statistics.median(s - q for s, q in zip(started, queued, strict=True)))}"
        f"); hosts {_hosts(infos)}",
        f"execute stage median {statistics.median(execute_s):.2f} s (max "
        f"{max(execute_s):.2f} s; operations followed past one task's "
        f"{EXECUTE_WAIT:g} s, so re-queued: "
        f"{sum(1 for s in execute_s if s > EXECUTE_WAIT)} of {n}); "
        f"{label} done -> element finished "
        f"(fetch_outputs, push_artifact, 2 hops): median "
        f"{fmt_ms(statistics.median(gaps)) if gaps else 'n/a'}, max "
        f"{fmt_ms(max(gaps)) if gaps else 'n/a'}",
        casd_timeline(spans, t0, jobs, label),
    ]
    if spans:
        slot = statistics.mean(e - s for s, e, _ in spans)
        notes.append(
            f"{label}: a slot is held {slot:.2f} s per action on average (worker_start.."
            f"completed), so {len(spans)} x {slot:.2f} s / {jobs} slots = "
            f"{len(spans) * slot / jobs:.2f} s even with every slot always busy"
        )
    if waits:
        notes.append(
            f"{label}: action queued (ExecutedActionMetadata.queued) -> started on a worker: "
            f"median {fmt_ms(statistics.median(waits))}, max {fmt_ms(max(waits))}"
        )
    if bench.bots:
        ran = {b: leases_after[b] - leases_before.get(b, 0) for b in leases_after}
        notes.append(
            "leases started per bot: " + ", ".join(f"{b} x{c}" for b, c in sorted(ran.items()))
        )
    rows.append(
        Row(
            f"{case}: {n} x sleep 1, {bench.executor}",
            n,
            run.wall,
            f"limit {limit:.1f} s; target <= {1.25 * limit:.1f} s",
            fmt_ms(run.wall / n),
            "met" if run.wall <= 1.25 * limit else "NOT met",
            notes,
        )
    )
    # The executor's own floor: the same actions (new salt), Execute all at once, no Celery.
    floor_project = bench.project(n, "wide", sleep=1.0)
    seconds, floor_notes = direct_execute(floor_project, bench.config, jobs, label)
    rows.append(
        Row(
            f"{case} floor: {n} Execute calls at once, no Celery",
            n,
            seconds,
            f"limit {limit:.1f} s",
            fmt_ms(seconds / n),
            "info",
            floor_notes,
        )
    )
    # The same work without Celery or Redis: plan, stage, upload, execute,
    # fetch and push, a thread an element.
    pipeline_project = bench.project(n, "wide", sleep=1.0)
    seconds = direct_pipeline(pipeline_project, bench.config)
    rows.append(
        Row(
            f"{case} floor: {n} x 5 stages in threads, no Celery",
            n,
            seconds,
            f"limit {limit:.1f} s",
            fmt_ms(seconds / n),
            "info",
            [
                f"{case} floor (stages): plan + sources stored, then {n} threads, each "
                "stage_to_cas, upload, execute, fetch_outputs, push_artifact"
            ],
        )
    )
    return rows


def direct_pipeline(project: DagProject, config: RemexConfig) -> float:
    """Seconds to build every element of ``project`` but its base (built
    first, not timed) in this process: plan the project and store its
    sources, then run each element's five stage functions in a thread of
    its own, all at once."""
    with api.open_context(config) as ctx:
        build_plan(ctx, prepared_specs(ctx, project.path, ["base.bst"]))
        t0 = time.perf_counter()
        specs = prepared_specs(ctx, project.path, project.elements)[1:]
        with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
            list(pool.map(functools.partial(run_stages, ctx), specs))
        return time.perf_counter() - t0


def direct_execute(
    project: DagProject, config: RemexConfig, jobs: int, label: str = "casd"
) -> tuple[float, list[str]]:
    """Stage and upload every element in this process, then send all their
    Execute calls to the execution server at once; return the seconds until
    the last is done."""
    with api.open_context(config) as ctx:
        specs = prepared_specs(ctx, project.path, project.elements)
        build_plan(ctx, specs[:1])  # base.bst
        states = [(spec, upload(ctx, spec, stage_to_cas(ctx, spec, {}))) for spec in specs[1:]]

        def one(item: tuple[BuildSpec, dict[str, Any]]) -> tuple[float, Any]:
            spec, state = item
            started = time.perf_counter()
            state = execute(ctx, spec, state)
            seconds = time.perf_counter() - started
            meta = decode_action_result(spec["element"], state["action_result"]).execution_metadata
            return seconds, meta

        wall0 = time.time()
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(states)) as pool:
            results = list(pool.map(one, states))
        seconds = time.perf_counter() - t0
    each = [r[0] for r in results]
    metas = [r[1] for r in results]
    workers: dict[str, int] = {}
    for meta in metas:
        workers[meta.worker or "?"] = workers.get(meta.worker or "?", 0) + 1
    spans = [
        (
            _seconds(meta.worker_start_timestamp),
            _seconds(meta.worker_completed_timestamp),
            _seconds(meta.execution_completed_timestamp) - _seconds(meta.execution_start_timestamp),
        )
        for meta in metas
    ]
    phases = {
        phase: [
            _seconds(getattr(meta, f"{phase}_completed_timestamp"))
            - _seconds(getattr(meta, f"{phase}_start_timestamp"))
            for meta in metas
            if getattr(meta, f"{phase}_start_timestamp").seconds
        ]
        for phase in ("input_fetch", "execution", "output_upload")
    }
    waits = [
        _seconds(meta.worker_start_timestamp) - _seconds(meta.queued_timestamp)
        for meta in metas
        if meta.queued_timestamp.seconds
    ]
    per_worker = (
        ""
        if set(workers) == {"?"}  # casd names no worker
        else "; actions per worker: " + ", ".join(f"{w} x{c}" for w, c in sorted(workers.items()))
    )
    notes = [
        f"Execute RPC per action: median {statistics.median(each):.2f} s, max "
        f"{max(each):.2f} s{per_worker}",
        casd_timeline(spans, wall0, jobs, label),
    ]
    rest = (
        [
            (end - start) - fetch - command - push
            for (start, end, _), fetch, command, push in zip(
                spans,
                phases["input_fetch"],
                phases["execution"],
                phases["output_upload"],
                strict=True,
            )
        ]
        if all(len(v) == len(metas) for v in phases.values())
        else []
    )
    parts = [
        f"{name} {statistics.median(values):.2f} s (max {max(values):.2f})"
        for name, values in (
            ("queued -> worker start", waits),
            ("input fetch", phases["input_fetch"]),
            ("command", phases["execution"]),
            ("output upload", phases["output_upload"]),
            ("rest of worker start..completed", rest),
        )
        if values
    ]
    if parts:
        notes.append(f"{label}: per action (ExecutedActionMetadata), median: " + "; ".join(parts))
    return seconds, notes


def _seconds(timestamp: Any) -> float:
    return float(timestamp.ToNanoseconds()) / 1e9


def case_chain(bench: Bench, n: int, case: str = "chain") -> list[Row]:
    project = bench.project(n, "chain")
    api_build(project.path, ["base.bst"], bench.config)
    names = project.elements
    run = api_build(project.path, [names[-1]], bench.config)
    infos = [run.info(name) for name in names]
    per = run.wall / n
    execute_s = [float(i["timings"].get("execute", 0)) for i in infos]
    exec_med = statistics.median(execute_s)
    overhead = per - exec_med
    metas = artifact_metas(project.path, names, bench.config)
    command_s = [
        float(m["timings"]["execution_seconds"])
        for m in metas.values()
        if (m.get("timings") or {}).get("execution_seconds") is not None
    ]
    hops = [float(b["started"]) - float(a["finished"]) for a, b in itertools.pairwise(infos)]
    runs = [float(i["finished"]) - float(i["started"]) for i in infos]
    work = [sum(float(v) for v in (i.get("timings") or {}).values()) for i in infos]
    stage_means = {s: statistics.mean(float(i["timings"].get(s, 0)) for i in infos) for s in STAGES}
    rows = [
        Row(
            f"{case}: {n} trivial elements in a row",
            n,
            run.wall,
            "< 150 ms/element on top of the action",
            f"{fmt_ms(per)} raw, {fmt_ms(overhead)} on top",
            "met" if overhead < 0.150 else "NOT met",
            [
                f"the action: execute stage (Execute RPC, worker side) median {fmt_ms(exec_med)};"
                f" the command itself (ExecutedActionMetadata) median "
                f"{fmt_ms(statistics.median(command_s)) if command_s else 'n/a'}",
                f"element i finished -> element i+1 started: median "
                f"{fmt_ms(statistics.median(hops))} (Lua finish, send chain, Celery pickup); "
                f"started -> finished: median {fmt_ms(statistics.median(runs))} = stage work "
                f"{fmt_ms(statistics.median(work))} + 4 hops between stages "
                f"{fmt_ms(statistics.median(r - w for r, w in zip(runs, work, strict=True)))}",
                "stage means: " + ", ".join(f"{k} {fmt_ms(v)}" for k, v in stage_means.items()),
            ],
        )
    ]
    # The floor: the same chain in-process (no Celery, no Redis), fresh keys.
    floor_project = bench.project(n, "chain")
    with api.open_context(bench.config) as ctx:
        specs = prepared_specs(ctx, floor_project.path, [floor_project.elements[-1]])
        build_plan(ctx, specs[:1])  # base.bst
        t0 = time.perf_counter()
        results = build_plan(ctx, specs[1:])
        floor = time.perf_counter() - t0
    bad = [r for r in results if r["state"] != "built"]
    if bad:
        raise RuntimeError(f"in-process chain build failed: {bad}")
    rows.append(
        Row(
            f"{case} floor: same {n} in-process, no Celery",
            n,
            floor,
            "reference",
            f"{fmt_ms(floor / n)} raw",
            "info",
            ["pipeline.stages.build_plan in this process, one element after the other"],
        )
    )
    return rows


def case_noop(bench: Bench, n: int) -> list[Row]:
    project = bench.project(n - 2, "dag")  # + base.bst + all.bst
    targets = list(project.targets)
    first = api_build(project.path, targets, bench.config)
    rows = [
        Row(
            f"no-op setup: first build of {n} elements (DAG)",
            n,
            first.wall,
            "-",
            fmt_ms(first.wall / n),
            "info",
        )
    ]
    run = api_build(project.path, targets, bench.config)
    states = run.status.counts()
    rows.append(
        Row(
            f"no-op rebuild of {n} elements (API)",
            n,
            run.wait_wall,
            "target < 5 s",
            fmt_ms(run.wait_wall / n),
            "met" if run.wait_wall < 5 and states == {"cached": n} else "NOT met",
            [
                f"submit {run.submit_seconds:.2f} s (load, keys, {n} artifact look-ups, "
                f"record the build); states {states}"
            ],
        )
    )
    # What a user typing `remex build` sees (Python start-up included).
    remex = remex_program()
    t0 = time.perf_counter()
    result = subprocess.run(
        [remex, "build", "-C", str(project.path), "--json", *targets],
        capture_output=True, text=True, env=bench.env, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    cli = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([remex, "--version"], capture_output=True, env=bench.env, check=False)
    startup = time.perf_counter() - t0
    verdict = ("met" if cli < 5 else "NOT met") if result.returncode == 0 else "FAILED"
    rows.append(
        Row(
            f"no-op rebuild of {n} elements (CLI)",
            n,
            cli,
            "target < 5 s",
            fmt_ms(cli / n),
            verdict,
            [
                f"`remex build --json`, exit {result.returncode}; `remex --version` alone "
                f"takes {startup:.2f} s",
                *([result.stderr[-500:]] if result.returncode else []),
            ],
        )
    )
    return rows


def repeated(fn: Callable[[], list[Row]], times: int, key: int) -> list[Row]:
    """Run a case ``times`` times; keep the run whose row ``key`` has the median
    wall time, and note every run's wall time per row."""
    runs = [fn() for _ in range(times)]
    if times == 1:
        return runs[0]
    order = sorted(range(times), key=lambda i: runs[i][key].wall)
    chosen = runs[order[(times - 1) // 2]]
    for index, row in enumerate(chosen):
        walls = ", ".join(f"{run[index].wall:.2f}" for run in runs)
        row.notes.insert(0, f"{times} runs: {walls} s (median run shown)")
    # The case against its floor measured in the same run: each run's ratio
    # (the machine's load moves both alike) and their median.
    floors = [i for i, row in enumerate(chosen) if i != key and " floor" in row.case]
    for at, floor in enumerate(floors, start=1):
        ratios = sorted(run[key].wall / run[floor].wall for run in runs)
        listed = ", ".join(f"{run[key].wall / run[floor].wall:.3f}" for run in runs)
        which = "floor" if at == 1 else f"floor {at} ({chosen[floor].case.split(': ', 1)[1]})"
        chosen[key].notes.insert(
            at, f"remex / {which} per run: {listed}; median {ratios[(times - 1) // 2]:.3f}"
        )
    return chosen


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def remex_stack(
    work: Path,
    workers: int,
    concurrency: int,
    jobs: int,
    worker_nice: int = STACK_WORKER_NICE,
    worker_staging: int = STACK_WORKER_STAGING,
) -> Iterator[tuple[RemexConfig, dict[str, str]]]:
    """redis, one casd (execution + artifacts), workers with production settings."""
    with RemexStack(
        work / "stack",
        workers=workers,
        concurrency=concurrency,
        jobs=jobs,
        separate_artifacts=False,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        reconcile_interval=RECONCILE_INTERVAL,
        worker_nice=worker_nice,
        worker_staging=worker_staging,
    ) as stack:
        yield load_config(environ=stack.env), dict(stack.env)


@contextlib.contextmanager
def grid_stack(
    work: Path,
    workers: int,
    concurrency: int,
    bots: int,
    capacity: int,
    bot_local_cas: str = "on",
    worker_nice: int = STACK_WORKER_NICE,
    worker_staging: int = STACK_WORKER_STAGING,
) -> Iterator[tuple[RemexConfig, dict[str, str], list[BotProcess]]]:
    """PostgreSQL + BuildGrid 0.4.4 (execution, CAS, ActionCache), a casd as
    the artifact server, redis, ``bots`` x ``remex bot --capacity CAPACITY``
    (buildbox-run) and ``workers`` x ``remex worker`` (production settings).
    Everything is stopped by PID (SIGTERM, then SIGKILL), the last started first.
    ``bot_local_cas`` ``off`` runs the bots without their local casd."""
    root = work / "grid-stack"
    with (
        PostgresServer(root / "postgres") as postgres,
        BuildGridServer(root / "buildgrid", postgres) as grid,
        RemexStack(
            root,
            execution=grid,
            bots=bots,
            bot_capacity=capacity,
            extra_env={"REMEX_BOT_LOCAL_CAS": "true" if bot_local_cas == "on" else "false"},
            workers=workers,
            concurrency=concurrency,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            reconcile_interval=RECONCILE_INTERVAL,
            worker_nice=worker_nice,
            worker_staging=worker_staging,
        ) as stack,
    ):
        yield load_config(environ=stack.env), dict(stack.env), stack.bots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=8, help="casd --jobs")
    parser.add_argument("--bots", type=int, default=2, help="remex bot processes (BuildGrid)")
    parser.add_argument("--capacity", type=int, default=4, help="remex bot --capacity")
    parser.add_argument(
        "--bot-local-cas",
        choices=("on", "off"),
        default="on",
        help="the bots' buildbox-casd in front of buildbox-run (off: --disable-localcas)",
    )
    parser.add_argument("--wide", type=int, default=32)
    parser.add_argument("--chain", type=int, default=20)
    parser.add_argument("--noop", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASD_CASES + GRID_CASES))
    parser.add_argument(
        "--worker-nice",
        type=int,
        choices=range(20),
        default=STACK_WORKER_NICE,
        metavar="N",
        help=f"the workers' nice value (default {STACK_WORKER_NICE}, as remex up's)",
    )
    parser.add_argument(
        "--worker-staging",
        type=int,
        default=STACK_WORKER_STAGING,
        metavar="N",
        help=f"elements each worker stages at once, 0: no limit (default "
        f"{STACK_WORKER_STAGING}, as remex up's)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASD_CASES + GRID_CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASD_CASES + GRID_CASES)}")

    busy_before = system_busy()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="remex-bench-pipeline-"))
    rows: list[Row] = []
    stacks: list[str] = []
    try:
        sysroot = make_busybox_sysroot(work / "sysroot")
        if set(cases) & set(CASD_CASES):
            stacks.append(
                f"casd stack: redis, buildbox-casd --jobs={args.jobs} (execution + artifacts), "
                f"{args.workers} workers x {args.concurrency} threads, nice {args.worker_nice}, "
                f"staging {args.worker_staging}"
            )
            with remex_stack(
                work,
                args.workers,
                args.concurrency,
                args.jobs,
                args.worker_nice,
                args.worker_staging,
            ) as (config, env):
                bench = Bench(
                    work, sysroot, config, env, args.jobs, executor=f"casd --jobs={args.jobs}"
                )
                if "wide" in cases:
                    rows += repeated(lambda: case_wide(bench, args.wide), args.repeat, key=1)
                if "chain" in cases:
                    rows += repeated(lambda: case_chain(bench, args.chain), args.repeat, key=0)
                if "noop" in cases:
                    rows += repeated(lambda: case_noop(bench, args.noop), args.repeat, key=1)
        if set(cases) & set(GRID_CASES):
            stacks.append(
                f"BuildGrid stack: BuildGrid 0.4.4 on PostgreSQL, casd (artifacts), redis, "
                f"{args.bots} remex bots x capacity {args.capacity} (buildbox-run, local CAS "
                f"{args.bot_local_cas}), "
                f"{args.workers} workers x {args.concurrency} threads, nice {args.worker_nice}, "
                f"staging {args.worker_staging}"
            )
            with grid_stack(
                work,
                args.workers,
                args.concurrency,
                args.bots,
                args.capacity,
                args.bot_local_cas,
                args.worker_nice,
                args.worker_staging,
            ) as (
                config,
                env,
                bots,
            ):
                slots = args.bots * args.capacity
                bench = Bench(
                    work / "grid",
                    sysroot,
                    config,
                    env,
                    slots,
                    executor=f"BuildGrid, {args.bots} bots x {args.capacity}",
                    label="bots",
                    bots=bots,
                )
                if "wide-buildgrid" in cases:
                    rows += repeated(
                        lambda: case_wide(bench, args.wide, "wide-buildgrid"), args.repeat, key=1
                    )
                if "chain-buildgrid" in cases:
                    rows += repeated(
                        lambda: case_chain(bench, args.chain, "chain-buildgrid"), args.repeat, key=0
                    )
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nremex pipeline: {os.cpu_count()} cores; API in-process.\n"
        + "".join(f"{line}.\n" for line in stacks)
        + f"Machine before start: {100 * busy_before:.0f}% CPU busy, load {load_before:.2f}; "
        f"load at the end {os.getloadavg()[0]:.2f}.\n"
    )
    widths = (58, 8, 8, 38, 28)
    head = ("case", "elements", "wall", "limit / target", "per element")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " | result")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|--------")
    for row in rows:
        cells = (row.case, str(row.elements), f"{row.wall:.2f} s", row.limit, row.per_element)
        line = " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
        print(f"| {line} | {row.verdict}")
    print()
    for row in rows:
        for note in row.notes:
            print(f"- {row.case.split(':')[0]}: {note}")
    return 0 if all(r.verdict in ("met", "info") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
