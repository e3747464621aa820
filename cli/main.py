"""The ``remex`` commands: each a thin layer over :mod:`pipeline.api`, the
worker's app (:mod:`tasks.app`) or the bot (:mod:`bot.main`); errors become
messages and exit codes in one place (:func:`cli.errors.handles_errors`)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.errors import fail, handles_errors
from cli.progress import (
    TABLE_ROWS,
    builds_lines,
    event_line,
    follow_build,
    print_summary,
    status_json,
    table,
)
from pipeline import __version__

if TYPE_CHECKING:
    from pipeline.cas import LocalCas
    from pipeline.config import RemexConfig
    from pipeline.elements.element import Element
    from pipeline.scheduler import BuildStatus
    from pipeline.stages import StageContext


@click.group()
@click.version_option(__version__, prog_name="remex")
def main() -> None:
    """remex: build BuildStream-style elements on a REAPI service with Celery workers."""


project_option = click.option(
    "-C",
    "--directory",
    "project_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="The project folder (holding project.conf).",
)

option_option = click.option(
    "-o",
    "--option",
    "option_pairs",
    type=(str, str),
    multiple=True,
    metavar="NAME VALUE",
    help="Set a project option (repeatable); wins over remex.toml's [projects.NAME.options].",
)


def _set_default_mirror(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # The configuration is read further down (pipeline.api): the option is
    # REMEX_FETCH_DEFAULT_MIRROR for this process, winning over remex.toml.
    if value:
        os.environ["REMEX_FETCH_DEFAULT_MIRROR"] = value


default_mirror_option = click.option(
    "--default-mirror",
    metavar="MIRROR",
    expose_value=False,
    callback=_set_default_mirror,
    help="The project.conf mirror to fetch sources from first (as bst's --default-mirror; "
    "the same as REMEX_FETCH_DEFAULT_MIRROR).",
)


def _options(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    # As bst: given twice, the last value wins.
    return dict(pairs)


def _local_cas(config: RemexConfig) -> LocalCas:
    from pipeline.cas import LocalCas

    return LocalCas(config.cas_dir, quota_bytes=config.cas_quota_bytes)


@main.command()
@project_option
@click.argument("elements", nargs=-1)
@option_option
@click.option("--no-follow", is_flag=True, help="Print the build id and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results.")
@click.option("--timeout", type=float, default=None, help="Give up following after N seconds.")
@click.option(
    "--priority",
    type=click.IntRange(0, 9),
    default=5,
    show_default=True,
    help="0-9, lower runs sooner: this build's messages go ahead of those of "
    "builds with a higher number (and it is the REAPI execution priority).",
)
@default_mirror_option
@click.option(
    "--on-error",
    "on_error",
    metavar="continue|quit|terminate",
    default=None,
    help="What a failed element does to the rest of the build (as bst): continue "
    "(build all that does not depend on it), quit (start nothing new; running "
    "elements finish), terminate (also cancel running ones, on the server too). "
    "Default: [build] on-error in remex.toml, REMEX_BUILD_ON_ERROR, else continue.",
)
@click.option(
    "--json-lines",
    "json_lines",
    is_flag=True,
    help="Print each event of the build (element state changes, as they happen) "
    "as one JSON object per line on stdout, then the summary as one more.",
)
@handles_errors
def build(
    project_dir: Path,
    elements: Sequence[str],
    option_pairs: Sequence[tuple[str, str]],
    no_follow: bool,
    as_json: bool,
    timeout: float | None,
    priority: int,
    on_error: str | None,
    json_lines: bool,
) -> None:
    """Build ELEMENTS and follow the build. Exit 0 only when every target is built.

    On a terminal the progress is a live table; elsewhere (CI logs, a pipe)
    one line per element state change. Then the summary. With --json-lines,
    JSON objects on stdout instead (one per event, then the summary).
    """
    from pipeline import api
    from pipeline.config import ON_ERROR_MODES

    if on_error is not None and on_error not in ON_ERROR_MODES:
        fail(f"--on-error: unknown mode {on_error!r} (one of {', '.join(ON_ERROR_MODES)})")
    if as_json and json_lines:
        fail("--json and --json-lines: choose one")
    build_id = api.submit(
        project_dir,
        list(elements),
        options=_options(option_pairs),
        priority=priority,
        on_error=on_error,
    )
    if no_follow:
        click.echo(json.dumps({"build": build_id}) if as_json or json_lines else build_id)
        return
    # First, so that the build can be cancelled (remex cancel ID) from elsewhere.
    click.echo(f"remex: build {build_id} submitted", err=True)
    if json_lines:
        final = _print_json_lines(build_id, follow=True, timeout=timeout)
    else:
        final = follow_build(build_id, as_json=as_json, timeout=timeout)
    sys.exit(0 if final.status == "succeeded" else 1)


def _print_json_lines(build_id: str, *, follow: bool, timeout: float | None) -> BuildStatus:
    """Print the build's events as JSON lines on stdout (following it to its
    end, or those so far), then its status as one more line; return the status."""
    from pipeline import api

    for event in api.events(build_id, follow=follow, timeout=timeout):
        click.echo(json.dumps(event, sort_keys=True))
    final = api.status(build_id)
    click.echo(json.dumps({"event": "summary", **status_json(final)}, sort_keys=True))
    return final


@main.command()
@click.argument("build_id")
@click.option("--json", "as_json", is_flag=True, help="The state now, as one JSON object.")
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Every element, in plan order (without it: the counts per state, and "
    "only the elements ready, queued, running or failed).",
)
@click.option(
    "--follow",
    "-f",
    "following",
    is_flag=True,
    help="Follow the build (started anywhere) until it ends: one line per event, "
    "then the summary; exit 0 only when it succeeded.",
)
@click.option(
    "--json-lines",
    "json_lines",
    is_flag=True,
    help="Its events as one JSON object per line (with --follow: until it ends), "
    "then the summary as one more.",
)
@click.option("--timeout", type=float, default=None, help="With --follow: give up after N seconds.")
@handles_errors
def status(
    build_id: str,
    as_json: bool,
    every: bool,
    following: bool,
    json_lines: bool,
    timeout: float | None,
) -> None:
    """Show the state of build BUILD_ID: the counts per state and what is
    ready, queued, running or failed (a build of at most 50 elements, or
    --all: every element); or follow it (--follow)."""
    if as_json and (json_lines or following):
        fail("--json shows the state now; for events use --json-lines or --follow")
    if json_lines:
        final = _print_json_lines(build_id, follow=following, timeout=timeout)
        if following:
            sys.exit(0 if final.status == "succeeded" else 1)
        return
    if following:
        from pipeline import api

        for event in api.events(build_id, timeout=timeout):
            click.echo(event_line(event))
        final = api.status(build_id)
        print_summary(final)
        sys.exit(0 if final.status == "succeeded" else 1)
    # Not pipeline.api: reading a status needs neither grpc nor the loader,
    # whose imports would be most of the command's time.
    from pipeline.config import load_config
    from pipeline.scheduler import Scheduler

    scheduler = Scheduler.from_url(load_config(None).require_broker())
    current = scheduler.status(build_id, every=every)
    if current.summary and current.total <= TABLE_ROWS:
        current = scheduler.status(build_id)  # a small build: show it whole
    if as_json:
        click.echo(json.dumps(status_json(current), indent=2))
        return
    from rich.console import Console

    Console().print(table(current, time.time() - float(current.meta.get("created", time.time()))))


@main.command()
@click.option(
    "--state",
    default=None,
    metavar="running|failed|succeeded|cancelled",
    help="Only builds in this state: running, failed, succeeded or cancelled.",
)
@click.option("--json", "as_json", is_flag=True, help="A JSON list, one object per build.")
@handles_errors
def builds(state: str | None, as_json: bool) -> None:
    """List the builds Redis holds, newest first: id, project, targets, who
    submitted them, priority, on-error mode, start, duration and element
    counts. Finished builds disappear after the result TTL (7 days)."""
    from pipeline.config import load_config
    from pipeline.scheduler import BUILD_STATES, Scheduler

    if state is not None and state not in BUILD_STATES:
        fail(f"--state: unknown build state {state!r} (one of {', '.join(BUILD_STATES)})")
    found = Scheduler.from_url(load_config(None).require_broker()).builds(state)
    if as_json:
        click.echo(json.dumps([b.as_json() for b in found], indent=2))
        return
    if not found:
        click.echo("no builds" + (f" {state}" if state else ""))
        return
    for line in builds_lines(found):
        click.echo(line)


@main.command()
@click.argument("build_id")
@handles_errors
def cancel(build_id: str) -> None:
    """Cancel build BUILD_ID: queued work stops, remote operations are cancelled."""
    from pipeline import api

    stopped = api.cancel(build_id)
    click.echo(f"cancelled {len(stopped)} element(s) of build {build_id}")


@main.command()
@project_option
@click.argument("elements", nargs=-1)
@option_option
@click.option(
    "--deps",
    "-d",
    type=click.Choice(["none", "run", "build", "all"]),
    default="all",
    show_default=True,
    help="none: the elements; run: and what they need to run; build: what they "
    "need to build, without themselves; all: everything (as bst show).",
)
@click.option(
    "--order",
    type=click.Choice(["stage", "alpha"]),
    default="stage",
    show_default=True,
    help="Staging order (dependencies first, as bst) or by name.",
)
@click.option(
    "--format",
    "-f",
    "fmt",
    metavar="FORMAT",
    default=None,
    help="bst show's format: %{name} %{kind} %{key} %{full-key} %{state} %{description} "
    "%{config} %{vars} %{env} %{public} %{deps} %{build-deps} %{runtime-deps}.",
)
@default_mirror_option
@handles_errors
def show(
    project_dir: Path,
    elements: Sequence[str],
    option_pairs: Sequence[tuple[str, str]],
    deps: str,
    order: str,
    fmt: str | None,
) -> None:
    """Show ELEMENTS and their dependencies: cache keys and whether built.

    Without --format, one line per element: its state (cached: the artifact
    server has it; buildable: everything its build needs is cached; waiting:
    not yet), its key's first 16 digits and its name. --format takes bst
    show's placeholders and prints what bst prints, byte for byte.
    """
    from pipeline import api
    from pipeline.config import load_config
    from pipeline.elements.show import format_report, select_elements

    config = load_config(project_dir)
    cas = _local_cas(config)
    with cas.pin():
        _, targets = api.plan_targets(
            project_dir,
            list(elements),
            cas=cas,
            options=_options(option_pairs),
            config=config,
        )
    selected: list[Element] = select_elements(targets, deps)  # type: ignore[arg-type,assignment]
    if order == "alpha":
        selected.sort(key=lambda e: e.name)
    states: dict[str, str] = {}
    if fmt is None or "%{state" in fmt:
        # Only then are the servers needed (a format without %{state} works offline).
        with api.open_context(config) as ctx:
            states = element_states(ctx, selected)
    if fmt is None:
        for element in selected:
            click.echo(f"{states[element.name]:<10} {element.cache_key[:16]}  {element.name}")
        return
    try:
        report = format_report(selected, fmt, lambda e: states.get(e.name, ""))
    except ValueError as exc:  # a format spec that does not fit its value (%{name:d})
        fail(f"--format {fmt!r}: {exc}")
    click.echo(report)


def element_states(ctx: StageContext, elements: Sequence[Element]) -> dict[str, str]:
    """bst's ``%{state}`` of each element: ``cached`` (its artifact is on the
    artifact server), ``buildable`` (everything staged to build it is cached)
    or ``waiting``. Artifacts are looked up a few at a time (one RPC each)."""
    from concurrent.futures import ThreadPoolExecutor

    needed: dict[str, Element] = {}
    for element in elements:
        needed[element.name] = element
        for dep in element.staged_dependencies():
            needed.setdefault(dep.name, dep)

    from pipeline.stages.artifacts import fetch_artifact_root

    def is_cached(element: Element) -> bool:
        # Not ctx.assets directly: a deleted (withdrawn) artifact is not cached.
        return fetch_artifact_root(ctx, element.artifact_uri) is not None

    with ThreadPoolExecutor(max_workers=8) as pool:
        cached = dict(zip(needed, pool.map(is_cached, needed.values()), strict=True))
    states: dict[str, str] = {}
    for element in elements:
        if cached[element.name]:
            states[element.name] = "cached"
        elif all(cached[d.name] for d in element.staged_dependencies()):
            states[element.name] = "buildable"
        else:
            states[element.name] = "waiting"
    return states


def cas_env(config: RemexConfig) -> dict[str, str]:
    """The ``REMEX_CAS_*`` settings that give a worker ``config``'s local CAS
    quota and, when one is configured, its folder."""
    from pipeline.config import RemexConfig

    env: dict[str, str] = {}
    if config.cas_quota_bytes is not None:
        env["REMEX_CAS_QUOTA"] = str(config.cas_quota_bytes)
    if config.cas_dir != RemexConfig().cas_dir:
        env["REMEX_CAS_DIR"] = str(config.cas_dir)
    return env


BROKER_WAITS = (0.5, 1.0, 2.0, 4.0)
"""Seconds between the attempts to reach the broker when a worker starts."""


def wait_for_broker(url: str, waits: Sequence[float] = BROKER_WAITS) -> None:
    """Return once the Redis broker answers a PING; retry with backoff
    (``waits``), then let the last connection error through (one line, exit 1,
    by :func:`cli.errors.handles_errors`). Celery alone would retry for ever."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return  # another transport: Celery's own checks apply
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        for wait in (*waits, None):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if wait is None:
                    raise
                time.sleep(wait)
    finally:
        client.close()


