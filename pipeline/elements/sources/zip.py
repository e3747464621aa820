"""``zip``: a zip archive by URL (directly or through an alias); ``ref`` is its sha256.

The ``zip`` kind of BuildStream's plugin packages: ``base-dir`` (default
``*``: the first top-level folder, sorted; "" for the whole archive) picks
what is staged. Members are read into a tree, never extracted to disk; as
for tarballs, absolute paths, ``..`` components, names that are not UTF-8,
links out of the tree and encrypted members are refused.

Unix modes, when the archive was made on Unix, are kept as far as a REAPI
tree holds them: the owner's x bit makes a file executable, and a symlink
member stays a symlink. (BuildStream 1's ``zip`` extracted every file as
0644 and a symlink member as a file holding its target; remex keeps what
the archive says, as ``unzip`` does.)
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO, ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.sources.downloadable import ArchiveSource, StageRefused
from pipeline.elements.staging import (
    TreeBuilder,
    UnsafeArchiveError,
    find_base_dir,
    split_member_path,
    store_stream,
)

__all__ = ["ZipSource"]

_UNIX = 3  # ZipInfo.create_system of archives made on Unix
_MAX_LINK = 4096  # a symlink member's target is its content: keep it small
# The compression methods Python's zipfile reads (others: deflate64, PPMd ...).
_READABLE = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}


class ZipSource(ArchiveSource):
    """A zip archive by URL; ``ref`` is its sha256."""

    kind: ClassVar[str] = "zip"
    plugin_packages: ClassVar[frozenset[str]] = frozenset({"buildstream-plugins"})
    noun: ClassVar[str] = "zip archive"

    @classmethod
    def stage_file(cls, cas: LocalCas, f: BinaryIO, options: Mapping[str, Any], url: str) -> Digest:
        try:
            with zipfile.ZipFile(f) as archive:
                return _tree_from_zip(cas, archive, str(options["base-dir"]))
        except UnsafeArchiveError as exc:
            raise StageRefused(str(exc)) from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
            raise StageRefused(f"cannot read the zip archive: {exc}") from None
        except RuntimeError as exc:  # zipfile: an encrypted member, no password
            raise StageRefused(f"cannot read the zip archive: {exc}") from None


def _tree_from_zip(cas: LocalCas, archive: zipfile.ZipFile, base_dir: str) -> Digest:
    infos = archive.infolist()
    prefix: list[str] = []
    if base_dir:
        # find_base_dir reads names and folder-ness: give it the zip's as tar members.
        shadows = []
        for info in infos:
            shadow = tarfile.TarInfo(info.filename)
            shadow.type = tarfile.DIRTYPE if info.is_dir() else tarfile.REGTYPE
            shadows.append(shadow)
        prefix = find_base_dir(shadows, base_dir)
    builder = TreeBuilder(cas)
    for info in infos:
        parts = split_member_path(info.filename)
        if prefix:
            if len(parts) <= len(prefix) or parts[: len(prefix)] != prefix:
                continue
            parts = parts[len(prefix) :]
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"member {info.filename!r} is encrypted")
        if info.compress_type not in _READABLE:
            raise UnsafeArchiveError(
                f"member {info.filename!r} uses compression method {info.compress_type}, "
                f"which remex cannot read (it reads {', '.join(_READABLE.values())})"
            )
        mode = info.external_attr >> 16 if info.create_system == _UNIX else 0
        kind = stat.S_IFMT(mode)
        if info.is_dir() or kind == stat.S_IFDIR:
            if parts:
                builder.add_folder(parts)
        elif kind == stat.S_IFLNK:
            if info.file_size > _MAX_LINK:
                raise UnsafeArchiveError(f"symlink member {info.filename!r} is too long")
            target = archive.read(info).decode("utf-8", errors="surrogateescape")
            builder.add_symlink(parts, target)
        elif kind in (0, stat.S_IFREG):
            with archive.open(info) as stream:
                digest = store_stream(cas, stream, info.file_size)
            builder.add_file(parts, digest, bool(mode & stat.S_IXUSR))
        else:
            raise UnsafeArchiveError(
                f"member {info.filename!r} is a device, fifo or other special file"
            )
    return builder.finish()
