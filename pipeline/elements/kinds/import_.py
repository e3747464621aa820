"""``import``: the sources are the artifact, moved from ``config.source`` to ``config.target``.

No command runs; the element's dependencies are not staged (BuildStream's
import element stages nothing but its sources).
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.elements.kinds.base import Kind, KindContext, Recipe

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["ImportKind"]


class ImportKind(Kind):
    """``kind: import``."""

    name: ClassVar[str] = "import"

    def __init__(self) -> None:
        self.source = ""
        self.target = ""

    def configure(self, ctx: KindContext) -> None:
        ctx.config.validate_keys(("source", "target"))
        paths = []
        for key in ("source", "target"):
            node = ctx.config.require_str(key)
            value = ctx.variables.expand_node(node)
            if "\0" in value or ".." in value.split("/"):
                raise node.error(f"{key} {value!r} must be a path inside the sandbox")
            paths.append(posixpath.normpath("/" + value).strip("/"))
        self.source, self.target = paths

    def key_config(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target}

    def recipe(self, element: Element) -> Recipe:
        return Recipe(files_root=self.source, files_target=self.target)