@main.command()
@project_option
@click.argument("element")
@click.argument("dest", type=click.Path(path_type=Path))
@option_option
@click.option(
    "--deps",
    type=click.Choice(["none", "run"]),
    default="none",
    show_default=True,
    help="Also check out the element's runtime dependencies.",
)
@click.option(
    "--integrate/--no-integrate",
    default=True,
    show_default=True,
    help="Run the checked out elements' integration commands on the tree first "
    "(as a remote action on the execution service; as bst artifact checkout).",
)
@handles_errors
def checkout(
    project_dir: Path,
    element: str,
    dest: Path,
    option_pairs: Sequence[tuple[str, str]],
    deps: str,
    integrate: bool,
) -> None:
    """Write ELEMENT's built files into DEST (refusing anything unsafe).

    The same as ``remex artifact checkout`` given an element name."""
    from cli.artifact import checkout_element
    from pipeline import api
    from pipeline.config import load_config

    config = load_config(project_dir)
    with api.open_context(config) as ctx, ctx.local_cas.pin():
        checkout_element(ctx, config, project_dir, element, dest, option_pairs, deps, integrate)
    click.echo(f"checked out {element} into {dest}")


@main.command()
@project_option
@click.argument("element")
@option_option
@handles_errors
def log(project_dir: Path, element: str, option_pairs: Sequence[tuple[str, str]]) -> None:
    """Print ELEMENT's build log (stdout, then stderr), built or failed.

    The same as ``remex artifact log`` given one element name."""
    from cli.artifact import write_log
    from pipeline import api
    from pipeline.artifact_index import ArtifactRef
    from pipeline.artifacts import ArtifactTarget
    from pipeline.config import load_config

    config = load_config(project_dir)
    with api.open_context(config) as ctx, ctx.local_cas.pin():
        plan = api.plan(
            project_dir,
            [element],
            cas=ctx.local_cas,
            options=_options(option_pairs),
            config=config,
        )
        loaded = plan[-1]
        ref = ArtifactRef(loaded.project, loaded.normal_name, loaded.cache_key)
        target = ArtifactTarget(ref, element, loaded)
        write_log(ctx, target, sys.stdout)


