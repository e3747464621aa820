"""examples/hello/make-sysroot.sh [DEST]: the sysroot every hello build runs in."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "hello" / "make-sysroot.sh"


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_dest_is_where_the_sysroot_goes(tmp_path: Path) -> None:
    # Given a destination that does not exist yet (nor its parent)
    dest = tmp_path / "out" / "root"
    # When the script is given it
    result = make(str(dest))
    # Then the sysroot is there, with busybox, its applets and merged /usr,
    # and nothing else was written beside it
    assert result.returncode == 0, result.stderr
    assert (dest / "usr" / "bin" / "busybox").is_file()
    assert os.readlink(dest / "usr" / "bin" / "sh") == "busybox"
    assert os.readlink(dest / "bin") == "usr/bin"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["root"]
    # And a second run leaves a complete sysroot as it is
    mtime = (dest / "usr" / "bin" / "busybox").stat().st_mtime_ns
    assert make(str(dest)).returncode == 0
    assert (dest / "usr" / "bin" / "busybox").stat().st_mtime_ns == mtime


def test_without_dest_it_writes_next_to_itself(tmp_path: Path) -> None:
    # Given a copy of the script in a folder of its own
    copy = tmp_path / "hello" / "make-sysroot.sh"
    copy.parent.mkdir()
    shutil.copy(SCRIPT, copy)
    # When it runs without arguments
    result = subprocess.run(["sh", str(copy)], capture_output=True, text=True, check=False)
    # Then sysroot/ is next to it
    assert result.returncode == 0, result.stderr
    assert (copy.parent / "sysroot" / "usr" / "bin" / "busybox").is_file()


def test_busybox_comes_from_the_environment_and_errors_are_one_line(tmp_path: Path) -> None:
    result = make(str(tmp_path / "root"), env={"BUSYBOX": str(tmp_path / "nope")})
    assert result.returncode == 1
    assert result.stderr.strip().endswith("not found: apt-get install busybox-static")
    assert not (tmp_path / "root").exists()
    # Two arguments are a usage error (the old BUSYBOX argument is now DEST)
    assert make("a", "b").returncode == 2
