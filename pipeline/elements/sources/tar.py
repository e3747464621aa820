"""``tar``: a tarball by URL (directly or through an alias); ``ref`` is its sha256.

As BuildStream's core ``tar``: ``base-dir`` (default ``*``, the first
top-level folder; "" for the whole archive) picks what is staged. A
``file://`` tarball is checked when the project loads and staged from the
disk; an http, https or ftp one is downloaded by a worker (see
:mod:`pipeline.elements.sources.downloadable`).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Mapping
from typing import Any, BinaryIO, ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.nodes import MappingNode
from pipeline.elements.sources.base import SourceContext
from pipeline.elements.sources.downloadable import DownloadableSource, StageRefused
from pipeline.elements.staging import UnsafeArchiveError, tree_from_tar

__all__ = ["TarSource"]


class TarSource(DownloadableSource):
    """A tarball by URL; ``ref`` is its sha256."""

    kind: ClassVar[str] = "tar"
    option_keys: ClassVar[tuple[str, ...]] = ("base-dir",)
    noun: ClassVar[str] = "tarball"

    @property
    def base_dir(self) -> str:
        """The ``base-dir`` glob ("" = the whole archive)."""
        return str(self.options["base-dir"])

    @classmethod
    def load_options(cls, node: MappingNode, ctx: SourceContext) -> dict[str, Any]:
        base_node = node.get_scalar("base-dir")
        base_dir = "*"  # BuildStream's default: the first top-level folder
        if base_node is not None:
            base_dir = ctx.variables.expand(
                base_node.value or "", mark=base_node.mark, field=base_node.path
            )
        return {"base-dir": base_dir}

    def content_key(self) -> str:
        return json.dumps([self.ref, self.base_dir])

    @classmethod
    def stage_file(cls, cas: LocalCas, f: BinaryIO, options: Mapping[str, Any], url: str) -> Digest:
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tar:
                return tree_from_tar(cas, tar, str(options["base-dir"]))
        except UnsafeArchiveError as exc:
            raise StageRefused(str(exc)) from None
        except (tarfile.TarError, EOFError) as exc:
            raise StageRefused(f"cannot read the tarball: {exc}") from None