@main.command()
@click.option("--concurrency", "-c", type=int, default=None, help="Tasks at once (threads).")
@click.option(
    "--fetch-concurrency",
    type=click.IntRange(min=0),
    default=None,
    help="Source downloads at once, in a second worker process on the remex.fetch "
    "queue (default: worker.fetch-concurrency; 0: no fetch pool on this host).",
)
@click.option(
    "--nice",
    type=click.IntRange(0, 19),
    default=None,
    help="CPU priority, as nice(1) (default: worker.nice, else 0). A worker that leads "
    "its own session sets the session's autogroup too.",
)
@click.option(
    "--staging",
    type=click.IntRange(min=0),
    default=None,
    help="Elements staged at once, each until its Execute call goes out (default: "
    "worker.staging, else 0: no limit). 1 where the actions run on this host.",
)
@click.option("--fetch-only", is_flag=True, hidden=True, help="Be the fetch pool.")
@click.option(
    "--parent-pid", type=int, default=None, hidden=True, help="Exit when this process dies."
)
@click.option(
    "--queues",
    "-Q",
    default=None,
    help="Extra queues, comma-separated (besides remex and its own).",
)
@click.option(
    "--name",
    envvar="REMEX_WORKER_NAME",
    default=None,
    help="Worker name; its own queue is remex.host.NAME (default: the host name).",
)
@click.option(
    "-C",
    "--directory",
    "project_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also read this folder's remex.toml.",
)
@click.option("--loglevel", default="INFO", show_default=True)
@handles_errors
def worker(
    concurrency: int | None,
    fetch_concurrency: int | None,
    nice: int | None,
    staging: int | None,
    fetch_only: bool,
    parent_pid: int | None,
    queues: str | None,
    name: str | None,
    project_dir: Path | None,
    loglevel: str,
) -> None:
    """Start a Celery worker for the stage tasks, with its own local CAS.

    Source downloads (``remex.fetch_source``) run in a second worker process
    of their own (``worker.fetch-concurrency`` threads, queue ``remex.fetch``),
    started and stopped with this one, so they never hold build slots.
    """
    import socket

    from pipeline.broker import DEFAULT_QUEUE, FETCH_QUEUE, host_queue
    from pipeline.config import load_config
    from pipeline.servers.process import lower_cpu_priority
    from tasks.app import create_app

    config = load_config(project_dir)
    if staging is not None:
        config = dataclasses.replace(config, worker_staging=staging)
    if not fetch_only:
        # Before any thread: they, and the fetch pool, inherit it.
        lower_cpu_priority((config.worker_nice or 0) if nice is None else nice)
    wait_for_broker(config.require_broker())
    name = name or socket.gethostname()
    fetches = config.fetch_concurrency if fetch_concurrency is None else fetch_concurrency
    common = ["--task-events", "--without-gossip", "--without-mingle", f"--loglevel={loglevel}"]
    if fetch_only:
        from pipeline.stages.fetch import remove_stale_scratch

        if parent_pid is not None:
            _die_with_parent(parent_pid)

        # What a worker killed mid-download left: never a file that counts.
        remove_stale_scratch(config.cas_dir)
        app = create_app(config, worker_name=name)
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={max(fetches, 1)}",
                f"--queues={FETCH_QUEUE}",
                f"--hostname=remex-{name}-fetch@%h",
                *common,
            ]
        )
        return
    all_queues = [DEFAULT_QUEUE, host_queue(name), *(q for q in (queues or "").split(",") if q)]
    pool = _start_fetch_pool(name, fetches, project_dir, loglevel) if fetches > 0 else None
    app = create_app(config, worker_name=name)
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={concurrency or config.worker_concurrency}",
                f"--queues={','.join(all_queues)}",
                f"--hostname=remex-{name}@%h",
                *common,
            ]
        )
    finally:
        if pool is not None:
            pool.stop()


