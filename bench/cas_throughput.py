"""CAS throughput: local import and upload to buildbox-casd and BuildGrid.

Generates a tree (by default 5,000 files of 1-4 KiB and 20 files of 10 MiB),
imports it into a fresh local CAS, uploads it to a fresh buildbox-casd and a
fresh BuildGrid (on PostgreSQL), and prints MB/s (10^6 bytes) and files/s per step next to
single-core ``hashlib.sha256`` speed measured in the same run.

Targets (issue "Foundation"): large-file import >= 50% of hashlib's speed;
>= 5,000 small files/s imported; upload >= 100 MB/s to buildbox-casd on loopback.

Run: ``.venv/bin/python -m bench.cas_throughput [--small N] [--large N] [--no-buildgrid]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# The page cache is not dropped: the tree was just written, as a freshly built
# one would be; this measures hashing, copying and RPC cost.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cas import LocalCas, import_directory, tree_digests
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.servers import CasdServer
from pipeline.servers.testing import BuildGridServer, PostgresServer

MiB = 1024 * 1024
# Rates are reported in MB/s (10^6 bytes), the unit the targets are stated in.
MB = 1_000_000


def make_tree(root: Path, small: int, large: int, large_mib: int) -> tuple[int, int]:
    """Write the benchmark tree; return (small bytes, large bytes)."""
    rng = random.Random(42)
    small_bytes = large_bytes = 0
    for i in range(small):
        folder = root / "small" / f"d{i // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(1024, 4096))
        (folder / f"f{i:05d}").write_bytes(data)
        small_bytes += len(data)
    (root / "large").mkdir(parents=True, exist_ok=True)
    for i in range(large):
        data = os.urandom(large_mib * MiB)
        (root / "large" / f"big{i:02d}").write_bytes(data)
        large_bytes += len(data)
    return small_bytes, large_bytes


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def hashlib_speed(total_mib: int = 200) -> float:
    buffer = os.urandom(10 * MiB)
    start = time.perf_counter()
    for _ in range(total_mib // 10):
        hashlib.sha256(buffer).digest()
    return total_mib * MiB / MB / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--large", type=int, default=20)
    parser.add_argument("--large-mib", type=int, default=10)
    parser.add_argument("--no-buildgrid", action="store_true")
    args = parser.parse_args()

    rows: list[tuple[str, float, float | None, str]] = []
    work = Path(tempfile.mkdtemp(prefix="remex-bench-"))
    try:
        src = work / "src"
        small_bytes, large_bytes = make_tree(src, args.small, args.large, args.large_mib)
        sha_mbs = hashlib_speed()
        rows.append(("hashlib.sha256, 1 core, 10 MiB buffers", sha_mbs, None, "reference"))

        cas = LocalCas(work / "cas")
        t_small, _small_root = timed(lambda: import_directory(cas, src / "small"))
        rows.append(
            (
                f"import {args.small} small files",
                small_bytes / MB / t_small,
                args.small / t_small,
                f"target >= 5000 files/s: {'met' if args.small / t_small >= 5000 else 'NOT met'}",
            )
        )
        t_large, _large_root = timed(lambda: import_directory(cas, src / "large"))
        large_mbs = large_bytes / MB / t_large
        rows.append(
            (
                f"import {args.large} x {args.large_mib} MiB files",
                large_mbs,
                args.large / t_large,
                f"{100 * large_mbs / sha_mbs:.0f}% of hashlib; target >= 50%: "
                f"{'met' if large_mbs >= 0.5 * sha_mbs else 'NOT met'}",
            )
        )
        root = import_directory(cas, src)
        total_bytes = small_bytes + large_bytes
        n_blobs = len(tree_digests(cas, root))

        servers: list[tuple[str, Callable[[], object]]] = []
        casd = CasdServer(work / "casd").start()
        servers.append(("buildbox-casd", casd.stop))
        targets = [("buildbox-casd", casd.url)]
        if not args.no_buildgrid:
            pg = PostgresServer(work / "pg").start()
            bgd = BuildGridServer(work / "bgd", pg).start()
            servers += [("buildgrid", bgd.stop), ("postgres", pg.stop)]
            targets.append(("BuildGrid", bgd.url))
        try:
            for name, url in targets:
                with Remote(Endpoint(url)) as remote:
                    client = CasClient(remote)
                    t, _stats = timed(lambda: client.upload_tree(cas, root))  # noqa: B023
                    mbs = total_bytes / MB / t
                    note = f"{n_blobs} blobs"
                    if name == "buildbox-casd":
                        note += f"; target >= 100 MB/s: {'met' if mbs >= 100 else 'NOT met'}"
                    rows.append((f"upload whole tree to {name}", mbs, n_blobs / t, note))
                    t2, _ = timed(lambda: client.upload_tree(cas, root))  # noqa: B023
                    rows.append(
                        (
                            f"re-upload (all present) to {name}",
                            total_bytes / MB / t2,
                            n_blobs / t2,
                            "FindMissingBlobs only",
                        )
                    )
                    dest = LocalCas(work / f"down-{name}")
                    t3, _ = timed(lambda: client.download_into(dest, tree_digests(cas, root)))  # noqa: B023
                    rows.append(
                        (
                            f"download whole tree from {name}",
                            total_bytes / MB / t3,
                            n_blobs / t3,
                            "every blob verified",
                        )
                    )
        finally:
            for _, stop in servers:
                stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nCAS throughput ({os.cpu_count()} cores; tree: {args.small} x 1-4 KiB + "
        f"{args.large} x {args.large_mib} MiB)\n"
    )
    print(f"| {'step':<44} | {'MB/s':>8} | {'files/s':>9} | note")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 11}|------")
    for step, mbs, fps, note in rows:
        fps_text = f"{fps:9.0f}" if fps is not None else f"{'':>9}"
        print(f"| {step:<44} | {mbs:8.1f} | {fps_text} | {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
