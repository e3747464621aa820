"""Local CAS quota: peak usage of a worker's CAS while many large elements build.

Starts one buildbox-casd (execution and artifact server) and builds
``--builds`` (default 200) one-element builds in-process with the stage
functions (:func:`pipeline.stages.build_plan`, no Celery): each an ``import``
element of ``--size`` MB (default 5) of fresh random bytes, so nothing is
cached. Sources are staged and snapshotted as ``remex build`` does, from a
submitting CAS of their own; the builds run on a "worker" CAS with
``--quota`` MB (default 50) and the quota enforced, as ``remex worker`` has
it. ``--threads`` runs that many builds at once on the one worker CAS (a
worker's thread pool); each value given is one row.

A thread samples the worker CAS every 5 ms (objects plus temporary files
being written); the table shows the peak against the quota. Target: peak
<= 1.1 x quota.

Run: ``.venv/bin/python -m bench.cas_quota [--builds 200] [--size 5] [--quota 50]
[--threads 1,4] [--keep]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.api import plan
from pipeline.cas import LocalCas
from pipeline.reapi.channel import Endpoint
from pipeline.servers import CasdServer
from pipeline.stages import StageContext, build_plan, snapshot_sources

MiB = 1024 * 1024


@dataclass
class Row:
    threads: int
    builds: int
    built: int
    peak: int
    final: int
    cleanups: int
    seconds: float


class Sampler:
    """Samples a store's size (objects and temporary files) until stopped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> int:
        total = 0
        for folder in ("objects", "tmp"):
            for dirpath, _, files in os.walk(self.root / folder):
                for name in files:
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                        total += os.lstat(os.path.join(dirpath, name)).st_size
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.sample()


def one_build(work: Path, casd_url: str, worker: StageContext, index: int, size: int) -> bool:
    """Make, stage, snapshot and build one element of ``size`` bytes; True if built."""
    project = work / f"project-{index}"
    (project / "elements").mkdir(parents=True)
    (project / "files").mkdir()
    (project / "project.conf").write_text("name: quota\nmin-version: 2.0\nelement-path: elements\n")
    (project / "elements" / "big.bst").write_text(
        "kind: import\nsources:\n- kind: local\n  path: files\n"
    )
    (project / "files" / "big.bin").write_bytes(os.urandom(size))
    submit_cas = LocalCas(work / f"submit-cas-{index}")
    endpoint = Endpoint(casd_url)
    try:
        with StageContext.connect(submit_cas, endpoint, endpoint) as submitter:
            [element] = plan(project, ["big.bst"], cas=submit_cas)
            digests = [
                source.stage(submit_cas, work / f"staging-{index}-{i}")
                for i, source in enumerate(element.sources)
            ]
            snapshot_sources(submitter, digests)
            spec = element.build_spec(digests)
        [result] = build_plan(worker, [spec])
        if result["error"] is not None:
            print(f"build {index}: {result['error']}", file=sys.stderr)
        return result["state"] == "built"
    finally:
        # The submitting side is not what is measured: keep the disk small.
        shutil.rmtree(project, ignore_errors=True)
        shutil.rmtree(work / f"submit-cas-{index}", ignore_errors=True)


def run_case(work: Path, casd_url: str, *, builds: int, size: int, quota: int, threads: int) -> Row:
    cas_dir = work / f"worker-cas-{threads}"
    cas = LocalCas(cas_dir, quota_bytes=quota, enforce_quota=True)
    endpoint = Endpoint(casd_url)
    started = time.monotonic()
    with (
        StageContext.connect(cas, endpoint, endpoint) as worker,
        Sampler(cas_dir) as sampler,
        concurrent.futures.ThreadPoolExecutor(threads) as pool,
    ):
        futures = [
            pool.submit(one_build, work, casd_url, worker, threads * 100_000 + i, size)
            for i in range(builds)
        ]
        built = sum(1 for f in futures if f.result())
    seconds = time.monotonic() - started
    return Row(
        threads=threads,
        builds=builds,
        built=built,
        peak=sampler.peak,
        final=sampler.sample(),
        cleanups=cas.cleanups,
        seconds=seconds,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=200)
    parser.add_argument("--size", type=float, default=5.0, help="MB (MiB) per element")
    parser.add_argument("--quota", type=float, default=50.0, help="MB (MiB)")
    parser.add_argument("--threads", default="1,4", help="builds at once, one row each")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    size, quota = int(args.size * MiB), int(args.quota * MiB)
    work = Path(tempfile.mkdtemp(prefix="remex-bench-quota-"))
    rows: list[Row] = []
    try:
        with CasdServer(work / "casd", jobs=2) as casd:
            for threads in (int(t) for t in args.threads.split(",")):
                rows.append(
                    run_case(
                        work, casd.url, builds=args.builds, size=size, quota=quota, threads=threads
                    )
                )
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"\nlocal CAS quota: {args.builds} builds of {args.size:g} MiB import elements, "
        f"quota {args.quota:g} MiB (load {load:.1f})\n"
    )
    header = (
        "| builds at once | built | peak MiB | peak / quota | after MiB | cleanups | s | target |"
    )
    print(header)
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    ok = True
    for row in rows:
        ratio = row.peak / quota
        met = ratio <= 1.1 and row.built == row.builds
        ok = ok and met
        print(
            f"| {row.threads} | {row.built}/{row.builds} | {row.peak / MiB:.1f} | {ratio:.2f} | "
            f"{row.final / MiB:.1f} | {row.cleanups} | {row.seconds:.0f} | "
            f"{'met' if met else 'MISSED'} (<= 1.10) |"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
