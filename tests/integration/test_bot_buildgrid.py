"""``remex bot`` processes against a real BuildGrid 0.4.4 (+ PostgreSQL).

Each test starts the bots it needs and stops them (SIGTERM: they tell the
server they are terminating) before the next test, so actions only reach the
bots meant for them. The SIGKILL test comes last: a killed bot stays
registered until its keepalive expires and could be handed later actions
(so does the test whose bot is SIGKILLed alone, leaving its casd).
(Bots cannot be told apart by platform here: buildbox-run refuses an ISA it
cannot run.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from pipeline.cas import LocalCas, checkout, import_directory, store_tree_message
from pipeline.elements.defaults import host_arch, host_os
from pipeline.errors import ExecutionError, MissingBlobsError
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.execution import ExecutionClient, Pending
from pipeline.reapi.remote import Remote
from pipeline.servers import BotProcess
from pipeline.servers.process import pid_alive
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

WRITE_OUTPUTS = (
    "mkdir -p out/sub && echo hello > out/sub/greeting && printf x > out/x "
    "&& ln -s sub/greeting out/link && echo done && echo oops >&2"
)
KEEPALIVE = 10.0  # bots_buildgrid's bot-session-keepalive-timeout


# --------------------------------------------------------------------------- helpers


class Grid:
    """A client's view of the BuildGrid: build, upload and execute actions."""

    def __init__(self, url: str, cas: LocalCas, sysroot: Path) -> None:
        self.remote = Remote(Endpoint(url))
        self.cas_client = CasClient(self.remote)
        self.execution = ExecutionClient(self.remote)
        self.local = cas
        self.root = import_directory(cas, sysroot)
        self.cas_client.upload_tree(cas, self.root)
        self.pool = ThreadPoolExecutor(8)

    def action(
        self,
        script: str,
        *,
        timeout: int = 0,
        root: re_pb2.Digest | None = None,
        properties: dict[str, str] | None = None,
    ) -> re_pb2.Digest:
        """An uploaded action running ``sh -c SCRIPT`` in the busybox sysroot
        (made unique, so the ActionCache never answers)."""
        command = re_pb2.Command(
            arguments=["sh", "-c", f": {uuid.uuid4()}; {script}"],
            environment_variables=[
                re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")
            ],
            output_paths=["out"],
        )
        wanted = {"ISA": host_arch(), "OSFamily": host_os(), **(properties or {})}
        platform = re_pb2.Platform(
            properties=[
                re_pb2.Platform.Property(name=name, value=value)
                for name, value in sorted(wanted.items())
            ]
        )
        action = re_pb2.Action(
            command_digest=self.local.put_message(command),
            input_root_digest=root or self.root,
            platform=platform,
        )
        if timeout:
            action.timeout.seconds = timeout
        digest = self.local.put_message(action)
        self.cas_client.upload_missing(self.local, [digest, action.command_digest])
        return digest

    def execute(self, action: re_pb2.Digest) -> re_pb2.ExecuteResponse:
        return self.execution.execute(action)

    def submit(self, action: re_pb2.Digest) -> Future[re_pb2.ExecuteResponse]:
        return self.pool.submit(self.execute, action)

    def blob(self, digest: re_pb2.Digest) -> bytes:
        return self.cas_client.read_blob(digest)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.remote.close()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; return when it became true (monotonic)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


def started_leases(bot: BotProcess) -> int:
    return bot.log_text().count(": started (")


@pytest.fixture(scope="module")
def grid(
    bots_buildgrid: Any, busybox_sysroot: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Grid]:
    client = Grid(
        bots_buildgrid.url, LocalCas(tmp_path_factory.mktemp("bot-client-cas")), busybox_sysroot
    )
    yield client
    client.close()


