"""Project options (``options:`` in project.conf) and the ``(?)`` / ``(!)`` directives.

As BuildStream 2: an option is declared with a ``type`` (``bool``, ``enum``,
``flags``, ``arch``, ``os``, ``element-mask``), a ``description`` (required,
unused), a ``default`` where the type has one, ``values`` where it has them,
and an optional ``variable`` to export its value as a project variable.
Values come from the declaration's default, then the user's configuration
(YAML values), then the command line (strings); each is checked against the
declaration. Then :meth:`OptionPool.process_node` resolves ``(?)``
conditionals (each true branch composed onto the mapping holding the
``(?)``, in order) and ``(!)`` assertions, recursively.

Exported values are the strings BuildStream exports: a bool is ``1`` or
``0``, flags are joined with ``,`` (sorted when given from outside, as
written for the default), the others as they are.
"""

from __future__ import annotations

import os
import platform
import string
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from pipeline.elements.composition import compose_onto
from pipeline.elements.defaults import canonical_arch, host_arch
from pipeline.elements.errors import LoadError
from pipeline.elements.expressions import ExpressionError, evaluate
from pipeline.elements.nodes import MappingNode, Mark, Node, ScalarNode, SequenceNode

__all__ = ["OPTION_TYPES", "Option", "OptionPool", "host_os_name", "valid_symbol"]

OPTION_TYPES = ("bool", "enum", "flags", "element-mask", "arch", "os")
_COMMON_KEYS = ("type", "description", "variable")
_KEYS = {
    "bool": ("default",),
    "enum": ("values", "default"),
    "flags": ("values", "default"),
    "element-mask": ("default",),
    "arch": ("values",),
    "os": ("values",),
}
# project.conf keys BuildStream refuses inside a conditional at the top level.
PROJECT_RESTRICTED_KEYS = ("min-version", "name", "element-path", "junctions", "defaults",
                           "fatal-warnings", "ref-storage", "options", "plugins")  # fmt: skip
_TRUE = ("True", "true")
_FALSE = ("False", "false")


def valid_symbol(name: str, *, allow_dashes: bool) -> bool:
    """BuildStream's rule for option and variable names."""
    allowed = string.ascii_letters + string.digits + "_" + ("-" if allow_dashes else "")
    return bool(name) and not name[0].isdigit() and all(c in allowed for c in name)


def host_os_name() -> str:
    """The ``os`` option's default: the system name as ``uname`` gives it (``Linux``)."""
    return platform.uname().system


