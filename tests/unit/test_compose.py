"""docker-compose.yml, Dockerfile and deploy/ checked against the code.

Without a Docker engine (tests/deploy/ runs the stack on one), this checks:
the compose file parses; every service's command is a real ``remex``
subcommand whose options parse, or a real program with real options; every
file it mounts exists; the services' ``REMEX_*`` settings load as a
configuration; what must survive a restart is on a named volume;
deploy/buildgrid.yml has the settings of the test stack; the Dockerfile
installs what scripts/setup.sh installs. BuildGrid and the artifact server
actually start with these commands and files in
tests/integration/test_compose_buildgrid.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from cli import main as remex_cli
from pipeline.config import load_config
from pipeline.servers import buildbox_dir
from pipeline.servers.testing.buildgrid import buildgrid_config as stack_grid_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_JOIN = ROOT / "deploy" / "compose-join.yml"
DOCKERFILE = ROOT / "Dockerfile"
SETUP = ROOT / "scripts" / "setup.sh"
BUILDGRID_CONFIG = ROOT / "deploy" / "buildgrid.yml"
REDIS_CONFIG = ROOT / "deploy" / "redis.conf"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"

# Programs that run in images other than remex's (their own image provides them).
FOREIGN_IMAGES = {"redis": "redis:", "postgres": "postgres:"}
# The columns Flower's tasks page knows (flower/options.py, `tasks_columns`).
FLOWER_COLUMNS = {
    *("name", "uuid", "state", "args", "kwargs", "result", "received", "started"),
    *("runtime", "worker", "retries", "revoked", "exception", "expires", "eta"),
}


# --------------------------------------------------------------------------- helpers


def env_example() -> dict[str, str]:
    """deploy/env.example as a mapping (what `cp deploy/env.example .env` gives)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        raise AssertionError(f"${{{name}}} is not set and has no default ({arg})")

    return _VARIABLE.sub(replace, value)


def variables_used(text: str) -> set[tuple[str, bool]]:
    """Every (variable, has a default) that ``text`` interpolates."""
    return {
        (m.group(1), m.group(2) in (":-", "-"))
        for m in _VARIABLE.finditer(text)
        if m.group(0) != "$$"
    }


@cache
def compose(path: Path = COMPOSE) -> dict[str, Any]:
    """A compose file (docker-compose.yml), interpolated with deploy/env.example."""
    raw = yaml.safe_load(path.read_text())
    env = env_example()

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return interpolate(node, env)
        if isinstance(node, list):
            return [walk(item) for item in node]
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        return node

    return dict(walk(raw))


def services(path: Path = COMPOSE) -> dict[str, dict[str, Any]]:
    return dict(compose(path)["services"])


def argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def uses_remex_image(name: str) -> bool:
    return str(services()[name].get("image", "")) == env_example()["REMEX_IMAGE"]


def healthcheck_argv(service: Mapping[str, Any]) -> list[str]:
    """A health check's command, as an argv (``CMD-SHELL`` strings split)."""
    test = service["healthcheck"]["test"]
    kind, *rest = test
    if kind == "CMD-SHELL":
        return shlex.split(rest[0])
    assert kind == "CMD", f"unknown health check form {kind}"
    return [str(a) for a in rest]


def parse_click(command: click.Command, name: str, args: list[str]) -> None:
    """Parse ``args`` as click would for ``command`` (types converted, nothing run)."""
    with command.make_context(name, list(args)) as ctx:
        assert ctx is not None


def check_remex_command(args: list[str]) -> None:
    """``args`` (after ``remex``) name a real subcommand whose options parse."""
    assert args, "remex without a subcommand"
    subcommand = remex_cli.commands.get(args[0])
    assert subcommand is not None, (
        f"`remex {args[0]}` is not a remex subcommand (have: {sorted(remex_cli.commands)})"
    )
    parse_click(subcommand, args[0], args[1:])


