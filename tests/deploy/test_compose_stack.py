"""docker-compose.yml run for real: the whole stack up, examples/hello and
examples/toolchain built across its containers from a ``remex`` CLI on the host.

The CLI reaches the stack only through the ports published on 127.0.0.1
(free ports the fixture picked, set through REMEX_*_PORT in the env file):
it enqueues through Redis; the stage tasks run on the worker containers;
the actions run on the bot containers, in bubblewrap, leased from
BuildGrid; artifacts go to the artifact server, from which ``remex
checkout`` gets them back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.compose import FIGURES, ROOT, ComposeStack, run
from tests.hello import EXPECTED_HELLO_FILES, copy_hello_project, file_tree

# The first test's setup makes the engine's images on a cold machine
# (debootstrap, stand-ins, the remex image: ~4-5 min on 2 busy cores).
pytestmark = pytest.mark.timeout(1200)

SERVICES = {"redis", "postgres", "buildgrid", "artifacts", "bot", "worker", "flower"}


def remex_program() -> str:
    """The ``remex`` CLI of this environment."""
    return shutil.which("remex") or str(Path(__file__).parents[2] / ".venv" / "bin" / "remex")


def remex(stack: ComposeStack, workdir: Path, *args: str, timeout: float = 300.0) -> str:
    """``remex ARGS`` on the host, configured for the stack's published ports."""
    return run([remex_program(), *args], stack.client_env(workdir), timeout=timeout).stdout


def flower(stack: ComposeStack, path: str, *, auth: bool = True) -> Any:
    """GET Flower's ``path`` on its published port (JSON), with basic auth or none."""
    request = urllib.request.Request(f"http://127.0.0.1:{stack.ports['FLOWER']}{path}")
    if auth:
        user_pass = f"remex:{stack.passwords['FLOWER_PASSWORD']}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(user_pass).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def hello_build(compose_stack: ComposeStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/hello built once on the stack; returns the client's work folder."""
    workdir = tmp_path_factory.mktemp("hello-client")
    project = copy_hello_project(workdir / "hello")
    started = time.monotonic()
    remex(compose_stack, workdir, "build", "-C", str(project), "app.bst")
    FIGURES["hello build across containers"] = f"{time.monotonic() - started:.1f} s"
    FIGURES["stack RAM after the hello build"] = f"{compose_stack.memory_mb():.0f} MB"
    return workdir


def test_every_service_is_up_and_published_on_loopback_only(
    compose_stack: ComposeStack,
) -> None:
    # Given the stack after `up --wait`
    ps = [
        json.loads(line)
        for line in compose_stack.compose("ps", "--format", "json").stdout.splitlines()
        if line.strip()
    ]
    running = {entry["Service"] for entry in ps if entry["State"] == "running"}
    # Then every long-running service runs (2 workers, 2 bots)
    assert running == SERVICES, ps
    assert len(compose_stack.containers("worker")) == 2
    assert len(compose_stack.containers("bot")) == 2
    # And each published port is the one the env file chose, on 127.0.0.1 only
    for service, name, inner in (
        ("redis", "REDIS", 6379),
        ("buildgrid", "BUILDGRID", 50051),
        ("artifacts", "ARTIFACTS", 50052),
        ("flower", "FLOWER", 5555),
    ):
        published = compose_stack.compose("port", service, str(inner)).stdout.strip()
        assert published == f"127.0.0.1:{compose_stack.ports[name]}", (service, published)


def test_hello_builds_on_the_containers_and_checks_out(
    compose_stack: ComposeStack, hello_build: Path, tmp_path: Path
) -> None:
    # Given examples/hello built through the stack (hello_build)
    # When hello.bst is checked out on the host from the artifact server
    out = tmp_path / "out"
    remex(
        compose_stack,
        hello_build,
        "checkout",
        "-C",
        str(hello_build / "hello"),
        "hello.bst",
        str(out),
    )
    # Then it holds exactly what its commands produced in the bots' sandboxes
    assert file_tree(out) == EXPECTED_HELLO_FILES


def test_the_stage_tasks_ran_on_the_worker_containers(
    compose_stack: ComposeStack, hello_build: Path
) -> None:
    # Given the build, and the worker containers' host names (their IDs)
    hostnames = {
        compose_stack.engine.docker("inspect", "--format", "{{.Config.Hostname}}", cid).strip()
        for cid in compose_stack.containers("worker")
    }
    # When Flower's API lists the tasks
    tasks = flower(compose_stack, "/api/tasks").values()
    # Then every task succeeded, on a worker container
    assert tasks, "Flower saw no task"
    assert {task["state"] for task in tasks} == {"SUCCESS"}, tasks
    workers = {task["worker"] for task in tasks}
    assert workers <= {f"remex-{host}@{host}" for host in hostnames}, (workers, hostnames)


