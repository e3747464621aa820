"""``script``: commands run on a layout of dependencies; the artifact is ``%{install-root}``.

As BuildStream 2's script element: each build dependency (with its runtime
closure) is staged at its ``config: location:`` (``/`` by default), the
locations in sorted order; the integration commands of what is staged at
``/`` run; then each of ``config.commands`` as ``sh -c -e`` in ``%{cwd}``.
``root-read-only`` enters the key; remex cannot make a REAPI server mount the
root read-only, so the commands are trusted not to write outside the
install root (docs/elements.md says so).
"""

from __future__ import annotations

import posixpath
import shlex
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline import spec
from pipeline.elements.element import runtime_closure_of
from pipeline.elements.kinds.base import (
    Kind,
    KindContext,
    Recipe,
    StagedDependency,
    get_bool,
    require_dependency_types,
)
from pipeline.elements.kinds.manual import integration_lines, sandbox_folder

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["ScriptKind"]


class ScriptKind(Kind):
    """``kind: script``."""

    name: ClassVar[str] = "script"
    takes_sources: ClassVar[bool] = False
    runs_commands = True

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.cwd = "/"
        self.install_root = ""
        self.root_read_only = False
        # location -> the elements staged there, in declaration order.
        self.layout: dict[str, list[str]] = {}

    def configure(self, ctx: KindContext) -> None:
        config = ctx.config
        config.validate_keys(("commands", "root-read-only"))
        self.commands = [
            ctx.variables.expand_node(c) for c in config.get_str_list("commands") or []
        ]
        self.root_read_only = get_bool(config, "root-read-only")
        self.cwd = ctx.variables.get("cwd") or "/"
        self.install_root = sandbox_folder(ctx.variables, "install-root", root_allowed=True)
        require_dependency_types(self.name, ctx.dependencies, build=None, runtime=False)
        for dep in ctx.dependencies:
            for config_node in dep.configs:
                location = "/"
                if config_node is not None:
                    config_node.validate_keys(("location",))
                    location_node = config_node.get_scalar("location")
                    if location_node is not None and location_node.value is not None:
                        location = ctx.variables.expand_node(location_node)
                        if not location.startswith("/") or ".." in location.split("/"):
                            raise location_node.error(
                                f"location {location!r} must be an absolute path in the sandbox"
                            )
                self.layout.setdefault(posixpath.normpath(location), []).append(dep.element.name)

    def key_config(self) -> dict[str, Any]:
        return {
            "commands": {"commands": self.commands},
            "cwd": self.cwd,
            "install-root": self.install_root,
            "layout": {location: self.layout[location] for location in sorted(self.layout)},
            "root-read-only": self.root_read_only,
        }

    def recipe(self, element: Element) -> Recipe:
        by_name = {dep.name: dep for dep in element.build_dependencies}
        staged: list[StagedDependency] = []
        at_root: list[Element] = []
        for location in sorted(self.layout):
            closure = runtime_closure_of([by_name[name] for name in self.layout[location]])
            staged += [StagedDependency(e, path=location.strip("/")) for e in closure]
            if location == "/":
                at_root = closure
        lines = integration_lines(element, at_root)
        lines += [
            f"sh -c -e {shlex.quote(command + chr(10))}"
            for command in self.commands
            if command.strip()
        ]
        command: spec.CommandSpec = {
            "arguments": ["sh", "-c", "-e", "".join(line + "\n" for line in lines)],
            "environment": dict(sorted(element.environment.items())),
            "working_directory": self.cwd.strip("/"),
            "output_path": self.install_root.strip("/"),
            "platform": element.platform,
            "timeout_seconds": None,
        }
        return Recipe(dependencies=staged, command=command)
