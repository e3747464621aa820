"""`remex up` / `remex down`: the embedded stack, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hello import copy_hello_project

REMEX = str(Path(sys.executable).with_name("remex"))


def run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REMEX, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """A user's environment with no remex configuration at all, and a private stack folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
    env.update(
        REMEX_STACK_DIR=str(tmp_path / "stack"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    return env


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def nice_values(pid: int) -> set[int]:
    """The nice value of every thread of ``pid`` and of its children's threads."""
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        values.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        for child in (task / "children").read_text().split():
            values |= nice_values(int(child))
    return values


def worker_settings(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in environ if b"=" in item)


def autogroup_nice(pid: int) -> int | None:
    """The nice value of ``pid``'s session's autogroup (None: no autogroups here)."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split("nice")[1])
    except OSError:
        return None


def test_up_build_checkout_down(user_env: dict[str, str], tmp_path: Path) -> None:
    # Given the embedded stack started in the background
    up = run(user_env, "up", "--detach", "--workers", "2")
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((tmp_path / "stack" / "stack.json").read_text())
        pids = [state["redis"]["pid"], state["casd"]["pid"]] + [w["pid"] for w in state["workers"]]
        assert all(alive(pid) for pid in pids)
        # The workers (every thread, and their fetch pools) run below casd's
        # sandboxes, their sessions' autogroups too where the kernel has them
        assert "nice 10, staging 1" in up.stdout
        for worker in state["workers"]:
            assert nice_values(worker["pid"]) == {10}
            assert autogroup_nice(worker["pid"]) in (None, 10)
            # and each stages one element at a time
            assert worker_settings(worker["pid"])["REMEX_WORKER_STAGING"] == "1"
        assert nice_values(state["casd"]["pid"]) == {0}
        assert autogroup_nice(state["casd"]["pid"]) in (None, 0)
        # Redis asks for a password (kept out of stack.json), casd is on a unix socket
        assert state["redis"]["url"].startswith("redis://127.0.0.1:")
        assert Path(state["redis"]["password_file"]).read_text().strip()
        assert state["casd"]["url"] == f"unix:{tmp_path / 'stack' / 'casd.sock'}"
        # A second `up` refuses while this one runs
        again = run(user_env, "up", "--detach")
        assert again.returncode == 2 and "already up" in again.stderr
        # When a project builds with no configuration but the running stack
        project = copy_hello_project(tmp_path / "hello")
        build = run(user_env, "build", "--json", "-C", str(project), "app.bst")
        assert build.returncode == 0, build.stderr
        states = {e["element"]: e["state"] for e in json.loads(build.stdout)["elements"]}
        assert set(states.values()) == {"built"}
        checkout = run(user_env, "checkout", "-C", str(project), "hello.bst", str(tmp_path / "out"))
        assert checkout.returncode == 0, checkout.stderr
        assert (tmp_path / "out" / "usr" / "share" / "hello" / "message").read_text() == (
            "Hello, world!\n"
        )
    finally:
        down = run(user_env, "down")
    # Then `down` stopped exactly the recorded processes and forgot the stack
    assert down.returncode == 0, down.stderr
    assert not any(alive(pid) for pid in pids)
    assert not (tmp_path / "stack" / "stack.json").exists()
    assert "no remex stack is up" in run(user_env, "down").stdout


def test_a_missing_system_tool_is_one_clear_sentence(user_env: dict[str, str]) -> None:
    # Given a PATH without redis-server and bwrap
    env = dict(user_env, PATH=str(Path(sys.executable).parent))
    # When the stack is started
    result = run(env, "up", "--detach")
    # Then it says which Debian package to install, and starts nothing
    assert result.returncode == 2
    assert "install the Debian package redis-server" in result.stderr
    assert "install the Debian package bubblewrap" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (Path(user_env["REMEX_STACK_DIR"]) / "stack.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("build", "-C", "{project}", "app.bst"),
        ("show", "-C", "{project}", "app.bst"),
        ("status", "0123abcd"),
        ("cancel", "0123abcd"),
        ("worker",),
    ],
    ids=["build", "show", "status", "cancel", "worker"],
)
def test_without_a_stack_every_command_needing_one_refuses_in_one_sentence(
    user_env: dict[str, str], tmp_path: Path, args: tuple[str, ...]
) -> None:
    # Given no stack up and no configuration at all
    project = copy_hello_project(tmp_path / "hello")
    # When a command that needs a broker or a server runs
    result = run(user_env, *(a.format(project=project) for a in args), timeout=60)
    # Then it refuses at once, saying what to do, instead of using a well-known port
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("remex: no remex stack is up here; run 'remex up' or set ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_up_gives_its_workers_the_configured_local_cas(
    user_env: dict[str, str], tmp_path: Path
) -> None:
    # Given a project whose remex.toml sets the local CAS quota and folder
    # and the workers' nice value and staging, and REMEX_CAS_QUOTA in the environment (which
    # wins over the file)
    project = tmp_path / "project"
    project.mkdir()
    (project / "remex.toml").write_text(
        '[cas]\nquota = "3M"\ndir = "shared-cas"\n[worker]\nnice = 3\nstaging = 0\n'
    )
    env = dict(user_env, REMEX_CAS_QUOTA="2M")
    # When the stack is started for that project
    up = run(env, "up", "--detach", "--workers", "2", "-C", str(project))
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((tmp_path / "stack" / "stack.json").read_text())
        # Then every worker runs with that quota and shares that folder
        assert "nice 3, staging unlimited" in up.stdout
        for worker in state["workers"]:
            settings = worker_settings(worker["pid"])
            assert settings["REMEX_CAS_QUOTA"] == str(2 * 1024 * 1024)
            assert settings["REMEX_CAS_DIR"] == str(project / "shared-cas")
            # and at the configured CPU priority
            assert nice_values(worker["pid"]) == {3}
            assert autogroup_nice(worker["pid"]) in (None, 3)
            # and stages without a limit
            assert settings["REMEX_WORKER_STAGING"] == "0"
    finally:
        down = run(user_env, "down")
    assert down.returncode == 0, down.stderr
