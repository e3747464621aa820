"""StageTask (tasks/stages.py) with a fake runtime: what a stage task does
with each outcome of its stage function.

No Redis, no server, no worker: the app is built by ``create_app`` on an
in-memory broker, its runtime is a fake whose scheduler records the moves,
and each test calls one registered task's ``run_stage`` under a request
context, as a worker would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kombu.exceptions
import pytest
from celery.exceptions import Ignore, Retry

import tasks.stages as task_module
from pipeline.cas import LocalCas
from pipeline.config import RemexConfig
from pipeline.errors import MissingBlobsError, RemexError, RemoteError
from pipeline.scheduler import Finished
from pipeline.stages import BuildFailedError, State
from tasks.app import create_app
from tasks.runtime import RuntimeHolder, StagingWindow
from tasks.stages import ElementFailed, StageTask

PAYLOAD = {"build": "b1", "element": "a.bst", "attempt": 1, "state": {}}


@dataclass
class FakeScheduler:
    """Records what the task tells the scheduler."""

    current: bool = True
    deliveries: int = 0
    finished: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    handed_on: list[str] = field(default_factory=list)
    heartbeat_timeout: float = 30.0

    def begin_stage(self, build: str, element: str, **kw: Any) -> int:
        self.started.append(kw["stage"])
        if not self.current:
            return 0
        self.deliveries += 1
        return self.deliveries

    def hand_on(self, build: str, element: str, *, attempt: int, holder: str) -> bool:
        self.handed_on.append(holder)
        return True

    def spec(self, build: str, element: str) -> dict[str, Any]:
        return {"element": element, "kind": "manual"}

    def finish(
        self, build: str, element: str, outcome: str, info: dict[str, Any]
    ) -> list[tuple[str, str]]:
        self.finished.append((outcome, dict(info)))
        return []

    def finish_element(
        self, build: str, element: str, outcome: str, info: dict[str, Any]
    ) -> Finished:
        return Finished(self.finish(build, element, outcome, info), [], [])

    def note(self, build: str, element: str, changes: dict[str, Any]) -> None:
        self.notes.append(dict(changes))

    def heartbeat(self, build: str, element: str) -> None:
        pass


@dataclass
class FakeRuntime:
    scheduler: FakeScheduler
    name: str = "w1"
    instance: str = "w1/1/x"
    holder: str = "w1/1/x#e1"
    context: Any = None
    heartbeat_interval: float = 60.0
    staging: StagingWindow = field(default_factory=lambda: StagingWindow(0))


@pytest.fixture
def runtime(tmp_path: Path) -> FakeRuntime:
    # The stage functions here are fakes; the local CAS is real (stages pin in it).
    context = SimpleNamespace(local_cas=LocalCas(tmp_path / "cas"))
    return FakeRuntime(FakeScheduler(), context=context)


@pytest.fixture
def stage_tasks(runtime: FakeRuntime) -> Iterator[dict[str, StageTask]]:
    app = create_app(
        RemexConfig(broker_url="memory://", result_backend="cache+memory://"), worker_name="w1"
    )
    app.remex_runtime = RuntimeHolder(lambda: runtime)
    yield {stage: app.tasks[f"remex.{stage}"] for stage in task_module.STAGE_TASKS}
    app.close()


def run(task: StageTask, fn: Any, state: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """Run the task's stage as a worker would (a delivered message, not a direct call)."""
    task.push_request(id="task-1", retries=0, called_directly=False, delivery_info={})
    try:
        result: dict[str, Any] = task.run_stage({**PAYLOAD, "state": state or {}}, fn, **kw)
        return result
    finally:
        task.pop_request()


def returning(**changes: Any) -> Any:
    def fn(ctx: Any, spec: Any, state: State) -> State:
        return {**state, **changes}  # type: ignore[typeddict-item]

    return fn


def raising(exc: Exception) -> Any:
    def fn(ctx: Any, spec: Any, state: State) -> State:
        raise exc

    return fn


def test_the_app_registers_five_stage_tasks_without_reading_config_at_import(
    stage_tasks: dict[str, StageTask],
) -> None:
    stages = ("stage_to_cas", "upload", "execute", "fetch_outputs", "push_artifact")
    assert sorted(t.name for t in stage_tasks.values()) == sorted(f"remex.{s}" for s in stages)
    assert all(isinstance(t, StageTask) for t in stage_tasks.values())


