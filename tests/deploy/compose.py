"""Helpers of the deployment tests (tests/deploy/): commands with bounded
time, free loopback ports, the private engine and a compose project.

A module of its own (not conftest.py), so that the fixtures and the tests
share one FIGURES mapping."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_SCRIPT = ROOT / "scripts" / "docker-engine.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
# The image's tag (REMEX_IMAGE in the compose files): one of its own keeps a
# session's stack on the image it built when others build on the same engine.
IMAGE = os.environ.get("REMEX_DEPLOY_IMAGE", "remex:latest")
# Figures printed at the end of the session (pytest -s, or the terminal summary).
FIGURES: dict[str, str] = {}


def run(
    args: list[str],
    env: dict[str, str],
    *,
    timeout: float,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a bounded time; on failure the error holds its output."""
    result = subprocess.run(
        args,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Engine:
    """The private dockerd: ``env`` has DOCKER_HOST and DOCKER_CONFIG."""

    env: dict[str, str]

    def docker(self, *args: str, timeout: float = 120.0) -> str:
        """``docker ARGS`` against this engine; its stdout."""
        return run(["docker", *args], self.env, timeout=timeout).stdout


@dataclass
class ComposeStack:
    """One compose project of docker-compose.yml on the private engine."""

    engine: Engine
    project: str
    env_file: Path
    ports: dict[str, int]
    passwords: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """``docker compose -p PROJECT --env-file F -f docker-compose.yml ARGS``."""
        base = ["docker", "compose", "-p", self.project, "--env-file", str(self.env_file)]
        return run([*base, "-f", str(COMPOSE_FILE), *args], self.env, timeout=timeout, cwd=ROOT)

    def containers(self, service: str) -> list[str]:
        """The IDs of a service's running containers."""
        return self.compose("ps", "-q", service, timeout=60).stdout.split()

    def memory_mb(self) -> float:
        """The memory the project's containers use now (``docker stats``), in MB."""
        ids = self.compose("ps", "-q", timeout=60).stdout.split()
        stats = run(
            ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", *ids],
            self.env,
            timeout=60,
        ).stdout
        units = {"B": 1e-6, "KiB": 1024 / 1e6, "MiB": 1024**2 / 1e6, "GiB": 1024**3 / 1e6}
        total = 0.0
        for line in stats.splitlines():
            used = line.split("/")[0].strip()
            number = used.rstrip("BKMGi")
            total += float(number) * units[used[len(number) :]]
        return total

    @property
    def broker_url(self) -> str:
        return f"redis://:{self.passwords['REDIS_PASSWORD']}@127.0.0.1:{self.ports['REDIS']}/0"

    def client_env(self, workdir: Path) -> dict[str, str]:
        """The environment of a ``remex`` CLI on the host using the published ports."""
        config = workdir / "remex.toml"
        config.touch()
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
        env.update(
            REMEX_CONFIG=str(config),
            REMEX_STACK_DIR=str(workdir / "no-embedded-stack"),
            REMEX_CAS_DIR=str(workdir / "cas"),
            REMEX_BROKER_URL=self.broker_url,
            REMEX_EXECUTION_URL=f"grpc://127.0.0.1:{self.ports['BUILDGRID']}",
            REMEX_ARTIFACTS_URL=f"grpc://127.0.0.1:{self.ports['ARTIFACTS']}",
        )
        return env
