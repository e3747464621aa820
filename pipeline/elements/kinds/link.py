"""``link``: another name for an element or a junction (``config: target:``).

A link is resolved when the project is loaded: depending on it, building
it, or using it in a ``link.bst:element.bst`` path means its target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.elements.kinds.base import Kind, KindContext, Recipe

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["LinkKind"]


class LinkKind(Kind):
    """``kind: link``."""

    name: ClassVar[str] = "link"
    takes_sources: ClassVar[bool] = False
    builds: ClassVar[bool] = False

    def configure(self, ctx: KindContext) -> None:
        ctx.config.validate_keys(("target",))

    def key_config(self) -> dict[str, Any]:
        return {}

    def recipe(self, element: Element) -> Recipe:
        raise AssertionError(f"link {element.name} is not built")
