"""The scripting API: submit a build, follow it, read it, cancel it.

    import pipeline
    build_id = pipeline.submit("examples/hello", ["app.bst"])
    status = pipeline.wait(build_id)
    assert status.status == "succeeded"

    for event in pipeline.events(build_id):   # each state change, as it happens
        print(event["event"], event.get("element"))
    for build in pipeline.builds(state="running"):
        print(build.build_id, build.counts)

The CLI (``remex build``) is a thin layer over these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import importlib
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu.exceptions
import redis
from kombu.utils.url import maybe_sanitize_url

from pipeline import __version__
from pipeline.cas import LocalCas
from pipeline.config import (
    ON_ERROR_MODES,
    OptionSetting,
    RemexConfig,
    load_config,
    network_settings,
)
from pipeline.digest import EMPTY_DIGEST, Digest, digest_to_json
from pipeline.elements import load_project
from pipeline.elements.defaults import DEFAULT_MAX_JOBS
from pipeline.elements.element import Element
from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import (
    MappingNode,
    Mark,
    Node,
    ScalarNode,
    SequenceNode,
    load_yaml,
    recording_reads,
)
from pipeline.elements.project import gc_paused
from pipeline.elements.resolved import PlannedElement, ResolvedCache
from pipeline.elements.sources import FetchRequest
from pipeline.errors import BrokerUnavailableError, RemexError
from pipeline.scheduler import BUILD_STATES, BuildStatus, BuildSummary, Scheduler
from pipeline.spec import BuildSpec, source_uri
from pipeline.stages import StageContext, lookup_artifact, snapshot_sources
from pipeline.stages.fetch import fetch_spec, lookup_sources

RECONNECT_SECONDS = 15.0
"""How long one command of the API retries a Redis that cannot be reached."""

WAIT_RECONNECT_SECONDS = 120.0
"""How long :func:`wait` keeps following a build while Redis cannot be
reached (a restart is a pause), before it gives up."""

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)
"""What the Redis and Celery clients raise once their own retries gave up."""


def _config(project_dir: Path | None, config: RemexConfig | None) -> RemexConfig:
    return config if config is not None else load_config(project_dir)


@contextlib.contextmanager
def broker_errors(url: str) -> Iterator[None]:
    """Turn a Redis that stayed unreachable (the clients retried with backoff)
    into one :class:`BrokerUnavailableError` naming it (without its password)."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise BrokerUnavailableError(
            f"cannot reach Redis at {maybe_sanitize_url(url)}: {exc}"
        ) from exc


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
        default_mirror=config.fetch.default_mirror if config is not None else None,
    )
    if config is not None:
        project.network = network_settings(config)  # a junction's network source
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
    timings: dict[str, float] | None = None,
    priority: int = 5,
    on_error: str | None = None,
) -> str:
    """Load, key, look up, snapshot and enqueue a build; return its id.

    ``priority`` (0-9, lower runs sooner) orders every message of the
    build's chains ahead of those of builds with a higher number, and is the
    REAPI ``ExecutionPolicy.priority``/``ResultsCachePolicy.priority`` of its
    actions.

    ``on_error`` (as bst's ``--on-error``; default: the configuration's
    ``[build] on-error``, else ``continue``) says what a failed element does
    to the rest of the build: ``continue`` builds everything that does not
    depend on it; ``quit`` starts no new element (running ones finish, the
    others are cancelled) and the build fails; ``terminate`` also cancels
    the running ones, their remote operations too.

    ``options`` are the project's option values as strings (BuildStream's
    ``-o NAME VALUE``); they are checked against the project's declarations.
    ``timings``, if given, receives each phase's wall time in seconds:
    ``load`` (load and key), ``specs`` (sources staged, build specs),
    ``lookup`` (artifacts), ``sources`` (the source cache looked up for
    network sources), ``snapshot`` (sources uploaded), ``redis`` (the
    build's state written) and ``send`` (the ready elements' chains).

    A project unchanged since the last submit of the same targets and
    options is not loaded again: its plan (keys and specs) is taken as that
    submit kept it (see :mod:`pipeline.elements.resolved`).

    Everything that can be wrong with the input is found before anything is
    enqueued. Elements whose artifact exists are done at once (``cached``),
    as far as :func:`cached_elements` looks; the others' local sources are
    snapshotted into the artifact server's CAS, so an edit after this returns
    does not change the build. Their network sources are looked up in the
    source cache: one missing becomes a fetch node of the build (a
    ``remex.fetch_source`` task on a worker) that the elements using it wait
    for; this host downloads nothing.

    Raises:
        ConfigError: no broker or execution server is configured and no stack is up.
        ElementError: bad input (names the file, line and field).
        RemexError: a server could not be reached.
        ValueError: ``priority`` is not an integer from 0 to 9, or
            ``on_error`` is not an on-error mode.
    """
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(f"priority must be an integer from 0 to 9, not {priority!r}")
    if on_error is not None and on_error not in ON_ERROR_MODES:
        raise ValueError(f"unknown on-error mode {on_error!r} (one of {', '.join(ON_ERROR_MODES)})")
    project_dir = Path(project_dir).resolve()
    config = _config(project_dir, config)
    on_error = on_error or config.on_error
    config.require_broker()  # before any work: nowhere to enqueue it
    clock = _PhaseClock(timings)
    # Specs and the build's state are 10,000s of long-lived objects too.
    with gc_paused():
        # Pinned: workers sharing this local CAS (cas.dir) never clean what it uses.
        with open_context(config) as ctx, ctx.local_cas.pin():
            elements, keep = _submit_plan(
                project_dir, targets, cas=ctx.local_cas, options=options, config=config
            )
            clock.done("load")
            specs: list[BuildSpec] = []
            sources: list[ElementSources] = []
            with tempfile.TemporaryDirectory(prefix="remex-sources-") as workdir:
                for element in elements:
                    # (Most elements have no sources: no folder to name.)
                    planned = (
                        stage_local_sources(ctx, element, Path(workdir) / str(len(specs)))
                        if element.sources
                        else ElementSources()
                    )
                    spec = element.build_spec(planned.digests)
                    spec["priority"] = priority
                    specs.append(spec)
                    sources.append(planned)
            clock.done("specs")
            # Celery (to send the first chains) is imported while this thread
            # waits on the artifact server and on Redis, not after.
            importer = _import_in_background("pipeline.broker")
            found = cached_elements(ctx, elements, specs)
            cached = [element.name for element in elements if element.name in found]
            clock.done("lookup")
            # Cached elements' sources are not needed (as bst: not fetched);
            # their specs name them by URI, never by the placeholder.
            building = []
            for element, spec, planned in zip(elements, specs, sources, strict=True):
                if element.name not in found:
                    building.append((spec, planned))
                    continue
                for index, request in planned.requests:
                    spec["sources"][index].pop("digest", None)
                    spec["sources"][index]["uri"] = source_uri(request["key"])
            project = _project_name(elements)
            fetches = plan_fetches(ctx, building, project=project, priority=priority)
            clock.done("sources")
            for _, planned in building:
                snapshot_sources(ctx, planned.local)
            clock.done("snapshot")
        with broker_errors(config.require_broker()):
            build_id = _enqueue(
                config,
                project_dir,
                targets,
                elements,
                specs,
                cached,
                options,
                clock,
                {"priority": priority, "on_error": on_error},
                importer,
                fetches=fetches,
            )
        if keep is not None:
            # Kept once the build is sent (it delays no element). The specs as
            # loaded (staging refused any change), without this build's priority.
            for spec in specs:
                del spec["priority"]
            keep(specs)
    return build_id


