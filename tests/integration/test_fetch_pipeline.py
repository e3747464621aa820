"""Network sources fetched by ``remex.fetch_source`` tasks on real workers,
into the source cache: once per source for the farm, never by the
submitting host, a failure named, a killed worker's fetch done elsewhere.

The sources are ``tar`` and ``remote`` files on a real loopback HTTP server
(:class:`~pipeline.testing.httpserver.LoopbackHttpServer`) whose access log
counts the downloads; its ``/slow/`` endpoint trickles a file for the test
that kills a worker mid-download, its ``/wrong/`` one serves other bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
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
from pipeline.servers.process import pid_alive, process_tree
from pipeline.stages.fetch import scratch_root
from pipeline.testing.httpserver import LoopbackHttpServer
from tests.integration.test_pipeline import wait_for

BUILD_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def fetch_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    """Redis, an execution and an artifact casd, workers w1 and w2 (each with its fetch pool)."""
    with RemexStack(tmp_path_factory.mktemp("fetch-stack"), workers=2) as stack:
        yield stack


@pytest.fixture
def http(tmp_path: Path) -> Iterator[LoopbackHttpServer]:
    """A loopback HTTP server of the test's own, serving ``tmp_path/www``."""
    (tmp_path / "www").mkdir()
    with LoopbackHttpServer(tmp_path / "www", slow_chunk=32 * 1024, slow_interval=0.1) as server:
        yield server


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


