"""Stages 1 and 2: build the input root and the Action locally, upload them.

``stage_to_cas`` works from the spec alone: dependency artifacts and source
trees come from the artifact server (by URI and by digest), so any host can
run it, and running it again gives the same digests. ``upload`` relies on
that: on a host whose local CAS lacks the action, it derives it again.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.duration_pb2 import Duration

from pipeline.cas import LocalCas, merge_trees, tree_digests
from pipeline.digest import Digest, digest_from_json, digest_to_str
from pipeline.errors import BlobNotFoundError, LocalBlobMissingError, LocalCasError
from pipeline.reapi.cas import UploadStats
from pipeline.spec import BuildSpec, CommandSpec
from pipeline.stages.artifacts import artifact_files, fetch_artifact_root
from pipeline.stages.context import StageContext
from pipeline.stages.errors import (
    BuildFailedError,
    DependencyArtifactMissingError,
    SourceMissingError,
    SpecError,
)
from pipeline.stages.fetch import resolve_source
from pipeline.stages.overlaps import (
    StagedLayer,
    StagingConflictError,
    analyse_staging,
    whitelist_regex,
)
from pipeline.stages.patching import apply_source_step
from pipeline.stages.recovery import rederives_lost_blobs
from pipeline.stages.select import select_tree
from pipeline.stages.state import (
    STAGE_KEYS,
    State,
    digest_in,
    dj,
    encode_action_result,
    with_timing,
)
from pipeline.stages.trees import (
    directories_complete,
    empty_tree,
    place_at,
    split_path,
    subtree,
    tree_complete,
)
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Action,
    ActionResult,
    Command,
    Directory,
    Platform,
)

__all__ = [
    "MAX_OVERLAPS_SHOWN",
    "StagedAction",
    "check_staging",
    "dependency_files",
    "ensure_local_action",
    "made_by_staging",
    "merged_sources",
    "output_paths_in_command",
    "stage_action",
    "stage_files",
    "stage_to_cas",
    "upload",
]

MAX_OVERLAPS_SHOWN = 20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedAction:
    """An element's action, stored in the local CAS."""

    action: Digest
    command: Digest
    input_root: Digest
    overlaps: list[str] = field(default_factory=list)
    """The overlapping paths (absolute), as BuildStream reports them."""
    staging: dict[str, Any] = field(default_factory=dict)
    """The staging report as the state's ``overlaps`` (see :func:`check_staging`)."""


# --- stage 1 -------------------------------------------------------------------


@rederives_lost_blobs
def stage_to_cas(ctx: StageContext, spec: BuildSpec, state: State) -> State:
    """Stage 1: build what the element needs in the local CAS; check the ActionCache.

    With a command: fetch the dependencies' artifact files and the sources
    from the artifact server, merge them into the input root (dependencies at
    their paths in order, sources at ``source_root``), store the Command and
    Action, and look the action up in the execution server's ActionCache.
    Without one: the same tree (each dependency filtered by its ``select``)
    is built, and its ``files_root`` folder, placed at ``files_target``, is
    the artifact's files.

    Returns:
        The state with ``action`` (None without a command); with one
        ``command``, ``input_root``, ``overlaps``, ``cached``,
        ``skip_cache_lookup`` and, when ``cached``, ``action_result``;
        without one, ``files`` and ``overlaps``.

    Raises:
        DependencyArtifactMissingError: a dependency's artifact is not on the artifact server.
        SourceMissingError: a source tree is not in the artifact server's CAS.
        BuildFailedError: ``files_root`` is not a folder of the tree.
        SpecError: the spec is malformed.
        RemoteError: a server failed (after retries).
    """
    started = time.monotonic()
    new = {k: v for k, v in state.items() if k not in STAGE_KEYS}
    new["timings"] = dict(state.get("timings") or {})
    if spec["command"] is not None:
        staged = stage_action(ctx, spec)
        new.update(_action_keys(staged))
        new.update(_cache_lookup(ctx, staged.action))
    else:
        files, staging = _staged_files(ctx, spec)
        new["action"] = None
        new["files"] = dj(files)
        new["overlaps"] = staging
    return with_timing(new, "stage_to_cas", time.monotonic() - started)


