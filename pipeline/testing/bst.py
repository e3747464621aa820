"""BuildStream (``bst``) as a peer: run it on a project with private folders.

``bst`` always runs as a separate process: BuildStream's generated REAPI
modules would collide with remex's in one process (TEST-STACK.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from pipeline.elements.defaults import DEFAULT_MAX_JOBS

__all__ = ["BST", "Bst"]

BST = Path(sys.executable).with_name("bst")

# A local build: no remote execution, no artifact or source caches; remex's
# %{max-jobs} does not depend on the host, so bst gets the same.
BST_USER_CONFIG = f"""\
build:
  max-jobs: {DEFAULT_MAX_JOBS}
scheduler:
  builders: 2
  fetchers: 2
  on-error: quit
"""


@dataclass
class Bst:
    """``bst`` on one project, with its own cache, config and home folders."""

    project: Path
    home: Path
    config_text: str = BST_USER_CONFIG
    """The user configuration (a local build by default)."""

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("BST_", "XDG_")) and key != "HOME"
        }
        env.update(
            HOME=str(self.home / "home"),
            XDG_CACHE_HOME=str(self.home / "cache"),
            XDG_CONFIG_HOME=str(self.home / "config"),
            TMPDIR=self._tmp(),
        )
        for name in ("home", "cache", "config", "tmp"):
            (self.home / name).mkdir(parents=True, exist_ok=True)
        config = self.home / "buildstream.conf"
        config.write_text(self.config_text)
        command = [
            str(BST),
            "--no-interactive",
            "--no-colors",
            "--config",
            str(config),
            "--directory",
            str(self.project),
            *args,
        ]
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command[1:])} exited {result.returncode}\n"
                f"--- stderr ---\n{result.stderr[-6000:]}\n--- stdout ---\n{result.stdout[-2000:]}"
            )
        return result

    def _tmp(self) -> str:
        # bst's casd listens on a unix socket under TMPDIR, whose path must
        # stay under 108 bytes: a short folder of its own, removed with self.
        if not hasattr(self, "_tmpdir"):
            self._tmpdir = tempfile.mkdtemp(prefix="bst")
            weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        return self._tmpdir

    def checkout(self, element: str, deps: str, dest: Path, *, integrate: bool = True) -> Path:
        flag = "--integrate" if integrate else "--no-integrate"
        self.run("artifact", "checkout", "--deps", deps, flag, element, "--directory", str(dest))
        return dest
