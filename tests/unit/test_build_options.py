"""Issue 13's options without servers: the on-error setting (config, CLI,
API), bad input in one sentence, and how events and listings are printed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from cli.progress import builds_lines, event_line
from pipeline import api
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.scheduler import BuildSummary


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "REMEX_STACK_DIR": str(tmp_path / "no-stack"),
        **extra,
    }


def test_on_error_defaults_to_continue_and_comes_from_file_then_environment(
    tmp_path: Path,
) -> None:
    assert load_config(None, env_for(tmp_path)).on_error == "continue"
    (tmp_path / "remex.toml").write_text('[build]\non-error = "quit"\n')
    assert load_config(tmp_path, env_for(tmp_path)).on_error == "quit"
    env = env_for(tmp_path, REMEX_BUILD_ON_ERROR="terminate")
    assert load_config(tmp_path, env).on_error == "terminate"


@pytest.mark.parametrize(
    ("toml", "env", "where"),
    [
        ('[build]\non-error = "stop"\n', {}, "build.on-error"),
        ("", {"REMEX_BUILD_ON_ERROR": "stop"}, "REMEX_BUILD_ON_ERROR"),
        ('[build]\non-eror = "quit"\n', {}, "unknown key build.on-eror"),
    ],
)
def test_a_bad_on_error_setting_names_where_it_is(
    tmp_path: Path, toml: str, env: dict[str, str], where: str
) -> None:
    (tmp_path / "remex.toml").write_text(toml)
    with pytest.raises(ConfigError, match=where):
        load_config(tmp_path, env_for(tmp_path, **env))


def test_submit_refuses_an_unknown_on_error_mode_before_any_work() -> None:
    with pytest.raises(ValueError, match="unknown on-error mode 'stop'"):
        api.submit("/nonexistent", [], on_error="stop")


def test_events_refuses_a_bad_event_id_before_any_work() -> None:
    with pytest.raises(ValueError, match="not an event id: 'last'"):
        next(api.events("b1", after="last"))


def test_builds_refuses_an_unknown_state_before_any_work() -> None:
    with pytest.raises(ValueError, match="unknown build state 'done'"):
        api.builds(state="done")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["build", "--on-error", "stop", "x.bst"], "--on-error: unknown mode 'stop'"),
        (["builds", "--state", "done"], "--state: unknown build state 'done'"),
        (["status", "b1", "--json", "--follow"], "--json shows the state now"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(args: list[str], text: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("remex: ")
    assert text in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_events_as_lines() -> None:
    assert event_line({"event": "submitted", "build": "b1", "elements": 3}) == (
        "remex: build b1 submitted (3 elements)"
    )
    assert event_line({"event": "queued", "element": "a.bst", "attempt": 1}) == (
        "remex: a.bst: queued (attempt 1)"
    )
    assert event_line({"event": "stage", "element": "a.bst", "stage": "execute", "host": "w1"}) == (
        "remex: a.bst: running (execute on w1)"
    )
    assert event_line(
        {"event": "built", "element": "a.bst", "started": 10.0, "finished": 12.5}
    ) == ("remex: a.bst: built (2.5s)")
    assert event_line({"event": "failed", "element": "a.bst", "error": "exit 1\nmore"}) == (
        "remex: a.bst: failed (exit 1)"
    )
    assert event_line({"event": "finished", "build": "b1", "status": "failed"}) == (
        "remex: build b1 failed"
    )


def test_a_listing_is_aligned_text_with_counts() -> None:
    now = time.time()
    meta = {
        "created": now - 5,
        "finished": now,
        "project": "dag",
        "targets": ["all.bst"],
        "host": "h",
        "user": "u",
        "priority": 5,
        "on_error": "quit",
    }
    counts = {"built": 2, "failed": 1, "total": 4, "active": 1}
    header, row = builds_lines([BuildSummary("abc", "running", meta, counts)])
    assert header.split()[:3] == ["BUILD", "STATUS", "PROJECT"]
    assert row.split()[:7] == ["abc", "running", "dag", "all.bst", "u@h", "5", "quit"]
    assert row.endswith("4 (2 built 1 failed) 1 active")
    assert header.index("STATUS") == row.index("running")
