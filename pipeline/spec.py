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

from typing import Any, Literal, TypedDict

DigestJson = dict[str, Any]
"""``{"hash": "<64 hex>", "size_bytes": N}``; see :mod:`pipeline.digest`."""

ARTIFACT_URI_PREFIX = "urn:fdc:remex:2026:artifact:"
FAILURE_URI_PREFIX = "urn:fdc:remex:2026:failure:"


def artifact_uri(project: str, normal_name: str, cache_key: str) -> str:
    """The Remote Asset URI of an element's artifact."""
    return f"{ARTIFACT_URI_PREFIX}{project}/{normal_name}/{cache_key}"


def failure_uri(project: str, normal_name: str, cache_key: str) -> str:
    """The Remote Asset URI of an element's failure record (a JSON blob)."""
    return f"{FAILURE_URI_PREFIX}{project}/{normal_name}/{cache_key}"


def normal_name(element: str) -> str:
    """BuildStream's normal name: the element path without ``.bst``, ``/`` -> ``-``."""
    return element.removesuffix(".bst").replace("/", "-")


class DependencySpec(TypedDict):
    """A dependency staged into the build: its artifact's ``files/`` go to ``/``."""

    element: str
    cache_key: str
    artifact_uri: str


class SourceSpec(TypedDict):
    """One source, snapshotted as a Directory tree in the artifact server's CAS."""

    kind: str
    """``local``, ``tar`` or ``git`` (for people; the tree is what counts)."""
    digest: DigestJson
    """Root Directory of the source's content."""
    directory: str
    """Sub-folder of the element's source tree to stage it in ("" = top)."""


class CommandSpec(TypedDict):
    """The one action of a ``manual`` element. Paths are relative to the input root."""

    arguments: list[str]
    environment: dict[str, str]
    working_directory: str
    output_path: str
    platform: dict[str, str]
    timeout_seconds: int | None


class BuildSpec(TypedDict):
    """Everything needed to build one element."""

    project: str
    element: str
    kind: Literal["import", "manual", "stack"]
    cache_key: str
    artifact_uri: str
    dependencies: list[DependencySpec]
    """What is staged at ``/`` for a build, in order: build dependencies and
    their runtime closure (empty for ``import`` and ``stack``)."""
    runtime_dependencies: list[str]
    """The element's own runtime dependencies (recorded in the artifact's meta)."""
    sources: list[SourceSpec]
    source_root: str
    """Where the sources go: ``%{build-root}`` for ``manual`` (relative to the
    input root); for ``import``, the ``config.source`` sub-folder to take."""
    import_target: str
    """``import`` only: where in the artifact's files the sources land ("" = top)."""
    command: CommandSpec | None
    """``manual`` only."""
