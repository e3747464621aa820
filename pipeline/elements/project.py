"""Projects: ``project.conf``, element files, the dependency graph, cache keys.

:func:`load_project` reads ``project.conf``; :meth:`Project.load_targets`
reads the target elements and everything they depend on, and checks it all
before anything is built: YAML, keys, kinds, dependency files, cycles,
variables, sources against the disk. It returns the build plan, every
element after its dependencies, with cache keys.

Dependency order follows BuildStream, so that files staged from several
dependencies overlap the same way: an element's dependencies are read from
``build-depends``, ``runtime-depends`` then ``depends`` (duplicates merged),
then sorted as BuildStream sorts them: a dependency that needs another
direct dependency comes after it, otherwise runtime-only ones last, then by
name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, cast

from pipeline import spec
from pipeline.cas import LocalCas, checkout
from pipeline.elements.composition import (
    IncludeLoader,
    JunctionIncludeResolver,
    assert_fully_composited,
    clone_mapping,
    compose,
    refuse_junction_includes,
)
from pipeline.elements.defaults import (
    DEFAULT_ENVIRONMENT,
    DEFAULT_MAX_JOBS,
    DEFAULT_VARIABLES,
    PROTECTED_VARIABLES,
    canonical_arch,
    host_arch,
    host_os,
)
from pipeline.elements.element import Dependency, Element
from pipeline.elements.errors import LoadError
from pipeline.elements.keys import cache_key
from pipeline.elements.kinds import (
    CORE_KINDS,
    JunctionKind,
    Kind,
    KindContext,
    build_element_kind,
)
from pipeline.elements.kinds.base import data_to_node, expand_data
from pipeline.elements.nodes import (
    FolderCache,
    MappingNode,
    Mark,
    Node,
    ScalarNode,
    SequenceNode,
    load_yaml,
)
from pipeline.elements.options import PROJECT_RESTRICTED_KEYS, OptionPool
from pipeline.elements.plugins import declare_plugins
from pipeline.elements.project_keys import (
    IGNORED_PROJECT_KEYS,
    check_project_keys,
    default_targets,
    refuse_project_keys,
)
from pipeline.elements.sources import (
    LocalSource,
    NetworkSettings,
    ProjectSources,
    Source,
    SourceContext,
    load_source,
    project_path,
)
from pipeline.elements.sources.mirrors import SourceMirror, load_mirrors
from pipeline.elements.split_rules import DEFAULT_SPLIT_RULES
from pipeline.elements.variables import Definition, SharedVariables, Variables

__all__ = ["Project", "load_project"]

_PROJECT_KEYS = (
    "name",
    "plugins",
    "split-rules",
    "elements",
    "min-version",
    "element-path",
    "variables",
    "environment",
    "aliases",
    "mirrors",
    "environment-nocache",
    "options",
    "fatal-warnings",
    "sandbox",
    "sources",
    *IGNORED_PROJECT_KEYS,
)
# Directives allowed at the top of project.conf as written (before composition).
_DIRECTIVE_KEYS = ("(@)", "(?)", "(!)")
# BuildStream project.conf keys remex knows but does not implement.
# (default-mirror, remote-execution: refused with a reason by check_project_keys.)
_PROJECT_UNSUPPORTED = ("junctions",)
# What project.conf `elements: KIND:` may override.
_KIND_OVERRIDE_KEYS = (
    "variables",
    "environment",
    "environment-nocache",
    "config",
    "public",
    "sandbox",
)
_ELEMENT_KEYS = (
    "kind",
    "description",
    "depends",
    "build-depends",
    "runtime-depends",
    "sources",
    "variables",
    "environment",
    "environment-nocache",
    "config",
    "sandbox",
    "public",
)
_DEPENDENCY_LISTS = (("build-depends", True, False), ("runtime-depends", False, True),
                     ("depends", True, True))  # fmt: skip
_SANDBOX_KEYS = ("build-os", "build-arch", "build-uid", "build-gid")
_SANDBOX_UNSUPPORTED = ("remote-apis-socket",)
# The BuildStream version whose format remex implements (project.conf min-version).
_FORMAT_VERSION = (2, 8)
# BuildStream's rule for project names.
_PROJECT_NAME_RE = re.compile(r"[a-zA-Z_-][a-zA-Z0-9_-]*")


def load_project(
    directory: Path,
    *,
    cas: LocalCas,
    max_jobs: int = DEFAULT_MAX_JOBS,
    options: Mapping[str, str] | None = None,
    option_values: MappingNode | None = None,
    junction_includes: JunctionIncludeResolver = refuse_junction_includes,
    default_mirror: str | None = None,
) -> Project:
    """Read ``directory/project.conf``, with its includes, options and conditionals.

    In BuildStream's order: ``name`` and ``element-path`` are read from
    project.conf as written; then its ``(@)`` includes are composed in (the
    included files may declare options); then the options are declared, given
    their values (``option_values``, then ``options``) and checked; then the
    ``(?)`` conditionals and ``(!)`` assertions are resolved; finally option
    variables are exported over the project's ``variables``.

    Args:
        directory: the project folder.
        cas: the local CAS; local sources are imported into it to key them.
        max_jobs: the value of ``%{max-jobs}`` (it enters cache keys through
            the commands that use it).
        options: option values as strings, as on BuildStream's command line
            (``-o NAME VALUE``): ``{"debug": "true", "flags": "a,b"}``.
        option_values: option values as YAML (a user configuration's
            ``projects: NAME: options:`` mapping); ``options`` win over these.
        junction_includes: resolves ``junction.bst:file`` includes.
        default_mirror: the user's preferred source mirror (``[fetch]
            default-mirror``, ``--default-mirror``): its URLs are tried first.

    Raises:
        LoadError: the file is missing or wrong, an include is missing or
            cyclic, an option or its value is wrong, an assertion fails; the
            message names the file, the line and the field.
    """
    directory = Path(directory).resolve()
    conf_path = directory / "project.conf"
    if not conf_path.is_file():
        raise LoadError(f"no project.conf in {directory}", file="project.conf")
    raw = load_yaml(conf_path, "project.conf")
    refuse_project_keys(raw)
    raw.validate_keys(_PROJECT_KEYS + _DIRECTIVE_KEYS, unsupported=_PROJECT_UNSUPPORTED)
    name_node = raw.require_str("name")
    name = name_node.as_str()
    if not _PROJECT_NAME_RE.fullmatch(name):
        raise name_node.error(
            f"invalid project name {name!r}: use letters, digits, '_' and '-', "
            "not starting with a digit"
        )
    _check_min_version(raw.get_scalar("min-version"))
    element_path_node = raw.get_scalar("element-path")
    if element_path_node is None or element_path_node.value is None:
        element_path = directory
    else:
        element_path = project_path(directory, element_path_node.value, element_path_node)
        if not element_path.is_dir():
            raise element_path_node.error(
                f"element-path {element_path_node.value!r} is not a folder"
            )
    includes = IncludeLoader(directory, junction_resolver=junction_includes)
    node = clone_mapping(raw)
    # As BuildStream: conditionals in project.conf's included files wait for
    # the options, which the included files may declare.
    includes.process(node, ("project.conf",))
    node = compose(_project_defaults(raw.mark), node)
    pool = OptionPool(element_path)
    pool.declare(node.get_mapping("options"))
    pool.set_yaml_values(option_values)
    pool.set_string_values(options or {})
    pool.resolve()
    pool.process_node(node, restricted=PROJECT_RESTRICTED_KEYS)
    for key, value in node.entries.items():
        # Per-kind overrides and split rules compose onto defaults later.
        if key not in ("elements", "sources", "split-rules"):
            assert_fully_composited(value)
    check_project_keys(node)
    node.validate_keys(_PROJECT_KEYS, unsupported=_PROJECT_UNSUPPORTED)
    variables = node.get_str_mapping("variables")
    for protected in PROTECTED_VARIABLES:
        if protected in variables:
            raise variables[protected].error(
                f"variable {protected!r} is set by remex; it cannot be redefined"
            )
    for option in pool.options.values():
        if option.variable in PROTECTED_VARIABLES and option.variable_node is not None:
            raise option.variable_node.error(
                f"option variable {option.variable!r} is set by remex; choose another name"
            )
    aliases = {alias: value.as_str() for alias, value in node.get_str_mapping("aliases").items()}
    nocache = node.get_str_list("environment-nocache") or []
    return Project(
        conf=node,
        name=name,
        directory=directory,
        element_path=element_path,
        cas=cas,
        variables=variables,
        environment=node.get_str_mapping("environment"),
        aliases=aliases,
        mirrors=load_mirrors(node.get_sequence("mirrors")),
        default_mirror=default_mirror,
        environment_nocache=frozenset(n.as_str() for n in nocache),
        max_jobs=max_jobs,
        options=pool,
        includes=includes,
        option_variables=pool.exported_variables(),
    )


def _project_defaults(mark: Mark) -> MappingNode:
    """The part of BuildStream's project defaults list directives can extend."""
    defaults = MappingNode(mark=mark, path="")
    defaults.entries["environment-nocache"] = SequenceNode(mark=mark, path="environment-nocache")
    defaults.key_marks["environment-nocache"] = mark
    return defaults


