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
import io
import json
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.broker import make_celery
from pipeline.config import RemexConfig
from pipeline.servers import RemexStack, RemexWorker
from pipeline.stages.fetch import scratch_root
from pipeline.testing.httpserver import LoopbackHttpServer
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


# --- tar over HTTP (the loopback server) ---------------------------------------------------


@pytest.fixture
def http(tmp_path: Path) -> Iterator[LoopbackHttpServer]:
    """A loopback HTTP server of the test's own, serving ``tmp_path/www``."""
    (tmp_path / "www").mkdir()
    with LoopbackHttpServer(tmp_path / "www", slow_chunk=32 * 1024, slow_interval=0.1) as server:
        yield server


def tarball(http: LoopbackHttpServer, name: str, size: int = 2000) -> tuple[str, bytes]:
    """``name``.tar.gz served by ``http``: one folder ``name/`` holding
    ``name.txt`` of ``size`` random bytes; returns its sha256 and that content."""
    content = os.urandom(size)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"{name}/{name}.txt")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    (http.root / f"{name}.tar.gz").write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest(), content


def tar(url: str, ref: str) -> str:
    return f"- kind: tar\n  url: {url}\n  ref: {ref}\n"


def test_shared_tarballs_are_downloaded_once_over_http(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http: LoopbackHttpServer
) -> None:
    # Given eight elements sharing four tarballs on an HTTP server
    balls = {n: tarball(http, n) for n in ("t0", "t1", "t2", "t3")}
    sources = {
        f"e{i}": [tar(http.url(f"t{i % 4}.tar.gz"), balls[f"t{i % 4}"][0])] for i in range(8)
    }
    sources["e8"] = [tar(http.url(f"{n}.tar.gz"), balls[n][0]) for n in ("t0", "t3")]
    project = make_project(tmp_path / "p1", busybox_sysroot, sources, salt=uuid.uuid4().hex)
    # When it builds on two workers
    code, output = build(fetch_stack, project)
    # Then every tarball was downloaded exactly once (the server's access log)
    assert code == 0, (output, fetch_stack.logs())
    assert {n: http.count(file=f"{n}.tar.gz") for n in balls} == dict.fromkeys(balls, 1)
    fetched = [e for n, e in by_element(output).items() if n.startswith("fetch:")]
    assert len(fetched) == 4
    assert {tuple(e["hosts"]) for e in fetched} <= {("w1",), ("w2",)}
    # And the artifacts hold the tarballs' files (base-dir stripped)
    out = tmp_path / "checkout"
    result = fetch_stack.cli("checkout", "-C", project.path, "--deps", "run", "all.bst", out)
    assert result.returncode == 0, result.stderr
    assert (out / "out" / "e5.txt").read_bytes() == balls["t1"][1]
    assert (out / "out" / "e8.txt").read_bytes() == balls["t0"][1] + balls["t3"][1]

    # When the same tarballs are built again, by a fresh worker with an empty
    # local CAS alone (the others stopped), under new cache keys
    again = make_project(tmp_path / "p2", busybox_sysroot, sources, salt=uuid.uuid4().hex)
    fresh = fetch_stack.add_worker("w9")
    others = [w for w in fetch_stack.workers if w is not fresh]
    for worker in others:
        worker.stop()
        fetch_stack.workers.remove(worker)
    try:
        code, output = build(fetch_stack, again)
    finally:
        for worker in others:
            fetch_stack.add_worker(worker.worker_name)
    # Then nothing was downloaded
    assert code == 0, (output, fetch_stack.logs())
    assert {n: http.count(file=f"{n}.tar.gz") for n in balls} == dict.fromkeys(balls, 1)
    assert not [n for n in by_element(output) if n.startswith("fetch:")]
    fetch_stack.workers.remove(fresh)
    fresh.stop()


