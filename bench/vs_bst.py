"""remex next to BuildStream: the same cold builds, alternately, CLI wall time.

For each case, each run makes a fresh copy of the project with a new salt
(an environment variable of every command: new cache keys, so every build
is cold while the servers keep running), then builds it with ``bst`` and
with ``remex``, alternating which goes first:

``bst``    this interpreter's ``bst`` (BuildStream 2.8.1), remote execution
           on a buildbox-casd of its own (``--jobs=JOBS``; execution, CAS,
           ActionCache and artifact server), ``builders: JOBS``, a fresh home
           and local cache per run (:class:`pipeline.testing.bst.Bst` folders).
``remex``  ``remex up --workers W --jobs JOBS`` on a private ``REMEX_STACK_DIR``
           (started once), then ``remex build -C PROJECT TARGETS --json``.

Wall time is the CLI's, start to exit (Python start-up, loading, the
build). Cases:

``wide``       32 independent ``manual`` elements that each ``sleep 1``
               (limit 32 / 8 jobs x 1 s = 4 s).
``chain``      20 trivial elements, each depending on the one before.
``dag``        300 trivial elements in 10 layers (~30 per layer, diamonds).
``toolchain``  ``examples/toolchain`` (``report.bst`` + ``amhello.bst``), its
               sysroot made by ``examples/toolchain/make-sysroot.sh`` (Debian
               packages; cached in ``--toolchain-sysroot`` when given).

The table has the median of each tool, remex / bst (ratio of medians), and
the ratio's spread over runs (each run's remex / bst, min..max). Beside it,
for remex: each worker's peak RSS and the bytes it downloaded from and
uploaded to the CAS servers (blob payloads and GetTree Directory messages,
:data:`pipeline.reapi.cas.traffic.TRAFFIC`, read with the ``remex_stats``
Celery inspect command before and after each build) per element it worked on.

Run: ``.venv/bin/python -m bench.vs_bst [--runs 3] [--cases wide,chain,dag,toolchain]
[--jobs 8] [--workers 2] [--concurrency N] [--toolchain-sysroot DIR]
[--download minimal|all] [--keep] [--latency] [--remex-only]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.servers.casd import CasdServer
from pipeline.testing.bst import Bst
from pipeline.testing.dag import make_dag_project
from pipeline.testing.sysroot import make_busybox_sysroot

REMEX = Path(sys.executable).with_name("remex")
ROOT = Path(__file__).resolve().parent.parent
TOOLCHAIN = ROOT / "examples" / "toolchain"
CASES = ("wide", "chain", "dag", "toolchain")
BUILD_TIMEOUT = 1800.0


# --------------------------------------------------------------------------- projects


@dataclass
class Case:
    """One benchmark case: how to make a salted copy of its project."""

    name: str
    describe: str
    targets: tuple[str, ...]
    make: Callable[[Path, str], Path]


def dag_case(name: str, describe: str, sysroot: Path, **kwargs: Any) -> Case:
    def make(dest: Path, salt: str) -> Path:
        return make_dag_project(dest, salt=salt, sysroot=sysroot, **kwargs).path

    return Case(name, describe, ("all.bst",), make)


def toolchain_case(sysroot: Path) -> Case:
    def make(dest: Path, salt: str) -> Path:
        shutil.copytree(
            TOOLCHAIN, dest, ignore=shutil.ignore_patterns("sysroot", "amhello", "expected")
        )
        shutil.copytree(sysroot, dest / "sysroot", symlinks=True)
        shutil.copytree(sysroot.parent / "amhello", dest / "amhello", symlinks=True)
        conf = dest / "project.conf"
        text = conf.read_text()
        if "\nenvironment:" in text:
            raise SystemExit(f"{conf}: has an environment: section; the salt needs its own")
        conf.write_text(text + f"\nenvironment:\n  REMEX_BENCH_SALT: '{salt}'\n")
        return dest

    return Case("toolchain", "examples/toolchain cold", ("report.bst", "amhello.bst"), make)


def make_toolchain_sysroot(dest: Path) -> Path:
    """``make-sysroot.sh DEST`` (idempotent; amhello/ lands beside DEST)."""
    result = subprocess.run(
        ["bash", str(TOOLCHAIN / "make-sysroot.sh"), str(dest)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"make-sysroot.sh failed:\n{result.stderr[-3000:]}")
    return dest


# --------------------------------------------------------------------------- bst


def bst_remote_config(url: str, jobs: int) -> str:
    """bst's user configuration: remote execution and artifacts on one casd."""
    service = f"{{url: '{url}', instance-name: ''}}"
    return (
        "build:\n"
        "  max-jobs: 8\n"
        "scheduler:\n"
        f"  builders: {jobs}\n"
        "  fetchers: 4\n"
        "  pushers: 4\n"
        "  on-error: quit\n"
        "remote-execution:\n"
        f"  execution-service: {service}\n"
        f"  storage-service: {service}\n"
        f"  action-cache-service: {service}\n"
        "artifacts:\n"
        "  servers:\n"
        f"  - url: '{url}'\n"
        "    type: all\n"
        "    push: true\n"
    )


