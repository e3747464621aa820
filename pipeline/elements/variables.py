"""``%{name}`` variables, expanded recursively as BuildStream does.

A reference is ``%{`` + a name (a letter, then letters, digits, ``_`` or
``-``) + ``}``; anything else, a lone ``%`` included, is literal text
(BuildStream has no escape). Every definition is resolved when the element is
loaded, used or not, so an undefined or circular reference anywhere is an
error at load time, as in BuildStream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import Mark, ScalarNode

__all__ = ["Definition", "Variables"]

_REFERENCE = re.compile(r"%\{([a-zA-Z][a-zA-Z0-9_-]*)\}")


@dataclass(frozen=True)
class Definition:
    """One variable's unexpanded value and where it was defined (None: a built-in)."""

    value: str
    mark: Mark | None
    field: str


class Variables:
    """An element's variables: definitions, later layers already applied over earlier."""

    def __init__(self, definitions: dict[str, Definition]) -> None:
        self._definitions = definitions
        self._resolved: dict[str, str] = {}

    def check(self) -> None:
        """Resolve every definition.

        Raises:
            LoadError: an undefined or circular reference, at the definition using it.
        """
        for name in self._definitions:
            self[name]

    def __getitem__(self, name: str) -> str:
        try:
            return self._resolve(name, [])
        except RecursionError:
            raise self.error(name, "variable references nested too deep") from None

    def __contains__(self, name: object) -> bool:
        return name in self._definitions

    def get(self, name: str) -> str | None:
        """The expanded value, or None when ``name`` is not defined."""
        return self[name] if name in self._definitions else None

    def as_dict(self) -> dict[str, str]:
        """Every variable, expanded, in definition order (as ``bst show`` prints them)."""
        return {name: self[name] for name in self._definitions}

    def expand(self, text: str, *, mark: Mark, field: str) -> str:
        """Expand the references in ``text``, written at ``mark`` in ``field``.

        Raises:
            LoadError: a reference to an undefined variable (at ``mark``/``field``),
                or a definition it uses is broken (at that definition).
        """
        for name in _REFERENCE.findall(text):
            if name not in self._definitions:
                raise LoadError(
                    f"undefined variable {name!r}", file=mark.file, line=mark.line, field=field
                )
        return _REFERENCE.sub(lambda m: self[m.group(1)], text)

    def expand_node(self, node: ScalarNode) -> str:
        """Expand a scalar node's string (a null is an error)."""
        return self.expand(node.as_str(), mark=node.mark, field=node.path)

    def _resolve(self, name: str, stack: list[str]) -> str:
        done = self._resolved.get(name)
        if done is not None:
            return done
        if name in stack:
            cycle = [*stack[stack.index(name) :], name]
            raise self.error(cycle[0], f"circular variable reference: {' -> '.join(cycle)}")
        definition = self._definitions[name]
        stack.append(name)
        parts: list[str] = []
        last = 0
        for match in _REFERENCE.finditer(definition.value):
            ref = match.group(1)
            if ref not in self._definitions:
                raise self.error(name, f"undefined variable {ref!r}")
            parts.append(definition.value[last : match.start()])
            parts.append(self._resolve(ref, stack))
            last = match.end()
        parts.append(definition.value[last:])
        stack.pop()
        value = "".join(parts)
        self._resolved[name] = value
        return value

    def error(self, name: str, message: str) -> LoadError:
        """A LoadError at the definition of ``name``."""
        definition = self._definitions[name]
        if definition.mark is None:
            return LoadError(message, file="<remex defaults>", field=definition.field)
        return LoadError(
            message, file=definition.mark.file, line=definition.mark.line, field=definition.field
        )