@pytest.fixture
def start_bot(bots_buildgrid: Any, tmp_path: Path) -> Iterator[Callable[..., BotProcess]]:
    """Start ``remex bot`` processes on the test's BuildGrid; all stopped after the test."""
    with ExitStack() as stack:

        def start(name: str, **options: Any) -> BotProcess:
            bot = BotProcess(
                tmp_path / name,
                remote=bots_buildgrid.url,
                bot_id=f"{name}-{uuid.uuid4().hex[:6]}",
                **options,
            )
            stack.callback(bot.close)
            return bot.start()

        yield start


@pytest.fixture
def two_bots(start_bot: Callable[..., BotProcess]) -> list[BotProcess]:
    """Two buildbox-run bots of capacity 2."""
    return [start_bot(name, capacity=2) for name in ("b1", "b2")]


@pytest.fixture
def one_bot(start_bot: Callable[..., BotProcess]) -> BotProcess:
    """One buildbox-run bot of capacity 1."""
    return start_bot("b")


# --------------------------------------------------------------------------- tests


def test_two_bots_run_actions_and_return_their_outputs(
    grid: Grid, two_bots: list[BotProcess], tmp_path: Path
) -> None:
    # Given two bots, and four actions writing files, logs and a symlink
    actions = [grid.action(f"sleep 1; {WRITE_OUTPUTS}") for _ in range(4)]
    # When they execute at once
    responses = [f.result(timeout=60) for f in [grid.submit(a) for a in actions]]
    # Then each succeeded, with its logs and its output directory
    for response in responses:
        result = response.result
        assert response.status.code == 0 and result.exit_code == 0
        assert grid.blob(result.stdout_digest) == b"done\n"
        assert grid.blob(result.stderr_digest) == b"oops\n"
        [out] = result.output_directories
        assert out.path == "out"
    # And both bots took a share, each named in the execution metadata
    workers = {r.result.execution_metadata.worker for r in responses}
    assert workers == {bot.bot_id for bot in two_bots}
    metadata = responses[0].result.execution_metadata
    assert metadata.execution_start_timestamp.ToNanoseconds() > 0
    assert metadata.worker_completed_timestamp.ToNanoseconds() > 0
    # And an output tree downloads, verified, and checks out with the files
    fresh = LocalCas(tmp_path / "fresh")
    tree = grid.cas_client.read_message(
        responses[0].result.output_directories[0].tree_digest, re_pb2.Tree
    )
    root = store_tree_message(fresh, tree)
    grid.cas_client.fetch_tree(fresh, root)
    checkout(fresh, root, tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "greeting").read_text() == "hello\n"
    assert (tmp_path / "out" / "x").read_bytes() == b"x"
    assert (tmp_path / "out" / "link").readlink() == Path("sub/greeting")


def test_a_command_exiting_3_reports_exit_code_3(grid: Grid, one_bot: BotProcess) -> None:
    # Given an action whose command fails
    action = grid.action("echo bad >&2; exit 3")
    # When it executes, then the result is a normal one carrying exit code 3
    response = grid.execute(action)
    assert response.status.code == 0
    assert response.result.exit_code == 3
    assert grid.blob(response.result.stderr_digest) == b"bad\n"


def test_unix_uid_and_gid_properties_run_the_command_as_that_user(
    grid: Grid, one_bot: BotProcess, tmp_path: Path
) -> None:
    # Given an action asking for uid 1234 / gid 4321 (what sandbox build-uid /
    # build-gid become), accepted by BuildGrid as wildcard properties
    action = grid.action(
        "mkdir -p out && id -u > out/uid && id -g > out/gid",
        properties={"unixUID": "1234", "unixGID": "4321"},
    )
    # When a buildbox-run bot runs it
    response = grid.execute(action)
    # Then the command ran as that user and group
    assert response.status.code == 0 and response.result.exit_code == 0, response
    fresh = LocalCas(tmp_path / "fresh")
    tree = grid.cas_client.read_message(
        response.result.output_directories[0].tree_digest, re_pb2.Tree
    )
    root = store_tree_message(fresh, tree)
    grid.cas_client.fetch_tree(fresh, root)
    checkout(fresh, root, tmp_path / "out")
    assert (tmp_path / "out" / "uid").read_text() == "1234\n"
    assert (tmp_path / "out" / "gid").read_text() == "4321\n"


