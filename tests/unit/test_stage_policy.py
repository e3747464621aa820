"""The failure policy (pipeline.stages.policy) and run_stages acting on it.

No server: run_stages runs with its stage functions replaced by fakes.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.cas import LocalCas
from pipeline.errors import ExecutionError, MissingBlobsError, RemexError, RemoteError
from pipeline.stages import BuildFailedError, State
from pipeline.stages import run as run_module
from pipeline.stages.policy import DEFAULT_POLICY, Decision, FailurePolicy, is_transient

POLICY = FailurePolicy(max_transient_retries=3, max_reuploads=2)


def transient() -> RemoteError:
    return RemoteError("UNAVAILABLE: away", code="UNAVAILABLE", transient=True)


def test_a_failed_command_fails_the_element_with_its_reason() -> None:
    # Given a build failure in fetch_outputs
    exc = BuildFailedError("a.bst", "command exited with code 2", exit_code=2)
    # When the policy decides
    verdict = POLICY.decide("fetch_outputs", exc, failures=1)
    # Then the element fails at once, with the reason (not the whole message)
    assert verdict.decision is Decision.FAIL and verdict.fails_element
    assert verdict.reason == "command exited with code 2"


def test_a_permanent_error_fails_the_element_at_once() -> None:
    verdict = POLICY.decide("upload", RemexError("bad spec", transient=False), failures=1)
    assert verdict.decision is Decision.FAIL
    assert verdict.reason == "upload: bad spec"


def test_transient_errors_retry_with_growing_backoff_then_give_up() -> None:
    # Given a stage that keeps failing transiently
    rng = random.Random(7)
    verdicts = [
        POLICY.decide("upload", transient(), failures=n, rng=rng)
        for n in range(1, POLICY.max_transient_retries + 2)
    ]
    # Then it is retried max_transient_retries times, each wait in [c/2, c]
    # with c doubling from 1 s, and then the retries are spent
    assert [v.decision for v in verdicts] == [Decision.RETRY] * 3 + [Decision.GIVE_UP]
    for n, verdict in enumerate(verdicts[:3]):
        ceiling = 2.0**n
        assert ceiling / 2 <= verdict.delay <= ceiling
    assert verdicts[-1].reason.startswith("upload failed 4 times: ")


def test_an_error_that_is_not_remexs_is_retried_like_a_transient_one() -> None:
    assert is_transient(OSError("disk full"))
    assert POLICY.decide("push_artifact", OSError("disk full"), failures=1).decision is (
        Decision.RETRY
    )


def test_missing_inputs_in_execute_reupload_a_bounded_number_of_times() -> None:
    exc = MissingBlobsError(["abc/1"])
    # When execute reports missing inputs
    first = POLICY.decide("execute", exc, failures=1, reuploads=0)
    last = POLICY.decide("execute", exc, failures=1, reuploads=2)
    # Then the element goes back through upload at once, until the re-uploads are spent
    assert (first.decision, first.delay) == (Decision.REUPLOAD, 0.0)
    assert last.decision is Decision.GIVE_UP
    assert "(after 2 re-uploads)" in last.reason
    # And outside execute, missing blobs are a permanent error like any other
    assert POLICY.decide("upload", exc, failures=1).decision is Decision.FAIL


def test_a_transient_execution_error_reuploads_then_retries() -> None:
    # buildbox-casd reports inputs it cannot stage as INTERNAL
    exc = ExecutionError("INTERNAL: cannot stage", code="INTERNAL", transient=True)
    assert POLICY.decide("execute", exc, failures=1, reuploads=0).decision is Decision.REUPLOAD
    assert POLICY.decide("execute", exc, failures=1, reuploads=2).decision is Decision.RETRY
    assert POLICY.decide("execute", exc, failures=4, reuploads=2).decision is Decision.GIVE_UP


def test_the_task_backoff_is_the_rpc_retry_policys_equal_jitter() -> None:
    # Given a seeded jitter source
    waits = [DEFAULT_POLICY.delay(n, random.Random(n)) for n in range(1, 10)]
    # Then each wait is in [c/2, c], c = min(60, 2**(n-1))
    for n, wait in enumerate(waits, start=1):
        ceiling = min(60.0, 2.0 ** (n - 1))
        assert ceiling / 2 <= wait <= ceiling
    assert DEFAULT_POLICY.delay(1, random.Random(1)) == DEFAULT_POLICY.backoff.backoff(
        0, random.Random(1)
    )


# --- run_stages -------------------------------------------------------------------


def fake_context(tmp_path: Path) -> Any:
    """A stage context with only a (real) local CAS: the stages are fakes."""
    return SimpleNamespace(local_cas=LocalCas(tmp_path / "cas"))


class FakeStages:
    """Stage functions that record their calls; execute fails as told."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, execute_errors: list[Exception]) -> None:
        self.calls: list[str] = []
        self.execute_errors = list(execute_errors)
        for name in ("stage_to_cas", "upload", "fetch_outputs", "push_artifact"):
            monkeypatch.setattr(run_module, name, self.recorder(name))
        monkeypatch.setattr(run_module, "execute", self.execute)

    def recorder(self, name: str) -> Any:
        def stage(ctx: Any, spec: Any, state: State) -> State:
            self.calls.append(name)
            new = state.copy()
            if name == "push_artifact":
                new["artifact"] = {"hash": "a" * 64, "size_bytes": 1}
            return new

        return stage

    def execute(self, ctx: Any, spec: Any, state: State) -> State:
        self.calls.append("execute")
        assert "operation" not in state, "a re-upload Executes afresh"
        if self.execute_errors:
            raise self.execute_errors.pop(0)
        return state


def test_run_stages_reuploads_when_execute_lacks_inputs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given an execution CAS that lost inputs twice
    stages = FakeStages(monkeypatch, [MissingBlobsError(["x/1"]), MissingBlobsError(["x/1"])])
    # When the element runs in-process
    state = run_module.run_stages(fake_context(tmp_path), {})  # type: ignore[arg-type]
    # Then upload and execute ran again, twice, and the element was built
    assert stages.calls == [
        "stage_to_cas",
        "upload",
        "execute",
        "upload",
        "execute",
        "upload",
        "execute",
        "fetch_outputs",
        "push_artifact",
    ]
    assert "artifact" in state


def test_run_stages_raises_when_the_reuploads_are_spent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    FakeStages(monkeypatch, [MissingBlobsError(["x/1"])] * 3)
    with pytest.raises(MissingBlobsError):
        run_module.run_stages(fake_context(tmp_path), {})  # type: ignore[arg-type]


def test_run_stages_does_not_retry_other_errors_in_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stages = FakeStages(monkeypatch, [transient()])
    with pytest.raises(RemoteError):
        run_module.run_stages(fake_context(tmp_path), {})  # type: ignore[arg-type]
    assert stages.calls == ["stage_to_cas", "upload", "execute"]