def test_a_stage_that_succeeds_passes_its_state_on(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    # Given a stage that adds a key, after an earlier transient failure
    result = run(stage_tasks["upload"], returning(uploaded={"blobs": 1}), {"transient_failures": 2})
    # Then the new state goes on without the failure count, and the element ran at this stage
    assert result == {**PAYLOAD, "state": {"uploaded": {"blobs": 1}}}
    assert runtime.scheduler.started == ["upload"]
    assert runtime.scheduler.finished == []
    # And it keeps holding the element (the next stage's message goes to its
    # own queue): nothing is written between two stages
    assert runtime.scheduler.handed_on == []


def test_a_refused_publish_of_the_next_stage_hands_the_element_on(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    # When Celery could not publish the chain's next stage (Redis refused it)
    task = stage_tasks["upload"]
    exc = kombu.exceptions.OperationalError("refused")
    task.on_failure(exc, "task-1", [PAYLOAD], {}, None)
    # Then the element is handed on: the reconciler finds its message in no
    # queue and sends it again
    assert runtime.scheduler.handed_on == ["w1/1/x#e1"]
    # But another failure hands nothing on
    task.on_failure(ValueError("bug"), "task-1", [PAYLOAD], {}, None)
    assert runtime.scheduler.handed_on == ["w1/1/x#e1"]


def test_a_transient_error_requeues_on_the_own_queue_with_backoff(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    # When the stage fails transiently
    with pytest.raises(Retry) as info:
        run(stage_tasks["upload"], raising(RemoteError("away", transient=True)))
    # Then the task is sent again to this worker's queue, after 0.5-1 s,
    # counting the failure in its state
    retry = info.value
    assert 0.5 <= float(retry.when) <= 1.0
    assert retry.sig.options["queue"] == "remex.host.w1"
    assert retry.sig.args[0]["state"] == {"transient_failures": 1}
    # And this worker keeps holding the element (the re-queue is its own)
    assert runtime.scheduler.handed_on == []


def test_a_requeue_to_a_shared_queue_hands_the_element_on(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a task whose retries go to a queue every worker consumes (fetches)
    task = stage_tasks["upload"]
    monkeypatch.setattr(task, "retry_queue", lambda rt: "remex.fetch")
    # When it fails transiently
    with pytest.raises(Retry):
        run(task, raising(RemoteError("away", transient=True)))
    # Then it handed the element on first (whoever takes the re-queue holds it)
    assert runtime.scheduler.handed_on == ["w1/1/x#e1"]


def test_transient_errors_fail_the_element_when_the_retries_are_spent(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    spent = {"transient_failures": task_module.StageTask.policy.max_transient_retries}
    with pytest.raises(ElementFailed):
        run(stage_tasks["fetch_outputs"], raising(RemoteError("away", transient=True)), spent)
    [(outcome, info)] = runtime.scheduler.finished
    assert outcome == "failed" and info["failed_stage"] == "fetch_outputs"
    assert info["error"].startswith("fetch_outputs failed 6 times: ")


def test_a_permanent_error_fails_the_element_without_retry(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    with pytest.raises(ElementFailed):
        run(stage_tasks["stage_to_cas"], raising(RemexError("bad input", transient=False)))
    assert runtime.scheduler.handed_on == []
    assert runtime.scheduler.finished == [
        ("failed", {"error": "stage_to_cas: bad input", "failed_stage": "stage_to_cas"})
    ]


def test_a_failed_command_fails_the_element_with_its_log_tail(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    exc = BuildFailedError("a.bst", "exit code 3", exit_code=3, stderr_tail="boom\n")
    with pytest.raises(ElementFailed):
        run(stage_tasks["fetch_outputs"], raising(exc))
    [(_, info)] = runtime.scheduler.finished
    assert (info["error"], info["exit_code"], info["log_tail"]) == ("exit code 3", 3, "boom")


def test_missing_inputs_send_execute_back_through_upload(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given execute reports missing inputs while following an operation
    with pytest.raises(Retry) as info:
        run(stage_tasks["execute"], raising(MissingBlobsError(["x/1"])), {"operation": "op-1"})
    # Then it is re-queued at once with the re-upload flag, without the operation
    assert float(info.value.when) == 0
    requeued = info.value.sig.args[0]["state"]
    assert requeued == {"reupload": True, "reuploads": 1}
    # When the re-queued task runs, it uploads first, then runs the stage
    uploads: list[State] = []

    def fake_upload(ctx: Any, spec: Any, state: State) -> State:
        uploads.append(state)
        return {**state, "uploaded": {"blobs": 1}}  # type: ignore[typeddict-item]

    monkeypatch.setattr(task_module, "upload", fake_upload)
    result = run(stage_tasks["execute"], returning(action_result="x"), requeued)
    assert len(uploads) == 1
    assert result["state"] == {"reuploads": 1, "uploaded": {"blobs": 1}, "action_result": "x"}
    # And when the inputs are still missing after the last re-upload, the element fails
    with pytest.raises(ElementFailed):
        run(stage_tasks["execute"], raising(MissingBlobsError(["x/1"])), {"reuploads": 2})
    assert "(after 2 re-uploads)" in runtime.scheduler.finished[-1][1]["error"]


def test_a_still_running_operation_calls_the_hook_and_requeues(
    stage_tasks: dict[str, StageTask],
) -> None:
    # Given a stage that returns with its operation still running
    seen: list[State] = []
    with pytest.raises(Retry) as info:
        run(
            stage_tasks["execute"],
            returning(operation="op-1", remote_stage="EXECUTING"),
            still_running=lambda rt, payload, state: seen.append(state),
        )
    # Then the hook saw it, and the task follows it again at once
    assert seen == [{"operation": "op-1", "remote_stage": "EXECUTING"}]
    assert float(info.value.when) == 0
    assert info.value.sig.args[0]["state"] == seen[0]


def test_a_stale_delivery_is_ignored(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    runtime.scheduler.current = False
    with pytest.raises(Ignore):
        run(stage_tasks["upload"], returning())
    assert runtime.scheduler.finished == []


def test_a_message_delivered_too_often_fails_the_element(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    runtime.scheduler.deliveries = StageTask.policy.max_deliveries
    with pytest.raises(ElementFailed):
        run(stage_tasks["upload"], returning())
    assert "delivered 4 times" in runtime.scheduler.finished[0][1]["error"]


def test_importing_the_task_modules_reads_no_configuration(tmp_path: Any) -> None:
    # Given a configuration file that cannot be read
    bad = tmp_path / "remex.toml"
    bad.write_text("this is [not toml")
    code = (
        "import tasks.app, tasks.stages, tasks.runtime\n"
        "try:\n"
        "    tasks.app.app\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    # When the modules are imported, then the app attribute is read
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "REMEX_CONFIG": str(bad)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # Then the import itself succeeds; only building the app reads the config
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ConfigError"


def test_a_running_stage_pins_the_trees_of_its_state(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    # Given a state naming an input root
    root = {"hash": "ab" * 32, "size_bytes": 10}
    seen: list[str] = []

    def fn(ctx: Any, spec: Any, state: State) -> State:
        pins = list((ctx.local_cas.root / "pins").iterdir())
        seen.extend(p.read_text() for p in pins)
        return state

    # When its stage runs
    run(stage_tasks["upload"], fn, {"input_root": root})

    # Then, while it ran, one pin named the tree; and no pin names anything
    # after (a pin file is kept empty for the next stage)
    assert len(seen) == 1 and f"T {root['hash']} 10" in seen[0]
    assert not any(p.read_text() for p in (runtime.context.local_cas.root / "pins").iterdir())


@pytest.mark.parametrize(
    ("attempt", "retries", "redelivered", "first"),
    [
        (1, 0, False, True),
        (2, 0, False, False),  # sent again (its worker died, ...): look first
        (1, 1, False, False),  # push_artifact retried after a transient error
        (1, 0, True, False),  # the broker delivered the message again
    ],
)
def test_only_the_first_delivery_of_the_first_attempt_pushes_without_a_lookup(
    stage_tasks: dict[str, StageTask], attempt: int, retries: int, redelivered: bool, first: bool
) -> None:
    # Given push_artifact's request as a worker gets it
    task = stage_tasks["push_artifact"]
    task.push_request(
        id="task-1",
        retries=retries,
        called_directly=False,
        delivery_info={"redelivered": redelivered},
    )
    try:
        # Then only a first push skips the artifact lookup (FetchDirectory)
        assert task_module.first_push(task, {**PAYLOAD, "attempt": attempt}) is first
    finally:
        task.pop_request()


def test_a_stage_result_repr_is_short_but_names_the_element(
    stage_tasks: dict[str, StageTask],
) -> None:
    # Given a stage result with a large state
    from celery.utils.saferepr import saferepr

    task = stage_tasks["push_artifact"]
    result = {**PAYLOAD, "state": {f"key{i}": "x" * 40 for i in range(100)}}
    # Then the repr Celery sends in its events is cut short, and still names the element
    text = saferepr(result, task.resultrepr_maxsize)
    assert len(text) <= task.resultrepr_maxsize + 16
    assert "'element': 'a.bst'" in text and "'build': 'b1'" in text


def test_an_element_holds_its_staging_place_from_stage_to_cas_until_execute(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    # Given a worker that stages one element at a time
    runtime.staging = window = StagingWindow(1, lease=30.0)
    # When an element's stage_to_cas and upload run, then it holds the place
    run(stage_tasks["stage_to_cas"], returning(action="a"))
    assert window.holding() == 1
    run(stage_tasks["upload"], returning(uploaded={"blobs": 1}))
    assert window.holding() == 1
    # And gives it up when its execute starts
    seen: list[int] = []

    def execute(ctx: Any, spec: Any, state: State) -> State:
        seen.append(window.holding())
        return state

    run(stage_tasks["execute"], execute)
    assert seen == [0] and window.holding() == 0


def test_a_failed_staging_stage_gives_its_place_up(
    stage_tasks: dict[str, StageTask], runtime: FakeRuntime
) -> None:
    runtime.staging = window = StagingWindow(1, lease=30.0)
    # When stage_to_cas fails transiently (re-queued), then the place is free again
    with pytest.raises(Retry):
        run(stage_tasks["stage_to_cas"], raising(RemoteError("away", transient=True)))
    assert window.holding() == 0
    # And so when upload fails for good
    run(stage_tasks["stage_to_cas"], returning(action="a"))
    assert window.holding() == 1
    with pytest.raises(ElementFailed):
        run(stage_tasks["upload"], raising(RemexError("bad input")))
    assert window.holding() == 0