def _submit_plan(
    project_dir: Path,
    targets: Sequence[str],
    *,
    cas: LocalCas,
    options: Mapping[str, str] | None,
    config: RemexConfig,
) -> tuple[Sequence[PlannedElement], Callable[[Sequence[BuildSpec]], None] | None]:
    """As :func:`plan`, through the plan kept by the last submit of this
    project when nothing it depends on changed (see
    :mod:`pipeline.elements.resolved`). Returns the plan, and (after a load)
    what keeps it: call it with the elements' specs as loaded.

    Raises:
        ElementError: bad input (names the file, line and field).
    """
    option_values = configured_option_values(project_dir, config)
    default_mirror = config.fetch.default_mirror
    cache = ResolvedCache.open(
        project_dir,
        targets,
        options=options,
        option_values=option_values,
        default_mirror=default_mirror,
        max_jobs=DEFAULT_MAX_JOBS,
        fetch=_fetch_inputs(config),
        junctions_dir=str(cas.root.parent / "junctions"),
    )
    if cache is not None:
        kept = cache.load(cas)
        if kept is not None:
            return kept, None
    with recording_reads() as reads:
        project = load_project(
            project_dir,
            cas=cas,
            options=options,
            option_values=option_values,
            default_mirror=default_mirror,
        )
        project.network = network_settings(config)  # a junction's network source
        loaded = project.load_targets(list(targets) or project.default_targets())
    if cache is None:
        return loaded, None
    saver = cache

    def keep(specs: Sequence[BuildSpec]) -> None:
        saver.save(project, loaded, specs, reads)

    return loaded, keep


