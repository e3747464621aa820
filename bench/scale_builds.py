"""Scale benchmark, the builds: issue 16 part (a) built, and part (b).

(a) ``--part a``: trivial elements (:func:`pipeline.testing.dag.make_dag_project`:
``wide``, a ``chain`` and a layered ``dag``) built on an embedded stack
(redis, an execution casd, a separate artifact casd, ``--workers`` workers
of ``--concurrency`` threads). Each shape is built twice:

``cold``  nothing cached: every action runs;
``warm``  the workers stopped, their local CAS wiped, the artifact server
          wiped and everything started again, so that no artifact exists but
          every action is in the ActionCache: each element still goes through
          its chain (the scheduler and Celery are measured, not the executor).

(b) ``--part b``: a ``dag`` of ``--elements`` elements built warm (as above)
with ``--workers`` x ``--concurrency`` task slots, e.g. 10 x 10 = 100 next
to 1 x 2 = 2 (each slot is one Celery thread; the issue allows fewer
processes with many threads).

For each build it prints: the submit (``pipeline.submit``, in this
process), the time to the first action (the first stage start, from the
submit's start), elements per second (elements built / time from the first
stage start to the build's end), Redis commands per element (``INFO
commandstats`` over the build, all clients: the scheduler's scripts, Celery's
messages and the workers' polls) and how many of them were the scheduler's
scripts (``EVALSHA``), Redis time per element (the ``usec`` of those
commands), Redis memory per element (``used_memory`` after the build, less
before the submit: what a finished build keeps until its TTL), the workers'
peak RSS, and the scheduler's overhead per element: the time from ready to
built not spent in a stage's own work (queueing, the hops between stages,
the scheduler's moves), median and mean.

    .venv/bin/python -m bench.scale_builds --part a [--elements 1000] [--chain 200]
        [--shapes wide,chain,dag] [--workers 2] [--concurrency 4]
    .venv/bin/python -m bench.scale_builds --part b [--elements 2000]
        [--slots 2,100]

The workers run with the production heartbeat timeout (30 s) and reconciler
interval (5 s) unless ``--timings test`` gives them the test stack's short
ones (5 s, 1 s). Some Redis commands come with time, not with elements (the
workers' liveness keys, each worker's try of the reconciler lock, idle
consumers' polls, the reconciler's passes): an idle stack runs ~15 a second
with the test timings, so they add to a slow build's commands per element,
and more with short timings than a deployment has.

The machine these figures come from has 2 cores shared with other sessions:
the executor, the workers, Redis and this process share them, so elements/s
is bound by CPU long before the scheduler; compare the Redis-side figures
(commands, time and memory per element), which depend on the load only
through those commands that come with time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from pipeline import api
from pipeline.config import load_config
from pipeline.scheduler import Scheduler
from pipeline.servers import RedisServer, RemexStack
from pipeline.servers.stack import TEST_HEARTBEAT_TIMEOUT, TEST_RECONCILE_INTERVAL
from pipeline.testing.dag import make_dag_project
from pipeline.testing.sysroot import make_busybox_sysroot

COMMANDS_TARGET = 30  # Redis commands per element
OVERHEAD_TARGET = 0.005  # seconds of scheduler overhead per element, at 100 workers


@dataclass
class Run:
    label: str
    elements: int = 0
    built: int = 0
    submit: float = 0.0
    first_action: float = 0.0
    wall: float = 0.0
    per_second: float = 0.0
    commands: float = 0.0
    scripts: float = 0.0
    redis_ms: float = 0.0
    memory: float = 0.0
    rss_mib: list[float] = field(default_factory=list)
    overhead_median: float = 0.0
    overhead_mean: float = 0.0
    status: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    by_command: dict[str, float] = field(default_factory=dict)
    client_commands: float = 0.0
    redis_cpu_ms: float = 0.0
    scripts_ms: float = 0.0
    dispatch_median: float = 0.0
    gaps_median: float = 0.0
    by_client_command: dict[str, float] = field(default_factory=dict)


def commandstats(scheduler: Scheduler) -> dict[str, tuple[int, int]]:
    """Command -> (calls, usec) so far."""
    info = scheduler.redis.info("commandstats")
    return {name: (int(s["calls"]), int(s["usec"])) for name, s in info.items()}


class Monitor:
    """Counts the commands clients send (``MONITOR``; those a Lua script runs
    are left out: ``INFO commandstats`` counts both), by command."""

    def __init__(self, url: str) -> None:
        self.counts: dict[str, int] = {}
        self._client = redis.Redis.from_url(url, decode_responses=True)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        with self._client.monitor() as monitor:
            self._ready.set()
            for entry in monitor.listen():
                if self._stop.is_set():
                    break
                if entry.get("client_type") == "lua":
                    continue
                name = str(entry.get("command", "")).split(" ", 1)[0].lower()
                self.counts[name] = self.counts.get(name, 0) + 1

    def stop(self) -> dict[str, int]:
        self._stop.set()
        # One more command, so that the listener wakes up and sees the stop.
        redis_client_ping = self._client.connection_pool.make_connection()
        redis_client_ping.connect()
        redis_client_ping.send_command("PING")
        redis_client_ping.read_response()
        redis_client_ping.disconnect()
        self._thread.join(10)
        return dict(self.counts)


def redis_cpu(scheduler: Scheduler) -> float:
    """CPU seconds redis-server used so far (user + system)."""
    info = scheduler.redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def build_memory(scheduler: Scheduler, build_id: str) -> int:
    """Bytes the build's keys take in Redis (``MEMORY USAGE``, every field)."""
    total = 0
    for key in scheduler.redis.scan_iter(scheduler.keys.build(build_id, "*"), count=1000):
        total += int(scheduler.redis.memory_usage(key, samples=0) or 0)
    return total


