"""The base of the kinds that are one downloaded file pinned by its sha256
(``tar``, ``zip``, ``remote``), as BuildStream's ``DownloadableFileSource``.

``url`` may use a project alias; ``ref`` is the file's sha256. A ``file://``
URL is checked against the ref when the project loads and staged by the
submitting host, from the disk. A network URL (http, https, ftp) is keyed by
its ref and fetched by a worker (:meth:`fetch`, through
:func:`~pipeline.elements.sources.download.download`), trying the URL's
candidates (mirrors, then the alias's own value) in order.

A kind says which keys it adds (:meth:`load_options`), what of them changes
the staged tree (:meth:`content_key`), and how a verified file becomes a tree
(:meth:`stage_file`).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.errors import SourceError
from pipeline.elements.nodes import MappingNode, Mark
from pipeline.elements.sources.base import (
    FetchContext,
    FetchRequest,
    NetworkSettings,
    Source,
    SourceContext,
    source_cache_key,
)
from pipeline.elements.sources.download import DownloadOrigin, download, redact_url
from pipeline.elements.sources.helpers import (
    COMMON_KEYS,
    NETWORK_SCHEMES,
    file_url_path,
    optional_ref,
    resolve_alias,
    sha256_of,
    source_directory,
)

__all__ = ["ArchiveSource", "DownloadableSource", "StageRefused"]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_INDEX_RE = re.compile(r"sources\[(\d+)\]")
# BuildStream's DownloadableFileSource keys that only feed its SourceInfo
# reports: accepted, they change nothing that is built.
_REPORT_ONLY_KEYS = ("version", "version-guess-pattern")


class StageRefused(Exception):
    """A downloaded file cannot become a tree (a hostile or broken archive); the
    message says why, without the source's name (the caller adds it)."""


