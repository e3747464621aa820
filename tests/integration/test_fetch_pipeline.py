"""Network sources fetched by ``remex.fetch_source`` tasks on real workers,
into the source cache: once per source for the farm, never by the
submitting host, a failure named, a killed worker's fetch done elsewhere.

The stack's processes know a fake network kind, ``fakenet``
(``tests/integration/fakenet_site/sitecustomize.py``): it "downloads" a file
by absolute path, slowly if asked, and logs every download next to it (the
access log). The tar-over-HTTP tests use the same project shape.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.servers import RemexStack, RemexWorker
from pipeline.stages.fetch import scratch_root
from tests.integration.test_pipeline import wait_for

SITE = Path(__file__).parent / "fakenet_site"
BUILD_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def fetch_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    """Redis, an execution and an artifact casd, workers w1 and w2 (each with
    its fetch pool), all knowing the ``fakenet`` kind."""
    with RemexStack(
        tmp_path_factory.mktemp("fetch-stack"), workers=2, extra_env={"PYTHONPATH": str(SITE)}
    ) as stack:
        yield stack


@dataclass
class FetchProject:
    """A project whose ``manual`` elements each concatenate their sources'
    files (sorted by path) into ``out/NAME.txt``."""

    path: Path
    elements: list[str]

    def targets(self) -> list[str]:
        return ["all.bst"]


def make_project(
    dest: Path, sysroot: Path, sources: Mapping[str, Sequence[str]], *, salt: str
) -> FetchProject:
    """``sources``: element name (without ``.bst``) -> its ``sources`` entries as YAML."""
    (dest / "elements").mkdir(parents=True)
    if not (dest / "sysroot").exists():
        shutil.copytree(sysroot, dest / "sysroot", symlinks=True)
    (dest / "project.conf").write_text(
        f"name: fetch\nmin-version: 2.0\nelement-path: elements\n"
        f"environment:\n  FETCH_SALT: {salt}\n"
    )
    (dest / "elements" / "base.bst").write_text(
        "kind: import\nsources:\n- kind: local\n  path: sysroot\n"
    )
    names = []
    for name, entries in sources.items():
        names.append(f"{name}.bst")
        (dest / "elements" / f"{name}.bst").write_text(
            "kind: manual\n"
            "build-depends:\n- base.bst\n"
            "sources:\n" + "".join(entries) + "config:\n  install-commands:\n"
            "  - mkdir -p %{install-root}/out\n"
            f"  - find . -type f | sort | xargs cat > %{{install-root}}/out/{name}.txt\n"
        )
    (dest / "elements" / "all.bst").write_text(
        "kind: stack\ndepends:\n" + "".join(f"- {n}\n" for n in names)
    )
    return FetchProject(dest, names)


def fakenet(path: Path, *, delay: float = 0.0, ref: str | None = None) -> str:
    ref = ref or hashlib.sha256(path.read_bytes()).hexdigest()
    return f"- kind: fakenet\n  url: fakenet://{path}\n  ref: {ref}\n  delay: '{delay}'\n"


def downloads(path: Path) -> list[dict[str, Any]]:
    log = Path(f"{path}.log")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def build(stack: RemexStack, project: FetchProject) -> tuple[int, dict[str, Any]]:
    result = stack.cli("build", "-C", project.path, *project.targets(), "--json",
                       timeout=BUILD_TIMEOUT)  # fmt: skip
    try:
        return result.returncode, json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"no JSON:\n{result.stdout}\n{result.stderr}\n{stack.logs()}"
        ) from None


def by_element(output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["element"]: e for e in output["elements"]}


def published(folder: Path, name: str, size: int = 1000) -> Path:
    """A file of ``size`` bytes of its own (seeded by a fresh id) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    seed = uuid.uuid4().hex.encode()
    data = (seed * (size // len(seed) + 1))[:size]
    path.write_bytes(data)
    return path


def test_shared_sources_are_fetched_once_and_a_second_build_fetches_nothing(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path
) -> None:
    # Given six elements using three network sources, most of them shared
    served = tmp_path / "served"
    a, b, c = (published(served, f"{n}.txt") for n in "abc")
    sources = {
        "e0": [fakenet(a)],
        "e1": [fakenet(a)],
        "e2": [fakenet(b)],
        "e3": [fakenet(b)],
        "e4": [fakenet(a), fakenet(c)],
        "e5": [fakenet(c)],
    }
    project = make_project(tmp_path / "p1", busybox_sysroot, sources, salt=uuid.uuid4().hex)
    # When it builds on two workers
    code, output = build(fetch_stack, project)
    # Then it succeeded, through three fetch nodes, each source downloaded once
    assert code == 0, (output, fetch_stack.logs())
    nodes = {n: e for n, e in by_element(output).items() if n.startswith("fetch:")}
    assert sorted(n.split("@")[0] for n in nodes) == ["fetch:a.txt", "fetch:b.txt", "fetch:c.txt"]
    assert all(e["state"] == "built" and e["downloaded"] for e in nodes.values())
    assert [len(downloads(p)) for p in (a, b, c)] == [1, 1, 1]
    # And each element's artifact holds its sources' bytes
    out = tmp_path / "checkout"
    result = fetch_stack.cli("checkout", "-C", project.path, "--deps", "run", "all.bst", out)
    assert result.returncode == 0, result.stderr
    assert (out / "out" / "e4.txt").read_bytes() == a.read_bytes() + c.read_bytes()
    assert (out / "out" / "e2.txt").read_bytes() == b.read_bytes()

    # When the same sources are built again under new cache keys (nothing cached)
    again = make_project(tmp_path / "p2", busybox_sysroot, sources, salt=uuid.uuid4().hex)
    code, output = build(fetch_stack, again)
    # Then no fetch node was needed and nothing was downloaded
    assert code == 0, (output, fetch_stack.logs())
    assert not [n for n in by_element(output) if n.startswith("fetch:")]
    assert [len(downloads(p)) for p in (a, b, c)] == [1, 1, 1]
    # And remex source fetch has nothing to do
    result = fetch_stack.cli("source", "fetch", "-C", again.path, "--deps", "all", "all.bst")
    assert result.returncode == 0, result.stderr
    assert "nothing to fetch (3 source(s) in the source cache)" in result.stdout


def test_remex_source_fetch_and_checkout(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path
) -> None:
    # Given an element with two network sources, one in a sub-folder, nothing fetched
    served = tmp_path / "served"
    a, b = published(served, "one.txt"), published(served, "two.txt")
    sources = {"e0": [fakenet(a), fakenet(b).replace("- kind", "- directory: sub\n  kind")]}
    project = make_project(tmp_path / "p", busybox_sysroot, sources, salt=uuid.uuid4().hex)
    # When remex source fetch fetches it (and its dependencies: nothing to fetch there)
    result = fetch_stack.cli("source", "fetch", "-C", project.path, "--deps", "all", "e0.bst",
                             timeout=BUILD_TIMEOUT)  # fmt: skip
    # Then both were fetched on the workers, once
    assert result.returncode == 0, (result.stdout, result.stderr, fetch_stack.logs())
    assert "succeeded (2 built)" in result.stdout
    assert [len(downloads(p)) for p in (a, b)] == [1, 1]
    # And remex source checkout writes them as a build stages them, downloading nothing more
    dest = tmp_path / "sources"
    result = fetch_stack.cli("source", "checkout", "-C", project.path, "e0.bst", dest)
    assert result.returncode == 0, result.stderr
    assert (dest / "one.txt").read_bytes() == a.read_bytes()
    assert (dest / "sub" / "two.txt").read_bytes() == b.read_bytes()
    assert [len(downloads(p)) for p in (a, b)] == [1, 1]


def test_source_checkout_fetches_through_the_workers_first(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path
) -> None:
    # Given an element whose source nobody fetched
    a = published(tmp_path / "served", "late.txt")
    project = make_project(tmp_path / "p", busybox_sysroot, {"e0": [fakenet(a)]}, salt="x")
    # When its sources are checked out
    dest = tmp_path / "sources"
    result = fetch_stack.cli("source", "checkout", "-C", project.path, "e0.bst", dest,
                             timeout=BUILD_TIMEOUT)  # fmt: skip
    # Then a worker fetched it (the CLI's fake kind refuses to download) and it is written
    assert result.returncode == 0, (result.stderr, fetch_stack.logs())
    assert (dest / "late.txt").read_bytes() == a.read_bytes()
    assert len(downloads(a)) == 1


def test_a_wrong_checksum_fails_the_fetch_and_skips_its_elements_caching_nothing(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path
) -> None:
    # Given an element whose source does not match its ref, and one whose source is fine
    bad = published(tmp_path / "served", "bad.txt")
    good = published(tmp_path / "served", "good.txt")
    wrong = hashlib.sha256(b"something else").hexdigest()
    sources = {"bad": [fakenet(bad, ref=wrong)], "fine": [fakenet(good)]}
    project = make_project(tmp_path / "p", busybox_sysroot, sources, salt=uuid.uuid4().hex)
    # When it builds
    code, output = build(fetch_stack, project)
    # Then the fetch failed for good (downloaded once, not retried), naming the
    # element, the source, the file, the expected and actual sums
    assert code == 1
    elements = by_element(output)
    node = next(e for n, e in elements.items() if n.startswith("fetch:bad.txt"))
    actual = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert node["state"] == "failed"
    assert f"bad.bst source #1: bad.txt: expected sha256 {wrong}, got {actual}" in node["error"]
    assert len(downloads(bad)) == 1
    # And the element using it was skipped with that error; the other one built
    assert elements["bad.bst"]["state"] == "skipped"
    assert f"expected sha256 {wrong}" in elements["bad.bst"]["error"]
    assert elements["fine.bst"]["state"] == "built"
    # And nothing was cached: a second try downloads (and fails) again
    code, output = build(fetch_stack, project)
    assert code == 1
    assert len(downloads(bad)) == 2


def test_a_worker_killed_mid_download_has_the_fetch_done_elsewhere(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path
) -> None:
    # Given an element whose source downloads slowly (~6 s)
    slow = published(tmp_path / "served", "slow.txt", size=64 * 1024 * 30)
    project = make_project(
        tmp_path / "p", busybox_sysroot, {"e0": [fakenet(slow, delay=0.2)]}, salt="slow"
    )
    process = fetch_stack.cli_popen("build", "-C", project.path, "all.bst", "--json")
    scheduler = fetch_stack.scheduler()

    def downloading() -> tuple[str, str] | None:
        for build_id in scheduler.active_builds():
            for e in scheduler.status(build_id).elements:
                if e.element.startswith("fetch:") and e.info.get("bytes_done"):
                    return build_id, str(e.info["host"])
        return None

    # When the worker downloading it is killed (SIGKILL, its fetch pool too)
    build_id, host = wait_for("the download to start", downloading, timeout=60)
    victim = next(w for w in fetch_stack.workers if w.worker_name == host)
    victim.kill()
    # Then the build completes, the source fetched again by the other worker
    try:
        stdout, stderr = process.communicate(timeout=BUILD_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, (stdout, stderr, fetch_stack.logs())
    assert len(downloads(slow)) == 2
    # And the killed worker's partial download is gone once a worker starts on its folder
    leftovers = list(scratch_root(victim.cas_dir).glob("*/*/*.part"))
    assert leftovers, "the kill was meant to land mid-download"
    replacement = replace(fetch_stack, victim)
    wait_for(
        "the stale scratch removed",
        lambda: not list(scratch_root(replacement.cas_dir).glob("*/*/*.part")),
        timeout=60,
    )
    assert scheduler.status(build_id).status == "succeeded"


def replace(stack: RemexStack, worker: RemexWorker) -> RemexWorker:
    """A fresh worker of the same name and folder (its local CAS, its scratch)."""
    stack.workers.remove(worker)
    new = stack.add_worker(worker.worker_name)
    assert new.cas_dir == worker.cas_dir
    return new
