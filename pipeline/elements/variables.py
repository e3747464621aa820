"""``%{name}`` variables, expanded recursively as BuildStream does.

A reference is ``%{`` + a name (a letter, then letters, digits, ``_`` or
``-``) + ``}``; anything else, a lone ``%`` included, is literal text
(BuildStream has no escape). Every definition is resolved when the element is
loaded, used or not, so an undefined or circular reference anywhere is an
error at load time, as in BuildStream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import Mark, ScalarNode

__all__ = ["Definition", "SharedVariables", "Variables"]

_REFERENCE = re.compile(r"%\{([a-zA-Z][a-zA-Z0-9_-]*)\}")


@dataclass(frozen=True)
class Definition:
    """One variable's unexpanded value and where it was defined (None: a built-in)."""

    value: str
    mark: Mark | None
    field: str


class SharedVariables:
    """What many elements' variables have in common, resolved once.

    Elements of one kind in one project share every layer of definitions but
    their own (the project's, the kind's defaults ...). Resolving those once,
    and expanding the strings they share (the kind's commands, split rules)
    once, is most of the loader's work saved on a large project. An element's
    :class:`Variables` made with ``shared`` take a shared value only when
    nothing it refers to, directly or not, is defined differently there.
    """

    def __init__(self, definitions: dict[str, Definition]) -> None:
        self.definitions = dict(definitions)
        base = Variables(self.definitions)
        base.check()  # raises on a broken layer: then nothing is shared
        self.resolved = dict(base._resolved)
        # name -> the names whose values use it (directly).
        self._users: dict[str, set[str]] = {}
        for name, definition in self.definitions.items():
            for ref in _REFERENCE.findall(definition.value):
                self._users.setdefault(ref, set()).add(name)
        # Expanded texts: text -> (expansion, the variables it used, transitively).
        self.texts: dict[str, tuple[str, frozenset[str]]] = {}
        # Values built from shared texts (an element's public data ...), by name.
        self.values: dict[str, tuple[Any, frozenset[str]]] = {}
        self._users_closure: dict[str, frozenset[str]] = {}
        self._uses_closure: dict[str, frozenset[str]] = {}

    def stale(
        self, definitions: dict[str, Definition], candidates: Iterable[str] | None = None
    ) -> frozenset[str] | None:
        """The names whose shared value ``definitions`` changes: redefined or
        new ones and every name using one of those; None when nothing can be
        shared (a shared name is missing).

        ``candidates``: when the caller knows that ``definitions`` are these
        shared definitions with only those names redefined or added, the
        only names compared (an element's own variables, not the forty it
        shares, for each of 10,000 elements)."""
        if candidates is None:
            if not self.definitions.keys() <= definitions.keys():
                return None
            names: Iterable[str] = definitions
        else:
            names = [name for name in candidates if name in definitions]
        changed = [
            name
            for name in names
            if (base := self.definitions.get(name)) is None or base.value != definitions[name].value
        ]
        stale: set[str] = set()
        for name in changed:
            stale |= self.users_of(name)
        return frozenset(stale)

    def users_of(self, name: str) -> frozenset[str]:
        """``name`` and every shared name whose value uses it, directly or not."""
        found = self._users_closure.get(name)
        if found is None:
            seen = {name}
            todo = [name]
            while todo:
                for user in self._users.get(todo.pop(), ()):
                    if user not in seen:
                        seen.add(user)
                        todo.append(user)
            found = self._users_closure[name] = frozenset(seen)
        return found

    def uses(self, name: str) -> frozenset[str]:
        """``name`` and every shared name its shared value refers to, directly or not."""
        found = self._uses_closure.get(name)
        if found is None:
            seen: set[str] = set()
            todo = [name]
            while todo:
                current = todo.pop()
                if current not in seen:
                    seen.add(current)
                    todo.extend(_REFERENCE.findall(self.definitions[current].value))
            found = self._uses_closure[name] = frozenset(seen)
        return found


class Variables:
    """An element's variables: definitions, later layers already applied over earlier.

    Args:
        shared: what the element shares with others (values resolved once).
        changed: the only names ``definitions`` may define otherwise than
            ``shared`` does (see :meth:`SharedVariables.stale`); None: any.
    """

    def __init__(
        self,
        definitions: dict[str, Definition],
        *,
        shared: SharedVariables | None = None,
        changed: Iterable[str] | None = None,
    ) -> None:
        self._definitions = definitions
        self._resolved: dict[str, str] = {}
        self._shared: SharedVariables | None = None
        self._stale: frozenset[str] = frozenset()
        if shared is not None:
            stale = shared.stale(definitions, changed)
            if stale is not None:
                self._shared = shared
                self._stale = stale
                self._resolved = dict(shared.resolved)
                for name in stale:
                    self._resolved.pop(name, None)

    def check(self) -> None:
        """Resolve every definition.

        Raises:
            LoadError: an undefined or circular reference, at the definition using it.
        """
        resolved = self._resolved  # (most are, from the shared layers: skip those fast)
        for name in self._definitions:
            if name not in resolved:
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
        if "%{" not in text:
            return text
        shared = self._shared
        if shared is not None:
            hit = shared.texts.get(text)
            if hit is not None and hit[1].isdisjoint(self._stale):
                return hit[0]
        names = _REFERENCE.findall(text)
        for name in names:
            if name not in self._definitions:
                raise LoadError(
                    f"undefined variable {name!r}", file=mark.file, line=mark.line, field=field
                )
        value = _REFERENCE.sub(lambda m: self[m.group(1)], text)
        if shared is not None and self._stale.isdisjoint(names):
            # Every name it uses has its shared value here (a name that is
            # not stale uses none that is), so the text expands the same for
            # any element that changes none of the names it uses.
            shared.texts[text] = (value, frozenset().union(*(shared.uses(n) for n in names)))
        return value

    def shared_value(self, key: str) -> Any | None:
        """The value stored under ``key`` by :meth:`share_value` for elements
        sharing these variables' layers, if it holds here (None otherwise)."""
        if self._shared is None:
            return None
        hit = self._shared.values.get(key)
        if hit is None or not hit[1].isdisjoint(self._stale):
            return None
        return hit[0]

    def share_value(self, key: str, value: Any, texts: Iterable[str]) -> None:
        """Store ``value``, made by expanding ``texts`` here, for elements whose
        variables give those texts the same expansions (see :meth:`shared_value`).
        Callers must not change ``value`` afterwards (nor what they get back)."""
        shared = self._shared
        if shared is None:
            return
        names: set[str] = set()
        for text in texts:
            names.update(_REFERENCE.findall(text))
        if not self._stale.isdisjoint(names) or not names <= shared.definitions.keys():
            return
        shared.values[key] = (value, frozenset().union(*(shared.uses(n) for n in names)))

    def expand_node(self, node: ScalarNode) -> str:
        """Expand a scalar node's string (a null is an error)."""
        value = node.value
        if value is not None and "%{" not in value:
            return value  # nothing to expand (most strings; called 100,000s of times)
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