def _fetch_inputs(config: RemexConfig) -> dict[str, Any]:
    """``[fetch]`` as resolved (files and environment alike), as JSON values:
    an input of a kept plan (see :meth:`ResolvedCache.open`)."""
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in dataclasses.asdict(config.fetch).items()
    }


def _import_in_background(module: str) -> threading.Thread:
    """Start importing ``module`` in a thread; join it before using the module."""
    thread = threading.Thread(
        target=importlib.import_module, args=(module,), name="remex-import", daemon=True
    )
    thread.start()
    return thread


def _project_name(elements: Sequence[PlannedElement]) -> str:
    return elements[0].project if elements else ""


@dataclass
class ElementSources:
    """An element's sources as the submitter sees them.

    Attributes:
        digests: one per source: the staged tree of a local source, or a
            placeholder (the empty tree) for a network source.
        local: the staged trees (to snapshot into the artifact server's CAS).
        requests: (source index, fetch request) of each network source.
    """

    digests: list[Digest] = field(default_factory=list)
    local: list[Digest] = field(default_factory=list)
    requests: list[tuple[int, FetchRequest]] = field(default_factory=list)


def stage_local_sources(
    ctx: StageContext, element: PlannedElement, workdir: Path
) -> ElementSources:
    """Stage the element's local sources into the local CAS; note what its
    network sources need fetched (the submitting host downloads nothing).

    Raises:
        SourceError: a local source changed since it was loaded.
    """
    planned = ElementSources()
    for index, source in enumerate(element.sources):
        request = source.fetch_request(element.name, index, element.file)
        if request is None:
            digest = source.stage(ctx.local_cas, workdir / str(index))
            planned.local.append(digest)
        else:
            digest = EMPTY_DIGEST
            planned.requests.append((index, request))
        planned.digests.append(digest)
    return planned


@dataclass
class FetchPlan:
    """The fetch nodes a build needs, and which elements wait for which."""

    specs: list[BuildSpec] = field(default_factory=list)
    """One per source missing from the source cache (distinct cache keys)."""
    waits: dict[str, list[str]] = field(default_factory=dict)
    """Element -> the fetch nodes it build-depends on."""
    hits: int = 0
    """Network sources found in the source cache (nothing to fetch)."""


def plan_fetches(
    ctx: StageContext,
    building: Sequence[tuple[BuildSpec, ElementSources]],
    *,
    project: str,
    priority: int,
) -> FetchPlan:
    """Look the network sources of the elements to build up in the source
    cache; point their specs at the tree (a hit) or at the source cache URI
    (a miss), and make one fetch node per missing source.

    Raises:
        RemoteError: the artifact server failed (after retries).
    """
    keys = [request["key"] for _, planned in building for _, request in planned.requests]
    hits = lookup_sources(ctx, keys)
    plan = FetchPlan()
    nodes: dict[str, str] = {}
    for spec, planned in building:
        for index, request in planned.requests:
            entry = spec["sources"][index]
            key = request["key"]
            if key in hits:
                entry["digest"] = digest_to_json(hits[key])
                plan.hits += 1
                continue
            entry.pop("digest", None)
            entry["uri"] = source_uri(key)
            if key not in nodes:
                node = fetch_spec(project, request, priority)
                nodes[key] = node["element"]
                plan.specs.append(node)
            waits = plan.waits.setdefault(spec["element"], [])
            if nodes[key] not in waits:
                waits.append(nodes[key])
    return plan


