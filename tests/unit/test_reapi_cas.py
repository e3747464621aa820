"""The remote CAS client against an in-process fake server that misbehaves on cue.

The fake (tests/fakeserver.py) records every request, so these tests check
what goes over the wire: batch sizes, ByteStream chunks and resource names,
retries. Time is a :class:`FakeClock`: retries do not sleep.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc
import pytest

from pipeline.cas.store import LocalCas
from pipeline.cas.tree import tree_digests
from pipeline.digest import EMPTY_DIGEST, Digest, digest_of
from pipeline.errors import (
    BlobNotFoundError,
    DigestMismatchError,
    LocalBlobMissingError,
    ProtocolError,
    RemoteError,
    UnsafePathError,
)
from pipeline.reapi.cas import ENTRY_FRAMING, CasClient, DownloadStats, UploadStats
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import BATCH_OVERHEAD_MARGIN, Remote
from pipeline.reapi.retry import Retrier, RetryPolicy
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.fakeserver import FakeCas, FakeCasServer

KiB = 1024
MiB = 1024 * 1024
LIMIT = 1 * MiB  # what the fake server reports as max_batch_total_size_bytes


class FakeClock:
    """A clock whose time only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


@dataclass
class Env:
    fake: FakeCas
    server: FakeCasServer
    client: CasClient
    clock: FakeClock
    local: LocalCas
    tmp: Path

    def other_local(self, name: str = "other") -> LocalCas:
        return LocalCas(self.tmp / name)


def blob(seed: int, size: int) -> bytes:
    """``size`` pseudo-random bytes (incompressible, distinct per seed)."""
    return random.Random(seed).randbytes(size)


@contextlib.contextmanager
def open_env(fake: FakeCas, tmp: Path, instance: str = "") -> Iterator[Env]:
    with FakeCasServer(fake) as server:
        clock = FakeClock()
        retrier = Retrier(RetryPolicy(max_attempts=5), clock=clock, rng=random.Random(1))
        with Remote(Endpoint(server.url, instance_name=instance), retrier=retrier) as remote:
            yield Env(fake, server, CasClient(remote), clock, LocalCas(tmp / "cas"), tmp)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with open_env(FakeCas(max_batch_total_size_bytes=LIMIT), tmp_path) as env:
        yield env


def make_tree(local: LocalCas) -> tuple[Digest, dict[str, bytes]]:
    """A small tree in ``local``: files at the root and two levels down, one large.

    Returns the root digest and the file contents by path.
    """
    files = {
        "a.txt": b"alpha\n",
        "sub/b.txt": b"bravo\n",
        "sub/deep/c.bin": blob(3, 2 * MiB),
        "sub/deep/d.txt": b"",
        "other/e.txt": b"echo\n",
    }
    for data in files.values():
        local.put(data)

    def node(name: str, data: bytes, executable: bool = False) -> re_pb2.FileNode:
        return re_pb2.FileNode(name=name, digest=digest_of(data), is_executable=executable)

    deep = re_pb2.Directory(
        files=[node("c.bin", files["sub/deep/c.bin"]), node("d.txt", b"")],
        symlinks=[re_pb2.SymlinkNode(name="link", target="c.bin")],
    )
    deep_d = local.put_message(deep)
    sub_d = local.put_message(
        re_pb2.Directory(
            files=[node("b.txt", files["sub/b.txt"], True)],
            directories=[re_pb2.DirectoryNode(name="deep", digest=deep_d)],
        )
    )
    other_d = local.put_message(re_pb2.Directory(files=[node("e.txt", files["other/e.txt"])]))
    root = local.put_message(
        re_pb2.Directory(
            files=[node("a.txt", files["a.txt"])],
            directories=[
                re_pb2.DirectoryNode(name="other", digest=other_d),
                re_pb2.DirectoryNode(name="sub", digest=sub_d),
            ],
        )
    )
    return root, files