def check_celery_command(args: list[str]) -> None:
    """``celery -A tasks.app SUB ...``: the app module exists, SUB is a real
    Celery command, and Flower's options are Flower's."""
    from celery.bin.celery import celery

    assert args[:2] == ["-A", "tasks.app"], args
    assert importlib.util.find_spec("tasks.app") is not None
    sub, rest = args[2], args[3:]
    assert sub in celery.commands, f"`celery {sub}` is not a Celery command"
    if sub == "flower":
        import flower.options

        for arg in rest:
            name, _, value = arg.lstrip("-").partition("=")
            assert arg.startswith("--") and value, f"flower option {arg!r}: use --name=value"
            assert name.replace("-", "_") in flower.options.default_options, (
                f"--{name} is not a Flower option"
            )
            if name == "tasks_columns":
                assert set(value.split(",")) <= FLOWER_COLUMNS, value
    else:
        parse_click(celery.commands[sub], sub, rest)


@cache
def casd_options() -> set[str]:
    result = subprocess.run(
        [str(buildbox_dir() / "buildbox-casd"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", result.stdout + result.stderr, re.MULTILINE))


def bgd() -> str:
    program = Path(sys.executable).parent / "bgd"
    assert program.exists(), "bgd not found: pip install -e '.[test]'"
    return str(program)


def check_bgd_command(args: list[str]) -> None:
    """``bgd GROUP COMMAND ...``: BuildGrid is installed, and the command is
    one remex's deployment uses (tests/integration/test_compose_buildgrid.py
    runs both; importing buildgrid here would clash with remex's protos)."""
    bgd()
    assert tuple(args[:2]) in {("migrate", "apply"), ("server", "start")}, args


def check_program(name: str, args: list[str]) -> None:
    """The command of service ``name`` (or of its health check) is real."""
    program, rest = args[0], args[1:]
    if program == "remex":
        check_remex_command(rest)
    elif program == "celery":
        check_celery_command(rest)
    elif program == "bgd":
        check_bgd_command(rest)
    elif program == "buildbox-casd":
        for arg in rest:
            if arg.startswith("--"):
                option = arg.partition("=")[0]
                assert option in casd_options(), f"buildbox-casd has no option {option}"
    elif program == "python":
        assert rest[0] == "-c", rest
        code = compile(rest[1], f"<{name} health check>", "exec")
        # The modules and names it imports exist.
        for line in rest[1].split(";"):
            match = re.match(r"\s*from ([\w.]+) import (\w+)", line)
            if match:
                module = importlib.import_module(match.group(1))
                assert hasattr(module, match.group(2)), line
        assert code is not None
    else:
        # A program of the service's own image (redis-server, pg_isready ...):
        # Debian's copy is here too (scripts/setup.sh installs the packages).
        found = _which(program)
        assert found, f"{name}: program {program!r} not found"


def _which(program: str) -> str | None:
    import shutil

    if found := shutil.which(program):
        return found
    # Debian keeps PostgreSQL's client programs under /usr/lib/postgresql/N/bin.
    return next((str(p) for p in Path("/usr/lib/postgresql").glob(f"*/bin/{program}")), None)


def mounts(service: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of each volume of a service (short syntax)."""
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        yield source, rest.split(":")[0]


class _TaggedLoader(yaml.SafeLoader):
    """A YAML loader for BuildGrid's tags: ``!tag {..}`` becomes ``{"kind": "!tag", ..}``."""


def _construct_tagged(loader: yaml.SafeLoader, tag: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return {"kind": f"!{tag}", **loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.ScalarNode):
        return {"kind": f"!{tag}", "value": loader.construct_scalar(node)}
    return {"kind": f"!{tag}", "items": loader.construct_sequence(node, deep=True)}


_TaggedLoader.add_multi_constructor("!", _construct_tagged)


def buildgrid_config() -> dict[str, Any]:
    return dict(yaml.load(BUILDGRID_CONFIG.read_text(), Loader=_TaggedLoader))


def shell_words_after(text: str, marker: str) -> list[str]:
    """The words after ``marker`` up to the end of that command (``&&``, ``;``,
    ``|`` or the end), with line continuations joined."""
    joined = text.replace("\\\n", " ")
    start = joined.index(marker) + len(marker)
    words = []
    for word in shlex.split(joined[start:].split("\n")[0], comments=False):
        if word in ("&&", ";", "|", "||"):
            break
        words.append(word)
    return words


def setup_debian_packages() -> set[str]:
    match = re.search(r"^DEBIAN_PACKAGES=\(([^)]*)\)", SETUP.read_text(), re.MULTILINE)
    assert match, "DEBIAN_PACKAGES=(...) not found in scripts/setup.sh"
    return set(match.group(1).split())


def dockerfile_debian_packages(stage: int = -1) -> set[str]:
    """The Debian packages one stage of the Dockerfile installs (the last: the image)."""
    text = "FROM".join(DOCKERFILE.read_text().split("\nFROM ")[1:][stage : stage + 1 or None])
    words = shell_words_after(text, "apt-get install")
    return {w for w in words if not w.startswith("-")}


def pip_extras(text: str) -> set[str]:
    """The extras of the project's own ``pip install`` ('.[a,b]' -> {a, b})."""
    match = re.search(r"pip install[^\n]*?'(?:-e )?\.\[([^\]]*)\]'", text)
    if match is None:
        match = re.search(r"pip install[^\n]*?-e '\.\[([^\]]*)\]'", text)
    assert match, "no pip install of '.[...]' found"
    return set(match.group(1).split(","))


# --------------------------------------------------------------------------- compose


def test_compose_has_every_service_of_the_deployment() -> None:
    # Given docker-compose.yml
    # Then it parses and has every service the distributed deployment needs
    assert set(services()) >= {
        "redis",
        "postgres",
        "buildgrid-migrate",
        "buildgrid",
        "artifacts",
        "bot",
        "worker",
        "flower",
    }


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_JOIN], ids=lambda p: p.name)
def test_every_variable_is_in_env_example_or_has_a_default(path: Path) -> None:
    # Given the variables a compose file interpolates
    example = env_example()
    for name, has_default in variables_used(path.read_text()):
        # Then each is documented in deploy/env.example, or has a default
        assert has_default or name in example, f"${{{name}}} is not in deploy/env.example"


@pytest.mark.parametrize(
    "name", ["redis", "buildgrid-migrate", "buildgrid", "artifacts", "bot", "worker", "flower"]
)
def test_service_command_is_a_real_program_with_real_options(name: str) -> None:
    # Given a service's command
    service = services()[name]
    # Then it is a real remex subcommand whose options parse, or a real program
    check_program(name, argv(service["command"]))


def test_health_checks_run_real_programs() -> None:
    for name, service in services().items():
        # Given a service
        if "healthcheck" not in service:
            # Then only one-shot jobs and the bots (no port to ask) have none
            assert name in ("buildgrid-migrate", "bot"), f"{name} has no health check"
            continue
        # Then its health check runs a real program
        check_program(f"{name} health check", healthcheck_argv(service))


def test_the_bot_leases_from_the_buildgrid_service_in_a_sandbox() -> None:
    # Given the bot's command
    args = argv(services()["bot"]["command"])
    # Then it leases from the buildgrid service and runs actions with buildbox-run
    assert args[:2] == ["remex", "bot"]
    assert args[args.index("--remote") + 1] == "http://buildgrid:50051"
    assert args[args.index("--runner") + 1] == "buildbox-run"
    # And the container may create the namespaces bubblewrap needs, and mount
    # a fresh /proc in them (Docker's masked /proc paths forbid it otherwise)
    assert "SYS_ADMIN" in services()["bot"]["cap_add"]
    for path in (COMPOSE, COMPOSE_JOIN):
        assert "systempaths=unconfined" in services(path)["bot"]["security_opt"], path


@pytest.mark.parametrize("publish", [None, "10.1.2.3"])
def test_published_ports_are_loopback_unless_told_and_their_host_ports_configurable(
    publish: str | None,
) -> None:
    # Given the example .env, with or without a publish address and host ports
    env = {k: v for k, v in env_example().items() if not k.startswith("REMEX_")}
    if publish:
        env.update(REMEX_PUBLISH_ADDRESS=publish, REMEX_REDIS_PORT="16379")
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    published = {
        name: [interpolate(str(port), env) for port in service["ports"]]
        for name, service in raw.items()
        if service.get("ports")
    }
    # Then each server's port is published on 127.0.0.1 unless told otherwise,
    # at the host port asked for (the defaults are the servers' own ports)
    address = publish or "127.0.0.1"
    redis_port = "16379" if publish else "6379"
    assert published == {
        "redis": [f"{address}:{redis_port}:6379"],
        "buildgrid": [f"{address}:50051:50051"],
        "artifacts": [f"{address}:50052:50052"],
        "flower": [f"{address}:5555:5555"],
    }


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_JOIN], ids=lambda p: p.name)
def test_mounted_config_files_exist_in_the_repository(path: Path) -> None:
    declared = set(compose(path).get("volumes") or {})
    for name, service in services(path).items():
        for source, _ in mounts(service):
            # Given a volume of a service
            if source.startswith((".", "/")):
                # Then a bind mount names a file of the repository
                assert source.startswith("./"), f"{name}: absolute bind mount {source}"
                assert (path.parent / source).exists(), f"{name}: {source} is not in the repo"
            else:
                # And a named volume is declared
                assert source in declared, f"{name}: volume {source} is not declared"


def test_state_that_must_survive_a_restart_is_on_named_volumes() -> None:
    # Given the stateful services and where they keep their state
    expected = {
        "redis": "/data",
        "postgres": "/var/lib/postgresql/data",
        "buildgrid": "/var/lib/buildgrid/cas",
        "artifacts": "/var/lib/remex/artifacts",
        "flower": "/var/lib/flower",
    }
    for name, path in expected.items():
        targets = {target: source for source, target in mounts(services()[name])}
        # Then that folder is a named volume (not the container's own layer)
        assert path in targets, f"{name}: {path} is not a volume"
        assert not targets[path].startswith((".", "/")), f"{name}: {path} is a bind mount"
    # And the paths are those the programs use
    assert "--db=/var/lib/flower/flower.db" in argv(services()["flower"]["command"])
    assert argv(services()["artifacts"]["command"])[-1] == "/var/lib/remex/artifacts"
    disk = next(s for s in buildgrid_config()["storages"] if s["kind"] == "!disk-storage")
    assert disk["path"] == "/var/lib/buildgrid/cas"


def test_start_order_waits_for_health() -> None:
    all_services = services()
    for name, service in all_services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            # Given a dependency of a service
            assert dependency in all_services, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            # Then it waits for the dependency's health check, or for a
            # one-shot job to succeed
            if condition == "service_healthy":
                assert "healthcheck" in all_services[dependency], dependency
            else:
                assert condition == "service_completed_successfully", (name, condition)
                assert all_services[dependency].get("restart") == "no", dependency
    # And the workers start after everything they talk to
    assert set(all_services["worker"]["depends_on"]) == {"redis", "buildgrid", "artifacts"}
    assert set(all_services["buildgrid"]["depends_on"]) == {"postgres", "buildgrid-migrate"}


def test_redis_is_persistent_never_evicts_and_needs_a_password() -> None:
    # Given the redis service and deploy/redis.conf
    args = argv(services()["redis"]["command"])
    conf = dict(
        line.split(None, 1)
        for line in REDIS_CONFIG.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    # Then AOF is on, nothing is ever evicted, and a password is required
    assert conf["appendonly"] == "yes"
    assert conf["maxmemory-policy"] == "noeviction"
    assert args[1] == "/usr/local/etc/redis/redis.conf"
    assert args[args.index("--requirepass") + 1] == env_example()["REDIS_PASSWORD"]
    assert str(services()["redis"]["image"]).startswith(FOREIGN_IMAGES["redis"])


def test_remex_services_settings_load_as_a_configuration(tmp_path: Path) -> None:
    for name in ("worker", "flower"):
        # Given the REMEX_* settings of a remex service
        env = service_env(services()[name])
        env.update(REMEX_CONFIG=os.devnull, REMEX_STACK_DIR=str(tmp_path / "none"))
        # When remex loads its configuration from them
        config = load_config(environ=env)
        # Then the broker is the password-protected redis service, and the
        # REAPI servers are the buildgrid and artifacts services
        password = env_example()["REDIS_PASSWORD"]
        assert config.broker_url == f"redis://:{password}@redis:6379/0"
        assert str(config.execution.url) == "grpc://buildgrid:50051"
        assert config.artifacts is not None
        assert str(config.artifacts.url) == "grpc://artifacts:50052"
    # And the ports are those the servers listen on
    channel = buildgrid_config()["server"][0]
    assert channel["address"] == "0.0.0.0:50051"
    assert "--bind=0.0.0.0:50052" in argv(services()["artifacts"]["command"])


def test_flower_has_basic_auth_persistent_state_and_remex_columns() -> None:
    # Given the flower service
    flower = services()["flower"]
    args = argv(flower["command"])
    # Then it asks for a password, keeps its state, and shows each task's element
    user, _, password = service_env(flower)["FLOWER_BASIC_AUTH"].partition(":")
    assert user and password == env_example()["FLOWER_PASSWORD"]
    assert "--persistent=True" in args
    assert any(a.startswith("--tasks_columns=") and "args" in a for a in args)


def test_a_joining_machine_runs_the_same_workers_and_bots_against_the_first() -> None:
    # Given deploy/compose-join.yml, for a second build machine
    joining, first = services(COMPOSE_JOIN), services()
    server = env_example()["REMEX_SERVER"]
    assert set(joining) == {"worker", "bot"}
    for name in ("worker", "bot"):
        check_program(name, argv(joining[name]["command"]))
    check_program("worker health check", healthcheck_argv(joining["worker"]))
    # Then its workers are those of the first machine, pointed at its servers
    assert joining["worker"]["command"] == first["worker"]["command"]
    env = service_env(joining["worker"])
    env.update(REMEX_CONFIG=os.devnull, REMEX_STACK_DIR="/nonexistent")
    config = load_config(environ=env)
    password = env_example()["REDIS_PASSWORD"]
    assert config.broker_url == f"redis://:{password}@{server}:6379/0"
    assert str(config.execution.url) == f"grpc://{server}:50051"
    assert config.artifacts is not None
    assert str(config.artifacts.url) == f"grpc://{server}:50052"
    # And its bots lease from the first machine's BuildGrid, as the first's do
    bot, first_bot = argv(joining["bot"]["command"]), argv(first["bot"]["command"])
    assert bot[bot.index("--remote") + 1] == f"http://{server}:50051"
    assert [a for a in bot if server not in a] == [a for a in first_bot if "buildgrid" not in a]
    # And it builds the same image from the repository root
    assert joining["worker"]["build"]["context"] == ".."
    assert (COMPOSE_JOIN.parent / ".." / joining["worker"]["build"]["dockerfile"]).exists()


# --------------------------------------------------------------------------- deploy/buildgrid.yml


def test_buildgrid_config_has_the_test_stack_settings() -> None:
    # Given deploy/buildgrid.yml
    config = buildgrid_config()
    # Then it has the settings TEST-STACK.md lists (the CAS on disk instead
    # of in memory, so that it survives a restart)
    channel = config["server"][0]
    assert channel["kind"] == "!channel" and channel["insecure-mode"] is True
    assert config["grpc-server-options"] == {"grpc.so_reuseport": 0}
    assert config["connections"][0]["kind"] == "!sql-connection"
    assert config["connections"][0]["connection-string"] == {
        "kind": "!expand-vars",
        "value": "$BGD_DATABASE_URL",
    }
    assert config["storages"][0]["kind"] == "!disk-storage"
    cache = config["caches"][0]
    assert cache["kind"] == "!lru-action-cache" and cache["allow-updates"] is True
    scheduler = config["schedulers"][0]
    assert scheduler["kind"] == "!sql-scheduler"
    assert scheduler["bot-session-keepalive-timeout"] == 10
    assert scheduler["session-expiry-timer-interval"] == 2
    assert scheduler["poll-interval"] == 0.25
    assert scheduler["bot-poll-interval"] == 0.25
    assert scheduler["property-set"]["kind"] == "!dynamic-property-set"
    assert scheduler["property-set"]["match-property-keys"] == ["OSFamily", "ISA"]
    assigner = scheduler["assigners"][0]
    assert assigner["kind"] == "!priority-age-assigner"
    assert assigner["jitter-factor"] == 0.0
    (instance,) = config["instances"]
    assert instance["name"] == ""
    kinds = {service["kind"]: service for service in instance["services"]}
    assert set(kinds) == {"!cas", "!bytestream", "!action-cache", "!execution"}
    assert kinds["!execution"]["endpoints"] == ["execution", "operations", "bots"]
    # And the compose file gives BuildGrid the database URL it expands
    env = service_env(services()["buildgrid"])
    assert env["BGD_DATABASE_URL"].startswith("postgresql+psycopg2://bgd:")
    assert env["BGD_DATABASE_URL"].endswith("@postgres:5432/bgd")


def test_buildgrid_config_schedules_like_the_test_stack() -> None:
    # Given deploy/buildgrid.yml and the config the tests and benches run
    # BuildGrid with (pipeline/servers/testing/buildgrid.py, its defaults)
    tested = yaml.load(
        stack_grid_config("127.0.0.1:1", "postgresql+psycopg2://bgd@127.0.0.1:1/bgd"),
        Loader=_TaggedLoader,
    )
    deployed = buildgrid_config()
    # Then both schedule alike: the same scheduler timings, assigner and
    # thread pool (what the speed of a build on BuildGrid hangs on)
    refs = {"kind", "sql", "storage", "action-cache"}
    scheduler, expected = deployed["schedulers"][0], tested["schedulers"][0]
    assert {k: v for k, v in scheduler.items() if k not in refs} == {
        k: v for k, v in expected.items() if k not in refs
    }
    assert deployed["thread-pool-size"] == tested["thread-pool-size"]


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_the_debian_packages_setup_sh_installs_that_services_run_with() -> None:
    # Given the Debian packages of scripts/setup.sh and of the Dockerfile's stages
    setup = setup_debian_packages()
    build, image = dockerfile_debian_packages(0), dockerfile_debian_packages(-1)
    # Then the image has every one the remex services run with, plus Python
    # itself (setup.sh finds it on the machine); not the Redis and PostgreSQL
    # servers (images of their own) nor the venv tooling, which only the
    # build stage has
    servers = {"redis-server", "postgresql"}
    assert image == (setup - servers - {"python3-venv"}) | {"python3"}, sorted(image)
    assert {"python3", "python3-venv"} <= build and not build & servers, sorted(build)


def test_dockerfile_pip_installs_the_project_as_setup_sh_does() -> None:
    # Given the project's pip install in both
    setup, image = pip_extras(SETUP.read_text()), pip_extras(DOCKERFILE.read_text())
    # Then the image has the same extras, without the developer tools
    assert image == setup - {"dev"}, (setup, image)
    assert "python3 -m venv" in DOCKERFILE.read_text()
    assert "pip install -q --upgrade pip" in DOCKERFILE.read_text()


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them() -> None:
    # Given the packages pyproject.toml installs
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = set(re.findall(r"^COPY (\S+) ", DOCKERFILE.read_text(), re.MULTILINE))
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    # Then the Dockerfile copies each, and .dockerignore leaves each in the context
    for package in packages:
        assert package in copied, f"Dockerfile does not COPY {package}"
        assert package not in ignored, f".dockerignore drops {package}"
    for source in copied:
        assert source not in ignored, f".dockerignore drops {source}, which the Dockerfile copies"
    # And the remex services run the image the Dockerfile builds
    for name in ("buildgrid", "artifacts", "bot", "worker", "flower"):
        assert uses_remex_image(name), name
        assert services()[name]["build"]["dockerfile"] == "Dockerfile"