def test_an_action_past_its_timeout_is_killed_and_reported(grid: Grid, one_bot: BotProcess) -> None:
    # Given an action that would sleep a minute, with a timeout of 1 s
    action = grid.action("echo started; sleep 60", timeout=1)
    started = time.monotonic()
    # When it executes
    with pytest.raises(ExecutionError) as info:
        grid.execute(action)
    # Then it is stopped at its timeout and reported DEADLINE_EXCEEDED, with its log
    assert time.monotonic() - started < 15
    assert info.value.code == "DEADLINE_EXCEEDED"
    response = info.value.response  # type: ignore[attr-defined]
    assert grid.blob(response.result.stdout_digest) == b"started\n"


def test_missing_inputs_are_reported_as_a_missing_precondition(
    grid: Grid, one_bot: BotProcess
) -> None:
    # Given an action whose input root was never uploaded
    root = grid.local.put_message(
        re_pb2.Directory(
            files=[re_pb2.FileNode(name="f", digest=grid.local.put(uuid.uuid4().bytes))]
        )
    )
    action = grid.action("true", root=root)
    # When it executes, then the client is told which blobs to upload
    with pytest.raises(MissingBlobsError) as info:
        grid.execute(action)
    assert any(root.hash in missing for missing in info.value.digests)


@pytest.mark.parametrize("stager", ["as found", "copy-or-link"])
def test_the_bots_local_cas_stages_inputs_with_one_mtime_and_keeps_them(
    grid: Grid,
    start_bot: Callable[..., BotProcess],
    busybox_sysroot: Path,
    tmp_path: Path,
    stager: str,
) -> None:
    # Given a bot with its local CAS (the default), staging through FUSE when
    # /dev/fuse opens, or by hardlinks and copies (a container without
    # /dev/fuse), and an input root with sources written at different times
    env = dict(os.environ)
    env.pop("BUILDBOX_STAGER", None)
    if stager != "as found":
        env["BUILDBOX_STAGER"] = stager
    bot = start_bot("b", env=env)
    folder = tmp_path / "root"
    shutil.copytree(busybox_sysroot, folder, symlinks=True)
    (folder / "src").mkdir()
    for index, name in enumerate(["configure.ac", "aclocal.m4", "config.h.in"]):
        (folder / "src" / name).write_text(f"{name} {uuid.uuid4()}\n")
        os.utime(folder / "src" / name, (1_000_000 + index * 3600, 1_000_000 + index * 3600))
    root = import_directory(grid.local, folder)
    grid.cas_client.upload_tree(grid.local, root)
    script = "stat -c '%y|%n' src/*"  # (to the nanosecond)
    # When two actions on that input root run
    first = grid.execute(grid.action(script, root=root))
    second = grid.execute(grid.action(script, root=root))
    # Then every input file is staged with one mtime (make sees no file as
    # newer than another because of download order)
    for response in (first, second):
        assert response.result.exit_code == 0, grid.blob(response.result.stderr_digest)
        lines = grid.blob(response.result.stdout_digest).decode().splitlines()
        assert len(lines) == 3 and len({line.split("|")[0] for line in lines}) == 1, lines
    # And the sources stay in the bot host's casd, for the next action
    source_blobs = [
        hashlib.sha256((folder / "src" / n).read_bytes()).hexdigest()
        for n in ("configure.ac", "aclocal.m4", "config.h.in")
    ]
    objects = bot.workdir / "work" / "casd" / "cas-root" / "cas" / "objects"
    assert all((objects / h[:2] / h[2:]).is_file() for h in source_blobs)
    assert "(local CAS unix:" in bot.log_text()
    if stager != "as found":
        assert f"(staging: {stager};" in bot.log_text()
    # And the casd stops with the bot
    casd_pid = int((bot.workdir / "work" / "casd" / "casd.pid").read_text())
    assert pid_alive(casd_pid)
    bot.stop()
    assert not pid_alive(casd_pid)
    assert not (bot.workdir / "work" / "casd" / "casd.pid").exists()