class Option:
    """One declared option and its current value.

    Attributes:
        name: the option name.
        type: one of :data:`OPTION_TYPES`.
        variable: the variable it exports to, or None.
        values: the allowed values (empty for bool).
        value: a bool (bool), a list of strings (flags, element-mask) or a string.
        mark: where it was declared.
    """

    def __init__(self, name: str, node: MappingNode, element_path: Path) -> None:
        self.name = name
        self.mark = node.mark
        self.path = node.path
        type_node = node.require_str("type")
        kind = type_node.as_str()
        if kind not in OPTION_TYPES:
            raise type_node.error(
                f"unknown option type {kind!r} (expected one of: {', '.join(OPTION_TYPES)})"
            )
        self.type = kind
        node.validate_keys(_COMMON_KEYS + _KEYS[kind])
        # BuildStream requires a description, though it does not use it.
        node.require_str("description")
        self.variable: str | None = None
        self.variable_node: ScalarNode | None = node.get_scalar("variable")
        if self.variable_node is not None and self.variable_node.value is not None:
            variable = self.variable_node.value
            if not valid_symbol(variable, allow_dashes=True):
                raise self.variable_node.error(
                    f"invalid variable name {variable!r}: use letters, digits, '_' and '-', "
                    "not starting with a digit"
                )
            self.variable = variable
        self.values: list[str] = []
        self.value: Any = None
        self._from_outside = False
        if kind == "bool":
            default = node.require_str("default")
            self.value = _parse_bool(default.as_str(), default)
        elif kind == "element-mask":
            self.values = _element_names(element_path)
            self.value = self._flags_default(node)
        else:
            values = node.get_str_list("values") or []
            if not values:
                raise node.error(f"no values given for {kind} option {name!r}",
                                 field=node.child_path("values"))  # fmt: skip
            self.values = [v.as_str() for v in values]
            if kind == "enum":
                default = node.require_str("default")
                self._check_one(default.as_str(), default)
                self.value = default.as_str()
            elif kind == "flags":
                self.value = self._flags_default(node)
            elif kind == "arch":
                self.value = self._arch_default(values)
            else:
                self.value = host_os_name()

    def set_string(self, text: str) -> None:
        """Set the value from a command-line string (``-o NAME VALUE``).

        Raises:
            LoadError: the value is not allowed; names the option, its
                declaration and the allowed values.
        """
        if self.type == "bool":
            self.value = _parse_bool(text, None, option=self)
        elif self.type in ("flags", "element-mask"):
            # "a, b ,c" -> ["a", "b", "c"], sorted as BuildStream sorts them.
            flags = "".join(text.split()).split(",")
            for flag in flags:
                self._check_one(flag, None)
            self.value = sorted(flags)
        else:
            self._check_one(text, None)
            self.value = text
        self._from_outside = True

    def set_node(self, node: Node) -> None:
        """Set the value from YAML (the user's configuration).

        Raises:
            LoadError: wrong type or a value not allowed, at ``node``.
        """
        if self.type in ("flags", "element-mask"):
            if not isinstance(node, SequenceNode) or not all(
                isinstance(i, ScalarNode) and i.value is not None for i in node.items
            ):
                raise node.error(f"{self.type} option {self.name!r} takes a list of strings")
            flags = [i.as_str() for i in node.items if isinstance(i, ScalarNode)]
            for flag, item in zip(flags, node.items, strict=True):
                self._check_one(flag, item)
            self.value = sorted(flags)
        else:
            if not isinstance(node, ScalarNode) or node.value is None:
                raise node.error(f"{self.type} option {self.name!r} takes a string")
            if self.type == "bool":
                self.value = _parse_bool(node.value, node, option=self)
            else:
                self._check_one(node.value, node)
                self.value = node.value
        self._from_outside = True

    def resolve(self) -> None:
        """Check a host-derived default (arch, os) is one the project allows.

        Raises:
            LoadError: the host's arch or os is not among the values and no value was given.
        """
        if self.type in ("arch", "os") and not self._from_outside:
            self._check_one(self.value, None, host=True)

    def exported(self) -> str:
        """The value as a variable's string, as BuildStream exports it."""
        if self.type == "bool":
            return "1" if self.value else "0"
        if self.type in ("flags", "element-mask"):
            return ",".join(self.value)
        return str(self.value)

    def allowed(self) -> str:
        """The allowed values, for messages."""
        if self.type == "bool":
            return "true, false"
        if not self.values:
            return "(none)"
        return ", ".join(self.values)

    def _flags_default(self, node: MappingNode) -> list[str]:
        given = node.get_str_list("default") or []
        for item in given:
            self._check_one(item.as_str(), item)
        # As written: BuildStream sorts values given from outside, not the default.
        return [item.as_str() for item in given]

    def _arch_default(self, values: list[ScalarNode]) -> str:
        host = host_arch()
        default: str | None = None
        for item in values:
            canonical = canonical_arch(item.as_str())
            if canonical is None:
                raise item.error(f"arch option {self.name!r}: unknown architecture {item.value!r}")
            if default is None and canonical == host:
                default = item.as_str()
        # The host's own name when the project does not list it: refused by
        # resolve() unless a value is given.
        return default if default is not None else host

    def _check_one(self, value: str, node: Node | None, *, host: bool = False) -> None:
        if value in self.values:
            return
        what = "the host's" if host else "invalid"
        message = (
            f"{what} value {value!r} for {self.type} option {self.name!r} is not allowed "
            f"(allowed: {self.allowed()})"
        )
        if host:
            message += "; choose one with -o"
        if node is not None:
            raise node.error(message)
        raise self.error(message)

    def error(self, message: str) -> LoadError:
        """A LoadError at the option's declaration."""
        return LoadError(message, file=self.mark.file, line=self.mark.line, field=self.path)


