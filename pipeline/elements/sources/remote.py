"""``remote``: one file by URL (directly or through an alias); ``ref`` is its sha256.

BuildStream's core ``remote``: the file is staged alone, named ``filename``
(default: the last part of the URL's path), executable when ``executable``
is true. ``filename`` is a plain name: no folders (``directory`` places it).
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.parse
from collections.abc import Mapping
from typing import Any, BinaryIO, ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.nodes import MappingNode
from pipeline.elements.sources.base import SourceContext
from pipeline.elements.sources.downloadable import DownloadableSource
from pipeline.elements.sources.helpers import resolve_alias
from pipeline.elements.staging import store_stream
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory, FileNode

__all__ = ["RemoteSource"]

# BuildStream's booleans: these four spellings only.
_TRUE = ("true", "True")
_FALSE = ("false", "False")


class RemoteSource(DownloadableSource):
    """One file by URL; ``ref`` is its sha256."""

    kind: ClassVar[str] = "remote"
    option_keys: ClassVar[tuple[str, ...]] = ("filename", "executable")
    noun: ClassVar[str] = "file"

    @property
    def filename(self) -> str:
        """The staged file's name."""
        return str(self.options["filename"])

    @property
    def executable(self) -> bool:
        """Whether the staged file is executable."""
        return bool(self.options["executable"])

    @classmethod
    def load_options(cls, node: MappingNode, ctx: SourceContext) -> dict[str, Any]:
        name_node = node.get_scalar("filename")
        if name_node is not None and name_node.value is not None:
            filename = ctx.variables.expand_node(name_node)
            where = name_node
        else:
            # As bst: the basename of the URL (alias resolved), query and all
            # for a plain path; remex drops a query or fragment, which bst's
            # os.path.basename would keep in the name.
            url_node = node.require_str("url")
            url = resolve_alias(ctx.variables.expand_node(url_node), ctx.aliases)
            filename = posixpath.basename(urllib.parse.urlsplit(url).path)
            where = url_node
        if not filename or filename in (".", "..") or "/" in filename or "\0" in filename:
            raise where.error(
                f"filename {filename!r} must be a plain file name (no folders; 'directory' "
                "says where the file goes)",
                field=node.child_path("filename"),
            )
        executable = False
        exec_node = node.get_scalar("executable")
        if exec_node is not None and exec_node.value is not None:
            value = ctx.variables.expand_node(exec_node)
            if value not in _TRUE + _FALSE:
                raise exec_node.error(f"expected a boolean (true or false), got {value!r}")
            executable = value in _TRUE
        return {"filename": filename, "executable": executable}

    def content_key(self) -> str:
        return json.dumps([self.ref, self.filename, self.executable])

    @classmethod
    def stage_file(cls, cas: LocalCas, f: BinaryIO, options: Mapping[str, Any], url: str) -> Digest:
        size = os.fstat(f.fileno()).st_size - f.tell()
        digest = store_stream(cas, f, size)
        node = FileNode(
            name=str(options["filename"]), digest=digest, is_executable=bool(options["executable"])
        )
        return cas.put_message(Directory(files=[node]))