@dataclass
class _DepRef:
    name: str
    build: bool
    runtime: bool
    mark: Mark
    field: str
    configs: list[MappingNode | None] = dataclasses.field(default_factory=list)


@dataclass
class _ElementFile:
    name: str
    """Qualified: ``junction.bst:element.bst`` for a subproject's element."""
    project: Project
    local: str
    """The name within its own project."""
    display: str
    node: MappingNode
    kind: str
    deps: list[_DepRef]
    bit: int = 0
    """``1 << n`` for the graph's n-th file: its place in the closures."""
    closure: int = 0
    """Everything it depends on, directly or not: the OR of their bits (a
    bitset, so a closure of 10,000 elements is one OR of two ints, not a
    set union)."""
    deps_sorted: bool = False


class Project:
    """A loaded ``project.conf``; elements are read on demand by :meth:`load_targets`.

    Attributes:
        name: the project name.
        directory: the project folder (absolute).
        element_path: the folder element names are relative to (absolute).
        aliases: URL aliases (``alias`` -> URL prefix).
        mirrors: project.conf ``mirrors``, in their order.
        default_mirror: the user's preferred mirror (None: the first).
        cas: the local CAS local sources are imported into.
        options: the project's options with their resolved values; element
            files' ``(?)`` conditionals are evaluated with them.
        includes: reads ``(@)`` includes (each included file read once).
    """

    def __init__(
        self,
        *,
        conf: MappingNode,
        name: str,
        directory: Path,
        element_path: Path,
        cas: LocalCas,
        variables: dict[str, ScalarNode],
        environment: dict[str, ScalarNode],
        aliases: dict[str, str],
        environment_nocache: frozenset[str],
        max_jobs: int,
        options: OptionPool | None = None,
        includes: IncludeLoader | None = None,
        option_variables: dict[str, ScalarNode] | None = None,
        mirrors: tuple[SourceMirror, ...] = (),
        default_mirror: str | None = None,
    ) -> None:
        self.name = name
        self.directory = directory
        self.element_path = element_path
        self._element_dir = str(element_path)
        # Element files by stat (opened by the first load_targets).
        self._folder_cache: FolderCache | None = None
        self._folder_cache_opened = False
        self.cas = cas
        self.aliases = aliases
        self.mirrors = mirrors
        self.default_mirror = default_mirror
        # How a junction's network source downloads on this host ([fetch]):
        # set by the caller that has the configuration (None: the defaults).
        self.network: NetworkSettings | None = None
        # A subproject's: the junction's source it was staged from (None: the root).
        self.junction_source: Source | None = None
        self.max_jobs = max_jobs
        self._variables = variables
        self._option_variables = option_variables or {}
        self._environment = environment
        self._environment_nocache = environment_nocache
        self._files: dict[str, _ElementFile] = {}
        self._elements: dict[str, Element] = {}
        self._kinds: dict[str, type[Kind]] = dict(CORE_KINDS)
        default_splits = data_to_node(
            {domain: list(rules) for domain, rules in DEFAULT_SPLIT_RULES.items()},
            "<BuildStream's default split-rules>",
        )
        assert isinstance(default_splits, MappingNode)
        splits = _compose_mappings(default_splits, conf.get_mapping("split-rules"))
        assert splits is not None
        self._split_rules = splits
        self._element_overrides = conf.get_mapping("elements")
        # A kind's composed defaults are the same for every element of it:
        # composed once (the loader's costliest step when done per element).
        self._defaults_by_kind: dict[str, MappingNode] = {}
        self._shared_by_kind: dict[str, tuple[MappingNode, SharedVariables | None]] = {}
        self._base_definitions: dict[int, tuple[MappingNode, dict[str, Definition]]] = {}
        self._sandbox_conf = conf.get_mapping("sandbox")
        self._sandbox_by_defaults: dict[int, tuple[MappingNode, dict[str, ScalarNode]]] = {}
        self.fatal_warnings = tuple(n.as_str() for n in conf.get_str_list("fatal-warnings") or [])
        # Looked up when an element uses the kind, as bst does.
        self._plugins = declare_plugins(conf.get("plugins"), directory)
        self._source_settings = ProjectSources.from_conf(conf, directory)
        self._default_targets = default_targets(conf)
        self.options = options if options is not None else OptionPool(element_path)
        self.includes = includes if includes is not None else IncludeLoader(directory)
        # BuildStream resolves an included file's conditionals before its own includes.
        self.includes.on_included = self.options.process_node
        self.includes.junction_resolver = self._junction_include
        # Junctions: this project's elements are named prefix + name in the
        # root project's graph, which holds every project's files and elements.
        self.prefix = ""
        self.root: Project = self
        self._display_prefixes: tuple[Project, tuple[str, ...]] | None = None
        self._subprojects: dict[str, Project] = {}
        # The root's: every junction's project by the junction's qualified name.
        self._junction_projects: dict[str, Project] = {}

    def __repr__(self) -> str:
        return f"<Project {self.name} at {self.directory}>"

    @property
    def uses_junctions(self) -> bool:
        """Whether a load went through a junction (loaded a subproject)."""
        return bool(self.root._junction_projects)

    def subprojects(self) -> list[Project]:
        """Every project a load reached through a junction (of the root's graph)."""
        return list(self.root._junction_projects.values())

    def element_names(self) -> list[str]:
        """Every ``.bst`` file under element-path, as element names, sorted."""
        names = []
        for folder, dirs, files in os.walk(self.element_path):
            dirs.sort()
            for file in files:
                if file.endswith(".bst"):
                    path = Path(folder, file).relative_to(self.element_path)
                    names.append(path.as_posix())
        return sorted(names)

    def default_targets(self) -> list[str]:
        """What to build when no target is named, as bst: project.conf
        ``defaults: targets:``, or else every element of the project."""
        return list(self._default_targets) or self.element_names()

    def element(self, name: str) -> Element:
        """An element already loaded by :meth:`load_targets`.

        Raises:
            KeyError: it was not loaded.
        """
        return self._elements[name]

    def load_targets(self, targets: list[str]) -> list[Element]:
        """Load the targets and everything they depend on; check it all; key it all.

        Args:
            targets: element names (``app.bst``, ``libs/foo.bst``).

        Returns:
            The plan: the targets and all their dependencies (build and runtime,
            recursively), each once, every element after its dependencies.

        Raises:
            LoadError: anything wrong in any of those files or their sources;
                the message names the file, the line and the field.
        """
        with gc_paused():
            plan = self._load_targets(targets)
        for project in (self, *self._junction_projects.values()):
            if project._folder_cache is not None:
                project._folder_cache.save()
        return plan

    def _load_targets(self, targets: list[str]) -> list[Element]:
        roots = [self._read_target(target) for target in targets]
        self._check_cycles(roots)
        for file in roots:
            self._sort_dependencies(file)
        plan: list[Element] = []
        seen: set[str] = set()
        for file in roots:
            for name in self._plan_order(file, seen):
                element = self._elements.get(name)
                if element is None:
                    element = self._make_element(self._files[name])
                    self._elements[name] = element
                plan.append(element)
        return plan

    def target_name(self, target: str) -> str:
        """The name a target given by a user stands for (links followed, junction
        paths qualified), once :meth:`load_targets` has loaded it."""
        return self._read_target(target).name

    def staged_dependencies(self, element: Element) -> list[Element]:
        """What is staged at ``/`` to build ``element``: its build dependencies and
        their runtime closure, dependencies first, each once."""
        return element.staged_dependencies()

    # --- reading files -------------------------------------------------------

    def _read_target(self, target: str) -> _ElementFile:
        name = _qualified_name(target)
        if name is None:
            raise LoadError(f"invalid element name {target!r}: use a path relative to element-path")

        def error(message: str) -> LoadError:
            return LoadError(message)

        path = self.element_path / name
        if ":" not in name and name not in self._files and not path.is_file():
            raise LoadError(f"element {target!r} not found", file=self._display(path))
        file = self._read_named(name, error, what="element")
        if file.kind == "junction":
            raise LoadError(
                f"{file.name} is a junction: build its elements ({file.name}:ELEMENT.bst)",
                file=file.display,
            )
        return file

    def _read_dependency(self, ref: _DepRef) -> _ElementFile:
        def error(message: str) -> LoadError:
            return LoadError(message, file=ref.mark.file, line=ref.mark.line, field=ref.field)

        file = self._read_named(ref.name, error, what="dependency")
        if file.kind == "junction":
            raise error(
                f"dependency {ref.name!r} is a junction: depend on its elements "
                f"({ref.name}:ELEMENT.bst)"
            )
        return file

    def _read_named(
        self, name: str, error: Callable[[str], LoadError], *, what: str
    ) -> _ElementFile:
        """The file of a qualified element name, links followed."""
        seen: list[str] = []
        while True:
            file = self._files.get(name)
            if file is None:
                owner, local = self._locate(name, error)
                # Strings, not Paths: once per element file.
                path = os.path.join(owner._element_dir, local)
                try:
                    stat: os.stat_result | None = os.stat(path)
                except (OSError, ValueError):
                    stat = None
                if stat is None or not S_ISREG(stat.st_mode):
                    missing = f"no file {self._display(path)}"
                    raise error(f"{what} {name!r} not found ({missing})")
                file = self._read(name, owner, local, path, stat)
            if file.kind != "link":
                return file
            seen.append(name)
            name = self._link_target(file)
            if name in seen:
                raise error(f"links form a cycle: {' -> '.join([*seen, name])}")

    def _link_target(self, file: _ElementFile) -> str:
        """The qualified name a ``link`` element points to."""
        config = file.node.get_mapping("config")
        target = config.get_scalar("target") if config is not None else None
        if target is None or target.value is None:
            raise file.node.error("a link element needs config.target", field="config.target")
        name = _qualified_name(target.value)
        if name is None:
            raise target.error(f"invalid link target {target.value!r}")
        return file.project.prefix + name

    def _locate(self, name: str, error: Callable[[str], LoadError]) -> tuple[Project, str]:
        """The project owning a qualified name, and the name within it."""
        *junctions, local = name.split(":")
        owner: Project = self
        for junction in junctions:
            owner = owner.subproject(junction, error)
        return owner, local

    def subproject(self, junction: str, error: Callable[[str], LoadError]) -> Project:
        """The project behind this project's junction element ``junction`` (or a
        link to one), loaded once.

        Raises:
            LoadError: it is not a junction, its source is not a project, or the
                subproject fails to load (through ``error`` when it is missing).
        """
        found = self._subprojects.get(junction)
        if found is not None:
            return found
        root = self.root
        file = root._read_named(self.prefix + junction, error, what="junction")
        if file.kind != "junction":
            raise error(f"{file.name} is a {file.kind} element, not a junction")
        owner = file.project
        if file.name in root._junction_projects:
            sub = root._junction_projects[file.name]
        else:
            sub = owner._load_junction(file)
            root._junction_projects[file.name] = sub
        self._subprojects[junction] = sub
        return sub

    def _load_junction(self, file: _ElementFile) -> Project:
        plugin = self._kinds["junction"]()
        assert isinstance(plugin, JunctionKind)
        defaults = self._kind_defaults("junction")
        variables = self._element_variables(file, defaults)
        config = _compose_mappings(defaults.get_mapping("config"), file.node.get_mapping("config"))
        plugin.configure(
            KindContext(
                element=file.name,
                node=file.node,
                config=config or MappingNode(mark=file.node.mark, path="config"),
                variables=variables,
                dependencies=[],
            )
        )
        if file.deps:
            ref = file.deps[0]
            raise LoadError(
                "a junction element cannot have dependencies",
                file=ref.mark.file,
                line=ref.mark.line,
                field=ref.field,
            )
        sources = self._sources(file, plugin, variables)
        if len(sources) != 1:
            raise file.node.error(
                f"a junction needs exactly one source (the subproject), it has {len(sources)}",
                field="sources",
            )
        directory = self._junction_directory(file, sources[0])
        if not (directory / "project.conf").is_file():
            raise LoadError(
                f"junction {file.name}: its source holds no project.conf "
                f"(looked in {self._display(directory)})",
                file=file.display,
                line=sources[0].mark.line,
                field=sources[0].field,
            )
        sub = load_project(
            directory,
            cas=self.cas,
            max_jobs=self.max_jobs,
            options=plugin.options,
            default_mirror=self.default_mirror,
        )
        sub.prefix = file.name + ":"
        sub.root = self.root
        sub.network = self.network
        sub.junction_source = sources[0]
        return sub

    def _junction_directory(self, file: _ElementFile, source: Source) -> Path:
        """Where the subproject is: a ``local`` source's folder, or any other
        source staged and checked out once into a folder beside the local CAS.

        A network source (its content fixed by its source cache key) is
        fetched by the first load only: later loads find its folder by key."""
        if isinstance(source, LocalSource):
            return source.path
        scratch = self.cas.root.parent / "junctions"
        scratch.mkdir(parents=True, exist_ok=True)
        request = source.fetch_request(file.name, 0, file.display)
        if request is not None:
            by_key = scratch / f"source-{request['key']}"
            if (by_key / "project.conf").is_file():
                return by_key
        with tempfile.TemporaryDirectory(dir=scratch) as work:
            digest = source.stage(self.cas, Path(work), network=self.network)
        dest = scratch / digest.hash if request is None else by_key
        if not (dest / "project.conf").is_file():
            with tempfile.TemporaryDirectory(dir=scratch) as work:
                checkout(self.cas, digest, Path(work) / "project")
                with contextlib.suppress(OSError):
                    os.rename(Path(work) / "project", dest)
        return dest

    def _junction_include(self, junction: str, file: str, node: ScalarNode) -> tuple[Path, str]:
        sub = self.subproject(junction, lambda message: node.error(message))
        path = sub.directory / file
        if not path.is_file():
            raise node.error(f"include {junction}:{file}: no file {file} in the subproject")
        return path, f"{junction}:{file}"

    def _display(self, path: Path | str) -> str:
        # On strings (both sides are normalised Paths): once per element file,
        # and pathlib's relative_to is slow. The prefixes are made once for
        # the root project they were made with (a subproject's is set later).
        text = str(path)
        cached = self._display_prefixes
        if cached is None or cached[0] is not self.root:
            prefixes = tuple(
                os.path.join(str(directory), "")
                for directory in (self.root.directory, self.directory)
            )
            cached = self._display_prefixes = (self.root, prefixes)
        for prefix in cached[1]:
            if text.startswith(prefix):
                return text[len(prefix) :]
        return text

    def _read(
        self, name: str, owner: Project, local: str, path: str, stat: os.stat_result
    ) -> _ElementFile:
        """Read ``owner``'s element file ``local`` into this (root) project's graph as ``name``."""
        display = self._display(path)
        if not owner._folder_cache_opened:
            owner._folder_cache = FolderCache.open(owner._element_dir)
            owner._folder_cache_opened = True
        if owner._folder_cache is not None:
            node = owner._folder_cache.load(path, display, stat)
        else:
            node = load_yaml(path, display)
        if not node.plain:
            # As BuildStream: conditionals first (with the project's options),
            # then includes (each included file through its conditionals first).
            # (A file without directives, the usual case, needs neither walk.)
            owner.options.process_node(node)
            owner.includes.process(node, (display,))
        node.validate_keys(_ELEMENT_KEYS)
        kind_node = node.require_str("kind")
        kind = kind_node.as_str()
        if kind not in owner._kinds and kind in owner._plugins:
            plugin = owner._plugins[kind].resolve()
            owner._kinds[kind] = build_element_kind(kind, plugin.defaults)
        if kind not in owner._kinds:
            raise kind_node.error(
                f"unknown element kind {kind!r} (remex supports {', '.join(sorted(owner._kinds))}; "
                "a plugin kind must be declared in project.conf 'plugins')"
            )
        node.get_scalar("description")  # a string (or null) if given
        deps = _read_dependencies(node)
        for ref in deps:
            ref.name = owner.prefix + ref.name
        file = _ElementFile(name=name, project=owner, local=local, display=display, node=node,
                            kind=kind, deps=deps, bit=1 << len(self._files))  # fmt: skip
        self._files[name] = file
        return file

    # --- the graph -----------------------------------------------------------

    def _check_cycles(self, roots: list[_ElementFile]) -> None:
        """Read every dependency file, depth first, refusing cycles; fill closures."""
        done: set[str] = set()
        for root in roots:
            if root.name in done:
                continue
            # Frames: (file, index of the next dependency, the reference that led here).
            path: list[tuple[_ElementFile, int, _DepRef | None]] = [(root, 0, None)]
            on_path = {root.name}
            while path:
                file, index, via = path[-1]
                if index < len(file.deps):
                    path[-1] = (file, index + 1, via)
                    ref = file.deps[index]
                    if ref.name not in done and ref.name not in on_path:
                        # Read it (a link resolves to its target's name).
                        ref.name = self._read_dependency(ref).name
                    if ref.name in done:
                        continue
                    if ref.name in on_path:
                        raise _cycle_error(
                            [frame[0] for frame in path], [frame[2] for frame in path], ref
                        )
                    child = self._files[ref.name]
                    path.append((child, 0, ref))
                    on_path.add(child.name)
                    continue
                path.pop()
                on_path.discard(file.name)
                done.add(file.name)
                for ref in file.deps:
                    child = self._files[ref.name]
                    file.closure |= child.closure | child.bit

    def _sort_dependencies(self, root: _ElementFile) -> None:
        """Sort each reachable element's dependencies as BuildStream does."""
        stack = [root]
        visited = {root.name}
        while stack:
            file = stack.pop()
            for ref in file.deps:
                if ref.name not in visited:
                    visited.add(ref.name)
                    stack.append(self._files[ref.name])
            # Python's sort is the algorithm BuildStream pins (CPython 3.12's
            # listsort), so this comparison, which is not a total order, gives
            # BuildStream's order for the same input order. Sorted once only:
            # sorting again with such a comparison could move things.
            if not file.deps_sorted:
                if len(file.deps) > 1:  # (most files: nothing to compare)
                    file.deps.sort(key=functools.cmp_to_key(self._compare_dependencies))
                file.deps_sorted = True

    def _compare_dependencies(self, a: _DepRef, b: _DepRef) -> int:
        file_a, file_b = self._files[a.name], self._files[b.name]
        if file_a.closure & file_b.bit:
            return 1
        if file_b.closure & file_a.bit:
            return -1
        a_runtime_only = a.runtime and not a.build
        b_runtime_only = b.runtime and not b.build
        if a_runtime_only != b_runtime_only:
            return 1 if a_runtime_only else -1
        return (a.name > b.name) - (a.name < b.name)

    def _plan_order(self, root: _ElementFile, seen: set[str]) -> list[str]:
        """Post-order over all dependencies (build ones first, then runtime ones)."""
        order: list[str] = []
        if root.name in seen:
            return order
        seen.add(root.name)
        stack = [(root, iter(_all_deps(root)))]
        while stack:
            file, pending = stack[-1]
            for name in pending:
                if name not in seen:
                    seen.add(name)
                    child = self._files[name]
                    stack.append((child, iter(_all_deps(child))))
                    break
            else:
                stack.pop()
                order.append(file.name)
        return order

    # --- resolving one element ----------------------------------------------

    def _make_element(self, file: _ElementFile) -> Element:
        return file.project._resolve(file, self._elements)

    def _resolve(self, file: _ElementFile, elements: dict[str, Element]) -> Element:
        """Make ``file`` (one of this project's) an Element; ``elements`` holds its
        dependencies by qualified name."""
        node = file.node
        plugin = self._kinds[file.kind]()
        defaults = self._kind_defaults(file.kind)
        variables = self._element_variables(file, defaults)
        environment = self._element_environment(node, defaults, variables)
        nocache = [
            *(defaults.get_str_list("environment-nocache") or []),
            *(node.get_str_list("environment-nocache") or []),
        ]
        dependencies = [
            # (Positional: 40,000 of them on a large project.)
            Dependency(
                elements[ref.name],
                ref.build,
                ref.runtime,
                ref.mark,
                ref.field,
                tuple(ref.configs) or (None,),
            )
            for ref in file.deps
        ]
        overlay = node.get_mapping("config")
        base_config = defaults.get_mapping("config")
        # A copy when the element adds nothing: the kind's defaults are shared.
        # The kind's defaults are checked for leftover directives once (when
        # composed); a file without directive keys adds none. The element's
        # own values are not copied: its config is composed once, and only
        # read (by its kind) afterwards.
        config = (
            _compose_mappings(base_config, overlay, check=not node.plain, share=True)
            if overlay is not None or base_config is None
            else clone_mapping(base_config)
        )
        if config is None:
            config = MappingNode(mark=node.mark, path="config")
        kind_context = KindContext(
            element=file.name,
            node=node,
            config=config,
            variables=variables,
            dependencies=dependencies,
        )
        plugin.configure(kind_context)
        public = self._expanded_public(defaults, node, variables)
        sandbox = _sandbox(
            _sandbox_values(self._kind_sandbox(defaults), node.get_mapping("sandbox")), variables
        )
        sources = self._sources(file, plugin, variables)
        element = Element(
            project=self.name,
            name=file.name,
            normal_name=spec.normal_name(file.local),
            file=file.display,
            plugin=plugin,
            description=node.get_str("description") or "",
            dependencies=dependencies,
            variables=variables,
            environment=environment,
            environment_nocache=(
                self._environment_nocache | {n.as_str() for n in nocache}
                if nocache
                else self._environment_nocache
            ),
            public=public,
            config=_expanded_config(plugin, config, variables),
            build_os=sandbox.build_os,
            build_arch=sandbox.build_arch,
            sources=sources,
            build_uid=sandbox.build_uid,
            build_gid=sandbox.build_gid,
            fatal_warnings=self.fatal_warnings,
        )
        element.set_cache_key(cache_key(element))
        return element

    def _expanded_public(
        self, defaults: MappingNode, node: MappingNode, variables: Variables
    ) -> dict[str, Any]:
        """The element's public data, expanded. Without a ``public`` of its own,
        an element's is its kind's split rules: expanded once per kind and
        shared by every element that changes no variable they use (the same
        object: read-only, as :attr:`Element.public` says; a copy per element
        was a tenth of the loading time of a 10,000-element project)."""
        if "public" in node.entries:
            return cast("dict[str, Any]", expand_data(_public(defaults, node), variables))
        shared = variables.shared_value("public")
        if shared is not None:
            return cast("dict[str, Any]", shared)
        public_node = _public(defaults, node)
        public = cast("dict[str, Any]", expand_data(public_node, variables))
        variables.share_value("public", public, _strings(public_node))
        return public

    def _kind_sandbox(self, defaults: MappingNode) -> dict[str, ScalarNode]:
        """The ``sandbox:`` values of project.conf and of a kind's defaults, as
        :func:`_sandbox_values` layers them: the same for every element of the
        kind, so checked and layered once."""
        cached = self._sandbox_by_defaults.get(id(defaults))
        if cached is None or cached[0] is not defaults:
            base = _sandbox_values(
                _sandbox_values({}, self._sandbox_conf), defaults.get_mapping("sandbox")
            )
            cached = self._sandbox_by_defaults[id(defaults)] = (defaults, base)
        return cached[1]

    def _kind_defaults(self, kind: str) -> MappingNode:
        """The kind's defaults, with the project's split rules under its own and
        project.conf ``elements.KIND`` over them (BuildStream's order).

        Composed once per kind and shared: callers must not change the node
        (they compose copies of its parts)."""
        cached = self._defaults_by_kind.get(kind)
        if cached is None:
            cached = self._defaults_by_kind[kind] = self._compose_kind_defaults(kind)
        return cached

    def _compose_kind_defaults(self, kind: str) -> MappingNode:
        defaults = self._kinds[kind].defaults() or MappingNode(mark=Mark("<remex>", 0), path="")
        public = defaults.get_mapping("public")
        bst = public.get_mapping("bst") if public is not None else None
        splits = _compose_mappings(
            self._split_rules, bst.get_mapping("split-rules") if bst is not None else None
        )
        assert splits is not None
        split_overlay = data_to_node({"public": {"bst": {}}}, "<remex>")
        assert isinstance(split_overlay, MappingNode)
        overlay_bst = split_overlay.get_mapping("public")
        assert overlay_bst is not None
        bst_node = overlay_bst.get_mapping("bst")
        assert bst_node is not None
        bst_node.entries["split-rules"] = splits
        composed = _compose_mappings(defaults, split_overlay)
        assert composed is not None
        overrides = self._element_overrides.get_mapping(kind) if self._element_overrides else None
        if overrides is not None:
            overrides.validate_keys(_KIND_OVERRIDE_KEYS)
            composed = _compose_mappings(composed, overrides)
            assert composed is not None
        return composed

    def _element_variables(self, file: _ElementFile, defaults: MappingNode) -> Variables:
        element_variables = file.node.get_str_mapping("variables")
        for protected in PROTECTED_VARIABLES:
            if protected in element_variables:
                raise element_variables[protected].error(
                    f"variable {protected!r} is set by remex; it cannot be redefined"
                )
        definitions = self._variable_definitions(defaults, element_variables, file.local)
        # The shared layer is the same definitions but for the element's own
        # variables and the two names _finish_definitions sets per element.
        variables = Variables(
            definitions,
            shared=self._shared_variables(file.kind, defaults),
            changed=[*element_variables, "element-name", "max-jobs"],
        )
        variables.check()
        return variables

    def _shared_variables(self, kind: str, defaults: MappingNode) -> SharedVariables | None:
        """The variables every element of ``kind`` starts from, resolved once
        (None when those are broken: each element then reports it)."""
        entry = self._shared_by_kind.get(kind)
        if entry is None or entry[0] is not defaults:
            try:
                shared: SharedVariables | None = SharedVariables(
                    self._variable_definitions(defaults, {}, "")
                )
            except LoadError:
                shared = None
            entry = self._shared_by_kind[kind] = (defaults, shared)
        return entry[1]

    def _variable_definitions(
        self, defaults: MappingNode, element_variables: dict[str, ScalarNode], local: str
    ) -> dict[str, Definition]:
        # The layers below the element's are the same for every element of a
        # kind: made once per kind's defaults, then copied (same order).
        cached = self._base_definitions.get(id(defaults))
        if cached is None or cached[0] is not defaults:
            cached = self._base_definitions[id(defaults)] = (
                defaults,
                self._base_variable_definitions(defaults),
            )
        definitions = dict(cached[1])
        for name, value in element_variables.items():
            definitions[name] = Definition(value.as_str(), value.mark, value.path)
        return self._finish_definitions(definitions, local)

    def _base_variable_definitions(self, defaults: MappingNode) -> dict[str, Definition]:
        definitions = {
            name: Definition(value, None, f"variables.{name}")
            for name, value in DEFAULT_VARIABLES.items()
        }
        # BuildStream's layering: the project's, then the kind's defaults, then
        # the element's; the names it sets itself sit where bst prints them.
        for name, value in self._variables.items():
            definitions[name] = Definition(value.as_str(), value.mark, value.path)
        definitions["project-name"] = Definition(self.name, None, "project-name")
        definitions["max-jobs"] = Definition(str(self.max_jobs), None, "max-jobs")
        # As BuildStream: exported options after those (winning over project.conf's).
        for name, value in self._option_variables.items():
            definitions[name] = Definition(value.as_str(), value.mark, value.path)
        for name, value in defaults.get_str_mapping("variables").items():
            definitions[name] = Definition(value.as_str(), value.mark, value.path)
        return definitions

    @staticmethod
    def _finish_definitions(
        definitions: dict[str, Definition], local: str
    ) -> dict[str, Definition]:
        notparallel = definitions.get("notparallel")
        if notparallel is not None:
            if notparallel.value not in ("true", "True", "false", "False"):
                raise LoadError(
                    f"expected true or false, got {notparallel.value!r}",
                    file=notparallel.mark.file if notparallel.mark else None,
                    line=notparallel.mark.line if notparallel.mark else None,
                    field=notparallel.field,
                )
            if notparallel.value in ("true", "True"):
                # As BuildStream: notparallel forces max-jobs to 1.
                definitions["max-jobs"] = Definition("1", None, "max-jobs")
        definitions["element-name"] = Definition(local, None, "element-name")
        return definitions

    def _element_environment(
        self, node: MappingNode, defaults: MappingNode, variables: Variables
    ) -> dict[str, str]:
        environment = dict(DEFAULT_ENVIRONMENT)
        layers = (
            self._environment,
            defaults.get_str_mapping("environment"),
            node.get_str_mapping("environment"),
        )
        for layer in layers:
            for name, value in layer.items():
                environment[name] = variables.expand_node(value)
        return environment

    def _sources(self, file: _ElementFile, plugin: Kind, variables: Variables) -> list[Source]:
        sequence = file.node.get_sequence("sources")
        if sequence is None or not sequence.items:
            return []
        if not plugin.takes_sources:
            raise sequence.error(f"{plugin.name} elements take no sources")
        ctx = SourceContext(
            project_dir=self.directory,
            aliases=self.aliases,
            variables=variables,
            cas=self.cas,
            settings=self._source_settings,
            mirrors=self.mirrors,
            default_mirror=self.default_mirror,
        )
        sources = []
        for item in sequence.items:
            if not isinstance(item, MappingNode):
                raise item.error(f"expected a mapping describing a source, got {item.describe()}")
            sources.append(load_source(item, ctx))
        return sources


