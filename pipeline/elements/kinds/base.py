"""The base class of element kinds, and the recipe a kind compiles an element to.

A kind is everything remex knows about one BuildStream element kind: its
defaults (variables, environment, config, public data), how its ``config`` is
checked and read, what of it enters the cache key, and how an element of the
kind is built, expressed as a :class:`Recipe` that the element turns into a
:class:`~pipeline.spec.BuildSpec`. The stages only ever see that spec, so
they never ask which kind they build.

One instance is made per element (it holds that element's config).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline import spec
from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import MappingNode, Mark, Node, ScalarNode, SequenceNode
from pipeline.elements.plugins import CORE_KIND_NAMES, core_kind_defaults
from pipeline.elements.variables import Variables

if TYPE_CHECKING:
    from pipeline.elements.element import Dependency, Element

__all__ = [
    "Kind",
    "KindContext",
    "Recipe",
    "StagedDependency",
    "check_domains",
    "data_to_node",
    "expand_data",
    "get_bool",
    "get_str_list",
    "node_to_data",
    "require_dependency_types",
    "split_select",
]


@dataclass(frozen=True, init=False)
class StagedDependency:
    """One dependency put into the input tree: its element, where, and which files."""

    element: Element
    path: str = ""
    select: spec.SelectSpec | None = None

    def __init__(
        self, element: Element, path: str = "", select: spec.SelectSpec | None = None
    ) -> None:
        # At once, as Dependency's (one per dependency of every element's spec).
        self.__dict__.update(element=element, path=path, select=select)


@dataclass(frozen=True)
class Recipe:
    """How an element is built; see :class:`~pipeline.spec.BuildSpec` for the meaning."""

    dependencies: list[StagedDependency] = field(default_factory=list)
    source_root: str = ""
    command: spec.CommandSpec | None = None
    files_root: str = ""
    files_target: str = ""
    select_outputs: bool = False


@dataclass(frozen=True)
class KindContext:
    """What a kind reads its element from.

    Attributes:
        element: the element's name (``libs/foo.bst``).
        node: the whole element file (for marks in messages).
        config: ``config``, the kind's defaults composed with the element's.
        variables: the element's variables.
        dependencies: the element's direct dependencies, resolved, in order.
    """

    element: str
    node: MappingNode
    config: MappingNode
    variables: Variables
    dependencies: list[Dependency]


class Kind(ABC):
    """One element kind. Subclasses live one per file in :mod:`pipeline.elements.kinds`.

    Class attributes:
        name: the ``kind:`` value.
        takes_sources: whether ``sources`` are allowed.
        runs_commands: whether building runs commands in a sandbox (then the
            environment and the sandbox's platform enter the cache key).
        builds: False for kinds that make no artifact (``junction``, ``link``).
    """

    name: ClassVar[str]
    takes_sources: ClassVar[bool] = True
    runs_commands: bool = False
    builds: ClassVar[bool] = True

    @classmethod
    def defaults(cls) -> MappingNode | None:
        """The kind's defaults (``variables``, ``environment``, ``config``,
        ``public``, ...) as a YAML tree, or None when it has none. A core
        kind's are in ``pipeline/elements/kinds_data/KIND.yaml``."""
        if cls.name in CORE_KIND_NAMES:
            return core_kind_defaults(cls.name)
        return None

    @abstractmethod
    def configure(self, ctx: KindContext) -> None:
        """Read and check the element's config and dependencies.

        Raises:
            LoadError: naming the file, line and field.
        """

    @abstractmethod
    def key_config(self) -> dict[str, Any]:
        """The configuration as it enters the cache key (expanded)."""

    def expanded_config(self, config: MappingNode) -> Any | None:
        """``expand_data(config, variables)`` for the ``config`` just given to
        :meth:`configure`, when configure expanded every string in it already
        (made from what it kept, nothing is expanded twice); None when the
        loader is to expand it (and report what is wrong in it)."""
        return None

    def integration_commands(self, element: Element) -> list[str]:
        """The element's integration commands: its public ``bst.integration-commands``
        (``filter`` passes its dependency's on too)."""
        bst = element.public.get("bst") or {}
        return list(bst.get("integration-commands") or [])

    @abstractmethod
    def recipe(self, element: Element) -> Recipe:
        """How to build ``element`` (whose dependencies all have cache keys)."""