class DownloadableSource(Source):
    """One file by URL, pinned by its sha256 ``ref``.

    Attributes:
        url_written: ``url`` as written, variables expanded, alias not resolved
            (the source cache key: the same whatever the alias points at).
        url: the URL with the alias resolved.
        urls: the candidates to download from, in order.
        path: the local file of a ``file://`` URL; None for a network URL.
        ref: the file's sha256.
        options: the kind's own settings (JSON values), sent to the worker.
    """

    #: The kind's own keys, beside ``url`` and ``ref``.
    option_keys: ClassVar[tuple[str, ...]] = ()
    #: What the file is, for messages ("tarball").
    noun: ClassVar[str] = "file"

    def __init__(
        self,
        *,
        url_written: str,
        url: str,
        urls: list[str],
        path: Path | None,
        ref: str,
        options: dict[str, Any],
        directory: str,
        mark: Mark,
        field: str,
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.url_written = url_written
        self.url = url
        self.urls = urls
        self.path = path
        self.ref = ref
        self.options = options

    # --- what a kind defines ------------------------------------------------

    @classmethod
    @abstractmethod
    def load_options(cls, node: MappingNode, ctx: SourceContext) -> dict[str, Any]:
        """The kind's own settings from ``node`` (JSON values).

        Raises:
            LoadError: a bad value; names the file, line and field.
        """

    @classmethod
    @abstractmethod
    def stage_file(cls, cas: LocalCas, f: BinaryIO, options: Mapping[str, Any], url: str) -> Digest:
        """Store the verified file ``f`` (at its start) as a tree in ``cas``.

        Raises:
            StageRefused: a hostile or unreadable file; the message says why.
        """

    # --- shared behaviour -----------------------------------------------------

    @classmethod
    def load(cls, node: MappingNode, ctx: SourceContext) -> DownloadableSource:
        """A ``file://`` file must exist and its sha256 must be ``ref``."""
        directory = source_directory(node)
        node.validate_keys(("url", "ref", *_REPORT_ONLY_KEYS, *cls.option_keys, *COMMON_KEYS))
        for key in _REPORT_ONLY_KEYS:
            node.get_scalar(key)  # a string if given
        url_node = node.require_str("url")
        url_written = ctx.variables.expand_node(url_node)
        url = resolve_alias(url_written, ctx.aliases)
        remote = urllib.parse.urlsplit(url).scheme in NETWORK_SCHEMES
        path = None if remote else file_url_path(
            url, url_node, f"only file://, http(s):// and ftp:// URLs (directly or through a "
            f"project alias) are supported for {cls.kind} sources"
        )  # fmt: skip
        # No ref only while ``remex source track`` loads the project: track()
        # is all that is asked of the source then.
        ref_node = optional_ref(node, tracking=True)
        ref = "" if ref_node is None else ctx.variables.expand_node(ref_node).lower()
        if ref_node is not None and not _SHA256_RE.fullmatch(ref):
            raise ref_node.error(f"expected the {cls.noun}'s sha256 (64 hex digits), got {ref!r}")
        options = cls.load_options(node, ctx)
        if path is not None and ref_node is not None:
            if not path.is_file():
                raise url_node.error(f"{cls.noun} not found: {path}")
            try:
                with open(path, "rb") as f:
                    actual = sha256_of(f)
            except OSError as exc:
                raise url_node.error(f"cannot read {cls.noun} {path}: {exc.strerror}") from exc
            if actual != ref:
                raise ref_node.error(
                    f"sha256 mismatch for {url}: the ref is {ref} but the file's sha256 is {actual}"
                )
        urls = [url] if path is not None else ctx.url_candidates(url_written)
        return cls(
            url_written=url_written,
            url=url,
            urls=urls,
            path=path,
            ref=ref,
            options=options,
            directory=directory,
            mark=node.mark,
            field=node.path,
        )

    def cache_unique(self) -> list[Any]:
        """The source cache key's content: the URL as written, the ref, the options."""
        return [self.url_written, self.ref, *(self.options[k] for k in self.option_keys)]

    def fetch_request(self, element: str, index: int, file: str) -> FetchRequest | None:
        """None for a ``file://`` file (the submitter stages it); else the download."""
        if self.path is not None:
            return None
        return FetchRequest(
            kind=self.kind,
            key=source_cache_key(self.kind, self.cache_unique()),
            element=element,
            index=index,
            field=self.field,
            file=file,
            urls=list(self.urls),
            config={"ref": self.ref, **self.options},
        )

    @classmethod
    def fetch(cls, request: FetchRequest, ctx: FetchContext) -> Digest:
        """Download the first candidate whose sha256 is the ref; store it as a tree."""
        origin = DownloadOrigin.of(request)
        got = download(
            request["urls"], ctx, name=request["key"], sha256=request["config"]["ref"],
            origin=origin,
        )  # fmt: skip
        try:
            with open(got.path, "rb") as f:
                return cls.stage_file(ctx.cas, f, request["config"], got.url)
        except (StageRefused, OSError) as exc:
            raise SourceError(
                f"{origin.describe()}: {cls.noun} {redact_url(got.url)}: {exc}",
                file=origin.file or None,
                field=origin.field or None,
            ) from None
        finally:
            got.path.unlink(missing_ok=True)

    def stage(self, cas: LocalCas, workdir: Path, network: NetworkSettings | None = None) -> Digest:
        """A ``file://`` file from the disk (checked again); a network one as a worker does."""
        if self.path is None:
            request = self.fetch_request("", self._index(), self.mark.file or "")
            assert request is not None
            ctx = FetchContext(
                cas=cas,
                workdir=workdir / "fetch",
                cache_dir=workdir / "cache",
                network=network or NetworkSettings(),
            )
            return self.fetch(request, ctx)
        try:
            with open(self.path, "rb") as f:
                # Hash then read the same open file, so what is staged is what was checked.
                actual = sha256_of(f)
                if actual != self.ref:
                    raise self._error(
                        f"{self.noun} {self.url} changed since the project was loaded: "
                        f"its sha256 is now {actual}, the ref is {self.ref}"
                    )
                f.seek(0)
                return self.stage_file(cas, f, self.options, self.url)
        except StageRefused as exc:
            raise self._error(f"{self.noun} {self.url}: {exc}") from None
        except OSError as exc:
            raise self._error(f"cannot read {self.noun} {self.url}: {exc}") from exc

    def track(self, ctx: FetchContext) -> str | None:
        """The sha256 of what the URL serves now (a ``file://`` file: of the file)."""
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    return sha256_of(f)
            except OSError as exc:
                raise self._error(f"cannot read {self.noun} {self.url}: {exc}") from exc
        origin = DownloadOrigin(
            element="", index=self._index(), field=self.field, file=self.mark.file or "",
            kind=self.kind,
        )  # fmt: skip
        got = download(self.urls, ctx, name=f"track-{os.getpid()}", sha256=None, origin=origin)
        got.path.unlink(missing_ok=True)
        return got.sha256

    def _index(self) -> int:
        found = _INDEX_RE.search(self.field)
        return int(found.group(1)) if found else 0


class ArchiveSource(DownloadableSource):
    """An archive (``tar``, ``zip``) whose ``base-dir`` (default ``*``, the
    first top-level folder; "" for the whole archive) picks what is staged."""

    option_keys: ClassVar[tuple[str, ...]] = ("base-dir",)

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
