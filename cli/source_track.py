"""``remex source track ELEMENTS...``: resolve ``track`` to refs and write them into the .bst files.

Each source's :meth:`~pipeline.elements.sources.Source.track` (whatever its
kind) says what its ``track`` names now; the new ref is written into the
element's file with :func:`pipeline.elements.refs.write_source_ref`, which
changes only the ref's text. As bst with ``ref-storage: inline``: sources
can be tracked without a ref yet, elements of a junction's subproject are
left out of ``--deps all`` (and refused with ``--cross-junctions`` or as
targets, "Untrackable sources"), and a source without ``track`` is left as
it is. Every change is printed as ``FILE:LINE: ELEMENT: sources[N]: ref OLD -> NEW``.

The command is :data:`track_command`, added to the ``remex source`` group.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.errors import fail, handles_errors
from cli.main import option_option, project_option

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["track_command"]


@click.command("track")
@project_option
@click.argument("elements", nargs=-1)
@option_option
@click.option(
    "--deps",
    "-d",
    type=click.Choice(["none", "all"]),
    default="none",
    show_default=True,
    help="Also track the sources of the elements' dependencies (as bst).",
)
@click.option(
    "--cross-junctions",
    "-J",
    is_flag=True,
    help="Track elements of junctions' subprojects too (refused: refs are inline, as bst).",
)
@handles_errors
def track_command(
    project_dir: Path,
    elements: Sequence[str],
    option_pairs: Sequence[tuple[str, str]],
    deps: str,
    cross_junctions: bool,
) -> None:
    """Resolve the sources' `track` branches or tags of ELEMENTS to refs and write
    them into the .bst files (nothing else in them changes)."""
    from pipeline import api
    from pipeline.cas import LocalCas
    from pipeline.config import load_config, network_settings
    from pipeline.elements.refs import write_source_block, write_source_ref
    from pipeline.elements.show import select_elements
    from pipeline.elements.sources import FetchContext
    from pipeline.elements.sources.helpers import loading_for_tracking

    config = load_config(project_dir)
    project_dir = project_dir.resolve()
    with tempfile.TemporaryDirectory(prefix="remex-track-") as scratch:
        cas = LocalCas(Path(scratch) / "cas")
        with loading_for_tracking():
            _, targets = api.plan_targets(
                project_dir, list(elements), cas=cas, options=dict(option_pairs), config=config
            )
        selected: list[Element] = select_elements(targets, deps)  # type: ignore[arg-type,assignment]
        if not cross_junctions:
            # As bst: --deps leaves the subprojects' elements out; targets stay.
            selected = [e for e in selected if not _in_subproject(e.name) or e in targets]
        untrackable = [e.name for e in selected if _in_subproject(e.name)]
        if untrackable:
            fail(
                "Untrackable sources: tracking sources across junction boundaries needs "
                "project.refs ref-storage, and remex projects keep refs inline ("
                + ", ".join(dict.fromkeys(untrackable))
                + ")"
            )
        # Tracking fetches branches and tags: keep the mirrors for the next time.
        cache = config.cas_dir.parent / "track-cache"
        cache.mkdir(parents=True, exist_ok=True)
        ctx = FetchContext(
            cas=cas,
            workdir=Path(scratch) / "work",
            cache_dir=cache,
            network=network_settings(config),  # [fetch]'s timeouts, retries, CA bundle
        )
        ctx.workdir.mkdir()
        changed = 0
        for element in selected:
            for index, source in enumerate(element.sources):
                new = source.track(ctx)
                if new is None:
                    continue
                if source.mark.file != element.file:
                    fail(
                        f"{source.mark}: {source.field}: the source is not written in "
                        f"{element.file}, so its ref cannot be written there"
                    )
                change = write_source_ref(
                    project_dir / element.file,
                    element.file,
                    index,
                    new,
                )
                if change.changed:
                    changed += 1
                    click.echo(
                        f"{element.file}:{change.line}: {element.name}: "
                        f"sources[{index}]: ref {change.old or '(none)'} -> {change.new}"
                    )
                for key, value in source.tracked_keys().items():
                    if write_source_block(project_dir / element.file, element.file, index,
                                          key, value):  # fmt: skip
                        click.echo(
                            f"{element.file}: {element.name}: sources[{index}]: {key} "
                            f"written ({len(value)} entries)"
                        )
        click.echo(f"{changed} ref(s) changed")


def _in_subproject(name: str) -> bool:
    # A subproject's elements are named through their junction (`j.bst:e.bst`).
    return ":" in name
