"""``filter``: part of one dependency's files, chosen by split domain.

As BuildStream's filter: exactly one build dependency, which is not also a
runtime dependency; of its own files (not its dependencies'), those in the
``include`` domains (all its domains when empty), not in an ``exclude``
domain, and with ``include-orphans`` those in no domain. With
``pass-integration`` the dependency's integration commands become the
filter's (before its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.elements.errors import LoadError
from pipeline.elements.kinds.base import (
    Kind,
    KindContext,
    Recipe,
    StagedDependency,
    check_domains,
    get_bool,
    get_str_list,
    split_select,
)
from pipeline.elements.nodes import MappingNode

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["FilterKind"]


class FilterKind(Kind):
    """``kind: filter``."""

    name: ClassVar[str] = "filter"
    takes_sources: ClassVar[bool] = False

    def __init__(self) -> None:
        self.include: list[str] = []
        self.exclude: list[str] = []
        self.orphans = False
        self.pass_integration = False
        self._config: MappingNode | None = None

    def configure(self, ctx: KindContext) -> None:
        config = ctx.config
        config.validate_keys(("include", "exclude", "include-orphans", "pass-integration"))
        self.include = get_str_list(config, "include")
        self.exclude = get_str_list(config, "exclude")
        self.orphans = get_bool(config, "include-orphans")
        self.pass_integration = get_bool(config, "pass-integration")
        build = [dep for dep in ctx.dependencies if dep.build]
        if len(build) != 1:
            raise ctx.node.error(
                f"a filter element must have exactly 1 build dependency, it has {len(build)}"
                + (f" ({', '.join(d.element.name for d in build)})" if build else ""),
                field="depends",
            )
        source = build[0]
        if source.runtime:
            raise LoadError(
                "a filter element's build dependency must not also be a runtime dependency",
                file=source.mark.file,
                line=source.mark.line,
                field=source.field,
            )
        known = set(source.element.split_rules)
        for key, domains in (("include", self.include), ("exclude", self.exclude)):
            check_domains(config, key, domains, known, f"{source.element.name}")
        self._config = config

    def key_config(self) -> dict[str, Any]:
        return {
            "include": sorted(self.include),
            "exclude": sorted(self.exclude),
            "orphans": self.orphans,
        }

    def integration_commands(self, element: Element) -> list[str]:
        own = super().integration_commands(element)
        if not self.pass_integration:
            return own
        return [*element.build_dependencies[0].integration_commands, *own]

    def recipe(self, element: Element) -> Recipe:
        assert self._config is not None
        source = element.build_dependencies[0]
        select = split_select(
            self.name, self._config, source, self.include, self.exclude, self.orphans
        )
        return Recipe(dependencies=[StagedDependency(source, select=select)])
