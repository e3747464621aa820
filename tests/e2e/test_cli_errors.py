"""Every command turns errors into one sentence on stderr and an exit code:
2 for bad configuration or input, 1 for a broker or server that cannot be
reached; never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.servers import RedisServer

REMEX = str(Path(sys.executable).with_name("remex"))

# Each command with the arguments it needs ({project}, {dest}: filled in).
COMMANDS = {
    "show": ("show", "-C", "{project}", "a.bst"),
    "status": ("status", "0123abcd"),
    "follow": ("status", "0123abcd", "--follow"),
    "builds": ("builds",),
    "cancel": ("cancel", "0123abcd"),
    "checkout": ("checkout", "-C", "{project}", "a.bst", "{dest}"),
    "log": ("log", "-C", "{project}", "a.bst"),
    "worker": ("worker",),
    "build": ("build", "-C", "{project}", "a.bst"),
    "up": ("up", "--detach", "-C", "{project}"),
    "bot": ("bot",),
}
# What each command reaches first (the others need a broker and a server).
NEEDS_BROKER_FIRST = {"status", "follow", "builds", "cancel", "worker"}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_project(folder: Path) -> Path:
    (folder / "elements").mkdir(parents=True)
    (folder / "files").mkdir()
    (folder / "files" / "x").write_text("x\n")
    (folder / "project.conf").write_text("name: t\nmin-version: 2.0\nelement-path: elements\n")
    (folder / "elements" / "a.bst").write_text(
        "kind: import\nsources:\n- kind: local\n  path: files\n"
    )
    return folder


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A user's environment with no remex configuration, and a private stack folder."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
    environ.update(
        REMEX_STACK_DIR=str(tmp_path / "stack"),
        REMEX_CAS_DIR=str(tmp_path / "cas"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    return environ


def run(env: dict[str, str], tmp_path: Path, command: str) -> subprocess.CompletedProcess[str]:
    project = tmp_path / "project"
    if not project.exists():
        make_project(project)
    args = [a.format(project=project, dest=tmp_path / "out") for a in COMMANDS[command]]
    return subprocess.run(
        [REMEX, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def assert_one_sentence(result: subprocess.CompletedProcess[str], code: int, *parts: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("remex: "), output
    for part in parts:
        assert part in lines[0], output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_setting_in_the_environment_is_one_sentence_exit_2(
    env: dict[str, str], tmp_path: Path, command: str
) -> None:
    # Given REMEX_CAS_QUOTA set to something that is not a size
    env["REMEX_CAS_QUOTA"] = "abc"
    # When the command runs
    result = run(env, tmp_path, command)
    # Then it names the variable and the value, in one line, exit 2
    assert_one_sentence(result, 2, "REMEX_CAS_QUOTA", "'abc'")
    assert not (tmp_path / "stack" / "stack.json").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unknown_config_key_is_one_sentence_exit_2(
    env: dict[str, str], tmp_path: Path, command: str
) -> None:
    # Given a remex.toml with a key remex does not know
    config = tmp_path / "remex.toml"
    config.write_text('[cas]\nquota = "1G"\nqouta = "2G"\n')
    env["REMEX_CONFIG"] = str(config)
    # When the command runs
    result = run(env, tmp_path, command)
    # Then it names the file and the key, in one line, exit 2
    assert_one_sentence(result, 2, str(config), "unknown key cas.qouta")


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"up"}))
def test_a_closed_broker_and_server_port_is_one_sentence_exit_1(
    env: dict[str, str], tmp_path: Path, command: str
) -> None:
    # Given a broker URL and a server URL pointing at closed ports
    broker, server = closed_port(), closed_port()
    env["REMEX_BROKER_URL"] = f"redis://:secret@127.0.0.1:{broker}/0"
    env["REMEX_EXECUTION_URL"] = f"grpc://127.0.0.1:{server}"
    # When the command runs
    result = run(env, tmp_path, command)
    # Then it says which one cannot be reached, in one line, exit 1
    port = broker if command in NEEDS_BROKER_FIRST else server
    assert_one_sentence(result, 1, f"127.0.0.1:{port}")
    assert "secret" not in result.stderr


@pytest.mark.parametrize("command", ["status", "follow", "cancel"])
def test_an_unknown_build_is_one_sentence_exit_1(
    env: dict[str, str], tmp_path: Path, command: str
) -> None:
    # Given a reachable broker that knows no build 0123abcd
    with RedisServer(tmp_path / "redis") as redis:
        env["REMEX_BROKER_URL"] = redis.url
        # When the command asks for it
        result = run(env, tmp_path, command)
    # Then it says so in one line, exit 1 (not found)
    assert_one_sentence(result, 1, "0123abcd")


def test_a_damaged_stack_record_is_one_sentence_for_down(env: dict[str, str]) -> None:
    # Given a stack folder whose stack.json is not JSON
    folder = Path(env["REMEX_STACK_DIR"])
    folder.mkdir(parents=True)
    (folder / "stack.json").write_text("{not json")
    # When `remex down` runs
    result = subprocess.run(
        [REMEX, "down"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    # Then it names the file, in one line, exit 2
    assert_one_sentence(result, 2, "stack.json")
