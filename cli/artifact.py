"""``remex artifact list|show|log|delete|checkout``: the artifacts on the
artifact server, as ``bst artifact``'s commands (see :mod:`pipeline.artifacts`
for the arguments they take). ``remex checkout`` and ``remex log`` are the
element-only forms of two of them and share their code here."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from cli.errors import broker_error_message, fail, handles_errors
from cli.main import main, option_option, project_option

if TYPE_CHECKING:
    from pipeline.artifact_index import ArtifactRef
    from pipeline.artifacts import ArtifactTarget
    from pipeline.config import RemexConfig
    from pipeline.stages import StageContext
    from pipeline.stages.artifacts import ArtifactSummary

deps_option = click.option(
    "--deps",
    "-d",
    type=click.Choice(["none", "run", "build", "all"]),
    default="none",
    show_default=True,
    help="Also the elements' dependencies (element names only; as bst artifact).",
)


@main.group()
def artifact() -> None:
    """Artifacts on the artifact server: list, show, log, delete, checkout.

    As bst artifact: ARTIFACTS are element names, artifact refs
    (PROJECT/ELEMENT/KEY, with wildcards) or cache keys. Not found: one line,
    exit 1; bad usage: exit 2.
    """


def _targets(
    config: RemexConfig,
    ctx: StageContext,
    project_dir: Path,
    arguments: Sequence[str],
    option_pairs: Sequence[tuple[str, str]],
    *,
    deps: str = "none",
    key_prefix: str | None = None,
) -> list[ArtifactTarget]:
    from pipeline.artifacts import open_index, resolve_targets

    return resolve_targets(
        arguments,
        project_dir=project_dir,
        options=dict(option_pairs),
        config=config,
        cas=ctx.local_cas,
        deps=deps,
        index=lambda: open_index(config),
        key_prefix=key_prefix,
    )


def _summaries(
    ctx: StageContext, targets: Sequence[ArtifactTarget]
) -> list[ArtifactSummary | None]:
    """Each target's artifact (None: not there), a few lookups at a time."""
    from pipeline.stages.artifacts import artifact_summary

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda t: artifact_summary(ctx, t.uri), targets))


