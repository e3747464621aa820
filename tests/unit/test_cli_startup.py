"""The command line's start: the collector paused while importing, on again after."""

from __future__ import annotations

import gc
import subprocess
import sys

from cli.startup import collector_paused


def test_the_collector_is_paused_inside_and_on_again_after() -> None:
    # Given the collector on
    assert gc.isenabled()

    # When something runs with it paused, then it is off inside and on again after
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    # Given the collector off
    gc.disable()
    try:
        # When something runs with it paused, then it is still off after
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_importing_the_command_line_leaves_the_collector_on() -> None:
    # When a fresh interpreter imports the command line, then its collector is on
    result = subprocess.run(
        [sys.executable, "-c", "import gc, cli; print(gc.isenabled())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "True"
