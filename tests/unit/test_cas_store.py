"""The local on-disk CAS: storing, reading, streaming, concurrency and LRU cleanup."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.digest import EMPTY_DIGEST, Digest, digest_of
from pipeline.errors import DigestMismatchError, LocalBlobMissingError, LocalCasError
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory, FileNode


@pytest.fixture
def cas(tmp_path: Path) -> LocalCas:
    return LocalCas(tmp_path / "cas")


def _objects_on_disk(cas: LocalCas) -> list[Path]:
    return sorted(p for p in (cas.root / "objects").rglob("*") if p.is_file())


def _temp_files(cas: LocalCas) -> list[Path]:
    return list((cas.root / "tmp").iterdir())


# --- put / get / contains -----------------------------------------------------


def test_put_then_get_returns_the_bytes(cas: LocalCas) -> None:
    # Given a blob
    data = b"hello, world\n"

    # When it is put
    digest = cas.put(data)

    # Then it is stored under its SHA-256, with two-character fan-out
    assert digest == digest_of(data)
    assert cas.contains(digest)
    assert cas.get(digest) == data
    assert cas.get(digest, verify=True) == data
    path = cas.path(digest)
    assert path == cas.root / "objects" / digest.hash[:2] / digest.hash[2:]
    assert path.read_bytes() == data
    with cas.open(digest) as f:
        assert f.read() == data
    assert _temp_files(cas) == []


def test_putting_the_same_blob_twice_keeps_one_object(cas: LocalCas) -> None:
    # Given a stored blob
    first = cas.put(b"same")

    # When it is put again
    second = cas.put(b"same")

    # Then there is one object for it (plus the empty blob)
    assert first == second
    assert cas.stats().objects == 2


def test_missing_blob_is_reported(cas: LocalCas) -> None:
    # Given a digest never stored
    absent = digest_of(b"absent")
    present = cas.put(b"present")

    # Then contains is False, missing lists it once, and reads raise
    assert not cas.contains(absent)
    assert cas.missing([present, absent, absent]) == [absent]
    with pytest.raises(LocalBlobMissingError):
        cas.get(absent)
    with pytest.raises(LocalBlobMissingError):
        cas.open(absent)
    with pytest.raises(LocalBlobMissingError):
        cas.path(absent)


def test_empty_blob_is_always_present(cas: LocalCas) -> None:
    # Given a fresh store
    # Then the empty blob is there without being put
    assert cas.contains(EMPTY_DIGEST)
    assert cas.get(EMPTY_DIGEST) == b""
    assert cas.path(EMPTY_DIGEST).read_bytes() == b""
    assert cas.missing([EMPTY_DIGEST]) == []


def test_digest_with_wrong_size_counts_as_missing(cas: LocalCas) -> None:
    # Given a stored blob and a digest with its hash but another size
    digest = cas.put(b"12345")
    wrong = Digest(hash=digest.hash, size_bytes=4)

    # Then the wrong digest is missing, and reading it raises
    assert not cas.contains(wrong)
    with pytest.raises(LocalBlobMissingError):
        cas.get(wrong)


@pytest.mark.parametrize("bad_hash", ["../../etc/passwd", "ABC", "g" * 64, "A" * 64, ""])
def test_malformed_digest_is_refused_before_touching_the_disk(cas: LocalCas, bad_hash: str) -> None:
    # Given a digest whose hash is not 64 lowercase hex digits
    digest = Digest(hash=bad_hash, size_bytes=1)

    # Then every call refuses it
    with pytest.raises(ValueError):
        cas.contains(digest)
    with pytest.raises(ValueError):
        cas.get(digest)


def test_messages_round_trip(cas: LocalCas) -> None:
    # Given a protobuf message
    message = Directory(files=[FileNode(name="a", digest=digest_of(b"a"))])

    # When it is stored and read back
    digest = cas.put_message(message)

    # Then it is the same message, stored under its deterministic serialization
    assert digest == digest_of(message.SerializeToString(deterministic=True))
    assert cas.get_message(digest, Directory) == message


def test_damaged_object_is_detected_and_removed(cas: LocalCas) -> None:
    # Given an object damaged on disk (same size, other bytes)
    digest = cas.put_message(Directory(files=[FileNode(name="a", digest=digest_of(b"a"))]))
    path = cas.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"x" * digest.size_bytes)

    # When it is read with verification by a reader that has not seen it (another
    # process: the writer remembers the bytes it wrote, see the memo tests below)
    reader = LocalCas(cas.root)
    # Then it is reported missing and removed, so it can be fetched again
    with pytest.raises(LocalBlobMissingError, match="damaged"):
        reader.get_message(digest, Directory)
    assert not cas.contains(digest)


def test_a_small_blob_written_is_read_again_from_memory(cas: LocalCas) -> None:
    # Given a small blob this store wrote, then damaged on disk
    digest = cas.put(b"small content")
    path = cas.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"x" * digest.size_bytes)

    # When it is read again through the same object
    # Then the bytes it wrote come back (no file read; the hash is known)
    assert cas.get(digest, verify=True) == b"small content"


def test_a_remembered_blob_gone_from_disk_is_missing(cas: LocalCas) -> None:
    # Given a small blob this store wrote and read, then removed from disk (a cleanup)
    digest = cas.put(b"evicted")
    assert cas.get(digest) == b"evicted"
    cas.path(digest).unlink()

    # When it is read again
    # Then it is missing, as the file is: memory does not outlive the store
    with pytest.raises(LocalBlobMissingError):
        cas.get(digest)


def test_a_verified_read_is_remembered(tmp_path: Path) -> None:
    # Given a blob written by another process's store, read verified once here
    digest = LocalCas(tmp_path / "cas").put(b"shared")
    reader = LocalCas(tmp_path / "cas")
    assert reader.get(digest, verify=True) == b"shared"

    # When its file is damaged afterwards
    path = reader.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"x" * digest.size_bytes)

    # Then the reader still answers the verified bytes it read
    assert reader.get(digest, verify=True) == b"shared"


def test_put_repairs_an_object_of_the_wrong_size(cas: LocalCas) -> None:
    # Given an object truncated on disk
    digest = cas.put(b"complete content")
    path = cas.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"compl")
    assert not cas.contains(digest)

    # When the content is put again
    cas.put(b"complete content")

    # Then the object is whole again
    assert cas.get(digest, verify=True) == b"complete content"


def test_put_verified_refuses_content_that_does_not_match(cas: LocalCas) -> None:
    # Given data and a digest of other data
    expected = digest_of(b"expected")

    # When the data is offered for that digest
    # Then it is refused and nothing is stored
    with pytest.raises(DigestMismatchError):
        cas.put_verified(b"something else", expected)
    assert cas.stats().objects == 1  # only the empty blob
    assert cas.put_verified(b"expected", expected) == expected
    assert cas.contains(expected)


def test_get_message_of_a_non_message_raises(cas: LocalCas) -> None:
    # Given a blob that is not a protobuf message
    digest = cas.put(b"\xff\xff\xff")

    # Then parsing it as one raises LocalCasError
    with pytest.raises(LocalCasError):
        cas.get_message(digest, Directory)


# --- put_file -----------------------------------------------------------------


def test_put_file_streams_a_big_file(cas: LocalCas, tmp_path: Path) -> None:
    # Given a 20 MiB file
    source = tmp_path / "big.bin"
    data = os.urandom(20 << 20)
    source.write_bytes(data)
    expected = digest_of(data)
    del data

    # When it is put, tracing Python allocations
    tracemalloc.start()
    try:
        digest = cas.put_file(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Then its digest and content are right, and it was never read whole
    assert digest == expected
    assert peak < 8 << 20
    with cas.open(digest) as f:
        hasher = hashlib.sha256()
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    assert hasher.hexdigest() == expected.hash
    assert _temp_files(cas) == []


def test_put_file_of_small_and_empty_files(cas: LocalCas, tmp_path: Path) -> None:
    # Given a small file and an empty file
    (tmp_path / "small").write_bytes(b"small")
    (tmp_path / "empty").write_bytes(b"")

    # Then both are stored
    assert cas.put_file(tmp_path / "small") == digest_of(b"small")
    assert cas.put_file(tmp_path / "empty") == EMPTY_DIGEST


def test_put_file_refuses_symlinks_and_fifos(cas: LocalCas, tmp_path: Path) -> None:
    # Given a symlink to a file, and a fifo
    (tmp_path / "target").write_bytes(b"t")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    os.mkfifo(tmp_path / "fifo")

    # Then neither is stored (and the fifo does not hang)
    with pytest.raises(LocalCasError, match="link"):
        cas.put_file(tmp_path / "link")
    with pytest.raises(LocalCasError, match="fifo"):
        cas.put_file(tmp_path / "fifo")


# --- blob_writer --------------------------------------------------------------


def test_blob_writer_commits_verified_content(cas: LocalCas) -> None:
    # Given a blob arriving in chunks
    data = os.urandom(3 << 20)
    expected = digest_of(data)

    # When it is streamed in
    with cas.blob_writer(expected) as writer:
        for start in range(0, len(data), 1 << 20):
            writer.write(data[start : start + (1 << 20)])

    # Then it is stored, and the writer knows its digest
    assert writer.digest == expected
    assert cas.get(expected) == data
    assert _temp_files(cas) == []


def test_blob_writer_without_expected_digest(cas: LocalCas) -> None:
    # Given no expected digest
    # When a blob is streamed in
    with cas.blob_writer() as writer:
        writer.write(b"abc")
        writer.write(memoryview(b"def"))

    # Then its digest is computed
    assert writer.digest == digest_of(b"abcdef")
    assert cas.get(digest_of(b"abcdef")) == b"abcdef"


def test_blob_writer_refuses_wrong_hash(cas: LocalCas) -> None:
    # Given a digest and content of the same size but other bytes
    expected = digest_of(b"right")

    # When the wrong content is streamed
    with pytest.raises(DigestMismatchError), cas.blob_writer(expected) as writer:
        writer.write(b"wrong")

    # Then nothing is left behind
    assert not cas.contains(expected)
    assert writer.digest is None
    assert _temp_files(cas) == []
    assert cas.stats().objects == 1


def test_blob_writer_refuses_short_content(cas: LocalCas) -> None:
    # Given content shorter than its digest says
    expected = digest_of(b"complete")

    # Then commit fails and nothing is left
    with pytest.raises(DigestMismatchError), cas.blob_writer(expected) as writer:
        writer.write(b"compl")
    assert not cas.contains(expected)
    assert _temp_files(cas) == []


def test_blob_writer_refuses_long_content_as_soon_as_it_arrives(cas: LocalCas) -> None:
    # Given content longer than its digest says
    expected = digest_of(b"short")

    # When too many bytes arrive
    # Then write itself raises, and nothing is left
    with pytest.raises(DigestMismatchError), cas.blob_writer(expected) as writer:
        writer.write(b"short")
        writer.write(b"!")
    assert _temp_files(cas) == []


def test_blob_writer_discards_on_exception(cas: LocalCas) -> None:
    # Given a download that fails midway
    data = b"x" * 1000
    expected = digest_of(data)

    # When the body raises
    with pytest.raises(RuntimeError), cas.blob_writer(expected) as writer:
        writer.write(data[:500])
        raise RuntimeError("connection lost")

    # Then nothing is stored and no temporary file is left
    assert not cas.contains(expected)
    assert _temp_files(cas) == []


# --- concurrency --------------------------------------------------------------

_SHARED_BLOB = bytes(range(256)) * 1024  # 256 KiB: many pages, so a torn write would show


def _put_many(root: str, count: int) -> str:
    cas = LocalCas(Path(root))
    digest = digest_of(_SHARED_BLOB)
    object_path = cas.root / "objects" / digest.hash[:2] / digest.hash[2:]
    for i in range(count):
        if i % 2:
            # Play a concurrent cleanup, so that puts really race to write the object.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(object_path)
        assert cas.put(_SHARED_BLOB) == digest
        cas.put(b"own %d %d" % (os.getpid(), i))
        try:
            data = cas.get(digest)
        except LocalBlobMissingError:
            continue  # removed again by another process: allowed, unlike a partial read
        # Readers never see a partial object.
        assert data == _SHARED_BLOB
    return "ok"


def test_concurrent_puts_of_the_same_blob_from_processes(tmp_path: Path) -> None:
    # Given a store shared by 4 processes
    root = tmp_path / "cas"
    LocalCas(root)
    digest = digest_of(_SHARED_BLOB)

    # When each puts the same blob 200 times (plus blobs of its own) and reads it
    # back, while removing it every other time
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_put_many, [(str(root), 200)] * 4)

    # Then all succeed, the object is intact, and no temporary file is left
    assert results == ["ok"] * 4
    cas = LocalCas(root)
    cas.put(_SHARED_BLOB)
    assert cas.get(digest, verify=True) == _SHARED_BLOB
    assert cas.stats().objects == 1 + 1 + 4 * 200
    assert _temp_files(cas) == []


def test_concurrent_puts_of_a_large_blob_from_processes(tmp_path: Path) -> None:
    # Given a 4 MiB file put through the streaming path by 4 processes at once
    root = tmp_path / "cas"
    source = tmp_path / "big"
    source.write_bytes(os.urandom(4 << 20))
    expected = digest_of(source.read_bytes())

    # When they all put it
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        digests = pool.starmap(_put_file_many, [(str(root), str(source), 10)] * 4)

    # Then every put returns the right digest and the object is intact
    assert digests == [expected.hash] * 4
    assert LocalCas(root).get(expected, verify=True) == source.read_bytes()


def _put_file_many(root: str, source: str, count: int) -> str:
    cas = LocalCas(Path(root))
    hashes = {cas.put_file(Path(source)).hash for _ in range(count)}
    assert len(hashes) == 1
    return hashes.pop()


def test_blob_removed_between_contains_and_get_raises_missing(cas: LocalCas) -> None:
    # Given a blob that a concurrent cleanup removes after contains() said yes
    digest = cas.put(b"short-lived")
    assert cas.contains(digest)
    os.unlink(cas.path(digest))

    # Then reads raise LocalBlobMissingError, not an OSError
    with pytest.raises(LocalBlobMissingError):
        cas.get(digest)
    with pytest.raises(LocalBlobMissingError):
        cas.open(digest)


# --- LRU cleanup --------------------------------------------------------------


def _age(cas: LocalCas, digest: Digest, seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    os.utime(cas.path(digest), (then, then))


def test_cleanup_removes_least_recently_used_first(cas: LocalCas) -> None:
    # Given three 1000-byte blobs last used 300, 200 and 100 seconds ago
    a, b, c = (cas.put(bytes([n]) * 1000) for n in (1, 2, 3))
    _age(cas, a, 300)
    _age(cas, b, 200)
    _age(cas, c, 100)

    # And the oldest one is read now (which refreshes its access time)
    cas.get(a)

    # When the store is cleaned to 2000 bytes
    stats = cas.cleanup(2000)

    # Then the least recently used blob (b) went, and the total fits
    assert not cas.contains(b)
    assert cas.contains(a)
    assert cas.contains(c)
    assert stats.removed_objects == 1
    assert stats.removed_bytes == 1000
    assert stats.remaining_bytes == 2000 == cas.size_bytes()


def test_cleanup_keeps_protected_blobs(cas: LocalCas) -> None:
    # Given three blobs, the oldest protected (a build in progress uses it)
    a, b, c = (cas.put(bytes([n]) * 1000) for n in (1, 2, 3))
    _age(cas, a, 300)
    _age(cas, b, 200)
    _age(cas, c, 100)

    # When the store is cleaned to 1000 bytes
    stats = cas.cleanup(1000, protect=[a])

    # Then the protected blob stays, the others go oldest first
    assert cas.contains(a)
    assert not cas.contains(b)
    assert not cas.contains(c)
    assert stats.remaining_bytes == 1000


def test_cleanup_uses_the_store_quota_and_keeps_the_empty_blob(tmp_path: Path) -> None:
    # Given a store with a quota of zero bytes
    cas = LocalCas(tmp_path / "cas", quota_bytes=0)
    cas.put(b"data")

    # When it is cleaned
    cas.cleanup()

    # Then only the empty blob is left
    assert cas.stats().bytes == 0
    assert cas.contains(EMPTY_DIGEST)


def test_cleanup_needs_a_quota(cas: LocalCas) -> None:
    with pytest.raises(ValueError):
        cas.cleanup()


def test_cleanup_removes_abandoned_temporary_files(cas: LocalCas) -> None:
    # Given a temporary file left by a crashed writer two hours ago, and a fresh one
    old = cas.root / "tmp" / "crashed"
    old.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    fresh = cas.root / "tmp" / "in-progress"
    fresh.write_bytes(b"partial")

    # When the store is cleaned
    stats = cas.cleanup(10**9)

    # Then only the abandoned one is removed
    assert stats.removed_temp_files == 1
    assert not old.exists()
    assert fresh.exists()


def test_reads_refresh_access_time_only_when_stale(cas: LocalCas) -> None:
    # Given a blob used 10 s ago and one used 10 minutes ago
    recent = cas.put(b"recent")
    stale = cas.put(b"stale")
    _age(cas, recent, 10)
    _age(cas, stale, 600)
    before = os.stat(cas.root / "objects" / recent.hash[:2] / recent.hash[2:]).st_mtime

    # When both are read
    cas.get(recent)
    cas.get(stale)

    # Then only the stale one was touched
    after = os.stat(cas.root / "objects" / recent.hash[:2] / recent.hash[2:]).st_mtime
    assert after == before
    stale_mtime = os.stat(cas.root / "objects" / stale.hash[:2] / stale.hash[2:]).st_mtime
    assert time.time() - stale_mtime < 60
