"""``junction``: a subproject, reached through the element's single source.

A junction builds nothing and cannot be depended on; its elements are named
``junction.bst:element.bst`` (nested: ``a.bst:b.bst:c.bst``) and build,
cache and check out like the project's own, under the subproject's name.
``config: options:`` sets the subproject's options (variables expanded with
the junction's); the loader (:mod:`pipeline.elements.project`) reads them
from :attr:`JunctionKind.options`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.elements.kinds.base import Kind, KindContext, Recipe

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["JunctionKind"]


class JunctionKind(Kind):
    """``kind: junction``."""

    name: ClassVar[str] = "junction"
    builds: ClassVar[bool] = False

    def __init__(self) -> None:
        self.options: dict[str, str] = {}

    def configure(self, ctx: KindContext) -> None:
        config = ctx.config
        config.validate_keys(
            (
                "options",
                "overrides",
                "aliases",
                "cache-junction-elements",
                "ignore-junction-remotes",
            ),
            unsupported=(),
        )
        if ctx.dependencies:
            dep = ctx.dependencies[0]
            raise ctx.node.error("a junction element cannot have dependencies", field=dep.field)
        overrides = config.get_mapping("overrides")
        if overrides is not None and overrides.entries:
            key = next(iter(overrides.entries))
            raise overrides.key_error(key, "junction overrides are not supported by remex")
        self.options = {
            name: ctx.variables.expand_node(value)
            for name, value in config.get_str_mapping("options").items()
        }

    def key_config(self) -> dict[str, Any]:
        return {"options": self.options}

    def recipe(self, element: Element) -> Recipe:
        raise AssertionError(f"junction {element.name} is not built")