def test_a_tarball_with_a_wrong_sha256_fails_naming_it_and_is_not_cached(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http: LoopbackHttpServer
) -> None:
    # Given a tarball whose server sends other bytes than its ref's
    ref, _ = tarball(http, "w0")
    url = http.url("wrong/w0.tar.gz")
    project = make_project(tmp_path / "p", busybox_sysroot, {"e0": [tar(url, ref)]},
                           salt=uuid.uuid4().hex)  # fmt: skip
    # When it builds
    code, output = build(fetch_stack, project)
    # Then the fetch failed, naming the element, the source index, the URL,
    # the expected and the actual sha256; the element was skipped with it
    assert code == 1
    elements = by_element(output)
    node = next(e for n, e in elements.items() if n.startswith("fetch:"))
    data = (http.root / "w0.tar.gz").read_bytes()
    served = bytes([data[0] ^ 0xFF]) + data[1:]  # what /wrong/ sends
    assert node["state"] == "failed"
    actual = hashlib.sha256(served).hexdigest()
    for part in ("element e0.bst", "source 0", url, f"expected sha256 {ref}", actual):
        assert part in node["error"], node["error"]
    assert elements["e0.bst"]["state"] == "skipped"
    assert url in elements["e0.bst"]["error"]
    # And nothing was cached: building again downloads again
    downloads_before = http.count(path="/wrong/w0.tar.gz")
    code, _ = build(fetch_stack, project)
    assert code == 1
    assert http.count(path="/wrong/w0.tar.gz") > downloads_before


@pytest.fixture
def http_auth(tmp_path: Path) -> Iterator[LoopbackHttpServer]:
    """A loopback HTTP server that wants basic auth (``fetcher``, ``s3cret``)."""
    (tmp_path / "www-auth").mkdir()
    with LoopbackHttpServer(tmp_path / "www-auth", auth=("fetcher", "s3cret"),
                            slow_chunk=32 * 1024, slow_interval=0.1) as server:  # fmt: skip
        yield server


def test_a_worker_killed_mid_http_download_has_it_done_elsewhere(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http_auth: LoopbackHttpServer
) -> None:
    # Given an element whose tarball (1.5 MB) trickles from a slow endpoint
    # (~5 s), with credentials in its URL
    http = http_auth
    ref, content = tarball(http, "slow0", size=1_500_000)
    url = http.url("slow/slow0.tar.gz", user=("fetcher", "s3cret"))
    project = make_project(tmp_path / "p", busybox_sysroot, {"e0": [tar(url, ref)]},
                           salt=uuid.uuid4().hex)  # fmt: skip
    process = fetch_stack.cli_popen("build", "-C", project.path, "all.bst", "--json")
    scheduler = fetch_stack.scheduler()

    def downloading() -> tuple[str, str] | None:
        for build_id in scheduler.active_builds():
            for e in scheduler.status(build_id).elements:
                if e.element.startswith("fetch:") and e.info.get("bytes_done"):
                    return build_id, str(e.info["host"])
        return None

    # When the worker downloading it is killed (SIGKILL by PID, its fetch pool too)
    build_id, host = wait_for("the download to start", downloading, timeout=60)
    # (meanwhile Flower sees its progress: element, URL without credentials, bytes)
    app = make_celery(RemexConfig(broker_url=fetch_stack.redis.url))
    node = next(e for e in scheduler.status(build_id).elements if e.element.startswith("fetch:"))
    progress = app.AsyncResult(node.info["task_ids"][0])
    assert progress.state == "PROGRESS"
    assert progress.info["element"] == "e0.bst sources[0]"
    assert progress.info["url"] == http.url("slow/slow0.tar.gz")
    assert (
        0
        < progress.info["done"]
        < progress.info["total"]
        == (http.root / "slow0.tar.gz").stat().st_size
    )
    app.close()
    victim = next(w for w in fetch_stack.workers if w.worker_name == host)
    victim.kill()
    # Then the build completes: the other worker downloaded it again, whole
    try:
        stdout, stderr = process.communicate(timeout=BUILD_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, (stdout, stderr, fetch_stack.logs())
    assert http.count(path="/slow/slow0.tar.gz") == 2
    # (the password shows nowhere: status, progress, the workers' logs)
    logs = "".join(w.log_path.read_text(errors="replace") for w in fetch_stack.workers)
    assert "s3cret" not in stdout + stderr + logs
    complete = [e for e in http.entries if e.path == "/slow/slow0.tar.gz" and e.sent == len(
        (http.root / "slow0.tar.gz").read_bytes())]  # fmt: skip
    assert len(complete) == 1
    out = tmp_path / "checkout"
    assert fetch_stack.cli("checkout", "-C", project.path, "e0.bst", out).returncode == 0
    assert (out / "out" / "e0.txt").read_bytes() == content
    # And no partial file survives: the new worker on the folder removes the scratch
    replacement = replace(fetch_stack, victim)
    wait_for(
        "the stale scratch removed",
        lambda: not [p for p in scratch_root(replacement.cas_dir).rglob("*") if p.is_file()],
        timeout=60,
    )
    assert scheduler.status(build_id).status == "succeeded"