# ------------------------------------------------------------------ finding


def test_find_missing_deduplicates_batches_and_never_reports_the_empty_blob(env: Env) -> None:
    # Given a server holding 3 of 25,000 distinct blobs
    digests = [digest_of(str(i).encode()) for i in range(25_000)]
    for i in (0, 5, 24_999):
        env.fake.put(str(i).encode())
    # When we ask about all of them, some twice, and the empty blob
    missing = env.client.find_missing([EMPTY_DIGEST, *digests, *digests[:100]])
    # Then the server is asked in batches of at most 10,000 distinct digests
    assert env.fake.find_missing_counts == [10_000, 10_000, 5_000]
    # And the answer is each missing digest once, in order, without the empty blob
    assert len(missing) == 25_000 - 3
    assert missing[0] == digests[1]
    assert EMPTY_DIGEST not in missing


def test_find_missing_of_nothing_makes_no_call(env: Env) -> None:
    assert env.client.find_missing([EMPTY_DIGEST]) == []
    assert env.fake.calls["FindMissingBlobs"] == 0


# ------------------------------------------------------------------ uploading


def test_small_blobs_are_batched_within_the_servers_limit(env: Env) -> None:
    # Given 60 blobs of 100 KiB and 300 of 1 KiB (about 6.2 MiB in all)
    datas = [blob(i, 100 * KiB) for i in range(60)] + [blob(1000 + i, KiB) for i in range(300)]
    digests = [env.local.put(d) for d in datas]
    # When they are uploaded
    stats = env.client.upload_missing(env.local, digests)
    # Then every BatchUpdateBlobs request fits the server's limit, framing
    # included, even less the client's safety margin
    effective = LIMIT - BATCH_OVERHEAD_MARGIN
    assert env.fake.batch_update_sizes
    assert max(env.fake.batch_update_sizes) <= effective
    # And the batches are well filled (not one blob per request)
    total = sum(len(d) for d in datas)
    assert len(env.fake.batch_update_sizes) <= total // (effective - 110 * KiB) + 1
    assert sum(env.fake.batch_update_counts) == len(datas)
    # And nothing went by ByteStream; the server has it all
    assert env.fake.calls["Write"] == 0
    assert all(env.fake.has(d) for d in digests)
    assert stats == UploadStats(blobs_sent=len(datas), bytes_sent=total, blobs_skipped=0)


def test_a_blob_just_over_the_limit_goes_by_bytestream(env: Env) -> None:
    effective = LIMIT - BATCH_OVERHEAD_MARGIN
    fits = env.local.put(blob(1, effective - ENTRY_FRAMING))
    too_big = env.local.put(blob(2, effective - ENTRY_FRAMING + 1))
    env.client.upload_missing(env.local, [fits, too_big])
    assert env.fake.batch_update_counts == [1]
    assert max(env.fake.batch_update_sizes) <= LIMIT
    assert [w.resource_name.rsplit("/", 2)[1] for w in env.fake.writes] == [too_big.hash]