def human_size(size: int) -> str:
    """``1.5 KiB``, ``12 B``: sizes as people read them."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # not reached


def _record(target: ArtifactTarget, summary: ArtifactSummary | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": target.label,
        "ref": str(target.ref),
        "key": target.ref.cache_key,
        "uri": target.uri,
        "cached": summary is not None,
    }
    if summary is not None:
        meta = summary.meta
        record.update(
            files=summary.files,
            size_bytes=summary.size_bytes,
            host=meta.get("host"),
            worker=meta.get("worker"),
            pushed=meta.get("pushed"),
            action_cached=meta.get("action_cached"),
        )
    return record


@artifact.command("list")
@project_option
@click.argument("artifacts", nargs=-1)
@option_option
@click.option("--key", "key_prefix", metavar="PREFIX", help="Every artifact whose key starts so.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@handles_errors
def list_artifacts(
    project_dir: Path,
    artifacts: Sequence[str],
    option_pairs: Sequence[tuple[str, str]],
    key_prefix: str | None,
    as_json: bool,
) -> None:
    """List the stored artifacts of ARTIFACTS (or of --key PREFIX): key, size, name.

    An element name lists the artifact of its current key and those of its
    other keys in the index. Only what is on the artifact server is listed;
    when nothing is, exit 1.
    """
    from pipeline import api
    from pipeline.artifacts import ArtifactsNotFoundError
    from pipeline.config import load_config

    if not artifacts and key_prefix is None:
        fail("give ARTIFACTS (element names, artifact refs, keys) or --key PREFIX")
    config = load_config(project_dir)
    with api.open_context(config) as ctx, ctx.local_cas.pin():
        targets = _targets(config, ctx, project_dir, artifacts, option_pairs, key_prefix=key_prefix)
        # An element's other keys, from the index (when there is a broker).
        elements = [t for t in targets if t.element is not None]
        if elements:
            targets.extend(_other_keys(config, elements, {t.ref for t in targets}))
        found = [(t, s) for t, s in zip(targets, _summaries(ctx, targets), strict=True) if s]
    if not found:
        asked = ", ".join(artifacts) or f"key {key_prefix}"
        raise ArtifactsNotFoundError(f"no artifact of {asked} is on the artifact server")
    if as_json:
        click.echo(json.dumps([_record(t, s) for t, s in found], indent=2))
        return
    for target, summary in found:
        click.echo(
            f"{target.ref.cache_key}  {human_size(summary.size_bytes):>10}  "
            f"{summary.files:>6} files  {target.ref.project}/{target.ref.normal_name}"
        )


def _other_keys(
    config: RemexConfig, elements: Sequence[ArtifactTarget], known: set[ArtifactRef]
) -> list[ArtifactTarget]:
    """The index's artifacts of ``elements`` under keys other than ``known``
    ones; none when there is no broker or it cannot be reached (a warning)."""
    from pipeline.artifacts import ArtifactTarget, open_index
    from pipeline.errors import ConfigError

    found: list[ArtifactTarget] = []
    try:
        index = open_index(config)
        for target in elements:
            ref = target.ref
            for other in index.matching(f"{ref.project}/{ref.normal_name}/*"):
                if other not in known:
                    known.add(other)
                    found.append(ArtifactTarget(other, f"{target.label} ({other.cache_key[:8]})"))
    except ConfigError:
        return []  # no broker here: the current keys only
    except Exception as exc:
        message = broker_error_message(exc)
        if message is None:
            raise
        click.echo(f"remex: warning: current keys only: {message}", err=True)
    return found


@artifact.command("show")
@project_option
@click.argument("artifacts", nargs=-1, required=True)
@option_option
@deps_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@handles_errors
def show_artifacts(
    project_dir: Path,
    artifacts: Sequence[str],
    option_pairs: Sequence[tuple[str, str]],
    deps: str,
    as_json: bool,
) -> None:
    """Show whether ARTIFACTS are cached: state, key, name, then (cached) the
    file count, size, the host that pushed it and when.

    Exit 0 when every one is cached, else 1 (after listing them all).
    """
    from pipeline import api
    from pipeline.config import load_config

    config = load_config(project_dir)
    with api.open_context(config) as ctx, ctx.local_cas.pin():
        targets = _targets(config, ctx, project_dir, artifacts, option_pairs, deps=deps)
        summaries = _summaries(ctx, targets)
    if as_json:
        click.echo(
            json.dumps([_record(t, s) for t, s in zip(targets, summaries, strict=True)], indent=2)
        )
    else:
        for target, summary in zip(targets, summaries, strict=True):
            key = target.ref.cache_key[:16]
            if summary is None:
                click.echo(f"{'not cached':<11} {key}  {target.label}")
                continue
            meta = summary.meta
            built = f"  {meta['host']}" if meta.get("host") else ""
            built += f" at {meta['pushed']}" if meta.get("pushed") else ""
            click.echo(
                f"{'cached':<11} {key}  {target.label}  {summary.files} files  "
                f"{human_size(summary.size_bytes)}{built}"
            )
    missing = sum(1 for s in summaries if s is None)
    if missing:
        fail(f"{missing} of {len(targets)} artifact(s) not cached", code=1)


@artifact.command("log")
@project_option
@click.argument("artifacts", nargs=-1, required=True)
@option_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write each log to OUT/PROJECT/ELEMENT/KEY.log instead of stdout.",
)
@handles_errors
def log_artifacts(
    project_dir: Path,
    artifacts: Sequence[str],
    option_pairs: Sequence[tuple[str, str]],
    out: Path | None,
) -> None:
    """Print the build logs of ARTIFACTS (stdout, then stderr): from the
    artifact, or from the failure record a failed build left."""
    from pipeline import api
    from pipeline.config import load_config

    config = load_config(project_dir)
    with api.open_context(config) as ctx, ctx.local_cas.pin():
        targets = _targets(config, ctx, project_dir, artifacts, option_pairs)
        for target in targets:
            if out is not None:
                path = out / f"{target.ref}.log"
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("w") as stream:
                    write_log(ctx, target, stream)
                click.echo(f"{target.label}: {path}")
                continue
            if len(targets) > 1:
                click.echo(f"==> {target.label} ({target.ref.cache_key[:16]}) <==")
            write_log(ctx, target, sys.stdout)


def write_log(ctx: StageContext, target: ArtifactTarget, stream: IO[str]) -> None:
    """Write the target's build log (stdout, then stderr) to ``stream``.

    Raises:
        ArtifactsNotFoundError: neither an artifact nor a failure record is stored.
    """
    from pipeline.artifacts import ArtifactsNotFoundError
    from pipeline.stages import ArtifactNotFoundError
    from pipeline.stages.artifacts import read_artifact_logs

    try:
        stdout, stderr = read_artifact_logs(ctx, target.uri, target.failure_record_uri)
    except ArtifactNotFoundError as exc:
        raise ArtifactsNotFoundError(
            f"no build log of {target.label} (key {target.ref.cache_key[:16]}): "
            "it was neither built nor failed on this artifact server"
        ) from exc
    stream.write(stdout.decode(errors="replace"))
    if stderr:
        stream.write(stderr.decode(errors="replace"))


@artifact.command("delete")
@project_option
@click.argument("artifacts", nargs=-1, required=True)
@option_option
@deps_option
@handles_errors
def delete_artifacts(
    project_dir: Path,
    artifacts: Sequence[str],
    option_pairs: Sequence[tuple[str, str]],
    deps: str,
) -> None:
    """Delete ARTIFACTS from the artifact server: the next build makes them again.

    Remote Asset cannot remove a name: remex pushes it again to a marker tree
    it reads as "not there" (see docs/operations.md). The action's cached
    result on the execution service is kept, so an unchanged action is not
    run again. Exit 1 when one of them was not cached.
    """
    from pipeline import api
    from pipeline.artifacts import open_index
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.stages.artifacts import delete_artifact

    config = load_config(project_dir)
    missing: list[str] = []
    with api.open_context(config) as ctx, ctx.local_cas.pin():
        targets = _targets(config, ctx, project_dir, artifacts, option_pairs, deps=deps)
        for target in targets:
            if delete_artifact(ctx, target.uri):
                click.echo(f"deleted {target.label} ({target.ref.cache_key[:16]})")
            else:
                missing.append(target.label)
    try:
        index = open_index(config)
        for target in targets:
            index.remove(target.ref)
    except ConfigError:
        pass  # no broker here: nothing indexed to forget
    except Exception as exc:
        # The artifacts are deleted; a stale index entry is only a hint
        # (whatever it lists is looked up before it is shown).
        message = broker_error_message(exc)
        if message is None:
            raise
        click.echo(f"remex: warning: the artifact index was not updated: {message}", err=True)
    if missing:
        fail(f"not cached, nothing deleted: {', '.join(missing)}", code=1)


@artifact.command("checkout")
@project_option
@click.argument("target")
@click.argument("dest", type=click.Path(path_type=Path))
@option_option
@click.option(
    "--deps",
    type=click.Choice(["none", "run"]),
    default="none",
    show_default=True,
    help="Also check out the element's runtime dependencies (element names only).",
)
@click.option(
    "--integrate/--no-integrate",
    default=True,
    show_default=True,
    help="Run the elements' integration commands on the tree first (element names "
    "only: a ref or key is checked out as stored).",
)
@handles_errors
def checkout_artifact_command(
    project_dir: Path,
    target: str,
    dest: Path,
    option_pairs: Sequence[tuple[str, str]],
    deps: str,
    integrate: bool,
) -> None:
    """Write TARGET's files into DEST (as remex checkout; TARGET may also be
    an artifact ref or key)."""
    from pipeline import api
    from pipeline.artifacts import classify_argument
    from pipeline.config import load_config
    from pipeline.stages import checkout_artifact

    config = load_config(project_dir)
    kind = classify_argument(target)
    with api.open_context(config) as ctx, ctx.local_cas.pin():
        if kind == "element":
            checkout_element(ctx, config, project_dir, target, dest, option_pairs, deps, integrate)
        else:
            if deps != "none":
                fail("--deps run needs an element name (a ref has no dependency graph)")
            targets = _targets(config, ctx, project_dir, [target], option_pairs)
            if len(targets) > 1:
                fail(f"{target!r} matches {len(targets)} artifacts; give more of the key")
            [only] = targets
            _require_cached(ctx, only.uri, only.label, only.ref.cache_key)
            checkout_artifact(ctx, only.uri, dest)
    click.echo(f"checked out {target} into {dest}")


def checkout_element(
    ctx: StageContext,
    config: RemexConfig,
    project_dir: Path,
    element: str,
    dest: Path,
    option_pairs: Sequence[tuple[str, str]],
    deps: str,
    integrate: bool,
) -> None:
    """Check ``element`` (and with ``deps="run"`` its runtime dependencies) out
    into ``dest``, integrated unless ``integrate`` is false: ``remex checkout``
    and ``remex artifact checkout`` alike.

    Raises:
        ArtifactsNotFoundError: the element's artifact is not stored (or was deleted).
    """
    from pipeline import api
    from pipeline.elements.element import integration_spec
    from pipeline.errors import RemexError
    from pipeline.stages import build_plan, checkout_artifact

    plan = api.plan(
        project_dir, [element], cas=ctx.local_cas, options=dict(option_pairs), config=config
    )
    target = plan[-1]
    # First: an integrated tree of a deleted artifact may still be stored.
    _require_cached(ctx, target.artifact_uri, element, target.cache_key)
    elements = target.runtime_closure() if deps == "run" else [target]
    spec = integration_spec(elements, target) if integrate else None
    if spec is None:
        runtime = [e.artifact_uri for e in elements[:-1]]
        checkout_artifact(ctx, target.artifact_uri, dest, runtime_deps=runtime)
    else:
        [result] = build_plan(ctx, [spec])
        if result["error"] is not None:
            raise RemexError(f"integrating {element} failed: {result['error']}")
        checkout_artifact(ctx, spec, dest)


def _require_cached(ctx: StageContext, uri: str, label: str, key: str) -> None:
    from pipeline.artifacts import ArtifactsNotFoundError
    from pipeline.stages.artifacts import fetch_artifact_root

    if fetch_artifact_root(ctx, uri) is None:
        raise ArtifactsNotFoundError(f"{label} is not cached (key {key[:16]}): build it first")
