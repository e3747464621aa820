"""examples/hello for tests: a private copy of the project, and file trees to compare.

Plain Python (no pytest fixtures): the integration tests that build the
example (with remex, and with BuildStream as the peer) share it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline.cas import LocalCas
from pipeline.elements import Element, load_project
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.spec import BuildSpec
from pipeline.stages import ElementResult, StageContext, build_plan, snapshot_sources

__all__ = [
    "ELEMENTS",
    "EXPECTED_HELLO_FILES",
    "HELLO_DIR",
    "CountingRemote",
    "Entry",
    "RemexBuild",
    "calls",
    "copy_hello_project",
    "file_tree",
    "load_and_build",
    "stage_context",
]

T = TypeVar("T")

HELLO_DIR = Path(__file__).resolve().parent.parent / "examples" / "hello"

ELEMENTS = ("base.bst", "greeting.bst", "name.bst", "hello.bst", "app.bst")
"""Every element of the project, in a dependency order."""

# What hello.bst's commands must install: (kind, content or target, executable).
Entry = tuple[str, bytes | str | None, bool]

EXPECTED_HELLO_FILES: dict[str, Entry] = {
    "usr": ("dir", None, False),
    "usr/bin": ("dir", None, False),
    "usr/bin/hello": (
        "file",
        b"#!/bin/sh\n"
        b"# hello: print the greeting that was assembled at build time.\n"
        b'exec cat "/usr/share/hello/message"\n',
        True,
    ),
    "usr/bin/hi": ("symlink", "hello", False),
    "usr/share": ("dir", None, False),
    "usr/share/hello": ("dir", None, False),
    "usr/share/hello/message": ("file", b"Hello, world!\n", False),
}
"""The files of hello.bst's artifact, exactly."""

_NOT_COPIED = shutil.ignore_patterns("sysroot", ".sysroot.*", ".bst2", ".bst")


def copy_hello_project(dest: Path) -> Path:
    """Copy examples/hello to ``dest`` (which must not exist) and make its sysroot there.

    The copy's ``make-sysroot.sh`` builds ``dest/sysroot`` from Debian's
    busybox-static, so the example's own script is what the tests use.

    Returns:
        ``dest``.
    """
    shutil.copytree(HELLO_DIR, dest, symlinks=True, ignore=_NOT_COPIED)
    result = subprocess.run(
        ["sh", str(dest / "make-sysroot.sh")], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"make-sysroot.sh failed ({result.returncode}):\n{result.stderr}")
    return dest


def file_tree(root: Path) -> dict[str, Entry]:
    """Every path under ``root`` (relative, ``/``-separated) -> what it is.

    Files give their content and executable bit, symlinks their target,
    folders nothing: what a CAS tree keeps, so a remex checkout and a
    BuildStream checkout compare equal when they hold the same build output
    (owners, mtimes and permission bits other than "executable" are left out).
    """
    tree: dict[str, Entry] = {}
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                tree[rel] = ("symlink", os.readlink(path), False)
            elif stat.S_ISDIR(mode):
                tree[rel] = ("dir", None, False)
            elif stat.S_ISREG(mode):
                tree[rel] = ("file", path.read_bytes(), bool(mode & stat.S_IXUSR))
            else:
                tree[rel] = (f"special:{stat.S_IFMT(mode):o}", None, False)
    return tree


# --- building with remex ------------------------------------------------------


class _CountingStub:
    """A gRPC stub whose method calls are counted (by method name) before they go out."""

    def __init__(self, stub: Any, calls: Counter[str], lock: threading.Lock) -> None:
        self._stub = stub
        self._calls = calls
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        if not callable(method):
            return method

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._calls[name] += 1
            return method(*args, **kwargs)

        return counted


class CountingRemote(Remote):
    """A :class:`Remote` that counts every RPC made through its stubs, by method name.

    Counting at the stub, below every client, sees all calls: ``calls["Execute"]``
    is how many times an action was sent for execution, ``sum(calls.values())``
    how many RPCs of any kind reached the server.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self.calls: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def stub(self, stub_class: type[T]) -> T:
        return _CountingStub(super().stub(stub_class), self.calls, self._count_lock)  # type: ignore[return-value]


@contextmanager
def stage_context(
    local_cas_dir: Path, execution_url: str, artifacts_url: str
) -> Iterator[StageContext]:
    """A StageContext on a fresh local CAS with two counting remotes (even for one URL)."""
    execution = CountingRemote(Endpoint(execution_url))
    artifacts = CountingRemote(Endpoint(artifacts_url))
    try:
        yield StageContext(LocalCas(local_cas_dir), execution, artifacts)
    finally:
        execution.close()
        artifacts.close()


def calls(ctx: StageContext) -> tuple[Counter[str], Counter[str]]:
    """The RPC counters of a context made by :func:`stage_context`: (execution, artifacts)."""
    assert isinstance(ctx.execution, CountingRemote)
    assert isinstance(ctx.artifacts, CountingRemote)
    return ctx.execution.calls, ctx.artifacts.calls


@dataclass
class RemexBuild:
    """What :func:`load_and_build` did: the plan, the specs, a result per element."""

    plan: list[Element]
    specs: dict[str, BuildSpec]
    results: dict[str, ElementResult]

    def outcomes(self) -> dict[str, str]:
        """Element name -> ``cached``, ``built``, ``failed`` or ``skipped``."""
        return {name: result["state"] for name, result in self.results.items()}

    def names(self, outcome: str) -> set[str]:
        """The elements with this outcome."""
        return {name for name, state in self.outcomes().items() if state == outcome}

    def runtime_uris(self, element: str) -> list[str]:
        """Artifact URIs of the element's runtime closure, without the element itself."""
        by_name = {e.name: e for e in self.plan}
        closure = by_name[element].runtime_closure()
        return [dep.artifact_uri for dep in closure if dep.name != element]


def load_and_build(
    ctx: StageContext,
    project_dir: Path,
    targets: Sequence[str] = ("app.bst",),
    *,
    scratch: Path,
    before_build: Callable[[list[Element]], None] | None = None,
) -> RemexBuild:
    """Build as ``remex build`` does, in-process: load the project (every check
    happens here, before anything is built), stage and snapshot the sources
    into the artifact server's CAS, then run the stages of every element in
    dependency order (:func:`pipeline.stages.build_plan`).

    Raises:
        LoadError: the project is wrong (nothing reached any server then).
    """
    plan = load_project(project_dir, cas=ctx.local_cas).load_targets(list(targets))
    if before_build is not None:
        before_build(plan)
    specs: dict[str, BuildSpec] = {}
    for element in plan:
        scratch.mkdir(parents=True, exist_ok=True)
        digests = [source.stage(ctx.local_cas, scratch) for source in element.sources]
        snapshot_sources(ctx, digests)
        specs[element.name] = element.build_spec(digests)
    results = build_plan(ctx, list(specs.values()))
    return RemexBuild(plan, specs, {result["element"]: result for result in results})
