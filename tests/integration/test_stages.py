"""The five stages against two real buildbox-casd servers: one executes, one stores artifacts.

Build specs are written by hand here (no project loading): an ``import``
element made from a busybox sysroot, ``manual`` elements depending on it,
and a ``stack``.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pipeline.cas import LocalCas, import_directory, tree_digests
from pipeline.digest import Digest, digest_from_json, digest_to_json
from pipeline.reapi.cas.traffic import TRAFFIC
from pipeline.reapi.channel import Endpoint
from pipeline.servers import CasdServer
from pipeline.spec import (
    BuildSpec,
    CommandSpec,
    DependencySpec,
    SourceSpec,
    artifact_uri,
    normal_name,
)
from pipeline.stages import (
    BuildFailedError,
    DependencyArtifactMissingError,
    SourceMissingError,
    StageContext,
    build_plan,
    checkout_artifact,
    execute,
    fetch_outputs,
    is_pending,
    lookup_artifact,
    push_artifact,
    read_artifact_meta,
    read_logs,
    run_stages,
    snapshot_sources,
    stable,
    stage_to_cas,
    upload,
)
from pipeline.stages.artifacts import spec_failure_uri
from pipeline.stages.state import decode_action_result
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

INSTALL_ROOT = "buildstream-install"


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact_casd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasdServer]:
    """A second buildbox-casd: the artifact server (its CAS is not the execution CAS)."""
    with CasdServer(tmp_path_factory.mktemp("artifact-casd"), jobs=1) as server:
        yield server


def open_context(
    local: Path, casd: CasdServer, artifact_casd: CasdServer, download: str = "all"
) -> StageContext:
    return StageContext.connect(
        LocalCas(local), Endpoint(casd.url), Endpoint(artifact_casd.url), download=download
    )


@pytest.fixture(params=["all", "minimal"])
def ctx(
    request: pytest.FixtureRequest, tmp_path: Path, casd: CasdServer, artifact_casd: CasdServer
) -> Iterator[StageContext]:
    """A stage context on two servers, bringing everything home or (build
    without the bytes) only Directory messages and logs."""
    with open_context(tmp_path / "local-cas", casd, artifact_casd, request.param) as context:
        yield context


@pytest.fixture
def project() -> str:
    """A project name of the test's own: fresh artifact URIs and cache keys."""
    return f"p{uuid.uuid4().hex[:12]}"


# --- specs, by hand ------------------------------------------------------------------


def key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def source(tree: Digest, directory: str = "") -> SourceSpec:
    return SourceSpec(kind="local", digest=digest_to_json(tree), directory=directory)


def dependency(spec: BuildSpec) -> DependencySpec:
    return DependencySpec(
        element=spec["element"],
        cache_key=spec["cache_key"],
        artifact_uri=spec["artifact_uri"],
        path="",
        select=None,
    )


def import_spec(project: str, element: str, tree: Digest, *, source_root: str = "") -> BuildSpec:
    cache_key = key(project, element, tree.hash, source_root)
    return BuildSpec(
        project=project,
        element=element,
        kind="import",
        cache_key=cache_key,
        artifact_uri=artifact_uri(project, normal_name(element), cache_key),
        dependencies=[],
        runtime_dependencies=[],
        sources=[source(tree)],
        source_root="",
        command=None,
        files_root=source_root,
        files_target="",
        select_outputs=False,
    )