# --- helpers -------------------------------------------------------------------


def _normal_element_name(raw: str) -> str | None:
    """``./libs//foo.bst`` -> ``libs/foo.bst``; None when absolute or escaping."""
    if not raw or raw.startswith("/") or "\0" in raw:
        return None
    if not raw.startswith(".") and not raw.endswith("/") and "/." not in raw and "//" not in raw:
        return raw  # already normal (the usual case: normpath is a tenth of reading)
    name = posixpath.normpath(raw)
    if name == "." or name == ".." or name.startswith("../"):
        return None
    return name


def _qualified_name(raw: str) -> str | None:
    """``j.bst:./libs//foo.bst`` -> ``j.bst:libs/foo.bst``; None when a part is
    absolute, escaping or empty."""
    if ":" not in raw:
        return _normal_element_name(raw)
    parts = [_normal_element_name(part) for part in raw.split(":")]
    if any(part is None for part in parts):
        return None
    return ":".join(cast(list[str], parts))


def _read_dependencies(node: MappingNode) -> list[_DepRef]:
    """The dependencies in BuildStream's reading order, duplicates merged."""
    found: dict[str, _DepRef] = {}
    for key, build, runtime in _DEPENDENCY_LISTS:
        sequence = node.get_sequence(key)
        if sequence is None:
            continue
        for item in sequence.items:
            mapping = item if isinstance(item, MappingNode) else None
            config = mapping.get_mapping("config") if mapping is not None else None
            # (The usual dependency is a name: no list to make for it.)
            entries = (
                ((item, build, runtime),)
                if type(item) is ScalarNode
                else _dependency_entry(item, key, build, runtime)
            )
            for name_node, dep_build, dep_runtime in entries:
                raw = name_node.as_str()
                junction = mapping.get_str("junction") if mapping is not None else None
                name = _qualified_name(f"{junction}:{raw}" if junction else raw)
                if name is None:
                    raise name_node.error(
                        f"invalid dependency name {raw!r}: use a path relative to element-path"
                    )
                existing = found.get(name)
                if existing is None:
                    existing = found[name] = _DepRef(
                        name, dep_build, dep_runtime, item.mark, item.path
                    )
                else:
                    existing.build |= dep_build
                    existing.runtime |= dep_runtime
                if dep_build:
                    existing.configs.append(config)
    return list(found.values())


