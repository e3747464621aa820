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
    final = follow(lambda update, summaries: fake_wait("b1", on_update=update), out)
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
    priorities: list[int] = []

    def submit(
        project_dir: Any, targets: Any, options: Any, priority: int, on_error: str | None
    ) -> str:
        priorities.append(priority)
        assert on_error is None  # the configuration's
        return "b1"

    monkeypatch.setattr(api, "submit", submit)
    monkeypatch.setattr(api, "wait", fake_wait)
    # When remex build follows it
    result = CliRunner().invoke(main, ["build", "a"])
    # Then it is submitted at the default priority
    assert priorities == [5]
    # And it succeeds; stderr is plain lines (no table drawing), stdout the summary alone
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


# --- the status table of a long build ------------------------------------------------


def rendered(table: Any) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_a_short_builds_table_shows_every_element() -> None:
    from cli.progress import table

    current = status("running", **{f"e{i}.bst": ("built", {}) for i in range(5)})
    text = rendered(table(current, 1.0))
    assert all(f"e{i}.bst" in text for i in range(5))
    assert "shown" not in text


def test_a_long_builds_table_shows_failed_and_running_first_and_counts_all() -> None:
    from cli.progress import table

    # Given a build of 1,000 elements: mostly built, some waiting, two running, one failed
    elements: dict[str, tuple[str, dict[str, Any]]] = {
        f"e{i:04d}.bst": ("built", {}) for i in range(990)
    }
    elements.update({f"w{i}.bst": ("waiting", {}) for i in range(7)})
    elements["r1.bst"] = ("running", {"stage": "execute"})
    elements["f1.bst"] = ("failed", {"error": "exit code 1"})
    elements["r2.bst"] = ("running", {"stage": "upload"})
    text = rendered(table(status("running", **elements), 1.0, rows=50))
    # Then only those three are rows, the failed one first, and the caption counts every state
    rows = [line for line in text.splitlines() if ".bst" in line]
    assert [row.split()[1] for row in rows] == ["f1.bst", "r1.bst", "r2.bst"]
    caption = "3 of 1000 elements shown; 990 built, 1 failed, 2 running, 7 waiting"
    assert caption in " ".join(text.split())  # the caption wraps at the table width


def test_a_summarys_table_and_json_count_every_state_and_list_the_live_ones() -> None:
    from cli.progress import status_json, table

    # Given the summary of a 10,000-element build (counts kept by the
    # scheduler; only the running and failed elements read)
    summary = BuildStatus(
        "b1",
        "running",
        {},
        [
            ElementStatus("f1.bst", "failed", {"error": "exit code 1"}),
            ElementStatus("r1.bst", "running", {"stage": "execute"}),
        ],
        state_counts={"built": 9990, "waiting": 8, "failed": 1, "running": 1, "queued": 0},
    )
    # Then the table shows those two and counts all 10,000
    text = rendered(table(summary, 1.0))
    rows = [line for line in text.splitlines() if ".bst" in line]
    assert [row.split()[1] for row in rows] == ["f1.bst", "r1.bst"]
    caption = "2 of 10000 elements shown; 9990 built, 1 failed, 1 running, 8 waiting"
    assert caption in " ".join(text.split())
    # And the JSON says it is a summary, with the counts
    out = status_json(summary)
    assert out["summary"] is True and out["total"] == 10000
    assert out["counts"] == {"built": 9990, "waiting": 8, "failed": 1, "running": 1}
    assert [e["element"] for e in out["elements"]] == ["f1.bst", "r1.bst"]


def test_remex_build_passes_its_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    priorities: list[int] = []

    def submit(
        project_dir: Any, targets: Any, options: Any, priority: int, on_error: str | None
    ) -> str:
        priorities.append(priority)
        assert on_error is None  # the configuration's
        return "b1"

    monkeypatch.setattr(api, "submit", submit)
    result = CliRunner().invoke(main, ["build", "--priority", "0", "--no-follow", "a"])
    assert result.exit_code == 0, result.output
    assert priorities == [0]


@pytest.mark.parametrize("priority", [-1, 10, True, "5"])
def test_submit_refuses_a_priority_out_of_range(priority: Any) -> None:
    with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
        api.submit(".", ["a.bst"], priority=priority)
