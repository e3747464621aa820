"""ActionCache: look up and record the results of actions."""

from __future__ import annotations

from pipeline.errors import RemoteError
from pipeline.reapi.remote import Remote
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc


class ActionCacheClient:
    """The ActionCache service of one :class:`Remote`."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self._stub = remote.stub(re_grpc.ActionCacheStub)

    def get_action_result(
        self,
        action_digest: re_pb2.Digest,
        *,
        inline_stdout: bool = False,
        inline_stderr: bool = False,
    ) -> re_pb2.ActionResult | None:
        """The cached result of an action, or None when the cache has none.

        Raises:
            RemoteError: the server failed (after retries).
        """
        request = re_pb2.GetActionResultRequest(
            instance_name=self.remote.instance_name,
            action_digest=action_digest,
            inline_stdout=inline_stdout,
            inline_stderr=inline_stderr,
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        try:
            return self.remote.call(
                lambda: self._stub.GetActionResult(request, timeout=self.remote.request_timeout),
                what="GetActionResult",
            )
        except RemoteError as exc:
            if exc.code == "NOT_FOUND":
                return None
            raise

    def update_action_result(
        self, action_digest: re_pb2.Digest, result: re_pb2.ActionResult
    ) -> re_pb2.ActionResult:
        """Record ``result`` as the result of ``action_digest``.

        Raises:
            RemoteError: the server refused (e.g. PERMISSION_DENIED) or failed.
        """
        request = re_pb2.UpdateActionResultRequest(
            instance_name=self.remote.instance_name,
            action_digest=action_digest,
            action_result=result,
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        return self.remote.call(
            lambda: self._stub.UpdateActionResult(request, timeout=self.remote.request_timeout),
            what="UpdateActionResult",
        )