def _dependency_entry(
    item: object, key: str, build: bool, runtime: bool
) -> list[tuple[ScalarNode, bool, bool]]:
    if isinstance(item, ScalarNode):
        return [(item, build, runtime)]
    if not isinstance(item, MappingNode):
        assert isinstance(item, SequenceNode)
        raise item.error("a dependency is a string or a mapping with 'filename'")
    if key == "depends":
        item.validate_keys(("filename", "type", "config", "strict", "junction"))
        type_node = item.get_scalar("type")
        dep_type = "all" if type_node is None or type_node.value is None else type_node.value
        if dep_type not in ("build", "runtime", "all"):
            assert type_node is not None
            raise type_node.error(f"dependency type {dep_type!r} is not build, runtime or all")
        build, runtime = dep_type in ("build", "all"), dep_type in ("runtime", "all")
    else:
        if "type" in item:
            raise item.key_error("type", f"'type' is only allowed in 'depends', not in {key!r}")
        item.validate_keys(("filename", "config", "strict", "junction"))
    filename = item.get("filename")
    if filename is None:
        raise item.error("missing required key 'filename'", field=item.child_path("filename"))
    if isinstance(filename, ScalarNode):
        return [(filename, build, runtime)]
    if isinstance(filename, SequenceNode) and all(
        isinstance(i, ScalarNode) for i in filename.items
    ):
        return [(cast(ScalarNode, i), build, runtime) for i in filename.items]
    raise filename.error("expected a string or a list of strings")


