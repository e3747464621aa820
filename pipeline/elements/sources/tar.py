"""``tar``: a tarball by URL (directly or through an alias); ``ref`` is its sha256.

As BuildStream's core ``tar``: ``base-dir`` (default ``*``, the first
top-level folder; "" for the whole archive) picks what is staged. A
``file://`` tarball is checked when the project loads and staged from the
disk; an http, https or ftp one is downloaded by a worker (see
:mod:`pipeline.elements.sources.downloadable`).
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping
from typing import Any, BinaryIO, ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.sources.downloadable import ArchiveSource, StageRefused
from pipeline.elements.staging import UnsafeArchiveError, tree_from_tar

__all__ = ["TarSource"]


class TarSource(ArchiveSource):
    """A tarball by URL; ``ref`` is its sha256."""

    kind: ClassVar[str] = "tar"
    noun: ClassVar[str] = "tarball"

    @classmethod
    def stage_file(cls, cas: LocalCas, f: BinaryIO, options: Mapping[str, Any], url: str) -> Digest:
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tar:
                return tree_from_tar(cas, tar, str(options["base-dir"]))
        except UnsafeArchiveError as exc:
            raise StageRefused(str(exc)) from None
        except (tarfile.TarError, EOFError) as exc:
            raise StageRefused(f"cannot read the tarball: {exc}") from None
