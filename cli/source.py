"""``remex source ...``: the source cache from the command line.

``remex source fetch`` fills the source cache through the workers (a build
of fetch nodes only); ``remex source checkout`` writes an element's sources
into a folder as a build stages them. The group lives in its own module so
that more ``source`` commands can join it (see :func:`cli.main` for how it
is added to ``remex``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click

from cli.errors import fail, handles_errors
from cli.main import option_option, project_option
from cli.progress import follow_build
from cli.source_track import track_command
from pipeline.scheduler import BuildStatus

__all__ = ["source"]


@click.group()
def source() -> None:
    """Work with elements' sources: fetch them into the source cache, check them out,
    track them."""


source.add_command(track_command)


@source.command("fetch")
@project_option
@click.argument("elements", nargs=-1)
@option_option
@click.option(
    "--deps",
    "-d",
    type=click.Choice(["none", "run", "build", "all"]),
    default="none",
    show_default=True,
    help="Also fetch the sources of these dependencies of ELEMENTS (as bst).",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results.")
@click.option("--timeout", type=float, default=None, help="Give up following after N seconds.")
@handles_errors
def fetch_command(
    project_dir: Path,
    elements: Sequence[str],
    option_pairs: Sequence[tuple[str, str]],
    deps: str,
    as_json: bool,
    timeout: float | None,
) -> None:
    """Fetch the network sources of ELEMENTS into the source cache, on the
    workers (this host downloads nothing). Exit 0 only when every one is in.

    Sources already in the cache are not fetched again.
    """
    from pipeline import api

    build_id, cached = api.submit_source_fetch(
        project_dir, list(elements), deps=deps, options=dict(option_pairs)
    )
    if build_id is None:
        if as_json:
            click.echo(json.dumps({"build": None, "status": "succeeded", "cached": cached}))
        else:
            click.echo(f"remex: nothing to fetch ({cached} source(s) in the source cache)")
        return
    final = _follow(build_id, as_json=as_json, timeout=timeout)
    sys.exit(0 if final.status == "succeeded" else 1)


@source.command("checkout")
@project_option
@click.argument("element")
@click.argument("dest", type=click.Path(path_type=Path))
@option_option
@click.option("--timeout", type=float, default=None, help="Give up fetching after N seconds.")
@handles_errors
def checkout_command(
    project_dir: Path,
    element: str,
    dest: Path,
    option_pairs: Sequence[tuple[str, str]],
    timeout: float | None,
) -> None:
    """Write ELEMENT's sources into DEST, merged as a build stages them
    (each in its ``directory``). Sources missing from the source cache are
    fetched through the workers first."""
    from pipeline import api
    from pipeline.cas import checkout
    from pipeline.config import load_config
    from pipeline.stages.staging import merged_sources

    options = dict(option_pairs)
    config = load_config(project_dir)
    with api.open_context(config) as ctx, ctx.local_cas.pin():
        _, targets = api.plan_targets(
            project_dir, [element], cas=ctx.local_cas, options=options, config=config
        )
        with tempfile.TemporaryDirectory(prefix="remex-sources-") as workdir:
            spec, missing = api.element_source_spec(ctx, targets[0], Path(workdir))
        if missing:
            build_id, _ = api.submit_source_fetch(
                project_dir, [element], deps="none", options=options, config=config
            )
            if build_id is not None:
                final = _follow(build_id, as_json=False, timeout=timeout)
                if final.status != "succeeded":
                    fail(f"the sources of {element} could not be fetched")
        merged = merged_sources(ctx, spec, full=True)
        checkout(ctx.local_cas, merged, dest)
    click.echo(f"remex: sources of {element} checked out into {dest}", err=True)


def _follow(build_id: str, *, as_json: bool, timeout: float | None) -> BuildStatus:
    click.echo(f"remex: build {build_id} submitted (fetching sources)", err=True)
    return follow_build(build_id, as_json=as_json, timeout=timeout)