# --------------------------------------------------------------------------- remex


class RemexStackCli:
    """``remex up`` / ``build`` / ``down`` on a private stack folder."""

    def __init__(
        self,
        folder: Path,
        *,
        workers: int,
        jobs: int,
        concurrency: int | None,
        download: str | None = None,
        worker_nice: int | None = None,
        worker_staging: int | None = None,
    ) -> None:
        self.folder = folder
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
        self.env.update(
            REMEX_STACK_DIR=str(folder / "stack"),
            XDG_CONFIG_HOME=str(folder / "config"),
            REMEX_CAS_DIR=str(folder / "client-cas"),
        )
        if download:
            # The workers inherit it from `remex up` ([cas] download).
            self.env["REMEX_CAS_DOWNLOAD"] = download
        if worker_nice is not None:
            self.env["REMEX_WORKER_NICE"] = str(worker_nice)  # ([worker] nice)
        if worker_staging is not None:
            self.env["REMEX_WORKER_STAGING"] = str(worker_staging)  # ([worker] staging)
        self.jobs = jobs
        self.args = ["--workers", str(workers), "--jobs", str(jobs)]
        if concurrency:
            self.args += ["--concurrency", str(concurrency)]
        self._app: Any = None
        self._scheduler: Any = None

    def scheduler(self) -> Any:
        """A :class:`pipeline.scheduler.Scheduler` on the stack's Redis."""
        if self._scheduler is None:
            from pipeline.scheduler import Scheduler
            from pipeline.stack import read_stack, stack_broker_url

            state = read_stack(self.folder / "stack")
            if state is None:
                raise SystemExit("the remex stack is not up")
            self._scheduler = Scheduler.from_url(stack_broker_url(state))
        return self._scheduler

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(REMEX), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self) -> None:
        result = self.cli("up", "--detach", *self.args, timeout=300)
        if result.returncode != 0:
            raise SystemExit(f"remex up failed:\n{result.stdout}\n{result.stderr}")

    def down(self) -> None:
        if self._app is not None:
            self._app.close()
        self.cli("down", timeout=120)

    def build(self, project: Path, targets: Sequence[str]) -> dict[str, Any]:
        result = self.cli("build", "-C", str(project), *targets, "--json", timeout=BUILD_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"remex build exited {result.returncode}\n{result.stderr[-4000:]}")
        return dict(json.loads(result.stdout))

    def worker_stats(self) -> dict[str, dict[str, int]]:
        """``remex_stats`` of every worker: node name -> counters."""
        if self._app is None:
            from celery import Celery

            from pipeline.stack import read_stack, stack_broker_url

            state = read_stack(self.folder / "stack")
            if state is None:
                raise SystemExit("the remex stack is not up")
            self._app = Celery("remex-bench", broker=stack_broker_url(state))
            self._app.conf.update(broker_connection_retry_on_startup=True)
        replies = self._app.control.broadcast("remex_stats", reply=True, timeout=2.0)
        out: dict[str, dict[str, int]] = {}
        for reply in replies or []:
            out.update(reply)
        return out


# --------------------------------------------------------------------------- running