def stage_action(ctx: StageContext, spec: BuildSpec, *, full: bool = False) -> StagedAction:
    """Build and store the input root, Command and Action of an element with a command.

    Deterministic: the same spec and the same artifacts give the same digests.
    With ``ctx.minimal`` (and not ``full``) only the Directory messages of the
    dependencies and sources are fetched: the input root is built from them,
    and their files stay on the servers.
    """
    element = spec["element"]
    command_spec = spec["command"]
    if command_spec is None:
        raise SpecError(element, "only an element with a command has an action")
    cas = ctx.local_cas
    workdir_parts = _parts(spec, command_spec["working_directory"], "command.working_directory")
    output_parts = _parts(spec, command_spec["output_path"], "command.output_path")

    files = [dependency_files(ctx, spec, i, full=full) for i in range(len(spec["dependencies"]))]
    staging = check_staging(ctx, spec, files)
    layers = [place_at(cas, f, _dependency_path(spec, i)) for i, f in enumerate(files)]
    layers.append(_placed_sources(ctx, spec, full=full))
    # The working directory and the install root exist even when nothing is
    # staged there, as in a BuildStream sandbox.
    empty = empty_tree(cas)
    layers.append(place_at(cas, empty, workdir_parts))
    if output_parts:
        layers.append(place_at(cas, empty, output_parts))
    merged = merge_trees(cas, layers)

    platform = _platform(command_spec)
    command = cas.put_message(
        Command(
            arguments=list(command_spec["arguments"]),
            environment_variables=[
                Command.EnvironmentVariable(name=name, value=value)
                for name, value in sorted(command_spec["environment"].items())
            ],
            working_directory="/".join(workdir_parts),
            output_paths=output_paths_in_command(command_spec),
            platform=platform,
        )
    )
    action = Action(command_digest=command, input_root_digest=merged.digest, platform=platform)
    timeout = command_spec.get("timeout_seconds")
    if timeout:
        action.timeout.CopyFrom(Duration(seconds=int(timeout)))
    return StagedAction(
        action=cas.put_message(action),
        command=command,
        input_root=merged.digest,
        overlaps=list(staging["paths"]),
        staging=staging,
    )


def stage_files(ctx: StageContext, spec: BuildSpec) -> Digest:
    """The files of an element without a command (see :func:`stage_to_cas`).

    Raises:
        BuildFailedError: ``files_root`` is not a folder of the staged tree.
    """
    return _staged_files(ctx, spec)[0]


def _staged_files(ctx: StageContext, spec: BuildSpec) -> tuple[Digest, dict[str, Any]]:
    if spec["command"] is not None:
        raise SpecError(spec["element"], "an element with a command gets its files by running it")
    cas = ctx.local_cas
    all_files = [dependency_files(ctx, spec, i) for i in range(len(spec["dependencies"]))]
    # As BuildStream's compose: overlaps are those of the whole artifacts,
    # staged before the split rules select what is kept.
    staging = check_staging(ctx, spec, all_files)
    layers = []
    for index, dependency in enumerate(spec["dependencies"]):
        files = all_files[index]
        if dependency["select"] is not None:
            files = select_tree(cas, files, dependency["select"])
        layers.append(place_at(cas, files, _dependency_path(spec, index)))
    layers.append(_placed_sources(ctx, spec))
    merged = merge_trees(cas, layers)
    files_root = spec["files_root"]
    taken = subtree(cas, merged.digest, _parts(spec, files_root, "files_root"))
    if taken is None:
        raise BuildFailedError(
            spec["element"], f"the folder {files_root!r} is not in what the element stages"
        )
    return place_at(cas, taken, _parts(spec, spec["files_target"], "files_target")), staging


def check_staging(ctx: StageContext, spec: BuildSpec, files: list[Digest]) -> dict[str, Any]:
    """Find the overlaps and unstaged files of staging the dependencies, as BuildStream does.

    Each warning is logged with the element's name; the report is returned
    as the state's ``overlaps`` (``count``, ``paths``, ``not_whitelisted``,
    ``details``, ``unstaged``, ``warnings``).

    Args:
        files: each dependency's whole artifact files, in the spec's order.

    Raises:
        BuildFailedError: (permanent) a warning the spec's ``fatal_warnings``
            makes fatal, or a folder of a dependency lands on a file.
    """
    element = spec["element"]
    layers = [
        StagedLayer(
            element=dependency["element"],
            location="/".join(_dependency_path(spec, index)),
            files=digest,
            whitelist=whitelist_regex(dependency.get("overlap_whitelist") or []),
        )
        for index, (dependency, digest) in enumerate(zip(spec["dependencies"], files, strict=True))
    ]
    try:
        report = analyse_staging(ctx.local_cas, layers)
    except StagingConflictError as exc:
        raise BuildFailedError(element, f"staging its dependencies failed: {exc}") from exc
    fatal_tokens = spec.get("fatal_warnings") or []
    fatal = report.fatal(fatal_tokens)
    for warning in report.warnings:
        if warning not in fatal:
            log.warning("%s: %s", element, warning.text())
    if fatal:
        tokens = sorted({w.token for w in fatal})
        text = "\n".join(w.text() for w in fatal)
        raise BuildFailedError(
            element,
            f"fatal warnings while staging its dependencies "
            f"(project.conf fatal-warnings: {', '.join(tokens)}):\n{text}",
        )
    return report.to_state(MAX_OVERLAPS_SHOWN)