def published(http: LoopbackHttpServer, name: str, size: int = 1000) -> bytes:
    """A file ``name`` of ``size`` bytes of its own (seeded by a fresh id) served by ``http``."""
    seed = uuid.uuid4().hex.encode()
    data = (seed * (size // len(seed) + 1))[:size]
    (http.root / name).write_bytes(data)
    return data


def remote(http: LoopbackHttpServer, name: str, *, directory: str = "") -> str:
    """A ``remote`` source entry (YAML) for the file ``name`` that ``http`` serves."""
    ref = hashlib.sha256((http.root / name).read_bytes()).hexdigest()
    where = f"  directory: {directory}\n" if directory else ""
    return f"- kind: remote\n  url: {http.url(name)}\n  ref: {ref}\n" + where


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
    """A ``tar`` source entry (YAML)."""
    return f"- kind: tar\n  url: {url}\n  ref: {ref}\n"


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


def fetch_nodes(output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The build's fetch nodes (``fetch:NAME@KEY``), by name."""
    return {n: e for n, e in by_element(output).items() if n.startswith("fetch:")}


def test_shared_sources_are_downloaded_once_and_a_fresh_worker_downloads_nothing(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http: LoopbackHttpServer
) -> None:
    # Given eleven elements sharing three tarballs and two remote files on an HTTP server
    balls = {n: tarball(http, n) for n in ("t0", "t1", "t2")}
    files = {n: published(http, n) for n in ("a.txt", "b.txt")}
    sources = {
        f"e{i}": [tar(http.url(f"t{i % 3}.tar.gz"), balls[f"t{i % 3}"][0])] for i in range(8)
    }
    sources["e8"] = [tar(http.url(f"{n}.tar.gz"), balls[n][0]) for n in ("t0", "t2")]
    sources["e9"] = [remote(http, "a.txt"), remote(http, "b.txt")]
    sources["e10"] = [remote(http, "a.txt"), tar(http.url("t1.tar.gz"), balls["t1"][0])]
    names = [f"{n}.tar.gz" for n in balls] + list(files)
    project = make_project(tmp_path / "p1", busybox_sysroot, sources, salt=uuid.uuid4().hex)
    # When it builds on two workers
    code, output = build(fetch_stack, project)
    # Then it succeeded through one fetch node per source, each downloaded exactly
    # once (the server's access log), by the workers
    assert code == 0, (output, fetch_stack.logs())
    assert {n: http.count(file=n) for n in names} == dict.fromkeys(names, 1)
    nodes = fetch_nodes(output)
    assert sorted(n.split("@")[0] for n in nodes) == sorted(f"fetch:{n}" for n in names)
    assert all(e["state"] == "built" and e["downloaded"] for e in nodes.values())
    assert {tuple(e["hosts"]) for e in nodes.values()} <= {("w1",), ("w2",)}
    # And the artifacts hold the sources' files (a tarball's base-dir stripped)
    out = tmp_path / "checkout"
    result = fetch_stack.cli("checkout", "-C", project.path, "--deps", "run", "all.bst", out)
    assert result.returncode == 0, result.stderr
    assert (out / "out" / "e4.txt").read_bytes() == balls["t1"][1]
    assert (out / "out" / "e8.txt").read_bytes() == balls["t0"][1] + balls["t2"][1]
    assert (out / "out" / "e9.txt").read_bytes() == files["a.txt"] + files["b.txt"]
    assert (out / "out" / "e10.txt").read_bytes() == files["a.txt"] + balls["t1"][1]

    # When the same sources are built again, by a fresh worker with an empty
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
        fetch_stack.workers.remove(fresh)
        fresh.stop()
        for worker in others:
            fetch_stack.add_worker(worker.worker_name)
    # Then it built with no fetch node, and nothing was downloaded
    assert code == 0, (output, fetch_stack.logs())
    assert not fetch_nodes(output)
    assert {n: http.count(file=n) for n in names} == dict.fromkeys(names, 1)
    # And remex source fetch has nothing to do
    result = fetch_stack.cli("source", "fetch", "-C", again.path, "--deps", "all", "all.bst")
    assert result.returncode == 0, result.stderr
    assert f"nothing to fetch ({len(names)} source(s) in the source cache)" in result.stdout


def test_remex_source_fetch_and_checkout(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http: LoopbackHttpServer
) -> None:
    # Given an element with two remote files, one in a sub-folder, nothing fetched
    one, two = published(http, "one.txt"), published(http, "two.txt")
    sources = {"e0": [remote(http, "one.txt"), remote(http, "two.txt", directory="sub")]}
    project = make_project(tmp_path / "p", busybox_sysroot, sources, salt=uuid.uuid4().hex)
    # When remex source fetch fetches it (and its dependencies: nothing to fetch there)
    result = fetch_stack.cli("source", "fetch", "-C", project.path, "--deps", "all", "e0.bst",
                             timeout=BUILD_TIMEOUT)  # fmt: skip
    # Then both were fetched on the workers, once
    assert result.returncode == 0, (result.stdout, result.stderr, fetch_stack.logs())
    assert "succeeded (2 built)" in result.stdout
    assert [http.count(file=n) for n in ("one.txt", "two.txt")] == [1, 1]
    # And remex source checkout writes them as a build stages them, downloading nothing more
    dest = tmp_path / "sources"
    result = fetch_stack.cli("source", "checkout", "-C", project.path, "e0.bst", dest)
    assert result.returncode == 0, result.stderr
    assert "fetching sources" not in result.stderr
    assert (dest / "one.txt").read_bytes() == one
    assert (dest / "sub" / "two.txt").read_bytes() == two
    assert [http.count(file=n) for n in ("one.txt", "two.txt")] == [1, 1]


def test_source_checkout_fetches_through_the_workers_first(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http: LoopbackHttpServer
) -> None:
    # Given an element whose source nobody fetched
    late = published(http, "late.txt")
    project = make_project(tmp_path / "p", busybox_sysroot, {"e0": [remote(http, "late.txt")]},
                           salt=uuid.uuid4().hex)  # fmt: skip
    # When its sources are checked out
    dest = tmp_path / "sources"
    result = fetch_stack.cli("source", "checkout", "-C", project.path, "e0.bst", dest,
                             timeout=BUILD_TIMEOUT)  # fmt: skip
    # Then the workers fetched it (a fetch build, once) and it is written
    assert result.returncode == 0, (result.stderr, fetch_stack.logs())
    assert "submitted (fetching sources)" in result.stderr
    assert (dest / "late.txt").read_bytes() == late
    assert http.count(file="late.txt") == 1
    # And it is in the source cache: fetching again has nothing to do
    result = fetch_stack.cli("source", "fetch", "-C", project.path, "e0.bst")
    assert result.returncode == 0, result.stderr
    assert "nothing to fetch (1 source(s) in the source cache)" in result.stdout


def test_a_wrong_checksum_fails_the_fetch_and_skips_its_elements_caching_nothing(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http: LoopbackHttpServer
) -> None:
    # Given a tarball whose server sends other bytes than its ref's, and a fine one
    ref, _ = tarball(http, "w0")
    good_ref, _ = tarball(http, "g0")
    url = http.url("wrong/w0.tar.gz")
    sources = {"bad": [tar(url, ref)], "fine": [tar(http.url("g0.tar.gz"), good_ref)]}
    project = make_project(tmp_path / "p", busybox_sysroot, sources, salt=uuid.uuid4().hex)
    # When it builds
    code, output = build(fetch_stack, project)
    # Then the fetch failed for good (downloaded once, not retried), naming the
    # element, the source index, the URL, the expected and the actual sha256
    assert code == 1
    elements = by_element(output)
    node = next(e for n, e in elements.items() if n.startswith("fetch:w0.tar.gz"))
    data = (http.root / "w0.tar.gz").read_bytes()
    actual = hashlib.sha256(bytes([data[0] ^ 0xFF]) + data[1:]).hexdigest()  # what /wrong/ sends
    assert node["state"] == "failed"
    for part in ("element bad.bst", "source 0", url, f"expected sha256 {ref}", actual):
        assert part in node["error"], node["error"]
    assert http.count(path="/wrong/w0.tar.gz") == 1
    # And the element using it was skipped with that error; the other one built
    assert elements["bad.bst"]["state"] == "skipped"
    assert url in elements["bad.bst"]["error"]
    assert f"expected sha256 {ref}" in elements["bad.bst"]["error"]
    assert elements["fine.bst"]["state"] == "built"
    # And nothing was cached: building again downloads (and fails) again
    code, _ = build(fetch_stack, project)
    assert code == 1
    assert http.count(path="/wrong/w0.tar.gz") == 2
    assert http.count(file="g0.tar.gz") == 1


@pytest.fixture
def http_auth(tmp_path: Path) -> Iterator[LoopbackHttpServer]:
    """A loopback HTTP server that wants basic auth (``fetcher``, ``s3cret``)."""
    (tmp_path / "www-auth").mkdir()
    with LoopbackHttpServer(tmp_path / "www-auth", auth=("fetcher", "s3cret"),
                            slow_chunk=32 * 1024, slow_interval=0.1) as server:  # fmt: skip
        yield server


def test_a_worker_killed_mid_download_has_the_fetch_done_elsewhere(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http_auth: LoopbackHttpServer
) -> None:
    # Given an element whose tarball (1.5 MB) trickles from the slow endpoint
    # (~5 s), with credentials in its URL
    http = http_auth
    ref, content = tarball(http, "slow0", size=1_500_000)
    size = (http.root / "slow0.tar.gz").stat().st_size
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
    assert 0 < progress.info["done"] < progress.info["total"] == size
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
    out = tmp_path / "checkout"
    assert fetch_stack.cli("checkout", "-C", project.path, "e0.bst", out).returncode == 0
    assert (out / "out" / "e0.txt").read_bytes() == content
    # (the password shows nowhere: status, progress, the workers' logs)
    logs = "".join(w.log_path.read_text(errors="replace") for w in fetch_stack.workers)
    assert "s3cret" not in stdout + stderr + logs
    # And the killed worker's partial download is gone once a worker starts on its folder
    leftovers = list(scratch_root(victim.cas_dir).rglob("*.part"))
    assert leftovers, "the kill was meant to land mid-download"
    replacement = replace(fetch_stack, victim)
    wait_for(
        "the stale scratch removed",
        lambda: not [p for p in scratch_root(replacement.cas_dir).rglob("*") if p.is_file()],
        timeout=60,
    )
    assert scheduler.status(build_id).status == "succeeded"


def replace(stack: RemexStack, worker: RemexWorker) -> RemexWorker:
    """A fresh worker of the same name and folder (its local CAS, its scratch)."""
    stack.workers.remove(worker)
    new = stack.add_worker(worker.worker_name)
    assert new.cas_dir == worker.cas_dir
    return new


def fetch_pool_pids(worker: RemexWorker) -> list[int]:
    """The PIDs of the worker's fetch pool (``remex worker --fetch-only``)."""
    assert worker.pid is not None
    pids = []
    for pid in process_tree(worker.pid, None):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--fetch-only" in cmdline:
            pids.append(pid)
    return pids


def test_a_fetch_pool_that_dies_is_started_again(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http: LoopbackHttpServer
) -> None:
    # Given both workers' fetch pools killed (SIGKILL), the workers themselves alive
    for worker in fetch_stack.workers:
        (pid,) = wait_for("the fetch pool", lambda w=worker: fetch_pool_pids(w), timeout=30)
        os.kill(pid, signal.SIGKILL)
    # When a build needs a fetch
    again = published(http, "again.txt")
    project = make_project(tmp_path / "p", busybox_sysroot, {"e0": [remote(http, "again.txt")]},
                           salt=uuid.uuid4().hex)  # fmt: skip
    code, output = build(fetch_stack, project)
    # Then it succeeded: the workers started their fetch pools again
    assert code == 0, (output, fetch_stack.logs())
    assert http.count(file="again.txt") == 1
    assert all(len(fetch_pool_pids(w)) == 1 for w in fetch_stack.workers)
    out = tmp_path / "checkout"
    assert fetch_stack.cli("checkout", "-C", project.path, "e0.bst", out).returncode == 0
    assert (out / "out" / "e0.txt").read_bytes() == again


def test_a_worker_killed_takes_its_fetch_pool_with_it(fetch_stack: RemexStack) -> None:
    # Given one more worker, its fetch pool running
    worker = fetch_stack.add_worker("pdeath")
    try:
        (pool,) = wait_for("the fetch pool", lambda: fetch_pool_pids(worker), timeout=30)
        # When the worker alone is killed (SIGKILL: no chance to stop its pool)
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        # Then the pool exits too (its death signal), not left consuming remex.fetch
        wait_for("the orphaned fetch pool to exit", lambda: not pid_alive(pool), timeout=30)
    finally:
        worker.kill()
        fetch_stack.workers.remove(worker)


def test_a_cached_elements_sources_are_not_fetched(
    fetch_stack: RemexStack, busybox_sysroot: Path, tmp_path: Path, http: LoopbackHttpServer
) -> None:
    # Given an element built from a tarball
    ref, _ = tarball(http, "c0")
    salt = uuid.uuid4().hex
    first = make_project(tmp_path / "p1", busybox_sysroot,
                         {"e0": [tar(http.url("c0.tar.gz"), ref)]}, salt=salt)  # fmt: skip
    code, output = build(fetch_stack, first)
    assert code == 0, (output, fetch_stack.logs())
    assert http.count(file="c0.tar.gz") == 1
    # When the tarball's URL changes (a new source cache key, nothing cached
    # under it; the element's cache key is the same: the ref) to one that 404s
    moved = make_project(tmp_path / "p2", busybox_sysroot,
                         {"e0": [tar(http.url("gone/c0.tar.gz"), ref)]}, salt=salt)  # fmt: skip
    code, output = build(fetch_stack, moved)
    # Then the element is cached and its source is not fetched at all
    assert code == 0, (output, fetch_stack.logs())
    assert by_element(output)["e0.bst"]["state"] == "cached"
    assert not fetch_nodes(output)
    assert http.count(path="/gone/c0.tar.gz") == 0
