"""How many RPCs the stages make, against one buildbox-casd that is both the
execution server and the artifact server (as the embedded stack runs).

Each RPC costs the worker and the server CPU; these tests pin the counts
that matter (a dependency built on another worker, the upload of an action)
and check that the shortcuts taken for them still recover when the server
lacks what they assumed it had.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.cas import LocalCas, import_directory
from pipeline.digest import digest_to_json
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.servers import CasdServer
from pipeline.spec import BuildSpec
from pipeline.stages import (
    StageContext,
    checkout_artifact,
    execute,
    fetch_outputs,
    lookup_artifact,
    push_artifact,
    run_stages,
    snapshot_sources,
    stage_to_cas,
    upload,
)
from pipeline.stages.policy import Decision, FailurePolicy, Verdict
from tests.integration.test_stages import (
    APP_SCRIPT,
    import_spec,
    lose_blobs,
    make_sources,
    manual_spec,
    src_text,
)


@dataclass(frozen=True)
class RecordingPolicy(FailurePolicy):
    """The default policy, remembering its verdicts."""

    verdicts: list[Verdict] = field(default_factory=list)

    def decide(self, stage: str, exc: BaseException, **kwargs: Any) -> Verdict:
        verdict = super().decide(stage, exc, **kwargs)
        self.verdicts.append(verdict)
        return verdict


class RpcCounter:
    """Counts ``Remote.call`` by the RPC it names (the first word of ``what``)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def take(self) -> dict[str, int]:
        """The counts since the last take."""
        counts = dict(self.counts)
        self.counts.clear()
        return counts


@pytest.fixture
def rpcs(monkeypatch: pytest.MonkeyPatch) -> RpcCounter:
    counter = RpcCounter()
    original = Remote.call

    def call(self: Remote, fn: Callable[[], Any], *, what: str) -> Any:
        counter.counts[what.split(" ")[0]] += 1
        return original(self, fn, what=what)

    monkeypatch.setattr(Remote, "call", call)
    return counter


def host(local: Path, casd: CasdServer, download: str) -> StageContext:
    """A worker's context: its own local CAS, casd for everything."""
    endpoint = Endpoint(casd.url)
    return StageContext.connect(LocalCas(local), endpoint, endpoint, download=download)


@pytest.fixture(params=["all", "minimal"])
def download(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ctx(tmp_path: Path, casd: CasdServer, download: str) -> Iterator[StageContext]:
    with host(tmp_path / "host-a", casd, download) as context:
        yield context


@pytest.fixture
def project() -> str:
    return f"p{uuid.uuid4().hex[:12]}"


@pytest.fixture
def base(ctx: StageContext, project: str, busybox_sysroot: Path) -> BuildSpec:
    tree = import_directory(ctx.local_cas, busybox_sysroot)
    snapshot_sources(ctx, [tree])
    return import_spec(project, "base.bst", tree)


def test_a_dependency_built_on_another_worker_costs_two_rpcs(
    ctx: StageContext,
    project: str,
    base: BuildSpec,
    tmp_path: Path,
    casd: CasdServer,
    download: str,
    rpcs: RpcCounter,
) -> None:
    # Given a base and a tool built on worker A
    run_stages(ctx, base)
    src = make_sources(ctx, tmp_path / "src", {"greeting.txt": f"{uuid.uuid4()}\n"})
    tool = manual_spec(project, "tool.bst", APP_SCRIPT, depends=[base], sources=[src])
    run_stages(ctx, tool)
    app = manual_spec(project, "app.bst", "test -x /usr/bin/app", depends=[base, tool])

    # When worker B, which has seen neither, stages an element depending on both
    with host(tmp_path / "host-b", casd, download) as worker_b:
        rpcs.take()
        staged = stage_to_cas(worker_b, app, {})
        counts = rpcs.take()
        # Then each dependency costs one FetchDirectory and one GetTree (of
        # the artifact's root: no read of the root first), and the action
        # one ActionCache lookup
        assert counts.get("FetchDirectory") == 2 and counts.get("GetTree") == 2, counts
        assert counts.get("GetActionResult") == 1, counts
        if download == "minimal":  # (with "all", the files come in BatchReadBlobs)
            assert not counts.get("BatchReadBlobs"), counts
        # And the action is the one worker A would make
        again = stage_to_cas(ctx, app, {})
        assert again["action"] == staged["action"]
        # And it builds there
        state = run_stages(worker_b, app, staged)
        assert state["exit_code"] == 0


def test_upload_sends_what_staging_made_without_asking_the_server(
    ctx: StageContext,
    project: str,
    base: BuildSpec,
    tmp_path: Path,
    rpcs: RpcCounter,
) -> None:
    # Given a base built, and a manual element staged on the same worker
    run_stages(ctx, base)
    src = make_sources(ctx, tmp_path / "src", {"greeting.txt": f"{uuid.uuid4()}\n"})
    app = manual_spec(project, "app.bst", APP_SCRIPT, depends=[base], sources=[src])
    staged = stage_to_cas(ctx, app, {})

    # When it is uploaded
    rpcs.take()
    uploaded = upload(ctx, app, staged)
    counts = rpcs.take()
    # Then one BatchUpdateBlobs sent the new folders, the Command and the
    # Action, and nothing asked the server what it lacked
    assert counts.get("BatchUpdateBlobs") == 1 and not counts.get("FindMissingBlobs"), counts
    assert uploaded["uploaded"]["blobs"] >= 3
    # And the server had everything else: it runs without a re-upload
    executed = execute(ctx, app, uploaded)
    assert "action_result" in executed

    # And a re-upload (the policy's way back) asks the server
    again = dict(uploaded)
    again["reupload"] = True
    upload(ctx, app, again)  # type: ignore[arg-type]
    assert rpcs.take().get("FindMissingBlobs") == 1


def test_inputs_the_server_lacks_are_sent_by_the_re_upload(
    ctx: StageContext,
    project: str,
    base: BuildSpec,
    tmp_path: Path,
    rpcs: RpcCounter,
) -> None:
    # Given a base built, and a source this worker holds but the server does
    # not (as after the server evicted it): the worker does not ask for a
    # tree its local CAS holds whole
    run_stages(ctx, base)
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "greeting.txt").write_text(f"{uuid.uuid4()}\n")
    src = import_directory(ctx.local_cas, folder)
    assert ctx.artifact_cas.find_missing([src]) == [src]
    app = manual_spec(project, "app.bst", APP_SCRIPT, depends=[base], sources=[src])

    # When it is built in-process (the policy re-uploads after Execute fails)
    policy = RecordingPolicy()
    rpcs.take()
    state = run_stages(ctx, app, policy=policy)
    counts = rpcs.take()

    # Then Execute failed once for the missing input, the re-upload asked
    # the server (one FindMissingBlobs; push_artifact's is the other) and
    # sent what it lacked; the element is built right
    assert [v.decision for v in policy.verdicts] == [Decision.REUPLOAD]
    assert counts.get("FindMissingBlobs") == 2, counts
    assert state["exit_code"] == 0
    checkout_artifact(ctx, app, tmp_path / "out")
    assert (tmp_path / "out/usr/share/x/greeting.txt").read_text() == src_text(tmp_path)


