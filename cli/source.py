"""``remex source ...``: commands on elements' sources (a group other modules add to)."""

from __future__ import annotations

import click

from cli.source_track import track_command

__all__ = ["source"]


@click.group()
def source() -> None:
    """Work with elements' sources."""


source.add_command(track_command)