def output_paths_in_command(command_spec: CommandSpec) -> list[str]:
    """The output paths as REAPI wants them: relative to the working directory.

    The spec gives the output folder relative to the input root; ``../``
    climbs out of the working directory (as BuildStream's remote sandbox
    does). An output folder of "" (the whole sandbox) is ``.`` from the root,
    or the climb to it.
    """
    workdir = "/".join(split_path(command_spec["working_directory"]))
    output = "/".join(split_path(command_spec["output_path"])) or "."
    return [posixpath.relpath(output, workdir or ".")]


# --- stage 2 -------------------------------------------------------------------


@rederives_lost_blobs
def upload(ctx: StageContext, spec: BuildSpec, state: State) -> State:
    """Stage 2: upload the action, its command and its input root to the execution CAS.

    Only what the server lacks is sent. A no-op without a command and for a
    cached action. On a host that did not run :func:`stage_to_cas` the action
    is derived again first (see :func:`ensure_local_action`).

    Returns:
        The state (with ``action`` etc. updated if deriving gave a new action)
        and ``uploaded`` ``{"blobs", "bytes"}``.

    Raises:
        As :func:`stage_to_cas` (when deriving again), and RemoteError.
    """
    started = time.monotonic()
    new = state.copy()
    if spec["command"] is None or state.get("cached"):
        return with_timing(new, "upload", time.monotonic() - started)
    new = ensure_local_action(ctx, spec, new)
    try:
        stats = _upload_action(ctx, spec, new)
    except LocalBlobMissingError:
        # Evicted from the local CAS meanwhile (a cleanup): derive it again, once.
        new = ensure_local_action(ctx, spec, new, force=True)
        stats = _upload_action(ctx, spec, new)
    new["uploaded"] = {"blobs": stats.blobs_sent, "bytes": stats.bytes_sent}
    return with_timing(new, "upload", time.monotonic() - started)


def ensure_local_action(
    ctx: StageContext, spec: BuildSpec, state: State, *, force: bool = False
) -> State:
    """Make sure the local CAS holds the state's action, command and whole input root.

    When it does not (another host ran :func:`stage_to_cas`, or a cleanup
    evicted them), they are derived again from the spec. Should that give a
    different action (a dependency's artifact was pushed again with other
    content meanwhile), the state is updated to the new action.

    Returns:
        The state, updated when the action changed.
    """
    element = spec["element"]
    action = digest_in(element, state, "action")
    if not force and _action_complete_locally(ctx, action):
        return state
    if force:
        # Blobs went missing somewhere: look the artifacts up again, and
        # bring the files home so that the upload can send them.
        ctx.forget_artifacts()
    staged = stage_action(ctx, spec, full=force)
    new = state.copy()
    if staged.action != action:
        new.update(_action_keys(staged))
        new["cached"] = False
        new["skip_cache_lookup"] = False
        new["rederived_from"] = digest_to_str(action)
    return new


# --- private -------------------------------------------------------------------


def _action_keys(staged: StagedAction) -> State:
    return {
        "action": dj(staged.action),
        "command": dj(staged.command),
        "input_root": dj(staged.input_root),
        "overlaps": staged.staging,
    }


def _cache_lookup(ctx: StageContext, action: Digest) -> dict[str, Any]:
    """``cached``/``action_result`` for a usable cached success; else ``skip_cache_lookup``
    when the cache holds something that must not be reused."""
    result = ctx.action_cache.get_action_result(action)
    if result is None:
        return {"cached": False, "skip_cache_lookup": False}
    # A cached failure (buildbox-casd caches them by default) is not an answer:
    # the build may have failed for a reason that is gone. A success whose
    # outputs the server has lost is not one either.
    if result.exit_code != 0 or not _outputs_present(ctx, result):
        return {"cached": False, "skip_cache_lookup": True}
    return {
        "cached": True,
        "skip_cache_lookup": False,
        "action_result": encode_action_result(result),
    }