def _enqueue(
    config: RemexConfig,
    project_dir: Path,
    targets: Sequence[str],
    elements: Sequence[PlannedElement],
    specs: list[BuildSpec],
    cached: list[str],
    options: Mapping[str, str] | None,
    clock: _PhaseClock,
    settings: Mapping[str, Any],
    importer: threading.Thread | None = None,
    *,
    fetches: FetchPlan | None = None,
) -> str:
    scheduler = Scheduler.from_url(config.require_broker(), reconnect_seconds=RECONNECT_SECONDS)
    names = {e.name for e in elements}
    fetches = fetches or FetchPlan()
    # An element waits for everything staged into its build: its build
    # dependencies and their runtime closure, and the fetches of its sources.
    build_deps = {
        e.name: [d.name for d in e.staged_dependencies() if d.name in names]
        + fetches.waits.get(e.name, [])
        for e in elements
    }
    build_id, ready = scheduler.create_build(
        [*fetches.specs, *specs],
        build_deps,
        cached,
        {
            "project": elements[0].project if elements else "",
            "project_dir": str(project_dir),
            "targets": list(targets),
            "options": dict(options or {}),
            "remex_version": __version__,
            "host": socket.gethostname(),
            "user": _user(),
            **settings,
        },
    )
    clock.done("redis")
    if importer is not None:
        importer.join()  # (one thread imports celery at a time)
    from pipeline.broker import make_celery, send_ready

    app = make_celery(config)
    send_ready(app, scheduler, [(build_id, name) for name in ready])
    clock.done("send")
    return build_id


DEPS_CHOICES = ("none", "run", "build", "all")
"""``--deps`` of ``remex source fetch``, as bst's."""


def select_deps(loaded: Sequence[Element], targets: Sequence[Element], deps: str) -> list[Element]:
    """The elements ``--deps`` picks, in plan order: ``none`` the targets,
    ``run`` with their runtime closure, ``build`` their build scope (the
    build dependencies and their runtime closure, not the targets), ``all``
    everything the targets need.

    Raises:
        ValueError: an unknown ``deps``.
    """
    if deps not in DEPS_CHOICES:
        raise ValueError(f"deps must be one of {', '.join(DEPS_CHOICES)}, not {deps!r}")
    if deps == "all":
        return list(loaded)
    chosen: set[int] = set()
    for target in targets:
        if deps == "none":
            chosen.add(id(target))
        elif deps == "run":
            chosen.update(id(e) for e in target.runtime_closure())
        else:
            chosen.update(id(e) for e in target.staged_dependencies())
    return [e for e in loaded if id(e) in chosen]


def submit_source_fetch(
    project_dir: Path | str,
    targets: Sequence[str],
    *,
    deps: str = "none",
    config: RemexConfig | None = None,
    options: Mapping[str, str] | None = None,
    priority: int = 5,
) -> tuple[str | None, int]:
    """Fill the source cache with the network sources of the elements
    ``deps`` picks from ``targets``: a build of fetch nodes only, one per
    source the cache lacks (the workers download; this host does not).

    Returns:
        The build id (None: every source was in the cache already, or there
        is no network source), and how many sources the cache had.

    Raises:
        ConfigError, ElementError, RemexError: as :func:`submit`.
        ValueError: a bad ``deps`` or ``priority``.
    """
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(f"priority must be an integer from 0 to 9, not {priority!r}")
    project_dir = Path(project_dir).resolve()
    config = _config(project_dir, config)
    config.require_broker()
    with gc_paused(), open_context(config) as ctx, ctx.local_cas.pin():
        loaded, target_elements = plan_targets(
            project_dir, targets, cas=ctx.local_cas, options=options, config=config
        )
        selected = select_deps(loaded, target_elements, deps)
        requests = [
            request
            for element in selected
            for index, source in enumerate(element.sources)
            if (request := source.fetch_request(element.name, index, element.file)) is not None
        ]
        hits = lookup_sources(ctx, (request["key"] for request in requests))
    specs: dict[str, BuildSpec] = {}
    for request in requests:
        if request["key"] not in hits and request["key"] not in specs:
            specs[request["key"]] = fetch_spec(_project_name(loaded), request, priority)
    if not specs:
        return None, len(hits)
    meta = {
        "project": _project_name(loaded),
        "project_dir": str(project_dir),
        "targets": list(targets),
        "options": dict(options or {}),
        "remex_version": __version__,
        "priority": priority,
        "what": "source fetch",
        "host": socket.gethostname(),
        "user": _user(),
    }
    with broker_errors(config.require_broker()):
        scheduler = Scheduler.from_url(config.require_broker(), reconnect_seconds=RECONNECT_SECONDS)
        build_id, ready = scheduler.create_build(list(specs.values()), {}, [], meta)
        from pipeline.broker import make_celery, send_element

        app = make_celery(config)
        for name in ready:
            send_element(app, scheduler, build_id, name)
    return build_id, len(hits)


