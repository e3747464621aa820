"""The host runner and the lease outcome mapping, against an in-process fake CAS.

The host runner runs real commands of this machine (sh, sleep) in a folder
holding the input root; its inputs come from, and its outputs go to, the fake
CAS of tests/fakeserver.py.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2

from bot import runners
from bot.errors import BadActionError, LeaseCancelled, MissingInputsError, RunnerError
from bot.lease import LeaseRunner
from bot.localcas import proxy_args
from bot.runners import BuildboxRunner, HostRunner, RunOutcome, RunRequest
from pipeline.cas import LocalCas, checkout, import_directory, store_tree_message
from pipeline.digest import digest_of, digest_to_str
from pipeline.errors import RemoteError
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.servers import pid_alive
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.fakeserver import FakeCasServer

PATH = re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")


@dataclass
class Setup:
    server: FakeCasServer
    cas: CasClient
    client_cas: LocalCas  # the client's side: inputs are made here and uploaded
    runner: HostRunner
    workdir: Path
    root: re_pb2.Digest

    def action(
        self,
        script: str,
        *,
        outputs: list[str] | None = None,
        timeout: int = 0,
        upload: bool = True,
        working_directory: str = "",
        legacy_outputs: tuple[list[str], list[str]] | None = None,
    ) -> re_pb2.Action:
        command = re_pb2.Command(
            arguments=["sh", "-c", script],
            environment_variables=[PATH],
            working_directory=working_directory,
        )
        if legacy_outputs is not None:
            command.output_files.extend(legacy_outputs[0])
            command.output_directories.extend(legacy_outputs[1])
        else:
            command.output_paths.extend(outputs or [])
        action = re_pb2.Action(
            command_digest=self.client_cas.put_message(command), input_root_digest=self.root
        )
        if timeout:
            action.timeout.seconds = timeout
        if upload:
            self.cas.upload_missing(self.client_cas, [action.command_digest])
        return action

    def run(self, action: re_pb2.Action, cancel: threading.Event | None = None) -> RunOutcome:
        run_dir = self.workdir / f"run-{time.monotonic_ns()}"
        run_dir.mkdir()
        return self.runner.run(RunRequest(action, run_dir, cancel or threading.Event()))

    def blob(self, digest: re_pb2.Digest) -> bytes:
        return self.cas.read_blob(digest)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    tree = tmp_path / "input"
    (tree / "src").mkdir(parents=True)
    (tree / "in.txt").write_text("input\n")
    (tree / "src" / "main.c").write_text("int main;\n")
    client_cas = LocalCas(tmp_path / "client-cas")
    root = import_directory(client_cas, tree)
    with FakeCasServer() as server, Remote(Endpoint(server.url)) as remote:
        cas = CasClient(remote)
        cas.upload_tree(client_cas, root)
        runner = HostRunner(cas, LocalCas(tmp_path / "bot-cas"))
        workdir = tmp_path / "runs"
        workdir.mkdir()
        yield Setup(server, cas, client_cas, runner, workdir, root)


def test_the_host_runner_runs_the_command_in_the_input_root_and_uploads_outputs(
    setup: Setup, tmp_path: Path
) -> None:
    # Given an action reading an input, writing a folder, a file and a symlink, exiting 3
    action = setup.action(
        "mkdir -p out/d && cat in.txt > out/d/copy && printf x > file "
        "&& ln -s d/copy out/link && echo done && echo oops >&2 && exit 3",
        outputs=["out", "file", "absent"],
    )
    # When the host runner runs it
    outcome = setup.run(action)
    result = outcome.result
    # Then the result carries the exit code and the logs, uploaded
    assert not outcome.timed_out and result.exit_code == 3
    assert setup.blob(result.stdout_digest) == b"done\n"
    assert setup.blob(result.stderr_digest) == b"oops\n"
    # And the outputs: a file, and a folder whose tree is in the CAS (absent ones are left out)
    [file] = result.output_files
    assert file.path == "file" and setup.blob(file.digest) == b"x"
    [out] = result.output_directories
    assert out.path == "out"
    fresh = LocalCas(tmp_path / "fresh")
    root = store_tree_message(fresh, setup.cas.read_message(out.tree_digest, re_pb2.Tree))
    assert root == out.root_directory_digest
    setup.cas.fetch_tree(fresh, root)
    checkout(fresh, root, tmp_path / "checkout")
    assert (tmp_path / "checkout" / "d" / "copy").read_text() == "input\n"
    assert (tmp_path / "checkout" / "link").readlink() == Path("d/copy")
    # And the timestamps of each phase are set, in order
    meta = result.execution_metadata
    stamps = [
        meta.input_fetch_start_timestamp,
        meta.input_fetch_completed_timestamp,
        meta.execution_start_timestamp,
        meta.execution_completed_timestamp,
        meta.output_upload_start_timestamp,
        meta.output_upload_completed_timestamp,
    ]
    assert [s.ToNanoseconds() for s in stamps] == sorted(s.ToNanoseconds() for s in stamps)
    assert stamps[0].ToNanoseconds() > 0


def test_the_host_runner_honours_the_working_directory_and_legacy_outputs(
    setup: Setup,
) -> None:
    # Given an action working in src/ with legacy output_files and output_directories
    action = setup.action(
        "cp main.c build/main.o && ln -s main.o build/alias && mkdir gen && touch gen/h",
        working_directory="src",
        legacy_outputs=(["build/main.o", "build/alias"], ["gen"]),
    )
    # When it runs (the parent folder of an output file is made for it)
    result = setup.run(action).result
    # Then outputs are found relative to the working directory
    assert result.exit_code == 0, setup.blob(result.stderr_digest)
    assert [f.path for f in result.output_files] == ["build/main.o"]
    assert [(s.path, s.target) for s in result.output_file_symlinks] == [("build/alias", "main.o")]
    assert [d.path for d in result.output_directories] == ["gen"]


def test_the_host_runner_kills_a_command_past_its_timeout(setup: Setup) -> None:
    # Given an action of a minute with a timeout of 1 s
    action = setup.action("echo started; exec sleep 60", timeout=1)
    started = time.monotonic()
    # When it runs, then it is killed at its timeout, and reported so, with its log
    outcome = setup.run(action)
    assert time.monotonic() - started < 5
    assert outcome.timed_out
    assert outcome.result.exit_code == 128 + 9
    assert setup.blob(outcome.result.stdout_digest) == b"started\n"


def test_the_host_runner_stops_when_the_lease_is_cancelled(setup: Setup) -> None:
    # Given a long action running
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    # When the lease is cancelled, then the run stops at once
    with pytest.raises(LeaseCancelled):
        setup.run(setup.action("sleep 60"), cancel)
    assert time.monotonic() - started < 5


def test_the_host_runner_names_missing_inputs(setup: Setup) -> None:
    # Given an action whose command was never uploaded
    action = setup.action("true", upload=False)
    # When it runs, then the missing blob is named
    with pytest.raises(MissingInputsError) as info:
        setup.run(action)
    assert info.value.digests == [digest_to_str(action.command_digest)]


@pytest.mark.parametrize("output", ["../escape", "/abs", "a/../../b"])
def test_the_host_runner_refuses_outputs_outside_the_input_root(setup: Setup, output: str) -> None:
    with pytest.raises(BadActionError):
        setup.run(setup.action("true", outputs=[output]))


def test_the_host_runner_refuses_outputs_through_a_symlink(setup: Setup) -> None:
    # Given a command that makes an output's parent a symlink to elsewhere
    action = setup.action("rmdir escape && ln -s / escape", outputs=["escape/etc"])
    # When it runs, then nothing is captured through the link
    with pytest.raises(BadActionError):
        setup.run(action)


def test_a_command_that_cannot_start_exits_127(setup: Setup) -> None:
    action = setup.action("true")
    command = re_pb2.Command(arguments=["/no/such/program"], environment_variables=[PATH])
    action.command_digest.CopyFrom(setup.cas.upload_message(command))
    result = setup.run(action).result
    assert result.exit_code == 127
    assert b"/no/such/program" in setup.blob(result.stderr_digest)


# --------------------------------------------------------------------------- outcomes


class ScriptedRunner:
    """A runner that returns or raises what the test says."""

    name = "scripted"

    def __init__(self, outcome: RunOutcome | Exception) -> None:
        self.outcome = outcome
        self.actions: list[re_pb2.Action] = []

    def run(self, request: RunRequest) -> RunOutcome:
        self.actions.append(request.action)
        assert request.workdir.is_dir()
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def _payload(message: re_pb2.Action | re_pb2.Digest) -> any_pb2.Any:
    payload = any_pb2.Any()
    payload.Pack(message)
    return payload


def _lease_runner(setup: Setup, outcome: RunOutcome | Exception) -> LeaseRunner:
    return LeaseRunner(
        ScriptedRunner(outcome), setup.cas, worker_name="bot-7", workdir=setup.workdir / "lr"
    )


def test_a_completed_run_is_reported_ok_with_the_worker_named(setup: Setup) -> None:
    result = re_pb2.ActionResult(exit_code=3)
    report = _lease_runner(setup, RunOutcome(result))(
        _payload(re_pb2.Action(salt=b"a")), threading.Event()
    )
    assert report.status.code == code_pb2.OK
    assert report.result is not None and report.result.exit_code == 3
    meta = report.result.execution_metadata
    assert meta.worker == "bot-7"
    assert meta.worker_completed_timestamp.ToNanoseconds() >= (
        meta.worker_start_timestamp.ToNanoseconds()
    )


def test_a_timed_out_run_is_reported_deadline_exceeded_with_its_result(setup: Setup) -> None:
    action = re_pb2.Action(salt=b"t")
    action.timeout.seconds = 5
    outcome = RunOutcome(re_pb2.ActionResult(exit_code=137), timed_out=True)
    report = _lease_runner(setup, outcome)(_payload(action), threading.Event())
    assert report.status.code == code_pb2.DEADLINE_EXCEEDED
    assert "5 s" in report.status.message
    assert report.result is not None and report.result.exit_code == 137


def test_missing_inputs_are_reported_as_a_missing_precondition(setup: Setup) -> None:
    missing = digest_to_str(digest_of(b"gone"))
    report = _lease_runner(setup, MissingInputsError([missing]))(
        _payload(re_pb2.Action()), threading.Event()
    )
    assert report.status.code == code_pb2.FAILED_PRECONDITION
    failure = error_details_pb2.PreconditionFailure()
    assert report.status.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [("MISSING", f"blobs/{missing}")]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RunnerError("buildbox-run crashed"), code_pb2.UNAVAILABLE),
        (RemoteError("CAS down", code="UNAVAILABLE", transient=True), code_pb2.UNAVAILABLE),
        (RemoteError("refused", code="PERMISSION_DENIED", transient=False), code_pb2.INTERNAL),
        (OSError("disk full"), code_pb2.INTERNAL),
        (BadActionError("bad output path"), code_pb2.INVALID_ARGUMENT),
    ],
)
def test_a_failure_of_the_bot_is_reported_with_a_status_saying_so(
    setup: Setup, error: Exception, code: int
) -> None:
    report = _lease_runner(setup, error)(_payload(re_pb2.Action()), threading.Event())
    assert report.status.code == code
    assert report.result is None
    assert str(error) in report.status.message


def test_cancellation_is_left_to_the_caller(setup: Setup) -> None:
    with pytest.raises(LeaseCancelled):
        _lease_runner(setup, LeaseCancelled("stop"))(_payload(re_pb2.Action()), threading.Event())


def test_an_action_sent_by_digest_is_read_from_the_cas(setup: Setup) -> None:
    # Given a lease whose payload is the digest of an Action in the CAS
    action = re_pb2.Action(salt=b"by digest")
    digest = setup.cas.upload_message(action)
    runner = ScriptedRunner(RunOutcome(re_pb2.ActionResult()))
    lease_runner = LeaseRunner(runner, setup.cas, worker_name="b", workdir=setup.workdir / "d")
    # When it runs, then the runner gets that Action
    assert lease_runner(_payload(digest), threading.Event()).status.code == code_pb2.OK
    assert runner.actions == [action]
    # And an Action missing from the CAS is a missing input
    gone = digest_of(b"no such action")
    report = lease_runner(_payload(gone), threading.Event())
    assert report.status.code == code_pb2.FAILED_PRECONDITION


def test_buildbox_run_gets_the_server_in_its_own_url_form(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    endpoint = Endpoint("grpc://127.0.0.1:1234", instance_name="main", token_file=token)
    runner = BuildboxRunner("/opt/buildbox-run", endpoint, CasClient.__new__(CasClient))
    args = runner.command_line(tmp_path / "a", tmp_path / "r")
    assert args[0] == "/opt/buildbox-run"
    assert "--remote=http://127.0.0.1:1234" in args
    assert "--instance=main" in args and "--disable-localcas" in args
    assert f"--access-token={token}" in args
    assert f"--action={tmp_path / 'a'}" in args and f"--action-result={tmp_path / 'r'}" in args


def test_with_the_bots_local_cas_buildbox_run_talks_to_casd_alone(tmp_path: Path) -> None:
    # Given a server with an instance, TLS files and a token, and the bot's casd
    token = tmp_path / "token"
    token.write_text("t")
    endpoint = Endpoint(
        "grpcs://grid.example:1234",
        instance_name="main",
        server_ca=tmp_path / "ca.pem",
        client_cert=tmp_path / "c.pem",
        client_key=tmp_path / "k.pem",
        token_file=token,
    )
    runner = BuildboxRunner(
        "/opt/buildbox-run",
        endpoint,
        CasClient.__new__(CasClient),
        local_cas="unix:/tmp/remex-bot-casd-x/casd.sock",
    )
    # When its command line is made
    args = runner.command_line(tmp_path / "a", tmp_path / "r")
    # Then buildbox-run stages through casd (LocalCAS) and names nothing of the server
    assert "--remote=unix:/tmp/remex-bot-casd-x/casd.sock" in args
    assert "--disable-localcas" not in args
    assert not [a for a in args if "grid.example" in a or a.endswith("=main")]
    assert not [a for a in args if a.startswith(("--instance", "--access-token", "--server-cert"))]
    # And the casd proxies the server with all of them
    proxy = proxy_args(endpoint)
    assert proxy == [
        "--cas-remote=https://grid.example:1234",
        "--cas-instance=main",
        f"--cas-server-cert={tmp_path / 'ca.pem'}",
        f"--cas-client-cert={tmp_path / 'c.pem'}",
        f"--cas-client-key={tmp_path / 'k.pem'}",
        f"--cas-access-token={token}",
    ]


# --------------------------------------------------------------------------- buildbox-run


def _fake_buildbox_run(tmp_path: Path, body: str) -> str:
    """A stand-in for buildbox-run: a shell script; ``$RESULT`` is its --action-result."""
    script = tmp_path / "fake-buildbox-run"
    script.write_text(
        "#!/bin/sh\n"
        'for arg; do case "$arg" in --action-result=*) RESULT="${arg#*=}";; esac; done\n' + body
    )
    script.chmod(0o755)
    return str(script)


def _buildbox(setup: Setup, tmp_path: Path, body: str) -> BuildboxRunner:
    endpoint = Endpoint(setup.server.url)
    return BuildboxRunner(_fake_buildbox_run(tmp_path, body), endpoint, setup.cas)


def _run(
    runner: BuildboxRunner,
    setup: Setup,
    action: re_pb2.Action,
    cancel: threading.Event | None = None,
) -> RunOutcome:
    run_dir = setup.workdir / f"bb-{time.monotonic_ns()}"
    run_dir.mkdir()
    return runner.run(RunRequest(action, run_dir, cancel or threading.Event()))


def test_buildbox_run_results_are_read_from_its_result_file(setup: Setup, tmp_path: Path) -> None:
    # Given a buildbox-run that writes an ActionResult with exit code 3
    written = tmp_path / "result.bin"
    written.write_bytes(re_pb2.ActionResult(exit_code=3).SerializeToString())
    runner = _buildbox(setup, tmp_path, f'cp {written} "$RESULT"\n')
    # When it runs an action, then its result is the runner's
    outcome = _run(runner, setup, setup.action("true"))
    assert outcome.result.exit_code == 3 and not outcome.timed_out


def test_buildbox_run_exit_142_is_a_timeout(setup: Setup, tmp_path: Path) -> None:
    # Given a buildbox-run that stopped the command at its timeout (exit 142)
    written = tmp_path / "result.bin"
    written.write_bytes(re_pb2.ActionResult(exit_code=137).SerializeToString())
    runner = _buildbox(setup, tmp_path, f'cp {written} "$RESULT"\nexit 142\n')
    # Then the outcome is a timeout, with the partial result
    outcome = _run(runner, setup, setup.action("true", timeout=1))
    assert outcome.timed_out and outcome.result.exit_code == 137


def test_a_crashing_buildbox_run_is_a_runner_error(setup: Setup, tmp_path: Path) -> None:
    runner = _buildbox(setup, tmp_path, "echo 'segfault' >&2\nexit 139\n")
    with pytest.raises(RunnerError, match="segfault"):
        _run(runner, setup, setup.action("true"))


def test_buildbox_run_refusing_the_platform_is_a_bad_action(setup: Setup, tmp_path: Path) -> None:
    runner = _buildbox(
        setup, tmp_path, 'echo \'errMsg = "Unsupported ISA "pdp-11""\' >&2\nexit 1\n'
    )
    with pytest.raises(BadActionError, match="Unsupported ISA"):
        _run(runner, setup, setup.action("true"))


def test_buildbox_run_failing_on_missing_inputs_names_them(setup: Setup, tmp_path: Path) -> None:
    runner = _buildbox(setup, tmp_path, "echo 'Blob not found' >&2\nexit 1\n")
    action = setup.action("true", upload=False)
    with pytest.raises(MissingInputsError) as info:
        _run(runner, setup, action)
    assert info.value.digests == [digest_to_str(action.command_digest)]


def test_a_cancelled_buildbox_run_is_killed_with_its_children(setup: Setup, tmp_path: Path) -> None:
    # Given a buildbox-run whose command (a child) runs for a minute
    pid_file = tmp_path / "child.pid"
    runner = _buildbox(setup, tmp_path, f"sleep 60 &\necho $! > {pid_file}\nwait\n")
    cancel = threading.Event()

    def cancel_once_running() -> None:
        # Cancel once the child runs (a fixed delay raced a loaded machine).
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        cancel.set()

    threading.Thread(target=cancel_once_running, daemon=True).start()
    # When the lease is cancelled, then the run stops, and the child is gone too
    with pytest.raises(LeaseCancelled):
        _run(runner, setup, setup.action("true"), cancel)
    child = int(pid_file.read_text())
    assert not pid_alive(child)


# --------------------------------------------------------------------------- waiting for a run


def test_a_run_that_exits_is_seen_at_once_not_at_the_next_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With a pidfd the exit wakes the wait: a poll interval far longer than
    # the command shows it is not what ends the wait.
    monkeypatch.setattr(runners, "POLL_INTERVAL", 30.0)
    proc = subprocess.Popen(["sleep", "0.1"], start_new_session=True)
    began = time.monotonic()
    how = runners._wait(proc, threading.Event(), None)
    assert how == "exited"
    assert time.monotonic() - began < 10.0
    assert proc.returncode == 0


def test_without_a_pidfd_a_run_is_polled_to_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runners, "_open_pidfd", lambda pid: None)
    proc = subprocess.Popen(["sh", "-c", "exit 3"], start_new_session=True)
    assert runners._wait(proc, threading.Event(), None) == "exited"
    assert proc.returncode == 3


def test_a_cancelled_wait_kills_the_run_even_with_a_pidfd() -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    began = time.monotonic()
    assert runners._wait(proc, cancel, None) == "cancelled"
    assert time.monotonic() - began < 30.0
    assert proc.returncode is not None