def test_the_host_runner_runs_actions_in_a_folder_of_the_input_root(
    grid: Grid, start_bot: Callable[..., BotProcess]
) -> None:
    # Given a bot with the host runner (no sandbox: the host's own sh runs)
    start_bot("host", runner="host")
    # When an action writing files, and one exiting 3, execute on it
    ok = grid.execute(grid.action(WRITE_OUTPUTS))
    failed = grid.execute(grid.action("echo bad >&2; exit 3"))
    # Then the outputs come back as from the sandbox, and the exit code too
    assert ok.result.exit_code == 0
    assert grid.blob(ok.result.stdout_digest) == b"done\n"
    [out] = ok.result.output_directories
    tree = grid.cas_client.read_message(out.tree_digest, re_pb2.Tree)
    names = {f.name for f in tree.root.files} | {s.name for s in tree.root.symlinks}
    assert names == {"x", "link"}
    assert failed.result.exit_code == 3
    assert grid.blob(failed.result.stderr_digest) == b"bad\n"


def test_capacity_n_runs_n_actions_at_once(
    grid: Grid, start_bot: Callable[..., BotProcess]
) -> None:
    # Given one bot of capacity 4
    bot = start_bot("wide", capacity=4)
    actions = [grid.action("sleep 2") for _ in range(4)]
    # When four actions of 2 s execute at once
    started = time.monotonic()
    responses = [f.result(timeout=60) for f in [grid.submit(a) for a in actions]]
    elapsed = time.monotonic() - started
    # Then they ran side by side: well under the 8 s they take one by one
    assert all(r.result.exit_code == 0 for r in responses)
    assert {r.result.execution_metadata.worker for r in responses} == {bot.bot_id}
    print(f"capacity 4: 4 x sleep 2 took {elapsed:.2f} s")
    assert elapsed < 5.0


def test_sigterm_gives_the_running_job_back_at_once(
    grid: Grid, start_bot: Callable[..., BotProcess]
) -> None:
    # Given two bots without grace, one of them running a 4 s action
    bots = [start_bot(name, grace=0) for name in ("t1", "t2")]
    future = grid.submit(grid.action("sleep 4; echo finished"))
    wait_for(lambda: any(started_leases(b) for b in bots), 30, "a bot to take the action")
    [leaving] = [b for b in bots if started_leases(b)]
    [staying] = [b for b in bots if b is not leaving]
    # When that bot gets SIGTERM
    signalled = time.monotonic()
    leaving.signal()
    # Then it exits at once, having given the job back and said it is terminating
    assert leaving.wait(10) == 0, leaving.log_tail()
    exited = time.monotonic() - signalled
    assert "giving it back" in leaving.log_text()
    # And the other bot runs the job without waiting for the keepalive
    moved = wait_for(lambda: started_leases(staying) > 0, 30, "the job to move") - signalled
    response = future.result(timeout=60)
    elapsed = time.monotonic() - signalled
    assert response.result.exit_code == 0
    assert response.result.execution_metadata.worker == staying.bot_id
    print(
        f"SIGTERM: bot exited after {exited:.2f} s, job restarted on the other bot "
        f"after {moved:.2f} s, done after {elapsed:.2f} s"
    )
    assert moved < KEEPALIVE / 2