def peak_rss_mib(pid: int | None) -> float:
    """A process's peak resident set (VmHWM), MiB (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def build(
    stack: RemexStack, project: Path, label: str, timeout: float, *, monitor: bool = False
) -> Run:
    """Submit ``all.bst`` of ``project``, wait for the end, measure."""
    run = Run(label)
    config = load_config(environ=stack.env)
    scheduler = stack.scheduler()
    # MONITOR costs Redis CPU (every command is copied to it): only when asked.
    watcher = Monitor(stack.env["REMEX_BROKER_URL"]) if monitor else None
    before = commandstats(scheduler)
    cpu_before = redis_cpu(scheduler)
    started = time.time()
    build_id = api.submit(project, ["all.bst"], config=config, timings=run.phases)
    run.submit = time.time() - started
    deadline = time.monotonic() + timeout
    # (One HGET per poll: the commands counted are the build's, not the
    # bench's; a status summary per poll cost ~3 commands per element of a
    # 100-element build running 20 s.)
    while scheduler.build_status_value(build_id) == "running":
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ended = time.time()
    after = commandstats(scheduler)
    sent = watcher.stop() if watcher is not None else {}
    cpu_after = redis_cpu(scheduler)
    run.memory = build_memory(scheduler, build_id)
    status = scheduler.status(build_id)
    run.status = status.status
    infos = [e.info for e in status.elements]
    run.elements = len(infos)
    run.built = sum(1 for e in status.elements if e.state == "built")
    starts = [float(i["started"]) for i in infos if i.get("started")]
    first = min(starts) if starts else ended
    run.first_action = first - started
    run.wall = ended - started
    run.per_second = run.built / max(ended - first, 1e-9)
    calls = {k: after[k][0] - before.get(k, (0, 0))[0] for k in after}
    usec = {k: after[k][1] - before.get(k, (0, 0))[1] for k in after}
    # (The INFO calls of this process are left out.)
    total = sum(n for k, n in calls.items() if k != "cmdstat_info")
    run.commands = total / max(run.elements, 1)
    run.scripts = calls.get("cmdstat_evalsha", 0) / max(run.elements, 1)
    run.redis_ms = (
        1e-3 * sum(u for k, u in usec.items() if k != "cmdstat_info") / max(run.elements, 1)
    )
    run.memory /= max(run.elements, 1)
    run.redis_cpu_ms = 1000 * (cpu_after - cpu_before) / max(run.elements, 1)
    run.scripts_ms = 1e-3 * usec.get("cmdstat_evalsha", 0) / max(run.elements, 1)
    ignored = ("info", "monitor", "ping", "scan", "memory")
    sent = {k: n for k, n in sent.items() if k not in ignored}
    run.client_commands = sum(sent.values()) / max(run.elements, 1) if sent else float("nan")
    run.by_client_command = {
        k: n / max(run.elements, 1) for k, n in sorted(sent.items(), key=lambda kv: -kv[1])
    }
    run.by_command = {
        k.removeprefix("cmdstat_"): n / max(run.elements, 1)
        for k, n in sorted(calls.items(), key=lambda kv: -kv[1])
        if n and k != "cmdstat_info"
    }
    run.rss_mib = [peak_rss_mib(worker.pid) for worker in stack.workers]
    dispatch, gaps = [], []
    for info in infos:
        if info.get("started") and info.get("finished"):
            work = sum(float(v) for v in (info.get("timings") or {}).values())
            gaps.append(float(info["finished"]) - float(info["started"]) - work)
            ready = info.get("ready_at") or info.get("queued_at")
            if ready:
                dispatch.append(float(info["started"]) - float(ready))
    if gaps:
        run.gaps_median = statistics.median(gaps)
    if dispatch:
        run.dispatch_median = statistics.median(dispatch)
    overheads = []
    for info in infos:
        ready = info.get("ready_at") or info.get("queued_at")
        if not ready or not info.get("finished") or not info.get("started"):
            continue
        work = sum(float(v) for v in (info.get("timings") or {}).values())
        overheads.append(float(info["finished"]) - float(ready) - work)
    if overheads:
        run.overhead_median = statistics.median(overheads)
        run.overhead_mean = statistics.mean(overheads)
    return run


def wipe_for_warm(stack: RemexStack) -> None:
    """Stop the workers and the artifact server, delete their state (local
    CAS, stored artifacts), start them again: the next build finds no
    artifact, but every action in the execution server's ActionCache."""
    for worker in stack.workers:
        worker.stop()
        shutil.rmtree(worker.cas_dir, ignore_errors=True)
    wipe_artifacts(stack)
    for worker in stack.workers:
        worker.start()


