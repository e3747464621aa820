"""The execution retry model, against an in-process Execution server that misbehaves on cue."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pipeline.digest import digest_of
from pipeline.errors import ExecutionError, MissingBlobsError, OperationLostError
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.execution import ExecutionClient, Pending
from pipeline.reapi.remote import Remote
from pipeline.reapi.retry import Retrier, RetryPolicy
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

ACTION = digest_of(b"an action")
MISSING = digest_of(b"a missing input")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def operation(name: str, *, done: bool = False, response: Any = None) -> operations_pb2.Operation:
    op = operations_pb2.Operation(name=name, done=done)
    meta = re_pb2.ExecuteOperationMetadata(stage=re_pb2.ExecutionStage.EXECUTING)
    op.metadata.Pack(meta)
    if response is not None:
        op.response.Pack(response)
    return op


def ok_response(exit_code: int = 0) -> re_pb2.ExecuteResponse:
    return re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=exit_code))


def missing_status() -> status_pb2.Status:
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type="MISSING", subject=f"blobs/{MISSING.hash}/{MISSING.size_bytes}"
            )
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(failure)
    return status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION, message="missing inputs", details=[detail]
    )


Handler = Callable[[Any, grpc.ServicerContext], Iterator[operations_pb2.Operation]]


class ScriptedExecution(re_grpc.ExecutionServicer, operations_pb2_grpc.OperationsServicer):
    """Plays one scripted handler per call, in order, for Execute and WaitExecution."""

    def __init__(self) -> None:
        self.execute_script: list[Handler] = []
        self.wait_script: list[Handler] = []
        self.calls: list[str] = []
        self.cancelled: list[str] = []

    def Execute(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append("Execute")
        yield from self.execute_script.pop(0)(request, context)

    def WaitExecution(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(f"WaitExecution:{request.name}")
        yield from self.wait_script.pop(0)(request, context)

    def CancelOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.cancelled.append(request.name)
        return empty_pb2.Empty()


def yields(*ops: operations_pb2.Operation) -> Handler:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        yield from ops

    return handler


def then_fails(
    code: grpc.StatusCode, *ops: operations_pb2.Operation, status: Any = None
) -> Handler:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        yield from ops
        if status is not None:
            context.set_trailing_metadata(
                (("grpc-status-details-bin", status.SerializeToString()),)
            )
        context.abort(code, "scripted failure")

    return handler


def hangs(*ops: operations_pb2.Operation) -> Handler:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        yield from ops
        while context.is_active():
            time.sleep(0.02)

    return handler


@pytest.fixture
def server() -> Iterator[tuple[ScriptedExecution, ExecutionClient, FakeClock]]:
    servicer = ScriptedExecution()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    re_grpc.add_ExecutionServicer_to_server(servicer, grpc_server)
    operations_pb2_grpc.add_OperationsServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    clock = FakeClock()
    retrier = Retrier(RetryPolicy(max_attempts=5, deadline=100.0), clock=clock)
    remote = Remote(Endpoint(f"grpc://127.0.0.1:{port}"), retrier=retrier)
    try:
        yield servicer, ExecutionClient(remote), clock
    finally:
        remote.close()
        grpc_server.stop(None)


def test_a_finished_operation_returns_its_response(server: Any) -> None:
    # Given a server that runs the action to completion with exit code 3
    servicer, client, _ = server
    servicer.execute_script = [
        yields(operation("op1"), operation("op1", done=True, response=ok_response(3)))
    ]
    # When we execute
    response = client.execute(ACTION)
    # Then the non-zero exit code is a normal result, not an error
    assert response.result.exit_code == 3
    assert servicer.calls == ["Execute"]


def test_a_broken_stream_resumes_with_wait_execution(server: Any) -> None:
    # Given a stream that breaks after naming the operation
    servicer, client, clock = server
    servicer.execute_script = [then_fails(grpc.StatusCode.UNAVAILABLE, operation("op1"))]
    servicer.wait_script = [yields(operation("op1", done=True, response=ok_response()))]
    # When we execute
    response = client.execute(ACTION)
    # Then we followed the same operation rather than starting a new one
    assert response.result.exit_code == 0
    assert servicer.calls == ["Execute", "WaitExecution:op1"]
    assert len(clock.sleeps) == 1


def test_a_stream_closed_early_resumes_too(server: Any) -> None:
    servicer, client, _ = server
    servicer.execute_script = [yields(operation("op1"))]
    servicer.wait_script = [yields(operation("op1", done=True, response=ok_response()))]
    assert client.execute(ACTION).result.exit_code == 0
    assert servicer.calls == ["Execute", "WaitExecution:op1"]


def test_a_lost_operation_is_executed_again(server: Any) -> None:
    # Given a server that forgets the operation while we wait on it
    servicer, client, _ = server
    servicer.execute_script = [
        then_fails(grpc.StatusCode.UNAVAILABLE, operation("op1")),
        yields(operation("op2", done=True, response=ok_response())),
    ]
    servicer.wait_script = [then_fails(grpc.StatusCode.NOT_FOUND)]
    # When we execute
    response = client.execute(ACTION)
    # Then the action ran again under a new operation
    assert response.result.exit_code == 0
    assert servicer.calls == ["Execute", "WaitExecution:op1", "Execute"]


def test_losing_the_operation_too_often_is_an_error(server: Any) -> None:
    servicer, client, _ = server
    servicer.execute_script = [yields(operation(f"op{i}")) for i in range(3)]
    servicer.wait_script = [then_fails(grpc.StatusCode.NOT_FOUND) for _ in range(3)]
    with pytest.raises(OperationLostError) as info:
        client.execute(ACTION, max_lost=2)
    assert info.value.operation_name == "op2"
    assert info.value.transient
    assert servicer.calls.count("Execute") == 3


def test_missing_inputs_on_the_rpc_list_the_digests(server: Any) -> None:
    servicer, client, _ = server
    servicer.execute_script = [
        then_fails(grpc.StatusCode.FAILED_PRECONDITION, status=missing_status())
    ]
    with pytest.raises(MissingBlobsError) as info:
        client.execute(ACTION)
    assert info.value.digests == [f"{MISSING.hash}/{MISSING.size_bytes}"]
    assert not info.value.transient
    assert servicer.calls == ["Execute"]


def test_missing_inputs_inside_the_response_list_the_digests(server: Any) -> None:
    servicer, client, _ = server
    response = re_pb2.ExecuteResponse(status=missing_status())
    servicer.execute_script = [yields(operation("op1", done=True, response=response))]
    with pytest.raises(MissingBlobsError) as info:
        client.execute(ACTION)
    assert MISSING.hash in str(info.value)


def test_not_found_inside_the_response_is_missing_inputs(server: Any) -> None:
    # buildbox-casd, restarted with an empty store, answers NOT_FOUND
    servicer, client, _ = server
    response = re_pb2.ExecuteResponse(
        status=status_pb2.Status(
            code=code_pb2.NOT_FOUND, message="Blob not found in the local CAS."
        )
    )
    servicer.execute_script = [yields(operation("op1", done=True, response=response))]
    with pytest.raises(MissingBlobsError) as info:
        client.execute(ACTION)
    assert info.value.digests == []
    assert "Blob not found in the local CAS" in str(info.value)
    assert info.value.code == "NOT_FOUND" and not info.value.transient


def test_a_failure_status_in_the_response_is_reported(server: Any) -> None:
    # Given an action that timed out on the server, with partial output
    servicer, client, _ = server
    response = re_pb2.ExecuteResponse(
        status=status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message="action timed out"),
        result=re_pb2.ActionResult(exit_code=137, stderr_raw=b"partial"),
    )
    servicer.execute_script = [yields(operation("op1", done=True, response=response))]
    # When we execute, then it is an error that carries the response
    with pytest.raises(ExecutionError) as info:
        client.execute(ACTION)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert "action timed out" in str(info.value)
    assert not info.value.transient
    assert info.value.response.result.stderr_raw == b"partial"  # type: ignore[attr-defined]


def test_an_operation_error_is_reported(server: Any) -> None:
    servicer, client, _ = server
    op = operations_pb2.Operation(
        name="op1",
        done=True,
        error=status_pb2.Status(code=code_pb2.UNAVAILABLE, message="no bots"),
    )
    servicer.execute_script = [yields(op)]
    with pytest.raises(ExecutionError) as info:
        client.execute(ACTION)
    assert info.value.code == "UNAVAILABLE" and info.value.transient


def test_a_permanent_rpc_error_is_not_retried(server: Any) -> None:
    servicer, client, clock = server
    servicer.execute_script = [then_fails(grpc.StatusCode.INVALID_ARGUMENT)]
    with pytest.raises(Exception) as info:
        client.execute(ACTION)
    assert getattr(info.value, "code", None) == "INVALID_ARGUMENT"
    assert servicer.calls == ["Execute"] and clock.sleeps == []


def test_transient_failures_before_naming_retry_execute(server: Any) -> None:
    servicer, client, clock = server
    servicer.execute_script = [
        then_fails(grpc.StatusCode.UNAVAILABLE),
        then_fails(grpc.StatusCode.RESOURCE_EXHAUSTED),
        yields(operation("op1", done=True, response=ok_response())),
    ]
    assert client.execute(ACTION).result.exit_code == 0
    assert servicer.calls == ["Execute"] * 3
    assert len(clock.sleeps) == 2


def test_the_request_carries_the_parameters(server: Any) -> None:
    servicer, client, _ = server
    seen: list[Any] = []

    def record(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        seen.append(request)
        yield operation("op1", done=True, response=ok_response())

    servicer.execute_script = [record]
    client.execute(ACTION, skip_cache_lookup=True, priority=7)
    assert seen[0].skip_cache_lookup is True
    assert seen[0].execution_policy.priority == 7
    assert seen[0].results_cache_policy.priority == 7
    assert seen[0].action_digest == ACTION


def test_max_wait_returns_pending_then_resumes_by_name() -> None:
    # Given a real clock and an action that runs longer than we are willing to wait
    servicer = ScriptedExecution()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    re_grpc.add_ExecutionServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    remote = Remote(Endpoint(f"grpc://127.0.0.1:{port}"))
    try:
        servicer.execute_script = [hangs(operation("op1"))]
        client = ExecutionClient(remote)
        # When we wait at most 0.3 s
        started = time.monotonic()
        outcome = client.run(ACTION, max_wait=0.3)
        # Then we get the operation's name back in about that time
        assert isinstance(outcome, Pending)
        assert outcome.operation_name == "op1" and outcome.remote_stage == "EXECUTING"
        assert time.monotonic() - started < 3
        # And a later call resumes it by name without executing again
        servicer.wait_script = [yields(operation("op1", done=True, response=ok_response()))]
        final = client.run(ACTION, operation_name="op1", max_wait=5)
        assert isinstance(final, re_pb2.ExecuteResponse)
        assert servicer.calls == ["Execute", "WaitExecution:op1"]
    finally:
        remote.close()
        grpc_server.stop(None)


def test_cancel_sends_cancel_operation(server: Any) -> None:
    servicer, client, _ = server
    client.cancel("op9")
    assert servicer.cancelled == ["op9"]


def test_every_execute_call_carries_the_action_id(server: Any) -> None:
    servicer, client, _ = server
    seen: list[bytes] = []
    lock = threading.Lock()

    def record(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with lock:
            seen.extend(
                v for k, v in context.invocation_metadata() if k.endswith("requestmetadata-bin")
            )
        yield operation("op1", done=True, response=ok_response())

    servicer.execute_script = [record]
    client.execute(ACTION)
    metadata = re_pb2.RequestMetadata.FromString(seen[0])
    assert metadata.action_id == ACTION.hash
