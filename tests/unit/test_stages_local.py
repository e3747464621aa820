"""The stages' local work: input-root layout, Command and Action, artifact layout, state.

No server is contacted: sources are already complete in the local CAS (so
nothing is fetched) and the specs have no dependencies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cas import LocalCas, import_directory, iter_tree
from pipeline.digest import EMPTY_DIGEST, Digest, digest_from_json, digest_of, digest_to_json
from pipeline.reapi.cas import MemoryBlobs
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.spec import BuildSpec, CommandSpec, SourceSpec, artifact_uri
from pipeline.stages import BuildFailedError, SpecError, StageContext, is_pending, stable
from pipeline.stages.artifacts import ARTIFACT_META_FILE, build_artifact_tree
from pipeline.stages.push import artifact_meta
from pipeline.stages.staging import output_paths_in_command, stage_action, stage_files
from pipeline.stages.state import decode_action_result, encode_action_result
from pipeline.stages.trees import place_at, split_path, subtree
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

KEY = hashlib.sha256(b"key").hexdigest()


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[StageContext]:
    # Nothing listens there: a test that reaches a server fails loudly.
    remote = Remote(Endpoint("grpc://127.0.0.1:9"))
    with StageContext(LocalCas(tmp_path / "cas"), remote, remote) as context:
        yield context
    remote.close()


def sources(ctx: StageContext, folder: Path, files: dict[str, str]) -> Digest:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return import_directory(ctx.local_cas, folder)


def spec(
    kind: str,
    trees: list[tuple[Digest, str]],
    *,
    source_root: str = "",
    import_target: str = "",
    command: CommandSpec | None = None,
) -> BuildSpec:
    """With a command, the sources go to ``source_root``; without one (an
    import), ``source_root`` is the folder of the sources taken as files."""
    return BuildSpec(
        project="proj",
        element="hello/app.bst",
        kind=kind,
        cache_key=KEY,
        artifact_uri=artifact_uri("proj", "hello-app", KEY),
        dependencies=[],
        runtime_dependencies=["base.bst"],
        sources=[
            SourceSpec(kind="local", digest=digest_to_json(d), directory=sub) for d, sub in trees
        ],
        source_root=source_root if command is not None else "",
        command=command,
        files_root="" if command is not None else source_root,
        files_target=import_target,
        select_outputs=False,
    )


def command(**changes: object) -> CommandSpec:
    base = CommandSpec(
        arguments=["sh", "-c", "-e", "make install"],
        environment={"PATH": "/usr/bin:/bin", "CC": "gcc", "LC_ALL": "C"},
        working_directory="buildstream/proj/hello/app.bst",
        output_path="buildstream-install",
        platform={"OSFamily": "linux", "ISA": "x86-64"},
        timeout_seconds=None,
    )
    base.update(changes)  # type: ignore[typeddict-item]
    return base


def paths(ctx: StageContext, root: Digest) -> list[str]:
    """Every folder, file and symlink of a tree, as relative paths."""
    found = []
    for folder, directory in iter_tree(ctx.local_cas, root):
        found += [f"{folder}/" if folder else "./"]
        prefix = f"{folder}/" if folder else ""
        found += [prefix + f.name for f in directory.files]
        found += [prefix + s.name + "@" for s in directory.symlinks]
    return sorted(found)


# --- paths ---------------------------------------------------------------------------


def test_split_path_normalizes_and_refuses_climbing() -> None:
    assert split_path("") == [] and split_path("/") == []
    assert split_path("/a//b/./c/") == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"\.\."):
        split_path("a/../b")
    with pytest.raises(ValueError, match="NUL"):
        split_path("a\0b")


def test_place_at_nests_and_subtree_finds_it_again(ctx: StageContext, tmp_path: Path) -> None:
    tree = sources(ctx, tmp_path / "s", {"f": "x"})
    nested = place_at(ctx.local_cas, tree, ["a", "b.bst"])
    assert paths(ctx, nested) == ["./", "a/", "a/b.bst/", "a/b.bst/f"]
    assert subtree(ctx.local_cas, nested, ["a", "b.bst"]) == tree
    assert subtree(ctx.local_cas, nested, []) == nested
    assert subtree(ctx.local_cas, nested, ["a", "nope"]) is None
    assert subtree(ctx.local_cas, nested, ["a", "b.bst", "f"]) is None  # a file, not a folder
    assert place_at(ctx.local_cas, tree, []) == tree


def test_output_path_is_relative_to_the_working_directory() -> None:
    def output(cmd: CommandSpec) -> list[str]:
        return output_paths_in_command(cmd)

    assert output(command()) == ["../../../../buildstream-install"]
    assert output(command(working_directory="")) == ["buildstream-install"]
    assert output(command(working_directory="/a", output_path="/a/b")) == ["b"]
    assert output(command(working_directory="", output_path="")) == ["."]
    assert output(command(working_directory="a/b", output_path="")) == ["../.."]


# --- stage_to_cas, locally ------------------------------------------------------------


def test_sources_land_at_a_nested_source_root_with_the_install_root(
    ctx: StageContext, tmp_path: Path
) -> None:
    # Given two sources, the second in a sub-folder, and a nested build root
    one = sources(ctx, tmp_path / "one", {"Makefile": "all:\n", "src/main.c": "int main;\n"})
    two = sources(ctx, tmp_path / "two", {"data.txt": "d\n"})
    build = spec(
        "manual",
        [(one, ""), (two, "extra/data")],
        source_root="buildstream/proj/hello/app.bst",
        command=command(timeout_seconds=60),
    )
    # When the action is staged
    staged = stage_action(ctx, build)
    # Then the sources sit at the build root, and the install root exists, empty
    prefix = "buildstream/proj/hello/app.bst"
    assert paths(ctx, staged.input_root) == [
        "./",
        "buildstream-install/",
        "buildstream/",
        "buildstream/proj/",
        "buildstream/proj/hello/",
        f"{prefix}/",
        f"{prefix}/Makefile",
        f"{prefix}/extra/",
        f"{prefix}/extra/data/",
        f"{prefix}/extra/data/data.txt",
        f"{prefix}/src/",
        f"{prefix}/src/main.c",
    ]
    assert staged.overlaps == []
    # And the Command and the Action say what REAPI wants, sorted
    action = ctx.local_cas.get_message(staged.action, re_pb2.Action)
    cmd = ctx.local_cas.get_message(staged.command, re_pb2.Command)
    assert action.command_digest == staged.command
    assert action.input_root_digest == staged.input_root
    assert action.timeout.seconds == 60 and not action.do_not_cache
    assert list(cmd.arguments) == ["sh", "-c", "-e", "make install"]
    assert [(e.name, e.value) for e in cmd.environment_variables] == [
        ("CC", "gcc"),
        ("LC_ALL", "C"),
        ("PATH", "/usr/bin:/bin"),
    ]
    assert cmd.working_directory == prefix
    assert list(cmd.output_paths) == ["../../../../buildstream-install"]
    properties = [("ISA", "x86-64"), ("OSFamily", "linux")]
    assert [(p.name, p.value) for p in cmd.platform.properties] == properties
    assert [(p.name, p.value) for p in action.platform.properties] == properties
    # And staging again gives the same digests
    assert stage_action(ctx, build) == staged


def test_a_working_directory_without_sources_still_exists(ctx: StageContext) -> None:
    staged = stage_action(ctx, spec("manual", [], source_root="b/e", command=command()))
    assert "buildstream/proj/hello/app.bst/" in paths(ctx, staged.input_root)
    assert "b/e/" in paths(ctx, staged.input_root)


def test_hostile_paths_in_a_spec_are_refused(ctx: StageContext) -> None:
    with pytest.raises(SpecError, match="working_directory"):
        stage_action(ctx, spec("manual", [], command=command(working_directory="../x")))
    with pytest.raises(SpecError, match="output_path"):
        stage_action(ctx, spec("manual", [], command=command(output_path="../x")))
    with pytest.raises(SpecError, match="command"):
        stage_action(ctx, spec("manual", []))


def test_import_takes_a_sub_folder_and_places_it_at_the_target(
    ctx: StageContext, tmp_path: Path
) -> None:
    tree = sources(ctx, tmp_path / "s", {"usr/bin/tool": "t", "README": "r"})
    files = stage_files(ctx, spec("import", [(tree, "")], source_root="usr", import_target="opt"))
    assert paths(ctx, files) == ["./", "opt/", "opt/bin/", "opt/bin/tool"]
    whole = stage_files(ctx, spec("import", [(tree, "")]))
    assert whole == tree
    with pytest.raises(BuildFailedError, match="'usr/lib'"):
        stage_files(ctx, spec("import", [(tree, "")], source_root="usr/lib"))
    assert paths(ctx, stage_files(ctx, spec("stack", []))) == ["./"]


# --- artifacts and state -------------------------------------------------------------


def test_artifact_layout(ctx: StageContext, tmp_path: Path) -> None:
    files = sources(ctx, tmp_path / "out", {"usr/bin/app": "a"})
    stdout = ctx.local_cas.put(b"out\n")
    build = spec("manual", [], command=command())
    state = {
        "action": digest_to_json(digest_of(b"action")),
        "exit_code": 0,
        "cached": False,
        "overlaps": {"count": 2, "paths": ["a", "b"]},
        "execution": {"worker_start": "2026-01-01T00:00:00+00:00", "execution_seconds": 1.5},
        "timings": {"stage_to_cas": 0.5},
    }
    meta = artifact_meta(build, state)
    own = MemoryBlobs(below=ctx.local_cas)
    root = build_artifact_tree(own, files, stdout, EMPTY_DIGEST, meta)
    # Its own blobs are made in memory (to be sent), not written locally.
    assert not ctx.local_cas.contains(root)
    for digest in own.digests():
        ctx.local_cas.put(own.get(digest))
    assert paths(ctx, root) == [
        "./",
        "files/",
        "files/usr/",
        "files/usr/bin/",
        "files/usr/bin/app",
        "logs/",
        "logs/stderr",
        "logs/stdout",
        "meta/",
        f"meta/{ARTIFACT_META_FILE}",
    ]
    top = ctx.local_cas.get_message(root, re_pb2.Directory)
    assert top.directories[0].digest == files
    meta_dir = ctx.local_cas.get_message(top.directories[2].digest, re_pb2.Directory)
    stored = json.loads(ctx.local_cas.get(meta_dir.files[0].digest))
    assert stored == meta
    assert stored["action"] == f"{digest_of(b'action').hash}/6"
    assert stored["runtime_dependencies"] == ["base.bst"] and stored["overlaps"] == 2
    assert stored["timings"]["worker_start"] == "2026-01-01T00:00:00+00:00"
    assert stored["timings"]["stages"] == {"stage_to_cas": 0.5}
    assert stored["kind"] == "manual" and stored["remex_version"]


def test_state_helpers() -> None:
    result = re_pb2.ActionResult(exit_code=2, stdout_raw=b"x")
    text = encode_action_result(result)
    assert json.loads(json.dumps(text)) == text
    assert decode_action_result("e", text) == result
    with pytest.raises(SpecError):
        decode_action_result("e", "not base64!")
    assert is_pending({"operation": "#1"}) and not is_pending(
        {"operation": "#1", "action_result": ""}
    )
    assert stable({"a": 1, "timings": {}, "uploaded": {}, "remote_cache_hit": True}) == {"a": 1}
    assert digest_from_json(digest_to_json(EMPTY_DIGEST)) == EMPTY_DIGEST


def test_build_failed_error_shows_the_log_tails() -> None:
    error = BuildFailedError("app.bst", "exit 3", exit_code=3, stdout_tail="o1\no2", stderr_tail="")
    assert str(error) == "app.bst: exit 3\n--- stdout (last lines) ---\no1\no2"
    assert not error.transient and error.element == "app.bst"