def _all_deps(file: _ElementFile) -> list[str]:
    """Build dependencies then runtime ones, as BuildStream walks 'all' dependencies."""
    return [d.name for d in file.deps if d.build] + [d.name for d in file.deps if d.runtime]


def _cycle_error(
    files: list[_ElementFile], refs: list[_DepRef | None], closing: _DepRef
) -> LoadError:
    names = [f.name for f in files]
    start = names.index(closing.name)
    cycle = [*names[start:], closing.name]
    # The reference from the cycle's first element to the next one.
    first = refs[start + 1] if start + 1 < len(refs) else closing
    assert first is not None
    return LoadError(
        f"dependency cycle: {' -> '.join(cycle)}",
        file=first.mark.file,
        line=first.mark.line,
        field=first.field,
    )


@dataclass(frozen=True)
class _SandboxConfig:
    build_os: str
    build_arch: str
    build_uid: int | None
    build_gid: int | None


def _sandbox_values(
    below: dict[str, ScalarNode], node: MappingNode | None
) -> dict[str, ScalarNode]:
    """A ``sandbox:`` layer (checked) over the values of the layers below it:
    each key's value comes from the last layer setting it."""
    if node is None:
        return below
    node.validate_keys(_SANDBOX_KEYS, unsupported=_SANDBOX_UNSUPPORTED)
    values = dict(below)
    for key in _SANDBOX_KEYS:
        scalar = node.get_scalar(key)
        if scalar is not None:
            values[key] = scalar
    return values


