"""``manual`` and every BuildElement kind: commands run in ``%{build-root}``.

A BuildElement stages its build dependencies (and their runtime closure) at
``/``, runs their integration commands, stages its sources at
``%{build-root}``, then runs its ``configure-``, ``build-``, ``install-`` and
``strip-commands`` in ``%{build-root}/%{command-subdir}``; its artifact is
``%{install-root}``. Plugin kinds (``autotools``, ``cmake`` ... from a pip
package) are this same class with the package's YAML as their defaults.

remex runs the whole build as one action: a ``sh -c -e`` script that runs
each command as BuildStream does (``sh -c -e '<command>'``, integration
commands with ``sh -e -c`` in ``/``), stopping at the first failure; a ``cd``
or a variable set by one command does not leak into the next.
"""

from __future__ import annotations

import posixpath
import shlex
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline import spec
from pipeline.elements.kinds.base import (
    Kind,
    KindContext,
    Recipe,
    StagedDependency,
)
from pipeline.elements.nodes import MappingNode, ScalarNode
from pipeline.elements.variables import Variables

if TYPE_CHECKING:
    from pipeline.elements.element import Element

__all__ = ["COMMAND_STEPS", "BuildElementKind", "ManualKind", "build_element_kind"]

COMMAND_STEPS = ("configure-commands", "build-commands", "install-commands", "strip-commands")
"""The command lists, in the order they run."""


class BuildElementKind(Kind):
    """A kind that builds by running command lists (BuildStream's BuildElement)."""

    name: ClassVar[str] = "manual"
    runs_commands = True

    def __init__(self) -> None:
        self.commands: dict[str, list[str]] = {}
        self.build_root = ""
        self.install_root = ""
        self.working_directory = ""
        self.notparallel = False

    def configure(self, ctx: KindContext) -> None:
        ctx.config.validate_keys(COMMAND_STEPS)
        for step in COMMAND_STEPS:
            self.commands[step] = [
                ctx.variables.expand_node(command)
                for command in ctx.config.get_str_list(step) or []
            ]
        self.build_root = sandbox_folder(ctx.variables, "build-root")
        self.install_root = sandbox_folder(ctx.variables, "install-root")
        root = self.build_root.strip("/")
        subdir = (ctx.variables.get("command-subdir") or "").strip("/")
        self.working_directory = f"{root}/{subdir}" if root and subdir else root or subdir
        self.notparallel = ctx.variables.get("notparallel") in ("true", "True")

    def expanded_config(self, config: MappingNode) -> Any | None:
        """As :meth:`Kind.expanded_config`: configure allowed only command
        lists (each a list of strings, or null) and expanded every command."""
        return {
            key: None if isinstance(node, ScalarNode) else list(self.commands[key])
            for key, node in config.entries.items()
        }

    def key_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "commands": self.commands,
            "build-root": self.build_root,
            "install-root": self.install_root,
            "working-directory": self.working_directory,
        }
        if self.notparallel:
            config["notparallel"] = True
        return config

    def script(self, element: Element, staged: list[Element]) -> str:
        """The action's shell script: integration commands, then each command.

        Commands that are only whitespace (the default strip command, when
        ``%{strip-binaries}`` is empty) are left out: they would do nothing.
        """
        lines = integration_lines(element, staged)
        integration = "".join(line + "\n" for line in lines) if lines else ""
        # Each command quoted as shlex.quote would quote it with its newline
        # (it holds a character the shell treats specially: no need to look),
        # then the script's own newline: written out, as this is done for
        # every command of every element.
        return integration + "".join(
            [
                "sh -c -e '" + command.replace("'", "'\"'\"'") + "\n'\n"
                for step in COMMAND_STEPS
                for command in self.commands.get(step, ())
                if command.strip()
            ]
        )

    def recipe(self, element: Element) -> Recipe:
        staged = element.staged_dependencies()
        command: spec.CommandSpec = {
            "arguments": ["sh", "-c", "-e", self.script(element, staged)],
            "environment": dict(sorted(element.environment.items())),
            "working_directory": self.working_directory,
            "output_path": self.install_root.strip("/"),
            "platform": element.platform,
            "timeout_seconds": None,
        }
        return Recipe(
            dependencies=[StagedDependency(dep) for dep in staged],
            source_root=self.build_root.strip("/"),
            command=command,
        )


class ManualKind(BuildElementKind):
    """``kind: manual``: the commands are all written in the element."""

    name = "manual"


def build_element_kind(kind: str, defaults: MappingNode) -> type[BuildElementKind]:
    """A BuildElement kind whose defaults are a plugin package's YAML (read as data)."""

    class PluginBuildElementKind(BuildElementKind):
        name: ClassVar[str] = kind

        @classmethod
        def defaults(cls) -> MappingNode | None:
            return defaults

    PluginBuildElementKind.__name__ = f"BuildElementKind[{kind}]"
    return PluginBuildElementKind


def integration_lines(element: Element, staged: list[Element]) -> list[str]:
    """Shell lines running each staged element's integration commands, in order,
    in ``/`` with that element's own environment (as BuildStream integrates)."""
    lines = []
    for dep in staged:
        for command in dep.integration_commands:
            run = f"sh -e -c {shlex.quote(command)}"
            if dep.environment != element.environment:
                assignments = " ".join(
                    shlex.quote(f"{k}={v}") for k, v in sorted(dep.environment.items())
                )
                run = f"env -i {assignments} {run}"
            lines.append(f"(cd / && {run})")
    return lines


def sandbox_folder(variables: Variables, name: str, *, root_allowed: bool = False) -> str:
    """A variable holding an absolute folder below ``/`` (build-root, install-root);
    with ``root_allowed``, ``/`` itself (a script collecting the whole sandbox).

    Raises:
        LoadError: at the variable's definition.
    """
    value = variables[name]
    if value.startswith("/") and "//" not in value and "/." not in value and value[-1] != "/":
        # Already normal, below "/" and without ".." (the usual value, twice
        # per element: normpath is most of this function's time otherwise).
        return value
    normal = posixpath.normpath(value) if value else ""
    if (
        not value.startswith("/")
        or (normal == "/" and not root_allowed)
        or ".." in value.split("/")
    ):
        below = "'/' or a folder below it" if root_allowed else "an absolute folder below '/'"
        raise variables.error(name, f"%{{{name}}} is {value!r}; it must be {below}")
    return value
