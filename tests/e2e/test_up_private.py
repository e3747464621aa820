"""`remex up` is its owner's alone: another local user on the same machine can
neither read the stack's state nor talk to its Redis or its buildbox-casd.

The other user is a real one, made for the test (``useradd``) and removed
after it; its commands run through ``runuser``. The stack folder's parent is
world-readable, so what stops that user is the stack's own permissions and
passwords, not the test's temporary folder (a control read checks that).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.servers.process import process_tree, socket_inodes

REMEX = str(Path(sys.executable).with_name("remex"))
# The system interpreter: the other user cannot be assumed to reach the venv.
SYSTEM_PYTHON = "/usr/bin/python3"

# The owner's configuration, with no settings: Redis answers (password from
# the file stack.json names) and so does casd (on its socket).
OWNER_CHECK = """
import redis
from pipeline.config import load_config
from pipeline.servers.base import reapi_answers
config = load_config()
print(redis.Redis.from_url(config.require_broker()).ping())
print(reapi_answers(config.require_execution().url, 10))
"""


@pytest.fixture(autouse=True)
def _as_root() -> None:
    # Making another local user (useradd, runuser) needs root, which CI has:
    # without it these tests fail, saying why, rather than skip.
    assert os.geteuid() == 0, "these tests make another local user: run them as root"


def run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REMEX, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def other_user() -> Iterator[str]:
    """A local user of its own (no home, no login shell), removed afterwards."""
    name = f"remex-t{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every local user may enter and list (like a home folder on
    many systems), for the stack folder to live in."""
    folder = Path(tempfile.mkdtemp(prefix="remex-private-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def as_user(user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as ``user`` (no environment of ours), never raising."""
    return subprocess.run(
        ["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )


def tcp_listening_inodes() -> set[int]:
    """Inodes of every listening TCP socket on the machine."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                inodes.add(int(fields[9]))
    return inodes


def test_another_local_user_can_neither_read_the_stack_nor_use_its_servers(
    other_user: str, shared_dir: Path
) -> None:
    # Given the embedded stack up, in a folder whose parent everyone may enter
    stack = shared_dir / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
    env.update(REMEX_STACK_DIR=str(stack), XDG_CONFIG_HOME=str(shared_dir / "config"))
    (shared_dir / "public.txt").write_text("anyone may read this\n")
    up = run(env, "up", "--detach", "--workers", "1")
    try:
        assert up.returncode == 0, up.stderr
        assert "password in" in up.stdout
        state = json.loads((stack / "stack.json").read_text())
        password_file = Path(state["redis"]["password_file"])
        socket_path = Path(state["casd"]["socket"])
        aof_files = [p for p in (stack / "redis").rglob("*.aof") if p.is_file()]
        assert aof_files, "Redis wrote no AOF"
        port = state["redis"]["url"].rsplit(":", 1)[1].split("/")[0]

        # Then the folder, the state, the password and the AOF are the owner's alone
        assert stat.S_IMODE(stack.stat().st_mode) == 0o700
        for private in [stack / "stack.json", password_file, *aof_files]:
            assert stat.S_IMODE(private.stat().st_mode) & 0o077 == 0, private
        assert password_file.read_text().strip() not in (stack / "stack.json").read_text()
        # and the other user reads the shared folder (control) but nothing of the stack
        assert as_user(other_user, "cat", str(shared_dir / "public.txt")).returncode == 0
        for target in [stack / "stack.json", password_file, *aof_files]:
            denied = as_user(other_user, "cat", str(target))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, target
        listing = as_user(other_user, "ls", str(stack))
        assert listing.returncode != 0 and "Permission denied" in listing.stderr

        # And Redis answers that user only with NOAUTH (it reaches the port, no further)
        for command in (["PING"], ["LPUSH", "remex", "forged"], ["KEYS", "*"]):
            answer = as_user(other_user, "redis-cli", "-h", "127.0.0.1", "-p", port, *command)
            assert "NOAUTH" in answer.stdout + answer.stderr, answer

        # And buildbox-casd listens on no TCP port, only on its socket in the folder
        casd_pid = int(state["casd"]["pid"])
        assert state["casd"]["url"] == f"unix:{socket_path}"
        assert socket_path.parent == stack and stat.S_ISSOCK(socket_path.stat().st_mode)
        assert not socket_inodes(list(process_tree(casd_pid, casd_pid))) & tcp_listening_inodes()
        connect = as_user(
            other_user,
            SYSTEM_PYTHON,
            "-c",
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
            str(socket_path),
        )
        assert connect.returncode != 0 and "PermissionError" in connect.stderr, connect

        # While the owner's commands find the password and the socket through stack.json
        owner = subprocess.run(
            [sys.executable, "-c", OWNER_CHECK], env=env, capture_output=True, text=True, timeout=60
        )
        assert owner.returncode == 0 and owner.stdout.split() == ["True", "True"], owner
    finally:
        down = run(env, "down")
    assert down.returncode == 0, down.stderr
    assert not socket_path.exists()


def test_a_stack_folder_of_another_user_is_refused(other_user: str, shared_dir: Path) -> None:
    # Given a stack folder made by another user (e.g. planted in a shared place)
    planted = shared_dir / "planted"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    uid = int(as_user(other_user, "id", "-u").stdout)
    os.chown(planted, uid, -1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
    env.update(REMEX_STACK_DIR=str(planted), XDG_CONFIG_HOME=str(shared_dir / "config"))
    # When the owner starts a stack there
    result = run(env, "up", "--detach", "--workers", "1")
    # Then it refuses in one sentence and starts nothing
    assert result.returncode == 2, result.stdout + result.stderr
    assert "belongs to uid" in result.stderr and "Traceback" not in result.stderr
    assert list(planted.iterdir()) == []


def test_a_stack_folder_too_long_for_a_socket_path_puts_casd_in_a_private_short_folder(
    shared_dir: Path,
) -> None:
    # Given a stack folder whose casd.sock path would pass 107 bytes
    stack = shared_dir / ("long-" * 12) / ("folder-" * 6)
    assert len(str(stack / "casd.sock")) > 107
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
    env.update(REMEX_STACK_DIR=str(stack), XDG_CONFIG_HOME=str(shared_dir / "config"))
    env.pop("XDG_RUNTIME_DIR", None)
    up = run(env, "up", "--detach", "--workers", "1")
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((stack / "stack.json").read_text())
        # Then the socket is in a folder of its own under /tmp, the owner's alone
        socket_dir = Path(state["casd"]["socket_dir"])
        assert socket_dir.parent == Path("/tmp") and socket_dir.name.startswith("remex-")
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        assert state["casd"]["url"] == f"unix:{socket_dir / 'casd.sock'}"
        # And the owner's commands still find it
        owner = subprocess.run(
            [sys.executable, "-c", OWNER_CHECK], env=env, capture_output=True, text=True, timeout=60
        )
        assert owner.returncode == 0 and owner.stdout.split() == ["True", "True"], owner
    finally:
        down = run(env, "down")
    # And `down` removes that folder
    assert down.returncode == 0, down.stderr
    assert not socket_dir.exists()
