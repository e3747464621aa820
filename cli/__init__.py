"""The ``remex`` command line: the top layer, above :mod:`pipeline`, :mod:`tasks`
and :mod:`bot`.

:mod:`cli.main` holds the commands (each a thin layer over :mod:`pipeline.api`,
the worker's app or the bot; :mod:`cli.source` the ``source`` group),
:mod:`cli.errors` the one place that turns errors into messages and exit codes,
:mod:`cli.progress` how a build is followed (a live table on a terminal, plain lines elsewhere).
"""

from __future__ import annotations

from cli.main import main
from cli.source import source

# Groups in modules of their own join ``remex`` here (they import cli.main).
main.add_command(source)

__all__ = ["main"]
