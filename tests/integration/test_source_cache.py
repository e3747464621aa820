"""The source cache against real servers, in this process (no Celery): a
network source fetched once into the artifact server's Remote Asset, found
from any host, staged by URI; fetch nodes planned from it; and the
scheduler side of fetch nodes (sent as one ``remex.fetch_source`` task on
``remex.fetch``, deduplicated across builds) on a real Redis.

The network sources are ``remote`` files served by a real loopback HTTP
server of the test's own, whose access log counts the downloads.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from pipeline.api import ElementSources, plan_fetches
from pipeline.broker import FETCH_QUEUE, make_celery, queue_lists, queued_task_ids, send_element
from pipeline.cas import LocalCas, checkout
from pipeline.config import RemexConfig
from pipeline.digest import EMPTY_DIGEST, Digest, digest_to_json
from pipeline.elements.errors import SourceError
from pipeline.elements.sources import FetchRequest, source_cache_key
from pipeline.reapi.channel import Endpoint
from pipeline.scheduler import Scheduler
from pipeline.servers import CasdServer, RedisServer
from pipeline.spec import BuildSpec, artifact_uri, normal_name, source_uri
from pipeline.stages import StageContext, checkout_artifact, run_stages
from pipeline.stages.errors import SourceNotFetchedError
from pipeline.stages.fetch import fetch_source, fetch_spec, lookup_source, lookup_sources
from pipeline.stages.staging import merged_sources
from pipeline.testing.httpserver import LoopbackHttpServer

# --- a real HTTP server serving remote files -------------------------------------------


@pytest.fixture
def http(tmp_path: Path) -> Iterator[LoopbackHttpServer]:
    """A loopback HTTP server of the test's own, serving ``tmp_path/www``."""
    (tmp_path / "www").mkdir()
    with LoopbackHttpServer(tmp_path / "www") as server:
        yield server


def request_for(url: str, ref: str, *, element: str = "app.bst", index: int = 0) -> FetchRequest:
    """What a ``remote`` source of ``url`` pinned to ``ref`` asks a worker to fetch."""
    filename = url.rsplit("/", 1)[-1]
    return FetchRequest(
        kind="remote",
        key=source_cache_key("remote", [url, ref, filename, False]),
        element=element,
        index=index,
        field=f"sources[{index}]",
        file=f"elements/{element}",
        urls=[url],
        config={"ref": ref, "filename": filename, "executable": False},
    )


def publish(http: LoopbackHttpServer, data: bytes) -> tuple[str, str]:
    """A file of its own on ``http`` holding ``data``: its URL and its ref."""
    name = f"src-{uuid.uuid4().hex[:8]}.txt"
    (http.root / name).write_bytes(data)
    return http.url(name), hashlib.sha256(data).hexdigest()


def downloads(http: LoopbackHttpServer) -> list[str]:
    """The files ``http`` served (200 answers to GET), in order."""
    return [e.file for e in http.entries if e.method == "GET" and e.status == 200]


# --- servers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact_casd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasdServer]:
    with CasdServer(tmp_path_factory.mktemp("artifact-casd"), jobs=1) as server:
        yield server


def context(local: Path, casd: CasdServer, artifact_casd: CasdServer) -> StageContext:
    return StageContext.connect(LocalCas(local), Endpoint(casd.url), Endpoint(artifact_casd.url))


def fetch(ctx: StageContext, request: FetchRequest, tmp_path: Path) -> tuple[Digest, bool]:
    work = tmp_path / uuid.uuid4().hex
    work.mkdir()
    return fetch_source(ctx, request, workdir=work, cache_dir=tmp_path / "cache")


def import_spec(project: str, element: str, entry: dict[str, Any]) -> BuildSpec:
    cache_key = hashlib.sha256(f"{project}/{element}/{json.dumps(entry)}".encode()).hexdigest()
    return BuildSpec(
        project=project,
        element=element,
        kind="import",
        cache_key=cache_key,
        artifact_uri=artifact_uri(project, normal_name(element), cache_key),
        dependencies=[],
        runtime_dependencies=[],
        sources=[entry],  # type: ignore[list-item]
        source_root="",
        command=None,
        files_root="",
        files_target="",
        select_outputs=False,
    )


# --- fetching ------------------------------------------------------------------------


def test_a_source_is_downloaded_once_and_found_from_another_host(
    http: LoopbackHttpServer, tmp_path: Path, casd: CasdServer, artifact_casd: CasdServer
) -> None:
    # Given a network source nobody fetched yet
    url, ref = publish(http, b"hello from the network\n")
    request = request_for(url, ref)
    with (
        context(tmp_path / "host-a", casd, artifact_casd) as a,
        context(tmp_path / "host-b", casd, artifact_casd) as b,
    ):
        assert lookup_source(a, request["key"]) is None
        # When host A fetches it, then host B (its own local CAS) fetches it too
        first, downloaded_a = fetch(a, request, tmp_path)
        second, downloaded_b = fetch(b, request, tmp_path)
        # Then it was downloaded once, and both have the same tree under its URI
        assert (downloaded_a, downloaded_b) == (True, False)
        assert downloads(http) == [url.rsplit("/", 1)[-1]]
        assert first == second
        assert lookup_sources(b, [request["key"], "0" * 64]) == {request["key"]: first}
        # And host B stages it by URI, with the content that was downloaded
        spec = import_spec("p", "app.bst", {"kind": "remote", "uri": source_uri(request["key"]),
                                            "directory": "src"})  # fmt: skip
        merged = merged_sources(b, spec, full=True)
        checkout(b.local_cas, merged, tmp_path / "out")
        name = url.rsplit("/", 1)[-1]
        assert (tmp_path / "out" / "src" / name).read_bytes() == b"hello from the network\n"


