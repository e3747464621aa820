"""``stack``: no files of its own; it gathers dependencies, each both build and runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.elements.kinds.base import Kind, KindContext, Recipe, require_dependency_types

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["StackKind"]


class StackKind(Kind):
    """``kind: stack``."""

    name: ClassVar[str] = "stack"
    takes_sources: ClassVar[bool] = False

    def configure(self, ctx: KindContext) -> None:
        if ctx.config.entries:
            raise ctx.config.error("stack elements take no config")
        require_dependency_types(self.name, ctx.dependencies, build=True, runtime=True)

    def key_config(self) -> dict[str, Any]:
        return {}

    def recipe(self, element: Element) -> Recipe:
        return Recipe()