class _FetchPool:
    """``remex worker --fetch-only`` as a child process (same output) for as
    long as this worker runs: started again if it dies, and it dies with this
    process (PR_SET_PDEATHSIG), so no fetch pool outlives its worker."""

    RESTART_DELAY = 2.0

    def __init__(self, args: list[str]) -> None:
        import threading

        self._args = args
        self._stopping = threading.Event()
        self._process = self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="remex-fetch-pool", daemon=True)
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # (No preexec_fn: it makes CPython fork rather than vfork, which runs
        # gRPC's fork handlers in the child of a process with channels open;
        # the child sets its death signal itself, --parent-pid.)
        return subprocess.Popen([*self._args, "--parent-pid", str(os.getpid())])

    def _watch(self) -> None:
        # Without a fetch pool, the fetches queued on remex.fetch would wait
        # for another host's: start it again rather than leave it dead.
        while True:
            code = self._process.wait()
            if self._stopping.wait(self.RESTART_DELAY):
                return
            click.echo(f"remex: the fetch pool exited ({code}); starting it again", err=True)
            self._process = self._spawn()

    def stop(self) -> None:
        """SIGTERM the fetch pool (Celery's warm shutdown), SIGKILL after a grace."""
        self._stopping.set()
        process = self._process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _start_fetch_pool(
    name: str, concurrency: int, project_dir: Path | None, loglevel: str
) -> _FetchPool:
    """This worker's fetch pool: ``remex worker --fetch-only`` (see :class:`_FetchPool`)."""
    return _FetchPool(
        [
            sys.executable,
            "-c",
            "from cli import main; main()",
            "worker",
            "--fetch-only",
            "--name",
            name,
            "--fetch-concurrency",
            str(concurrency),
            "--loglevel",
            loglevel,
            *(["-C", str(project_dir)] if project_dir is not None else []),
        ]
    )


