"""What project.conf says about sources, read once per project.

- ``sources: KIND: config: {...}``: defaults composed under every source of
  that kind (BuildStream's semantics: the source's own keys win, list
  directives apply; ``kind``, ``directory`` and ``provenance`` come from the
  source alone, as bst reads them before composing).
- ``plugins: [{..., sources: [KIND]}]``: source kinds declared from plugin
  packages (see :func:`pipeline.elements.plugins.declare_source_plugins`).
- ``source-provenance-attributes: {NAME: description}``: the keys a source's
  ``provenance`` may have (bst's defaults, ``homepage`` and
  ``issue-tracker``, unless the project names its own).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.elements.composition import assert_fully_composited, clone_mapping, compose
from pipeline.elements.nodes import MappingNode, ScalarNode
from pipeline.elements.plugins import SourcePluginDeclaration, declare_source_plugins

__all__ = ["DEFAULT_PROVENANCE_ATTRIBUTES", "ProjectSources"]

#: BuildStream 2.8's default ``source-provenance-attributes``.
DEFAULT_PROVENANCE_ATTRIBUTES = frozenset({"homepage", "issue-tracker"})
# Read from the source itself, never from project.conf defaults.
_SOURCE_ONLY_KEYS = ("kind", "directory", "provenance")


@dataclass(frozen=True)
class ProjectSources:
    """project.conf's source settings.

    Attributes:
        defaults: kind -> the ``config`` composed under each source of that kind.
        plugins: source kinds declared under ``plugins:``, by kind.
        provenance_attributes: the keys a source's ``provenance`` may have.
    """

    defaults: Mapping[str, MappingNode] = field(default_factory=dict)
    plugins: Mapping[str, SourcePluginDeclaration] = field(default_factory=dict)
    provenance_attributes: frozenset[str] = DEFAULT_PROVENANCE_ATTRIBUTES

    @classmethod
    def from_conf(cls, conf: MappingNode, project_dir: Path) -> ProjectSources:
        """Read ``sources``, ``plugins`` and ``source-provenance-attributes``.

        Raises:
            LoadError: a value of the wrong shape, ``kind``, ``directory`` or
                ``provenance`` in a kind's defaults, a plugin declaration
                that is wrong; names the file, line and field.
        """
        defaults: dict[str, MappingNode] = {}
        overrides = conf.get_mapping("sources")
        for kind in overrides or ():
            assert overrides is not None
            entry = overrides.get_mapping(kind)
            if entry is None:
                continue
            entry.validate_keys(("config",))
            config = entry.get_mapping("config")
            if config is None:
                continue
            for key in _SOURCE_ONLY_KEYS:
                if key in config:
                    raise config.key_error(
                        key,
                        f"{key!r} cannot be a project-wide default: BuildStream reads it "
                        "from each source only",
                    )
            defaults[kind] = config
        attributes = DEFAULT_PROVENANCE_ATTRIBUTES
        if "source-provenance-attributes" in conf:
            # As BuildStream: the project's own list replaces the defaults.
            attributes = frozenset(conf.get_str_mapping("source-provenance-attributes"))
        return cls(
            defaults=defaults,
            plugins=declare_source_plugins(conf.get("plugins"), project_dir),
            provenance_attributes=attributes,
        )

    def compose_defaults(self, kind: str, node: MappingNode) -> MappingNode:
        """``node`` with the kind's project-wide defaults composed under it.

        The result keeps ``node``'s mark and field path, so a problem with
        the source as a whole is reported at the source; a value that came
        from project.conf keeps the mark of where it was written there.

        Raises:
            LoadError: the two do not compose, or a list directive is left over.
        """
        defaults = self.defaults.get(kind)
        if defaults is None:
            return node
        base = clone_mapping(defaults, node.path)
        base.mark = node.mark
        composed = compose(base, node)
        assert_fully_composited(composed)
        return composed

    def check_provenance(self, node: MappingNode) -> None:
        """Check a source's ``provenance``: declared attributes, string values.

        Raises:
            LoadError: at the offending attribute.
        """
        provenance = node.get_mapping("provenance")
        if provenance is None:
            return
        for name, value in provenance.entries.items():
            if name not in self.provenance_attributes:
                raise provenance.key_error(
                    name,
                    f"provenance attribute {name!r} is not declared in project.conf "
                    "source-provenance-attributes (declared: "
                    f"{', '.join(sorted(self.provenance_attributes)) or 'none'})",
                )
            if not isinstance(value, ScalarNode):
                raise value.error(f"expected a string, got {value.describe()}")