class OptionPool:
    """The project's options, their values, and the conditionals that use them.

    Args:
        element_path: the project's element folder (``element-mask`` values).
    """

    def __init__(self, element_path: Path) -> None:
        self.element_path = element_path
        self.options: dict[str, Option] = {}
        # Where ``options:`` was written: an unknown ``-o`` name is reported there.
        self._declared_at: Mark | None = None

    def __contains__(self, name: object) -> bool:
        return name in self.options

    def __getitem__(self, name: str) -> Option:
        return self.options[name]

    def declare(self, node: MappingNode | None) -> None:
        """Read the ``options:`` mapping of project.conf.

        Raises:
            LoadError: a bad name, type, key, default or values; at its line.
        """
        if node is None:
            return
        self._declared_at = self._declared_at or node.mark
        for name, definition in node.entries.items():
            if not valid_symbol(name, allow_dashes=False):
                raise node.key_error(
                    name,
                    f"invalid option name {name!r}: use letters, digits and '_', "
                    "not starting with a digit (no '-': options are names in expressions)",
                )
            if not isinstance(definition, MappingNode):
                raise definition.error(f"expected a mapping declaring option {name!r}, "
                                       f"got {definition.describe()}")  # fmt: skip
            self.options[name] = Option(name, definition, self.element_path)

    def set_yaml_values(self, node: MappingNode | None) -> None:
        """Values from the user's configuration (``projects: NAME: options:``).

        Raises:
            LoadError: an unknown option or a bad value, at its line.
        """
        if node is None:
            return
        for name, value in node.entries.items():
            option = self.options.get(name)
            if option is None:
                raise node.key_error(name, f"unknown option {name!r} ({self._declared()})")
            option.set_node(value)

    def set_string_values(self, values: Mapping[str, str], *, ignore_unknown: bool = False) -> None:
        """Values given as strings (``-o NAME VALUE``, the API's ``options``).

        Raises:
            LoadError: an unknown option, or a value not allowed (at the
                option's declaration, listing the allowed values).
        """
        for name, text in values.items():
            option = self.options.get(name)
            if option is None:
                if ignore_unknown:
                    continue
                mark = self._declared_at or Mark("project.conf", 1)
                raise LoadError(
                    f"unknown option {name!r} given ({self._declared()})",
                    file=mark.file,
                    line=mark.line,
                    field=f"options.{name}",
                )
            option.set_string(text)

    def resolve(self) -> None:
        """Final checks once every value is set (host-derived defaults).

        Raises:
            LoadError: the host's arch or os is not allowed by the project.
        """
        for option in self.options.values():
            option.resolve()

    def names(self) -> dict[str, Any]:
        """The options as names for expressions (typed as BuildStream types them)."""
        return {name: option.value for name, option in self.options.items()}

    def exported_variables(self) -> dict[str, ScalarNode]:
        """``variable -> value`` for options exporting one; marked at their ``variable`` key."""
        result: dict[str, ScalarNode] = {}
        for option in self.options.values():
            if option.variable is not None:
                assert option.variable_node is not None
                result[option.variable] = ScalarNode(
                    mark=option.variable_node.mark,
                    path=f"variables.{option.variable}",
                    value=option.exported(),
                )
        return result

    def values_as_strings(self) -> dict[str, str]:
        """Every option's exported string, by name (for reports and cache keys)."""
        return {name: self.options[name].exported() for name in sorted(self.options)}

    def process_node(self, node: MappingNode, *, restricted: Collection[str] = ()) -> None:
        """Resolve ``(?)`` and ``(!)`` in ``node`` and everything below, in place.

        On each mapping: an assertion ``(!)`` fails at once; each ``(?)`` item
        (``expression: mapping``) whose expression is true is composed onto
        the mapping, in order; repeated until no ``(?)`` is left (a branch may
        bring its own). Then nested mappings, also inside lists.

        Args:
            node: the mapping to process.
            restricted: keys a conditional may not set at this (top) level.

        Raises:
            LoadError: an assertion, a bad expression (naming it), a branch
                that is not a mapping, a restricted key; each at its line.
        """
        while self._process_one(node, restricted):
            pass
        for value in node.entries.values():
            self._process_value(value)

    def _process_value(self, value: Node) -> None:
        if isinstance(value, MappingNode):
            self.process_node(value)
        elif isinstance(value, SequenceNode):
            for item in value.items:
                self._process_value(item)

    def _process_one(self, node: MappingNode, restricted: Collection[str]) -> bool:
        assertion = node.entries.get("(!)")
        if assertion is not None:
            text = assertion.as_str() if isinstance(assertion, ScalarNode) else None
            if text is None:
                raise assertion.error("(!) takes a message (a string)")
            raise node.key_error("(!)", f"assertion failed: {text.strip()}")
        conditions = node.entries.get("(?)")
        if conditions is None:
            return False
        if not isinstance(conditions, SequenceNode):
            raise conditions.error(
                "(?) takes a list of conditions, each 'expression: mapping', "
                f"got {conditions.describe()}"
            )
        del node.entries["(?)"]
        node.key_marks.pop("(?)", None)
        names = self.names()
        for condition in conditions.items:
            if not isinstance(condition, MappingNode) or len(condition.entries) != 1:
                raise condition.error(
                    "a condition is a mapping with one key, 'expression: mapping'"
                )
            (expression, branch), = condition.entries.items()  # fmt: skip
            mark = condition.key_marks.get(expression, condition.mark)
            try:
                applies = evaluate(expression, names)
            except ExpressionError as exc:
                raise _at(mark, condition.path,
                          f"cannot evaluate condition {expression!r}: {exc}") from None  # fmt: skip
            if not isinstance(branch, MappingNode):
                raise _at(mark, condition.path,
                          f"condition {expression!r}: only a mapping can be composed, "
                          f"got {branch.describe()}")  # fmt: skip
            for key in restricted:
                if key in branch.entries:
                    key_mark = branch.key_marks.get(key, branch.mark)
                    raise _at(
                        key_mark, node.child_path(key), f"{key!r} cannot be set conditionally"
                    )
            if applies:
                # The mapping keeps its own place (BuildStream moves it to the
                # branch's): "missing key" errors then point at the mapping.
                mark = node.mark
                compose_onto(node, branch)
                node.mark = mark
        return True

    def _declared(self) -> str:
        if not self.options:
            return "the project declares no options"
        return f"declared options: {', '.join(sorted(self.options))}"


def _parse_bool(text: str, node: Node | None, *, option: Option | None = None) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    what = f"bool option {option.name!r}" if option is not None else "a bool option's default"
    message = f"invalid value {text!r} for {what} (allowed: true, false)"
    if node is not None:
        raise node.error(message)
    assert option is not None
    raise option.error(message)


def _element_names(element_path: Path) -> list[str]:
    names = []
    for folder, dirs, files in os.walk(element_path):
        dirs.sort()
        for file in sorted(files):
            if file.endswith(".bst"):
                names.append(Path(folder, file).relative_to(element_path).as_posix())
    return names


def _at(mark: Mark, field: str, message: str) -> LoadError:
    return LoadError(message, file=mark.file, line=mark.line, field=field)