def wipe_artifacts(stack: RemexStack) -> None:
    """Restart the artifact server empty (same port)."""
    if stack.artifacts is not None:
        stack.artifacts.stop()
        shutil.rmtree(stack.artifacts.cas_dir, ignore_errors=True)
        stack.artifacts.start()


def print_runs(runs: Sequence[Run]) -> None:
    print()
    print(
        f"{'build':<22} {'elems':>6} {'status':>9} {'submit':>7} {'1st act':>8} "
        f"{'el/s':>6} {'sent/el':>8} {'all/el':>8} {'eval/el':>8} {'redis ms/el':>11} "
        f"{'mem B/el':>9} "
        f"{'ovh med':>8} {'ovh mean':>8} {'worker RSS MiB':>15}"
    )
    for r in runs:
        rss = "/".join(f"{m:.0f}" for m in r.rss_mib[:4]) + ("..." if len(r.rss_mib) > 4 else "")
        print(
            f"{r.label:<22} {r.elements:>6} {r.status:>9} {r.submit:>6.2f}s "
            f"{r.first_action:>7.2f}s "
            f"{r.per_second:>6.1f} {r.client_commands:>8.1f} {r.commands:>8.1f} "
            f"{r.scripts:>8.1f} {r.redis_ms:>11.3f} "
            f"{r.memory:>9.0f} {r.overhead_median * 1000:>6.0f}ms {r.overhead_mean * 1000:>6.0f}ms "
            f"{rss:>15}"
        )
    print()
    for r in runs:
        phases = " ".join(f"{k}={v:.2f}" for k, v in r.phases.items())
        print(f"  {r.label}: submit phases {phases}; wall {r.wall:.1f} s")
        print(
            f"    Redis CPU {r.redis_cpu_ms:.2f} ms/element, of which the scheduler's "
            f"scripts {r.scripts_ms:.2f} ms; ready -> first stage median "
            f"{r.dispatch_median * 1000:.0f} ms; first stage start -> built, less the "
            f"stages' own work (hops, queueing between stages) median "
            f"{r.gaps_median * 1000:.0f} ms"
        )
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(r.by_client_command.items())[:14])
        print(f"    sent by clients, per element: {top}")
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(r.by_command.items())[:14])
        print(f"    run by Redis (with scripts' own), per element: {top}")