def element_source_spec(
    ctx: StageContext,
    element: Element,
    workdir: Path,
) -> tuple[BuildSpec, list[FetchRequest]]:
    """The element's build spec with its sources as a build would stage them:
    local ones staged into the local CAS and uploaded to the artifact
    server's CAS, network ones from the source cache. Returns the spec and
    the requests of the network sources the cache lacks (their entries name
    the source cache URI).

    Raises:
        SourceError, RemoteError: a local source changed; a server failed.
    """
    planned = stage_local_sources(ctx, element, workdir)
    spec = element.build_spec(planned.digests)
    plan_fetches(ctx, [(spec, planned)], project=element.project, priority=5)
    snapshot_sources(ctx, planned.local)
    missing = [
        request for index, request in planned.requests if "digest" not in spec["sources"][index]
    ]
    return spec, missing


def _user() -> str:
    """Who submits (for the listing of builds): the login name, else the uid."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return str(os.getuid())


class _PhaseClock:
    """Records the wall time of consecutive phases into a dict (or nowhere)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[phase] = now - self.last
        self.last = now


# How many artifact lookups are in flight at once (each is one small RPC).
LOOKUP_THREADS = 16


def cached_elements(
    ctx: StageContext, elements: Sequence[PlannedElement], specs: Sequence[BuildSpec]
) -> set[str]:
    """The elements whose artifact the artifact server has, from those whose
    staged dependencies all have theirs.

    An element that waits for a dependency to build is not looked up: it
    cannot start before then anyway, and its own chain finds its artifact
    (its push keeps an existing artifact; its action is in the ActionCache).
    So a new project costs a lookup per element that could start now, not
    one per element. The others are looked up a wave at a time (an element
    joins the wave after the one that found the last of its staged
    dependencies), each wave's lookups in parallel.

    Raises:
        RemoteError: the artifact server failed (after retries).
    """
    found: set[str] = set()
    wave = [index for index, element in enumerate(elements) if not element.staged_dependencies()]
    # Element index -> how many of its staged dependencies are not found yet,
    # and who waits for whom: made only once a lookup hits (a new project's
    # first wave finds nothing, and nothing else is looked up).
    missing: dict[int, int] = {}
    dependents: dict[str, list[int]] | None = None

    def lookup(index: int) -> bool:
        return lookup_artifact(ctx, specs[index]) is not None

    with ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="remex-lookup") as pool:
        while wave:
            hits = [index for index, hit in zip(wave, pool.map(lookup, wave), strict=True) if hit]
            if not hits:
                break
            if dependents is None:
                dependents = {}
                for index, element in enumerate(elements):
                    names = {d.name for d in element.staged_dependencies()}
                    if names:
                        missing[index] = len(names)
                        for name in names:
                            dependents.setdefault(name, []).append(index)
            ready: list[int] = []
            for index in hits:
                name = elements[index].name
                found.add(name)
                for waiting in dependents.get(name, ()):
                    missing[waiting] -= 1
                    if missing[waiting] == 0:
                        ready.append(waiting)
            wave = sorted(ready)  # plan order
    return found