def _outputs_present(ctx: StageContext, result: ActionResult) -> bool:
    digests = [d.tree_digest for d in result.output_directories if d.HasField("tree_digest")]
    digests += [
        d.root_directory_digest
        for d in result.output_directories
        if d.HasField("root_directory_digest")
    ]
    digests += [f.digest for f in result.output_files]
    for name in ("stdout_digest", "stderr_digest"):
        if result.HasField(name):
            digests.append(getattr(result, name))
    return not ctx.execution_cas.find_missing(digests)


def _action_complete_locally(ctx: StageContext, action: Digest) -> bool:
    cas = ctx.local_cas
    if not cas.contains(action):
        return False
    try:
        message = cas.get_message(action, Action)
    except LocalBlobMissingError:
        return False
    if not cas.contains(message.command_digest):
        return False
    if ctx.minimal:
        return directories_complete(cas, message.input_root_digest)
    return tree_complete(cas, message.input_root_digest)


def _upload_action(ctx: StageContext, spec: BuildSpec, state: State) -> UploadStats:
    element = spec["element"]
    action = digest_in(element, state, "action")
    cas = ctx.local_cas
    message = cas.get_message(action, Action)
    if not state.get("reupload") and not state.get("reuploads"):
        made = made_by_staging(ctx, spec, message.input_root_digest)
        if made is not None:
            # What staging made is sent without asking (one BatchUpdateBlobs,
            # no FindMissingBlobs); the rest of the input root is the
            # artifacts' and sources' trees, on the server they came from,
            # which is the execution CAS. Should the server have lost some
            # of it, Execute says so and the policy's re-upload (``reupload``
            # set) takes the path below, which asks the server.
            return ctx.execution_cas.upload_unless_recent(
                cas, [*made, message.command_digest, action]
            )
    # One FindMissingBlobs and (usually) one BatchUpdateBlobs for the whole
    # action: each round trip is a noticeable part of a small element's time.
    # Files the local CAS does not hold (built without the bytes) are on the
    # artifact server: copied from there when it is another server.
    return ctx.execution_cas.upload_missing_from(
        cas,
        [*tree_digests(cas, message.input_root_digest), message.command_digest, action],
        fallback=None if ctx.artifacts_on_storage else ctx.artifact_cas,
    )


def made_by_staging(ctx: StageContext, spec: BuildSpec, input_root: Digest) -> list[Digest] | None:
    """The Directory messages of ``input_root`` that staging made (merged
    folders, the folders a tree was placed in): those not in any of the trees
    staged (the dependencies' artifact files and the sources), which were
    read from the artifact server.

    None when that cannot be told from this host's memory and local CAS
    alone, or when the artifact server is not the execution CAS, or when a
    source step (a patch) made files: then the caller asks the server what
    it lacks.
    """
    if not ctx.artifacts_on_storage:
        return None
    layers: list[Digest] = []
    for dependency in spec["dependencies"]:
        files = ctx.known_artifact_files(dependency["artifact_uri"])
        if files is None:
            return None
        layers.append(files)
    for source in spec["sources"]:
        if "apply" in source or not isinstance(source.get("digest"), dict):
            return None
        try:
            layers.append(digest_from_json(source["digest"]))
        except ValueError:
            return None
    cas = ctx.local_cas
    try:
        known_dirs, known_files = _layer_contents(cas, layers)
        made: list[Digest] = []
        seen: set[tuple[str, int]] = set()
        pending = [input_root]
        while pending:
            digest = pending.pop()
            key = (digest.hash, digest.size_bytes)
            if key in seen or key in known_dirs or digest.size_bytes == 0:
                continue
            seen.add(key)
            made.append(digest)
            directory = cas.get_message(digest, Directory)
            for node in directory.files:
                if node.digest.size_bytes and (
                    (node.digest.hash, node.digest.size_bytes) not in known_files
                ):
                    return None  # a file staging did not take from a tree
            pending.extend(node.digest for node in directory.directories)
    except LocalCasError:
        return None
    return made


def _layer_contents(
    cas: LocalCas, roots: list[Digest]
) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """The Directory and file digests (as keys) of the trees under ``roots``."""
    dirs: set[tuple[str, int]] = set()
    files: set[tuple[str, int]] = set()
    pending = list(roots)
    while pending:
        digest = pending.pop()
        key = (digest.hash, digest.size_bytes)
        if key in dirs:
            continue
        dirs.add(key)
        if digest.size_bytes == 0:
            continue
        directory = cas.get_message(digest, Directory)
        files.update((n.digest.hash, n.digest.size_bytes) for n in directory.files)
        pending.extend(n.digest for n in directory.directories)
    return dirs, files


