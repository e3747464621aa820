"""Source kinds: one class per kind, one file per class, found by name here.

Loading a source checks everything a build would trip over later: a local
path exists inside the project, a tarball's sha256 is its ref, a git commit
exists. Each source then gives a :meth:`Source.content_key` for its element's
cache key and can :meth:`Source.stage` its content as a Directory tree.

As in BuildStream, every string field but ``kind`` and ``directory`` has its
``%{variables}`` expanded, and a URL ``alias:rest`` is the project's alias
value followed by ``rest``. Local files (``file://`` tarballs, local paths,
patches, local git repositories) are staged by the submitting host; network
sources (:class:`NetworkSource`, or a :meth:`Source.fetch_request` that is
not None: git over the network with its submodules ...) are downloaded by
workers.

Adding a kind is adding a module here with a :class:`Source` subclass and
listing it in ``_KINDS``; nothing else in remex switches on a source kind's
name (see ``docs/elements.md``).
"""

from __future__ import annotations

from pipeline.elements.nodes import MappingNode, ScalarNode
from pipeline.elements.sources.base import (
    FetchContext,
    FetchRequest,
    NetworkSettings,
    NetworkSource,
    Source,
    SourceContext,
    fetch_here,
    source_cache_key,
)
from pipeline.elements.sources.git import GitSource
from pipeline.elements.sources.helpers import (
    BST_PLUGINS_SOURCE_KINDS,
    project_path,
    resolve_alias,
)
from pipeline.elements.sources.local import LocalSource
from pipeline.elements.sources.patch import PatchSource
from pipeline.elements.sources.remote import RemoteSource
from pipeline.elements.sources.settings import ProjectSources
from pipeline.elements.sources.tar import TarSource
from pipeline.elements.sources.zip import ZipSource

__all__ = [
    "SOURCE_KINDS",
    "FetchContext",
    "FetchRequest",
    "GitSource",
    "LocalSource",
    "NetworkSettings",
    "NetworkSource",
    "PatchSource",
    "ProjectSources",
    "RemoteSource",
    "Source",
    "SourceContext",
    "TarSource",
    "ZipSource",
    "fetch_here",
    "load_source",
    "project_path",
    "resolve_alias",
    "source_cache_key",
]

_KINDS: tuple[type[Source], ...] = (
    LocalSource,
    TarSource,
    GitSource,
    ZipSource,
    RemoteSource,
    PatchSource,
)

SOURCE_KINDS: dict[str, type[Source]] = {kind.kind: kind for kind in _KINDS}
"""The source kinds remex implements, by name."""


def load_source(node: MappingNode, ctx: SourceContext) -> Source:
    """Read one ``sources`` entry and check it against the disk.

    The kind is looked up (a kind declared from a plugin package is used only
    when remex implements that package's kind), project.conf's defaults for
    the kind are composed under the entry, ``provenance`` is checked, and the
    kind's class loads the rest.

    Raises:
        LoadError: an unknown or unimplemented kind (saying where such a kind
            comes from), a bad key or value, a missing local path, a tarball
            whose sha256 is not its ref, a git commit not in the repository,
            ...; the message names the file, line and field.
    """
    kind_node = node.require_str("kind")
    cls = _source_class(kind_node, ctx.settings)
    composed = ctx.settings.compose_defaults(cls.kind, node)
    ctx.settings.check_provenance(composed)
    return cls.load(composed, ctx)


def _source_class(kind_node: ScalarNode, settings: ProjectSources) -> type[Source]:
    kind = kind_node.as_str()
    cls = SOURCE_KINDS.get(kind)
    declared = settings.plugins.get(kind)
    if declared is not None:
        if cls is not None and declared.package in cls.plugin_packages:
            return cls
        reason = "remex runs no source plugins and does not implement it"
        if cls is not None:
            packages = ", ".join(sorted(cls.plugin_packages)) or "none"
            reason = (
                f"remex's own {kind!r} is not that plugin (it implements the {kind!r} of: "
                f"{packages})"
            )
        raise kind_node.error(
            f"source kind {kind!r} from {declared.describe()} (declared at "
            f"{declared.mark}, {declared.field}) is not implemented by remex: {reason}"
        )
    if cls is not None:
        return cls
    supported = ", ".join(SOURCE_KINDS)
    if kind in BST_PLUGINS_SOURCE_KINDS:
        raise kind_node.error(
            f"source kind {kind!r} comes from the plugin package buildstream-plugins, not "
            f"BuildStream's core, and remex does not implement it (remex supports {supported})"
        )
    if kind == "workspace":
        raise kind_node.error("the workspace source kind is internal to BuildStream")
    raise kind_node.error(f"unknown source kind {kind!r} (remex supports {supported})")
