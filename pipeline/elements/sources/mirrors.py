"""Source mirrors (project.conf ``mirrors``) and the order URLs are tried in.

BuildStream 2's format: a list of mirrors, each with a ``name`` and, for the
default mirror kind, ``aliases``: alias -> list of URL prefixes::

    mirrors:
    - name: middle-earth
      aliases:
        foo: ["https://mirror.example/foo/", "https://mirror2.example/foo/"]

For a URL ``alias:rest`` whose alias the project declares, the candidates are
(BuildStream's ``Project.get_alias_uris``): every mirror's prefixes for the
alias in the order the mirrors are listed, with the default mirror's moved to
the front (the user's choice, or else the first mirror), then the alias's own
value. A URL without a declared alias has only itself.

Mirror plugins (``kind:`` other than ``default``) are BuildStream plugins,
which remex does not run: they are refused when the project loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.elements.nodes import MappingNode, SequenceNode

__all__ = ["SourceMirror", "load_mirrors", "url_candidates"]

_MIRROR_KEYS = ("name", "kind", "aliases")


@dataclass(frozen=True)
class SourceMirror:
    """One mirror: its name and, per alias, the URL prefixes it offers (in order)."""

    name: str
    aliases: Mapping[str, tuple[str, ...]]


def load_mirrors(node: SequenceNode | None) -> tuple[SourceMirror, ...]:
    """project.conf ``mirrors``, checked.

    Raises:
        LoadError: not a list of mappings, a missing or repeated name, an
            unknown key, a mirror plugin kind, aliases not a mapping of lists
            of strings; at the file, line and field.
    """
    if node is None:
        return ()
    mirrors: list[SourceMirror] = []
    seen: set[str] = set()
    for item in node.items:
        if not isinstance(item, MappingNode):
            raise item.error(f"expected a mapping describing a mirror, got {item.describe()}")
        kind = item.get_scalar("kind")
        if kind is not None and kind.value not in (None, "default"):
            raise kind.error(
                f"source mirror kind {kind.value!r} is a BuildStream plugin, which remex does "
                "not run (only mirrors with 'aliases' are supported)"
            )
        item.validate_keys(_MIRROR_KEYS)
        name_node = item.require_str("name")
        name = name_node.as_str()
        if name in seen:
            raise name_node.error(f"a mirror named {name!r} is already declared")
        seen.add(name)
        aliases_node = item.get_mapping("aliases")
        if aliases_node is None:
            raise item.error("missing required key 'aliases'", field=item.child_path("aliases"))
        aliases: dict[str, tuple[str, ...]] = {}
        for alias, value in aliases_node.entries.items():
            if not isinstance(value, SequenceNode):
                raise value.error(
                    f"expected a list of URL prefixes for alias {alias!r}, got {value.describe()}"
                )
            aliases[alias] = tuple(n.as_str() for n in aliases_node.get_str_list(alias) or ())
        mirrors.append(SourceMirror(name=name, aliases=aliases))
    return tuple(mirrors)


def url_candidates(
    url: str,
    aliases: Mapping[str, str],
    mirrors: Sequence[SourceMirror],
    default_mirror: str | None,
) -> list[str]:
    """The URLs to try for ``url`` as written, in BuildStream's order (see the module)."""
    alias, sep, rest = url.partition(":")
    if not sep or alias not in aliases:
        return [url]
    prefixes: list[str] = []
    chosen = default_mirror or (mirrors[0].name if mirrors else None)
    for mirror in mirrors:
        offered = list(mirror.aliases.get(alias, ()))
        prefixes = offered + prefixes if mirror.name == chosen else prefixes + offered
    prefixes.append(aliases[alias])
    candidates: list[str] = []
    for prefix in prefixes:
        candidate = prefix + rest
        if candidate not in candidates:  # a mirror may repeat the alias's value
            candidates.append(candidate)
    return candidates