def status(build_id: str, *, config: RemexConfig | None = None) -> BuildStatus:
    """The build's state now.

    Raises:
        KeyError: no such build (or it expired).
        BrokerUnavailableError: Redis stayed unreachable (retried with backoff).
    """
    url = _config(None, config).require_broker()
    with broker_errors(url):
        return Scheduler.from_url(url, reconnect_seconds=RECONNECT_SECONDS).status(build_id)


#: How often :func:`wait` checks whether the build ended (one small Redis read).
DONE_POLL = 0.02

#: :func:`wait` waits at least this many times as long as its last status read
#: (and show) took before the next one.
FULL_READ_SHARE = 4.0


def wait(
    build_id: str,
    *,
    config: RemexConfig | None = None,
    timeout: float | None = None,
    poll: float = 0.25,
    on_update: Callable[[BuildStatus], Any] | None = None,
    summaries: bool = False,
) -> BuildStatus:
    """Follow a build until it is done; return its final status (every element).

    A Redis restart is a pause: while Redis cannot be reached the build is
    followed again with backoff, for up to ``WAIT_RECONNECT_SECONDS``.

    Args:
        on_update: called with each status read (for a progress display).
        summaries: read summaries while it runs (counts, and only the ready,
            queued, running and failed elements: see :meth:`Scheduler.status`),
            whose cost does not grow with the build; the final status is whole.

    Raises:
        TimeoutError: ``timeout`` seconds passed first.
        BrokerUnavailableError: Redis stayed unreachable that long.
    """
    url = _config(None, config).require_broker()
    scheduler = Scheduler.from_url(url, reconnect_seconds=RECONNECT_SECONDS)
    deadline = None if timeout is None else time.monotonic() + timeout
    reached = time.monotonic()
    meta_key = scheduler.keys.build(build_id, "meta")
    while True:
        read_started = time.monotonic()
        try:
            if summaries:
                current = scheduler.status(build_id, every=False)
                if current.done and current.summary:
                    current = scheduler.status(build_id)
            else:
                current = scheduler.status(build_id)
        except CONNECTION_ERRORS:
            if time.monotonic() - reached > WAIT_RECONNECT_SECONDS:
                with broker_errors(url):
                    raise
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"build {build_id} not done after {timeout} s") from None
            time.sleep(poll)  # (the client itself waited with backoff first)
            continue
        reached = time.monotonic()
        if on_update is not None:
            on_update(current)
        if current.done:
            return current
        # A whole status of a large build is costly (10,000 elements: a
        # few tenths of a second here and in Redis): at most a fifth of the
        # time goes to reading and showing it.
        spent = time.monotonic() - read_started
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"build {build_id} not done after {timeout} s")
        # The whole status every ``poll`` seconds; in between, only the
        # build's status field, often: the end of a build is seen within
        # DONE_POLL seconds, not up to ``poll`` later.
        next_full = time.monotonic() + max(poll, FULL_READ_SHARE * spent)
        while time.monotonic() < next_full:
            time.sleep(min(DONE_POLL, poll))
            try:
                status = scheduler.redis.hget(meta_key, "status")
            except CONNECTION_ERRORS:
                break  # the full read above rides out the outage
            if status not in (None, "running", b"running"):
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
    with broker_errors(config.require_broker()):
        scheduler = Scheduler.from_url(config.require_broker(), reconnect_seconds=RECONNECT_SECONDS)
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


#: How often :func:`events` reads when its Redis user may not block (XREAD).
EVENTS_POLL = 0.5

_STREAM_ID = re.compile(r"^\d+(-\d+)?$")

#: How long one read of :func:`events` waits for the next event (XREAD
#: BLOCK) before it checks whether the build ended without saying so.
EVENTS_BLOCK = 2.0