def manual_spec(
    project: str,
    element: str,
    script: str,
    *,
    depends: list[BuildSpec],
    sources: Sequence[Digest] = (),
    timeout: int | None = None,
) -> BuildSpec:
    build_root = f"buildstream/{project}/{element}"
    command = CommandSpec(
        arguments=["sh", "-c", "-e", script],
        environment={"PATH": "/usr/bin:/bin", "PREFIX": "/usr", "LC_ALL": "C"},
        working_directory=build_root,
        output_path=INSTALL_ROOT,
        platform={},
        timeout_seconds=timeout,
    )
    cache_key = key(
        project,
        element,
        script,
        *(s.hash for s in sources),
        *(d["cache_key"] for d in depends),
    )
    return BuildSpec(
        project=project,
        element=element,
        kind="manual",
        cache_key=cache_key,
        artifact_uri=artifact_uri(project, normal_name(element), cache_key),
        dependencies=[dependency(d) for d in depends],
        runtime_dependencies=[d["element"] for d in depends],
        sources=[source(s) for s in sources],
        source_root=build_root,
        command=command,
        files_root="",
        files_target="",
        select_outputs=False,
    )


def stack_spec(project: str, element: str, depends: list[BuildSpec]) -> BuildSpec:
    cache_key = key(project, element, *(d["cache_key"] for d in depends))
    return BuildSpec(
        project=project,
        element=element,
        kind="stack",
        cache_key=cache_key,
        artifact_uri=artifact_uri(project, normal_name(element), cache_key),
        dependencies=[],
        runtime_dependencies=[d["element"] for d in depends],
        sources=[],
        source_root="",
        command=None,
        files_root="",
        files_target="",
        select_outputs=False,
    )


APP_SCRIPT = f"""
mkdir -p /{INSTALL_ROOT}/usr/share/x /{INSTALL_ROOT}/usr/bin
echo hi > /{INSTALL_ROOT}/usr/share/x/hello
cp greeting.txt /{INSTALL_ROOT}/usr/share/x/greeting.txt
test -x /usr/bin/busybox && echo "built in $(pwd)"
printf '#!/bin/sh\\necho app\\n' > /{INSTALL_ROOT}/usr/bin/app
chmod +x /{INSTALL_ROOT}/usr/bin/app
echo "to stderr" >&2
"""


def make_sources(ctx: StageContext, folder: Path, files: dict[str, str]) -> Digest:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    tree = import_directory(ctx.local_cas, folder)
    snapshot_sources(ctx, [tree])
    return tree


@pytest.fixture
def base(ctx: StageContext, project: str, busybox_sysroot: Path) -> BuildSpec:
    """The base import element, its sysroot snapshotted to the artifact server."""
    tree = import_directory(ctx.local_cas, busybox_sysroot)
    snapshot_sources(ctx, [tree])
    return import_spec(project, "base.bst", tree)


