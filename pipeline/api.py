"""The scripting API: submit a build, follow it, read it, cancel it.

    import pipeline
    build_id = pipeline.submit("examples/hello", ["app.bst"])
    status = pipeline.wait(build_id)
    assert status.status == "succeeded"

The CLI (``remex build``) is a thin layer over these functions.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.cas import LocalCas
from pipeline.config import OptionSetting, RemexConfig, load_config
from pipeline.elements import load_project
from pipeline.elements.element import Element
from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import MappingNode, Mark, Node, ScalarNode, SequenceNode, load_yaml
from pipeline.errors import RemexError
from pipeline.scheduler import BuildStatus, Scheduler
from pipeline.spec import BuildSpec
from pipeline.stages import StageContext, lookup_artifact, snapshot_sources


def _config(project_dir: Path | None, config: RemexConfig | None) -> RemexConfig:
    return config if config is not None else load_config(project_dir)


def open_context(config: RemexConfig, *, correlated_id: str = "") -> StageContext:
    """A stage context on this host: its local CAS and both remote servers.

    Raises:
        ConfigError: no execution server is configured and no stack is up.
    """
    execution = config.require_execution()
    cas = LocalCas(config.cas_dir, quota_bytes=config.cas_quota_bytes)
    return StageContext.connect(
        cas,
        execution,
        config.artifact_endpoint,
        storage=config.storage,
        action_cache=config.action_cache,
        correlated_id=correlated_id,
        download=config.cas_download,
    )


def plan_targets(
    project_dir: Path | str,
    targets: Sequence[str],
    *,
    cas: LocalCas,
    options: Mapping[str, str] | None = None,
    config: RemexConfig | None = None,
) -> tuple[list[Element], list[Element]]:
    """Load the project and the targets' elements (dependencies first), with keys;
    return them and the targets' own elements (links followed).

    ``options`` are the project's option values as strings (BuildStream's
    ``-o NAME VALUE``); they win over the values ``config`` holds for the
    project (``[projects.NAME.options]`` in remex.toml). No ``targets``:
    project.conf ``defaults: targets:``, or else every element of the
    project, as bst does.

    Raises:
        ElementError: bad input; the message names the file, the line and the field.
    """
    project_dir = Path(project_dir)
    project = load_project(
        project_dir,
        cas=cas,
        options=options,
        option_values=configured_option_values(project_dir, config),
    )
    # No targets: as bst, project.conf `defaults: targets:` or every element.
    names = list(targets) or project.default_targets()
    loaded = project.load_targets(names)
    return loaded, [project.element(project.target_name(name)) for name in names]


def plan(
    project_dir: Path | str,
    targets: Sequence[str],
    *,
    cas: LocalCas,
    options: Mapping[str, str] | None = None,
    config: RemexConfig | None = None,
) -> list[Element]:
    """Load the project and the targets' elements (dependencies first), with keys.

    As :func:`plan_targets`, without the targets.

    Raises:
        ElementError: bad input; the message names the file, the line and the field.
    """
    return plan_targets(project_dir, targets, cas=cas, options=options, config=config)[0]


def configured_option_values(
    project_dir: Path | str, config: RemexConfig | None
) -> MappingNode | None:
    """The option values ``config`` gives the project in ``project_dir``, as
    YAML nodes marked with the remex.toml file and line they came from (so a
    wrong one is reported there); None when it gives none.

    Raises:
        ElementError: project.conf cannot be read.
    """
    if config is None or not config.project_options:
        return None
    conf = Path(project_dir) / "project.conf"
    if not conf.is_file():
        return None  # load_project says so, with its own message
    name = load_yaml(conf, "project.conf").get_str("name")
    settings = config.project_options.get(name or "")
    if not settings:
        return None
    prefix = f"projects.{name}.options"
    first = next(iter(settings.values()))
    node = MappingNode(Mark(first.file, first.line), prefix)
    for key, setting in settings.items():
        node.entries[key] = _setting_node(setting, f"{prefix}.{key}")
        node.key_marks[key] = Mark(setting.file, setting.line)
    return node


def _setting_node(setting: OptionSetting, path: str) -> Node:
    mark = Mark(setting.file, setting.line)
    value = setting.value
    if isinstance(value, list):
        return SequenceNode(mark, path, [_scalar(item, mark, path) for item in value])
    return _scalar(value, mark, path)


def _scalar(value: object, mark: Mark, path: str) -> ScalarNode:
    # TOML's true/false are BuildStream's; numbers become their text.
    if isinstance(value, bool):
        return ScalarNode(mark, path, "true" if value else "false")
    if isinstance(value, str | int | float):
        return ScalarNode(mark, path, str(value))
    raise LoadError(
        "an option value must be a string, a boolean, a number or a list of strings",
        file=mark.file,
        line=mark.line,
        field=path,
    )


def submit(
    project_dir: Path | str,
    targets: Sequence[str],
    *,
    config: RemexConfig | None = None,
    options: Mapping[str, str] | None = None,
) -> str:
    """Load, key, look up, snapshot and enqueue a build; return its id.

    ``options`` are the project's option values as strings (BuildStream's
    ``-o NAME VALUE``); they are checked against the project's declarations.

    Everything that can be wrong with the input is found before anything is
    enqueued. Elements whose artifact exists are done at once (``cached``);
    the others' sources are snapshotted into the artifact server's CAS, so an
    edit after this returns does not change the build.

    Raises:
        ConfigError: no broker or execution server is configured and no stack is up.
        ElementError: bad input (names the file, line and field).
        RemexError: a server could not be reached.
    """
    project_dir = Path(project_dir).resolve()
    config = _config(project_dir, config)
    config.require_broker()  # before any work: nowhere to enqueue it
    with open_context(config) as ctx:
        elements = plan(project_dir, targets, cas=ctx.local_cas, options=options, config=config)
        specs: list[BuildSpec] = []
        cached: list[str] = []
        with tempfile.TemporaryDirectory(prefix="remex-sources-") as workdir:
            for element in elements:
                digests = [
                    source.stage(ctx.local_cas, Path(workdir) / f"{len(specs)}-{i}")
                    for i, source in enumerate(element.sources)
                ]
                spec = element.build_spec(digests)
                if lookup_artifact(ctx, spec) is not None:
                    cached.append(element.name)
                else:
                    snapshot_sources(ctx, digests)
                specs.append(spec)
    scheduler = Scheduler.from_url(config.require_broker())
    names = {e.name for e in elements}
    # An element waits for everything staged into its build: its build
    # dependencies and their runtime closure.
    build_deps = {
        e.name: [d.name for d in e.staged_dependencies() if d.name in names] for e in elements
    }
    build_id, ready = scheduler.create_build(
        specs,
        build_deps,
        cached,
        {
            "project": elements[0].project if elements else "",
            "project_dir": str(project_dir),
            "targets": list(targets),
            "options": dict(options or {}),
            "remex_version": __version__,
        },
    )
    from pipeline.broker import make_celery, send_element

    app = make_celery(config)
    for element_name in ready:
        send_element(app, scheduler, build_id, element_name)
    return build_id


def status(build_id: str, *, config: RemexConfig | None = None) -> BuildStatus:
    """The build's state now.

    Raises:
        KeyError: no such build (or it expired).
    """
    return Scheduler.from_url(_config(None, config).require_broker()).status(build_id)


#: How often :func:`wait` checks whether the build ended (one small Redis read).
DONE_POLL = 0.02


def wait(
    build_id: str,
    *,
    config: RemexConfig | None = None,
    timeout: float | None = None,
    poll: float = 0.25,
    on_update: Callable[[BuildStatus], Any] | None = None,
) -> BuildStatus:
    """Follow a build until it is done; return its final status.

    Args:
        on_update: called with each status read (for a progress display).

    Raises:
        TimeoutError: ``timeout`` seconds passed first.
    """
    scheduler = Scheduler.from_url(_config(None, config).require_broker())
    deadline = None if timeout is None else time.monotonic() + timeout
    meta_key = scheduler.keys.build(build_id, "meta")
    while True:
        current = scheduler.status(build_id)
        if on_update is not None:
            on_update(current)
        if current.done:
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"build {build_id} not done after {timeout} s")
        # The whole status every ``poll`` seconds; in between, only the
        # build's status field, often: the end of a build is seen within
        # DONE_POLL seconds, not up to ``poll`` later.
        next_full = time.monotonic() + poll
        while time.monotonic() < next_full:
            time.sleep(min(DONE_POLL, poll))
            if scheduler.redis.hget(meta_key, "status") not in (None, "running", b"running"):
                break


def cancel(build_id: str, *, config: RemexConfig | None = None) -> list[str]:
    """Stop a build: unfinished elements are cancelled, queued tasks revoked,
    remote operations cancelled. Elements of other builds that waited on one
    of them are sent again (they build it themselves now). Returns the
    cancelled elements.

    Raises:
        KeyError: no such build (or it expired).
    """
    config = _config(None, config)
    scheduler = Scheduler.from_url(config.require_broker())
    stopped, released = scheduler.cancel(build_id)
    from pipeline.broker import make_celery, send_ready

    app = make_celery(config)
    send_ready(app, scheduler, released)
    task_ids = [t for info in stopped for t in info.get("task_ids", []) if t]
    if task_ids:
        app.control.revoke(task_ids)
    operations = [info["operation"] for info in stopped if info.get("operation")]
    if operations:
        with open_context(config, correlated_id=build_id) as ctx:
            for name in operations:
                # Best effort: the operation may have finished meanwhile.
                with contextlib.suppress(RemexError):
                    ctx.executor.cancel(name)
    return [str(info["element"]) for info in stopped]