def test_a_wrong_checksum_caches_nothing(
    http: LoopbackHttpServer, tmp_path: Path, casd: CasdServer, artifact_casd: CasdServer
) -> None:
    # Given a source whose server serves other bytes than its ref says (/wrong/)
    url, ref = publish(http, b"the real bytes")
    wrong_path = "/wrong/" + url.rsplit("/", 1)[-1]
    wrong_url = http.url(wrong_path)
    request = request_for(wrong_url, ref)
    actual = hashlib.sha256(bytes([ord("t") ^ 0xFF]) + b"he real bytes").hexdigest()
    with context(tmp_path / "local", casd, artifact_casd) as ctx:
        # When it is fetched, then the error names the element, the source, the
        # URL and the sums (downloaded once: a checksum mismatch is not retried)
        with pytest.raises(SourceError) as caught:
            fetch(ctx, request, tmp_path)
        message = str(caught.value)
        for part in ("element app.bst", "source 0", wrong_url, f"expected {ref}", actual):
            assert part in message, message
        assert not caught.value.transient
        assert http.count(path=wrong_path) == 1
        # And the source cache has nothing under its URI
        assert lookup_source(ctx, request["key"]) is None


def test_an_element_builds_from_a_source_given_by_its_uri(
    http: LoopbackHttpServer, tmp_path: Path, casd: CasdServer, artifact_casd: CasdServer
) -> None:
    # Given a fetched source and an import element whose spec names it by URI
    url, ref = publish(http, b"#!/bin/sh\necho hi\n")
    request = request_for(url, ref)
    project = f"p{uuid.uuid4().hex[:10]}"
    with context(tmp_path / "local", casd, artifact_casd) as ctx:
        fetch(ctx, request, tmp_path)
        entry = {"kind": "remote", "uri": source_uri(request["key"]), "directory": ""}
        spec = import_spec(project, "app.bst", entry)
        # When it builds (in-process)
        run_stages(ctx, spec)
        # Then its artifact holds the source's file
        checkout_artifact(ctx, spec, tmp_path / "artifact")
        assert (tmp_path / "artifact" / url.rsplit("/", 1)[-1]).read_bytes() == (
            b"#!/bin/sh\necho hi\n"
        )


def test_a_source_missing_from_the_cache_fails_staging_naming_it(
    tmp_path: Path, casd: CasdServer, artifact_casd: CasdServer
) -> None:
    # Given a spec naming a source cache URI nothing was pushed under
    uri = source_uri(uuid.uuid4().hex * 2)
    spec = import_spec("p", "lib.bst", {"kind": "tar", "uri": uri, "directory": ""})
    # When it is staged, then the error names the element, the source and the URI
    with (
        context(tmp_path / "local", casd, artifact_casd) as ctx,
        pytest.raises(SourceNotFetchedError) as caught,
    ):
        run_stages(ctx, spec)
    assert "lib.bst: source #1 (tar) is not in the source cache" in str(caught.value)
    assert uri in str(caught.value)


# --- planning fetch nodes ----------------------------------------------------------------


def placeholder_spec(project: str, element: str) -> BuildSpec:
    return import_spec(project, element, {"kind": "remote", "digest": digest_to_json(EMPTY_DIGEST),
                                          "directory": ""})  # fmt: skip


def test_elements_sharing_a_missing_source_wait_for_one_fetch_node(
    http: LoopbackHttpServer, tmp_path: Path, casd: CasdServer, artifact_casd: CasdServer
) -> None:
    # Given two elements using the same network source, and a third using one already fetched
    shared_url, shared_ref = publish(http, b"shared tarball")
    cached_url, cached_ref = publish(http, b"fetched before")
    project = f"p{uuid.uuid4().hex[:10]}"
    specs = {name: placeholder_spec(project, name) for name in ("a.bst", "b.bst", "c.bst")}
    planned = {
        "a.bst": ElementSources([EMPTY_DIGEST], [], [(0, request_for(shared_url, shared_ref))]),
        "b.bst": ElementSources([EMPTY_DIGEST], [], [(0, request_for(shared_url, shared_ref))]),
        "c.bst": ElementSources([EMPTY_DIGEST], [], [(0, request_for(cached_url, cached_ref))]),
    }
    with context(tmp_path / "local", casd, artifact_casd) as ctx:
        fetched, _ = fetch(ctx, request_for(cached_url, cached_ref), tmp_path)
        before = http.entries
        # When the build's fetches are planned
        plan = plan_fetches(
            ctx, [(specs[n], planned[n]) for n in specs], project=project, priority=3
        )
    # Then one fetch node fetches the shared source, and both its elements wait for it
    assert len(plan.specs) == 1
    node = plan.specs[0]
    key = request_for(shared_url, shared_ref)["key"]
    assert node["kind"] == "fetch"
    assert node["artifact_uri"] == source_uri(key)
    assert node["element"] == f"fetch:{shared_url.rsplit('/', 1)[-1]}@{key[:12]}"
    assert node["fetch"]["urls"] == [shared_url]
    assert node["priority"] == 3
    assert plan.waits == {"a.bst": [node["element"]], "b.bst": [node["element"]]}
    # And their specs name the source by URI; the cached one by its digest, with no node
    for name in ("a.bst", "b.bst"):
        assert specs[name]["sources"][0] == {
            "kind": "remote",
            "uri": source_uri(key),
            "directory": "",
        }
    assert specs["c.bst"]["sources"][0]["digest"] == digest_to_json(fetched)
    assert plan.hits == 1
    # And the submitter downloaded nothing
    assert http.entries == before