# --------------------------------------------------------------------------- toolchain

TOOLCHAIN = ROOT / "examples" / "toolchain"
EXPECTED = TOOLCHAIN / "expected" / "files" / "release"
# Each element checked out alone (--deps none --no-integrate), as
# examples/toolchain/bst-build.sh made the reference from BuildStream's builds.
TOOLCHAIN_ELEMENTS = ("amhello", "libgreet", "greet", "libgreet-runtime", "app", "report")


@pytest.fixture(scope="module")
def toolchain_sysroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's sysroot, made by its own script (Debian packages cached
    in ~/.cache/remex/debs between runs); amhello/ is made beside it."""
    dest = tmp_path_factory.mktemp("toolchain") / "sysroot"
    run(["bash", str(TOOLCHAIN / "make-sysroot.sh"), str(dest)], dict(os.environ), timeout=900)
    return dest


def checkout_listing(folder: Path) -> dict[str, list[str]]:
    """What bst-build.sh records of a checkout: ``txt`` (type letter and path),
    ``sha256`` (digest and path of each file), ``links`` (path -> target)."""
    entries = sorted((path.relative_to(folder).as_posix(), path) for path in folder.rglob("*"))
    kinds = {
        rel: "l" if path.is_symlink() else "d" if path.is_dir() else "f" for rel, path in entries
    }
    return {
        "txt": [f"{kind} {rel}" for rel, kind in kinds.items()],
        "sha256": [
            f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}"
            for rel, path in entries
            if kinds[rel] == "f"
        ],
        "links": [f"{rel} -> {os.readlink(path)}" for rel, path in entries if kinds[rel] == "l"],
    }


def test_the_toolchain_example_builds_across_the_containers_as_bst_builds_it(
    compose_stack: ComposeStack, toolchain_sysroot: Path, tmp_path: Path
) -> None:
    # Given examples/toolchain with its sysroot (gcc, binutils, make, libc)
    project = tmp_path / "toolchain"
    shutil.copytree(TOOLCHAIN, project, ignore=shutil.ignore_patterns("sysroot", "amhello"))
    shutil.copytree(toolchain_sysroot, project / "sysroot", symlinks=True)
    shutil.copytree(toolchain_sysroot.parent / "amhello", project / "amhello", symlinks=True)
    # When it is enqueued from the host through the published Redis; its
    # actions (autotools' configure and make, gcc) run on the bot containers
    started = time.monotonic()
    remex(compose_stack, tmp_path, "build", "-C", str(project), "report.bst", "amhello.bst",
          timeout=1100)  # fmt: skip
    FIGURES["toolchain build across containers"] = f"{time.monotonic() - started:.0f} s"
    # Then each element checks out with the paths and symlinks BuildStream's
    # own build gave (examples/toolchain/EXPECTED.md), and with the same
    # bytes when the sysroot has the reference's package versions
    same_packages = (toolchain_sysroot / "usr/share/toolchain-sysroot/packages").read_text() == (
        TOOLCHAIN / "expected" / "sysroot-packages.txt"
    ).read_text()
    for name in TOOLCHAIN_ELEMENTS:
        out = tmp_path / "out" / name
        remex(compose_stack, tmp_path, "checkout", "-C", str(project), "--deps", "none",
              "--no-integrate", f"{name}.bst", str(out))  # fmt: skip
        listing = checkout_listing(out)
        for kind in ("txt", "links") + (("sha256",) if same_packages else ()):
            expected = (EXPECTED / f"{name}.{kind}").read_text().splitlines()
            assert listing[kind] == expected, (name, kind)
    # And the programs it built said what they must in the script element
    report = tmp_path / "out" / "report" / "usr/share/toolchain"
    assert (report / "hello.txt").read_text() == "Hello World!\nThis is amhello 1.0.\n"
    assert (report / "greet.txt").read_text().startswith("Hello, report")
    FIGURES["toolchain checkouts compared"] = (
        f"{len(TOOLCHAIN_ELEMENTS)} elements, paths and links"
        + (", bytes" if same_packages else " (sysroot packages differ: bytes not compared)")
    )


def test_flower_refuses_requests_without_its_password(compose_stack: ComposeStack) -> None:
    # Given Flower's published port, when it is asked without credentials
    with pytest.raises(urllib.error.HTTPError) as refused:
        flower(compose_stack, "/api/workers", auth=False)
    # Then it answers 401
    assert refused.value.code == 401
    # And with them it lists the worker containers
    # (each container runs a worker and its fetch pool: two Celery workers)
    workers = flower(compose_stack, "/api/workers?refresh=1")
    assert len([name for name in workers if "-fetch@" not in name]) == 2
    assert len([name for name in workers if "-fetch@" in name]) == 2


# --------------------------------------------------------------------------- scale and faults
# A project of its own per test: COUNT independent elements that each sleep,
# with a fresh token in their commands so nothing is a cache hit.


def slow_project(dest: Path, count: int, seconds: int) -> tuple[Path, str]:
    """examples/hello's sysroot and COUNT elements ``slowN.bst`` each sleeping
    SECONDS in their sandbox, depended on by ``slow.bst`` (a stack).

    Returns:
        The project folder and the token each element writes to ``/slow/N``.
    """
    project = copy_hello_project(dest)
    token = secrets.token_hex(8)
    for index in range(count):
        (project / "elements" / f"slow{index}.bst").write_text(
            "kind: manual\n"
            "build-depends:\n- base.bst\n"
            "config:\n"
            "  build-commands:\n"
            f"  - sleep {seconds}\n"
            f"  - echo {token}-{index} > out\n"
            "  install-commands:\n"
            '  - mkdir -p "%{install-root}/slow"\n'
            f'  - cp out "%{{install-root}}/slow/{index}"\n'
        )
    deps = "".join(f"- slow{index}.bst\n" for index in range(count))
    (project / "elements" / "slow.bst").write_text(f"kind: stack\ndepends:\n{deps}")
    return project, token


def check_slow_checkout(
    stack: ComposeStack, workdir: Path, project: Path, token: str, count: int
) -> None:
    """slow.bst checks out with every element's file, holding this build's token."""
    out = workdir / "out"
    remex(stack, workdir, "checkout", "-C", str(project), "--deps", "run", "slow.bst", str(out))
    for index in range(count):
        assert (out / "slow" / str(index)).read_text() == f"{token}-{index}\n"


def start_build(stack: ComposeStack, workdir: Path, project: Path) -> subprocess.Popen[str]:
    """``remex build slow.bst`` on the host, in the background."""
    return subprocess.Popen(
        [remex_program(), "build", "-C", str(project), "slow.bst"],
        env=stack.client_env(workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def finish(build: subprocess.Popen[str], timeout: float) -> str:
    """Wait (bounded) for a background build; its output, which must say it succeeded."""
    try:
        output, _ = build.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        build.kill()
        output, _ = build.communicate()
        raise AssertionError(
            f"the build did not finish in {timeout} s:\n{output[-4000:]}"
        ) from None
    assert build.returncode == 0, output[-4000:]
    return output


def started_tasks(stack: ComposeStack, since: float) -> list[dict[str, Any]]:
    """Flower's tasks received after ``since`` (a Unix time) that are running now."""
    tasks = flower(stack, "/api/tasks?state=STARTED").values()
    return [task for task in tasks if (task.get("received") or 0) >= since]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    """Poll ``condition`` every second until it is truthy (at most ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_workers(stack: ComposeStack, names: set[str]) -> None:
    """Wait (bounded) until Flower's live workers include ``names``."""

    def seen() -> bool:
        # {name: online?}: a stopped worker stays listed, offline.
        workers = flower(stack, "/api/workers?refresh=1&status=1")
        return names <= {name for name, online in workers.items() if online is True}

    wait_for(seen, f"workers {sorted(names)} in Flower", timeout=120)


