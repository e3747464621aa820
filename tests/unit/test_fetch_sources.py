"""The pieces of the fetch path that need no server: URLs without credentials,
fetch node names, progress throttling, scratch left by a killed worker,
``[worker] fetch-concurrency``, how fetch nodes show, and ``remex source fetch``
following its build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli import main
from cli.progress import element_line
from pipeline import api
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.scheduler import BuildStatus, ElementStatus
from pipeline.stages.fetch import (
    ProgressThrottle,
    fetch_node_name,
    fetch_scratch,
    redact_url,
    remove_stale_scratch,
    scratch_root,
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@example.com:8443/a/b.tar.gz?x=1", "https://example.com:8443/a/b.tar.gz?x=1"),
        ("https://token@example.com/b.tar.gz", "https://example.com/b.tar.gz"),
        ("http://[::1]:80/b", "http://[::1]:80/b"),
        ("https://u:p@[::1]:81/b", "https://[::1]:81/b"),
        ("ftp://example.com/pub/c.zip", "ftp://example.com/pub/c.zip"),
    ],
)  # fmt: skip
def test_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_fetch_node_is_named_by_its_file_and_key() -> None:
    request = {"kind": "tar", "key": "ab" * 32, "urls": ["https://u:p@h/x/hello-1.0.tar.gz"]}
    assert fetch_node_name(request) == "fetch:hello-1.0.tar.gz@abababababab"
    # A URL without a file name (a git repository's root) falls back on the kind
    assert fetch_node_name({**request, "kind": "git", "urls": ["https://h/"]}) == (
        "fetch:git@abababababab"
    )


def test_progress_is_reported_at_most_once_a_second_and_the_last_values_at_the_end() -> None:
    step = 0
    reports: list[tuple[int, int | None]] = []
    throttle = ProgressThrottle(
        lambda done, total: reports.append((done, total)), clock=lambda: 100 + step / 10
    )
    for step in range(25):  # 25 chunks over 2.4 s
        throttle(step * 10, 240)
    throttle.flush()
    assert reports == [(0, 240), (100, 240), (200, 240), (240, 240)]
    throttle.flush()  # nothing held back: nothing more
    assert len(reports) == 4


def test_scratch_of_dead_processes_is_removed_at_start_and_live_ones_kept(tmp_path: Path) -> None:
    cas_dir = tmp_path / "cas"
    root = scratch_root(cas_dir)
    # Given scratch left by a process that died mid-download, by one alive, and by this PID
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    partial = root / dead.stdout.strip() / "task" / "hello.tar.gz.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a tarball")
    alive = root / str(os.getppid()) / "task"
    alive.mkdir(parents=True)
    mine = root / str(os.getpid()) / "old"
    mine.mkdir(parents=True)
    # When a worker starts on that CAS folder
    removed = remove_stale_scratch(cas_dir)
    # Then the dead one's partial file is gone, and this process's old scratch too
    assert removed == 2
    assert not partial.exists()
    assert not mine.exists()
    assert alive.is_dir()


def test_a_fetch_scratch_is_removed_after_use(tmp_path: Path) -> None:
    with fetch_scratch(tmp_path / "cas") as folder:
        (folder / "file").write_text("x")
        assert folder.parent.name == str(os.getpid())
    assert not folder.exists()


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "REMEX_STACK_DIR": str(tmp_path / "no-stack"),
        **extra,
    }


def test_fetch_concurrency_from_the_file_and_the_environment(tmp_path: Path) -> None:
    assert load_config(None, env_for(tmp_path)).fetch_concurrency == 4
    conf = tmp_path / "remex.toml"
    conf.write_text("[worker]\nfetch-concurrency = 7\n")
    env = env_for(tmp_path, REMEX_CONFIG=str(conf))
    assert load_config(None, env).fetch_concurrency == 7
    env["REMEX_WORKER_FETCH_CONCURRENCY"] = "2"
    assert load_config(None, env).fetch_concurrency == 2
    with pytest.raises(ConfigError, match="REMEX_WORKER_FETCH_CONCURRENCY"):
        load_config(None, env_for(tmp_path, REMEX_WORKER_FETCH_CONCURRENCY="0"))
    conf.write_text("[worker]\nfetch-concurrency = -1\n")
    with pytest.raises(ConfigError, match=r"worker\.fetch-concurrency"):
        load_config(None, env_for(tmp_path, REMEX_CONFIG=str(conf)))


def node(state: str, **info: Any) -> ElementStatus:
    return ElementStatus("fetch:a.tar.gz@0123456789ab", state, {"kind": "fetch", **info})


def test_fetch_nodes_show_bytes_while_running_and_how_they_ended() -> None:
    running = node("running", stage="fetch_source", bytes_done=2_500_000, bytes_total=10_000_000)
    assert element_line(running)[1] == "fetch_source (2.5 MB/10.0 MB)"
    unknown_size = node("running", stage="fetch_source", bytes_done=1_000_000, bytes_total=None)
    assert element_line(unknown_size)[1] == "fetch_source (1.0 MB)"
    assert element_line(node("built", downloaded=True))[2] == "fetched"
    assert element_line(node("built", downloaded=False))[2] == "in the source cache"
    assert element_line(node("built", built_by="b\tx"))[2] == "fetched by another build"


def status(overall: str, state: str) -> BuildStatus:
    return BuildStatus("b7", overall, {}, [node(state, downloaded=True)])


@pytest.mark.parametrize(("overall", "state", "code"), [("succeeded", "built", 0),
                                                         ("failed", "failed", 1)])  # fmt: skip
def test_remex_source_fetch_follows_its_build_and_exits_0_iff_all_fetched(
    monkeypatch: pytest.MonkeyPatch, overall: str, state: str, code: int
) -> None:
    calls: list[tuple[list[str], str]] = []

    def submit(project_dir: Any, targets: list[str], *, deps: str, options: Any) -> Any:
        calls.append((targets, deps))
        return "b7", 3

    def wait(build_id: str, *, timeout: Any = None, on_update: Any = None) -> BuildStatus:
        final = status(overall, state)
        if on_update is not None:
            on_update(final)
        return final

    monkeypatch.setattr(api, "submit_source_fetch", submit)
    monkeypatch.setattr(api, "wait", wait)
    result = CliRunner().invoke(main, ["source", "fetch", "--deps", "all", "app.bst"])
    assert calls == [(["app.bst"], "all")]
    assert result.exit_code == code, result.output
    assert "remex: build b7 submitted (fetching sources)" in result.stderr
    assert result.stdout.splitlines()[0].startswith(f"build b7: {overall}")


def test_remex_source_fetch_with_everything_cached_starts_no_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api, "submit_source_fetch", lambda *a, **k: (None, 5))
    result = CliRunner().invoke(main, ["source", "fetch", "app.bst"])
    assert result.exit_code == 0
    assert "nothing to fetch (5 source(s) in the source cache)" in result.stdout


def test_select_deps_refuses_an_unknown_choice() -> None:
    with pytest.raises(ValueError, match="deps must be one of none, run, build, all"):
        api.select_deps([], [], "plan")