# --- the scheduler side ---------------------------------------------------------------------

DB = 8


@pytest.fixture
def scheduler(redis_server: RedisServer) -> Iterator[Scheduler]:
    client = redis.Redis(
        host=redis_server.host, port=redis_server.port, db=DB, decode_responses=True
    )
    client.flushdb()
    yield Scheduler(client, heartbeat_timeout=5.0)
    client.flushdb()
    client.close()


@pytest.fixture
def celery_app(redis_server: RedisServer, scheduler: Scheduler) -> Iterator[Celery]:
    app = make_celery(RemexConfig(broker_url=f"redis://{redis_server.address}/{DB}"))
    yield app
    app.close()


def fetch_messages(scheduler: Scheduler) -> list[dict[str, Any]]:
    messages = []
    for key in queue_lists(FETCH_QUEUE):
        messages += [json.loads(raw) for raw in scheduler.redis.lrange(key, 0, -1)]
    return messages


def fetch_build(scheduler: Scheduler, url: str, ref: str) -> tuple[str, str, list[str]]:
    node = fetch_spec("p", request_for(url, ref), 5)
    app_spec = placeholder_spec("p", "app.bst")
    build, ready = scheduler.create_build(
        [node, app_spec], {"app.bst": [node["element"]]}, [], {"targets": ["app.bst"]}
    )
    return build, node["element"], ready


def test_a_fetch_node_is_one_task_on_the_fetch_queue(
    scheduler: Scheduler, celery_app: Celery
) -> None:
    # Given a build whose element waits for a fetch node
    build, node, ready = fetch_build(scheduler, "https://example.invalid/x.tar.gz", "a" * 64)
    assert ready == [node]
    # When the node is sent
    assert send_element(celery_app, scheduler, build, node) == "sent"
    # Then one remex.fetch_source message is on remex.fetch, recorded as the node's task
    messages = fetch_messages(scheduler)
    assert [m["headers"]["task"] for m in messages] == ["remex.fetch_source"]
    task_id = messages[0]["headers"]["id"]
    assert scheduler.info(build, node)["task_ids"] == [task_id]
    # And the reconciler counts it as queued (it is in a queue live fetch pools consume)
    assert task_id in queued_task_ids(scheduler)
    assert scheduler.state(build, "app.bst") == "waiting"


def test_two_builds_fetching_one_source_fetch_it_once(
    scheduler: Scheduler, celery_app: Celery
) -> None:
    # Given two builds needing the same missing source
    first, node, _ = fetch_build(scheduler, "https://example.invalid/y.tar.gz", "b" * 64)
    second, node2, _ = fetch_build(scheduler, "https://example.invalid/y.tar.gz", "b" * 64)
    assert node == node2
    # When both send their fetch node
    assert send_element(celery_app, scheduler, first, node) == "sent"
    assert send_element(celery_app, scheduler, second, node) == "waiting"
    # Then one task was sent; when it finishes, both builds' elements are ready
    assert len(fetch_messages(scheduler)) == 1
    ready = scheduler.finish(first, node, "built", {"downloaded": True})
    assert sorted(ready) == sorted([(first, "app.bst"), (second, "app.bst")])
    assert scheduler.info(second, node)["built_by"] == f"{first}\t{node}"


def test_a_failed_fetch_skips_its_elements_with_its_error(scheduler: Scheduler) -> None:
    # Given a build whose element waits for a fetch node
    build, node, _ = fetch_build(scheduler, "https://example.invalid/z.tar.gz", "c" * 64)
    # When the fetch fails for good
    error = "app.bst sources[0]: https://example.invalid/z.tar.gz: sha256 mismatch"
    scheduler.finish(build, node, "failed", {"error": error})
    # Then the element is skipped, with the fetch's error, and the build failed
    assert scheduler.state(build, "app.bst") == "skipped"
    assert scheduler.info(build, "app.bst")["error"] == f"dependency {node} failed: {error}"
    assert scheduler.status(build).status == "failed"