def _sandbox(values: dict[str, ScalarNode], variables: Variables) -> _SandboxConfig:
    """The element's ``sandbox:`` as BuildStream composes it (the values of
    :func:`_sandbox_values` over project.conf's, then the kind's defaults
    (with project.conf ``elements: KIND: sandbox``), then the element's)."""
    os_node = values.get("build-os")
    arch_node = values.get("build-arch")
    build_os = host_os()
    if os_node is not None and os_node.value:
        build_os = variables.expand_node(os_node).lower()
    build_arch = host_arch()
    if arch_node is not None and arch_node.value:
        given = variables.expand_node(arch_node)
        arch = canonical_arch(given)
        if arch is None:
            raise arch_node.error(f"unknown architecture {given!r}")
        build_arch = arch
    ids: dict[str, int | None] = {}
    for key in ("build-uid", "build-gid"):
        id_node = values.get(key)
        ids[key] = None
        if id_node is not None and id_node.value is not None:
            text = variables.expand_node(id_node)
            try:
                ids[key] = int(text)
            except ValueError:
                raise id_node.error(f"{key} must be an integer, got {text!r}") from None
    return _SandboxConfig(build_os, build_arch, ids["build-uid"], ids["build-gid"])


def _check_min_version(node: ScalarNode | None) -> None:
    """project.conf ``min-version`` checked as BuildStream checks it: ``MAJOR.MINOR``
    with the major 2, the minor no newer than the BuildStream remex follows.

    BuildStream requires the key; remex accepts a project without it.
    """
    if node is None or node.value is None:
        return
    text = node.as_str()
    parts = text.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise node.error(
            f"malformed min-version {text!r}: expected MAJOR.MINOR with numbers (e.g. 2.0)"
        ) from None
    supported = f"{_FORMAT_VERSION[0]}.{_FORMAT_VERSION[1]}"
    if major != _FORMAT_VERSION[0]:
        raise node.error(
            f"the project requires BuildStream {major} (min-version {text}); "
            f"remex implements BuildStream {supported}'s format"
        )
    if minor > _FORMAT_VERSION[1]:
        raise node.error(
            f"the project requires at least BuildStream {major}.{minor} (min-version {text}); "
            f"remex implements BuildStream {supported}'s format"
        )


