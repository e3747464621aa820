"""Generated test projects: many ``manual`` elements in a DAG, a wide fan or a chain.

Plain Python (no pytest): ``bench/`` imports it too. ::

    project = make_dag_project(tmp_path / "dag", n=40)            # shape="dag"
    project = make_dag_project(dest, n=32, shape="wide", sleep=1)
    project = make_dag_project(dest, n=20, shape="chain")
    project.path, project.targets          # build these: ("all.bst",)
    project.expected["e007.bst"]           # {"usr/share/dag/e007.txt": b"..."}

The project, like examples/hello, has a base ``import`` element (``base.bst``)
whose local source is a busybox sysroot (:func:`pipeline.testing.sysroot.make_busybox_sysroot`,
made in ``DEST/sysroot``), elements ``e000.bst`` ... (``manual``, each
build-depends on ``base.bst`` and on its DAG dependencies), and a ``stack``
``all.bst`` that depends on every ``eNNN.bst``.

Element ``eNNN.bst`` installs one file, ``usr/share/dag/eNNN.txt`` in its
artifact (:func:`file_name`), holding::

    eNNN
    <dep name> <sha256 of that dep's file>      one line per dependency, in order

so the expected content of every artifact is computable here (and a wrong or
missing dependency file shows up as a wrong artifact, or a failed build).

Shapes (``n`` elements ``e000`` ... ``e{n-1}``):

``dag``    ``e000`` is a fan-out root; the others are spread over ``layers``
           layers; an element of layer 1 depends on ``e000``; an element of
           layer L > 1 on one element of layer L-1 and 0-2 more of any lower
           layer (seeded, so the same arguments give the same project): diamonds.
``wide``   ``n`` independent elements (each depends on ``base.bst`` only).
``chain``  ``eK`` depends on ``eK-1``.

Every command prints ``building eNNN`` first (so each log has a line).
Options: ``sleep`` seconds each command sleeps (busybox ``sleep`` accepts
fractions); ``fail`` names elements whose command prints a marker
line and exits 1; ``salt`` is written into ``project.conf`` (an environment
variable of every command), so a new salt gives new cache keys for every
``manual`` element while the servers keep their caches.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.testing.sysroot import make_busybox_sysroot

__all__ = [
    "FAIL_MARKER",
    "SHAPES",
    "DagProject",
    "expected_content",
    "file_name",
    "make_dag_project",
]

SHAPES = ("dag", "wide", "chain")
# What a failing element's command prints before ``exit 1``.
FAIL_MARKER = "remex-test: this element fails on purpose"
DATA_DIR = "usr/share/dag"


@dataclass
class DagProject:
    """A generated project.

    Attributes:
        path: the project folder (holding ``project.conf``).
        elements: the ``manual`` elements, ``e000.bst`` ..., dependencies first.
        deps: element -> its DAG dependencies (``manual`` ones; ``base.bst`` not listed).
        expected: element -> {path in its artifact's files: content}; every
            ``manual`` element (failing ones and their dependents too, as
            they would be if they built); ``base.bst`` is left out;
            ``all.bst`` maps to {} (a stack's artifact is empty).
        failing: the elements made to fail.
        targets: what to build: ``("all.bst",)``.
    """

    path: Path
    elements: list[str]
    deps: dict[str, list[str]]
    expected: dict[str, dict[str, bytes]]
    failing: frozenset[str] = frozenset()
    targets: tuple[str, ...] = ("all.bst",)
    all_elements: list[str] = field(default_factory=list)
    """Every element of the build of ``targets``: base, eNNN ..., all (dependencies first)."""

    def dependents(self, names: Iterable[str]) -> set[str]:
        """Every element that depends on one of ``names``, transitively
        (``all.bst`` included; ``names`` themselves not)."""
        wanted = set(names)
        found: set[str] = set()
        for element in self.elements:  # dependencies first: one pass is enough
            if any(d in wanted or d in found for d in self.deps[element]):
                found.add(element)
        if wanted or found:
            found.add("all.bst")
        return found - wanted

    def independent_of(self, names: Iterable[str]) -> set[str]:
        """The ``manual`` elements neither in ``names`` nor depending on them."""
        names = set(names)
        return set(self.elements) - names - self.dependents(names)


def file_name(element: str) -> str:
    """The path of ``element``'s file in its artifact: ``usr/share/dag/eNNN.txt``."""
    return f"{DATA_DIR}/{element.removesuffix('.bst')}.txt"


def expected_content(element: str, deps: Sequence[str], contents: dict[str, bytes]) -> bytes:
    """What ``element``'s file holds, given its dependencies' file contents."""
    lines = [element.removesuffix(".bst")]
    lines += [
        f"{dep.removesuffix('.bst')} {hashlib.sha256(contents[dep]).hexdigest()}" for dep in deps
    ]
    return ("\n".join(lines) + "\n").encode()


def make_dag_project(
    dest: str | Path,
    n: int = 40,
    *,
    shape: str = "dag",
    layers: int = 5,
    sleep: float = 0.0,
    fail: Iterable[str] = (),
    salt: str = "",
    seed: int = 4,
    sysroot: str | Path | None = None,
) -> DagProject:
    """Write a project of ``n`` ``manual`` elements to ``dest`` (created; must not
    exist or be empty) and return what building it must give.

    Args:
        shape: ``dag``, ``wide`` or ``chain`` (see the module docstring).
        layers: for ``dag``: layers above the root ``e000`` (at least 2, when n allows).
        sleep: seconds every command sleeps before it works.
        fail: element names (``e005.bst``) whose command exits 1.
        salt: changes every ``manual`` element's cache key.
        seed: for ``dag``: the random choice of dependencies.
        sysroot: an existing busybox sysroot to copy (faster than making one);
            default: made with :func:`make_busybox_sysroot`.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, not {shape!r}")
    if n < 1:
        raise ValueError("n must be at least 1")
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ValueError(f"{root} is not empty")
    names = [f"e{i:03d}.bst" for i in range(n)]
    deps = _dependencies(names, shape, layers, random.Random(seed))
    failing = frozenset(fail)
    unknown = failing - set(names)
    if unknown:
        raise ValueError(f"fail names unknown elements: {sorted(unknown)}")

    if sysroot is not None:
        shutil.copytree(sysroot, root / "sysroot", symlinks=True)
    else:
        make_busybox_sysroot(root / "sysroot")
    elements_dir = root / "elements"
    elements_dir.mkdir()
    (root / "project.conf").write_text(
        "name: dag\n"
        "min-version: 2.0\n"
        "element-path: elements\n"
        "environment:\n"
        f"  DAG_SALT: {_quote(salt)}\n"
    )
    (elements_dir / "base.bst").write_text(
        "kind: import\nsources:\n- kind: local\n  path: sysroot\n"
    )
    contents: dict[str, bytes] = {}
    for name in names:
        contents[name] = expected_content(name, deps[name], contents)
        (elements_dir / name).write_text(
            _manual_element(name, deps[name], sleep=sleep, fails=name in failing)
        )
    (elements_dir / "all.bst").write_text(
        "kind: stack\ndepends:\n" + "".join(f"- {name}\n" for name in names)
    )
    expected: dict[str, dict[str, bytes]] = {
        name: {file_name(name): contents[name]} for name in names
    }
    expected["all.bst"] = {}
    return DagProject(
        path=root,
        elements=names,
        deps=deps,
        expected=expected,
        failing=failing,
        all_elements=["base.bst", *names, "all.bst"],
    )


# --- private ---------------------------------------------------------------------


def _dependencies(
    names: list[str], shape: str, layers: int, rng: random.Random
) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {name: [] for name in names}
    if shape == "wide":
        return deps
    if shape == "chain":
        for previous, name in itertools.pairwise(names):
            deps[name] = [previous]
        return deps
    # dag: e000 is layer 0; the rest go to layers 1..L in order (contiguous runs).
    rest = names[1:]
    if not rest:
        return deps
    count = max(1, min(layers, len(rest)))
    layer_of: list[list[str]] = [[names[0]]]
    size, extra = divmod(len(rest), count)
    start = 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        layer_of.append(rest[start:end])
        start = end
    for depth in range(1, len(layer_of)):
        below = [n for layer in layer_of[:depth] for n in layer]
        for name in layer_of[depth]:
            if depth == 1:
                chosen = [names[0]]
            else:
                chosen = [rng.choice(layer_of[depth - 1])]
                for _ in range(rng.randint(0, 2)):
                    candidate = rng.choice(below)
                    if candidate not in chosen:
                        chosen.append(candidate)
            deps[name] = sorted(chosen)
    return deps


def _manual_element(name: str, deps: Sequence[str], *, sleep: float, fails: bool) -> str:
    short = name.removesuffix(".bst")
    out = f"%{{install-root}}/{DATA_DIR}/{short}.txt"
    build = [f"echo 'building {short}'"]
    if sleep > 0:
        build.append(f"sleep {sleep:g}")
    if fails:
        build.append(f"echo '{FAIL_MARKER}: {short}'")
        build.append("exit 1")
    build.append(f"printf '%s\\n' {short} > out.txt")
    for dep in deps:
        dep_short = dep.removesuffix(".bst")
        build.append(
            f"printf '%s %s\\n' {dep_short} "
            f'"$(sha256sum < /{DATA_DIR}/{dep_short}.txt | cut -d" " -f1)" >> out.txt'
        )
    lines = [
        "kind: manual",
        "build-depends:",
        "- base.bst",
        *(f"- {dep}" for dep in deps),
        "config:",
        "  build-commands:",
        *(f"  - {_quote(command)}" for command in build),
        "  install-commands:",
        f"  - {_quote(f'mkdir -p %{{install-root}}/{DATA_DIR}')}",
        f"  - {_quote(f'cp out.txt {out}')}",
    ]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A YAML double-quoted scalar."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