def test_sigterm_with_grace_lets_the_running_job_finish(
    grid: Grid, start_bot: Callable[..., BotProcess]
) -> None:
    # Given a bot with a grace of 30 s running a 2 s action
    bot = start_bot("g1", grace=30)
    future = grid.submit(grid.action("sleep 2; echo finished"))
    wait_for(lambda: started_leases(bot) > 0, 30, "the bot to take the action")
    # When it gets SIGTERM
    bot.signal()
    # Then it finishes the job, reports it, and exits
    response = future.result(timeout=60)
    assert response.result.exit_code == 0
    assert response.result.execution_metadata.worker == bot.bot_id
    assert bot.wait(10) == 0, bot.log_tail()
    assert "ended" in bot.log_text()


def test_a_cancelled_operation_stops_its_run_on_the_bot(
    grid: Grid, start_bot: Callable[..., BotProcess]
) -> None:
    # Given a bot running a long action
    bot = start_bot("c1")
    action = grid.action("sleep 120")
    pending = grid.execution.run(action, max_wait=1.0)
    assert isinstance(pending, Pending)
    wait_for(lambda: started_leases(bot) > 0, 30, "the bot to take the action")
    # When the client cancels the operation
    cancelled = time.monotonic()
    grid.execution.cancel(pending.operation_name)
    # Then the bot kills the run and drops the lease within a long poll
    wait_for(lambda: "dropped (cancelled" in bot.log_text(), 15, "the bot to drop the lease")
    print(f"cancel: the bot dropped the lease after {time.monotonic() - cancelled:.2f} s")
    # And it takes new work afterwards
    response = grid.execute(grid.action("echo again"))
    assert grid.blob(response.result.stdout_digest) == b"again\n"


def test_a_job_of_a_killed_bot_is_requeued_and_the_other_bot_completes_it(
    grid: Grid, start_bot: Callable[..., BotProcess]
) -> None:
    # Given two bots, one of them running a 3 s action
    bots = [start_bot(name) for name in ("k1", "k2")]
    future = grid.submit(grid.action("sleep 3; echo finished"))
    wait_for(lambda: any(started_leases(b) for b in bots), 30, "a bot to take the action")
    [victim] = [b for b in bots if started_leases(b)]
    [survivor] = [b for b in bots if b is not victim]
    # When that bot is SIGKILLed mid-lease (with its runner)
    killed = time.monotonic()
    victim.kill()
    # Then the job is requeued once the bot's keepalive expires, and the other bot runs it
    response = future.result(timeout=60)
    elapsed = time.monotonic() - killed
    assert response.result.exit_code == 0
    assert grid.blob(response.result.stdout_digest) == b"finished\n"
    assert response.result.execution_metadata.worker == survivor.bot_id
    print(f"SIGKILL: the job completed on the other bot {elapsed:.2f} s after the kill")
    assert KEEPALIVE - 1 < elapsed < KEEPALIVE + 15


def test_a_casd_left_by_a_killed_bot_is_replaced_when_the_bot_starts_again(
    grid: Grid, bots_buildgrid: Any, tmp_path: Path
) -> None:
    # Given a bot SIGKILLed alone (its casd, in a session of its own, lives on)
    def bot_on(folder: Path) -> BotProcess:
        bot = BotProcess(folder, remote=bots_buildgrid.url, bot_id=f"k-{uuid.uuid4().hex[:6]}")
        return bot.start()

    first = bot_on(tmp_path / "bot")
    pid_file = first.workdir / "work" / "casd" / "casd.pid"
    leftover = int(pid_file.read_text())
    first.signal(signal.SIGKILL)
    assert first.wait(10) is not None and pid_alive(leftover)
    # When a bot starts again on the same folder
    second = bot_on(tmp_path / "bot")
    try:
        # Then the leftover casd is gone, and the new bot's own casd serves it
        assert not pid_alive(leftover)
        assert int(pid_file.read_text()) != leftover
        response = grid.execute(grid.action("echo again"))
        assert response.result.exit_code == 0
        assert grid.blob(response.result.stdout_digest) == b"again\n"
    finally:
        second.close()
        first.close()
