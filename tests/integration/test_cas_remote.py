"""The remote CAS client against real servers: buildbox-casd and BuildGrid.

A tree of 2,000 small files and 3 files larger than the batch limit goes up
and comes back down into an empty local CAS, and must check out byte for byte
as it was imported. A casd killed and restarted in the middle of an upload
must not stop the upload.
"""

from __future__ import annotations

import os
import random
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cas.store import LocalCas
from pipeline.cas.tree import checkout, import_directory, tree_digests
from pipeline.digest import Digest, digest_of
from pipeline.errors import BlobNotFoundError
from pipeline.reapi.cas import CasClient, DownloadStats, UploadStats
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.reapi.retry import Retrier, RetryPolicy
from pipeline.servers import Server

MiB = 1024 * 1024
SMALL_FILES = 2_000
LARGE_FILE_SIZE = 6 * MiB


@pytest.fixture(params=["casd", "buildgrid"])
def server(request: pytest.FixtureRequest) -> Server:
    """Each test runs once against buildbox-casd and once against BuildGrid."""
    found: Server = request.getfixturevalue(request.param)
    return found


@pytest.fixture
def remote(server: Server) -> Iterator[Remote]:
    with Remote(Endpoint(server.url)) as connection:
        yield connection


def make_source_tree(folder: Path, seed: str) -> None:
    """2,000 small files in 40 folders (some executable, some symlinks, an empty
    file and an empty folder) and 3 large files; content unique to ``seed``."""
    rng = random.Random(seed)
    for i in range(SMALL_FILES):
        sub = folder / f"dir{i % 40:02d}" / ("nested" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"file{i:04d}.txt"
        path.write_bytes(f"{seed} {i}\n".encode() + rng.randbytes(rng.randrange(0, 4096)))
        if i % 7 == 0:
            path.chmod(0o755)
    (folder / "dir00" / "empty-file").write_bytes(b"")
    (folder / "empty-folder").mkdir()
    os.symlink("../dir01/file0001.txt", folder / "dir00" / "link")
    os.symlink("/does/not/exist", folder / "dangling")
    large = folder / "large"
    large.mkdir()
    for i in range(3):
        (large / f"blob{i}.bin").write_bytes(rng.randbytes(LARGE_FILE_SIZE))


def snapshot(folder: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under ``folder``: kind and content (files with their x bit)."""
    result: dict[str, tuple[str, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", "")
            else:
                kind = "exec" if st.st_mode & stat.S_IXUSR else "file"
                result[rel] = (kind, path.read_bytes())
    return result


@dataclass(frozen=True)
class SourceTree:
    folder: Path
    local: LocalCas
    root: Digest


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> SourceTree:
    """The tree both servers get, imported once (its content is new to them)."""
    base = tmp_path_factory.mktemp("source-tree")
    folder = base / "source"
    make_source_tree(folder, seed=uuid.uuid4().hex)
    local = LocalCas(base / "local")
    return SourceTree(folder, local, import_directory(local, folder))


def test_a_tree_goes_up_and_comes_back_byte_for_byte(
    remote: Remote, server: Server, source_tree: SourceTree, tmp_path: Path
) -> None:
    # Given a tree imported into a local CAS, unknown to the server
    source, local, root = source_tree.folder, source_tree.local, source_tree.root
    wanted = tree_digests(local, root)
    non_empty = [d for d in wanted if d.size_bytes]
    client = CasClient(remote)
    limit = remote.capabilities().max_batch_total_size_bytes
    assert limit < LARGE_FILE_SIZE

    # Then the server lacks all of it (but the empty blob)
    assert {_key(d) for d in client.find_missing(wanted)} == {_key(d) for d in non_empty}

    # When it is uploaded
    started = time.monotonic()
    stats = client.upload_tree(local, root)
    upload_s = time.monotonic() - started

    # Then everything was sent once and the server now has it all
    assert stats.blobs_sent == len(non_empty)
    assert stats.bytes_sent == sum(d.size_bytes for d in non_empty)
    assert client.find_missing(wanted) == []
    assert client.upload_tree(local, root) == UploadStats(0, 0, len(wanted))

    # And GetTree gives every directory, the root first
    directories = client.get_tree(root)
    assert digest_of(directories[0].SerializeToString(deterministic=True)) == root
    distinct_dirs = {_key(digest_of(d.SerializeToString(deterministic=True))) for d in directories}
    assert len(distinct_dirs) == len(directories) == 40 + 40 + 3  # root, dirNN, nested, ...

    # When the tree is fetched into an empty local CAS and checked out
    fresh = LocalCas(tmp_path / "fresh")
    started = time.monotonic()
    fetched = client.fetch_tree(fresh, root)
    download_s = time.monotonic() - started
    assert fetched == len(non_empty)
    out = tmp_path / "out"
    checkout(fresh, root, out)

    # Then it is the source, byte for byte (modes and symlinks included)
    assert snapshot(out) == snapshot(source)
    print(
        f"\n{server.name}: {len(wanted)} blobs, {stats.bytes_sent / MiB:.1f} MiB: "
        f"upload {upload_s:.2f} s, fetch {download_s:.2f} s"
    )


def test_large_and_small_blobs_are_read_back_verified(remote: Remote, tmp_path: Path) -> None:
    client = CasClient(remote)
    rng = random.Random(uuid.uuid4().hex)
    small = rng.randbytes(1000)
    large = rng.randbytes(LARGE_FILE_SIZE + 1)
    digests = [client.upload_blob(small), client.upload_blob(large)]
    assert client.find_missing(digests) == []
    assert client.read_blob(digests[0]) == small
    assert client.read_blob(digests[1]) == large
    local = LocalCas(tmp_path / "local")
    stats = client.download_into(local, digests)
    assert stats.blobs_fetched == 2
    assert local.get(digests[1]) == large


@pytest.mark.parametrize("size", [100, LARGE_FILE_SIZE], ids=["batch", "bytestream"])
def test_a_blob_the_server_lacks_is_blob_not_found(
    remote: Remote, tmp_path: Path, size: int
) -> None:
    client = CasClient(remote)
    absent = digest_of(random.Random(uuid.uuid4().hex).randbytes(size))
    local = LocalCas(tmp_path / "local")
    with pytest.raises(BlobNotFoundError) as info:
        client.download_into(local, [absent])
    assert absent.hash in str(info.value)
    assert not local.contains(absent)


def test_get_tree_of_an_unknown_root_is_blob_not_found(remote: Remote) -> None:
    client = CasClient(remote)
    absent = digest_of(uuid.uuid4().hex.encode())
    with pytest.raises(BlobNotFoundError):
        client.get_tree(absent)


# Bounded by the 60 s deadline, not by a count: with full jitter, 8 attempts
# (the default) may all be spent within the ~1.3 s casd is down here.
RESTART_POLICY = RetryPolicy(max_attempts=40, deadline=60.0)
BLOBS = 40


def run_across_a_restart(
    server: Server, work: Callable[[], object], started: Callable[[], bool]
) -> object:
    """Run ``work`` in a thread; once ``started()`` is true, SIGKILL the server and
    start it again on the same port 1 s later. Returns what ``work`` returned."""
    outcome: list[object] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not started():
        assert time.monotonic() < deadline, "the transfer did not start"
        time.sleep(0.01)
    assert thread.is_alive(), "the transfer finished before the server could be killed"
    server.kill()
    time.sleep(1.0)
    server.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the transfer hangs"
    if failure:
        raise AssertionError(f"the transfer failed: {failure[0]!r}") from failure[0]
    return outcome[0]


def test_an_upload_survives_a_casd_restart(fresh_casd: Server, tmp_path: Path) -> None:
    # Given 40 blobs of 4 MiB (each above the batch limit: ByteStream)
    local = LocalCas(tmp_path / "local")
    rng = random.Random(uuid.uuid4().hex)
    digests = [local.put(rng.randbytes(4 * MiB)) for _ in range(BLOBS)]
    with (
        Remote(Endpoint(fresh_casd.url), retrier=Retrier(RESTART_POLICY)) as uploader,
        Remote(Endpoint(fresh_casd.url), retrier=Retrier(RESTART_POLICY)) as observer,
    ):
        watcher = CasClient(observer)
        # When a thread uploads them, and casd is killed after the first ones
        # arrived and restarted 1 s later
        result = run_across_a_restart(
            fresh_casd,
            lambda: CasClient(uploader).upload_from(local, digests),
            lambda: len(watcher.find_missing(digests)) <= BLOBS - 2,
        )
        # Then the upload completed and casd has every blob
        assert isinstance(result, UploadStats)
        assert result.blobs_sent == BLOBS
        assert watcher.find_missing(digests) == []


def test_a_download_survives_a_casd_restart(fresh_casd: Server, tmp_path: Path) -> None:
    # Given 40 blobs of 4 MiB in casd
    source = LocalCas(tmp_path / "source")
    rng = random.Random(uuid.uuid4().hex)
    digests = [source.put(rng.randbytes(4 * MiB)) for _ in range(BLOBS)]
    with Remote(Endpoint(fresh_casd.url), retrier=Retrier(RESTART_POLICY)) as remote:
        client = CasClient(remote)
        client.upload_missing(source, digests)
        # When a thread downloads them into an empty local CAS, and casd is
        # killed after the first ones arrived and restarted 1 s later
        local = LocalCas(tmp_path / "local")
        result = run_across_a_restart(
            fresh_casd,
            lambda: client.download_into(local, digests),
            lambda: len(local.missing(digests)) <= BLOBS - 2,
        )
        # Then every blob arrived, verified
        assert isinstance(result, DownloadStats)
        assert result.blobs_fetched == BLOBS
        assert local.missing(digests) == []
        for digest in digests[:3]:
            assert local.get(digest, verify=True) == source.get(digest)


def _key(digest: Digest) -> tuple[str, int]:
    return (digest.hash, digest.size_bytes)
