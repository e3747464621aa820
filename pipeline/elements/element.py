"""A loaded element: resolved dependencies, expanded configuration, cache key, build spec.

Elements are made by :meth:`pipeline.elements.Project.load_targets`, which
checks everything first; an :class:`Element` is therefore always complete
and consistent. Its dependencies are in BuildStream's order (see
``project.py``), and :meth:`Element.staged_dependencies` and
:meth:`Element.runtime_closure` walk them as BuildStream does, each element
once and every dependency before its dependents. What the element's kind
means (its config, its key, how it builds) is its :attr:`Element.plugin`, a
:class:`~pipeline.elements.kinds.Kind`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import spec
from pipeline.digest import Digest, digest_to_json
from pipeline.elements.nodes import MappingNode, Mark
from pipeline.elements.sources import Source
from pipeline.elements.variables import Variables

if TYPE_CHECKING:
    from pipeline.elements.kinds import Kind

__all__ = ["Dependency", "Element", "integration_spec", "runtime_closure_of"]


@dataclass(frozen=True, init=False)
class Dependency:
    """A direct dependency as declared: its element, its types, where it is written,
    and each ``config`` it was declared with (a kind may read them, as ``script``
    reads ``location``; None for a declaration without one)."""

    element: Element
    build: bool
    runtime: bool
    mark: Mark
    field: str
    configs: tuple[MappingNode | None, ...] = (None,)

    def __init__(
        self,
        element: Element,
        build: bool,
        runtime: bool,
        mark: Mark,
        field: str,
        configs: tuple[MappingNode | None, ...] = (None,),
    ) -> None:
        # The attributes set at once (a frozen dataclass's own __init__ sets
        # each through object.__setattr__: 40,000 of them on a large project).
        self.__dict__.update(
            element=element, build=build, runtime=runtime, mark=mark, field=field, configs=configs
        )


class Element:
    """One element of a project, resolved.

    Attributes:
        project: the project's name.
        name: the element's path relative to element-path (``libs/foo.bst``);
            a subproject's element is qualified by its junction
            (``junction.bst:libs/foo.bst``).
        normal_name: ``libs-foo`` (BuildStream's normal name, within its own project).
        file: the element file relative to the project folder (``elements/libs/foo.bst``).
        kind: the kind's name (``manual``, ``autotools`` ...).
        plugin: the kind, configured for this element.
        dependencies: direct dependencies, in BuildStream's order.
        variables: the element's variables, expanded on access.
        environment: the build environment, expanded (all names, sorted).
        environment_nocache: names left out of the cache key.
        public: the public data, variables expanded (``bst`` holds
            ``integration-commands``, ``split-rules`` ...), as written.
            Read-only: elements of one kind that do not change it share one.
        config: the kind's configuration as composed and expanded (what
            ``show --format %{config}`` prints).
        build_os, build_arch: the sandbox's platform (BuildStream's names).
        build_uid, build_gid: the sandbox's user and group ids, when set
            (``sandbox: build-uid / build-gid``).
        fatal_warnings: project.conf ``fatal-warnings``, sorted.
        sources: in declaration order.
    """

    def __init__(
        self,
        *,
        project: str,
        name: str,
        normal_name: str | None = None,
        file: str,
        plugin: Kind,
        description: str,
        dependencies: list[Dependency],
        variables: Variables,
        environment: dict[str, str],
        environment_nocache: frozenset[str],
        public: dict[str, Any],
        config: dict[str, Any],
        build_os: str,
        build_arch: str,
        sources: list[Source],
        build_uid: int | None = None,
        build_gid: int | None = None,
        fatal_warnings: tuple[str, ...] = (),
    ) -> None:
        self.project = project
        self.name = name
        self.normal_name = normal_name if normal_name is not None else spec.normal_name(name)
        self.file = file
        self.kind = plugin.name
        self.plugin = plugin
        self.description = description
        self.dependencies = dependencies
        self.variables = variables
        self.environment = dict(environment)
        self.environment_nocache = environment_nocache
        self.public = public
        self.config = config
        self.build_os = build_os
        self.build_arch = build_arch
        self.build_uid = build_uid
        self.build_gid = build_gid
        self.fatal_warnings = tuple(sorted(set(fatal_warnings)))
        self.sources = sources
        self._cache_key: str | None = None
        self._artifact_uri: str | None = None
        #: This element's entry in its dependents' key descriptions, as
        #: canonical JSON (made by pipeline.elements.keys once its key is set).
        self.key_entry_text: str | None = None
        self._staged: list[Element] | None = None
        self._runtime: list[Element] | None = None
        # Read once per dependent's spec: computed on first use (the public
        # data and the plugin do not change once loaded).
        self._integration: list[str] | None = None
        self._overlap_whitelist: list[str] | None = None

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
        return list(self._runtime_dependencies())

    def _runtime_dependencies(self) -> list[Element]:
        # Walked for every dependent's staged closure: made once (not to be changed).
        if self._runtime is None:
            self._runtime = [dep.element for dep in self.dependencies if dep.runtime]
        return self._runtime

    def runtime_closure(self) -> list[Element]:
        """This element and everything it needs at run time, dependencies first.

        What ``bst artifact checkout --deps run`` writes out; this element is last.
        """
        return _post_order([self], lambda e: e.runtime_dependencies)

    def staged_dependencies(self) -> list[Element]:
        """Each build dependency's runtime closure, in order, each element once
        (BuildStream's build scope: what a build stages at ``/``)."""
        # Asked for by the key, the spec and submit: walked once (the
        # dependencies of a loaded element do not change).
        if self._staged is None:
            build = self.build_dependencies
            if len(set(build)) == len(build) and not any(
                dep._runtime_dependencies() for dep in build
            ):
                # (Most elements: no build dependency needs anything at run
                # time, and none is twice: the walk would give them as they are.)
                self._staged = build
            else:
                self._staged = _post_order(build, Element._runtime_dependencies)
        return list(self._staged)

    # --- public data ---------------------------------------------------------

    @property
    def integration_commands(self) -> list[str]:
        """The commands that integrate this element where it is staged at ``/``:
        ``public.bst.integration-commands``, expanded, as its kind passes them on."""
        if self._integration is None:
            self._integration = self.plugin.integration_commands(self)
        return list(self._integration)

    @property
    def split_rules(self) -> dict[str, list[str]]:
        """``public.bst.split-rules``: domain -> BuildStream globs, expanded."""
        bst = self.public.get("bst") or {}
        return {k: list(v or []) for k, v in (bst.get("split-rules") or {}).items()}

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
        self._artifact_uri = None
        self.key_entry_text = None

    @property
    def artifact_uri(self) -> str:
        """The Remote Asset URI of this element's artifact."""
        # Asked for by every dependent's spec: made once.
        if self._artifact_uri is None:
            self._artifact_uri = spec.artifact_uri(self.project, self.normal_name, self.cache_key)
        return self._artifact_uri

    @property
    def runs_commands(self) -> bool:
        """Whether building runs commands (so the environment and sandbox matter)."""
        return self.plugin.runs_commands

    def cache_environment(self) -> dict[str, str]:
        """The environment as it enters the cache key: without the nocache names."""
        nocache = self.environment_nocache
        if not nocache:
            return dict(self.environment)  # (the usual case: a copy, made in C)
        return {k: v for k, v in self.environment.items() if k not in nocache}

    def key_config(self) -> dict[str, object]:
        """The kind's configuration as it enters the cache key."""
        return self.plugin.key_config()

    @property
    def platform(self) -> dict[str, str]:
        """The action's platform properties.

        ``unixUID``/``unixGID`` when the sandbox sets ``build-uid``/``build-gid``:
        REAPI has no field for them; these are the names BuildStream's remote
        sandbox sends and buildbox-run honours (``buildbox-run --capabilities``).
        """
        platform = {"OSFamily": self.build_os, "ISA": self.build_arch}
        if self.build_uid is not None:
            platform["unixUID"] = str(self.build_uid)
        if self.build_gid is not None:
            platform["unixGID"] = str(self.build_gid)
        return platform

    @property
    def overlap_whitelist(self) -> list[str]:
        """``public.bst.overlap-whitelist``: globs of the paths this element may
        overwrite when staged after others, its variables expanded."""
        if self._overlap_whitelist is None:
            bst = self.public.get("bst") or {}
            self._overlap_whitelist = [str(glob) for glob in bst.get("overlap-whitelist") or []]
        return list(self._overlap_whitelist)

    # --- the build -----------------------------------------------------------

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
        for entry, source in zip(sources, self.sources, strict=True):
            step = source.apply_step()  # e.g. a patch, applied to the sources before it
            if step is not None:
                entry["apply"] = step
        recipe = self.plugin.recipe(self)
        return {
            "project": self.project,
            "element": self.name,
            "kind": self.kind,
            "cache_key": self.cache_key,
            "artifact_uri": self.artifact_uri,
            "dependencies": [
                {
                    "element": staged.element.name,
                    "cache_key": staged.element.cache_key,
                    "artifact_uri": staged.element.artifact_uri,
                    "path": staged.path,
                    "select": staged.select,
                    "overlap_whitelist": staged.element.overlap_whitelist,
                }
                for staged in recipe.dependencies
            ],
            "runtime_dependencies": [dep.name for dep in self.runtime_dependencies],
            "sources": sources,
            "source_root": recipe.source_root,
            "command": recipe.command,
            "files_root": recipe.files_root,
            "files_target": recipe.files_target,
            "select_outputs": recipe.select_outputs,
            "fatal_warnings": list(self.fatal_warnings),
        }


def integration_spec(elements: list[Element], target: Element) -> spec.BuildSpec | None:
    """A build spec whose "artifact" is ``elements`` (a checkout, dependencies first)
    with their integration commands run on it, as ``bst artifact checkout``
    integrates; None when none of them has integration commands.

    It is built like any element: the artifacts staged at ``/``, one action
    running the commands, the whole sandbox as output (so no local sandbox
    is needed), stored under an ``integrated`` URI keyed by what went in.
    """
    from pipeline.elements.keys import canonical_json
    from pipeline.elements.kinds.manual import integration_lines

    lines = integration_lines(target, elements)
    if not lines:
        return None
    key = hashlib.sha256(
        canonical_json(
            {
                "integrate": [[e.name, e.cache_key] for e in elements],
                "commands": lines,
                "environment": target.environment,
                "platform": target.platform,
            }
        ).encode()
    ).hexdigest()
    return {
        "project": target.project,
        "element": f"{target.name} (integrated)",
        "kind": "integration",
        "cache_key": key,
        "artifact_uri": spec.integrated_uri(target.project, target.normal_name, key),
        "dependencies": [
            {
                "element": e.name,
                "cache_key": e.cache_key,
                "artifact_uri": e.artifact_uri,
                "path": "",
                "select": None,
            }
            for e in elements
        ],
        "runtime_dependencies": [],
        "sources": [],
        "source_root": "",
        "command": {
            "arguments": ["sh", "-c", "-e", "".join(line + "\n" for line in lines)],
            "environment": dict(sorted(target.environment.items())),
            "working_directory": "",
            "output_path": "",
            "platform": target.platform,
            "timeout_seconds": None,
        },
        "files_root": "",
        "files_target": "",
        "select_outputs": False,
    }


def runtime_closure_of(elements: Iterable[Element]) -> list[Element]:
    """The elements and everything they need at run time, dependencies first, each once."""
    return _post_order(elements, lambda e: e.runtime_dependencies)


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
