"""Chaos benchmark: builds under one random fault each, then every artifact checked.

Starts a stack of its own (:class:`pipeline.servers.RemexStack`: redis-server
with AOF, an execution and an artifact buildbox-casd, ``--workers`` ``remex
worker`` processes with the test timings: heartbeat timeout 5 s, reconcile
interval 1 s, so the bound for a lost element is 6 s). Each round builds a
fresh 40-element DAG of ``sleep`` elements
(:func:`pipeline.testing.dag.make_dag_project`) with ``remex build --json``,
and at a random moment injects one fault, in turn:

``kill-before-start``  SIGKILL a worker holding a message it has not started
                       (a ``queued`` element taken by it), else any worker;
``kill-mid-stage``     SIGKILL a worker while it runs a stage;
``stop-then-kill``     SIGSTOP a worker for 3 s, then SIGKILL it;
``casd-restart``       SIGKILL the execution buildbox-casd, start it again;
``redis-restart``      SIGKILL redis-server, start it again 3 s later (same
                       port, same AOF);
``wipe-cas``           delete a worker's local CAS folder while it works.

A killed worker is replaced by a new one. After the build, every artifact is
checked out (``remex checkout --deps run all.bst``) and compared with what
the project must give. The table: rounds, faults by kind, builds completed,
elements re-sent, the longest time the build made no progress (max stall:
no element changed state, stage, attempt or holder, as seen from Redis: the
seconds Redis itself is down are not counted), artifacts verified, and lost
or wrong (must be 0).

``--download`` sets the workers' ``[cas] download`` (the configured default
when not given); ``--faults`` limits the rounds to some kinds, in turn.

Run: ``.venv/bin/python -m bench.chaos [--rounds 20] [--elements 40]
[--sleep 0.5] [--workers 3] [--seed 1] [--download minimal|all]
[--faults wipe-cas,casd-restart] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.scheduler import Scheduler
from pipeline.servers import RemexStack, RemexWorker
from pipeline.testing.dag import DagProject, make_dag_project
from pipeline.testing.sysroot import make_busybox_sysroot

FAULTS = (
    "kill-before-start",
    "kill-mid-stage",
    "stop-then-kill",
    "casd-restart",
    "redis-restart",
    "wipe-cas",
)
BUILD_TIMEOUT = 300.0


@dataclass
class Round:
    """What one round saw."""

    fault: str
    detail: str = ""
    completed: bool = False
    resent: int = 0
    max_stall: float = 0.0
    verified: int = 0
    wrong: list[str] = field(default_factory=list)
    seconds: float = 0.0
    traceback: bool = False


class ProgressWatch(threading.Thread):
    """Polls a build; the longest time no element changed (state, stage,
    attempt, holder) while the build ran."""

    def __init__(self, scheduler: Scheduler, build_id: str) -> None:
        super().__init__(daemon=True)
        self.scheduler = scheduler
        self.build_id = build_id
        self.max_stall = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        last: Any = None
        changed = time.monotonic()
        while not self.stop.wait(0.25):
            try:
                status = self.scheduler.status(self.build_id)
            except Exception:  # Redis down: the stall goes on
                self.max_stall = max(self.max_stall, time.monotonic() - changed)
                continue
            now = time.monotonic()
            key = [
                (e.state, e.info.get("stage"), e.info.get("attempt"), e.info.get("holder"))
                for e in status.elements
            ]
            if key != last:
                last, changed = key, now
            self.max_stall = max(self.max_stall, now - changed)
            if status.done:
                return


def signal_worker(worker: RemexWorker, signum: int) -> None:
    if worker.pid is not None:
        os.kill(worker.pid, signum)


def replace(stack: RemexStack, worker: RemexWorker, counter: list[int]) -> None:
    """Drop a killed worker; start a new one under a name not used before."""
    stack.workers.remove(worker)
    counter[0] += 1
    stack.add_worker(f"c{counter[0]}")


def inject(
    fault: str, stack: RemexStack, scheduler: Scheduler, build_id: str, rng: random.Random
) -> str:
    """Inject ``fault`` now; return what was done."""
    workers = list(stack.workers)
    victim = rng.choice(workers)
    if fault in ("kill-before-start", "kill-mid-stage"):
        elements = scheduler.status(build_id).elements
        wanted = "queued" if fault == "kill-before-start" else "running"
        holders = [
            str(e.info.get("holder", "")).split("/", 1)[0]
            for e in elements
            if e.state == wanted and e.info.get("holder")
        ]
        named = [w for w in workers if w.worker_name in holders]
        victim = named[0] if named else victim
        victim.kill()
        return f"SIGKILL {victim.worker_name}" + ("" if named else f" (no {wanted} holder seen)")
    if fault == "stop-then-kill":
        signal_worker(victim, signal.SIGSTOP)
        time.sleep(3)
        victim.kill()
        return f"SIGSTOP, 3 s, SIGKILL {victim.worker_name}"
    if fault == "casd-restart":
        stack.execution.kill()
        time.sleep(1)
        stack.execution.start()
        return "casd SIGKILL, started 1 s later"
    if fault == "redis-restart":
        stack.redis.kill()
        time.sleep(3)
        stack.redis.start()
        return "redis SIGKILL, started 3 s later"
    if fault == "wipe-cas":
        shutil.rmtree(victim.cas_dir, ignore_errors=True)
        return f"wiped {victim.worker_name}'s local CAS"
    raise ValueError(fault)


def verify(stack: RemexStack, project: DagProject, dest: Path) -> tuple[int, list[str]]:
    """Check out every artifact through all.bst; (files verified, what is wrong)."""
    result = stack.cli("checkout", "-C", project.path, "--deps", "run", "all.bst", dest)
    if result.returncode != 0:
        return 0, [f"checkout failed: {result.stderr.strip()[-300:]}"]
    wrong: list[str] = []
    verified = 0
    for element in project.elements:
        for path, content in project.expected[element].items():
            file = dest / path.lstrip("/")
            if file.is_file() and file.read_bytes() == content:
                verified += 1
            else:
                wrong.append(f"{element}:{path}")
    return verified, wrong


def run_round(
    index: int,
    fault: str,
    stack: RemexStack,
    args: argparse.Namespace,
    work: Path,
    sysroot: Path,
    rng: random.Random,
    counter: list[int],
) -> Round:
    project = make_dag_project(
        work / f"project-{index}",
        n=args.elements,
        shape="dag",
        layers=5,
        sleep=args.sleep,
        salt=f"chaos-{args.seed}-{index}-{time.time()}",
        sysroot=sysroot,
    )
    scheduler = stack.scheduler()
    known = set(scheduler.redis.zrange("remex:builds", 0, -1))
    start = time.monotonic()
    process = stack.cli_popen("build", "-C", project.path, *project.targets, "--json")
    while True:
        new = set(scheduler.redis.zrange("remex:builds", 0, -1)) - known
        if new:
            build_id = str(new.pop())
            break
        if process.poll() is not None:
            raise RuntimeError(f"remex build exited early: {process.communicate()}")
        time.sleep(0.1)
    watch = ProgressWatch(scheduler, build_id)
    watch.start()
    result = Round(fault)
    time.sleep(rng.uniform(0.5, 4.0))
    alive = list(stack.workers)
    result.detail = inject(fault, stack, scheduler, build_id, rng)
    for worker in alive:
        if not worker.running:
            replace(stack, worker, counter)
    try:
        stdout, stderr = process.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    result.seconds = time.monotonic() - start
    watch.stop.set()
    watch.join()
    result.max_stall = watch.max_stall
    result.traceback = "Traceback" in stderr
    try:
        output = json.loads(stdout)
    except json.JSONDecodeError:
        result.wrong.append(f"no JSON from remex build: {stderr.strip()[-300:]}")
        return result
    result.completed = output.get("status") == "succeeded"
    result.resent = sum(1 for e in output["elements"] if e.get("resent_because"))
    verified, wrong = verify(stack, project, work / f"checkout-{index}")
    result.verified = verified
    result.wrong += wrong
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--elements", type=int, default=40)
    parser.add_argument("--sleep", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--download", choices=("minimal", "all"), default=None)
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help="comma-separated kinds, injected in turn"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or not faults:
        parser.error(f"--faults: unknown kind(s) {unknown}; known: {', '.join(FAULTS)}")
    extra_env = {"REMEX_CAS_DOWNLOAD": args.download} if args.download else {}
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="remex-chaos-"))
    rounds: list[Round] = []
    counter = [0]
    try:
        sysroot = make_busybox_sysroot(work / "sysroot")
        with RemexStack(
            work / "stack", workers=args.workers, persistent_redis=True, extra_env=extra_env
        ) as stack:
            print(f"download = {args.download or 'the default'}", flush=True)
            for index in range(args.rounds):
                fault = faults[index % len(faults)]
                result = run_round(index, fault, stack, args, work, sysroot, rng, counter)
                rounds.append(result)
                print(
                    f"round {index + 1:>2} {fault:<18} {result.detail:<40} "
                    f"{'built' if result.completed else 'NOT BUILT':<9} "
                    f"{result.seconds:5.1f} s  re-sent {result.resent:>2}  "
                    f"max stall {result.max_stall:4.1f} s  wrong {len(result.wrong)}",
                    flush=True,
                )
                for line in result.wrong[:5]:
                    print(f"    {line}")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rounds)
    bad = sum(len(r.wrong) for r in rounds) + sum(1 for r in rounds if not r.completed)
    return 1 if bad else 0


def print_table(rounds: list[Round]) -> None:
    kinds = Counter(r.fault for r in rounds)
    rows = [
        ("rounds", str(len(rounds))),
        ("faults by kind", ", ".join(f"{k} {kinds[k]}" for k in FAULTS if kinds[k])),
        ("builds completed", f"{sum(r.completed for r in rounds)} / {len(rounds)}"),
        ("elements re-sent", str(sum(r.resent for r in rounds))),
        ("max stall", f"{max((r.max_stall for r in rounds), default=0.0):.1f} s"),
        ("artifacts verified (files)", str(sum(r.verified for r in rounds))),
        ("lost or wrong", str(sum(len(r.wrong) for r in rounds))),
        ("tracebacks from remex build", str(sum(r.traceback for r in rounds))),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    print(f"{'':<{width}}  chaos")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
