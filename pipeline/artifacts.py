"""The artifacts on the artifact server, as ``remex artifact`` sees them.

As ``bst artifact``, the commands take element names (``app.bst``: loaded
from the project, resolved to their current cache key) or artifact refs
(``PROJECT/NORMAL-NAME/KEY``, BuildStream's triples). remex adds cache keys
(a 64-digit key, or a prefix of one). A ref or key with a wildcard
(``*``, ``?``, ``**``) or a key prefix is looked up in the artifact index
(:mod:`pipeline.artifact_index`): the Remote Asset server cannot list names.

Deleting withdraws the name (see :func:`pipeline.stages.artifacts.delete_artifact`)
and forgets the index entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.artifact_index import ArtifactIndex, ArtifactRef, parse_ref
from pipeline.errors import ConfigError, RemexError
from pipeline.spec import failure_uri

if TYPE_CHECKING:
    from pipeline.cas import LocalCas
    from pipeline.config import RemexConfig
    from pipeline.elements.element import Element

__all__ = [
    "ArtifactArgumentError",
    "ArtifactTarget",
    "ArtifactsNotFoundError",
    "classify_argument",
    "open_index",
    "resolve_targets",
]

_HEX = re.compile(r"^[0-9a-f]{1,64}$")


class ArtifactArgumentError(ConfigError):
    """An argument is neither an element, an artifact ref nor a key (bad usage)."""


class ArtifactsNotFoundError(RemexError):
    """What was asked for is not on the artifact server (or not in the index)."""


@dataclass(frozen=True)
class ArtifactTarget:
    """One artifact a command works on."""

    ref: ArtifactRef
    label: str
    """What the user calls it: the element name, or the ref."""
    element: Element | None = None
    """The loaded element, when given by element name."""

    @property
    def uri(self) -> str:
        return self.ref.uri

    @property
    def failure_record_uri(self) -> str:
        """Where a failed build of this key left its failure record."""
        return failure_uri(self.ref.project, self.ref.normal_name, self.ref.cache_key)


def classify_argument(text: str) -> str:
    """``element``, ``ref`` (a full triple), ``pattern`` (a ref with
    wildcards) or ``key`` (a cache key or a prefix of one).

    Raises:
        ArtifactArgumentError: it is none of these.
    """
    if text.endswith(".bst"):
        return "element"
    if parse_ref(text) is not None:
        return "ref"
    if "/" in text:
        return "pattern"
    if _HEX.match(text):
        return "key"
    raise ArtifactArgumentError(
        f"{text!r} is not an element (NAME.bst), an artifact ref "
        "(PROJECT/ELEMENT/KEY, wildcards allowed) or a cache key (hex digits)"
    )


def resolve_targets(
    arguments: Sequence[str],
    *,
    project_dir: Path,
    options: dict[str, str],
    config: RemexConfig,
    cas: LocalCas,
    deps: str = "none",
    index: Callable[[], ArtifactIndex] | None = None,
    key_prefix: str | None = None,
) -> list[ArtifactTarget]:
    """The artifacts ``arguments`` (and ``key_prefix``) name, in order, each once.

    Element names are loaded from the project at ``project_dir`` (with
    ``options``) and, with ``deps`` (``none``, ``run``, ``build``, ``all`` as
    ``bst artifact``), their dependencies. Patterns and keys are looked up in
    the artifact index (opened by ``index`` on first use).

    Raises:
        ArtifactArgumentError: a bad argument.
        ArtifactsNotFoundError: a pattern or key matches nothing in the index.
        ElementError: the project or an element does not load.
    """
    kinds = [(text, classify_argument(text)) for text in arguments]
    if key_prefix is not None and not _HEX.match(key_prefix):
        raise ArtifactArgumentError(f"--key {key_prefix!r}: a cache key is hex digits")
    targets: list[ArtifactTarget] = []
    element_names = [text for text, kind in kinds if kind == "element"]
    if element_names:
        from pipeline import api
        from pipeline.elements.show import select_elements

        _, loaded = api.plan_targets(
            project_dir, element_names, cas=cas, options=options, config=config
        )
        selected: list[Element] = select_elements(loaded, deps)  # type: ignore[arg-type,assignment]
        for element in selected:
            ref = ArtifactRef(element.project, element.normal_name, element.cache_key)
            targets.append(ArtifactTarget(ref, element.name, element))
    opened: list[ArtifactIndex] = []

    def the_index() -> ArtifactIndex:
        if not opened:
            if index is None:
                raise ArtifactArgumentError("keys and patterns need the artifact index (Redis)")
            opened.append(index())
        return opened[0]

    searches = [(text, kind) for text, kind in kinds if kind != "element"]
    if key_prefix is not None:
        searches.append((key_prefix, "key"))
    for text, kind in searches:
        if kind == "ref":
            exact = parse_ref(text)
            if exact is not None:  # always: classified as one
                targets.append(ArtifactTarget(exact, str(exact)))
            continue
        found = the_index().with_key_prefix(text) if kind == "key" else the_index().matching(text)
        if not found:
            what = "cache key" if kind == "key" else "artifact ref"
            raise ArtifactsNotFoundError(
                f"no artifact with {what} {text!r} in the artifact index "
                "(it lists what workers pushed in the last 7 days)"
            )
        targets.extend(ArtifactTarget(ref, str(ref)) for ref in found)
    unique: dict[ArtifactRef, ArtifactTarget] = {}
    for target in targets:
        unique.setdefault(target.ref, target)
    return list(unique.values())


def open_index(config: RemexConfig) -> ArtifactIndex:
    """The artifact index on the configured broker's Redis.

    Raises:
        ConfigError: no broker is configured and no stack is up.
    """
    from pipeline.scheduler import DEFAULT_PREFIX, redis_client

    return ArtifactIndex(
        redis_client(config.require_broker(), reconnect_seconds=5.0), prefix=DEFAULT_PREFIX
    )