def test_scaled_to_three_workers_and_bots_the_work_spreads(
    compose_stack: ComposeStack, tmp_path: Path
) -> None:
    # Given the stack scaled to 3 workers and 3 bots (ready when Flower sees
    # the new worker: sooner than its first health check, 30 s after start)
    compose_stack.compose("up", "--detach", "--scale", "worker=3", "--scale", "bot=3", timeout=300)
    workers = compose_stack.containers("worker")
    assert len(workers) == 3 and len(compose_stack.containers("bot")) == 3
    wait_for_workers(compose_stack, {f"remex-{cid[:12]}@{cid[:12]}" for cid in workers})
    # When a build of 9 independent elements runs
    since = time.time()
    project, token = slow_project(tmp_path / "slow", count=9, seconds=3)
    finish(start_build(compose_stack, tmp_path, project), timeout=240)
    # Then Flower shows its tasks on all 3 worker containers
    tasks = [
        task
        for task in flower(compose_stack, "/api/tasks").values()
        if (task.get("received") or 0) >= since
    ]
    assert {task["worker"] for task in tasks} == {
        f"remex-{cid[:12]}@{cid[:12]}" for cid in workers
    }, tasks
    check_slow_checkout(compose_stack, tmp_path, project, token, count=9)


def test_a_worker_and_a_bot_killed_mid_build_the_build_completes(
    compose_stack: ComposeStack, tmp_path: Path
) -> None:
    # Given a build running on the stack's workers and bots
    project, token = slow_project(tmp_path / "slow", count=6, seconds=6)
    since = time.time()
    build = start_build(compose_stack, tmp_path, project)
    try:
        running = wait_for(lambda: started_tasks(compose_stack, since), "a running task")
        # When the worker container running a task and a bot container are killed
        host = running[0]["worker"].rpartition("@")[2]
        victim = next(c for c in compose_stack.containers("worker") if c.startswith(host))
        compose_stack.engine.docker("kill", victim)
        compose_stack.engine.docker("kill", compose_stack.containers("bot")[0])
    except BaseException:
        build.kill()
        raise
    # Then the build completes (the reconciler re-sends the worker's element,
    # BuildGrid requeues the bot's leases) with every element's output
    finish(build, timeout=300)
    check_slow_checkout(compose_stack, tmp_path, project, token, count=6)


