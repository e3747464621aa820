"""Element kinds: one class per kind, one file per class, found by name here.

Adding a kind is adding a file in this package that defines a
:class:`~pipeline.elements.kinds.base.Kind` subclass and listing it in
``_CORE``; nothing else in remex switches on a kind's name (see
``docs/elements.md``). BuildElement kinds of plugin packages are made by
:func:`~pipeline.elements.kinds.manual.build_element_kind` from the
package's YAML defaults.
"""

from __future__ import annotations

from pipeline.elements.kinds.base import Kind, KindContext, Recipe, StagedDependency
from pipeline.elements.kinds.compose import ComposeKind
from pipeline.elements.kinds.filter import FilterKind
from pipeline.elements.kinds.import_ import ImportKind
from pipeline.elements.kinds.junction import JunctionKind
from pipeline.elements.kinds.link import LinkKind
from pipeline.elements.kinds.manual import BuildElementKind, ManualKind, build_element_kind
from pipeline.elements.kinds.script import ScriptKind
from pipeline.elements.kinds.stack import StackKind

__all__ = [
    "CORE_KINDS",
    "BuildElementKind",
    "JunctionKind",
    "Kind",
    "KindContext",
    "LinkKind",
    "Recipe",
    "StagedDependency",
    "build_element_kind",
]

_CORE: tuple[type[Kind], ...] = (
    ComposeKind,
    FilterKind,
    ImportKind,
    JunctionKind,
    LinkKind,
    ManualKind,
    ScriptKind,
    StackKind,
)

CORE_KINDS: dict[str, type[Kind]] = {kind.name: kind for kind in _CORE}
"""BuildStream's core element kinds that remex builds, by name."""
