"""The base class of source kinds, and what a kind loads a source with.

A source kind is one :class:`Source` subclass in its own module of this
package, listed in the package's ``SOURCE_KINDS``. Its :meth:`Source.load`
reads and checks one ``sources`` entry (keys, refs, files on disk);
:meth:`Source.content_key` names the content for the element's cache key and
:meth:`Source.stage` stores it as a Directory tree. Nothing outside the kind
asks which kind a source is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.errors import SourceError
from pipeline.elements.nodes import MappingNode, Mark
from pipeline.elements.sources.settings import ProjectSources
from pipeline.elements.variables import Variables

__all__ = ["Source", "SourceContext"]


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
    """

    project_dir: Path
    aliases: Mapping[str, str]
    variables: Variables
    cas: LocalCas
    settings: ProjectSources = field(default_factory=ProjectSources)


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
    def stage(self, cas: LocalCas, workdir: Path) -> Digest:
        """Store the content as a Directory tree in ``cas``; return the root digest.

        Args:
            cas: the store to write to.
            workdir: scratch space (the built-in kinds need none).

        Raises:
            SourceError: the content is refused or changed since the project was loaded.
        """

    def key_description(self) -> dict[str, Any]:
        """This source's part of the cache key."""
        return {"kind": self.kind, "directory": self.directory, "content": self.content_key()}

    def describe(self) -> str:
        """A short human name, for logs."""
        return f"{self.kind} source {self.field}"

    def _error(self, message: str) -> SourceError:
        return SourceError(message, file=self.mark.file, line=self.mark.line, field=self.field)
