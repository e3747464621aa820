"""Execution, ActionCache and Remote Asset against real servers."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pipeline.cas import LocalCas, checkout, import_directory, store_tree_message
from pipeline.digest import digest_of
from pipeline.errors import RemoteError
from pipeline.reapi.action_cache import ActionCacheClient
from pipeline.reapi.asset import AssetClient
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.execution import ExecutionClient
from pipeline.reapi.remote import Remote
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

SCRIPT = (
    "mkdir -p out/sub && echo hello > out/sub/greeting && printf x > out/x "
    "&& ln -s sub/greeting out/link && echo done && echo oops >&2"
)


def make_action(
    cas: LocalCas, sysroot_root: re_pb2.Digest, script: str, *, do_not_cache: bool = False
) -> re_pb2.Digest:
    command = re_pb2.Command(
        arguments=["sh", "-c", script],
        environment_variables=[
            re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")
        ],
        output_paths=["out"],
    )
    command_digest = cas.put_message(command)
    action = re_pb2.Action(
        command_digest=command_digest, input_root_digest=sysroot_root, do_not_cache=do_not_cache
    )
    return cas.put_message(action)


@pytest.fixture
def local_cas(tmp_path: Path) -> LocalCas:
    return LocalCas(tmp_path / "local-cas")


def upload_action(
    client: CasClient, cas: LocalCas, root: re_pb2.Digest, action: re_pb2.Digest
) -> None:
    client.upload_tree(cas, root)
    action_message = cas.get_message(action, re_pb2.Action)
    client.upload_missing(cas, [action, action_message.command_digest])


def test_execute_in_a_busybox_sysroot_and_download_outputs(
    casd: Any, busybox_sysroot: Path, local_cas: LocalCas, tmp_path: Path
) -> None:
    # Given a busybox sysroot and an action writing files, uploaded to buildbox-casd
    root = import_directory(local_cas, busybox_sysroot)
    action = make_action(local_cas, root, SCRIPT + f" && echo {uuid.uuid4()} > out/nonce")
    with Remote(Endpoint(casd.url)) as remote:
        cas_client = CasClient(remote)
        upload_action(cas_client, local_cas, root, action)
        # When it executes remotely
        response = ExecutionClient(remote).execute(action)
        result = response.result
        # Then it succeeded with its output directory and its logs
        assert result.exit_code == 0
        assert not response.cached_result
        [out] = result.output_directories
        assert out.path == "out"
        stdout = result.stdout_raw or cas_client.read_blob(result.stdout_digest)
        stderr = result.stderr_raw or cas_client.read_blob(result.stderr_digest)
        assert stdout == b"done\n" and stderr == b"oops\n"
        # And the output tree downloads, verified, into a fresh local CAS and checks out
        fresh = LocalCas(tmp_path / "fresh-cas")
        tree = cas_client.read_message(out.tree_digest, re_pb2.Tree)
        out_root = store_tree_message(fresh, tree)
        cas_client.fetch_tree(fresh, out_root)
        checkout(fresh, out_root, tmp_path / "checkout")
        got = tmp_path / "checkout"
        assert (got / "sub" / "greeting").read_text() == "hello\n"
        assert (got / "x").read_bytes() == b"x"
        assert (got / "link").is_symlink() and str((got / "link").readlink()) == "sub/greeting"

        # When the same action executes again, it is answered from the ActionCache
        again = ExecutionClient(remote).execute(action)
        assert again.cached_result and again.result.output_directories[0] == out
        # And skip_cache_lookup runs it anyway
        forced = ExecutionClient(remote).execute(action, skip_cache_lookup=True)
        assert not forced.cached_result and forced.result.exit_code == 0


def test_a_failing_command_reports_its_exit_code(
    casd: Any, busybox_sysroot: Path, local_cas: LocalCas
) -> None:
    root = import_directory(local_cas, busybox_sysroot)
    action = make_action(local_cas, root, f"echo {uuid.uuid4()}; echo bad >&2; exit 3")
    with Remote(Endpoint(casd.url)) as remote:
        cas_client = CasClient(remote)
        upload_action(cas_client, local_cas, root, action)
        result = ExecutionClient(remote).execute(action).result
        assert result.exit_code == 3
        stderr = result.stderr_raw or cas_client.read_blob(result.stderr_digest)
        assert stderr == b"bad\n"


def test_execute_with_missing_inputs_names_them(casd: Any, local_cas: LocalCas) -> None:
    # Given an action whose input root was never uploaded
    missing_root = local_cas.put_message(
        re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=digest_of(uuid.uuid4().bytes))])
    )
    action = make_action(local_cas, missing_root, "true")
    with Remote(Endpoint(casd.url)) as remote:
        action_message = local_cas.get_message(action, re_pb2.Action)
        CasClient(remote).upload_missing(local_cas, [action, action_message.command_digest])
        # When it executes, then the error names what is missing. buildbox-casd
        # 1.4.25 does not send a MISSING precondition: it answers with an INTERNAL
        # status naming the tree it could not stage (the MISSING path is covered by
        # tests/unit/test_reapi_execution.py).
        with pytest.raises(RemoteError) as info:
            ExecutionClient(remote).execute(action)
        assert info.value.code in ("FAILED_PRECONDITION", "INTERNAL")
        assert missing_root.hash in str(info.value) or missing_root.hash in " ".join(
            getattr(info.value, "digests", [])
        )


@pytest.mark.parametrize("server", ["casd", "buildgrid"])
def test_action_cache_round_trip(server: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(server).url
    action = digest_of(f"action {uuid.uuid4()}".encode())
    with Remote(Endpoint(url)) as remote:
        client = ActionCacheClient(remote)
        assert client.get_action_result(action) is None
        stdout = CasClient(remote).upload_blob(b"from the cache\n")
        result = re_pb2.ActionResult(exit_code=0, stdout_digest=stdout)
        client.update_action_result(action, result)
        got = client.get_action_result(action)
        assert got is not None and got.stdout_digest == stdout and got.exit_code == 0


def test_remote_asset_push_and_fetch_on_casd(
    casd: Any, local_cas: LocalCas, tmp_path: Path
) -> None:
    # Given a blob and a directory in casd's CAS
    (tmp_path / "tree" / "d").mkdir(parents=True)
    (tmp_path / "tree" / "d" / "f").write_text(str(uuid.uuid4()))
    root = import_directory(local_cas, tmp_path / "tree")
    with Remote(Endpoint(casd.url)) as remote:
        cas_client = CasClient(remote)
        cas_client.upload_tree(local_cas, root)
        blob = cas_client.upload_blob(uuid.uuid4().bytes)
        assets = AssetClient(remote)
        blob_uri = f"urn:fdc:remex:2026:test:blob/{uuid.uuid4()}"
        dir_uri = f"urn:fdc:remex:2026:artifact:test/{uuid.uuid4()}"
        # When they are pushed under URIs with qualifiers
        assets.push_blob([blob_uri], blob, qualifiers={"kind": "blob"})
        assets.push_directory([dir_uri], root, qualifiers={"cache-key": "abc"})
        # Then fetching the URIs gives them back
        fetched_blob = assets.fetch_blob([blob_uri], qualifiers={"kind": "blob"})
        fetched_dir = assets.fetch_directory([dir_uri], qualifiers={"cache-key": "abc"})
        assert fetched_blob is not None and fetched_blob.digest == blob
        assert fetched_dir is not None and fetched_dir.digest == root
        assert fetched_dir.uri == dir_uri
        # And unknown URIs are simply absent
        assert assets.fetch_directory([f"urn:fdc:remex:2026:artifact:none/{uuid.uuid4()}"]) is None
        assert assets.fetch_blob([f"urn:fdc:remex:2026:none/{uuid.uuid4()}"]) is None


def test_restarting_casd_mid_operation_executes_the_action_again(
    fresh_casd: Any, busybox_sysroot: Path, local_cas: LocalCas
) -> None:
    # Given an action that runs for a while on a private casd
    root = import_directory(local_cas, busybox_sysroot)
    action = make_action(local_cas, root, f"sleep 3; echo {uuid.uuid4()} > /dev/null; mkdir out")
    with Remote(Endpoint(fresh_casd.url)) as remote:
        upload_action(CasClient(remote), local_cas, root, action)
        client = ExecutionClient(remote)
        executes: list[float] = []
        real_execute = client._execution.Execute

        def counting_execute(*args: Any, **kwargs: Any) -> Any:
            executes.append(time.monotonic())
            return real_execute(*args, **kwargs)

        client._execution.Execute = counting_execute
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["response"] = client.execute(action)
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        # When casd is killed while the action runs, and comes back on the same port
        time.sleep(1.0)
        fresh_casd.kill()
        time.sleep(0.5)
        fresh_casd.restart()
        worker.join(timeout=60)
        # Then the action was executed again and finished
        assert not worker.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["response"].result.exit_code == 0
        assert len(executes) >= 2
