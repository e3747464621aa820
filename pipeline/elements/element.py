"""A loaded element: resolved dependencies, expanded configuration, cache key, build spec.

Elements are made by :meth:`pipeline.elements.Project.load_targets`, which
checks everything first; an :class:`Element` is therefore always complete
and consistent. Its dependencies are in BuildStream's order (see
``project.py``), and :meth:`Element.staged_dependencies` and
:meth:`Element.runtime_closure` walk them as BuildStream does, each element
once and every dependency before its dependents.

A ``manual`` element runs as one action. BuildStream runs each command as
``sh -c -e '<command>\\n'`` in ``%{build-root}``, one after another, stopping
at the first failure; remex runs one ``sh -c -e`` whose script runs each
command in exactly that way, so a ``cd`` or a variable set by one command
does not leak into the next, and a command whose last line fails fails the
build, as under BuildStream.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from pipeline import spec
from pipeline.digest import Digest, digest_to_json
from pipeline.elements.defaults import MANUAL_COMMAND_STEPS
from pipeline.elements.nodes import Mark
from pipeline.elements.sources import Source
from pipeline.elements.variables import Variables

__all__ = ["Dependency", "Element", "ElementKind"]

ElementKind = Literal["import", "manual", "stack"]


@dataclass(frozen=True)
class Dependency:
    """A direct dependency as declared: its element, its types, where it is written."""

    element: Element
    build: bool
    runtime: bool
    mark: Mark
    field: str


class Element:
    """One element of a project, resolved.

    Attributes:
        project: the project's name.
        name: the element's path relative to element-path (``libs/foo.bst``).
        normal_name: ``libs-foo`` (BuildStream's normal name).
        file: the element file relative to the project folder (``elements/libs/foo.bst``).
        kind: ``import``, ``manual`` or ``stack``.
        dependencies: direct dependencies, in BuildStream's order.
        variables: the element's variables, expanded on access.
        environment: the build environment, expanded (all names, sorted).
        environment_nocache: names left out of the cache key.
        commands: ``manual`` only: each step's expanded commands.
        import_source, import_target: ``import`` only: ``config.source`` and
            ``config.target`` without the leading ``/`` ("" = the top).
        build_os, build_arch: the sandbox's platform (BuildStream's names).
        sources: in declaration order.
    """

    def __init__(
        self,
        *,
        project: str,
        name: str,
        file: str,
        kind: ElementKind,
        description: str,
        dependencies: list[Dependency],
        variables: Variables,
        environment: dict[str, str],
        environment_nocache: frozenset[str],
        commands: dict[str, list[str]],
        import_source: str,
        import_target: str,
        build_os: str,
        build_arch: str,
        sources: list[Source],
    ) -> None:
        self.project = project
        self.name = name
        self.normal_name = spec.normal_name(name)
        self.file = file
        self.kind = kind
        self.description = description
        self.dependencies = dependencies
        self.variables = variables
        self.environment = dict(sorted(environment.items()))
        self.environment_nocache = environment_nocache
        self.commands = commands
        self.import_source = import_source
        self.import_target = import_target
        self.build_os = build_os
        self.build_arch = build_arch
        self.sources = sources
        self._cache_key: str | None = None

    def __repr__(self) -> str:
        return f"<Element {self.name} ({self.kind})>"

    # --- dependencies --------------------------------------------------------

    @property
    def build_dependencies(self) -> list[Element]:
        """Direct build dependencies, in order."""
        return [dep.element for dep in self.dependencies if dep.build]

    @property
    def runtime_dependencies(self) -> list[Element]:
        """Direct runtime dependencies, in order."""
        return [dep.element for dep in self.dependencies if dep.runtime]

    def runtime_closure(self) -> list[Element]:
        """This element and everything it needs at run time, dependencies first.

        What ``bst artifact checkout --deps run`` writes out; this element is last.
        """
        return _post_order([self], lambda e: e.runtime_dependencies)

    def staged_dependencies(self) -> list[Element]:
        """What is staged at ``/`` to build this element: each build dependency's
        runtime closure, in order, each element once (BuildStream's build scope)."""
        return _post_order(self.build_dependencies, lambda e: e.runtime_dependencies)

    # --- keys ----------------------------------------------------------------

    @property
    def cache_key(self) -> str:
        """The cache key, set once the project computed it."""
        if self._cache_key is None:
            raise ValueError(f"element {self.name} has no cache key yet")
        return self._cache_key

    def set_cache_key(self, key: str) -> None:
        """Record the cache key (done by the project loader, dependencies first)."""
        self._cache_key = key

    @property
    def artifact_uri(self) -> str:
        """The Remote Asset URI of this element's artifact."""
        return spec.artifact_uri(self.project, self.normal_name, self.cache_key)

    @property
    def runs_commands(self) -> bool:
        """Whether building runs commands (so the environment and sandbox matter)."""
        return self.kind == "manual"

    def cache_environment(self) -> dict[str, str]:
        """The environment as it enters the cache key: without the nocache names."""
        return {k: v for k, v in self.environment.items() if k not in self.environment_nocache}

    def key_config(self) -> dict[str, object]:
        """The kind's configuration as it enters the cache key."""
        if self.kind == "manual":
            config: dict[str, object] = {
                "commands": self.commands,
                "build-root": self.build_root,
                "install-root": self.install_root,
                "working-directory": self.working_directory,
            }
            if self.variables.get("notparallel") in ("true", "True"):
                config["notparallel"] = True
            return config
        if self.kind == "import":
            return {"source": self.import_source, "target": self.import_target}
        return {}

    # --- the action ----------------------------------------------------------

    @property
    def build_root(self) -> str:
        """``%{build-root}``: an absolute path in the sandbox."""
        return self.variables["build-root"]

    @property
    def install_root(self) -> str:
        """``%{install-root}``: an absolute path in the sandbox."""
        return self.variables["install-root"]

    @property
    def working_directory(self) -> str:
        """Where commands run, relative to the input root: build-root (plus
        ``%{command-subdir}`` when set, as in BuildStream)."""
        root = self.build_root.strip("/")
        subdir = (self.variables.get("command-subdir") or "").strip("/")
        return f"{root}/{subdir}" if root and subdir else root or subdir

    def script(self) -> str:
        """The shell script of a ``manual`` element: each command run as BuildStream runs it.

        Commands that are only whitespace (the default strip command, when
        ``%{strip-binaries}`` is empty) are left out: they would do nothing.
        """
        lines = [
            f"sh -c -e {shlex.quote(command + chr(10))}"
            for step in MANUAL_COMMAND_STEPS
            for command in self.commands.get(step, [])
            if command.strip()
        ]
        return "".join(line + "\n" for line in lines)

    def build_spec(self, source_digests: list[Digest]) -> spec.BuildSpec:
        """The JSON spec the stages build this element from.

        Args:
            source_digests: the staged tree of each source, in order (from
                :meth:`Source.stage`, then copied to the artifact server's CAS).

        Raises:
            ValueError: not one digest per source.
        """
        if len(source_digests) != len(self.sources):
            raise ValueError(
                f"element {self.name} has {len(self.sources)} source(s), "
                f"got {len(source_digests)} digest(s)"
            )
        sources: list[spec.SourceSpec] = [
            {"kind": source.kind, "digest": digest_to_json(digest), "directory": source.directory}
            for source, digest in zip(self.sources, source_digests, strict=True)
        ]
        command: spec.CommandSpec | None = None
        dependencies: list[spec.DependencySpec] = []
        source_root = ""
        if self.kind == "manual":
            source_root = self.build_root.strip("/")
            dependencies = [
                {"element": dep.name, "cache_key": dep.cache_key, "artifact_uri": dep.artifact_uri}
                for dep in self.staged_dependencies()
            ]
            command = {
                "arguments": ["sh", "-c", "-e", self.script()],
                "environment": dict(self.environment),
                "working_directory": self.working_directory,
                "output_path": self.install_root.strip("/"),
                "platform": {"OSFamily": self.build_os, "ISA": self.build_arch},
                "timeout_seconds": None,
            }
        elif self.kind == "import":
            source_root = self.import_source
        return {
            "project": self.project,
            "element": self.name,
            "kind": self.kind,
            "cache_key": self.cache_key,
            "artifact_uri": self.artifact_uri,
            "dependencies": dependencies,
            "runtime_dependencies": [dep.name for dep in self.runtime_dependencies],
            "sources": sources,
            "source_root": source_root,
            "import_target": self.import_target if self.kind == "import" else "",
            "command": command,
        }


def _post_order(
    roots: Iterable[Element], children: Callable[[Element], list[Element]]
) -> list[Element]:
    """Depth-first, children before parents, each element once; no recursion limit."""
    result: list[Element] = []
    seen: set[int] = set()
    for root in roots:
        if id(root) in seen:
            continue
        seen.add(id(root))
        stack = [(root, iter(children(root)))]
        while stack:
            element, pending = stack[-1]
            for child in pending:
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append((child, iter(children(child))))
                    break
            else:
                stack.pop()
                result.append(element)
    return result