def dependency_files(
    ctx: StageContext, spec: BuildSpec, index: int, *, full: bool = False
) -> Digest:
    """The ``files/`` digest of dependency ``index``'s artifact, its tree in the
    local CAS: whole, or (``ctx.minimal`` and not ``full``) its Directory
    messages only. The artifact a URI names is remembered by the process.

    Raises:
        DependencyArtifactMissingError: the artifact is not on the artifact server.
    """
    dependency = spec["dependencies"][index]
    uri = dependency["artifact_uri"]
    files = ctx.known_artifact_files(uri)
    try:
        if files is None:
            # Built elsewhere: FetchDirectory, then one GetTree of the
            # artifact's root brings its files/ tree (not a read of the root
            # and a GetTree of files/).
            root = fetch_artifact_root(ctx, uri)
            if root is None:
                raise DependencyArtifactMissingError(spec["element"], dependency["element"], uri)
            files = artifact_files(ctx, root, uri, whole=full or not ctx.minimal)
            ctx.remember_artifact_files(uri, files)
        else:
            _fetch(ctx, files, full=full)
    except BlobNotFoundError as exc:
        ctx.forget_artifacts()
        raise DependencyArtifactMissingError(spec["element"], dependency["element"], uri) from exc
    return files


def _fetch(ctx: StageContext, root: Digest, *, full: bool = False) -> None:
    """Bring a tree from the artifact server: whole, or its Directory messages
    (``ctx.minimal`` and not ``full``)."""
    if ctx.minimal and not full:
        ctx.artifact_cas.fetch_directories(ctx.local_cas, root)
    else:
        ctx.artifact_cas.fetch_tree(ctx.local_cas, root)


def _dependency_path(spec: BuildSpec, index: int) -> list[str]:
    return _parts(spec, spec["dependencies"][index]["path"], f"dependencies[{index}].path")


def _placed_sources(ctx: StageContext, spec: BuildSpec, *, full: bool = False) -> Digest:
    """The element's sources fetched and merged, each in its ``directory``, at ``source_root``."""
    merged = merged_sources(ctx, spec, full=full)
    return place_at(ctx.local_cas, merged, _parts(spec, spec["source_root"], "source_root"))


def merged_sources(ctx: StageContext, spec: BuildSpec, *, full: bool = False) -> Digest:
    """The element's sources brought into the local CAS and merged, each in
    its ``directory`` (as the build stages them, before ``source_root``).

    A source given by its source cache URI (no digest: a fetch node of the
    build downloaded it) is looked up there.

    Raises:
        SpecError: a malformed source entry.
        SourceMissingError: a snapshotted tree is not in the artifact CAS.
        SourceNotFetchedError: the source cache has nothing under a source's URI.
    """
    cas = ctx.local_cas
    placed: list[Digest] = []
    # A step that changes the files staged before it (a patch) needs them all.
    full = full or any("apply" in source for source in spec["sources"])
    for index, source in enumerate(spec["sources"]):
        try:
            if "digest" in source:
                digest = digest_from_json(source["digest"])
            else:
                digest = resolve_source(ctx, spec["element"], index, source)
        except (ValueError, KeyError, TypeError) as exc:
            raise SpecError(spec["element"], f"source #{index + 1}: {exc}") from exc
        try:
            _fetch(ctx, digest, full=full)
        except BlobNotFoundError as exc:
            raise SourceMissingError(
                spec["element"], index, source["kind"], digest_to_str(digest)
            ) from exc
        directory = _parts(spec, source["directory"], f"sources[{index}].directory")
        if "apply" in source:
            so_far = merge_trees(cas, placed).digest
            step = source["apply"]
            placed = [
                apply_source_step(cas, spec["element"], index, step, directory, so_far, digest)
            ]
            continue
        placed.append(place_at(cas, digest, directory))
    return merge_trees(cas, placed).digest


def _parts(spec: BuildSpec, path: str, what: str) -> list[str]:
    try:
        return split_path(path)
    except ValueError as exc:
        raise SpecError(spec["element"], f"{what}: {exc}") from exc


def _platform(command_spec: CommandSpec) -> Platform:
    return Platform(
        properties=[
            Platform.Property(name=name, value=value)
            for name, value in sorted(command_spec["platform"].items())
        ]
    )
