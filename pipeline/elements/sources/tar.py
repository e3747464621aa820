"""``tar``: a tarball by URL (directly or through an alias); ``ref`` is its sha256.

A ``file://`` tarball is checked against its ref when the project loads and
staged from the disk. A network URL (http, https, ftp) loads, keyed by its
ref as BuildStream keys it, so the project shows and keys; staging it is
refused with a clear error, as remex does not download sources yet.
"""

from __future__ import annotations

import json
import re
import tarfile
import urllib.parse
from pathlib import Path
from typing import ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.nodes import MappingNode, Mark
from pipeline.elements.sources.base import Source, SourceContext
from pipeline.elements.sources.helpers import (
    COMMON_KEYS,
    NETWORK_SCHEMES,
    file_url_path,
    require_ref,
    resolve_alias,
    sha256_of,
    source_directory,
)
from pipeline.elements.staging import UnsafeArchiveError, tree_from_tar

__all__ = ["TarSource"]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# BuildStream's DownloadableFileSource keys that only feed its SourceInfo
# reports: accepted, they change nothing that is built.
_REPORT_ONLY_KEYS = ("version", "version-guess-pattern")


class TarSource(Source):
    """A tarball fetched by ``file://`` URL; ``ref`` is its sha256."""

    kind: ClassVar[str] = "tar"

    def __init__(
        self,
        *,
        url: str,
        path: Path | None,
        ref: str,
        base_dir: str,
        directory: str,
        mark: Mark,
        field: str,
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.url = url
        self.path = path
        self.ref = ref
        self.base_dir = base_dir

    @classmethod
    def load(cls, node: MappingNode, ctx: SourceContext) -> TarSource:
        """The tarball must exist and its sha256 must be ``ref``."""
        directory = source_directory(node)
        node.validate_keys(("url", "ref", "base-dir", *_REPORT_ONLY_KEYS, *COMMON_KEYS))
        for key in _REPORT_ONLY_KEYS:
            node.get_scalar(key)  # a string if given
        url_node = node.require_str("url")
        url = resolve_alias(ctx.variables.expand_node(url_node), ctx.aliases)
        remote = urllib.parse.urlsplit(url).scheme in NETWORK_SCHEMES
        path = None if remote else file_url_path(
            url, url_node, "only file:// and network URLs (directly or through a project alias) "
            "are supported for tar sources"
        )  # fmt: skip
        ref_node = require_ref(node)
        ref = ctx.variables.expand_node(ref_node).lower()
        if not _SHA256_RE.fullmatch(ref):
            raise ref_node.error(f"expected the tarball's sha256 (64 hex digits), got {ref!r}")
        base_node = node.get_scalar("base-dir")
        base_dir = "*"  # BuildStream's default: the first top-level folder
        if base_node is not None:
            base_dir = ctx.variables.expand(
                base_node.value or "", mark=base_node.mark, field=base_node.path
            )
        if path is None:
            # A network tarball: its ref is its key, as in BuildStream, so the
            # project loads and shows; fetching it is refused when it is staged.
            return cls(url=url, path=None, ref=ref, base_dir=base_dir, directory=directory,
                       mark=node.mark, field=node.path)  # fmt: skip
        if not path.is_file():
            raise url_node.error(f"tarball not found: {path}")
        try:
            with open(path, "rb") as f:
                actual = sha256_of(f)
        except OSError as exc:
            raise url_node.error(f"cannot read tarball {path}: {exc.strerror}") from exc
        if actual != ref:
            raise ref_node.error(
                f"sha256 mismatch for {url}: the ref is {ref} but the file's sha256 is {actual}"
            )
        return cls(
            url=url,
            path=path,
            ref=ref,
            base_dir=base_dir,
            directory=directory,
            mark=node.mark,
            field=node.path,
        )

    def content_key(self) -> str:
        return json.dumps([self.ref, self.base_dir])

    def stage(self, cas: LocalCas, workdir: Path) -> Digest:
        if self.path is None:
            raise self._error(
                f"cannot fetch {self.url}: remex stages tar sources from file:// URLs only "
                "(download the tarball and point the project's alias at a file:// folder)"
            )
        try:
            with open(self.path, "rb") as f:
                # Hash then read the same open file, so what is staged is what was checked.
                actual = sha256_of(f)
                if actual != self.ref:
                    raise self._error(
                        f"tarball {self.url} changed since the project was loaded: "
                        f"its sha256 is now {actual}, the ref is {self.ref}"
                    )
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:*") as tar:
                    return tree_from_tar(cas, tar, self.base_dir)
        except UnsafeArchiveError as exc:
            raise self._error(f"tarball {self.url}: {exc}") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise self._error(f"cannot read tarball {self.url}: {exc}") from exc