def events(
    build_id: str,
    *,
    after: str | None = None,
    follow: bool = True,
    timeout: float | None = None,
    config: RemexConfig | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the build's events (each element state change) as they happen,
    oldest first, ending with the build's last event (``"event":
    "finished"``).

    Each event is a dict: ``id`` (its stream id: pass it as ``after`` to
    resume after it), ``build``, ``event`` (``submitted``, ``cached``,
    ``queued``, ``waiting``, ``stage``, ``operation``, ``built``,
    ``failed``, ``skipped``, ``cancelled``, ``finished``), ``time`` and,
    as they apply, ``element``, ``attempt``, ``stage``, ``host``,
    ``worker``, ``operation``, ``error``, ``started``, ``finished``,
    ``timings``, ``waiting_on``, ``built_by``, ``status``.

    They are read from the build's Redis stream with XREAD BLOCK (no
    polling; a Redis user refused XREAD, as by ``-@blocking``, reads every
    ``EVENTS_POLL`` seconds instead). A Redis restart or a broken connection is a pause: reading
    resumes after the last event yielded, so none is lost or repeated.

    Args:
        after: start after this event id (default: the first event).
        follow: wait for new events until the build ends (False: return
            once the events so far are yielded).
        timeout: give up after this many seconds (``TimeoutError``).

    Raises:
        KeyError: no such build (or it expired).
        TimeoutError: ``timeout`` seconds passed first.
        BrokerUnavailableError: Redis stayed unreachable for
            ``WAIT_RECONNECT_SECONDS``.
        ValueError: ``after`` is not an event id.
    """
    if after is not None and not _STREAM_ID.match(after):
        raise ValueError(f"not an event id: {after!r} (an id looks like 1764489600123-0)")
    url = _config(None, config).require_broker()
    with broker_errors(url):
        scheduler = Scheduler.from_url(url, reconnect_seconds=RECONNECT_SECONDS)
        if not scheduler.build_exists(build_id):
            raise KeyError(f"no build {build_id!r}")
    deadline = None if timeout is None else time.monotonic() + timeout
    last = after or "0"
    reached = time.monotonic()
    quiet_and_done = False
    blocking = follow
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"build {build_id} not done after {timeout} s")
        block = EVENTS_BLOCK if blocking else None
        if block is not None and deadline is not None:
            block = max(0.001, min(block, deadline - time.monotonic()))
        try:
            batch = scheduler.read_events(build_id, last, block=block)
            ended = not batch and follow and scheduler.build_status_value(build_id) != "running"
        except redis.exceptions.NoPermissionError:
            if not blocking:
                raise
            # A Redis user refused XREAD (``-@blocking``, which keeps BRPOP
            # from submitters): read what is there every EVENTS_POLL seconds.
            blocking = False
            continue
        except CONNECTION_ERRORS:
            if time.monotonic() - reached > WAIT_RECONNECT_SECONDS:
                with broker_errors(url):
                    raise
            time.sleep(0.25)  # (the client itself waited with backoff first)
            continue
        reached = time.monotonic()
        for event in batch:
            last = event.id
            yield {"id": event.id, "build": build_id, **event.data}
            if event.final:
                return
        if not batch and not follow:
            return
        if follow and not blocking and not batch and not ended:
            time.sleep(EVENTS_POLL)
        if ended:
            # Over without a last event (a build of an older remex, or one
            # whose stream was trimmed or expired): one more look, then stop.
            if quiet_and_done:
                return
            quiet_and_done = True


def builds(*, state: str | None = None, config: RemexConfig | None = None) -> list[BuildSummary]:
    """The builds Redis holds, newest first: id, project, targets, who
    submitted them (host, user), priority, on-error mode, start, duration
    and element counts (kept as elements finish: no element is read).
    Builds disappear when their result TTL ends.

    Args:
        state: only builds in this state (``running``, ``succeeded``,
            ``failed``, ``cancelled``).

    Raises:
        ValueError: ``state`` is not one of those.
        BrokerUnavailableError: Redis stayed unreachable (retried with backoff).
    """
    if state is not None and state not in BUILD_STATES:
        raise ValueError(f"unknown build state {state!r} (one of {', '.join(BUILD_STATES)})")
    url = _config(None, config).require_broker()
    with broker_errors(url):
        return Scheduler.from_url(url, reconnect_seconds=RECONNECT_SECONDS).builds(state)