@pytest.mark.parametrize("instance", ["", "main/ci"])
def test_large_blobs_go_by_bytestream_in_chunks(tmp_path: Path, instance: str) -> None:
    with open_env(FakeCas(max_batch_total_size_bytes=LIMIT), tmp_path, instance) as env:
        # Given a 3.5 MiB blob and a 1 MiB batch limit
        data = blob(7, 3 * MiB + MiB // 2)
        digest = env.local.put(data)
        # When it is uploaded
        stats = env.client.upload_missing(env.local, [digest])
        # Then one Write stream carried it in 1 MiB chunks, finishing on the last
        assert env.fake.calls["BatchUpdateBlobs"] == 0
        [write] = env.fake.writes
        prefix = f"{instance}/" if instance else ""
        pattern = rf"{re.escape(prefix)}uploads/[0-9a-f-]{{36}}/blobs/{digest.hash}/{len(data)}"
        assert re.fullmatch(pattern, write.resource_name), write.resource_name
        assert write.chunk_sizes == [MiB, MiB, MiB, MiB // 2]
        assert write.offsets == [0, MiB, 2 * MiB, 3 * MiB]
        assert write.finish_flags == [False, False, False, True]
        assert env.fake.has(digest)
        assert stats == UploadStats(blobs_sent=1, bytes_sent=len(data), blobs_skipped=0)


def test_a_broken_write_resumes_where_query_write_status_says(env: Env) -> None:
    # Given a server that breaks the first stream after 1.5 MiB
    env.fake.break_write_after = 3 * MiB // 2
    data = blob(8, 4 * MiB)
    digest = env.local.put(data)
    # When the blob is uploaded
    env.client.upload_missing(env.local, [digest])
    # Then a second stream on the same resource continued from the committed 2 MiB
    first, second = env.fake.writes
    assert second.resource_name == first.resource_name
    assert second.offsets[0] == 2 * MiB
    assert env.fake.calls["QueryWriteStatus"] == 1
    assert env.fake.has(digest)
    assert len(env.clock.sleeps) == 1


def test_a_broken_write_restarts_from_zero_without_query_write_status(tmp_path: Path) -> None:
    fake = FakeCas(max_batch_total_size_bytes=LIMIT, query_write_status=False)
    with open_env(fake, tmp_path) as env:
        fake.break_write_after = 3 * MiB // 2
        data = blob(9, 4 * MiB)
        digest = env.local.put(data)
        env.client.upload_missing(env.local, [digest])
        first, second = fake.writes
        # A fresh upload name: nothing is appended to the half-written one
        assert second.resource_name != first.resource_name
        assert second.offsets[0] == 0
        assert fake.has(digest)
        # A second broken stream does not ask again: the server said UNIMPLEMENTED
        fake.break_write_after = MiB
        other = env.local.put(blob(10, 2 * MiB))
        env.client.upload_from(env.local, [other])
        assert fake.calls["QueryWriteStatus"] == 1
        assert fake.has(other)


def test_an_upload_survives_two_unavailable_answers(env: Env) -> None:
    # Given a server that is UNAVAILABLE twice for each kind of upload
    env.fake.fail_next("BatchUpdateBlobs", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    env.fake.fail_next("Write", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    small = env.local.put(b"small blob")
    large = env.local.put(blob(11, 2 * MiB))
    # When we upload
    stats = env.client.upload_missing(env.local, [small, large])
    # Then both arrive after backing off (on the fake clock) twice each
    assert env.fake.has(small) and env.fake.has(large)
    assert env.fake.calls["BatchUpdateBlobs"] == 3
    assert env.fake.calls["Write"] == 3
    assert len(env.clock.sleeps) == 4
    assert stats.blobs_sent == 2


def test_a_transient_per_blob_status_resends_only_that_blob(env: Env) -> None:
    datas = [b"one", b"two", b"three"]
    digests = [env.local.put(d) for d in datas]
    env.fake.blob_faults[digests[1].hash].append(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    env.client.upload_missing(env.local, digests)
    assert env.fake.batch_update_counts == [3, 1]
    assert all(env.fake.has(d) for d in digests)


def test_a_permanent_per_blob_status_raises_a_permanent_remote_error(env: Env) -> None:
    digest = env.local.put(b"refused")
    env.fake.blob_faults[digest.hash].append(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    with pytest.raises(RemoteError) as info:
        env.client.upload_missing(env.local, [digest])
    assert info.value.code == "INVALID_ARGUMENT"
    assert not info.value.transient
    assert digest.hash in str(info.value)
    assert env.fake.calls["BatchUpdateBlobs"] == 1


def test_upload_missing_skips_what_the_server_has(env: Env) -> None:
    present = env.local.put(b"already there")
    env.fake.put(b"already there")
    absent = env.local.put(b"not yet")
    stats = env.client.upload_missing(env.local, [present, absent, absent, EMPTY_DIGEST])
    assert stats == UploadStats(blobs_sent=1, bytes_sent=len(b"not yet"), blobs_skipped=2)
    assert env.fake.batch_update_counts == [1]


def test_upload_tree_sends_every_directory_and_file(env: Env) -> None:
    root, _ = make_tree(env.local)
    stats = env.client.upload_tree(env.local, root)
    wanted = tree_digests(env.local, root)
    assert env.client.find_missing(wanted) == []
    assert stats.blobs_sent == len([d for d in wanted if d.size_bytes])
    # A second time, nothing is sent
    again = env.client.upload_tree(env.local, root)
    assert again.blobs_sent == 0


def test_upload_blob_and_message(env: Env) -> None:
    digest = env.client.upload_blob(b"in memory")
    assert env.fake.has(digest)
    big = blob(12, 2 * MiB)
    assert env.fake.has(env.client.upload_blob(big))
    message = re_pb2.Command(arguments=["sh", "-c", "true"])
    message_digest = env.client.upload_message(message)
    assert env.client.read_message(message_digest, re_pb2.Command) == message
    calls = sum(env.fake.calls.values())
    assert env.client.upload_blob(b"") == EMPTY_DIGEST
    assert sum(env.fake.calls.values()) == calls  # the empty blob costs no call


@pytest.mark.parametrize("size", [100, 2 * MiB], ids=["batch", "bytestream"])
def test_concurrent_uploads_of_one_blob_send_it_once(tmp_path: Path, size: int) -> None:
    # Given a slow server and 8 threads uploading the same blob at once
    fake = FakeCas(max_batch_total_size_bytes=LIMIT, call_delay=0.3)
    with open_env(fake, tmp_path) as env:
        digest = env.local.put(blob(13, size))
        barrier = threading.Barrier(8)
        results: list[UploadStats] = []
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                barrier.wait()
                results.append(env.client.upload_missing(env.local, [digest]))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=upload) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Then it was sent once; the others waited for that upload
        assert not errors
        assert fake.calls["BatchUpdateBlobs"] + fake.calls["Write"] == 1
        assert sum(r.blobs_sent for r in results) == 1
        assert fake.has(digest)


def test_a_blob_the_server_lost_is_uploaded_again(env: Env) -> None:
    # Given a blob uploaded a moment ago, then lost by the server (a restart)
    digest = env.local.put(b"lost")
    env.client.upload_missing(env.local, [digest])
    env.fake.blobs.clear()
    # When it is uploaded again, the recent upload does not hide the loss
    stats = env.client.upload_missing(env.local, [digest])
    assert stats.blobs_sent == 1
    assert env.fake.has(digest)


# ------------------------------------------------------------------ downloading


def test_download_into_fetches_only_what_is_missing_and_verifies(env: Env) -> None:
    small = [env.fake.put(blob(20 + i, 10 * KiB)) for i in range(50)]
    large = env.fake.put(blob(30, 3 * MiB))
    local = env.local
    local.put(blob(20, 10 * KiB))  # one is already here
    stats = env.client.download_into(local, [*small, large, EMPTY_DIGEST])
    assert stats == DownloadStats(
        blobs_fetched=50, bytes_fetched=49 * 10 * KiB + 3 * MiB, blobs_skipped=2
    )
    assert not local.missing([*small, large])
    assert local.get(large) == blob(30, 3 * MiB)
    assert env.fake.batch_read_counts == [49]
    [read] = env.fake.reads
    assert read.resource_name == f"blobs/{large.hash}/{large.size_bytes}"


@pytest.mark.parametrize("size", [100, 3 * MiB], ids=["batch", "bytestream"])
@pytest.mark.parametrize("wrong", ["same-size", "shorter", "longer"])
def test_wrong_bytes_from_the_server_raise_and_store_nothing(
    env: Env, size: int, wrong: str
) -> None:
    # Given a hostile server that answers with other bytes for a blob
    data = blob(40, size)
    digest = env.fake.put(data)
    env.fake.corrupt[digest.hash] = {
        "same-size": blob(41, size),
        "shorter": data[:-1],
        "longer": data + b"!",
    }[wrong]
    # When we download it, read it, or fetch it as part of a list
    for attempt in (
        lambda: env.client.download_into(env.local, [digest]),
        lambda: env.client.read_blob(digest),
    ):
        with pytest.raises(DigestMismatchError) as info:
            attempt()
        # Then the error names the blob and the server, and is permanent
        assert digest.hash in str(info.value)
        assert env.server.url in str(info.value)
        assert not info.value.transient
    # And the local CAS does not have it (not even under another name)
    assert not env.local.contains(digest)
    assert not env.local.contains(digest_of(env.fake.corrupt[digest.hash]))
    assert list((env.local.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("size", [100, 3 * MiB], ids=["batch", "bytestream"])
def test_a_blob_the_server_lacks_raises_blob_not_found(env: Env, size: int) -> None:
    digest = digest_of(blob(50, size))
    with pytest.raises(BlobNotFoundError) as info:
        env.client.download_into(env.local, [digest])
    assert digest.hash in str(info.value)
    assert not info.value.transient
    with pytest.raises(BlobNotFoundError):
        env.client.read_blob(digest)


def test_a_broken_read_stream_resumes_at_its_offset(env: Env) -> None:
    data = blob(60, 3 * MiB)
    digest = env.fake.put(data)
    env.fake.fail_next("Read", grpc.StatusCode.UNAVAILABLE)
    assert env.client.read_blob(digest) == data
    assert len(env.clock.sleeps) == 1


def test_download_survives_unavailable_batches(env: Env) -> None:
    digest = env.fake.put(b"flaky")
    env.fake.fail_next("BatchReadBlobs", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    env.client.download_into(env.local, [digest])
    assert env.local.get(digest) == b"flaky"
    assert env.fake.calls["BatchReadBlobs"] == 3


# ------------------------------------------------------------------ trees


def test_fetch_tree_round_trip_through_paged_get_tree(env: Env) -> None:
    # Given a tree on the server whose GetTree answer comes one page per call
    root, files = make_tree(env.local)
    env.client.upload_tree(env.local, root)
    directories = env.client.get_tree(root)
    env.fake.tree_pages[root.hash] = [[d] for d in directories]
    env.fake.pages_per_call = 1
    # When it is fetched into an empty local CAS
    other = env.other_local()
    count = env.client.fetch_tree(other, root)
    # Then every page was asked for with the previous page's token
    assert env.fake.get_tree_tokens[-4:] == ["", "1", "2", "3"]
    # And the whole tree is there, byte for byte
    wanted = tree_digests(env.local, root)
    assert not other.missing(wanted)
    assert count == len([d for d in wanted if d.size_bytes])
    for data in files.values():
        assert other.get(digest_of(data)) == data
    # And fetching again fetches nothing
    calls = sum(env.fake.calls.values())
    assert env.client.fetch_tree(other, root) == 0
    assert sum(env.fake.calls.values()) == calls


def test_get_tree_returns_the_root_first_and_each_directory_once(env: Env) -> None:
    root, _ = make_tree(env.local)
    env.client.upload_tree(env.local, root)
    directories = env.client.get_tree(root)
    assert digest_of(directories[0].SerializeToString(deterministic=True)) == root
    assert len(directories) == 4


def test_fetch_tree_without_get_tree_walks_the_tree_by_blobs(tmp_path: Path) -> None:
    with open_env(FakeCas(max_batch_total_size_bytes=LIMIT, get_tree=False), tmp_path) as env:
        root, _ = make_tree(env.local)
        env.client.upload_tree(env.local, root)
        other = env.other_local()
        env.client.fetch_tree(other, root)
        assert not other.missing(tree_digests(env.local, root))
        assert env.fake.calls["GetTree"] == 1


def test_directories_get_tree_leaves_out_are_read_as_blobs(env: Env) -> None:
    root, _ = make_tree(env.local)
    env.client.upload_tree(env.local, root)
    env.fake.tree_pages[root.hash] = [[env.local.get_message(root, re_pb2.Directory)]]
    other = env.other_local()
    env.client.fetch_tree(other, root)
    assert not other.missing(tree_digests(env.local, root))


def test_a_directory_the_server_lacks_raises_blob_not_found(env: Env) -> None:
    lost = digest_of(b"a directory nobody stored")
    root = env.fake.put_message(
        re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="gone", digest=lost)])
    )
    env.fake.tree_pages[root.hash] = [
        [re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="gone", digest=lost)])]
    ]
    with pytest.raises(BlobNotFoundError) as info:
        env.client.fetch_tree(env.other_local(), root)
    assert lost.hash in str(info.value)


def test_get_tree_of_a_missing_root_raises_blob_not_found(env: Env) -> None:
    root = digest_of(b"no such directory")
    with pytest.raises(BlobNotFoundError) as info:
        env.client.get_tree(root)
    assert root.hash in str(info.value)


@pytest.mark.parametrize("where", ["root", "child"])
@pytest.mark.parametrize("name", ["..", ".", "a/../../etc", ""])
def test_a_hostile_directory_is_refused_and_nothing_is_stored(
    env: Env, where: str, name: str
) -> None:
    # Given a server whose tree names a file with a path that could escape
    payload = env.fake.put(b"#!/bin/sh\necho owned\n")
    hostile = re_pb2.Directory(files=[re_pb2.FileNode(name=name, digest=payload)])
    hostile_d = env.fake.put_message(hostile)
    if where == "root":
        root = hostile_d
    else:
        root = env.fake.put_message(
            re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="ok", digest=hostile_d)])
        )
    # When we fetch the tree
    local = env.other_local()
    with pytest.raises((UnsafePathError, ProtocolError)):
        env.client.fetch_tree(local, root)
    # Then nothing of it was stored: not the directories, not the file
    for digest in (root, hostile_d, payload):
        assert not local.contains(digest)
    assert env.fake.calls["BatchReadBlobs"] == 0
    assert env.fake.calls["Read"] == 0