def files_of(folder: Path) -> dict[str, str]:
    """Regular files under ``folder`` (relative path -> text), symlinks as '-> target'."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[rel] = f"-> {path.readlink()}"
        elif path.is_file():
            found[rel] = path.read_text(errors="replace")
    return found


# --- tests -----------------------------------------------------------------------


def test_import_then_manual_build_check_out_and_hit_the_cache(
    ctx: StageContext, project: str, base: BuildSpec, tmp_path: Path
) -> None:
    # Given a base import element and a manual element reading a source file
    src = make_sources(ctx, tmp_path / "src", {"greeting.txt": f"hello {project}\n"})
    app = manual_spec(project, "app.bst", APP_SCRIPT, depends=[base], sources=[src])
    assert lookup_artifact(ctx, base) is None and lookup_artifact(ctx, app) is None

    # When both are built, in order
    base_state = run_stages(ctx, base)
    app_state = run_stages(ctx, app)

    # Then the import's files are its sources, and it ran no action
    assert base_state["action"] is None and base_state["exit_code"] is None
    assert base_state["files"] == base["sources"][0]["digest"]
    # And the manual element executed, with its outputs and logs
    assert app_state["exit_code"] == 0 and app_state["cached"] is False
    assert set(app_state["timings"]) == {
        "stage_to_cas",
        "upload",
        "execute",
        "fetch_outputs",
        "push_artifact",
    }
    stdout, stderr = read_logs(ctx, app)
    assert stdout == f"built in /buildstream/{project}/app.bst\n".encode()
    assert stderr == b"to stderr\n"

    # And the artifact checks out with exactly what the command wrote
    checkout_artifact(ctx, app, tmp_path / "app")
    assert files_of(tmp_path / "app") == {
        "usr/bin/app": "#!/bin/sh\necho app\n",
        "usr/share/x/greeting.txt": f"hello {project}\n",
        "usr/share/x/hello": "hi\n",
    }
    assert (tmp_path / "app/usr/bin/app").stat().st_mode & 0o111
    # And with its runtime dependency, the sysroot comes along
    checkout_artifact(
        ctx, app["artifact_uri"], tmp_path / "full", runtime_deps=[base["artifact_uri"]]
    )
    full = files_of(tmp_path / "full")
    assert full["usr/share/x/hello"] == "hi\n"
    assert full["bin"] == "-> usr/bin" and full["usr/bin/sh"] == "-> busybox"

    # And the meta names what went in
    meta = read_artifact_meta(ctx, app["artifact_uri"])
    assert meta["element"] == "app.bst" and meta["cache_key"] == app["cache_key"]
    assert meta["dependencies"] == {"base.bst": base["cache_key"]}
    assert meta["runtime_dependencies"] == ["base.bst"]
    assert meta["action"] == "{hash}/{size_bytes}".format(**app_state["action"])
    assert meta["exit_code"] == 0 and meta["project"] == project
    assert meta["timings"]["worker_start"] and meta["timings"]["stages"]["execute"] > 0
    assert read_artifact_meta(ctx, base["artifact_uri"])["action"] is None

    # When the plan is built again, every element hits the artifact cache
    results = build_plan(ctx, [base, app])
    assert [(r["element"], r["state"]) for r in results] == [
        ("base.bst", "cached"),
        ("app.bst", "cached"),
    ]
    assert results[1]["artifact"] == app_state["artifact"]


def test_every_stage_is_idempotent(
    ctx: StageContext, project: str, base: BuildSpec, tmp_path: Path
) -> None:
    # Given a built base and a manual element never built
    run_stages(ctx, base)
    src = make_sources(ctx, tmp_path / "src", {"greeting.txt": f"{uuid.uuid4()}\n"})
    app = manual_spec(project, "app.bst", APP_SCRIPT, depends=[base], sources=[src])

    # When each stage runs twice on the same input, then it returns the same state
    s1 = stage_to_cas(ctx, app, {"build_id": "b1"})
    assert stable(stage_to_cas(ctx, app, {"build_id": "b1"})) == stable(s1)
    assert s1["build_id"] == "b1" and s1["cached"] is False
    assert s1["skip_cache_lookup"] is False and s1["overlaps"]["count"] == 0

    s2 = upload(ctx, app, s1)
    again = upload(ctx, app, s1)
    assert stable(again) == stable(s2)
    assert s2["uploaded"]["blobs"] > 0 and again["uploaded"] == {"blobs": 0, "bytes": 0}

    s3 = execute(ctx, app, s2)
    again = execute(ctx, app, s2)
    assert stable(again) == stable(s3)
    assert s3["remote_cache_hit"] is False and again["remote_cache_hit"] is True
    # (and a state that already holds the result is returned as is)
    assert stable(execute(ctx, app, s3)) == stable(s3)

    s4 = fetch_outputs(ctx, app, s3)
    assert stable(fetch_outputs(ctx, app, s3)) == stable(s4)

    s5 = push_artifact(ctx, app, s4)
    assert stable(push_artifact(ctx, app, s4)) == stable(s5)
    assert lookup_artifact(ctx, app) == digest_from_json(s5["artifact"])

    # And a whole run again finds the action cached and the same artifact
    rerun = run_stages(ctx, app)
    assert rerun["cached"] is True and rerun["artifact"] == s5["artifact"]
    assert rerun["files"] == s5["files"] and rerun["action"] == s5["action"]


def test_a_failing_command_fails_the_element_with_its_log_and_no_artifact(
    ctx: StageContext, project: str, base: BuildSpec
) -> None:
    # Given a manual element whose command prints a fresh nonce and exits 3
    run_stages(ctx, base)
    script = (
        "echo nonce=$(od -An -N8 -tx1 /dev/urandom | tr -d ' ')\n"
        "echo 'something broke' >&2\nexit 3\n"
    )
    bad = manual_spec(project, "bad.bst", script, depends=[base])

    # When it is built, then it fails with its exit code and the tail of its logs
    with pytest.raises(BuildFailedError) as info:
        run_stages(ctx, bad)
    error = info.value
    assert error.exit_code == 3 and not error.transient
    assert "something broke" in error.stderr_tail and "something broke" in str(error)
    first_nonce = error.stdout_tail.strip()
    assert first_nonce.startswith("nonce=") and len(first_nonce) > len("nonce=")
    assert "bad.bst" in str(error) and "exit" in str(error)
    # And a failure record is on the artifact server; no artifact is
    assert error.failure_uri == spec_failure_uri(bad)
    assert ctx.assets.fetch_blob([spec_failure_uri(bad)]) is not None
    assert lookup_artifact(ctx, bad) is None
    stdout, stderr = read_logs(ctx, bad)
    assert stdout.decode().strip() == first_nonce and stderr == b"something broke\n"

    # When it is built again, the failure cached by casd is not reused: it runs again
    state = stage_to_cas(ctx, bad, {})
    assert state["cached"] is False and state["skip_cache_lookup"] is True
    with pytest.raises(BuildFailedError) as again:
        run_stages(ctx, bad)
    assert again.value.exit_code == 3
    assert again.value.stdout_tail.strip() != first_nonce
    assert lookup_artifact(ctx, bad) is None


def test_a_failed_element_fails_its_reverse_dependencies_only(
    ctx: StageContext, project: str, base: BuildSpec
) -> None:
    # Given a plan: base, a failing element, one above it, and an independent one
    bad = manual_spec(project, "bad.bst", "exit 3", depends=[base])
    above = manual_spec(project, "above.bst", "true", depends=[base, bad])
    ok = manual_spec(project, "ok.bst", f"touch /{INSTALL_ROOT}/ok", depends=[base])
    top = stack_spec(project, "top.bst", [ok, above])
    only_ok = stack_spec(project, "only-ok.bst", [ok])

    # When the plan is built
    results = build_plan(ctx, [base, bad, above, ok, top, only_ok])

    # Then the failure spreads to its reverse dependencies, and the rest is built
    states = {r["element"]: (r["state"], r["error"]) for r in results}
    assert states["base.bst"] == ("built", None)
    assert states["bad.bst"][0] == "failed" and "exited with code 3" in str(states["bad.bst"][1])
    assert states["above.bst"] == ("skipped", "dependency failed: bad.bst")
    assert states["ok.bst"] == ("built", None)
    assert states["top.bst"] == ("skipped", "dependency failed: above.bst")
    assert states["only-ok.bst"] == ("built", None)
    assert lookup_artifact(ctx, above) is None and lookup_artifact(ctx, top) is None


def test_a_stack_has_empty_files_and_checks_out_its_runtime_dependencies(
    ctx: StageContext, project: str, base: BuildSpec, tmp_path: Path
) -> None:
    app = manual_spec(project, "app.bst", f"echo x > /{INSTALL_ROOT}/x", depends=[base])
    top = stack_spec(project, "top.bst", [app])
    for spec in (base, app, top):
        run_stages(ctx, spec)
    meta = read_artifact_meta(ctx, top["artifact_uri"])
    assert meta["kind"] == "stack" and meta["runtime_dependencies"] == ["app.bst"]
    assert read_logs(ctx, top) == (b"", b"")
    checkout_artifact(ctx, top, tmp_path / "top")
    assert files_of(tmp_path / "top") == {}
    checkout_artifact(ctx, top, tmp_path / "with-deps", runtime_deps=[app["artifact_uri"]])
    assert files_of(tmp_path / "with-deps") == {"x": "x\n"}


def test_a_missing_dependency_artifact_is_a_clear_error(
    ctx: StageContext, project: str, base: BuildSpec
) -> None:
    # Given an element whose dependency was never built
    app = manual_spec(project, "app.bst", "true", depends=[base])
    # When it is staged, then the error names the dependency and its URI
    with pytest.raises(DependencyArtifactMissingError) as info:
        stage_to_cas(ctx, app, {})
    assert info.value.dependency == "base.bst" and not info.value.transient
    assert "base.bst" in str(info.value) and base["artifact_uri"] in str(info.value)
    assert lookup_artifact(ctx, app) is None


def test_a_source_never_snapshotted_is_a_clear_error(
    ctx: StageContext, project: str, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text(str(uuid.uuid4()))
    tree = import_directory(ctx.local_cas, tmp_path / "src")  # not snapshotted
    spec = import_spec(project, "base.bst", tree)
    # The local CAS has it, but the spec must build from the artifact server alone
    other = StageContext(LocalCas(tmp_path / "other"), ctx.execution, ctx.artifacts)
    with pytest.raises(SourceMissingError) as info:
        stage_to_cas(other, spec, {})
    assert tree.hash in str(info.value) and "base.bst" in str(info.value)


def test_an_import_of_a_missing_folder_names_it(
    ctx: StageContext, project: str, busybox_sysroot: Path
) -> None:
    tree = import_directory(ctx.local_cas, busybox_sysroot)
    snapshot_sources(ctx, [tree])
    good = import_spec(project, "usr.bst", tree, source_root="usr")
    state = stage_to_cas(ctx, good, {})
    files = digest_from_json(state["files"])
    names = [d.name for d in ctx.local_cas.get_message(files, re_pb2.Directory).directories]
    assert "bin" in names and "etc" not in names  # usr/ became the top
    bad = import_spec(project, "nope.bst", tree, source_root="usr/nope")
    with pytest.raises(BuildFailedError) as info:
        stage_to_cas(ctx, bad, {})
    assert "'usr/nope'" in str(info.value) and "nope.bst" in str(info.value)


def test_later_stages_on_another_host_derive_what_they_lack(
    ctx: StageContext,
    project: str,
    base: BuildSpec,
    tmp_path: Path,
    casd: CasdServer,
    artifact_casd: CasdServer,
) -> None:
    # Given a base built, and a manual element staged on this host only
    run_stages(ctx, base)
    src = make_sources(ctx, tmp_path / "src", {"greeting.txt": f"{uuid.uuid4()}\n"})
    app = manual_spec(project, "app.bst", APP_SCRIPT, depends=[base], sources=[src])
    staged = stage_to_cas(ctx, app, {})
    action = digest_from_json(staged["action"])

    # When every later stage runs on hosts with an empty local CAS each
    def elsewhere(name: str) -> StageContext:
        return open_context(tmp_path / name, casd, artifact_casd)

    with elsewhere("host-b") as host_b:
        assert not host_b.local_cas.contains(action)
        uploaded = upload(host_b, app, staged)
        # Then upload derived the same action again and sent it
        assert uploaded["action"] == staged["action"] and "rederived_from" not in uploaded
        assert host_b.local_cas.contains(action) and uploaded["uploaded"]["blobs"] > 0
        assert not host_b.execution_cas.find_missing(
            tree_digests(host_b.local_cas, digest_from_json(staged["input_root"]))
        )
    with elsewhere("host-c") as host_c:
        executed = execute(host_c, app, uploaded)
    with elsewhere("host-d") as host_d:
        fetched = fetch_outputs(host_d, app, executed)
    with elsewhere("host-e") as host_e:
        pushed = push_artifact(host_e, app, fetched)
    # And the artifact is complete and right
    assert pushed["artifact"] == digest_to_json(lookup_artifact(ctx, app))  # type: ignore[arg-type]
    checkout_artifact(ctx, app, tmp_path / "out")
    assert (tmp_path / "out/usr/share/x/greeting.txt").read_text() == src_text(tmp_path)


def lose_blobs(cas: LocalCas, keep: Sequence[Digest] = ()) -> None:
    """Delete the local CAS's objects, but ``keep``; with nothing kept, the
    whole folder (as ``rm -rf`` racing a worker leaves it)."""
    if not keep:
        shutil.rmtree(cas.root, ignore_errors=True)
        return
    kept = {d.hash for d in keep}
    for path in (cas.root / "objects").glob("*/*"):
        if path.parent.name + path.name not in kept:
            path.unlink()


def test_a_worker_whose_local_cas_loses_blobs_derives_them_again(
    ctx: StageContext, project: str, base: BuildSpec, tmp_path: Path
) -> None:
    # Given a base built and a manual element staged on this worker, which
    # now remembers the dependency and source trees its local CAS holds
    run_stages(ctx, base)
    src = make_sources(ctx, tmp_path / "src", {"greeting.txt": f"{uuid.uuid4()}\n"})
    app = manual_spec(project, "app.bst", APP_SCRIPT, depends=[base], sources=[src])
    first = stage_to_cas(ctx, app, {})
    base_files = digest_from_json(base["sources"][0]["digest"])

    # When the local CAS loses every blob but those trees' roots (a wipe
    # that had not reached them yet), then the element is staged again
    lose_blobs(ctx.local_cas, keep=[base_files, src])
    staged = stage_to_cas(ctx, app, {})
    # Then the same action comes out
    assert staged["action"] == first["action"]

    # And when the whole folder is wiped before each later stage, each
    # stage still does its work, from the remote servers
    state = staged
    for stage in (upload, execute, fetch_outputs, push_artifact):
        lose_blobs(ctx.local_cas)
        state = stage(ctx, app, state)
    assert state["exit_code"] == 0 and state["artifact"]
    # And the artifact is complete and right
    assert state["artifact"] == digest_to_json(lookup_artifact(ctx, app))  # type: ignore[arg-type]
    lose_blobs(ctx.local_cas)
    checkout_artifact(ctx, app, tmp_path / "out")
    assert (tmp_path / "out/usr/share/x/greeting.txt").read_text() == src_text(tmp_path)


def src_text(tmp_path: Path) -> str:
    return (tmp_path / "src" / "greeting.txt").read_text()


def test_execute_returns_a_pending_operation_and_resumes_it(
    ctx: StageContext, project: str, base: BuildSpec
) -> None:
    # Given a manual element that runs for about two seconds
    run_stages(ctx, base)
    script = f"sleep 2; echo {uuid.uuid4()} > /{INSTALL_ROOT}/done"
    slow = manual_spec(project, "slow.bst", script, depends=[base])
    state = upload(ctx, slow, stage_to_cas(ctx, slow, {}))

    # When execute may wait only a moment, then it hands back the operation
    pending = execute(ctx, slow, state, max_wait=0.3)
    assert is_pending(pending) and pending["operation"] and "action_result" not in pending
    # And called again with that state, it follows the same operation to its end
    done = execute(ctx, slow, pending)
    assert not is_pending(done) and "operation" not in done and "stage" not in done
    result = decode_action_result(slow["element"], done["action_result"])
    assert result.exit_code == 0 and done["remote_cache_hit"] is False
    final = push_artifact(ctx, slow, fetch_outputs(ctx, slow, done))
    assert lookup_artifact(ctx, slow) == digest_from_json(final["artifact"])


def test_an_action_past_its_timeout_fails_the_element(
    ctx: StageContext, project: str, base: BuildSpec
) -> None:
    run_stages(ctx, base)
    slow = manual_spec(
        project, "slow.bst", f"sleep 5; echo {uuid.uuid4()}", depends=[base], timeout=1
    )
    with pytest.raises(BuildFailedError) as info:
        run_stages(ctx, slow)
    assert "timeout" in str(info.value) and info.value.exit_code is None
    # And the failure is on record, for the user to read
    assert info.value.failure_uri == spec_failure_uri(slow)
    assert read_logs(ctx, slow) is not None
    assert lookup_artifact(ctx, slow) is None


@pytest.mark.parametrize("servers", ["one server", "two servers"])
def test_built_without_the_bytes_a_worker_holds_only_directories_and_logs(
    servers: str,
    casd: CasdServer,
    artifact_casd: CasdServer,
    project: str,
    busybox_sysroot: Path,
    tmp_path: Path,
) -> None:
    # Given sources snapshotted by a client, and a worker with an empty local CAS
    # whose artifact server is the execution casd, or another casd
    artifacts = casd if servers == "one server" else artifact_casd
    client = open_context(tmp_path / "client-cas", casd, artifacts)
    worker = open_context(tmp_path / "worker-cas", casd, artifacts, "minimal")
    with client, worker:
        tree = import_directory(client.local_cas, busybox_sysroot)
        src = make_sources(client, tmp_path / "src", {"greeting.txt": f"hello {project}\n"})
        snapshot_sources(client, [tree])
        base = import_spec(project, "base.bst", tree)
        app = manual_spec(project, "app.bst", APP_SCRIPT, depends=[base], sources=[src])
        top = manual_spec(
            project,
            "top.bst",
            f"cat /usr/share/x/hello > /{INSTALL_ROOT}/top.txt",
            depends=[base, app],
        )
        # When the worker builds the chain
        before = TRAFFIC.snapshot()
        results = build_plan(worker, [base, app, top])
        moved = TRAFFIC.snapshot() - before

        # Then everything built, and the worker's local CAS holds no file of the
        # sysroot, the sources or the outputs: only Directory messages and logs
        assert [r["state"] for r in results] == ["built"] * 3, results
        directories = directory_hashes(client.local_cas, tree)
        client_files = [
            d
            for d in tree_digests(client.local_cas, tree)
            if d.size_bytes and d.hash not in directories
        ]
        assert client_files and not any(worker.local_cas.contains(d) for d in client_files)
        stdout, _ = read_logs(worker, app)
        assert stdout == f"built in /buildstream/{project}/app.bst\n".encode()
        # (the sysroot's files alone are larger than all that was downloaded)
        sysroot_bytes = sum(d.size_bytes for d in client_files)
        assert moved.downloaded < sysroot_bytes / 4, (moved, sysroot_bytes)

        # And a checkout still gets every file (on a host of its own)
        with open_context(tmp_path / "checkout-cas", casd, artifacts, "minimal") as other:
            checkout_artifact(
                other,
                top["artifact_uri"],
                tmp_path / "out",
                runtime_deps=[base["artifact_uri"], app["artifact_uri"]],
            )
        out = files_of(tmp_path / "out")
        assert out["top.txt"] == "hi\n" and out["usr/share/x/greeting.txt"] == f"hello {project}\n"
        assert (
            out["usr/bin/sh"] == "-> busybox" and (tmp_path / "out/usr/bin/busybox").stat().st_size
        )


def directory_hashes(cas: LocalCas, root: Digest) -> set[str]:
    """The hashes of every Directory message of the tree under ``root``."""
    found = {root.hash}
    pending = [root]
    while pending:
        for node in cas.get_message(pending.pop(), re_pb2.Directory).directories:
            if node.digest.hash not in found:
                found.add(node.digest.hash)
                pending.append(node.digest)
    return found
