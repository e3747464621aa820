"""The embedded stack's private places: the casd socket path, the stack
folder's owner and modes, Redis's password config (no servers started)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.servers.casd import MAX_SOCKET_PATH, CasdServer
from pipeline.servers.errors import ServerError
from pipeline.servers.redis import RedisServer
from pipeline.stack import _make_private, casd_socket_path


def test_the_casd_socket_goes_into_the_stack_folder_when_the_path_fits(tmp_path: Path) -> None:
    path, private = casd_socket_path(tmp_path / "stack")
    assert path == tmp_path / "stack" / "casd.sock" and private is None


def test_a_too_long_stack_folder_puts_the_socket_in_a_private_short_folder(
    tmp_path: Path,
) -> None:
    # Given a stack folder whose socket path would pass the kernel's limit
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    runtime = tmp_path / "run"
    runtime.mkdir()
    # When the socket's place is chosen
    path, private = casd_socket_path(deep, runtime_dir=str(runtime))
    # Then it is in a new folder of the user's alone, short enough
    assert private is not None and path.parent == private and private.parent == runtime
    assert len(os.fsencode(path)) <= MAX_SOCKET_PATH
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert private.stat().st_uid == os.getuid()


def test_with_no_short_place_it_says_to_shorten_the_folder(tmp_path: Path) -> None:
    deep = Path("/" + "x" * 200)
    with pytest.raises(ConfigError, match="REMEX_STACK_DIR to a shorter folder"):
        casd_socket_path(deep, runtime_dir="/" + "r" * 120, fallback="/" + "t" * 120)


def test_casd_refuses_a_socket_path_the_kernel_would_cut(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="longer than 107 bytes"):
        CasdServer(tmp_path, socket_path="/" + "s" * 120)
    server = CasdServer(tmp_path, socket_path=tmp_path / "casd.sock")
    assert server.url == f"unix:{tmp_path / 'casd.sock'}" and not server.listens


def test_the_stack_folder_is_made_private_and_old_files_are_tightened(tmp_path: Path) -> None:
    # Given a stack folder of an older remex, readable by everyone
    folder = tmp_path / "stack"
    (folder / "redis" / "appendonlydir").mkdir(parents=True)
    aof = folder / "redis" / "appendonlydir" / "appendonly.aof.1.incr.aof"
    aof.write_text("*1\r\n")
    folder.chmod(0o755)
    aof.chmod(0o644)
    # When it is made private
    _make_private(folder)
    # Then neither the folder nor the AOF is open to group or others
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(aof.stat().st_mode) == 0o600


def test_a_link_as_stack_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "stack").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a link"):
        _make_private(tmp_path / "stack")


def test_the_redis_password_goes_in_a_private_config_file_not_the_command_line(
    tmp_path: Path,
) -> None:
    # Given a Redis with a password
    server = RedisServer(tmp_path, password="pw-123")
    # When its config file is written (before the first start)
    server._prepare()
    # Then only its owner may read it, and the URL carries the password
    assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600
    assert 'requirepass "pw-123"' in server.config_path.read_text()
    server.port = 7
    assert server.url == "redis://:pw-123@127.0.0.1:7/0"
    assert server.public_url == "redis://127.0.0.1:7/0"
    # And a password that would break the config file is refused
    with pytest.raises(ServerError, match="must not contain quotes"):
        RedisServer(tmp_path, password='a"b')
