"""``local``: a file or folder of the project, imported into the CAS when loaded."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pipeline.cas import LocalCas, import_directory
from pipeline.digest import Digest, digest_to_str
from pipeline.elements.errors import SourceError
from pipeline.elements.nodes import MappingNode, Mark
from pipeline.elements.sources.base import NetworkSettings, Source, SourceContext
from pipeline.elements.sources.helpers import COMMON_KEYS, project_path, source_directory
from pipeline.errors import LocalCasError
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory, FileNode

__all__ = ["LocalSource"]


class LocalSource(Source):
    """A file or folder of the project (``path``, relative to the project folder)."""

    kind: ClassVar[str] = "local"

    def __init__(
        self, *, path: Path, relative: str, cas: LocalCas, directory: str, mark: Mark, field: str
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.path = path
        self.relative = relative
        self._digest = self._import(cas)

    @classmethod
    def load(cls, node: MappingNode, ctx: SourceContext) -> LocalSource:
        """``path`` must exist inside the project; its tree is keyed now."""
        directory = source_directory(node)
        node.validate_keys(("path", *COMMON_KEYS))
        path_node = node.require_str("path")
        relative = ctx.variables.expand_node(path_node)
        path = project_path(ctx.project_dir, relative, path_node)
        return cls(
            path=path,
            relative=relative,
            cas=ctx.cas,
            directory=directory,
            mark=node.mark,
            field=node.path,
        )

    @classmethod
    def kept(
        cls,
        *,
        path: Path,
        relative: str,
        digest: Digest,
        directory: str,
        mark: Mark,
        field: str,
    ) -> LocalSource:
        """The source as an earlier load found it (its tree's digest then),
        without importing it: :meth:`stage` and :meth:`unchanged` compare with it."""
        source = cls.__new__(cls)
        Source.__init__(source, directory=directory, mark=mark, field=field)
        source.path = path
        source.relative = relative
        source._digest = digest
        return source

    @property
    def digest(self) -> Digest:
        """The tree digest of the content, taken when the project was loaded."""
        return self._digest

    def unchanged(self, cas: LocalCas) -> bool:
        """Whether the path, imported again, is still the tree it was when loaded."""
        try:
            return self._import(cas) == self._digest
        except SourceError:
            return False

    def content_key(self) -> str:
        """The tree digest of the content, taken when the project was loaded."""
        return digest_to_str(self._digest)

    def stage(self, cas: LocalCas, workdir: Path, network: NetworkSettings | None = None) -> Digest:
        """Import the path again; it must not have changed since it was loaded."""
        digest = self._import(cas)
        if digest != self._digest:
            raise self._error(
                f"local source {self.relative!r} changed since the project was loaded "
                f"({digest_to_str(self._digest)} then, {digest_to_str(digest)} now)"
            )
        return digest

    def _import(self, cas: LocalCas) -> Digest:
        try:
            if self.path.is_dir():
                return import_directory(cas, self.path)
            # A single file is staged under its own name, as BuildStream does.
            blob = cas.put_file(self.path)
            executable = bool(self.path.stat().st_mode & 0o100)
            return cas.put_message(
                Directory(
                    files=[FileNode(name=self.path.name, digest=blob, is_executable=executable)]
                )
            )
        except (LocalCasError, OSError) as exc:
            raise self._error(f"cannot import local source {self.relative!r}: {exc}") from exc