def _die_with_parent(parent: int) -> None:
    """Get SIGTERM when PARENT dies, even by SIGKILL (Linux), and exit now if
    it died already (before the death signal was set)."""
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit(0)


@main.command()
@click.option("--workers", type=int, default=2, show_default=True, help="remex worker processes.")
@click.option(
    "--jobs", type=int, default=4, show_default=True, help="Actions buildbox-casd runs at once."
)
@click.option(
    "--concurrency",
    type=int,
    default=None,
    help="Tasks per worker (threads). Default: --jobs, at least 4: a thread following "
    "an Execute waits on casd, so each worker keeps up to --jobs actions running and "
    "still has threads for the other stages.",
)
@click.option(
    "--fetch-concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Source downloads per worker, in its fetch pool (default: worker.fetch-concurrency).",
)
@click.option("--detach", is_flag=True, help="Return once everything is healthy.")
@click.option(
    "--flower",
    is_flag=True,
    help="Also start Flower (task monitor, basic auth) on a free loopback port.",
)
@project_option
@handles_errors
def up(
    workers: int,
    jobs: int,
    concurrency: int | None,
    fetch_concurrency: int | None,
    detach: bool,
    flower: bool,
    project_dir: Path,
) -> None:
    """Start the embedded stack on loopback: redis-server, buildbox-casd, workers
    (and Flower).

    The workers' local CAS follows the configuration (the user's and the
    project folder's remex.toml, REMEX_*): ``cas.quota`` for each, and
    ``cas.dir`` when set (then they share it; else each has its own).
    """
    import signal

    if concurrency is None:
        concurrency = max(4, jobs)

    from pipeline import stack as embedded
    from pipeline.config import load_config
    from pipeline.servers.stack import STACK_WORKER_NICE, STACK_WORKER_STAGING

    config = load_config(project_dir)
    nice = STACK_WORKER_NICE if config.worker_nice is None else config.worker_nice
    staging = STACK_WORKER_STAGING if config.worker_staging is None else config.worker_staging
    folder = embedded.stack_dir()
    running = embedded.up(
        folder,
        workers=workers,
        jobs=jobs,
        concurrency=concurrency,
        flower=flower,
        worker_env={
            **cas_env(config),
            "REMEX_WORKER_FETCH_CONCURRENCY": str(fetch_concurrency or config.fetch_concurrency),
            "REMEX_WORKER_NICE": str(nice),
            "REMEX_WORKER_STAGING": str(staging),
        },
    )
    click.echo(f"remex stack up ({folder}):")
    click.echo(f"  broker     {running.broker_url}")
    if running.redis_password_file:
        click.echo(f"             (password in {running.redis_password_file})")
    click.echo(f"  execution  {running.execution_url} (buildbox-casd, also the artifact server)")
    fetches = fetch_concurrency or config.fetch_concurrency
    click.echo(
        f"  workers    {workers} x {concurrency} tasks, {fetches} downloads (fetch pool), "
        f"nice {nice}, staging {staging or 'unlimited'}"
    )
    if running.flower is not None:
        password = Path(running.flower["password_file"]).read_text().strip()
        click.echo(f"  flower     {running.flower['url']}/tasks")
        click.echo(f"             user {running.flower['user']}, password {password}")
        click.echo(f"             (the password is kept in {running.flower['password_file']})")
    if detach:
        click.echo("stop it with: remex down")
        return
    click.echo("Ctrl-C stops it.")
    stop = {"now": False}

    def request_stop(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    for line in embedded.down(folder):
        click.echo(f"stopped {line}")


@main.command()
@handles_errors
def down() -> None:
    """Stop the embedded stack that `remex up` started (exactly its processes)."""
    from pipeline import stack as embedded

    stopped = embedded.down(embedded.stack_dir())
    if not stopped:
        click.echo("no remex stack is up")
    for line in stopped:
        click.echo(f"stopped {line}")


@main.command()
@click.option(
    "--remote",
    default=None,
    help="The Bots/CAS server URL (default: the configured execution server).",
)
@click.option("--instance", default=None, help="REAPI instance name (default: the configured one).")
@click.option("--capacity", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--platform",
    "platform_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="A platform property (repeatable); OSFamily and ISA default to this host's.",
)
@click.option(
    "--runner",
    type=click.Choice(["buildbox-run", "host"]),
    default="buildbox-run",
    show_default=True,
    help="buildbox-run: bubblewrap sandbox. host: NO sandbox, trusted actions only.",
)
@click.option("--name", "bot_id", default=None, help="Bot id (default: HOST-PID).")
@click.option(
    "--grace",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds running actions may take to finish after SIGTERM before they are given back.",
)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option(
    "--local-cas/--no-local-cas",
    default=None,
    help="Run a buildbox-casd proxying the server's CAS in front of buildbox-run "
    "(default: [bot] local-cas, true).",
)
@click.option(
    "--cas-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="That casd's folder (default: [bot] cas-dir, else WORKDIR/casd).",
)
@click.option(
    "--cas-quota", default=None, help="Its LRU quota, e.g. 10G (default: [bot] cas-quota, 10G)."
)
@click.option("--loglevel", default="INFO", show_default=True)
@handles_errors
def bot(
    remote: str | None,
    instance: str | None,
    capacity: int,
    platform_items: Sequence[str],
    runner: str,
    bot_id: str | None,
    grace: float,
    workdir: Path | None,
    local_cas: bool | None,
    cas_dir: Path | None,
    cas_quota: str | None,
    loglevel: str,
) -> None:
    """Run a Bots-API execution worker for BuildGrid: lease actions and run them."""
    import logging

    from bot.main import BotOptions, default_bot_id, merge_properties, run_bot
    from pipeline.config import load_config, parse_size
    from pipeline.reapi.channel import Endpoint

    logging.basicConfig(
        level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_config()
    if remote is not None:
        endpoint = Endpoint(remote, instance_name=instance or "")
    else:
        endpoint = config.require_execution()
        if instance is not None:
            endpoint = dataclasses.replace(endpoint, instance_name=instance)
    # Fail at once, in one sentence, when the server is not there at all (the
    # bot itself keeps retrying a server that goes away later).
    from pipeline.reapi.remote import Remote

    with Remote(endpoint) as server:
        server.capabilities()
    options = BotOptions(
        endpoint=endpoint,
        bot_id=bot_id or default_bot_id(),
        capacity=capacity,
        properties=merge_properties(platform_items),
        runner=runner,
        workdir=workdir,
        grace=grace,
        local_cas=config.bot_local_cas if local_cas is None else local_cas,
        cas_dir=cas_dir or config.bot_cas_dir,
        cas_quota=config.bot_cas_quota_bytes
        if cas_quota is None
        else parse_size(cas_quota, where="--cas-quota"),
    )
    run_bot(options)


# ``remex artifact ...`` lives in its own module; importing it registers the
# group on ``main`` (it imports this module's options, hence at the end).
import cli.artifact  # noqa: E402, F401