@dataclass
class Result:
    case: Case
    bst: list[float] = field(default_factory=list)
    remex: list[float] = field(default_factory=list)
    # per remex run: worker -> (elements it worked on, bytes down, bytes up)
    traffic: list[dict[str, tuple[int, int, int]]] = field(default_factory=list)
    peak_rss: dict[str, int] = field(default_factory=dict)
    # per remex run: the workers' CPU time (user + system) per element built, ms
    cpu_per_element: list[float] = field(default_factory=list)
    elements: int = 0
    # per remex run: the latency breakdown's lines (``--latency``)
    latency: list[list[str]] = field(default_factory=list)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def remex_run(
    stack: RemexStackCli, project: Path, case: Case, result: Result, latency: bool = False
) -> float:
    before = stack.worker_stats()
    holder: dict[str, Any] = {}

    def build() -> None:
        holder["out"] = stack.build(project, case.targets)

    wall = timed(build)
    after = stack.worker_stats()
    built = [e for e in holder["out"]["elements"] if e.get("state") == "built"]
    result.elements = len(built)
    per_worker: dict[str, int] = {}
    for element in built:
        for host in set(element.get("hosts", [])):
            per_worker[host] = per_worker.get(host, 0) + 1
    run: dict[str, tuple[int, int, int]] = {}
    cpu_ms = 0
    for node, now in after.items():
        then = before.get(node, {})
        cpu_ms += now.get("cpu_ms", 0) - then.get("cpu_ms", 0)
        # Celery node "remex-NAME@host"; the scheduler records NAME.
        count = per_worker.get(node.split("@", 1)[0].removeprefix("remex-"), 0)
        run[node] = (
            count,
            now["downloaded"] - then.get("downloaded", 0),
            now["uploaded"] - then.get("uploaded", 0),
        )
        result.peak_rss[node] = max(result.peak_rss.get(node, 0), now["peak_rss_kib"])
    result.traffic.append(run)
    result.cpu_per_element.append(cpu_ms / max(len(built), 1))
    if latency:
        from bench.latency import element_times, executor_timeline
        from bench.latency import report as latency_report
        from pipeline.api import open_context
        from pipeline.config import load_config

        build_id = str(holder["out"]["build"])
        times = element_times(stack.scheduler(), build_id)
        lines = latency_report(times)
        with open_context(load_config(environ=stack.env)) as ctx:
            lines += executor_timeline(ctx, stack.scheduler(), build_id, times, stack.jobs)
        result.latency.append(lines)
    return wall


def run_case(
    case: Case,
    runs: int,
    work: Path,
    stack: RemexStackCli,
    bst_config: str,
    *,
    latency: bool = False,
    only_remex: bool = False,
) -> Result:
    result = Result(case)
    for i in range(runs):
        salt = uuid.uuid4().hex[:12]
        project = case.make(work / f"{case.name}-{i}", salt)

        bst = Bst(project, work / f"bst-home-{case.name}-{i}", config_text=bst_config)

        def bst_once(bst: Bst = bst) -> None:
            bst.run("build", *case.targets, timeout=BUILD_TIMEOUT)

        order = ["bst", "remex"] if i % 2 == 0 else ["remex", "bst"]
        if only_remex:
            order = ["remex"]
        for tool in order:
            if tool == "bst":
                result.bst.append(timed(bst_once))
            else:
                result.remex.append(remex_run(stack, project, case, result, latency))
            print(
                f"  {case.name} run {i + 1}/{runs}: {tool} "
                f"{(result.bst if tool == 'bst' else result.remex)[-1]:.2f} s",
                flush=True,
            )
            if tool == "remex" and result.latency:
                for line in result.latency[-1]:
                    print(f"    {line}", flush=True)
        shutil.rmtree(project, ignore_errors=True)
    return result


def stable_runs(ratios: Sequence[float], tolerance: float = 0.05) -> str:
    """How many runs it takes for the ratio of medians to stay within
    ``tolerance`` of its final value: the first k after which every prefix's
    median ratio stays within it (a prefix check on the runs made)."""
    if len(ratios) < 2:
        return "n/a"
    final = statistics.median(ratios)
    for k in range(1, len(ratios) + 1):
        if all(
            abs(statistics.median(ratios[:j]) - final) <= tolerance * final
            for j in range(k, len(ratios) + 1)
        ):
            return str(k)
    return f">{len(ratios)}"


