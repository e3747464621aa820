"""An in-process fake REAPI CAS for unit tests: CAS, ByteStream and Capabilities.

It records what clients send (calls per method, request sizes, write streams)
and can misbehave on demand: fail the next calls of a method with a status
code, break a ByteStream write half way, serve wrong bytes for a blob, answer
GetTree with directories of the test's choosing. Real servers are for
``tests/integration``; this one exists to make the bad cases reproducible.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from google.rpc import status_pb2

from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from protos.build.bazel.semver import semver_pb2
from protos.google.bytestream import bytestream_pb2 as bs_pb2
from protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

_MAX_MESSAGE = 64 * 1024 * 1024


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class WriteStream:
    """One ByteStream Write call as the server saw it."""

    resource_name: str
    offsets: list[int] = field(default_factory=list)
    chunk_sizes: list[int] = field(default_factory=list)
    finish_flags: list[bool] = field(default_factory=list)


class FakeCas:
    """State and behaviour shared by the fake servicers.

    Args:
        max_batch_total_size_bytes: the limit reported in the capabilities.
        query_write_status: whether QueryWriteStatus is implemented.
        get_tree: whether GetTree is implemented.
        call_delay: seconds each upload RPC sleeps (to make calls overlap).
    """

    def __init__(
        self,
        *,
        max_batch_total_size_bytes: int = 4 * 1024 * 1024,
        query_write_status: bool = True,
        get_tree: bool = True,
        call_delay: float = 0.0,
    ) -> None:
        self.max_batch_total_size_bytes = max_batch_total_size_bytes
        self.query_write_status = query_write_status
        self.get_tree = get_tree
        self.call_delay = call_delay
        self.lock = threading.Lock()
        self.blobs: dict[str, bytes] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.batch_update_sizes: list[int] = []
        self.batch_update_counts: list[int] = []
        self.batch_read_counts: list[int] = []
        self.find_missing_counts: list[int] = []
        self.writes: list[WriteStream] = []
        self.reads: list[bs_pb2.ReadRequest] = []
        # method name -> codes the next calls fail with, in order
        self.faults: dict[str, list[grpc.StatusCode]] = collections.defaultdict(list)
        # hash -> a per-blob status code BatchUpdate/BatchRead answer with, once each
        self.blob_faults: dict[str, list[int]] = collections.defaultdict(list)
        # hash -> the bytes served instead of the real ones
        self.corrupt: dict[str, bytes] = {}
        # root hash -> the pages GetTree answers with (one response per page)
        self.tree_pages: dict[str, list[list[re_pb2.Directory]]] = {}
        # pages one GetTree call streams before it ends (None: all of them)
        self.pages_per_call: int | None = None
        self.get_tree_tokens: list[str] = []
        # break the next Write stream after this many bytes (UNAVAILABLE)
        self.break_write_after: int | None = None
        self.partial_writes: dict[str, bytearray] = {}
        self.completed_writes: set[str] = set()

    # --- helpers for tests ---------------------------------------------------

    def put(self, data: bytes) -> re_pb2.Digest:
        with self.lock:
            self.blobs[_sha256(data)] = data
        return re_pb2.Digest(hash=_sha256(data), size_bytes=len(data))

    def put_message(self, message: Any) -> re_pb2.Digest:
        return self.put(message.SerializeToString(deterministic=True))

    def has(self, digest: re_pb2.Digest) -> bool:
        with self.lock:
            data = self.blobs.get(digest.hash)
        return data is not None and len(data) == digest.size_bytes

    def fail_next(self, method: str, *codes: grpc.StatusCode) -> None:
        with self.lock:
            self.faults[method].extend(codes)

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method] += 1
            pending = self.faults.get(method)
            code = pending.pop(0) if pending else None
        if code is not None:
            context.abort(code, f"injected {code.name}")

    def _stored(self, hash_: str) -> bytes | None:
        with self.lock:
            if hash_ in self.corrupt:
                return self.corrupt[hash_]
            return self.blobs.get(hash_)

    def _blob_fault(self, hash_: str) -> int | None:
        with self.lock:
            pending = self.blob_faults.get(hash_)
            return pending.pop(0) if pending else None


class _Capabilities(re_grpc.CapabilitiesServicer):
    def __init__(self, fake: FakeCas) -> None:
        self.fake = fake

    def GetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fake._enter("GetCapabilities", context)
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=[re_pb2.DigestFunction.SHA256],
                max_batch_total_size_bytes=self.fake.max_batch_total_size_bytes,
            ),
            low_api_version=semver_pb2.SemVer(major=2, minor=0),
            high_api_version=semver_pb2.SemVer(major=2, minor=3),
        )


class _Cas(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, fake: FakeCas) -> None:
        self.fake = fake

    def FindMissingBlobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fake._enter("FindMissingBlobs", context)
        with self.fake.lock:
            self.fake.find_missing_counts.append(len(request.blob_digests))
        missing = [d for d in request.blob_digests if not self.fake.has(d)]
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=missing)

    def BatchUpdateBlobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fake._enter("BatchUpdateBlobs", context)
        with self.fake.lock:
            self.fake.batch_update_sizes.append(request.ByteSize())
            self.fake.batch_update_counts.append(len(request.requests))
        time.sleep(self.fake.call_delay)
        responses = []
        for entry in request.requests:
            code = self.fake._blob_fault(entry.digest.hash)
            if code is None:
                ok = (
                    _sha256(entry.data) == entry.digest.hash
                    and len(entry.data) == entry.digest.size_bytes
                )
                code = 0 if ok else grpc.StatusCode.INVALID_ARGUMENT.value[0]
            if code == 0:
                self.fake.put(entry.data)
            responses.append(
                re_pb2.BatchUpdateBlobsResponse.Response(
                    digest=entry.digest, status=status_pb2.Status(code=code, message="fake")
                )
            )
        return re_pb2.BatchUpdateBlobsResponse(responses=responses)

    def BatchReadBlobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fake._enter("BatchReadBlobs", context)
        with self.fake.lock:
            self.fake.batch_read_counts.append(len(request.digests))
        responses = []
        for digest in request.digests:
            code = self.fake._blob_fault(digest.hash)
            data = self.fake._stored(digest.hash)
            if code is None:
                code = 0 if data is not None else grpc.StatusCode.NOT_FOUND.value[0]
            responses.append(
                re_pb2.BatchReadBlobsResponse.Response(
                    digest=digest,
                    data=data if code == 0 and data is not None else b"",
                    status=status_pb2.Status(code=code),
                )
            )
        return re_pb2.BatchReadBlobsResponse(responses=responses)

    def GetTree(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.fake._enter("GetTree", context)
        if not self.fake.get_tree:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no GetTree here")
        root = request.root_digest.hash
        pages = self.fake.tree_pages.get(root)
        if pages is None:
            pages = [self._walk(request.root_digest, context)]
        with self.fake.lock:
            self.fake.get_tree_tokens.append(request.page_token)
        start = int(request.page_token or 0)
        stop = len(pages)
        if self.fake.pages_per_call is not None:
            stop = min(stop, start + self.fake.pages_per_call)
        for index in range(start, stop):
            token = str(index + 1) if index + 1 < len(pages) else ""
            yield re_pb2.GetTreeResponse(directories=pages[index], next_page_token=token)

    def _walk(self, root: re_pb2.Digest, context: grpc.ServicerContext) -> list[Any]:
        result = []
        queue = [root]
        while queue:
            digest = queue.pop(0)
            data = self.fake._stored(digest.hash)
            if data is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no directory {digest.hash}")
            directory = re_pb2.Directory.FromString(data)
            result.append(directory)
            queue.extend(node.digest for node in directory.directories)
        return result


class _ByteStream(bs_grpc.ByteStreamServicer):
    def __init__(self, fake: FakeCas) -> None:
        self.fake = fake

    def Read(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.fake._enter("Read", context)
        with self.fake.lock:
            self.fake.reads.append(request)
        parts = request.resource_name.split("/")
        data = self.fake._stored(parts[-2])
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no blob {parts[-2]}")
        chunk = 256 * 1024
        for start in range(request.read_offset, len(data), chunk):
            yield bs_pb2.ReadResponse(data=data[start : start + chunk])

    def Write(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        self.fake._enter("Write", context)
        time.sleep(self.fake.call_delay)
        stream: WriteStream | None = None
        resource = ""
        for request in request_iterator:
            if stream is None:
                resource = request.resource_name
                stream = WriteStream(resource)
                with self.fake.lock:
                    self.fake.writes.append(stream)
            stream.offsets.append(request.write_offset)
            stream.chunk_sizes.append(len(request.data))
            stream.finish_flags.append(request.finish_write)
            with self.fake.lock:
                buffer = self.fake.partial_writes.setdefault(resource, bytearray())
                if request.write_offset != len(buffer):
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"write_offset {request.write_offset}, committed {len(buffer)}",
                    )
                buffer.extend(request.data)
                limit = self.fake.break_write_after
                if limit is not None and len(buffer) >= limit:
                    self.fake.break_write_after = None
                    broken = True
                else:
                    broken = False
            if broken:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected break in the stream")
            if request.finish_write:
                break
        if stream is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty write")
        parts = resource.split("/")
        hash_, size = parts[-2], int(parts[-1])
        with self.fake.lock:
            data = bytes(self.fake.partial_writes.pop(resource))
        if _sha256(data) != hash_ or len(data) != size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "digest mismatch")
        self.fake.put(data)
        with self.fake.lock:
            self.fake.completed_writes.add(resource)
        return bs_pb2.WriteResponse(committed_size=len(data))

    def QueryWriteStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fake._enter("QueryWriteStatus", context)
        if not self.fake.query_write_status:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no QueryWriteStatus here")
        with self.fake.lock:
            if request.resource_name in self.fake.completed_writes:
                return bs_pb2.QueryWriteStatusResponse(committed_size=0, complete=True)
            buffer = self.fake.partial_writes.get(request.resource_name)
        if buffer is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown upload")
        return bs_pb2.QueryWriteStatusResponse(committed_size=len(buffer), complete=False)


class FakeCasServer:
    """A grpc server on 127.0.0.1 (a free port) serving a :class:`FakeCas`.

    Use as a context manager; ``url`` is ``grpc://127.0.0.1:PORT``.
    """

    def __init__(self, fake: FakeCas | None = None) -> None:
        self.fake = fake or FakeCas()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
            ],
        )
        re_grpc.add_CapabilitiesServicer_to_server(_Capabilities(self.fake), self._server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(_Cas(self.fake), self._server)
        bs_grpc.add_ByteStreamServicer_to_server(_ByteStream(self.fake), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.url = f"grpc://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeCasServer:
        self._server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stop(grace=None)


@contextmanager
def serve_capabilities(servicer: re_grpc.CapabilitiesServicer) -> Iterator[int]:
    """Serve ``servicer`` alone on 127.0.0.1; yield its port; stop it after."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    re_grpc.add_CapabilitiesServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)
