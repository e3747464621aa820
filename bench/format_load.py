"""Loading benchmark: ``remex show`` next to ``bst show`` on a 1,000-element project.

Generates a project that uses what makes loading slow: options of each type
(bool, enum, flags), ``(?)`` conditionals in project.conf and in every
element, an ``(@)`` include file shared by every element, list directives
(``(>)``, ``(<)``, ``(=)``), and 1,000 ``manual`` elements in a layered DAG
(each build-depends on one to three elements of lower layers) under a
``stack`` target. Then times, as a user would run them, ::

    remex show -C PROJECT -f FORMAT all.bst
    bst show --format FORMAT all.bst        (this venv's bst, private folders)

for each format (wall time of the whole command, ``--repeat`` runs after one
warm-up run each, median), and prints a table with the ratio. Both show the
same elements in the same order (checked on the names). The formats leave
out ``%{state}``: remex would ask the artifact server, bst its local cache.

    .venv/bin/python -m bench.format_load [--elements 1000] [--repeat 3] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.testing.bst import BST, Bst

FORMATS = ("%{name} %{key}", "%{name} %{vars}")

PROJECT_CONF = """\
name: loadbench
min-version: 2.0
element-path: elements

options:
  debug:
    type: bool
    description: debug build
    default: false
    variable: debug_flag
  flavour:
    type: enum
    description: flavour
    values: [plain, fancy, extra]
    default: fancy
    variable: flavour
  features:
    type: flags
    description: features
    values: [net, ui, docs, i18n]
    default: [net, ui]
    variable: features

variables:
  opt-level: "2"
  prefix-extra: /opt/bench
  (?):
  - debug:
      opt-level: "0"
  - flavour == "fancy":
      prefix-extra: /opt/fancy
  - ("docs" in features):
      docs-dir: "%{datadir}/doc/bench"

environment:
  BENCH: "yes"
  (?):
  - flavour != "plain":
      BENCH_FLAVOUR: "%{flavour}"

elements:
  manual:
    variables:
      bench-kind: manual
"""

SHARED_INCLUDE = """\
variables:
  shared-cflags: -O%{opt-level}
  (?):
  - ("ui" in features):
      shared-ui: enabled
  - debug:
      shared-cflags: -O0 -g
environment:
  SHARED_CFLAGS: "%{shared-cflags}"
config:
  configure-commands:
  - echo configure %{element-name}
  build-commands:
  - echo build %{element-name} with %{shared-cflags}
"""

ELEMENT = """\
kind: manual
description: element {index} of layer {layer}
(@): include/shared.yml
build-depends:
{deps}
variables:
  element-index: "{index}"
  (?):
  - flavour == "extra":
      element-extra: "yes"
  - ("net" in features):
      element-net: "on"
environment:
  ELEMENT_INDEX: "%{{element-index}}"
config:
  configure-commands:
    (<):
    - echo before configure {index}
  build-commands:
    (>):
    - echo after build {index}
  install-commands:
  - mkdir -p %{{install-root}}%{{prefix-extra}}
  - echo {index} > %{{install-root}}%{{prefix-extra}}/e{index:04d}
  (?):
  - debug:
      install-commands:
        (>):
        - echo debug {index}
public:
  bst:
    split-rules:
      devel:
        (>):
        - "%{{prefix-extra}}/e{index:04d}.h"
"""


def make_project(root: Path, n: int, *, layers: int = 10, seed: int = 7) -> Path:
    """Write the project (``n`` manual elements + ``all.bst``) under ``root``."""
    rng = random.Random(seed)
    (root / "elements").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "project.conf").write_text(PROJECT_CONF)
    (root / "include" / "shared.yml").write_text(SHARED_INCLUDE)
    per_layer = max(1, n // layers)
    names: list[str] = []
    for index in range(n):
        layer = min(index // per_layer, layers - 1)
        lower = names[: layer * per_layer]
        deps = sorted(set(rng.sample(lower, k=min(len(lower), rng.randint(1, 3))))) if lower else []
        name = f"e{index:04d}.bst"
        dep_lines = "\n".join(f"- {d}" for d in deps) if deps else "[]"
        (root / "elements" / name).write_text(
            ELEMENT.format(index=index, layer=layer, deps=dep_lines).replace(
                "build-depends:\n[]", "build-depends: []"
            )
        )
        names.append(name)
    (root / "elements" / "all.bst").write_text(
        "kind: stack\ndepends:\n" + "".join(f"- {name}\n" for name in names)
    )
    return root


def remex_command(project: Path, fmt: str) -> list[str]:
    remex = Path(sys.executable).with_name("remex")
    return [str(remex), "show", "-C", str(project), "-f", fmt, "all.bst"]


def timed(run: object) -> tuple[float, str]:
    started = time.perf_counter()
    out = run()  # type: ignore[operator]
    return time.perf_counter() - started, out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="remex-format-load-"))
    project = make_project(work / "project", args.elements)
    (work / "remex.toml").write_text("")
    remex_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("REMEX_")},
        "REMEX_CONFIG": str(work / "remex.toml"),
        "REMEX_STACK_DIR": str(work / "no-stack"),
        "REMEX_CAS_DIR": str(work / "cas"),
    }
    bst = Bst(project, work / "bst")

    def run_remex(fmt: str) -> str:
        return subprocess.run(
            remex_command(project, fmt), env=remex_env, capture_output=True, text=True, check=True
        ).stdout

    def run_bst(fmt: str) -> str:
        return bst.run("show", "--deps", "all", "--format", fmt, "all.bst").stdout

    load = os.getloadavg()[0]
    print(f"format_load: {args.elements} manual elements + all.bst, {args.repeat} runs "
          f"after a warm-up, median; load {load:.2f}; bst {BST}")  # fmt: skip
    rows = []
    notes = []
    for fmt in FORMATS:
        _, remex_out = timed(lambda fmt=fmt: run_remex(fmt))
        _, bst_out = timed(lambda fmt=fmt: run_bst(fmt))
        names_remex = [line.split()[0] for line in remex_out.splitlines() if line[:1] == "e"]
        names_bst = [line.split()[0] for line in bst_out.splitlines() if line[:1] == "e"]
        if names_remex != names_bst:
            print(f"  warning: remex and bst list different elements for {fmt!r}")
        remex_times: list[float] = []
        bst_times: list[float] = []
        for _ in range(args.repeat):
            # Interleaved, so a burst of load on the machine hits both.
            remex_times.append(timed(lambda fmt=fmt: run_remex(fmt))[0])
            bst_times.append(timed(lambda fmt=fmt: run_bst(fmt))[0])
        remex_median = statistics.median(remex_times)
        bst_median = statistics.median(bst_times)
        rows.append((fmt, remex_median, bst_median, remex_median / bst_median))
        notes.append(
            f"  {fmt!r}: remex runs {', '.join(f'{t:.2f}' for t in remex_times)} s; "
            f"bst runs {', '.join(f'{t:.2f}' for t in bst_times)} s; ratio per run "
            + ", ".join(f"{r / b:.2f}" for r, b in zip(remex_times, bst_times, strict=True))
        )
    print()
    print(f"{'format':<20} {'remex show':>11} {'bst show':>10} {'remex/bst':>10}")
    for fmt, remex_s, bst_s, ratio in rows:
        print(f"{fmt:<20} {remex_s:>10.2f}s {bst_s:>9.2f}s {ratio:>10.2f}")
    print()
    print("\n".join(notes))
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
