"""The ``remex.fetch_source`` task (tasks/fetch.py) with a fake runtime: what
it does with each outcome of a fetch (no Redis, no server, no worker; the
fetch itself is a fake)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery.exceptions import Retry

import tasks.fetch as fetch_module
from pipeline.cas import LocalCas
from pipeline.config import RemexConfig
from pipeline.digest import EMPTY_DIGEST, digest_to_json
from pipeline.elements.errors import SourceError
from pipeline.stages.fetch import scratch_root
from tasks.app import create_app
from tasks.fetch import FetchTask
from tasks.runtime import RuntimeHolder, StagingWindow
from tasks.stages import ElementFailed
from tests.unit.test_tasks_stage_task import FakeScheduler

NODE = "fetch:a.tar.gz@0123456789ab"
PAYLOAD = {"build": "b1", "element": NODE, "attempt": 1, "state": {}}
REQUEST = {
    "kind": "tar",
    "key": "01" * 32,
    "element": "app.bst",
    "index": 0,
    "field": "sources[0]",
    "file": "elements/app.bst",
    "urls": ["https://user:pw@example.invalid/a.tar.gz"],
    "config": {"ref": "ab" * 32},
}


@dataclass
class FetchScheduler(FakeScheduler):
    def spec(self, build: str, element: str) -> dict[str, Any]:
        return {"element": element, "kind": "fetch", "fetch": dict(REQUEST)}


@dataclass
class Runtime:
    scheduler: FetchScheduler
    config: RemexConfig
    context: Any
    name: str = "w1"
    instance: str = "w1/1/x"
    holder: str = "w1/1/x#e1"
    heartbeat_interval: float = 60.0
    staging: StagingWindow = field(default_factory=lambda: StagingWindow(0))


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    context = SimpleNamespace(local_cas=LocalCas(tmp_path / "cas"))
    config = RemexConfig(broker_url="memory://", cas_dir=tmp_path / "cas")
    return Runtime(FetchScheduler(), config, context)


@pytest.fixture
def task(runtime: Runtime) -> Iterator[FetchTask]:
    app = create_app(
        RemexConfig(broker_url="memory://", result_backend="cache+memory://"), worker_name="w1"
    )
    app.remex_runtime = RuntimeHolder(lambda: runtime)
    registered = app.tasks["remex.fetch_source"]
    assert isinstance(registered, FetchTask)
    yield registered
    app.close()


def run(task: FetchTask) -> dict[str, Any]:
    task.push_request(id="task-1", retries=0, called_directly=False, delivery_info={})
    try:
        result: dict[str, Any] = task.run(dict(PAYLOAD))
        return result
    finally:
        task.pop_request()


def test_a_fetch_finishes_its_node_with_the_tree_and_reports_progress(
    task: FetchTask, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_fetch(ctx: Any, request: Any, *, workdir: Path, **kw: Any) -> Any:
        seen["request"], seen["workdir"] = request, workdir
        assert workdir.is_dir() and workdir.is_relative_to(scratch_root(runtime.config.cas_dir))
        kw["progress"](10, 100)
        return EMPTY_DIGEST, True

    monkeypatch.setattr(fetch_module, "fetch_source", fake_fetch)
    result = run(task)
    # The node is built with the tree; its scratch is gone; the progress was noted
    assert result["state"]["source"] == digest_to_json(EMPTY_DIGEST)
    assert runtime.scheduler.finished == [
        ("built", {"source": digest_to_json(EMPTY_DIGEST), "downloaded": True})
    ]
    assert seen["request"]["urls"] == REQUEST["urls"]
    assert not seen["workdir"].exists()
    assert {"bytes_done": 10, "bytes_total": 100} in runtime.scheduler.notes
    assert task.AsyncResult("task-1").info["url"] == "https://example.invalid/a.tar.gz"


def test_a_transient_failure_is_retried_from_the_fetch_queue(
    task: FetchTask, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*a: Any, **kw: Any) -> Any:
        raise SourceError("connection refused everywhere", transient=True)

    monkeypatch.setattr(fetch_module, "fetch_source", failing)
    with pytest.raises(Retry) as info:
        run(task)
    assert info.value.sig.options["queue"] == "remex.fetch"
    assert 0.5 <= float(info.value.when) <= 1.0
    assert info.value.sig.args[0]["state"] == {"transient_failures": 1}
    assert runtime.scheduler.finished == []


def test_a_permanent_source_error_fails_the_node(
    task: FetchTask, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*a: Any, **kw: Any) -> Any:
        raise SourceError("app.bst source 0: sha256 is x, expected y")

    monkeypatch.setattr(fetch_module, "fetch_source", failing)
    with pytest.raises(ElementFailed):
        run(task)
    [(outcome, info)] = runtime.scheduler.finished
    assert outcome == "failed" and info["failed_stage"] == "fetch_source"
    assert "sha256 is x, expected y" in info["error"]
