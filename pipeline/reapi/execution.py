"""Execution: run an action remotely and follow it to its ExecuteResponse.

The retry model lives here, in :meth:`ExecutionClient.run`, and only here:

1. ``Execute`` starts the action and streams Operation updates; the first
   one names the operation. We remember the name.
2. A stream that breaks (a transient gRPC error, or the server closing it
   before the operation is done) is resumed with ``WaitExecution(name)``
   after the usual backoff: the action keeps running on the server.
3. ``WaitExecution`` answering NOT_FOUND means the server lost the
   operation (it restarted, or dropped it). The only way forward is to
   ``Execute`` the action again; we do so a bounded number of times.
4. ``FAILED_PRECONDITION`` with ``MISSING`` violations (on the RPC or in the
   ExecuteResponse) means the server's CAS lacks inputs: raised as
   :class:`MissingBlobsError` listing them, since only the caller can upload.
   So is a finished execution with status ``NOT_FOUND`` (buildbox-casd's way
   of saying it, not naming the blobs).
5. A non-OK status inside a finished ExecuteResponse is the action's failure
   (timeout, sandbox error ...): raised as :class:`ExecutionError` with the
   response attached, never swallowed. A non-zero exit code is NOT an
   error at this layer: it is a normal result.

``max_wait`` bounds how long one call follows the operation, so a Celery
task can hand the operation name to a later task instead of holding a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pipeline.digest import digest_to_str
from pipeline.errors import (
    ExecutionError,
    MissingBlobsError,
    OperationLostError,
    ProtocolError,
    RemexError,
    RemoteError,
)
from pipeline.reapi.channel import action_context
from pipeline.reapi.remote import Remote
from pipeline.reapi.retry import retry_delay_hint, rich_status, translate_rpc_error
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

DEFAULT_MAX_LOST = 3

STAGE_NAMES = {v: k for k, v in re_pb2.ExecutionStage.Value.items()}


@dataclass(frozen=True)
class Pending:
    """An operation still running when ``max_wait`` ran out."""

    operation_name: str
    remote_stage: str
    """The REAPI execution stage: QUEUED, EXECUTING ... (UNKNOWN from buildbox-casd)."""


class ExecutionClient:
    """The Execution (and Operations) services of one :class:`Remote`."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self._execution = remote.stub(re_grpc.ExecutionStub)
        self._operations = remote.stub(operations_pb2_grpc.OperationsStub)

    def execute(
        self,
        action_digest: re_pb2.Digest,
        *,
        skip_cache_lookup: bool = False,
        priority: int = 0,
        max_lost: int = DEFAULT_MAX_LOST,
    ) -> re_pb2.ExecuteResponse:
        """Execute ``action_digest`` and wait for its final ExecuteResponse.

        Args:
            action_digest: the Action, already in the server's CAS with its inputs.
            skip_cache_lookup: run even if the ActionCache holds a result.
            priority: ``ExecutionPolicy.priority`` and ``ResultsCachePolicy.priority``
                (lower runs sooner; 0 is the server's default).
            max_lost: how many times a lost operation is executed again.

        Raises:
            MissingBlobsError: the server's CAS lacks inputs (upload, then retry).
            ExecutionError: the ExecuteResponse carries a non-OK status.
            OperationLostError: the operation was lost more than ``max_lost`` times.
            RemoteError: any other failure, after the RPC retry policy.
        """
        outcome = self.run(
            action_digest,
            skip_cache_lookup=skip_cache_lookup,
            priority=priority,
            max_lost=max_lost,
        )
        assert isinstance(outcome, re_pb2.ExecuteResponse)  # no max_wait: always final
        return outcome

    def run(
        self,
        action_digest: re_pb2.Digest,
        *,
        skip_cache_lookup: bool = False,
        priority: int = 0,
        operation_name: str | None = None,
        max_wait: float | None = None,
        max_lost: int = DEFAULT_MAX_LOST,
        on_operation: Callable[[str], None] | None = None,
    ) -> re_pb2.ExecuteResponse | Pending:
        """Start (or resume) an execution and follow it.

        Args:
            operation_name: resume following this operation instead of
                starting a new one (it is executed again if lost).
            max_wait: stop following after this many seconds and return
                :class:`Pending`; None follows to the end.
            on_operation: called with each new operation name as soon as the
                server gives it (so a caller can record it, e.g. for cancel).
            (others as in :meth:`execute`)

        Returns:
            The final ExecuteResponse, or :class:`Pending` when ``max_wait`` ran out.
        """
        request = re_pb2.ExecuteRequest(
            instance_name=self.remote.instance_name,
            action_digest=action_digest,
            skip_cache_lookup=skip_cache_lookup,
            execution_policy=re_pb2.ExecutionPolicy(priority=priority),
            results_cache_policy=re_pb2.ResultsCachePolicy(priority=priority),
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        clock = self.remote.retrier.clock
        deadline = None if max_wait is None else clock.monotonic() + max_wait
        attempts = self.remote.retrier.attempts()
        name, remote_stage, lost = operation_name, "UNKNOWN", 0
        with action_context(action_digest.hash):
            while True:
                finished = None
                timeout = None if deadline is None else max(0.0, deadline - clock.monotonic())
                try:
                    if name is None:
                        stream: Iterable[operations_pb2.Operation] = self._execution.Execute(
                            request, timeout=timeout
                        )
                    else:
                        stream = self._execution.WaitExecution(
                            re_pb2.WaitExecutionRequest(name=name), timeout=timeout
                        )
                    for operation in stream:
                        if operation.name and operation.name != name and on_operation:
                            on_operation(operation.name)
                        name = operation.name or name
                        remote_stage = _stage_of(operation) or remote_stage
                        if operation.done:
                            finished = operation
                            break
                    else:
                        # The server closed the stream before the operation was done.
                        raise RemoteError(
                            f"the server closed the operation stream of {name!r} early",
                            code="UNAVAILABLE",
                            transient=True,
                        )
                except grpc.RpcError as exc:
                    code = exc.code() if isinstance(exc, grpc.Call) else None
                    if (
                        code == grpc.StatusCode.DEADLINE_EXCEEDED
                        and deadline is not None
                        and name is not None
                        and clock.monotonic() >= deadline
                    ):
                        return Pending(name, remote_stage)
                    if code == grpc.StatusCode.NOT_FOUND and name is not None:
                        # Lost operation: execute again (bounded).
                        lost += 1
                        if lost > max_lost:
                            raise OperationLostError(name, transient=True) from None
                        name = None
                        continue
                    _raise_if_missing(rich_status(exc))
                    attempts.failed(translate_rpc_error(exc, what="Execute"), retry_delay_hint(exc))
                except RemexError as exc:
                    attempts.failed(exc)
                if finished is not None:
                    # Outside the try: a final failure is the caller's to judge
                    # (a task may retry the stage), not something to retry here.
                    return _final_response(finished, action_digest)
                if deadline is not None and clock.monotonic() >= deadline and name is not None:
                    return Pending(name, remote_stage)

    def cancel(self, operation_name: str) -> None:
        """Ask the server to cancel an operation (best effort: an unknown one is ignored)."""
        request = operations_pb2.CancelOperationRequest(name=operation_name)
        try:
            self.remote.call(
                lambda: self._operations.CancelOperation(
                    request, timeout=self.remote.request_timeout
                ),
                what="CancelOperation",
            )
        except RemoteError as exc:
            if exc.code != "NOT_FOUND":
                raise


def _stage_of(operation: operations_pb2.Operation) -> str | None:
    if not operation.HasField("metadata"):
        return None
    metadata = re_pb2.ExecuteOperationMetadata()
    if operation.metadata.Unpack(metadata):
        return STAGE_NAMES.get(metadata.stage, "UNKNOWN")
    return None


def _final_response(
    operation: operations_pb2.Operation, action_digest: re_pb2.Digest
) -> re_pb2.ExecuteResponse:
    """The ExecuteResponse of a finished operation, raising on any failure status."""
    what = f"execution of action {digest_to_str(action_digest)}"
    if operation.HasField("error"):
        _raise_if_missing(operation.error)
        _raise_if_not_found(operation.error)
        raise _status_error(operation.error, what, None)
    response = re_pb2.ExecuteResponse()
    if not operation.response.Unpack(response):
        raise ProtocolError(
            f"{what}: operation {operation.name!r} finished without an ExecuteResponse "
            f"(got {operation.response.type_url!r})"
        )
    if response.status.code != code_pb2.OK:
        _raise_if_missing(response.status)
        _raise_if_not_found(response.status)
        raise _status_error(response.status, what, response)
    return response


def _status_error(
    status: status_pb2.Status, what: str, response: re_pb2.ExecuteResponse | None
) -> ExecutionError:
    name = code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else "UNKNOWN"
    # UNAVAILABLE/ABORTED/... mean "the server could not run it now": worth
    # another try. DEADLINE_EXCEEDED inside a response is the action's own timeout.
    transient = name in {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL", "UNKNOWN"}
    error = ExecutionError(
        f"{what} failed: {name}: {status.message or '(no message)'}",
        code=name,
        transient=transient,
    )
    error.response = response  # type: ignore[attr-defined]
    return error


def missing_digests(status: status_pb2.Status | None) -> list[str]:
    """The ``hash/size`` of every MISSING violation in a FAILED_PRECONDITION status."""
    if status is None or status.code != code_pb2.FAILED_PRECONDITION:
        return []
    missing: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            for violation in failure.violations:
                if violation.type == "MISSING":
                    # The subject is "blobs/{hash}/{size}" per the REAPI spec.
                    missing.append(violation.subject.removeprefix("blobs/"))
    return missing


def _raise_if_missing(status: status_pb2.Status | None) -> None:
    digests = missing_digests(status)
    if digests:
        raise MissingBlobsError(digests)


def _raise_if_not_found(status: status_pb2.Status) -> None:
    """A finished execution whose status is NOT_FOUND lacked an input.

    buildbox-casd answers so ("Blob not found in the local CAS") where the
    REAPI asks for FAILED_PRECONDITION with MISSING violations, e.g. after it
    restarted with an empty store. NOT_FOUND is no other documented Execute
    outcome, so it is taken as missing inputs (not naming them): the caller
    uploads again (a bounded number of times)."""
    if status.code == code_pb2.NOT_FOUND:
        raise MissingBlobsError([], detail=status.message, code="NOT_FOUND")
