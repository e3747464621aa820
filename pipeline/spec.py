"""The build spec: everything a stage needs to build one element, as JSON.

The project loader (:mod:`pipeline.elements`) turns an element and its
resolved dependencies into a :class:`BuildSpec`; the stages
(:mod:`pipeline.stages`) build from it alone, so a worker on another machine
needs no project folder: sources were snapshotted into the artifact server's
CAS when the build was submitted, and dependencies are fetched there by their
artifact URI. Every value is plain JSON (digests as ``{"hash", "size_bytes"}``),
so the Celery tasks pass specs and stage results through Redis unchanged.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

DigestJson = dict[str, Any]
"""``{"hash": "<64 hex>", "size_bytes": N}``; see :mod:`pipeline.digest`."""

ARTIFACT_URI_PREFIX = "urn:fdc:remex:2026:artifact:"
FAILURE_URI_PREFIX = "urn:fdc:remex:2026:failure:"
INTEGRATED_URI_PREFIX = "urn:fdc:remex:2026:integrated:"
SOURCE_URI_PREFIX = "urn:fdc:remex:2026:source:"
FETCH_KIND = "fetch"
"""The ``kind`` of a build node that fetches one source (see :attr:`BuildSpec.fetch`)."""


def source_uri(key: str) -> str:
    """The Remote Asset URI of a fetched source's tree in the source cache
    (``key``: the source cache key, see ``pipeline.elements.sources.source_cache_key``)."""
    return f"{SOURCE_URI_PREFIX}{key}"


def artifact_uri(project: str, normal_name: str, cache_key: str) -> str:
    """The Remote Asset URI of an element's artifact."""
    return f"{ARTIFACT_URI_PREFIX}{project}/{normal_name}/{cache_key}"


def integrated_uri(project: str, normal_name: str, key: str) -> str:
    """The Remote Asset URI of an integrated checkout (a tree with integration run)."""
    return f"{INTEGRATED_URI_PREFIX}{project}/{normal_name}/{key}"


def failure_uri(project: str, normal_name: str, cache_key: str) -> str:
    """The Remote Asset URI of an element's failure record (a JSON blob)."""
    return f"{FAILURE_URI_PREFIX}{project}/{normal_name}/{cache_key}"


def normal_name(element: str) -> str:
    """BuildStream's normal name: the element path without ``.bst``, ``/`` -> ``-``."""
    return element.removesuffix(".bst").replace("/", "-")


class SelectSpec(TypedDict):
    """Which files of a dependency's artifact are taken (BuildStream's split rules).

    A path is taken when it is in an ``include`` domain (every domain when
    ``include`` is empty) and in no ``exclude`` domain, or, when it is in no
    domain at all, when ``orphans`` is true; domains the element does not
    define are ignored (BuildStream's split filter).
    Domains are lists of BuildStream globs (variables expanded) over absolute
    paths (``/usr/bin/*``) of the artifact's files.
    """

    domains: dict[str, list[str]]
    include: list[str]
    exclude: list[str]
    orphans: bool


class DependencySpec(TypedDict):
    """A dependency staged into the build: its artifact's ``files/`` go to ``path``."""

    element: str
    cache_key: str
    artifact_uri: str
    path: str
    """Where in the input root its files go ("" = ``/``)."""
    select: SelectSpec | None
    """None: all its files."""
    overlap_whitelist: NotRequired[list[str]]
    """Its ``public: bst: overlap-whitelist`` globs (its variables expanded):
    the paths it may overwrite without a warning (absent: none)."""


class SourceSpec(TypedDict):
    """One source: a Directory tree in the artifact server's CAS, named by
    its digest (snapshotted by the submitter, or found in the source cache),
    or by its source cache URI (fetched by a ``fetch`` node of the build
    before this element starts)."""

    kind: str
    """The source's kind (for people; the tree is what counts)."""
    digest: NotRequired[DigestJson]
    """Root Directory of the source's content (absent: see ``uri``)."""
    uri: NotRequired[str]
    """Without ``digest``: the source cache URI (Remote Asset) its tree is under."""
    directory: str
    """Sub-folder of the element's source tree to stage it in ("" = top)."""
    apply: NotRequired[dict[str, Any]]
    """Absent: the tree is merged in ``directory``. Present: a step applied,
    in ``directory``, to the sources merged before it; today
    ``{"patch": FILE, "strip": N}``: the tree's FILE applied with
    ``patch -pN`` (a failure fails the element)."""


class CommandSpec(TypedDict):
    """The one action of an element that runs commands. Paths are relative to the input root."""

    arguments: list[str]
    environment: dict[str, str]
    working_directory: str
    output_path: str
    """The folder whose content becomes the artifact's files; "" = every
    top-level entry of the input root (the whole sandbox after the commands)."""
    platform: dict[str, str]
    timeout_seconds: int | None


class BuildSpec(TypedDict):
    """Everything needed to build one element, whatever its kind.

    The element's kind (:mod:`pipeline.elements.kinds`) compiles to this
    recipe, so the stages never ask which kind they build:

    1. the input tree is the ``dependencies`` (each at its ``path``; each
       filtered by its ``select`` unless there is a ``command``) merged in
       order, then the sources at ``source_root``;
    2. with a ``command``, the action runs on that tree and the artifact's
       files are its output (``select_outputs``: only the outputs selected from
       the dependencies or new to the tree); without one, the files are the
       tree's ``files_root`` folder placed at ``files_target``.
    """

    project: str
    element: str
    kind: str
    cache_key: str
    artifact_uri: str
    dependencies: list[DependencySpec]
    """What is staged, in order."""
    runtime_dependencies: list[str]
    """The element's own runtime dependencies (recorded in the artifact's meta)."""
    sources: list[SourceSpec]
    source_root: str
    """Where the sources go in the input tree ("" = top)."""
    command: CommandSpec | None
    files_root: str
    """No command: the folder of the input tree that becomes the files."""
    files_target: str
    """No command: where that folder lands in the artifact's files ("" = top)."""
    select_outputs: bool
    """With a command: keep only the outputs that the dependencies' ``select``
    takes or that the command created."""
    priority: NotRequired[int]
    """The build's priority, 0-9, lower runs sooner (absent: the default, 5):
    orders the element's messages and is the REAPI execution priority."""
    fetch: NotRequired[dict[str, Any]]
    """A ``fetch`` node (``kind`` "fetch", no command, no sources): the
    ``FetchRequest`` of the one source it downloads into the source cache;
    its ``artifact_uri`` is that source's cache URI (so two builds fetching
    the same source fetch it once)."""
    fatal_warnings: NotRequired[list[str]]
    """project.conf ``fatal-warnings``: staging warnings (``overlaps``,
    ``unstaged-files``) with these tokens fail the element (absent: none)."""
