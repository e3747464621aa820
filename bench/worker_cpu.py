"""Worker CPU per element: this tree next to another (a commit's files), at the same time.

The CPU time (user + system) the workers spend per element built hardly
moves with the machine's load, but it still moves by a third between
quiet and busy moments on a shared machine (the kernel's costs swing): two
commits compare only when built at the same moment. So this starts two
embedded stacks (``remex up --detach --workers W``, each with a private
``REMEX_STACK_DIR``): one runs this tree's code, the other the tree given
with ``--baseline`` (put first on ``PYTHONPATH``, which the stack's
workers inherit; make it with ``git archive COMMIT | tar -x -C DIR``).
Then rounds of the same cold build (a DAG of trivial elements with a new
salt each time, as ``bench.vs_bst``'s ``dag`` case) alternate between the
two, which goes first alternating too, and the workers' CPU per element of
each build (``remex_stats``) is printed, with the mean and the mean of
each round's difference.

Run: ``.venv/bin/python -m bench.worker_cpu --baseline DIR [--rounds 4]
[--elements 300] [--layers 10] [--workers 2] [--jobs 8] [--keep]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.vs_bst import RemexStackCli, Result, dag_case, remex_run
from pipeline.testing.sysroot import make_busybox_sysroot


def main(argv: Sequence[str] | None = None) -> None:
    """Build the same DAG on both stacks in alternate rounds; print CPU ms per element."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline", type=Path, required=True, help="a source tree to compare with"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--elements", type=int, default=300)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    baseline = args.baseline.resolve()
    if not (baseline / "tasks" / "app.py").is_file():
        parser.error(f"{baseline}: not a remex source tree (no tasks/app.py)")

    work = Path(tempfile.mkdtemp(prefix="wcpu-", dir="/tmp"))
    print(f"work folder {work}; load {os.getloadavg()[0]:.2f}", flush=True)
    sysroot = make_busybox_sysroot(work / "sysroot")
    case = dag_case(
        "dag",
        f"{args.elements} trivial",
        sysroot,
        n=args.elements,
        shape="dag",
        layers=args.layers,
    )
    stacks = {
        "this": RemexStackCli(
            work / "this", workers=args.workers, jobs=args.jobs, concurrency=None
        ),
        "baseline": RemexStackCli(
            work / "baseline", workers=args.workers, jobs=args.jobs, concurrency=None
        ),
    }
    path = os.environ.get("PYTHONPATH")
    stacks["baseline"].env["PYTHONPATH"] = (
        f"{baseline}{os.pathsep}{path}" if path else str(baseline)
    )
    results = {name: Result(case) for name in stacks}
    try:
        warm = Result(case)
        for name, stack in stacks.items():
            stack.up()
            # Not counted: the workers' first tasks connect and import, and
            # the DAG's base element becomes cached.
            remex_run(stack, case.make(work / f"{name}-warm", "warm"), case, warm)
        for i in range(args.rounds):
            order = ["this", "baseline"] if i % 2 == 0 else ["baseline", "this"]
            for name in order:
                project = case.make(work / f"{name}-{i}", uuid.uuid4().hex[:12])
                wall = remex_run(stacks[name], project, case, results[name])
                cpu = results[name].cpu_per_element[-1]
                print(
                    f"round {i + 1}/{args.rounds} {name:8}: {wall:6.2f} s, "
                    f"{cpu:5.1f} ms CPU / element ({results[name].elements} built), "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                shutil.rmtree(project, ignore_errors=True)
    finally:
        for stack in stacks.values():
            stack.down()
        report(results)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, Result]) -> None:
    """Each stack's CPU ms per element, its mean, and the mean paired difference."""
    for name, result in results.items():
        runs = result.cpu_per_element
        if runs:
            listed = ", ".join(f"{x:.1f}" for x in runs)
            print(f"{name:8}: mean {statistics.mean(runs):.1f} ms / element (runs: {listed})")
    this, base = results["this"].cpu_per_element, results["baseline"].cpu_per_element
    pairs = list(zip(this, base, strict=False))
    if pairs:
        diffs = [a - b for a, b in pairs]
        print(
            f"this - baseline: mean {statistics.mean(diffs):+.1f} ms / element "
            f"(rounds: {', '.join(f'{d:+.1f}' for d in diffs)})"
        )


if __name__ == "__main__":
    main()