def _public(defaults: MappingNode, node: MappingNode) -> MappingNode:
    """The element's public data as BuildStream makes it: the element's own, whose
    ``bst.split-rules`` extend the project's and the kind's (other public data
    of the kind's defaults is not inherited, as in bst)."""
    mark = node.mark
    default_public = defaults.get_mapping("public")
    default_bst = default_public.get_mapping("bst") if default_public is not None else None
    base_splits = default_bst.get_mapping("split-rules") if default_bst is not None else None
    public = node.get_mapping("public")
    public = clone_mapping(public) if public is not None else MappingNode(mark=mark, path="public")
    bst = public.get_mapping("bst")
    bst = clone_mapping(bst) if bst is not None else MappingNode(mark=mark, path="public.bst")
    splits = _compose_mappings(base_splits, bst.get_mapping("split-rules"))
    bst.entries["split-rules"] = splits or MappingNode(mark=mark, path="public.bst.split-rules")
    bst.key_marks.setdefault("split-rules", mark)
    public.entries["bst"] = bst
    public.key_marks.setdefault("bst", mark)
    return public


def _strings(node: Node) -> Iterator[str]:
    """Every string in ``node``'s tree (mapping keys are not expanded: left out)."""
    if isinstance(node, ScalarNode):
        if node.value is not None:
            yield node.value
    elif isinstance(node, SequenceNode):
        for item in node.items:
            yield from _strings(item)
    elif isinstance(node, MappingNode):
        for value in node.entries.values():
            yield from _strings(value)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while loading (or submitting): a large project makes
    hundreds of thousands of long-lived nodes, and each collection pass would
    walk them all again (a quarter of the load time). The nodes form no
    cycles. After a load that worked, what exists is frozen (moved out of the
    collector's sight: the project lives as long as the process), else the
    first collection after the load would walk it all once more."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if enabled:
            gc.freeze()
    finally:
        if enabled:
            gc.enable()


def _expanded_config(plugin: Kind, config: MappingNode, variables: Variables) -> Any:
    """The element's config, expanded (:attr:`Element.config`): as its kind
    made it while configuring, else expanded here (errors reported here)."""
    expanded = plugin.expanded_config(config)
    return expand_data(config, variables) if expanded is None else expanded


def _compose_mappings(
    base: MappingNode | None,
    overlay: MappingNode | None,
    *,
    check: bool = True,
    share: bool = False,
) -> MappingNode | None:
    """``overlay`` composed onto ``base`` as BuildStream composes (list directives
    applied), then (``check``) checked for leftover directives; None when both
    are absent. ``share``: as :func:`compose`'s."""
    if overlay is None:
        return base
    if base is None:
        base = MappingNode(mark=overlay.mark, path=overlay.path)
    composed = compose(base, overlay, share=share)
    if check:
        assert_fully_composited(composed)
    return composed