def node_to_data(node: Node) -> Any:
    """A node as plain JSON-like data (strings, lists, dicts; None for null)."""
    if isinstance(node, ScalarNode):
        return node.value
    if isinstance(node, SequenceNode):
        return [node_to_data(item) for item in node.items]
    assert isinstance(node, MappingNode)
    return {key: node_to_data(value) for key, value in node.entries.items()}


def expand_data(node: Node, variables: Variables) -> Any:
    """Like :func:`node_to_data`, with ``%{variables}`` expanded in every string.

    Raises:
        LoadError: an undefined variable, at the string using it.
    """
    if isinstance(node, ScalarNode):
        return None if node.value is None else variables.expand_node(node)
    if isinstance(node, SequenceNode):
        return [expand_data(item, variables) for item in node.items]
    assert isinstance(node, MappingNode)
    return {key: expand_data(value, variables) for key, value in node.entries.items()}


def require_dependency_types(
    kind: str, dependencies: list[Dependency], *, build: bool | None, runtime: bool | None
) -> None:
    """Refuse dependencies whose types the kind does not allow.

    Args:
        build, runtime: True: every dependency must have the type; False: none
            may have it; None: either.
    """
    for dep in dependencies:
        wrong = (build is not None and dep.build != build) or (
            runtime is not None and dep.runtime != runtime
        )
        if wrong:
            wanted = {
                (True, True): "both build and runtime dependencies (in 'depends' without a type)",
                (True, False): "build dependencies only",
                (True, None): "build dependencies",
                (None, False): "not runtime dependencies",
                (False, None): "not build dependencies",
            }.get((build, runtime), "of another type")
            raise LoadError(
                f"all dependencies of a {kind} element must be {wanted}",
                file=dep.mark.file,
                line=dep.mark.line,
                field=dep.field,
            )


def data_to_node(data: Any, file: str, path: str = "") -> Node:
    """Plain data (strings, lists, dicts) as nodes marked at line 0 of ``file``.

    For remex's own defaults, so that they compose with the user's YAML.
    """
    mark = Mark(file, 0)
    if isinstance(data, dict):
        result = MappingNode(mark=mark, path=path)
        for key, value in data.items():
            result.entries[key] = data_to_node(value, file, result.child_path(key))
            result.key_marks[key] = mark
        return result
    if isinstance(data, list):
        return SequenceNode(
            mark=mark,
            path=path,
            items=[data_to_node(item, file, f"{path}[{i}]") for i, item in enumerate(data)],
        )
    return ScalarNode(mark=mark, path=path, value=None if data is None else str(data))


def get_bool(config: MappingNode, key: str) -> bool:
    """A boolean as BuildStream reads one (``true``/``True``/``false``/``False``)."""
    node = config.require_str(key)
    value = node.as_str()
    if value in ("true", "True"):
        return True
    if value in ("false", "False"):
        return False
    raise node.error(f"expected true or false, got {value!r}")


def get_str_list(config: MappingNode, key: str) -> list[str]:
    """A list of plain strings (no variables), empty when absent."""
    return [node.as_str() for node in config.get_str_list(key) or []]


def split_select(
    kind: str,
    node: MappingNode,
    element: Element,
    include: list[str],
    exclude: list[str],
    orphans: bool,
) -> spec.SelectSpec | None:
    """What of ``element``'s files a split selection takes; None when it takes all
    (as BuildStream: orphans and neither include nor exclude)."""
    del kind, node
    if orphans and not include and not exclude:
        return None
    # As written: the filter (split_rules.path_filter) reads an empty include
    # as every domain, and ignores domains this element does not define.
    return {
        "domains": element.split_rules,
        "include": list(include),
        "exclude": list(exclude),
        "orphans": orphans,
    }


def check_domains(
    config: MappingNode, key: str, domains: list[str], known: set[str], what: str
) -> None:
    """Refuse a split domain that none of ``what`` defines.

    Raises:
        LoadError: at the list, naming the domain and the known ones.
    """
    for domain in domains:
        if domain not in known:
            sequence = config.get(key)
            assert sequence is not None
            raise sequence.error(
                f"split domain {domain!r} is not defined by {what} "
                f"(known domains: {', '.join(sorted(known)) or 'none'})"
            )
