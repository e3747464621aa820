"""Cache keys: the SHA-256 of a canonical JSON description of what makes an artifact.

The description holds the key format version, the kind, the expanded
configuration as the kind gives it (:meth:`Kind.key_config`), the public data
(integration commands and split rules change what dependents build), for
elements that run commands the
environment (less ``environment-nocache`` names) and the sandbox's
``build-os``/``build-arch`` (and ``build-uid``/``build-gid`` when set), the
project's ``fatal-warnings`` (when any), each source's kind, directory and content key,
and the names and cache keys of the staged dependencies (the build
dependencies and their runtime closure, in staging order; BuildStream keys
every kind on this same list). Mapping order and YAML layout never enter it:
the JSON is written with sorted keys and no spaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from pipeline import jsonenc

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["KEY_FORMAT_VERSION", "cache_key", "canonical_json", "key_description", "key_text"]

KEY_FORMAT_VERSION = 1
"""Bump when the description changes, so that old artifacts are not reused."""


# One encoder for every key, made once: keys are compared as text.
canonical_json = jsonenc.encoder(sort_keys=True, ensure_ascii=False)
"""JSON with sorted keys and no whitespace: equal values give equal text."""


def key_description(element: Element, *, with_dependencies: bool = True) -> dict[str, Any]:
    """Everything the element's cache key covers, as a JSON-able dict
    (``with_dependencies=False``: all but ``dependencies``).

    Raises:
        ValueError: a staged dependency has no cache key yet.
    """
    description: dict[str, Any] = {
        "remex-key-format": KEY_FORMAT_VERSION,
        "kind": element.kind,
        "config": element.key_config(),
        "sources": [source.key_description() for source in element.sources],
    }
    if with_dependencies:
        description["dependencies"] = [
            {"element": dep.name, "cache_key": dep.cache_key}
            for dep in element.staged_dependencies()
        ]
    if element.fatal_warnings:
        # As BuildStream: a fatal warning can fail a build that would pass.
        description["fatal-warnings"] = list(element.fatal_warnings)
    if element.public:
        # Integration commands and split rules change what dependents build.
        description["public"] = element.public
    if element.runs_commands:
        description["environment"] = element.cache_environment()
        sandbox: dict[str, Any] = {"build-os": element.build_os, "build-arch": element.build_arch}
        # Only when set, as BuildStream, so that other keys do not change.
        if element.build_uid is not None:
            sandbox["build-uid"] = element.build_uid
        if element.build_gid is not None:
            sandbox["build-gid"] = element.build_gid
        description["sandbox"] = sandbox
    return description


def cache_key(element: Element) -> str:
    """The element's cache key: 64 hex digits."""
    return hashlib.sha256(key_text(element).encode("utf-8")).hexdigest()


def key_text(element: Element) -> str:
    """``canonical_json(key_description(element))``, made in parts: the public
    data most elements share (one object, see :attr:`Element.public`) is
    encoded once, and each dependency's entry once per dependency, not once
    per dependent.

    Raises:
        ValueError: a staged dependency has no cache key yet.
    """
    description = key_description(element, with_dependencies=False)
    description["dependencies"] = None  # its text is made below
    parts = []
    # The top-level names are plain ASCII: '"name":' is what the encoder writes.
    for name in sorted(description):
        value = description[name]
        if name == "dependencies":
            text = "[" + ",".join(_dependency_text(d) for d in element.staged_dependencies()) + "]"
        elif name == "public":
            text = _SHARED_TEXTS.text(value)
        elif name in _FLAT_MAPPINGS:
            # Equal from element to element, in new objects: known by value.
            text = _FLAT_TEXTS.text((name, *value.items()), value)
        elif name in _FLAT_SCALARS:
            text = _FLAT_TEXTS.text((name, value), value)
        elif name == "sources" and not value:
            text = "[]"
        else:
            text = canonical_json(value)
        parts.append(f'"{name}":{text}')
    return "{" + ",".join(parts) + "}"


# Parts of a key description that are flat (their values strings or
# integers, never booleans: no two values with equal items encode apart).
_FLAT_MAPPINGS = frozenset(("environment", "sandbox"))
_FLAT_SCALARS = frozenset(("kind", "remex-key-format"))


def _dependency_text(dependency: Element) -> str:
    """``canonical_json({"element": name, "cache_key": key})`` of a dependency,
    made once per element (it is in the key of every dependent)."""
    text = dependency.key_entry_text
    if text is None:
        text = canonical_json({"element": dependency.name, "cache_key": dependency.cache_key})
        dependency.key_entry_text = text
    return text


class _SharedTexts:
    """Canonical JSON of values that many elements share (by identity).

    An entry keeps its value alive, so an id is never reused while it is
    here; a few entries at most (one per kind and variables layer), cleared
    when full, as values not shared would only pass through."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._texts: dict[int, tuple[Any, str]] = {}

    def text(self, value: Any) -> str:
        hit = self._texts.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        text = canonical_json(value)
        if len(self._texts) >= self._size:
            self._texts.clear()
        self._texts[id(value)] = (value, text)
        return text


# Values are read-only once an element holds them (Element.public says so).
_SHARED_TEXTS = _SharedTexts(64)


class _FlatTexts:
    """Canonical JSON of flat values that many elements have equal (the
    environment, the sandbox, the kind), by a hashable form of the value:
    a few entries at most (one per distinct value), cleared when full."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._texts: dict[Hashable, str] = {}

    def text(self, key: Hashable, value: Any) -> str:
        text = self._texts.get(key)
        if text is None:
            text = canonical_json(value)
            if len(self._texts) >= self._size:
                self._texts.clear()
            self._texts[key] = text
        return text


_FLAT_TEXTS = _FlatTexts(256)
