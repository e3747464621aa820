"""Source fetch throughput: ``remex source fetch`` on 2 workers next to ``bst source fetch``.

A project of N ``import`` elements (default 50), each one ``tar`` source of
1-20 MB (incompressible bytes, sizes drawn from a fixed seed), served by the
loopback test HTTP server (:mod:`pipeline.testing.httpserver`, a process of
its own) through a project alias. Each run is cold and the two alternate:

- ``bst source fetch --deps all all.bst`` with a fresh cache folder and
  ``fetchers`` set to the same number of downloads at once as remex has;
- ``remex source fetch --deps all all.bst`` on a fresh ``remex up --workers W``
  stack (started before the clock starts): the workers download, verify,
  stage each tarball into a tree and push it to the source cache.

The server's access log checks that every tarball was downloaded by each
run. Printed: median wall time, MB, MB/s for each, and remex / bst.

    .venv/bin/python -m bench.fetch [--runs 1] [--count 50] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.vs_bst import RemexStackCli
from pipeline.testing.bst import Bst
from pipeline.testing.httpserver import HttpServerProcess

MB = 1_000_000
_CHUNK = 1 << 20


@dataclass
class Tarball:
    name: str
    size: int
    sha256: str


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)
    downloads: list[int] = field(default_factory=list)


def make_tarballs(folder: Path, count: int, low_mb: int, high_mb: int, seed: int) -> list[Tarball]:
    """``count`` uncompressed tarballs of one incompressible member each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i in range(count):
        size = rng.randint(low_mb * MB, high_mb * MB)
        name = f"pkg-{i:03d}.tar"
        path = folder / name
        data_rng = random.Random(seed * 1000 + i)
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(f"pkg-{i:03d}/data.bin")
            info.size = size
            tar.addfile(info, _RandomReader(data_rng, size))
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        out.append(Tarball(name=name, size=path.stat().st_size, sha256=digest.hexdigest()))
    return out


class _RandomReader:
    """``size`` pseudo-random bytes as a file to read (tarfile.addfile reads it)."""

    def __init__(self, rng: random.Random, size: int) -> None:
        self.rng = rng
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def write_project(root: Path, base_url: str, tarballs: list[Tarball]) -> None:
    (root / "elements").mkdir(parents=True, exist_ok=True)
    (root / "project.conf").write_text(
        f"name: fetchbench\nmin-version: 2.0\nelement-path: elements\n"
        f"aliases:\n  srv: {base_url}/\n"
    )
    names = []
    for tarball in tarballs:
        element = tarball.name.removesuffix(".tar") + ".bst"
        names.append(element)
        (root / "elements" / element).write_text(
            f"kind: import\nsources:\n- kind: tar\n  url: srv:{tarball.name}\n"
            f"  ref: {tarball.sha256}\n"
        )
    (root / "elements" / "all.bst").write_text(
        "kind: stack\ndepends:\n" + "".join(f"- {n}\n" for n in names)
    )


def bst_config(fetchers: int) -> str:
    return f"scheduler:\n  fetchers: {fetchers}\n  builders: 2\n  on-error: quit\n"


def run_bst(project: Path, home: Path, fetchers: int) -> float:
    bst = Bst(project, home, config_text=bst_config(fetchers))
    start = time.perf_counter()
    bst.run("source", "fetch", "--deps", "all", "all.bst", timeout=3600)
    return time.perf_counter() - start


def run_remex(project: Path, folder: Path, workers: int, fetch_concurrency: int) -> float:
    stack = RemexStackCli(folder, workers=workers, jobs=2, concurrency=None)
    stack.env["REMEX_WORKER_FETCH_CONCURRENCY"] = str(fetch_concurrency)
    stack.up()
    try:
        start = time.perf_counter()
        result = stack.cli("source", "fetch", "-C", str(project), "--deps", "all", "all.bst",
                           "--json", timeout=3600)  # fmt: skip
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(
                f"remex source fetch exited {result.returncode}\n{result.stderr[-4000:]}"
            )
        return seconds
    finally:
        stack.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="cold runs of each (alternating)")
    parser.add_argument("--count", type=int, default=50, help="tarballs")
    parser.add_argument("--min-mb", type=int, default=1)
    parser.add_argument("--max-mb", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="remex up --workers")
    parser.add_argument(
        "--fetch-concurrency", type=int, default=4, help="downloads at once per remex worker"
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--work", type=Path, default=None, help="keep everything here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="remex-bench-fetch-"))
    work.mkdir(parents=True, exist_ok=True)
    fetchers = args.workers * args.fetch_concurrency
    try:
        made = time.perf_counter()
        tarballs = make_tarballs(work / "served", args.count, args.min_mb, args.max_mb, args.seed)
        total = sum(t.size for t in tarballs)
        print(
            f"{len(tarballs)} tarballs, {total / MB:.0f} MB, made in "
            f"{time.perf_counter() - made:.1f} s; load {os.getloadavg()[0]:.1f}; "
            f"{fetchers} downloads at once for each tool "
            f"(remex: {args.workers} workers x {args.fetch_concurrency}; bst: fetchers)"
        )
        results = {"bst": Runs(), "remex": Runs()}
        with HttpServerProcess(work / "served", work / "access.log") as server:
            project = work / "project"
            write_project(project, server.base_url, tarballs)
            for run in range(args.runs):
                for tool in ("bst", "remex") if run % 2 == 0 else ("remex", "bst"):
                    before = server.count(status=200)
                    folder = work / f"{tool}-{run}"
                    if tool == "bst":
                        seconds = run_bst(project, folder, fetchers)
                    else:
                        seconds = run_remex(project, folder, args.workers, args.fetch_concurrency)
                    downloads = server.count(status=200) - before
                    results[tool].seconds.append(seconds)
                    results[tool].downloads.append(downloads)
                    print(f"  run {run + 1} {tool:5}: {seconds:7.1f} s, {downloads} downloads")
                    shutil.rmtree(folder, ignore_errors=True)
        print()
        print(f"{'tool':8}{'runs':>6}{'median s':>11}{'MB':>9}{'MB/s':>9}{'downloads':>12}")
        rates = {}
        for tool, runs in results.items():
            median = statistics.median(runs.seconds)
            rates[tool] = total / MB / median
            print(
                f"{tool:8}{len(runs.seconds):>6}{median:>11.1f}{total / MB:>9.0f}"
                f"{rates[tool]:>9.1f}{'/'.join(map(str, runs.downloads)):>12}"
            )
        print(f"\nremex / bst throughput: {rates['remex'] / rates['bst']:.2f} (target: >= 1)")
        for tool, runs in results.items():
            if any(d != len(tarballs) for d in runs.downloads):
                print(f"WARNING: {tool} did not download every tarball once per run")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
