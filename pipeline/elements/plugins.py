"""Plugin element kinds, read as data: project.conf ``plugins:`` and the core kinds' defaults.

remex never imports a plugin (importing BuildStream modules in remex processes
clashes in protobuf's descriptor pool). A BuildElement kind is fully described
by its YAML defaults (variables, config command lists, environment), so remex
reads that file and checks, by parsing the plugin's Python with :mod:`ast`, that
the class its ``setup()`` returns derives from ``BuildElement``. Any other kind
is refused: its behaviour lives in Python that remex does not run.

project.conf, as BuildStream 2 reads it::

    plugins:
    - origin: pip                      # an installed distribution
      package-name: buildstream-plugins   # a requirement: "name" or "name>=2.0"
      elements: [autotools, cmake]     # or mappings {kind: K, allow-deprecated: B}
      sources: [git]
    - origin: local                    # a folder in the project with KIND.py (+ KIND.yaml)
      path: plugins/elements
      elements: [mykind]

A pip kind is found as bst finds it: the distribution's entry point ``KIND``
in group ``buildstream.plugins.elements`` names a module; the plugin is that
module's file and its defaults the ``.yaml`` next to it (no YAML: no defaults).

bst resolves a kind only when an element uses it, so an uninstalled package
is an error only then: :func:`declare_plugins` checks the declarations,
:meth:`PluginDeclaration.resolve` finds the files.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pipeline.elements.composition import clone_mapping
from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import (
    MappingNode,
    Mark,
    Node,
    ScalarNode,
    SequenceNode,
    load_yaml,
    note_read,
    reading,
)

__all__ = [
    "CORE_KIND_NAMES",
    "PluginDeclaration",
    "PluginKind",
    "SourcePluginDeclaration",
    "core_kind_defaults",
    "declare_plugins",
    "declare_source_plugins",
    "load_plugins",
    "normalise_package",
    "source_plugin_kinds",
]

#: BuildStream 2's core element kinds, whose defaults remex ships in kinds_data/.
CORE_KIND_NAMES = ("manual", "import", "stack", "compose", "filter", "script", "junction", "link")

_KINDS_DATA = Path(__file__).with_name("kinds_data")
_ORIGINS = ("pip", "local", "junction")
_COMMON_KEYS = ("origin", "elements", "sources", "source-mirrors", "allow-deprecated")
_ELEMENT_GROUP = "buildstream.plugins.elements"
# A distribution name as PEP 508 spells it; what follows is a version specifier.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")

_ErrorFactory = Callable[[str], LoadError]


@dataclass(frozen=True)
class PluginKind:
    """An element kind from a plugin, as remex uses it.

    Attributes:
        kind: the kind's name (``autotools``).
        origin: where it comes from, for messages (``pip package buildstream-plugins 2.8.0``).
        defaults: the kind's YAML defaults; marks name that file. Empty when the
            plugin has no YAML file.
        build_element: whether the plugin's class derives from ``BuildElement``.
    """

    kind: str
    origin: str
    defaults: MappingNode
    build_element: bool


@dataclass(frozen=True)
class PluginDeclaration:
    """One element kind named under project.conf ``plugins:``, not looked up yet.

    Attributes:
        kind: the kind's name.
        origin: ``pip`` or ``local``.
        source: the package requirement (pip) or the folder relative to the project (local).
        mark: where the kind is named in project.conf; errors point there.
        field: the field path of that entry (``plugins[0].elements[1]``).
        project_dir: the project folder.
    """

    kind: str
    origin: Literal["pip", "local"]
    source: str
    mark: Mark
    field: str
    project_dir: Path

    def resolve(self) -> PluginKind:
        """Find the kind's files and read them.

        Raises:
            LoadError: at the project.conf entry: the package is not installed
                (saying what to ``pip install``), has another version than
                required, has no such element kind, the local file is missing,
                or the kind is not a BuildElement.
        """
        if self.origin == "pip":
            plugin, yaml_file, display, origin = self._find_pip()
        else:
            plugin, yaml_file, display, origin = self._find_local()
        build_element = _is_build_element(plugin, self._error)
        if not build_element:
            raise self._error(
                f"element kind {self.kind!r} from {origin} is not a BuildElement: "
                "remex supports only BuildElement plugin kinds (it reads their YAML "
                "defaults as data and never runs plugin code)"
            )
        if yaml_file is not None and yaml_file.is_file():
            defaults = load_yaml(yaml_file, display)
        else:
            if yaml_file is not None:
                note_read(str(yaml_file), None)  # (missing: a kept plan needs it still missing)
            defaults = MappingNode(mark=Mark(display, 1), path="")
        return PluginKind(self.kind, origin, defaults, build_element)

    def _find_pip(self) -> tuple[Path, Path | None, str, str]:
        name, specifier = _parse_requirement(self.source, self._error)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise self._error(
                f"element kind {self.kind!r} needs the pip package {name!r}, which is not "
                f"installed; run: pip install {shlex.quote(self.source)}"
            ) from None
        version = dist.version
        if specifier and not _version_fits(version, specifier, self._error):
            raise self._error(
                f"element kind {self.kind!r}: pip package {name!r} {version} is installed "
                f"but {self.source!r} is required; run: pip install {shlex.quote(self.source)}"
            )
        origin = f"pip package {name} {version}"
        entry = next(
            (ep for ep in dist.entry_points.select(group=_ELEMENT_GROUP) if ep.name == self.kind),
            None,
        )
        if entry is None:
            raise self._error(f"pip package {name!r} {version} has no element kind {self.kind!r}")
        module_file = _module_file(dist, entry.module)
        if module_file is None:
            raise self._error(
                f"element kind {self.kind!r}: the file of module {entry.module!r} of pip "
                f"package {name!r} is not installed"
            )
        rel = entry.module.replace(".", "/")
        return module_file, module_file.with_suffix(".yaml"), f"{name}:{rel}.yaml", origin

    def _find_local(self) -> tuple[Path, Path | None, str, str]:
        folder = self.project_dir / self.source
        plugin = folder / f"{self.kind}.py"
        if not plugin.is_file():
            raise self._error(
                f"element kind {self.kind!r}: no plugin file {self.source}/{self.kind}.py "
                "in the project"
            )
        return (
            plugin,
            folder / f"{self.kind}.yaml",
            f"{self.source}/{self.kind}.yaml",
            (f"local plugins folder {self.source}"),
        )

    def _error(self, message: str) -> LoadError:
        return LoadError(message, file=self.mark.file, line=self.mark.line, field=self.field)


def load_plugins(node: Node | None, project_dir: Path) -> dict[str, PluginKind]:
    """Every element kind project.conf ``plugins:`` declares, found and read now.

    Args:
        node: the value of ``plugins`` (a list), or None when absent.
        project_dir: the project folder (``origin: local`` paths are inside it).

    Returns:
        kind name -> :class:`PluginKind`.

    Raises:
        LoadError: as :func:`declare_plugins` and :meth:`PluginDeclaration.resolve`.
    """
    return {kind: decl.resolve() for kind, decl in declare_plugins(node, project_dir).items()}


def declare_plugins(node: Node | None, project_dir: Path) -> dict[str, PluginDeclaration]:
    """Check project.conf ``plugins:`` and list the element kinds it declares.

    Raises:
        LoadError: at the offending entry: not a list of mappings, an unknown or
            missing origin, ``origin: junction`` (not supported by remex), a
            bad key, a malformed ``package-name``, a ``path`` outside the
            project or not a folder, a kind declared twice.
    """
    declared: dict[str, PluginDeclaration] = {}
    for origin_node in _origin_nodes(node):
        origin, source = _origin_of(origin_node, project_dir)
        for kind, mark, field in _kinds(origin_node, "elements"):
            if kind in declared:
                raise LoadError(
                    f"more than one element plugin registered as kind {kind!r}",
                    file=mark.file,
                    line=mark.line,
                    field=field,
                )
            declared[kind] = PluginDeclaration(kind, origin, source, mark, field, project_dir)
    return declared


@dataclass(frozen=True)
class SourcePluginDeclaration:
    """One source kind named under project.conf ``plugins:``.

    Attributes:
        kind: the source kind's name.
        origin: ``pip`` or ``local``.
        source: the package requirement (pip) or the folder in the project (local).
        package: the normalised distribution name (pip; ``""`` for local).
        mark: where the kind is named in project.conf.
        field: the field path of that entry (``plugins[0].sources[1]``).
    """

    kind: str
    origin: Literal["pip", "local"]
    source: str
    package: str
    mark: Mark
    field: str

    def describe(self) -> str:
        """Where the kind comes from, for messages."""
        if self.origin == "pip":
            return f"pip package {self.package}"
        return f"local plugins folder {self.source}"


def declare_source_plugins(
    node: Node | None, project_dir: Path
) -> dict[str, SourcePluginDeclaration]:
    """The source kinds project.conf ``plugins:`` declares, by kind.

    remex runs no source plugin; a source kind a plugin declares is used only
    when remex implements it with the same configuration (see
    :mod:`pipeline.elements.sources`).

    Raises:
        LoadError: as :func:`declare_plugins`, or a source kind declared twice.
    """
    kinds: dict[str, SourcePluginDeclaration] = {}
    for origin_node in _origin_nodes(node):
        origin, source = _origin_of(origin_node, project_dir)
        package = ""
        if origin == "pip":
            package = normalise_package(_parse_requirement(source, origin_node.error)[0])
        for kind, mark, field in _kinds(origin_node, "sources"):
            if kind in kinds:
                raise LoadError(
                    f"more than one source plugin registered as kind {kind!r}",
                    file=mark.file,
                    line=mark.line,
                    field=field,
                )
            kinds[kind] = SourcePluginDeclaration(kind, origin, source, package, mark, field)
    return kinds


def source_plugin_kinds(node: Node | None, project_dir: Path) -> dict[str, str]:
    """The source kinds project.conf ``plugins:`` declares: kind -> origin description."""
    return {
        kind: f"{decl.origin} {decl.source}"
        for kind, decl in declare_source_plugins(node, project_dir).items()
    }


def normalise_package(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def core_kind_defaults(kind: str) -> MappingNode:
    """The defaults BuildStream 2.8's core element kind ``kind`` starts from.

    Raises:
        KeyError: ``kind`` is not a core kind.
    """
    if kind not in CORE_KIND_NAMES:
        raise KeyError(kind)
    # Every element of the kind starts from them: read once, a copy each time
    # (callers compose onto what they get).
    return clone_mapping(_read_core_kind_defaults(kind))


@cache
def _read_core_kind_defaults(kind: str) -> MappingNode:
    return load_yaml(_KINDS_DATA / f"{kind}.yaml", f"<core kind {kind}>/{kind}.yaml")


# ---------------------------------------------------------------------------


def _origin_nodes(node: Node | None) -> list[MappingNode]:
    if node is None or (isinstance(node, ScalarNode) and node.value is None):
        return []
    if not isinstance(node, SequenceNode):
        raise node.error(f"expected a list of plugin origins, got {node.describe()}")
    result: list[MappingNode] = []
    for item in node.items:
        if not isinstance(item, MappingNode):
            raise item.error(f"expected a mapping with an 'origin', got {item.describe()}")
        result.append(item)
    return result


def _origin_of(node: MappingNode, project_dir: Path) -> tuple[Literal["pip", "local"], str]:
    origin_scalar = node.require_str("origin")
    origin = origin_scalar.as_str()
    if origin not in _ORIGINS:
        raise origin_scalar.error(
            f"unknown plugin origin {origin!r} (expected one of: {', '.join(_ORIGINS)})"
        )
    if origin == "junction":
        raise origin_scalar.error(
            "plugins from a junction (origin: junction) are not supported by remex; "
            "install the plugin package and declare it with origin: pip"
        )
    if origin == "pip":
        node.validate_keys(("package-name", *_COMMON_KEYS))
        package = node.require_str("package-name")
        _parse_requirement(package.as_str(), package.error)
        return "pip", package.as_str()
    node.validate_keys(("path", *_COMMON_KEYS))
    path_node = node.require_str("path")
    rel = path_node.as_str()
    root = project_dir.resolve()
    folder = (project_dir / rel).resolve()
    if Path(rel).is_absolute() or (folder != root and root not in folder.parents):
        raise path_node.error(f"plugin path {rel!r} is outside the project")
    if not folder.is_dir():
        raise path_node.error(f"plugin path {rel!r} is not a folder in the project")
    return "local", rel.rstrip("/") or "."


def _kinds(node: MappingNode, key: str) -> list[tuple[str, Mark, str]]:
    """(kind, where, field) for each entry of ``elements`` or ``sources``."""
    sequence = node.get_sequence(key)
    if sequence is None:
        return []
    result: list[tuple[str, Mark, str]] = []
    for item in sequence.items:
        if isinstance(item, ScalarNode):
            result.append((item.as_str(), item.mark, item.path))
        elif isinstance(item, MappingNode):
            item.validate_keys(("kind", "allow-deprecated"))
            kind = item.require_str("kind")
            result.append((kind.as_str(), kind.mark, kind.path))
        else:
            raise item.error("expected a kind name or a mapping with 'kind'")
    return result


def _parse_requirement(text: str, error: _ErrorFactory) -> tuple[str, str]:
    """(distribution name, version specifier) of a requirement such as ``pkg>=2.0``."""
    text = text.strip()
    match = _NAME.match(text)
    if match is None:
        raise error(f"malformed package-name {text!r}: expected a distribution name")
    specifier = text[match.end() :].strip()
    if specifier:
        _specifier_set(specifier, text, error)
    return match.group(0), specifier


def _version_fits(version: str, specifier: str, error: _ErrorFactory) -> bool:
    return bool(_specifier_set(specifier, specifier, error).contains(version, prereleases=True))


def _specifier_set(specifier: str, text: str, error: _ErrorFactory) -> Any:
    # packaging is needed only for version constraints (bst reads them with it too).
    try:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
    except ImportError:  # pragma: no cover - packaging comes with pip and pytest
        raise error(
            f"package-name {text!r} has a version constraint, which needs the "
            "'packaging' module: pip install packaging"
        ) from None
    try:
        return SpecifierSet(specifier)
    except InvalidSpecifier as exc:
        raise error(f"malformed package-name {text!r}: {exc}") from None


def _module_file(dist: metadata.Distribution, module: str) -> Path | None:
    """The installed file of ``module`` (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``)."""
    rel = module.replace(".", "/")
    wanted = {f"{rel}.py", f"{rel}/__init__.py"}
    for record in dist.files or ():
        if record.as_posix() in wanted:
            located = Path(str(dist.locate_file(record)))
            if located.is_file():
                return located
    # Editable and some system installs list no files: look along sys.path.
    for entry in sys.path:
        for candidate in wanted:
            path = Path(entry or ".") / candidate
            if path.is_file():
                return path
    return None


def _is_build_element(plugin: Path, error: _ErrorFactory) -> bool:
    """Whether the class ``setup()`` returns derives from BuildStream's BuildElement.

    Follows base classes defined in the same file; a base imported from
    elsewhere counts only when it is ``buildstream.BuildElement`` (however it
    was imported or renamed).
    """
    try:
        if reading():
            note_read(str(plugin), plugin.stat())
        tree = ast.parse(plugin.read_bytes(), filename=str(plugin))
    except (OSError, SyntaxError, ValueError) as exc:
        raise error(f"cannot read plugin {plugin.name}: {exc}") from None
    names, modules = _buildstream_imports(tree)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    returned = _setup_returns(tree)
    if returned is None:
        raise error(f"plugin {plugin.name} has no setup() returning its class")

    def derives(class_name: str, seen: frozenset[str]) -> bool:
        if class_name in names:
            return True
        cls = classes.get(class_name)
        if cls is None or class_name in seen:
            return False
        for base in cls.bases:
            if isinstance(base, ast.Name) and derives(base.id, seen | {class_name}):
                return True
            if (
                isinstance(base, ast.Attribute)
                and base.attr == "BuildElement"
                and _dotted(base.value) in modules
            ):
                return True
        return False

    return derives(returned, frozenset())


def _buildstream_imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Local names bound to BuildElement, and names bound to the buildstream module."""
    names: set[str] = set()
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in (
            "buildstream",
            "buildstream.buildelement",
        ):
            for alias in node.names:
                if alias.name == "BuildElement":
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "buildstream":
                    modules.add(alias.asname or "buildstream")
                elif alias.name == "buildstream.buildelement":
                    # "import buildstream.buildelement" binds "buildstream".
                    modules.add(alias.asname or "buildstream.buildelement")
                    if alias.asname is None:
                        modules.add("buildstream.buildelement")
    return names, modules


def _setup_returns(tree: ast.Module) -> str | None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "setup":
            for statement in ast.walk(node):
                if isinstance(statement, ast.Return) and isinstance(statement.value, ast.Name):
                    return statement.value.id
    return None


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""
