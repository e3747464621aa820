"""The base class of source kinds, and what a kind loads a source with.

A source kind is one :class:`Source` subclass in its own module of this
package, listed in the package's ``SOURCE_KINDS``. Its :meth:`Source.load`
reads and checks one ``sources`` entry (keys, refs, files on disk);
:meth:`Source.content_key` names the content for the element's cache key and
:meth:`Source.stage` stores it as a Directory tree. Nothing outside the kind
asks which kind a source is.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.errors import SourceError
from pipeline.elements.nodes import MappingNode, Mark
from pipeline.elements.sources.mirrors import SourceMirror, url_candidates
from pipeline.elements.sources.settings import ProjectSources
from pipeline.elements.variables import Variables

__all__ = [
    "FetchContext",
    "FetchRequest",
    "NetworkSettings",
    "Source",
    "SourceContext",
    "fetch_here",
    "source_cache_key",
]


@dataclass(frozen=True)
class SourceContext:
    """What a source is loaded with: its project and its element's variables.

    Attributes:
        project_dir: the project folder (absolute); local paths are inside it.
        aliases: the project's URL aliases (``alias`` -> URL prefix).
        variables: the element's variables; every string field but ``kind``
            and ``directory`` has them expanded, as in BuildStream.
        cas: the local CAS (``local`` sources are imported into it when loaded).
        settings: what project.conf says about sources (``sources:``
            defaults, source plugins, provenance attributes).
        mirrors: project.conf ``mirrors``, in their order.
        default_mirror: the mirror the user prefers (``[fetch] default-mirror``,
            ``--default-mirror``); None: the first mirror.
    """

    project_dir: Path
    aliases: Mapping[str, str]
    variables: Variables
    cas: LocalCas
    settings: ProjectSources = field(default_factory=ProjectSources)
    mirrors: tuple[SourceMirror, ...] = ()
    default_mirror: str | None = None

    def url_candidates(self, url: str) -> list[str]:
        """The URLs to try for ``url`` as written (maybe ``alias:rest``), in order:
        as BuildStream, the mirrors' prefixes for the alias (the default
        mirror's first), then the alias's own value (see
        :mod:`pipeline.elements.sources.mirrors`)."""
        return url_candidates(url, self.aliases, self.mirrors, self.default_mirror)


class FetchRequest(TypedDict):
    """What a worker needs to fetch one network source (JSON, kept in the build's state).

    Attributes:
        kind: the source kind's name (finds the class in ``SOURCE_KINDS``).
        key: the source cache key (:func:`source_cache_key`): the same
            source in any element, build or machine has the same key.
        element: the element the source belongs to (first one, for messages).
        index: the source's position in that element's ``sources``.
        field: where it is written (``sources[0]``), for messages.
        file: the element's file as shown to the user, for messages.
        urls: the main URL's candidates in the order they are tried
            (mirrors first, as BuildStream), credentials included: never log them.
        config: the rest, as the kind needs it (ref, base-dir, submodules ...).
    """

    kind: str
    key: str
    element: str
    index: int
    field: str
    file: str
    urls: list[str]
    config: dict[str, Any]


@dataclass(frozen=True)
class NetworkSettings:
    """How a worker downloads (``[fetch]`` in the configuration).

    Attributes:
        connect_timeout: seconds to wait for a connection.
        read_timeout: seconds to wait for the next bytes of an answer.
        retries: attempts per URL after the first, on connection errors and 5xx.
        backoff: the first retry's delay in seconds (doubled each time, with jitter).
        ca_bundle: a CA bundle to verify TLS with, instead of the system's.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    ca_bundle: Path | None = None


@dataclass
class FetchContext:
    """What a kind's :meth:`Source.fetch` works with, on a worker (or the submitter).

    Attributes:
        cas: the local CAS the staged tree is written to.
        workdir: scratch space for this fetch, removed afterwards.
        cache_dir: a folder kept between fetches on this host (git mirrors ...).
        network: timeouts, retries, TLS.
        progress: called with (bytes done, bytes expected or None) as a download goes.
    """

    cas: LocalCas
    workdir: Path
    cache_dir: Path
    network: NetworkSettings = field(default_factory=NetworkSettings)
    progress: Callable[[int, int | None], None] = lambda done, total: None


def source_cache_key(kind: str, unique: Any) -> str:
    """The source cache key: the hex sha256 of the kind and its JSON unique key."""
    text = json.dumps([kind, unique], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Source(ABC):
    """One source of an element.

    Attributes:
        kind: the kind's name, as written in ``kind:``.
        plugin_packages: plugin packages (normalised distribution names) whose
            source kind of the same name this class implements with the same
            configuration; a project declaring that kind from one of them
            (project.conf ``plugins: sources:``) gets this class.
        directory: the sub-folder of the element's sources to stage it in ("" = top).
        mark: where the source is written; ``field`` its path (``sources[0]``).
    """

    kind: ClassVar[str]
    plugin_packages: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *, directory: str, mark: Mark, field: str) -> None:
        self.directory = directory
        self.mark = mark
        self.field = field

    @classmethod
    @abstractmethod
    def load(cls, node: MappingNode, ctx: SourceContext) -> Source:
        """Read one ``sources`` entry of this kind and check it against the disk.

        ``node`` already has project.conf's ``sources: KIND: config:``
        composed under it; ``kind`` and ``provenance`` are checked.

        Raises:
            LoadError: a bad key or value; names the file, line and field.
        """

    @abstractmethod
    def content_key(self) -> str:
        """What identifies the content, for the element's cache key."""

    @abstractmethod
    def stage(self, cas: LocalCas, workdir: Path, network: NetworkSettings | None = None) -> Digest:
        """Store the content as a Directory tree in ``cas``; return the root digest.

        Args:
            cas: the store to write to.
            workdir: scratch space (the built-in kinds need none).
            network: how a network source downloads, on the submitting host
                (``[fetch]``; default: NetworkSettings()).

        Raises:
            SourceError: the content is refused or changed since the project was loaded.
        """

    def fetch_request(self, element: str, index: int, file: str) -> FetchRequest | None:
        """What a worker fetches for this source, or None when the submitter
        stages it itself (:meth:`stage`; local files)."""
        return None

    @classmethod
    def fetch(cls, request: FetchRequest, ctx: FetchContext) -> Digest:
        """Download the source a request names and store it as a Directory tree.

        Runs on a worker (the ``remex.fetch_source`` task), from the request
        alone. Tries ``request["urls"]`` in order, failing over to the next
        on a network error, a 4xx/5xx or content that does not match the ref.

        Raises:
            SourceError: every candidate failed; names the element, the source
                index, the URLs tried (credentials removed) and why.
        """
        raise SourceError(f"source kind {cls.kind!r} is not fetched over the network")

    def track(self, ctx: FetchContext) -> str | None:
        """The ref the source's ``track`` (branch, tag, or the URL's current
        content) resolves to now, or None when the kind does not track.

        Runs on the submitting host (``remex source track``).

        Raises:
            SourceError: nothing could be resolved; names the URLs tried.
        """
        return None

    def tracked_keys(self) -> dict[str, Any]:
        """Keys besides ``ref`` that the last :meth:`track` resolved and that
        are written into the .bst file with it (git's ``tags``); {} for most kinds."""
        return {}

    def apply_step(self) -> dict[str, Any] | None:
        """How the build applies this source's staged tree to what the element's
        earlier sources staged (JSON, the spec's ``apply``), or None when the
        tree is merged in its ``directory`` as it is (every kind but ``patch``).
        """
        return None

    def key_description(self) -> dict[str, Any]:
        """This source's part of the cache key."""
        return {"kind": self.kind, "directory": self.directory, "content": self.content_key()}

    def describe(self) -> str:
        """A short human name, for logs."""
        return f"{self.kind} source {self.field}"

    def _error(self, message: str) -> SourceError:
        return SourceError(message, file=self.mark.file, line=self.mark.line, field=self.field)


class NetworkSource(Source):
    """A source a worker downloads: :meth:`stage` on the submitting host (a
    junction's project, ``remex source checkout`` without workers) fetches it
    the same way a worker does, into the caller's scratch folder."""

    @abstractmethod
    def fetch_request(self, element: str, index: int, file: str) -> FetchRequest:
        """What a worker fetches for this source."""

    def stage(self, cas: LocalCas, workdir: Path, network: NetworkSettings | None = None) -> Digest:
        request = self.fetch_request("", 0, self.mark.file or "")
        return fetch_here(self.fetch, request, cas, workdir, network)


def fetch_here(
    fetch: Callable[[FetchRequest, FetchContext], Digest],
    request: FetchRequest,
    cas: LocalCas,
    workdir: Path,
    network: NetworkSettings | None = None,
) -> Digest:
    """``fetch(request)`` on this host, as a worker would, with scratch and
    cache folders under ``workdir`` (a junction's project, a kept plan's
    source staged by the submitter)."""
    ctx = FetchContext(
        cas=cas,
        workdir=workdir / "fetch",
        cache_dir=workdir / "cache",
        network=network or NetworkSettings(),
    )
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    return fetch(request, ctx)