def stack_timings(timings: str) -> dict[str, float | None]:
    """The workers' heartbeat timeout and reconciler interval: the
    production defaults (None: the configuration's), or the test stack's."""
    if timings == "test":
        return {
            "heartbeat_timeout": TEST_HEARTBEAT_TIMEOUT,
            "reconcile_interval": TEST_RECONCILE_INTERVAL,
        }
    return {"heartbeat_timeout": None, "reconcile_interval": None}


def part_a(args: argparse.Namespace, work: Path, sysroot: Path) -> list[Run]:
    runs: list[Run] = []
    modes = {m for m in args.modes.split(",") if m}
    if not modes or modes - {"cold", "warm"}:
        raise SystemExit(f"--modes: cold, warm or both, not {args.modes!r}")
    for shape in [s for s in args.shapes.split(",") if s]:
        n = args.chain if shape == "chain" else args.elements
        project = make_dag_project(
            work / shape, n, shape=shape, layers=args.layers, sysroot=sysroot
        ).path
        with RemexStack(
            work / f"stack-{shape}",
            workers=args.workers,
            concurrency=args.concurrency,
            **stack_timings(args.timings),
        ) as stack:
            if "cold" in modes:
                runs.append(
                    build(stack, project, f"{shape} {n} cold", args.timeout, monitor=args.monitor)
                )
                print(f"  {shape}: cold done", file=sys.stderr, flush=True)
            if "warm" not in modes:
                continue
            if "cold" not in modes:
                # (The ActionCache is primed by a build first, not measured.)
                build(stack, project, f"{shape} {n} priming", args.timeout)
            wipe_for_warm(stack)
            runs.append(
                build(stack, project, f"{shape} {n} warm AC", args.timeout, monitor=args.monitor)
            )
            print(f"  {shape}: warm done", file=sys.stderr, flush=True)
    return runs


