"""Remote Asset API v1: name blobs and directories by URI (+ qualifiers).

remex stores each artifact as a Directory pushed under its artifact URI;
before building, it fetches that URI to see whether the artifact exists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2
from google.rpc import code_pb2

from pipeline.errors import RemoteError
from pipeline.reapi.remote import Remote
from protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2


@dataclass(frozen=True)
class FetchedAsset:
    """What a Fetch call resolved: the URI that matched and the content digest."""

    uri: str
    digest: re_pb2.Digest
    qualifiers: dict[str, str]


def _qualifiers(qualifiers: Mapping[str, str] | None) -> list[ra_pb2.Qualifier]:
    return [ra_pb2.Qualifier(name=k, value=v) for k, v in sorted((qualifiers or {}).items())]


class AssetClient:
    """The Remote Asset Fetch and Push services of one :class:`Remote`."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self._fetch = remote.stub(ra_grpc.FetchStub)
        self._push = remote.stub(ra_grpc.PushStub)

    def push_blob(
        self,
        uris: Sequence[str],
        digest: re_pb2.Digest,
        *,
        qualifiers: Mapping[str, str] | None = None,
        references_blobs: Sequence[re_pb2.Digest] = (),
        references_directories: Sequence[re_pb2.Digest] = (),
    ) -> None:
        """Name blob ``digest`` (already in the server's CAS) by ``uris``."""
        request = ra_pb2.PushBlobRequest(
            instance_name=self.remote.instance_name,
            uris=list(uris),
            qualifiers=_qualifiers(qualifiers),
            blob_digest=digest,
            references_blobs=list(references_blobs),
            references_directories=list(references_directories),
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        self.remote.call(
            lambda: self._push.PushBlob(request, timeout=self.remote.request_timeout),
            what="PushBlob",
        )

    def push_directory(
        self,
        uris: Sequence[str],
        root: re_pb2.Digest,
        *,
        qualifiers: Mapping[str, str] | None = None,
        references_blobs: Sequence[re_pb2.Digest] = (),
        references_directories: Sequence[re_pb2.Digest] = (),
    ) -> None:
        """Name the Directory tree ``root`` (already in the server's CAS) by ``uris``."""
        request = ra_pb2.PushDirectoryRequest(
            instance_name=self.remote.instance_name,
            uris=list(uris),
            qualifiers=_qualifiers(qualifiers),
            root_directory_digest=root,
            references_blobs=list(references_blobs),
            references_directories=list(references_directories),
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        self.remote.call(
            lambda: self._push.PushDirectory(request, timeout=self.remote.request_timeout),
            what="PushDirectory",
        )

    def fetch_blob(
        self, uris: Sequence[str], *, qualifiers: Mapping[str, str] | None = None
    ) -> FetchedAsset | None:
        """Resolve ``uris`` to a blob, or None when the server knows none of them."""
        request = ra_pb2.FetchBlobRequest(
            instance_name=self.remote.instance_name,
            uris=list(uris),
            qualifiers=_qualifiers(qualifiers),
            timeout=duration_pb2.Duration(seconds=max(1, int(self.remote.request_timeout))),
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        response = self._call_fetch(
            lambda: self._fetch.FetchBlob(request, timeout=self.remote.request_timeout), "FetchBlob"
        )
        if response is None:
            return None
        return FetchedAsset(response.uri, response.blob_digest, _as_dict(response.qualifiers))

    def fetch_directory(
        self, uris: Sequence[str], *, qualifiers: Mapping[str, str] | None = None
    ) -> FetchedAsset | None:
        """Resolve ``uris`` to a Directory tree, or None when the server knows none."""
        request = ra_pb2.FetchDirectoryRequest(
            instance_name=self.remote.instance_name,
            uris=list(uris),
            qualifiers=_qualifiers(qualifiers),
            timeout=duration_pb2.Duration(seconds=max(1, int(self.remote.request_timeout))),
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        response = self._call_fetch(
            lambda: self._fetch.FetchDirectory(request, timeout=self.remote.request_timeout),
            "FetchDirectory",
        )
        if response is None:
            return None
        return FetchedAsset(
            response.uri, response.root_directory_digest, _as_dict(response.qualifiers)
        )

    def _call_fetch(self, fn: Callable[[], Any], what: str) -> Any:
        # "Not found" arrives either as a gRPC NOT_FOUND or as an OK call whose
        # response carries a NOT_FOUND status; both mean "no such asset".
        try:
            response = self.remote.call(fn, what=what)
        except RemoteError as exc:
            if exc.code == "NOT_FOUND":
                return None
            raise
        code = response.status.code
        if code == code_pb2.NOT_FOUND:
            return None
        if code != code_pb2.OK:
            name = code_pb2.Code.Name(code) if code in code_pb2.Code.values() else str(code)
            raise RemoteError(
                f"{what} on {self.remote.endpoint.url} failed: {name}: {response.status.message}",
                code=name,
            )
        return response


def _as_dict(qualifiers: Sequence[ra_pb2.Qualifier]) -> dict[str, str]:
    return {q.name: q.value for q in qualifiers}
