"""Following a build: a live table on a terminal, plain lines anywhere else.

On a terminal the table redraws in place. Without one (CI logs, ``| tee``)
each element's state change is one line a log reader can grep::

    remex: lib.bst: running (execute)
    remex: lib.bst: built (action cache hit)

then the summary, on its own line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import click

from pipeline.scheduler import BuildStatus, BuildSummary, ElementState, ElementStatus

STATE_STYLE = {
    ElementState.WAITING: "dim",
    ElementState.READY: "cyan",
    ElementState.QUEUED: "cyan",
    ElementState.RUNNING: "yellow",
    ElementState.CACHED: "green",
    ElementState.BUILT: "bold green",
    ElementState.FAILED: "bold red",
    ElementState.SKIPPED: "red",
    ElementState.CANCELLED: "magenta",
}

Wait = Callable[[Callable[[BuildStatus], Any], bool], BuildStatus]
"""Follows the build, calling its first argument with each status read
(summaries when its second is true: enough for the live table)."""


def follow(wait: Wait, stream: TextIO) -> BuildStatus:
    """Follow a build until ``wait`` returns, showing its progress on ``stream``:
    the live table when ``stream`` is a terminal, else one line per change."""
    if stream.isatty():
        return _follow_live(wait)
    return wait(PlainLines(stream), False)


class PlainLines:
    """Prints one line per element whose (state, stage) changed since the last status."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._seen: dict[str, tuple[str, str]] = {}

    def __call__(self, status: BuildStatus) -> None:
        for element in status.elements:
            state, stage, detail, _ = element_line(element)
            if self._seen.get(element.element) == (state, stage):
                continue
            self._seen[element.element] = (state, stage)
            what = f"{state} ({stage or detail})" if stage or detail else state
            click.echo(f"remex: {element.element}: {what}", file=self._stream)


def _follow_live(wait: Wait) -> BuildStatus:
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    started = time.monotonic()
    with Live(console=console, refresh_per_second=4, transient=False) as live:

        def update(status: BuildStatus) -> None:
            live.update(table(status, time.monotonic() - started))

        return wait(update, True)


def element_line(element: ElementStatus) -> tuple[str, str, str, str]:
    """An element's state, stage (with the REAPI stage), result and time, as text."""
    info = element.info
    state = element.state
    running = state == ElementState.RUNNING
    stage = info.get("stage", "") if running else ""
    if running and info.get("remote_stage"):
        stage += f" ({info['remote_stage'].lower()})"
    if running and info.get("bytes_done") is not None:
        # A fetch node downloading.
        total = info.get("bytes_total")
        stage += f" ({_mb(info['bytes_done'])}" + (f"/{_mb(total)})" if total else ")")
    detail = ""
    if state == ElementState.BUILT and info.get("kind") == "fetch":
        detail = "fetched" if info.get("downloaded") else "in the source cache"
        if info.get("built_by"):
            detail = "fetched by another build"
    elif state == ElementState.BUILT:
        detail = "action cache hit" if info.get("action_cached") else "built"
        if info.get("built_by"):
            detail = "built by another build"
    elif state == ElementState.CACHED:
        detail = "artifact cache hit"
    elif state in (ElementState.FAILED, ElementState.SKIPPED):
        detail = str(info.get("error", "")).splitlines()[0][:80] if info.get("error") else ""
    seconds = ""
    if info.get("started"):
        end = info.get("finished") or time.time()
        seconds = f"{end - info['started']:.1f}s"
    return state, stage, detail, seconds


def _mb(size: Any) -> str:
    return f"{float(size) / 1e6:.1f} MB"


# A build of more elements than this shows only those worth a look (running,
# failed ...) in its table, up to this many rows, and counts the rest: a
# 10,000-row table takes seconds to draw and nobody reads it.
TABLE_ROWS = 50
# What a long table shows, most urgent first.
TABLE_STATES = (
    ElementState.FAILED,
    ElementState.RUNNING,
    ElementState.QUEUED,
    ElementState.READY,
    ElementState.SKIPPED,
    ElementState.CANCELLED,
)


def table(status: BuildStatus, elapsed: float, *, rows: int = TABLE_ROWS) -> Any:
    """The build as a rich Table: every element, or in a build of more than
    ``rows`` elements, those in :data:`TABLE_STATES` (at most ``rows``, most
    urgent first, then in plan order) with a caption counting every state."""
    from rich.table import Table

    shown = status.elements
    caption = None
    total = status.total
    if total > rows or status.summary:
        rank = {state.value: index for index, state in enumerate(TABLE_STATES)}
        urgent = [e for e in shown if e.state in rank]
        urgent.sort(key=lambda e: rank[e.state])  # stable: plan order within a state
        shown = urgent[:rows]
        counts = status.counts()
        caption = f"{len(shown)} of {total} elements shown; " + ", ".join(
            f"{n} {state}" for state, n in sorted(counts.items())
        )
    out = Table(
        title=f"build {status.build_id}  {status.status}  {elapsed:.1f}s",
        caption=caption,
        expand=False,
    )
    for column in ("element", "state", "stage", "result", "time", "host"):
        out.add_column(column)
    for element in shown:
        state, stage, detail, seconds = element_line(element)
        style = STATE_STYLE.get(ElementState(state), "") if state in STATE_STYLE else ""
        out.add_row(
            element.element,
            f"[{style}]{state}[/]" if style else state,
            stage,
            detail,
            seconds,
            str(element.info.get("host", "")),
        )
    return out


