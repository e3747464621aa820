"""The local CAS within its quota: LRU cleanup on write, pins of running stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.cas.quota import CLEANUP_TARGET
from pipeline.digest import Digest
from pipeline.stages.pins import pinned_stage
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
)

KB = 1024
QUOTA = 1000 * KB


def blob(n: int, size: int = 100 * KB) -> bytes:
    return n.to_bytes(4, "big") * (size // 4)


def age(cas: LocalCas, digest: Digest, seconds_ago: float) -> None:
    """Make an object look last used ``seconds_ago`` seconds ago."""
    when = time.time() - seconds_ago
    os.utime(cas.path(digest), (when, when))


def put_aged(cas: LocalCas, first: int, count: int, seconds_ago: float = 1000) -> list[Digest]:
    """Put ``count`` 100 KB blobs, the first the least recently used."""
    digests = [cas.put(blob(n)) for n in range(first, first + count)]
    for i, digest in enumerate(digests):
        age(cas, digest, seconds_ago - i)
    return digests


def make_tree(cas: LocalCas, salt: int) -> tuple[Digest, list[Digest]]:
    """A root with a file and a subfolder with a file: (root, every object)."""
    inner_file = cas.put(blob(salt * 10 + 1))
    inner = cas.put_message(Directory(files=[FileNode(name="b", digest=inner_file)]))
    top_file = cas.put(blob(salt * 10 + 2))
    root = cas.put_message(
        Directory(
            files=[FileNode(name="a", digest=top_file)],
            directories=[DirectoryNode(name="d", digest=inner)],
        )
    )
    return root, [root, inner, inner_file, top_file]


@pytest.fixture
def cas(tmp_path: Path) -> LocalCas:
    return LocalCas(tmp_path / "cas", quota_bytes=QUOTA, enforce_quota=True)


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of another live process."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def test_a_write_past_the_quota_removes_the_least_recently_used(cas: LocalCas) -> None:
    # Given a store with nine 100 KB blobs, each used less recently than the next
    digests = put_aged(cas, 0, 9)
    assert cas.cleanups == 0

    # When writes take it past its 1000 KB quota
    newer = [cas.put(blob(n)) for n in (100, 101)]

    # Then it was cleaned once, before the write, down to the cleanup
    # target (the two new blobs came on top), oldest first
    assert cas.cleanups == 1
    assert cas.size_bytes() <= QUOTA * CLEANUP_TARGET + 2 * 100 * KB
    kept = [d for d in digests if cas.contains(d)]
    assert kept == digests[len(digests) - len(kept) :]
    assert all(cas.contains(d) for d in newer)
    # And the counted usage is the real size again
    assert cas.usage_bytes() == cas.size_bytes()


def test_the_store_never_grows_much_past_its_quota(cas: LocalCas) -> None:
    # When 60 blobs of 100 KB are written under a 1000 KB quota
    peak = 0
    for n in range(60):
        cas.put(blob(n))
        peak = max(peak, cas.size_bytes())

    # Then the store never held more than the quota: room is made before a write
    assert peak <= QUOTA
    assert cas.cleanups >= 10


def test_without_enforcement_nothing_is_removed(tmp_path: Path) -> None:
    # Given a store with a quota that is not enforced (the CLI's)
    cas = LocalCas(tmp_path / "cas", quota_bytes=QUOTA)

    # When far more than the quota is written
    digests = [cas.put(blob(n)) for n in range(20)]

    # Then everything is kept until somebody calls cleanup
    assert all(cas.contains(d) for d in digests)


def test_a_pinned_tree_is_kept_whole_however_old(cas: LocalCas) -> None:
    # Given a tree, last used long ago, and a running stage that pinned it
    root, objects = make_tree(cas, 1)
    for digest in objects:
        age(cas, digest, 5000)
    with cas.pin() as pin:
        pin.add_tree(root)
        # When the store is filled far past its quota
        for n in range(30):
            cas.put(blob(100 + n))
        assert cas.cleanups > 0
        # Then every object of the tree is still there
        assert all(cas.contains(d) for d in objects)
    # And once the stage is done it is an ordinary, old, object again
    for n in range(15):
        cas.put(blob(200 + n))
    assert not any(cas.contains(d) for d in objects)


def test_what_a_running_stage_reads_or_writes_is_kept(cas: LocalCas) -> None:
    # Given old blobs, a running stage, and one old blob the stage reads
    old = put_aged(cas, 0, 5, seconds_ago=5000)
    with cas.pin():
        cas.get(old[0])
        written = [cas.put(blob(50 + n)) for n in range(3)]
        # When other work fills the store past its quota
        for n in range(20):
            cas.put(blob(100 + n))
        # Then what the stage read and wrote is still there; the rest went
        assert cas.contains(old[0])
        assert all(cas.contains(d) for d in written)
        assert not any(cas.contains(d) for d in old[1:])


def test_a_stage_state_pins_its_trees_and_blobs(cas: LocalCas) -> None:
    # Given a stage state naming an input root and a log, both old
    root, objects = make_tree(cas, 2)
    log = cas.put(b"the log\n")
    for digest in [*objects, log]:
        age(cas, digest, 5000)
    state = {"input_root": _json(root), "stdout": _json(log)}

    # When the stage runs while the store is filled past its quota
    with pinned_stage(cas, state):
        for n in range(30):
            cas.put(blob(100 + n))

        # Then the tree and the log are kept
        assert all(cas.contains(d) for d in [*objects, log])


def test_a_stage_pin_file_names_its_state_from_the_start(cas: LocalCas) -> None:
    # Given a stage state naming an input root and a log
    root, _ = make_tree(cas, 5)
    log = cas.put(b"another log\n")
    state = {"input_root": _json(root), "stdout": _json(log), "files": "not a digest"}

    # When the stage runs
    with pinned_stage(cas, state) as pin:
        # Then its pin file (what other processes' cleanups read) names both
        # from the start, after the header naming this process
        lines = pin.path.read_text().splitlines()
        assert lines[0].startswith("started ")
        assert lines[1:] == [f"T {root.hash} {root.size_bytes}", f"B {log.hash} {log.size_bytes}"]
        # and a digest added again is not written twice
        pin.add_tree(root)
        assert len(pin.path.read_text().splitlines()) == 3

    # Then the pin names nothing once the stage ends (its file is kept empty
    # for the next stage: creating a file costs more than rewriting one)
    assert pin.path.read_text() == ""
    with pinned_stage(cas, {"stdout": _json(log)}) as again:
        assert again.path == pin.path
        assert again.path.read_text().splitlines()[1:] == [f"B {log.hash} {log.size_bytes}"]


def test_a_kept_pin_file_removed_meanwhile_is_made_again(cas: LocalCas) -> None:
    # Given a pin file kept empty after a stage, then removed (the store's pins wiped)
    root, _ = make_tree(cas, 6)
    with pinned_stage(cas, {}) as pin:
        pass
    pin.path.unlink()

    # When the next stage pins a tree
    with pinned_stage(cas, {"input_root": _json(root)}) as again:
        # Then its pin is in a file of the pins folder
        assert again.path.exists()
        assert f"T {root.hash} {root.size_bytes}" in again.path.read_text()


def _json(digest: Digest) -> dict[str, object]:
    return {"hash": digest.hash, "size_bytes": digest.size_bytes}


def test_pins_of_another_live_process_are_honoured(cas: LocalCas, live_pid: int) -> None:
    # Given another process (sharing the store) running a stage that pinned a tree
    root, objects = make_tree(cas, 3)
    for digest in objects:
        age(cas, digest, 5000)
    pins = cas.root / "pins"
    pins.mkdir(exist_ok=True)
    (pins / f"{live_pid}-other-0").write_text(
        f"started {time.time()!r}\nT {root.hash} {root.size_bytes}\n"
    )

    # When this process fills the store past its quota
    for n in range(30):
        cas.put(blob(100 + n))

    # Then the other process's tree is kept
    assert cas.cleanups > 0
    assert all(cas.contains(d) for d in objects)


def test_pins_of_dead_processes_are_ignored_and_removed(cas: LocalCas) -> None:
    # Given a pin left by a process that died (its pid no longer runs)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root, objects = make_tree(cas, 4)
    for digest in objects:
        age(cas, digest, 5000)
    pins = cas.root / "pins"
    pins.mkdir(exist_ok=True)
    left = pins / f"{dead.pid}-dead-0"
    left.write_text(f"started {time.time()!r}\nT {root.hash} {root.size_bytes}\n")

    # When the store is filled past its quota
    for n in range(30):
        cas.put(blob(100 + n))

    # Then the dead pin kept nothing and is gone
    assert not any(cas.contains(d) for d in objects)
    assert not left.exists()


def test_two_stores_on_one_folder_share_the_count(tmp_path: Path) -> None:
    # Given two processes' views of one store (as two workers sharing cas.dir)
    one = LocalCas(tmp_path / "cas", quota_bytes=QUOTA, enforce_quota=True)
    two = LocalCas(tmp_path / "cas", quota_bytes=QUOTA, enforce_quota=True)

    # When they write in turns, each well below the quota on its own
    peak = 0
    for n in range(30):
        (one if n % 2 else two).put(blob(n))
        peak = max(peak, one.size_bytes())

    # Then together they kept the store within its quota
    assert peak <= QUOTA
    assert one.cleanups + two.cleanups > 0
    assert one.usage_bytes() == two.usage_bytes()


def test_an_object_touched_after_the_scan_is_not_removed(cas: LocalCas) -> None:
    # Given an old object, as a cleanup's scan saw it
    digest = put_aged(cas, 0, 1, seconds_ago=5000)[0]
    path = str(cas.path(digest))
    scanned = os.stat(path).st_mtime

    # When a reader uses it before the cleanup gets to removing it
    os.utime(path, None)

    # Then the cleanup leaves it
    assert not cas._remove_unless_used(path, scanned)
    assert cas.contains(digest)
    # While an object nobody touched is removed
    assert cas._remove_unless_used(path, time.time() + 10)
    assert not cas.contains(digest)


def test_a_store_wiped_under_a_worker_is_counted_again(cas: LocalCas) -> None:
    # Given a store that counted some writes, then was wiped (rm -rf)
    put_aged(cas, 0, 5)

    shutil.rmtree(cas.root)

    # When the worker writes again
    digest = cas.put(blob(99))

    # Then the write works and the count starts again from what is there
    assert cas.contains(digest)
    assert cas.usage_bytes() == cas.size_bytes()


def test_only_what_running_stages_use_is_kept_not_all_that_is_recent(cas: LocalCas) -> None:
    # Given a long stage running (pinned) while other stages come and go

    with cas.pin():
        mine = cas.put(blob(1))
        others: list[Digest] = []

        def other_stage(n: int) -> None:
            with cas.pin():
                others.append(cas.put(blob(100 + n)))

        # When other stages, in other threads, write far more than the quota
        for n in range(15):
            thread = threading.Thread(target=other_stage, args=(n,))
            thread.start()
            thread.join()

        # Then what the long stage wrote is kept, and the ended stages'
        # writes were removed though they are newer than its start
        assert cas.contains(mine)
        assert not all(cas.contains(d) for d in others)
        assert cas.size_bytes() <= QUOTA


def test_a_helper_thread_of_a_stage_counts_as_the_stage(cas: LocalCas) -> None:
    # Given a running stage whose download runs in a pool thread that does
    # not carry the stage's context

    old = put_aged(cas, 0, 3, seconds_ago=5000)
    with cas.pin():
        helper = threading.Thread(target=cas.get, args=(old[0],))
        helper.start()
        helper.join()
        # When the store is filled past its quota
        for n in range(20):
            cas.put(blob(100 + n))
        # Then what the helper read is kept (an unattributed use counts for
        # every running stage)
        assert cas.contains(old[0])
        assert not cas.contains(old[1])


def test_a_stage_holding_more_than_the_quota_does_not_rescan_on_every_write(
    cas: LocalCas,
) -> None:
    # Given a running stage that writes 2 MB under a 1000 KB quota (all of it kept)
    with cas.pin():
        written = [cas.put(blob(n)) for n in range(20)]
        # Then everything it wrote is kept, and the store was scanned again
        # only each time the count grew by another 20 % of the quota (the
        # cleanup slack), not on each of the 10 writes past the quota
        assert all(cas.contains(d) for d in written)
        assert 1 <= cas.cleanups <= 5
    # And once the stage ends the store is cleaned within its quota
    assert cas.size_bytes() <= QUOTA


def test_a_pin_whose_pid_now_runs_another_process_is_stale(cas: LocalCas) -> None:
    # Given a pin left by a process whose pid was reused (a restarted
    # container's worker gets the same small pid): same pid, other start time
    root, objects = make_tree(cas, 5)
    for digest in objects:
        age(cas, digest, 5000)
    pins = cas.root / "pins"
    pins.mkdir(exist_ok=True)
    left = pins / f"{os.getpid()}-old-0"
    left.write_text(f"started {time.time()!r} 1\nT {root.hash} {root.size_bytes}\n")

    # When the store is filled past its quota
    for n in range(30):
        cas.put(blob(100 + n))

    # Then the stale pin kept nothing and is gone
    assert not any(cas.contains(d) for d in objects)
    assert not left.exists()
