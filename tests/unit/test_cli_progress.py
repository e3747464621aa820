"""``remex build``'s output without a terminal (CI logs, ``| tee``): plain
lines, one per element state change, then the summary on a line of its own.

The build is faked (pipeline.api.submit / wait replaced); the command runs
through click's runner, whose streams are not terminals.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from cli import main
from cli.progress import PlainLines, follow
from pipeline import api
from pipeline.scheduler import BuildStatus, ElementStatus


def status(overall: str, **elements: tuple[str, dict[str, Any]]) -> BuildStatus:
    return BuildStatus(
        "b1",
        overall,
        {},
        [ElementStatus(name, state, info) for name, (state, info) in elements.items()],
    )


STATUSES = [
    status("running", a=("queued", {}), b=("waiting", {})),
    status(
        "running",
        a=("running", {"stage": "execute", "remote_stage": "EXECUTING"}),
        b=("waiting", {}),
    ),
    status(
        "running",
        a=("running", {"stage": "execute", "remote_stage": "EXECUTING"}),
        b=("waiting", {}),
    ),
    status("running", a=("built", {"action_cached": True}), b=("running", {"stage": "upload"})),
    status("succeeded", a=("built", {"action_cached": True}), b=("built", {})),
]


def fake_wait(
    build_id: str, *, on_update: Callable[[BuildStatus], Any] | None = None, **_: Any
) -> BuildStatus:
    for current in STATUSES:
        if on_update is not None:
            on_update(current)
    return STATUSES[-1]


def test_plain_lines_print_each_change_once() -> None:
    # Given a stream that is not a terminal
    out = io.StringIO()
    # When a build is followed on it
    final = follow(lambda update: fake_wait("b1", on_update=update), out)
    # Then each element's state changes are one line each, nothing repeated, no table
    assert final.status == "succeeded"
    assert out.getvalue().splitlines() == [
        "remex: a: queued",
        "remex: b: waiting",
        "remex: a: running (execute (executing))",
        "remex: a: built (action cache hit)",
        "remex: b: running (upload)",
        "remex: b: built (built)",
    ]


def test_remex_build_without_a_terminal_prints_lines_then_the_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a build that runs (faked) and output that is not a terminal
    monkeypatch.setattr(api, "submit", lambda project_dir, targets, options: "b1")
    monkeypatch.setattr(api, "wait", fake_wait)
    # When remex build follows it
    result = CliRunner().invoke(main, ["build", "a"])
    # Then it succeeds; stderr is plain lines (no table drawing), stdout the summary alone
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == "remex: build b1 submitted"
    assert "remex: a: built (action cache hit)" in result.stderr.splitlines()
    assert all(line.startswith("remex: ") for line in result.stderr.splitlines())
    assert not set("─│┌┐└┘━┃") & set(result.stderr + result.stdout)
    assert result.stdout.splitlines() == ["build b1: succeeded (2 built)"]


def test_plain_lines_name_a_failure() -> None:
    out = io.StringIO()
    PlainLines(out)(status("failed", a=("failed", {"error": "exit code 2\nlog ..."})))
    assert out.getvalue() == "remex: a: failed (exit code 2)\n"