def print_summary(status: BuildStatus) -> None:
    """The build's outcome and counts, then each failed element's error and log tail."""
    counts = status.counts()
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    click.echo(f"build {status.build_id}: {status.status} ({parts})")
    for element in status.elements:
        if element.state == ElementState.FAILED:
            click.echo(f"\n--- {element.element} failed: {element.info.get('error', '')}")
            tail = element.info.get("log_tail")
            if tail:
                click.echo(tail)


def status_json(status: BuildStatus) -> dict[str, Any]:
    """The build as JSON (``--json``): its status, the counts per state, the
    number of elements, and the elements (every one; or in a summary, see
    :attr:`BuildStatus.summary`, those ready, queued, running or failed)."""
    return {
        "build": status.build_id,
        "status": status.status,
        "counts": status.counts(),
        "total": status.total,
        "summary": status.summary,
        "elements": [
            {"element": e.element, "state": e.state, **dict(e.info.items())}
            for e in status.elements
        ],
    }


def follow_build(build_id: str, *, as_json: bool, timeout: float | None) -> BuildStatus:
    """Follow a submitted build to its end: progress on stderr (or, with
    ``as_json``, the final status as JSON on stdout), then its summary."""
    from pipeline import api

    if as_json:
        final = api.wait(build_id, timeout=timeout)
        click.echo(json.dumps(status_json(final), indent=2))
        return final

    def wait(on_update: Callable[[BuildStatus], object], summaries: bool) -> BuildStatus:
        return api.wait(build_id, timeout=timeout, on_update=on_update, summaries=summaries)

    final = follow(wait, sys.stderr)
    print_summary(final)
    return final


def event_line(event: dict[str, Any]) -> str:
    """One event of a build (see :func:`pipeline.api.events`) as a line, as
    ``remex status --follow`` prints it."""
    kind = str(event.get("event", ""))
    element = event.get("element")
    if kind == "submitted":
        return f"remex: build {event.get('build')} submitted ({event.get('elements', 0)} elements)"
    if kind == "finished":
        return f"remex: build {event.get('build')} {event.get('status')}"
    detail = ""
    if kind == "queued":
        detail = f"attempt {event.get('attempt')}"
    elif kind == "waiting":
        owner = str(event.get("waiting_on", "")).replace("\t", " ")
        detail = f"on build {owner}"
    elif kind == "stage":
        kind = "running"
        detail = f"{event.get('stage')} on {event.get('host')}"
    elif kind == "operation":
        detail = str(event.get("operation", ""))
    elif kind == "built":
        detail = "built by another build" if event.get("built_by") else ""
        if event.get("action_cached"):
            detail = "action cache hit"
        if event.get("started") and event.get("finished"):
            seconds = float(event["finished"]) - float(event["started"])
            detail = f"{detail}, {seconds:.1f}s" if detail else f"{seconds:.1f}s"
    elif kind in (ElementState.FAILED, ElementState.SKIPPED, ElementState.CANCELLED):
        error = str(event.get("error") or "")
        detail = error.splitlines()[0][:120] if error else ""
    return f"remex: {element}: {kind} ({detail})" if detail else f"remex: {element}: {kind}"


def builds_lines(builds: list[BuildSummary]) -> list[str]:
    """Builds (``remex builds``) as aligned text lines, a header first (plain
    text: a listing is read in terminals, logs and pipes alike)."""
    rows = [
        [
            "BUILD",
            "STATUS",
            "PROJECT",
            "TARGETS",
            "SUBMITTED BY",
            "PRIO",
            "ON-ERROR",
            "STARTED",
            "DURATION",
            "ELEMENTS",
        ]
    ]
    for build in builds:
        data = build.as_json()
        counts = " ".join(
            f"{n} {state}"
            for state, n in sorted(build.counts.items())
            if n and state not in ("total", "active")
        )
        active = build.counts.get("active", 0)
        elements = f"{build.counts.get('total', 0)}" + (f" ({counts})" if counts else "")
        if active:
            elements += f" {active} active"
        rows.append(
            [
                build.build_id,
                build.status,
                str(data["project"]),
                ",".join(map(str, data["targets"])) or "-",
                f"{data['user']}@{data['host']}" if data["host"] else "-",
                str(data["priority"] if data["priority"] is not None else "-"),
                str(data["on_error"]),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(build.created)),
                f"{build.duration:.1f}s",
                elements,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    ]