def test_a_get_tree_answer_with_foreign_directories_ignores_them(env: Env) -> None:
    # Directories the root does not reach are not returned (nor stored)
    root, _ = make_tree(env.local)
    env.client.upload_tree(env.local, root)
    stray = re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="x", target="/etc/passwd")])
    real = env.client.get_tree(root)
    env.fake.tree_pages[root.hash] = [[*real, stray]]
    assert env.client.get_tree(root) == real


def test_a_malformed_directory_from_the_server_is_a_protocol_error(env: Env) -> None:
    # Nodes out of order break the canonical form REAPI requires
    a, b = env.fake.put(b"a"), env.fake.put(b"b")
    root = env.fake.put_message(
        re_pb2.Directory(
            files=[re_pb2.FileNode(name="b", digest=b), re_pb2.FileNode(name="a", digest=a)]
        )
    )
    with pytest.raises(ProtocolError) as info:
        env.client.fetch_tree(env.other_local(), root)
    assert root.hash in str(info.value)
    assert env.server.url in str(info.value)


def test_the_empty_tree_needs_no_server(env: Env) -> None:
    assert env.client.get_tree(EMPTY_DIGEST) == [re_pb2.Directory()]
    assert env.client.fetch_tree(env.other_local(), EMPTY_DIGEST) == 0
    assert sum(env.fake.calls.values()) == 0


