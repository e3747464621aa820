"""Where a chain's time goes, stage by stage, without Celery: RPCs per stage.

Starts a buildbox-casd (execution, CAS, ActionCache, Remote Asset), makes a
chain (or ``--shape dag``) of ``--n`` trivial elements
(:func:`pipeline.testing.dag.make_dag_project`), and builds it in-process
with the five stage functions, counting every RPC
(``Remote.call``, by what it did) and the CAS bytes moved
(:data:`pipeline.reapi.cas.traffic.TRAFFIC`) per stage. Prints, per stage:
mean time, this process's CPU time, RPCs per element by kind, bytes
down/up per element.

``--workers 2`` builds as two workers would: two contexts, each with its own
local CAS and connections, the elements dealt to them in turn, so that a
dependency built on the other worker costs what it costs a real worker.

Run: ``.venv/bin/python -m bench.chain_profile [--n 20] [--shape chain|dag]
[--workers 1|2] [--download minimal|all]``
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cas import LocalCas
from pipeline.reapi.cas.traffic import TRAFFIC
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.servers.casd import CasdServer
from pipeline.spec import BuildSpec
from pipeline.stages import StageContext, execute, fetch_outputs, push_artifact, stage_to_cas
from pipeline.stages import upload as upload_stage
from pipeline.stages.state import State
from pipeline.testing.dag import make_dag_project

StageFn = Callable[[StageContext, BuildSpec, State], State]

_current = threading.local()
CALLS: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


@contextmanager
def counting() -> Iterator[None]:
    """Count Remote.call by the RPC it names, under the current stage."""
    original = Remote.call

    def call(self: Remote, fn: Callable[[], Any], *, what: str) -> Any:
        kind = what.split(" of ")[0].split(" on ")[0].split(" ")[0]
        CALLS[getattr(_current, "stage", "?")][kind] += 1
        return original(self, fn, what=what)

    Remote.call = call  # type: ignore[method-assign]
    try:
        yield
    finally:
        Remote.call = original  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--download", choices=("minimal", "all"), default=None)
    parser.add_argument("--shape", choices=("chain", "dag"), default="chain")
    parser.add_argument("--workers", type=int, choices=(1, 2), default=1)
    args = parser.parse_args(argv)
    from bench.pipeline import prepared_specs

    work = Path(tempfile.mkdtemp(prefix="chp-", dir="/tmp"))
    casd = CasdServer(work / "casd", jobs=8)
    try:
        casd.start()
        project = make_dag_project(work / "project", n=args.n, shape=args.shape)
        endpoint = Endpoint(casd.url)
        kwargs: dict[str, Any] = {}
        if args.download is not None:
            kwargs["download"] = args.download
        contexts = [
            StageContext(
                LocalCas(work / f"cas{i}"),
                Remote(endpoint),
                Remote(endpoint),
                owns_remotes=True,
                **kwargs,
            )
            for i in range(args.workers)
        ]
        ctx = contexts[0]
        specs = prepared_specs(ctx, project.path, ["all.bst"])
        stages: list[tuple[str, StageFn]] = [
            ("stage_to_cas", stage_to_cas),
            ("upload", upload_stage),
            ("execute", execute),
            ("fetch_outputs", fetch_outputs),
            ("push_artifact", push_artifact),
        ]
        seconds: dict[str, float] = collections.defaultdict(float)
        cpu: dict[str, float] = collections.defaultdict(float)
        down: dict[str, int] = collections.defaultdict(int)
        up: dict[str, int] = collections.defaultdict(int)
        chain = [s for s in specs if s["command"] is not None]
        with counting():
            for index, spec in enumerate(specs):
                ctx = contexts[index % len(contexts)]
                measured = spec["command"] is not None
                state: State = State()
                for name, fn in stages:
                    _current.stage = name if measured else "(other)"
                    before = TRAFFIC.snapshot()
                    t0, c0 = time.perf_counter(), time.process_time()
                    state = fn(ctx, spec, state)
                    if measured:
                        seconds[name] += time.perf_counter() - t0
                        cpu[name] += time.process_time() - c0
                        delta = TRAFFIC.snapshot() - before
                        down[name] += delta.downloaded
                        up[name] += delta.uploaded
        n = len(chain)
        print(
            f"{n} elements ({args.shape}), {args.workers} worker(s), in-process, "
            f"download={ctx_download(ctx)}"
        )
        print("| stage | mean | CPU | RPCs per element | down / element | up / element |")
        print("|---|---|---|---|---|---|")
        for name, _ in stages:
            rpcs = ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(CALLS[name].items()))
            print(
                f"| {name} | {seconds[name] / n * 1000:.0f} ms | {cpu[name] / n * 1000:.1f} ms "
                f"| {rpcs} "
                f"| {down[name] / n / 1024:.1f} KiB | {up[name] / n / 1024:.1f} KiB |"
            )
        total = sum(seconds.values())
        unary = sum(sum(CALLS[name].values()) for name, _ in stages)
        print(
            f"total {total:.2f} s, {total / n * 1000:.0f} ms per element, "
            f"this process's CPU {sum(cpu.values()) / n * 1000:.1f} ms per element"
        )
        print(f"unary RPCs per element (+ the Execute stream): {unary / n:.2f}")
        for each in contexts:
            each.close()
    finally:
        casd.stop()
        shutil.rmtree(work, ignore_errors=True)


def ctx_download(ctx: StageContext) -> str:
    return str(getattr(ctx, "download", "all"))


if __name__ == "__main__":
    main()
