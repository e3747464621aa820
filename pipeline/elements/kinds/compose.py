"""``compose``: the files of its dependencies, selected by split domain, optionally integrated.

As BuildStream's compose: every build dependency and its runtime closure is
staged at ``/``; with ``integrate`` their integration commands run on it
(one action here) and the files they add are kept, the files they remove
dropped; of the dependencies' own files, those in the ``include`` domains
(all domains when empty), not in an ``exclude`` domain, and, with
``include-orphans``, those in no domain, are taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pipeline import spec
from pipeline.elements.kinds.base import (
    Kind,
    KindContext,
    Recipe,
    StagedDependency,
    check_domains,
    get_bool,
    get_str_list,
    require_dependency_types,
    split_select,
)
from pipeline.elements.kinds.manual import integration_lines
from pipeline.elements.nodes import MappingNode

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["ComposeKind"]


class ComposeKind(Kind):
    """``kind: compose``."""

    name: ClassVar[str] = "compose"
    takes_sources: ClassVar[bool] = False

    def __init__(self) -> None:
        self.integrate = True
        self.include: list[str] = []
        self.exclude: list[str] = []
        self.orphans = True
        self._config: MappingNode | None = None

    def configure(self, ctx: KindContext) -> None:
        config = ctx.config
        config.validate_keys(("integrate", "include", "exclude", "include-orphans"))
        self.integrate = get_bool(config, "integrate")
        self.include = get_str_list(config, "include")
        self.exclude = get_str_list(config, "exclude")
        self.orphans = get_bool(config, "include-orphans")
        self.runs_commands = self.integrate
        require_dependency_types(self.name, ctx.dependencies, build=None, runtime=False)
        known: set[str] = set()
        for dep in ctx.dependencies:
            for element in dep.element.runtime_closure():
                known.update(element.split_rules)
        for key, domains in (("include", self.include), ("exclude", self.exclude)):
            check_domains(config, key, domains, known, "any dependency of this compose element")
        self._config = config

    def key_config(self) -> dict[str, Any]:
        key: dict[str, Any] = {
            "integrate": self.integrate,
            "include": sorted(self.include),
            "orphans": self.orphans,
        }
        if self.exclude:
            key["exclude"] = sorted(self.exclude)
        return key

    def recipe(self, element: Element) -> Recipe:
        assert self._config is not None
        staged = element.staged_dependencies()
        selects = [
            split_select(self.name, self._config, dep, self.include, self.exclude, self.orphans)
            for dep in staged
        ]
        dependencies = [
            StagedDependency(dep, select=select)
            for dep, select in zip(staged, selects, strict=True)
        ]
        lines = integration_lines(element, staged) if self.integrate else []
        if not lines:
            # Nothing to run: the selection alone is the result.
            return Recipe(dependencies=dependencies)
        script = "".join(line + "\n" for line in lines)
        command: spec.CommandSpec = {
            "arguments": ["sh", "-c", "-e", script],
            "environment": dict(sorted(element.environment.items())),
            "working_directory": "",
            "output_path": "",
            "platform": element.platform,
            "timeout_seconds": None,
        }
        return Recipe(dependencies=dependencies, command=command, select_outputs=True)