def report(results: Sequence[Result]) -> None:
    print()
    print("| case | bst median | remex median | remex / bst | per-run ratios | stable after |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if not r.bst:
            print(
                f"| {r.case.name}: {r.case.describe} | - | {statistics.median(r.remex):.2f} s "
                f"| - | - | - |"
            )
            continue
        ratios = [x / y for x, y in zip(r.remex, r.bst, strict=True)]
        ratio = statistics.median(r.remex) / statistics.median(r.bst)
        print(
            f"| {r.case.name}: {r.case.describe} | {statistics.median(r.bst):.2f} s "
            f"| {statistics.median(r.remex):.2f} s | {ratio:.2f} "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} | {stable_runs(ratios)} runs |"
        )
    print()
    # The load of other processes swings wall times by tens of percent; the
    # workers' own CPU time per element hardly moves with it.
    for r in results:
        if r.cpu_per_element:
            runs = ", ".join(f"{x:.1f}" for x in r.cpu_per_element)
            print(
                f"{r.case.name}: remex workers' CPU time per element built: median "
                f"{statistics.median(r.cpu_per_element):.1f} ms (runs: {runs})"
            )
    print()
    print(
        "remex workers: peak RSS, and CAS bytes (blob payloads + Directory messages) "
        "of the first run of each case (the workers' local CAS cold) and of the last:"
    )
    print(
        "| case | run | worker | peak RSS | elements | downloaded / element | uploaded / element |"
    )
    print("|---|---|---|---|---|---|---|")
    # A worker's "elements" are those it ran at least one stage of.
    for r in results:
        if not r.traffic:
            continue
        picked = [("first", r.traffic[0])]
        if len(r.traffic) > 1:
            picked.append(("last", r.traffic[-1]))
        for label, traffic in picked:
            for node, (count, down, up) in sorted(traffic.items()):
                per = max(count, 1)
                rss = r.peak_rss.get(node, 0) / 1024
                print(
                    f"| {r.case.name} | {label} | {node.split('@', 1)[0]} | {rss:.0f} MiB "
                    f"| {count} | {down / per / 1024:.1f} KiB ({down} B) "
                    f"| {up / per / 1024:.1f} KiB ({up} B) |"
                )
            total_down = sum(d for _, d, _ in traffic.values())
            total_up = sum(u for _, _, u in traffic.values())
            per = max(r.elements, 1)
            print(
                f"| {r.case.name} | {label} | all | | {r.elements} | "
                f"{total_down / per / 1024:.1f} KiB (total {total_down / 1024 / 1024:.2f} MiB) | "
                f"{total_up / per / 1024:.1f} KiB (total {total_up / 1024 / 1024:.2f} MiB) |"
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per tool and case")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--jobs", type=int, default=8, help="casd --jobs (both) and bst builders")
    parser.add_argument("--workers", type=int, default=2, help="remex up --workers")
    parser.add_argument("--concurrency", type=int, default=None, help="remex up --concurrency")
    parser.add_argument("--toolchain-sysroot", type=Path, default=None)
    parser.add_argument(
        "--download",
        choices=("minimal", "all"),
        default=None,
        help="the remex workers' [cas] download (default: the configuration's default)",
    )
    parser.add_argument(
        "--worker-nice",
        type=int,
        choices=range(20),
        default=None,
        metavar="N",
        help="the remex workers' [worker] nice (default: remex up's, 10)",
    )
    parser.add_argument(
        "--worker-staging",
        type=int,
        default=None,
        metavar="N",
        help="the remex workers' [worker] staging, 0: no limit (default: remex up's, 1)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--latency",
        action="store_true",
        help="after each remex build, where its time went (bench.latency: the critical "
        "path's sender gaps, pickups, stages and hops)",
    )
    parser.add_argument(
        "--remex-only", action="store_true", help="build with remex only (no bst, no ratio)"
    )
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")

    # Short: bst's and casd's unix sockets live below it.
    work = Path(tempfile.mkdtemp(prefix="vsb-", dir="/tmp"))
    print(f"work folder {work}; load {os.getloadavg()[0]:.2f}; {args.runs} runs per tool")
    sysroot = make_busybox_sysroot(work / "sysroot")
    makers: dict[str, Callable[[], Case]] = {
        "wide": lambda: dag_case("wide", "32 x sleep 1", sysroot, n=32, shape="wide", sleep=1),
        "chain": lambda: dag_case("chain", "20 trivial", sysroot, n=20, shape="chain"),
        "dag": lambda: dag_case("dag", "10 layers x 30", sysroot, n=300, shape="dag", layers=10),
        "toolchain": lambda: toolchain_case(
            make_toolchain_sysroot(
                args.toolchain_sysroot or (work / "toolchain" / "sysroot")
            ).resolve()
        ),
    }
    casd = CasdServer(work / "bst-casd", jobs=args.jobs)
    stack = RemexStackCli(
        work / "remex",
        workers=args.workers,
        jobs=args.jobs,
        concurrency=args.concurrency,
        download=args.download,
        worker_nice=args.worker_nice,
        worker_staging=args.worker_staging,
    )
    results: list[Result] = []
    try:
        casd.start()
        stack.up()
        bst_config = bst_remote_config(f"http://{casd.address}", args.jobs)
        for name in cases:
            case = makers[name]()
            print(f"{name}: {case.describe}", flush=True)
            results.append(
                run_case(
                    case,
                    args.runs,
                    work,
                    stack,
                    bst_config,
                    latency=args.latency,
                    only_remex=args.remex_only,
                )
            )
    finally:
        stack.down()
        casd.stop()
        if results:
            report(results)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