def test_push_without_the_check_saves_the_lookup_and_still_names_a_whole_artifact(
    ctx: StageContext, project: str, base: BuildSpec, tmp_path: Path, rpcs: RpcCounter
) -> None:
    # Given an element built up to its last stage
    run_stages(ctx, base)
    src = make_sources(ctx, tmp_path / "src", {"greeting.txt": f"{uuid.uuid4()}\n"})
    app = manual_spec(project, "app.bst", APP_SCRIPT, depends=[base], sources=[src])
    state = stage_to_cas(ctx, app, {})
    for stage in (upload, execute, fetch_outputs):
        state = stage(ctx, app, state)

    # When it is pushed by a caller that knows it is the first push
    rpcs.take()
    pushed = push_artifact(ctx, app, state, check_existing=False)
    counts = rpcs.take()
    # Then no FetchDirectory was made, and the artifact is there and whole
    assert not counts.get("FetchDirectory") and counts.get("PushDirectory") == 1, counts
    assert pushed["artifact"] == digest_to_json(lookup_artifact(ctx, app))  # type: ignore[arg-type]
    checkout_artifact(ctx, app, tmp_path / "out")
    assert (tmp_path / "out/usr/share/x/greeting.txt").read_text() == src_text(tmp_path)
    # And the default looks first, and keeps what is there
    rpcs.take()
    assert push_artifact(ctx, app, state)["artifact"] == pushed["artifact"]
    assert rpcs.take().get("FetchDirectory") == 1


def test_a_wiped_local_cas_before_each_stage_still_builds_on_one_server(
    ctx: StageContext, project: str, base: BuildSpec, tmp_path: Path
) -> None:
    # Given a base built and a manual element staged on this worker (which
    # remembers the trees it staged, and would upload without asking)
    run_stages(ctx, base)
    src = make_sources(ctx, tmp_path / "src", {"greeting.txt": f"{uuid.uuid4()}\n"})
    app = manual_spec(project, "app.bst", APP_SCRIPT, depends=[base], sources=[src])
    state = stage_to_cas(ctx, app, {})

    # When the whole local CAS is wiped before each later stage
    for stage in (upload, execute, fetch_outputs, push_artifact):
        lose_blobs(ctx.local_cas)
        state = stage(ctx, app, state)

    # Then the element is built, and its artifact is whole and right
    assert state["exit_code"] == 0
    assert state["artifact"] == digest_to_json(lookup_artifact(ctx, app))  # type: ignore[arg-type]
    lose_blobs(ctx.local_cas)
    checkout_artifact(ctx, app, tmp_path / "out")
    assert (tmp_path / "out/usr/share/x/greeting.txt").read_text() == src_text(tmp_path)
