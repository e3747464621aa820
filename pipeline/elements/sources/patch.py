"""``patch``: a patch file of the project applied to what the element's earlier sources staged.

buildstream-plugins' ``patch``: ``path`` (a file in the project),
``strip-level`` (default 1) and the common ``directory`` (where in the
sources it applies). The submitter snapshots the patch file as a one-file
tree, as it does for local sources; the build stages apply it with the system
``patch`` on the sources merged so far (:meth:`PatchSource.apply_step` says
how, so the stages never ask which kind a source is).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.errors import SourceError
from pipeline.elements.nodes import MappingNode, Mark
from pipeline.elements.sources.base import NetworkSettings, Source, SourceContext
from pipeline.elements.sources.helpers import COMMON_KEYS, project_path, source_directory
from pipeline.errors import LocalCasError
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory, FileNode

__all__ = ["PatchSource"]


class PatchSource(Source):
    """A patch file (``path``) applied with ``patch -p<strip-level>`` in ``directory``."""

    kind: ClassVar[str] = "patch"
    plugin_packages: ClassVar[frozenset[str]] = frozenset({"buildstream-plugins"})

    def __init__(
        self,
        *,
        path: Path,
        relative: str,
        strip_level: int,
        cas: LocalCas,
        directory: str,
        mark: Mark,
        field: str,
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.path = path
        self.relative = relative
        self.strip_level = strip_level
        self._digest, self._sha256 = self._snapshot(cas)

    @classmethod
    def load(cls, node: MappingNode, ctx: SourceContext) -> PatchSource:
        """``path`` must be a file inside the project; ``strip-level`` a number >= 0."""
        directory = source_directory(node)
        node.validate_keys(("path", "strip-level", *COMMON_KEYS))
        path_node = node.require_str("path")
        relative = ctx.variables.expand_node(path_node)
        path = project_path(ctx.project_dir, relative, path_node)
        if not path.is_file():
            raise path_node.error(f"patch {relative!r} is not a regular file")
        strip_level = 1
        strip_node = node.get_scalar("strip-level")
        if strip_node is not None and strip_node.value is not None:
            text = ctx.variables.expand_node(strip_node)
            if not text.isdigit():
                raise strip_node.error(f"expected a number of path components, got {text!r}")
            strip_level = int(text)
        return cls(
            path=path,
            relative=relative,
            strip_level=strip_level,
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
        strip_level: int,
        digest: Digest,
        sha256: str,
        directory: str,
        mark: Mark,
        field: str,
    ) -> PatchSource:
        """The source as an earlier load found it (its tree and sha256 then),
        without reading the file: :meth:`stage` and :meth:`unchanged` compare with it."""
        source = cls.__new__(cls)
        Source.__init__(source, directory=directory, mark=mark, field=field)
        source.path = path
        source.relative = relative
        source.strip_level = strip_level
        source._digest, source._sha256 = digest, sha256
        return source

    @property
    def digest(self) -> Digest:
        """The patch as a one-file tree, taken when the project was loaded."""
        return self._digest

    @property
    def sha256(self) -> str:
        """The patch file's sha256, taken when the project was loaded."""
        return self._sha256

    def unchanged(self, cas: LocalCas) -> bool:
        """Whether the file, read again, is still the patch it was when loaded."""
        try:
            return self._snapshot(cas) == (self._digest, self._sha256)
        except SourceError:
            return False

    def content_key(self) -> str:
        """buildstream-plugins' unique key: the path, the file's sha256, the strip level."""
        return json.dumps([self.relative, self._sha256, self.strip_level])

    def stage(self, cas: LocalCas, workdir: Path, network: NetworkSettings | None = None) -> Digest:
        """The patch file as a one-file tree; it must not have changed since loading."""
        digest, sha256 = self._snapshot(cas)
        if sha256 != self._sha256:
            raise self._error(
                f"patch {self.relative!r} changed since the project was loaded "
                f"(sha256 {self._sha256} then, {sha256} now)"
            )
        return digest

    def apply_step(self) -> dict[str, Any] | None:
        """Apply the file of the staged tree as a patch (see :meth:`Source.apply_step`)."""
        return {"patch": self.path.name, "strip": self.strip_level}

    def _snapshot(self, cas: LocalCas) -> tuple[Digest, str]:
        try:
            data = self.path.read_bytes()
            blob = cas.put(data)
            tree = cas.put_message(
                Directory(files=[FileNode(name=self.path.name, digest=blob, is_executable=False)])
            )
        except (LocalCasError, OSError) as exc:
            raise self._error(f"cannot read patch {self.relative!r}: {exc}") from exc
        return tree, hashlib.sha256(data).hexdigest()
