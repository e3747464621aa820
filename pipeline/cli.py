"""The ``remex`` command line."""

from __future__ import annotations

import click

from pipeline import __version__


@click.group()
@click.version_option(__version__, prog_name="remex")
def main() -> None:
    """remex: build BuildStream-style elements on a REAPI service with Celery."""