def part_b(args: argparse.Namespace, work: Path, sysroot: Path) -> list[Run]:
    runs: list[Run] = []
    project = make_dag_project(
        work / "dag-b", args.elements, shape="dag", layers=args.layers, sysroot=sysroot
    ).path
    # One stack: its execution server's ActionCache is filled once, by a
    # first build on --workers x --concurrency slots; then, for each slot
    # count, the workers are replaced and the artifacts wiped (warm).
    with RemexStack(
        work / "stack-b",
        workers=args.workers,
        concurrency=args.concurrency,
        **stack_timings(args.timings),
    ) as stack:
        runs.append(build(stack, project, f"dag {args.elements} prime", args.timeout))
        print("  prime: done", file=sys.stderr, flush=True)
        for slots in [int(s) for s in args.slots.split(",") if s]:
            processes = max(1, min(args.max_processes, slots))
            threads = max(1, slots // processes)
            for worker in list(stack.workers):
                worker.close()
                stack.workers.remove(worker)
            wipe_artifacts(stack)
            # (New names: each new worker starts with an empty local CAS.)
            for index in range(processes):
                stack.add_worker(f"b{slots}-{index}", concurrency=threads)
            label = f"dag {args.elements} {processes}x{threads}"
            runs.append(build(stack, project, label, args.timeout, monitor=args.monitor))
            print(f"  {label}: done", file=sys.stderr, flush=True)
    return runs


def part_r(args: argparse.Namespace, work: Path) -> None:
    """The scheduler's own costs on a build of ``--elements`` (no workers, no
    Celery): a reconciler pass (``Scheduler.stalled``) and a status summary
    with 10 elements left live, and ``finish``, each with the counts and
    sets the scripts keep, and with a scan of every element (what a build
    without counts, i.e. before issue 16, costs)."""
    n = args.elements
    with RedisServer(work / "redis") as server:
        scheduler = Scheduler.from_url(server.url)
        specs: list[Any] = [
            {
                "element": f"e{i:05d}",
                "cache_key": f"k{i}",
                "kind": "manual",
                "artifact_uri": f"urn:bench:e{i}/k{i}",
            }
            for i in range(n)
        ]
        print(f"\nscheduler costs on a build of {n} independent elements (Redis alone)")
        build_id, ready = scheduler.create_build(specs, {}, [], {"targets": ["bench"]})
        for element in ready[: n - 10]:
            scheduler.finish(build_id, element, "built", {})

        def calls() -> int:
            info = scheduler.redis.info("commandstats")
            return sum(int(v["calls"]) for k, v in info.items() if k != "cmdstat_info")

        for label in ("counts kept", "scan (before)"):
            if label != "counts kept":
                scheduler.redis.delete(scheduler.keys.build(build_id, "counts"))
            times = []
            for _ in range(5):
                started = time.perf_counter()
                scheduler.stalled(build_id)
                times.append(time.perf_counter() - started)
            before = calls()
            scheduler.stalled(build_id)
            pass_calls = calls() - before
            started = time.perf_counter()
            scheduler.status(build_id, every=False)
            status_s = time.perf_counter() - started
            other, others_ready = scheduler.create_build(specs, {}, [], {"targets": ["bench"]})
            if label != "counts kept":
                scheduler.redis.delete(scheduler.keys.build(other, "counts"))
            started = time.perf_counter()
            for element in others_ready[:200]:
                scheduler.finish(other, element, "built", {})
            finish_s = (time.perf_counter() - started) / 200
            print(
                f"  {label:<14} reconciler pass {statistics.median(times) * 1000:7.1f} ms "
                f"({pass_calls} commands run); status summary {status_s * 1000:7.1f} ms; "
                f"finish {finish_s * 1000:5.2f} ms per element"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("a", "b", "r"), default="a")
    parser.add_argument("--elements", type=int, default=None)
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--shapes", default="wide,chain,dag")
    parser.add_argument(
        "--modes", default="cold,warm", help="part a: the builds of each shape (cold, warm)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--slots", default="2,100", help="part b: task slots to compare")
    parser.add_argument(
        "--max-processes", type=int, default=10, help="part b: at most this many workers"
    )
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument(
        "--monitor",
        action="store_true",
        help="count the commands clients send (Redis MONITOR; slows Redis down)",
    )
    parser.add_argument(
        "--timings",
        choices=("production", "test"),
        default="production",
        help="the workers' heartbeat timeout and reconciler interval: production "
        "(30 s, 5 s) or the test stack's (5 s, 1 s)",
    )
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    if args.elements is None:
        args.elements = {"a": 1000, "b": 2000, "r": 10_000}[args.part]
    work = Path(tempfile.mkdtemp(prefix="remex-scale-builds-"))
    print(
        f"scale builds, part {args.part}; load {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; "
        f"{args.timings} timings",
        flush=True,
    )
    try:
        if args.part == "r":
            part_r(args, work)
            return 0
        sysroot = make_busybox_sysroot(work / "sysroot")
        runs = part_a(args, work, sysroot) if args.part == "a" else part_b(args, work, sysroot)
        print_runs(runs)
        if args.monitor:
            worst = max(r.client_commands for r in runs)
            print(
                f"Redis commands sent per element <= {COMMANDS_TARGET}: worst {worst:.1f}: "
                f"{'met' if worst <= COMMANDS_TARGET else 'NOT met'}"
            )
        worst_run = max(r.commands for r in runs)
        print(
            f"Redis commands run per element (INFO commandstats, the scripts' own included) "
            f"<= {COMMANDS_TARGET}: worst {worst_run:.1f}: "
            f"{'met' if worst_run <= COMMANDS_TARGET else 'NOT met'}"
        )
        scripts = max(r.scripts for r in runs)
        print(
            f"scheduler scripts (EVALSHA) per element: worst {scripts:.1f}; the rest is "
            "Celery's messages and events (with --monitor: every command, by name)"
        )
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
