"""Fetching network sources into the source cache (no Celery).

A network source's staged tree is stored in the artifact server's CAS and
named through Remote Asset by its source cache URI
(:func:`pipeline.spec.source_uri` of its source cache key), so a source is
downloaded once for the whole farm: :func:`lookup_sources` finds what is
there already (the submitter, batched), :func:`fetch_source` (a worker's
``remex.fetch_source`` task) downloads the rest with the source kind's own
:meth:`~pipeline.elements.sources.Source.fetch`, uploads the tree and names
it. ``stage_to_cas`` reads a source given by URI back through
:func:`resolve_source`.

Downloads happen in a scratch folder per fetch under the worker's CAS
folder (:func:`scratch_root`); a worker killed mid-download leaves its
scratch behind, and the next worker starting on that folder removes it
(:func:`remove_stale_scratch`), so no partial file ever counts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.cas.quota import pid_alive
from pipeline.digest import Digest
from pipeline.elements.sources import (
    SOURCE_KINDS,
    FetchContext,
    FetchRequest,
    NetworkSettings,
)
from pipeline.spec import FETCH_KIND, BuildSpec, source_uri
from pipeline.stages.context import StageContext
from pipeline.stages.errors import SourceNotFetchedError, SpecError

__all__ = [
    "LOOKUP_THREADS",
    "ProgressThrottle",
    "fetch_node_name",
    "fetch_source",
    "lookup_source",
    "lookup_sources",
    "redact_url",
    "remove_stale_scratch",
    "resolve_source",
    "scratch_root",
]

LOOKUP_THREADS = 16
"""How many source cache lookups are in flight at once (each one small RPC)."""

SCRATCH_FOLDER = "fetch-scratch"
CACHE_FOLDER = "fetch-cache"


def redact_url(url: str) -> str:
    """``url`` without the user name and password (for logs, Flower, errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def fetch_node_name(request: Mapping[str, Any]) -> str:
    """The readable, unique name of the build node that fetches ``request``:
    ``fetch:<last part of the URL>@<key prefix>``."""
    urls = request.get("urls") or [""]
    path = urlsplit(redact_url(str(urls[0]))).path.rstrip("/")
    tail = path.rsplit("/", 1)[-1] or str(request.get("kind", "source"))
    return f"fetch:{tail}@{str(request['key'])[:12]}"


def fetch_spec(project: str, request: FetchRequest, priority: int) -> BuildSpec:
    """The build spec of a node that fetches one source (``kind`` "fetch")."""
    return {
        "project": project,
        "element": fetch_node_name(request),
        "kind": FETCH_KIND,
        "cache_key": request["key"],
        "artifact_uri": source_uri(request["key"]),
        "dependencies": [],
        "runtime_dependencies": [],
        "sources": [],
        "source_root": "",
        "command": None,
        "files_root": "",
        "files_target": "",
        "select_outputs": False,
        "priority": priority,
        "fetch": dict(request),
    }


def lookup_source(ctx: StageContext, key: str) -> Digest | None:
    """The tree of the source with cache key ``key``, if the source cache has it.

    Raises:
        RemoteError: the artifact server failed (after retries).
    """
    fetched = ctx.assets.fetch_directory([source_uri(key)])
    return None if fetched is None else fetched.digest


def lookup_sources(
    ctx: StageContext, keys: Iterable[str], *, threads: int = LOOKUP_THREADS
) -> dict[str, Digest]:
    """The source cache's trees of those of ``keys`` it has (looked up in parallel).

    Raises:
        RemoteError: the artifact server failed (after retries).
    """
    unique = list(dict.fromkeys(keys))
    if not unique:
        return {}
    with ThreadPoolExecutor(min(threads, len(unique)), thread_name_prefix="remex-src") as pool:
        found = pool.map(lambda key: lookup_source(ctx, key), unique)
        return {key: digest for key, digest in zip(unique, found, strict=True) if digest}


def fetch_source(
    ctx: StageContext,
    request: FetchRequest,
    *,
    workdir: Path,
    cache_dir: Path,
    network: NetworkSettings | None = None,
    progress: Callable[[int, int | None], None] = lambda done, total: None,
) -> tuple[Digest, bool]:
    """Make the source ``request`` names present in the source cache.

    Looks the cache up first (another build or worker may have fetched it
    meanwhile); otherwise the kind downloads and stages it into the local
    CAS (in ``workdir``), its tree is uploaded to the artifact server's CAS
    (what it lacks) and named by the source's URI (PushDirectory), in that
    order, so a named tree is always complete.

    Returns:
        The tree's digest, and whether it was downloaded now (False: cached).

    Raises:
        SpecError: the request names a kind remex does not know.
        SourceError: the kind failed for good (checksum, every URL refused ...).
        RemoteError: the artifact server failed (after retries).
    """
    found = lookup_source(ctx, request["key"])
    if found is not None:
        return found, False
    cls = SOURCE_KINDS.get(request["kind"])
    if cls is None:
        raise SpecError(request.get("element", "?"), f"unknown source kind {request['kind']!r}")
    fetch_ctx = FetchContext(
        cas=ctx.local_cas,
        workdir=workdir,
        cache_dir=cache_dir,
        network=network or NetworkSettings(),
        progress=progress,
    )
    # Pinned: a quota cleanup must not take the new blobs before they are uploaded.
    with ctx.local_cas.pin() as pin:
        digest = cls.fetch(request, fetch_ctx)
        pin.add_tree(digest)
        ctx.artifact_cas.upload_tree(ctx.local_cas, digest)
    ctx.assets.push_directory([source_uri(request["key"])], digest)
    return digest, True


def resolve_source(
    ctx: StageContext, element: str, index: int, source: Mapping[str, Any]
) -> Digest:
    """The tree of a source spec given by source cache URI (no digest).

    Raises:
        SourceNotFetchedError: the source cache has nothing under the URI.
        RemoteError: the artifact server failed (after retries).
    """
    uri = str(source.get("uri") or "")
    fetched = ctx.assets.fetch_directory([uri]) if uri else None
    if fetched is None:
        raise SourceNotFetchedError(element, index, str(source.get("kind", "?")), uri)
    return fetched.digest


# --- scratch space ---------------------------------------------------------------


def scratch_root(cas_dir: Path) -> Path:
    """Where the fetches of workers on the CAS folder ``cas_dir`` download to
    (beside the store's own ``objects``, ``tmp`` and ``pins``)."""
    return Path(cas_dir) / SCRATCH_FOLDER


def cache_root(cas_dir: Path) -> Path:
    """The folder fetches on ``cas_dir``'s host keep between fetches (git mirrors ...)."""
    return Path(cas_dir) / CACHE_FOLDER


@contextlib.contextmanager
def fetch_scratch(cas_dir: Path) -> Iterator[Path]:
    """A fresh scratch folder for one fetch, removed afterwards.

    It lives under ``scratch_root(cas_dir)/<pid>/``, so a worker that dies
    mid-download leaves it to :func:`remove_stale_scratch`.
    """
    folder = scratch_root(cas_dir) / str(os.getpid()) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_scratch(cas_dir: Path) -> int:
    """Remove the scratch folders of processes that no longer run (killed
    mid-download); return how many. Called when a worker starts: this
    process's own PID counts as dead too (a container restarted with the
    same PID as before)."""
    root = scratch_root(cas_dir)
    removed = 0
    if not root.is_dir():
        return 0
    for entry in root.iterdir():
        pid = int(entry.name) if entry.name.isdigit() else 0
        if pid and pid != os.getpid() and pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


class ProgressThrottle:
    """Calls ``report(done, total)`` at most every ``interval`` seconds, and
    always for the last call (:meth:`flush`)."""

    def __init__(
        self,
        report: Callable[[int, int | None], None],
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._report = report
        self._interval = interval
        self._clock = clock
        self._last = -interval
        self._pending: tuple[int, int | None] | None = None

    def __call__(self, done: int, total: int | None) -> None:
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            self._pending = None
            self._report(done, total)
        else:
            self._pending = (done, total)

    def flush(self) -> None:
        """Report the last values if they were held back."""
        if self._pending is not None:
            done, total = self._pending
            self._pending = None
            self._report(done, total)
