"""Print what `bst show --format` gives for this project, as a Python dict literal.

Run from the worktree root with BuildStream 2.8.1 and buildstream-plugins 2.8.0
installed (``.venv/bin/python tests/format_projects/show/capture.py``); the output
is the CAPTURED table in tests/unit/test_show.py. A parity test can run it again.
"""

from __future__ import annotations

import os
import pprint
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BST = str(Path(sys.executable).with_name("bst"))

# (format, --deps, targets)
RUNS: list[tuple[str, str, tuple[str, ...]]] = [
    *[
        (f, "none", (e,))
        for f in ("%{vars}", "%{env}", "%{config}", "%{public}")
        for e in ("base.bst", "lib.bst", "extra.bst", "app.bst")
    ],
    (
        "[%{name:^12}|%{name:>10}|%{key:.4}] deps=%{deps} b=%{build-deps} r=%{runtime-deps}",
        "all",
        ("app.bst",),
    ),
    ("%{name}|%{key}|%{full-key}|%{kind}", "all", ("app.bst",)),
    *[("%{name}", deps, ("app.bst",)) for deps in ("none", "run", "build", "all")],
    ("%{name}", "all", ("extra.bst", "lib.bst")),
    ("%{name}", "run", ("app.bst", "lib.bst")),
    ("%{name}", "build", ("app.bst", "extra.bst")),
    ("%{name}: %{deps}", "all", ("order.bst",)),
]


def main() -> None:
    """Run bst for every entry of RUNS and print the table."""
    captured: dict[tuple[str, str, tuple[str, ...]], str] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, XDG_CACHE_HOME=cache)
        for fmt, deps, targets in RUNS:
            out = subprocess.run(
                [
                    BST,
                    "--no-colors",
                    "-C",
                    str(HERE),
                    "show",
                    "--deps",
                    deps,
                    "--format",
                    fmt,
                    *targets,
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            # click.echo adds one newline after bst's report.
            captured[(fmt, deps, targets)] = out.removesuffix("\n")
    pprint.pprint(captured, width=100)


if __name__ == "__main__":
    main()
