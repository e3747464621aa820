"""Installing remex into a fresh virtualenv, as a new user does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the wheel is built from (pyproject.toml's packages and readme).
SOURCES = ("pyproject.toml", "README.md", "pipeline", "tasks", "protos", "bot", "cli")


def copy_sources(dest: Path) -> Path:
    """The project's sources in ``dest`` (pip builds in the source folder: not in ours)."""
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def install(source: Path, venv: Path) -> subprocess.CompletedProcess[str]:
    """``pip install -v --no-deps SOURCE`` into a new venv (-v: every backend warning shown)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-v", "--no-deps", str(source)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def test_a_fresh_install_prints_no_deprecation_warning_and_ships_everything(
    tmp_path: Path,
) -> None:
    # Given the sources and a fresh venv
    source = copy_sources(tmp_path / "src")
    # When remex is installed (not editable: a wheel, as from an index)
    result = install(source, tmp_path / "venv")
    output = result.stdout + result.stderr
    # Then it installs without a single deprecation warning
    assert result.returncode == 0, output[-4000:]
    assert "deprecat" not in output.lower(), output[-4000:]
    # And the wheel holds the CLI package, the scheduler's Lua scripts and the
    # console script pointing at the CLI, and no zstandard requirement
    site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    assert (site / "cli" / "main.py").is_file()
    lua = sorted(p.name for p in (site / "pipeline" / "lua").glob("*.lua"))
    assert {"prelude.lua", "finish.lua", "start.lua"} <= set(lua)
    assert "from cli import main" in (tmp_path / "venv" / "bin" / "remex").read_text()
    metadata = next(site.glob("remex-*.dist-info")) / "METADATA"
    text = metadata.read_text()
    assert "zstandard" not in text
    assert "License-Expression: Apache-2.0" in text