# ------------------------------------------------------------------ local failures


@pytest.mark.parametrize("size", [100, 2 * MiB], ids=["batch", "bytestream"])
def test_uploading_a_blob_the_local_cas_lacks_raises_local_blob_missing(
    env: Env, size: int
) -> None:
    absent = digest_of(blob(70, size))
    with pytest.raises(LocalBlobMissingError):
        env.client.upload_from(env.local, [absent])
    assert not env.fake.has(absent)


class FailingReader(io.BytesIO):
    """A file that fails after its first megabyte, like a disk error mid-read."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= MiB:
            raise OSError(5, "Input/output error")
        return super().read(size)


class FailingSource:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def get(self, digest: Digest) -> bytes:
        return self.data

    def open(self, digest: Digest) -> BinaryIO:
        return FailingReader(self.data)


def test_a_local_read_error_mid_stream_is_raised_as_itself(env: Env) -> None:
    # gRPC would turn it into CANCELLED; the caller must see the real cause
    data = blob(71, 3 * MiB)
    with pytest.raises(OSError, match="Input/output error"):
        env.client.upload_from(FailingSource(data), [digest_of(data)])
    # Not retried. (A loaded machine may cancel the call before the server's
    # handler ever runs, so the server counts 0 or 1.)
    assert env.fake.calls["Write"] <= 1
    assert not env.fake.has(digest_of(data))


def test_a_subtree_of_a_get_tree_answer_is_fetched_without_asking_again(env: Env) -> None:
    # Given a tree placed in a folder of a bigger tree, on the server
    inner, files = make_tree(env.local)
    outer = env.local.put_message(
        re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="files", digest=inner)])
    )
    env.client.upload_tree(env.local, outer)
    answer = env.client.read_tree(outer)
    calls = sum(env.fake.calls.values())
    # When the inner tree's folders are fetched from that answer
    other = env.other_local()
    env.client.fetch_directories(other, inner, within=answer)
    # Then nothing was asked, and the folders (not the files) are there
    assert sum(env.fake.calls.values()) == calls
    assert other.contains(inner) and not other.contains(outer)
    assert not any(other.contains(digest_of(data)) for data in files.values() if data)
    # And a whole fetch from it asks only for the files
    whole = env.other_local("whole")
    env.client.fetch_tree(whole, inner, within=answer)
    assert env.fake.calls["GetTree"] == 1 and not whole.missing(tree_digests(env.local, inner))


def test_a_tree_read_before_that_lacks_folders_is_completed_by_reading_them(env: Env) -> None:
    # Given a tree on the server, and one of its folders read as a tree
    root, _ = make_tree(env.local)
    env.client.upload_tree(env.local, root)
    top = env.local.get_message(root, re_pb2.Directory)
    sub = next(node.digest for node in top.directories if node.name == "sub")
    partial = env.client.read_tree(sub)
    # When the whole tree is fetched with it, then no GetTree is asked again:
    # the folders it lacks (the root, other/) are read as blobs
    other = env.other_local()
    env.client.fetch_tree(other, root, within=partial)
    assert env.fake.calls["GetTree"] == 1 and env.fake.calls["BatchReadBlobs"] >= 1
    assert not other.missing(tree_digests(env.local, root))


def test_upload_unless_recent_sends_without_asking_and_not_twice(env: Env) -> None:
    made = [env.local.put(b"made here"), env.local.put(b"and this")]
    # When blobs just made are sent
    stats = env.client.upload_unless_recent(env.local, [*made, EMPTY_DIGEST])
    # Then no FindMissingBlobs was made, and one batch sent both
    assert env.fake.calls["FindMissingBlobs"] == 0 and env.fake.batch_update_counts == [2]
    assert stats.blobs_sent == 2 and all(env.fake.has(d) for d in made)
    # And sending them again at once sends nothing
    assert env.client.upload_unless_recent(env.local, made).blobs_sent == 0
    assert env.fake.batch_update_counts == [2]