def test_redis_restarted_mid_build_the_build_completes(
    compose_stack: ComposeStack, tmp_path: Path
) -> None:
    # Given a build running on the stack
    project, token = slow_project(tmp_path / "slow", count=4, seconds=6)
    since = time.time()
    build = start_build(compose_stack, tmp_path, project)
    try:
        wait_for(lambda: started_tasks(compose_stack, since), "a running task")
        # When Redis (broker, results, build state; AOF on its volume) restarts
        compose_stack.compose("restart", "redis", timeout=120)
    except BaseException:
        build.kill()
        raise
    # Then the build completes with every element's output
    finish(build, timeout=300)
    check_slow_checkout(compose_stack, tmp_path, project, token, count=4)


def test_a_machine_joining_with_compose_join_takes_the_tasks(
    compose_stack: ComposeStack, tmp_path: Path
) -> None:
    # Given deploy/compose-join.yml as a second compose project, pointed at
    # the first stack's published ports. One host stands for both machines,
    # so its containers use the host's network, not a bridge of their own:
    # a container on a second bridge cannot reach the first stack's ports.
    # Published on 127.0.0.1 they are not addressable from it (its
    # 127.0.0.1 is its own); published on an address it can reach, the
    # port's DNAT (nat DOCKER chain, `! -i <first bridge>`) turns the
    # connection into forwarding from its bridge to the first stack's, and
    # dockerd's DOCKER-ISOLATION-STAGE-2 chain drops exactly that
    # (`-o <first bridge> -j DROP`, for every bridge, no setting in 20.10).
    # A real second machine comes in through the network card, which those
    # rules leave alone.
    override = tmp_path / "host-network.yml"
    override.write_text("services:\n  worker: {network_mode: host}\n  bot: {network_mode: host}\n")
    env_file = tmp_path / ".env"
    env_file.write_text(compose_stack.env_file.read_text() + "REMEX_SERVER=127.0.0.1\n")
    join = [
        *("docker", "compose", "-p", f"{compose_stack.project}join"),
        *("--env-file", str(env_file), "-f", str(ROOT / "deploy" / "compose-join.yml")),
        *("-f", str(override)),
    ]
    run([*join, "up", "--detach"], compose_stack.env, timeout=300, cwd=ROOT)
    host = socket.gethostname()
    try:
        wait_for_workers(compose_stack, {f"remex-{host}@{host}"})
        # When the first machine's workers stop and a build runs
        compose_stack.compose("stop", "--timeout", "30", "worker")
        since = time.time()
        project, token = slow_project(tmp_path / "slow", count=2, seconds=1)
        finish(start_build(compose_stack, tmp_path, project), timeout=180)
        # Then the joining machine's worker ran its tasks
        tasks = [
            task
            for task in flower(compose_stack, "/api/tasks").values()
            if (task.get("received") or 0) >= since
        ]
        assert tasks and {task["worker"] for task in tasks} == {f"remex-{host}@{host}"}, tasks
        check_slow_checkout(compose_stack, tmp_path, project, token, count=2)
    finally:
        run([*join, "down", "--volumes", "--timeout", "10"], compose_stack.env, timeout=300)
        compose_stack.compose("start", "worker")
