"""docker-compose.yml on a real Docker engine (scripts/docker-engine.sh).

Session-scoped: ``docker_engine`` (a private dockerd, started and stopped by
the script unless one already runs on its folder; the base and stand-in
images), ``remex_image`` (``docker build`` of the Dockerfile, timed).
Module-scoped: ``compose_stack`` (the whole stack of docker-compose.yml as a
compose project of its own, every published port a free loopback port,
``up --wait``; ``down -v`` after the module).

Network rule: the tests talk only to ports published on 127.0.0.1 and to
the containers they started; every wait is bounded.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.compose import (
    ENGINE_SCRIPT,
    FIGURES,
    IMAGE,
    ROOT,
    ComposeStack,
    Engine,
    free_port,
    run,
)


def host_network_state() -> dict[str, object]:
    """What dockerd changes on the host: iptables rules and policies (filter
    and nat), ip_forward, the network links."""
    env = dict(os.environ)
    return {
        "filter": run(["iptables", "-S"], env, timeout=30).stdout,
        "nat": run(["iptables", "-t", "nat", "-S"], env, timeout=30).stdout,
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
        "links": sorted(
            line.split(": ")[1].split("@")[0]
            for line in run(["ip", "-o", "link", "show"], env, timeout=30).stdout.splitlines()
        ),
    }


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """dockerd by scripts/docker-engine.sh, with the base and stand-in images.

    The script keeps its data root between sessions (REMEX_DOCKER_DIR), so
    images made once are reused; it is stopped at the end only if this
    session started it.
    """
    env = dict(os.environ)
    env.setdefault("PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    script = ["bash", str(ENGINE_SCRIPT)]
    already = run([*script, "status"], env, timeout=10, check=False).returncode == 0
    before = None if already else host_network_state()
    run([*script, "start"], env, timeout=120)
    for line in run([*script, "env"], env, timeout=10).stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    try:
        started = time.monotonic()
        images = run([*script, "images"], env, timeout=900)
        FIGURES["base + stand-in images"] = f"{time.monotonic() - started:.0f} s"
        for line in images.stdout.splitlines():
            if "debootstrap took" in line:
                FIGURES["debootstrap"] = line.split("took", 1)[1].split(";")[0].strip()
        yield Engine(env)
    finally:
        if not already:
            run([*script, "stop"], env, timeout=180)
            # The host's firewall, forwarding and links are as they were.
            assert host_network_state() == before


@pytest.fixture(scope="session")
def remex_image(docker_engine: Engine) -> str:
    """The Dockerfile's image, built once per session (layers cached by the engine)."""
    started = time.monotonic()
    run(["docker", "build", "-q", "-t", IMAGE, str(ROOT)], docker_engine.env, timeout=1200)
    FIGURES["remex image build"] = f"{time.monotonic() - started:.0f} s"
    size = docker_engine.docker("image", "inspect", "--format", "{{.Size}}", IMAGE)
    FIGURES["remex image size"] = f"{int(size) / 1e6:.0f} MB"
    return IMAGE


@pytest.fixture(scope="module")
def compose_stack(
    docker_engine: Engine, remex_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComposeStack]:
    """The whole stack (2 workers, 2 bots) up and healthy; removed with its volumes after."""
    workdir = tmp_path_factory.mktemp("compose")
    passwords = {
        name: secrets.token_hex(16)
        for name in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD")
    }
    ports = {name: free_port() for name in ("REDIS", "BUILDGRID", "ARTIFACTS", "FLOWER")}
    lines = [f"{key}={value}" for key, value in passwords.items()]
    lines += [f"REMEX_{name}_PORT={port}" for name, port in ports.items()]
    lines += [
        "REMEX_PUBLISH_ADDRESS=127.0.0.1",
        f"REMEX_IMAGE={IMAGE}",
        "FLOWER_USER=remex",
        "WORKER_CONCURRENCY=2",
        "BOT_CAPACITY=2",
        "ARTIFACTS_QUOTA=2G",
        "WORKER_CAS_QUOTA=2G",
    ]
    env_file = workdir / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    stack = ComposeStack(
        docker_engine,
        project=f"remextest{os.getpid()}",
        env_file=env_file,
        ports=ports,
        passwords=passwords,
        env=docker_engine.env,
    )
    try:
        started = time.monotonic()
        stack.compose(
            "up", "--detach", "--wait", "--scale", "worker=2", "--scale", "bot=2", timeout=600
        )
        FIGURES["compose up --wait"] = f"{time.monotonic() - started:.0f} s"
        yield stack
    finally:
        logs = stack.compose("logs", "--no-color", "--tail", "200", timeout=120)
        (workdir / "compose.log").write_text(logs.stdout + logs.stderr)
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=300)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The measured figures (image build, up --wait, build times) after the run."""
    if FIGURES:
        terminalreporter.section("deployment figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
