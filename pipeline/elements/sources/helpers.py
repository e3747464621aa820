"""What several source kinds share: project paths, URL aliases, refs, ``directory``.

Also the names of BuildStream 2.8's source kinds that remex does not
implement, so that a project using one is told where that kind comes from.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import posixpath
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from pipeline.elements.nodes import MappingNode, ScalarNode

__all__ = [
    "BST_PLUGINS_SOURCE_KINDS",
    "COMMON_KEYS",
    "NETWORK_SCHEMES",
    "file_url_path",
    "loading_for_tracking",
    "optional_ref",
    "project_path",
    "require_ref",
    "resolve_alias",
    "sha256_of",
    "source_directory",
]

#: Keys every source may have, whatever its kind (BuildStream's COMMON_CONFIG_KEYS).
COMMON_KEYS = ("kind", "directory", "provenance")
#: The source kinds buildstream-plugins 2.8.0 declares (its entry points; the
#: 2.8.0 wheel names a ``zip`` module it does not ship).
BST_PLUGINS_SOURCE_KINDS = ("bzr", "cargo", "docker", "git", "patch", "pip", "zip")


def resolve_alias(url: str, aliases: Mapping[str, str]) -> str:
    """``alias:rest`` -> the alias's value + ``rest``; other URLs unchanged."""
    alias, sep, rest = url.partition(":")
    if sep and alias in aliases:
        return aliases[alias] + rest
    return url


def project_path(project_dir: Path, relative: str, node: ScalarNode) -> Path:
    """A path inside the project, checked as BuildStream checks project paths.

    It must be relative, not start with ``..``, not be a symlink, exist, and
    (symlinks in its folders resolved) stay inside the project folder.

    Raises:
        LoadError: at ``node``, saying which rule was broken.
    """
    pure = Path(relative)
    if pure.is_absolute():
        raise node.error(f"path {relative!r} must be relative to the project folder")
    if pure.parts and pure.parts[0] == "..":
        raise node.error(f"path {relative!r} must not start with '..'")
    full = project_dir / pure
    if full.is_symlink():
        raise node.error(f"path {relative!r} must not be a symlink")
    try:
        resolved = full.resolve(strict=True)
    except FileNotFoundError:
        raise node.error(f"path {relative!r} does not exist in the project folder") from None
    except OSError as exc:
        raise node.error(f"path {relative!r} cannot be resolved: {exc.strerror}") from None
    root = project_dir.resolve()
    if resolved != root and root not in resolved.parents:
        raise node.error(f"path {relative!r} leads outside the project folder")
    if not (resolved.is_dir() or resolved.is_file()):
        raise node.error(f"path {relative!r} is not a regular file or folder")
    return resolved


def source_directory(node: MappingNode) -> str:
    """The source's ``directory``, normalised ("" = the top of the sources).

    Raises:
        LoadError: it is absolute or leaves the source folder.
    """
    scalar = node.get_scalar("directory")
    if scalar is None or scalar.value is None:
        return ""
    value = scalar.value
    if value.startswith("/") or "\0" in value:
        raise scalar.error(f"directory {value!r} must be a relative path")
    normal = posixpath.normpath(value)
    if normal == ".." or normal.startswith("../"):
        raise scalar.error(f"directory {value!r} must stay inside the source folder")
    return "" if normal == "." else normal


def require_ref(node: MappingNode) -> ScalarNode:
    """The source's ``ref``; remex builds only what a ref pins.

    Raises:
        LoadError: ``ref`` is missing or null.
    """
    ref_node = node.get_scalar("ref")
    if ref_node is None or ref_node.value is None:
        raise node.error(
            "missing required key 'ref' (remex does not track sources: write the ref)",
            field=node.child_path("ref"),
        )
    return ref_node


_TRACKING: contextvars.ContextVar[bool] = contextvars.ContextVar("tracking", default=False)


@contextlib.contextmanager
def loading_for_tracking() -> Iterator[None]:
    """Load sources that have a ``track`` but no ``ref`` yet (``remex source
    track``): inside this block :func:`optional_ref` lets them load unresolved."""
    token = _TRACKING.set(True)
    try:
        yield
    finally:
        _TRACKING.reset(token)


def optional_ref(node: MappingNode, *, tracking: bool) -> ScalarNode | None:
    """The source's ``ref``, or None while loading for tracking a source that
    can track (``tracking``) and has no ref yet.

    Raises:
        LoadError: ``ref`` is missing or null otherwise (as :func:`require_ref`).
    """
    ref_node = node.get_scalar("ref")
    if (ref_node is None or ref_node.value is None) and tracking and _TRACKING.get():
        return None
    return require_ref(node)


NETWORK_SCHEMES = frozenset({"http", "https", "ftp"})
"""URL schemes of sources downloaded by workers (the others are local files)."""


def file_url_path(url: str, node: ScalarNode, refusal: str) -> Path:
    """The local path of a ``file://`` URL.

    Raises:
        LoadError: at ``node``: another scheme (``refusal`` says what is
            supported), a host, or a relative path.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file":
        raise node.error(f"{refusal}; got {url!r}")
    if parts.netloc not in ("", "localhost"):
        raise node.error(f"file:// URL {url!r} names a host; only local files are supported")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise node.error(f"file:// URL {url!r} must hold an absolute path")
    return Path(path)


def sha256_of(f: IO[bytes]) -> str:
    """The hex sha256 of what is left to read in ``f``."""
    hasher = hashlib.sha256()
    while chunk := f.read(1 << 20):
        hasher.update(chunk)
    return hasher.hexdigest()
