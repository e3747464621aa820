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
import getpass
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kombu.exceptions
import redis
from kombu.utils.url import maybe_sanitize_url

from pipeline import __version__
from pipeline.cas import LocalCas
from pipeline.config import ON_ERROR_MODES, OptionSetting, RemexConfig, load_config
from pipeline.digest import Digest
from pipeline.elements import load_project
from pipeline.elements.element import Element
from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import MappingNode, Mark, Node, ScalarNode, SequenceNode, load_yaml
from pipeline.elements.project import gc_paused
from pipeline.errors import BrokerUnavailableError, RemexError
from pipeline.scheduler import BUILD_STATES, BuildStatus, BuildSummary, Scheduler
from pipeline.spec import BuildSpec
from pipeline.stages import StageContext, lookup_artifact, snapshot_sources

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
    ``lookup`` (artifacts), ``snapshot`` (sources uploaded), ``redis`` (the
    build's state written) and ``send`` (the ready elements' chains).

    Everything that can be wrong with the input is found before anything is
    enqueued. Elements whose artifact exists are done at once (``cached``),
    as far as :func:`cached_elements` looks; the others' sources are
    snapshotted into the artifact server's CAS, so an edit after this returns
    does not change the build.

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
            elements = plan(project_dir, targets, cas=ctx.local_cas, options=options, config=config)
            clock.done("load")
            specs: list[BuildSpec] = []
            source_trees: list[list[Digest]] = []
            with tempfile.TemporaryDirectory(prefix="remex-sources-") as workdir:
                for element in elements:
                    digests = [
                        source.stage(ctx.local_cas, Path(workdir) / f"{len(specs)}-{i}")
                        for i, source in enumerate(element.sources)
                    ]
                    spec = element.build_spec(digests)
                    spec["priority"] = priority
                    specs.append(spec)
                    source_trees.append(digests)
            clock.done("specs")
            found = cached_elements(ctx, elements, specs)
            cached = [element.name for element in elements if element.name in found]
            clock.done("lookup")
            for element, digests in zip(elements, source_trees, strict=True):
                if element.name not in found:
                    snapshot_sources(ctx, digests)
            clock.done("snapshot")
        with broker_errors(config.require_broker()):
            return _enqueue(
                config,
                project_dir,
                targets,
                elements,
                specs,
                cached,
                options,
                clock,
                {"priority": priority, "on_error": on_error},
            )


def _enqueue(
    config: RemexConfig,
    project_dir: Path,
    targets: Sequence[str],
    elements: list[Element],
    specs: list[BuildSpec],
    cached: list[str],
    options: Mapping[str, str] | None,
    clock: _PhaseClock,
    settings: Mapping[str, Any],
) -> str:
    scheduler = Scheduler.from_url(config.require_broker(), reconnect_seconds=RECONNECT_SECONDS)
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
            "host": socket.gethostname(),
            "user": _user(),
            **settings,
        },
    )
    clock.done("redis")
    from pipeline.broker import make_celery, send_element

    app = make_celery(config)
    for element_name in ready:
        send_element(app, scheduler, build_id, element_name)
    clock.done("send")
    return build_id


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
    ctx: StageContext, elements: Sequence[Element], specs: Sequence[BuildSpec]
) -> set[str]:
    """The elements whose artifact the artifact server has, from those whose
    staged dependencies all have theirs.

    An element that waits for a dependency to build is not looked up: it
    cannot start before then anyway, and its own chain finds its artifact
    (its push keeps an existing artifact; its action is in the ActionCache).
    So a new project costs a lookup per element that could start now, not
    one per element. The others are looked up a wave at a time (an element's
    wave comes after its dependencies'), each wave's lookups in parallel.

    Raises:
        RemoteError: the artifact server failed (after retries).
    """
    depth: dict[str, int] = {}
    staged: dict[str, list[str]] = {}
    waves: list[list[int]] = []
    for index, element in enumerate(elements):  # dependencies first
        names = [d.name for d in element.staged_dependencies()]
        staged[element.name] = names
        level = 1 + max((depth[n] for n in names if n in depth), default=-1)
        depth[element.name] = level
        if level == len(waves):
            waves.append([])
        waves[level].append(index)
    found: set[str] = set()

    def lookup(index: int) -> bool:
        return lookup_artifact(ctx, specs[index]) is not None

    with ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="remex-lookup") as pool:
        for wave in waves:
            ready = [i for i in wave if all(n in found for n in staged[elements[i].name])]
            for index, hit in zip(ready, pool.map(lookup, ready), strict=True):
                if hit:
                    found.add(elements[index].name)
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


def wait(
    build_id: str,
    *,
    config: RemexConfig | None = None,
    timeout: float | None = None,
    poll: float = 0.25,
    on_update: Callable[[BuildStatus], Any] | None = None,
) -> BuildStatus:
    """Follow a build until it is done; return its final status.

    A Redis restart is a pause: while Redis cannot be reached the build is
    followed again with backoff, for up to ``WAIT_RECONNECT_SECONDS``.

    Args:
        on_update: called with each status read (for a progress display).

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
        try:
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
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"build {build_id} not done after {timeout} s")
        # The whole status every ``poll`` seconds; in between, only the
        # build's status field, often: the end of a build is seen within
        # DONE_POLL seconds, not up to ``poll`` later.
        next_full = time.monotonic() + poll
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
