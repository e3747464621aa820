"""Resolved plans kept between loads: an unchanged project is not loaded again.

Submitting a large project spends most of its time loading it: reading its
files (even from the parsed-file cache), resolving every element and
computing its cache key. Most submits load a project that did not change
since the last one. :class:`ResolvedCache` keeps, per project folder, the
last plan a submit loaded: every element's project, name, file, cache key,
staged dependencies, sources and build spec, with what that load depended on:

- the inputs given to it (targets, options, option values from remex.toml,
  the configuration's ``[fetch]`` as resolved from files and environment,
  default mirror included, ``max-jobs``, the host's OS and architecture)
  and remex's own code (its version, the key format, the stat of each
  module of ``pipeline/elements``);
- the stat of every file the load read (project.conf, its includes, every
  element file, plugin files; missing ones as missing), in the project and
  in every subproject a junction leads to: a ``local`` junction's folder,
  or the folder a network junction's source was staged into beside the
  local CAS (by its source key), so a removed or restaged folder is a miss;
- the tree digest of every ``local`` source, the sha256 of every ``patch``.

A network source (``tar``, ``zip``, ``remote``, ``git`` by URL) is kept as
its fetch request: its URLs (aliases resolved, mirrors in order), the
kind's settings and its source cache key, all made from the files read and
the default mirror, so they are checked with them. The URLs may carry
credentials (``user:password@`` in an alias): so do project.conf and its
entry in the parsed-file cache beside the plan; the plan file is written
mode 0600, as every file of that cache (~/.netrc, proxies and ``[fetch]``'s
CA bundle are read by the workers that download, never put in a request).

A later load with the same inputs whose files all have the same stat and
whose local sources are the same takes the plan as kept, without reading,
resolving or keying anything; anything else is a miss, and the project is
loaded as usual (then kept again). Only loads that worked are kept, so a
hit never hides an error; warnings are not kept either, as loading prints
none. Plans are kept only when checking them is that simple: no source the
submitting host stages from files the load does not record (a ``file://``
tarball, a git repository on this host), neither in an element nor as a
junction's; no ``element-mask`` option in any project (its values are the
element files present); targets named (the default targets are the files
present); every file's stat settled (see
:data:`pipeline.elements.nodes.SETTLED_NS`). A damaged, torn or foreign
file is a miss (header, checksum and shape are checked); writers write a
temporary file and rename it, so concurrent submits never see half a file.

The file: a line naming the format and the inputs, a checksum line, the
files read and their stats on a line of their own (a changed file, the
usual miss, is found without hashing or decoding the rest), then the
elements, dependencies first, each as its project, name, file, key, staged
dependencies (indices), sources and spec, the spec less what the head holds
(its project, name and key), its usual dependency entries as indices, and
its build environment as an index into a table of the distinct ones.

JSON only (never pickle): the folder is as trusted as the user's home.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import pipeline
from pipeline import jsonenc
from pipeline.cas import LocalCas
from pipeline.digest import EMPTY_DIGEST, Digest, digest_to_json
from pipeline.elements import nodes
from pipeline.elements.defaults import host_arch, host_os
from pipeline.elements.element import Element
from pipeline.elements.errors import LoadError
from pipeline.elements.keys import KEY_FORMAT_VERSION
from pipeline.elements.nodes import FileStat, MappingNode, Mark, file_stat
from pipeline.elements.options import host_os_name
from pipeline.elements.project import Project
from pipeline.elements.sources import (
    SOURCE_KINDS,
    FetchRequest,
    LocalSource,
    NetworkSettings,
    PatchSource,
    Source,
    SourceContext,
    fetch_here,
)
from pipeline.spec import BuildSpec

__all__ = ["KeptElement", "KeptFetchSource", "PlannedElement", "ResolvedCache", "spec_text"]

_HEADER = b"remex-resolved 4 "
_PERSON = b"remex-resolved-4"
# A kept spec's source entries hold this until build_spec gives the real digest.
_PLACEHOLDER = digest_to_json(EMPTY_DIGEST)
# The modules (besides pipeline/elements) whose code decides keys and specs,
# or what a submit loads (api: its inputs; config: remex.toml's option values).
_CODE_FILES = ("__init__.py", "spec.py", "digest.py", "jsonenc.py", "api.py", "config.py")

spec_text = jsonenc.encoder(sort_keys=False, ensure_ascii=True)
"""How a kept spec is written (compact, in its own key order)."""


class PlannedElement(Protocol):
    """What a submit needs of an element of its plan: a loaded
    :class:`~pipeline.elements.Element` or a :class:`KeptElement`."""

    @property
    def project(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def file(self) -> str: ...

    @property
    def cache_key(self) -> str: ...

    @property
    def sources(self) -> Sequence[Source]: ...

    def staged_dependencies(self) -> Sequence[PlannedElement]: ...

    def build_spec(self, source_digests: list[Digest]) -> BuildSpec: ...


class KeptElement:
    """An element of a kept plan: what a submit needs, without the loader's objects."""

    __slots__ = ("_spec", "_staged", "cache_key", "file", "name", "project", "sources")

    def __init__(
        self,
        *,
        project: str,
        name: str,
        file: str,
        cache_key: str,
        sources: list[Source],
        spec: BuildSpec,
        staged: list[KeptElement],
    ) -> None:
        self.project = project
        self.name = name
        self.file = file
        self.cache_key = cache_key
        self.sources = sources
        self._spec = spec
        self._staged = staged

    def __repr__(self) -> str:
        return f"<KeptElement {self.name}>"

    def staged_dependencies(self) -> list[KeptElement]:
        """As :meth:`Element.staged_dependencies`."""
        return list(self._staged)

    def build_spec(self, source_digests: list[Digest]) -> BuildSpec:
        """As :meth:`Element.build_spec`. The spec was decoded for this load
        only: the caller owns it (a second call gives the same object).

        Raises:
            ValueError: not one digest per source.
        """
        if len(source_digests) != len(self.sources):
            raise ValueError(
                f"element {self.name} has {len(self.sources)} source(s), "
                f"got {len(source_digests)} digest(s)"
            )
        for entry, digest in zip(self._spec["sources"], source_digests, strict=True):
            entry["digest"] = digest_to_json(digest)
        return self._spec


class KeptFetchSource(Source):
    """A network source of a kept plan: the fetch request its load made (the
    URLs in the order the mirrors give, the kind's settings, the source cache
    key), given back as it was; a worker fetches it, as any network source."""

    def __init__(
        self,
        *,
        kind: str,
        key: str,
        urls: list[str],
        config: dict[str, Any],
        directory: str,
        mark: Mark,
        field: str,
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        # (An instance attribute: one class for every network kind.)
        self.kind = kind  # type: ignore[misc]
        self.key = key
        self.urls = urls
        self.config = config

    @classmethod
    def load(cls, node: MappingNode, ctx: SourceContext) -> Source:
        """Never: a kept source is not loaded from a file."""
        raise TypeError("a kept source is made from a kept plan, not loaded")

    def content_key(self) -> str:
        """The source cache key (the element's key was kept with the plan)."""
        return self.key

    def fetch_request(self, element: str, index: int, file: str) -> FetchRequest:
        """As the loaded source's (a new request each time: the caller owns it)."""
        return FetchRequest(
            kind=self.kind,
            key=self.key,
            element=element,
            index=index,
            field=self.field,
            file=file,
            urls=list(self.urls),
            config=json.loads(json.dumps(self.config)),
        )

    def stage(self, cas: LocalCas, workdir: Path, network: NetworkSettings | None = None) -> Digest:
        """Fetch it here, as a worker would (see :meth:`Source.fetch`)."""
        request = self.fetch_request("", 0, self.mark.file or "")
        return fetch_here(SOURCE_KINDS[self.kind].fetch, request, cas, workdir, network)


class ResolvedCache:
    """The plan kept for one project folder (see the module's docstring).

    Made by :meth:`open`; :meth:`load` gives the kept plan if it is still
    valid; :meth:`save` keeps a plan just loaded."""

    def __init__(self, file: str, inputs: str) -> None:
        self.file = file
        self._inputs = inputs.encode()

    @classmethod
    def open(
        cls,
        project_dir: Path,
        targets: Sequence[str],
        *,
        options: Mapping[str, str] | None,
        option_values: MappingNode | None,
        default_mirror: str | None,
        max_jobs: int,
        fetch: Mapping[str, Any] | None = None,
        junctions_dir: str | None = None,
    ) -> ResolvedCache | None:
        """The kept plan of ``project_dir`` for these inputs; None when plans
        are not kept (no parsed-file cache, or no targets named: the
        project's default targets depend on the files present).

        ``fetch`` is the configuration's ``[fetch]`` as resolved (files and
        ``REMEX_FETCH_*`` alike; JSON values): how a junction's source is
        fetched by the load, and the default mirror that orders the URLs of
        every fetch request. A change is a miss. ``junctions_dir`` is where
        the load stages network junctions (beside the local CAS): a load with
        another local CAS reads its subprojects from another folder."""
        cache = nodes.parsed_cache_dir()
        if cache is None or not targets:
            return None
        try:
            host = [host_os(), host_arch(), host_os_name()]
        except LoadError:
            return None  # (a host bst knows no name for: the load says so, or not)
        folder = str(Path(project_dir).resolve())
        inputs = {
            "remex": pipeline.__version__,
            "key-format": KEY_FORMAT_VERSION,
            "python": list(sys.version_info[:2]),
            "code": _code_stats(),
            "project": folder,
            "targets": list(targets),
            "options": sorted((options or {}).items()),
            "option-values": _node_data(option_values),
            "default-mirror": default_mirror,
            "fetch": dict(fetch or {}),
            "junctions": junctions_dir,
            "max-jobs": max_jobs,
            "host": host,
        }
        name = hashlib.blake2b(os.fsencode(folder), digest_size=20, person=_PERSON).hexdigest()
        digest = hashlib.blake2b(
            json.dumps(inputs, sort_keys=True).encode(), digest_size=20, person=_PERSON
        ).hexdigest()
        return cls(os.path.join(cache, "resolved", name), digest)

    def load(self, cas: LocalCas) -> list[KeptElement] | None:
        """The kept plan, dependencies first; None when there is none or it is
        not valid any more (an input, a file or a local source changed; the
        file is damaged or foreign)."""
        try:
            with open(self.file, "rb") as stream:
                raw = stream.read()
        except OSError:
            return None
        # The header names the inputs: another submit's plan is not decoded.
        first = raw.find(b"\n")
        if first < 0 or raw[:first] != _HEADER + self._inputs:
            return None
        # The files read come first, on a line of their own: a plan whose
        # files changed (the usual miss: an edit) is dropped after reading
        # that line only, before the whole file is hashed and decoded. What
        # is taken is checked whole (the checksum) before it is used.
        second = raw.find(b"\n", first + 1)
        third = raw.find(b"\n", second + 1) if second >= 0 else -1
        if third < 0:
            return None
        try:
            if not _files_unchanged(json.loads(raw[second + 1 : third])):
                return None
        except (ValueError, TypeError, RecursionError):
            return None
        body = nodes._checked_body(raw[first + 1 :], _HEADER)
        if body is None:
            return None
        try:
            data = json.loads(body[third - second :])
            return _kept_plan(data["elements"], data["environments"], cas)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            return None

    def save(
        self,
        project: Project,
        elements: Sequence[Element],
        specs: Sequence[BuildSpec],
        reads: Mapping[str, FileStat],
    ) -> None:
        """Keep ``elements`` (a plan just loaded, with ``specs`` their build
        specs, made from the sources as loaded) and
        the files their load read (``reads``, from
        :func:`~pipeline.elements.nodes.recording_reads`). A plan that cannot
        be checked simply (see the module's docstring) is not kept, and a
        plan kept before is dropped. Best effort: a cache that cannot be
        written only makes the next submit slower."""
        body = _plan_body(project, elements, specs, reads)
        if body is None:
            with contextlib.suppress(OSError):
                os.unlink(self.file)
            return
        nodes._write_file(self.file, _HEADER + self._inputs + b"\n" + _HEADER, body.encode())


def _plan_body(
    project: Project,
    elements: Sequence[Element],
    specs: Sequence[BuildSpec],
    reads: Mapping[str, FileStat],
) -> str | None:
    """The JSON text of a kept plan; None when it is not to be kept."""
    if not elements or len(specs) != len(elements):
        return None
    for each in (project, *project.subprojects()):
        if any(option.type == "element-mask" for option in each.options.options.values()):
            return None  # (its values are the element files present, not only those read)
        if each.junction_source is not None and _source_entry(each.junction_source) is None:
            return None  # (a file:// tarball, a local git repository: read, not recorded)
    settled_before = time.time_ns() - nodes.SETTLED_NS
    for stat in reads.values():
        # A file changed within the timestamp granularity may change again
        # with the same stat: such a load is not kept (as FolderCache).
        if stat is not None and max(stat[1], stat[2]) >= settled_before:
            return None
    index = {element.name: i for i, element in enumerate(elements)}
    whitelists = [element.overlap_whitelist for element in elements]
    entries = [
        _dependency_entry(element.name, spec, whitelist)
        for element, spec, whitelist in zip(elements, specs, whitelists, strict=True)
    ]
    parts = []
    # Each distinct build environment, written once (elements' are mostly equal).
    environments: dict[tuple[tuple[str, str], ...], int] = {}
    for element, spec, whitelist in zip(elements, specs, whitelists, strict=True):
        if list(spec)[:4] != _HEAD_FIELDS or (
            spec["project"] != element.project
            or spec["element"] != element.name
            or spec["cache_key"] != element.cache_key
        ):
            return None  # (not a spec build_spec made: not kept)
        sources = []
        for source in element.sources:
            kept = _source_entry(source)
            if kept is None:
                return None
            sources.append(kept)
        staged = [index[d.name] for d in element.staged_dependencies()]
        # A dependency's usual entry (most of a large plan's bytes) is written
        # as the dependency's index, and made once when read.
        dependencies = []
        for entry in spec["dependencies"]:
            at = index.get(entry["element"])
            dependencies.append(at if at is not None and entry == entries[at] else entry)
        # Without what the head says (project, name, key: put back when read).
        # (Plain data from here: the kept form is no BuildSpec.)
        kept_spec: dict[str, Any] = dict(spec)
        del kept_spec["project"], kept_spec["element"], kept_spec["cache_key"]
        kept_spec["dependencies"] = dependencies
        # Source entries as loaded: submit points network ones at the source
        # cache (a digest found, or a URI) in place; build_spec fills them.
        kept_spec["sources"] = [_kept_source_entry(each) for each in spec["sources"]]
        command = spec["command"]
        if type(command) is dict and type(command.get("environment")) is dict:
            environment = command["environment"]
            at = environments.setdefault(tuple(environment.items()), len(environments))
            kept_spec["command"] = {**command, "environment": at}
        # (One encoder call per element: most of writing a plan is encoding it.)
        parts.append(spec_text([element.project, element.name, element.file, element.cache_key,
                                staged, sources, whitelist, kept_spec]))  # fmt: skip
    # The files first, on a line of their own (see ResolvedCache.load).
    tables = spec_text([dict(items) for items in environments])
    return f'{spec_text(reads)}\n{{"elements":[{",".join(parts)}],"environments":{tables}}}'


# A spec's first fields, in build_spec's order; those the head holds too.
_HEAD_FIELDS = ["project", "element", "kind", "cache_key"]
_HEAD_ONLY = frozenset(("project", "element", "cache_key"))


def _kept_source_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A spec's source entry as :meth:`Element.build_spec` makes it (in its
    key order), with the placeholder digest."""
    kept = {"kind": entry["kind"], "digest": _PLACEHOLDER, "directory": entry["directory"]}
    if "apply" in entry:
        kept["apply"] = entry["apply"]
    return kept


def _source_entry(source: Source) -> list[Any] | None:
    """How a source is kept; None when a plan with it is not kept.

    A ``local`` or ``patch`` source is checked again by its content (its
    tree; the patch's sha256). A network source is kept as its fetch
    request: everything in it comes from the files the load read (URLs,
    aliases, mirrors) and the inputs (the default mirror). Other sources the
    submitting host stages itself (a ``file://`` tarball, a local git
    repository) read files that are not recorded: not kept."""
    where = source.mark
    if type(source) is LocalSource:
        digest = source.digest
        return ["local", str(source.path), source.relative, source.directory, where.file,
                where.line, source.field, digest.hash, digest.size_bytes]  # fmt: skip
    if type(source) is PatchSource:
        digest = source.digest
        return ["patch", str(source.path), source.relative, source.strip_level,
                source.directory, where.file, where.line, source.field, digest.hash,
                digest.size_bytes, source.sha256]  # fmt: skip
    request = source.fetch_request("", 0, "")
    if request is None or SOURCE_KINDS.get(request["kind"]) is not type(source):
        return None
    if any(url.startswith("file:") for url in request["urls"]):
        return None  # (a repository on this host: its load checks the commit there)
    return ["fetch", request["kind"], request["key"], list(request["urls"]), request["config"],
            source.directory, where.file, where.line, source.field]  # fmt: skip


def _files_unchanged(files: Any) -> bool:
    """Whether every file a kept plan's load read (``files``: path -> its
    :func:`~pipeline.elements.nodes.file_stat`) has the same stat now."""
    if type(files) is not dict:
        return False
    for path, kept in files.items():
        try:
            stat: os.stat_result | None = os.stat(path)
        except OSError:
            stat = None
        if file_stat(stat) != kept:
            return False
    return True


def _kept_plan(data: list[Any], environments: list[Any], cas: LocalCas) -> list[KeptElement] | None:
    """The plan ``data`` (a kept plan's elements, their build environments
    in ``environments``) holds, if every local source is as it was (the
    files were checked by :func:`_files_unchanged`)."""
    if type(data) is not list or type(environments) is not list:
        return None
    if not all(type(each) is dict for each in environments):
        return None
    plan: list[KeptElement] = []
    # Each element's usual entry in its dependents' specs (shared: read-only).
    entries: list[dict[str, Any]] = []
    for project, name, file, key, staged, sources, whitelist, kept in data:
        if (
            type(project) is not str
            or type(name) is not str
            or type(file) is not str
            or type(key) is not str
            or type(kept) is not dict
            or not _HEAD_ONLY.isdisjoint(kept)
            or len(kept["sources"]) != len(sources)
        ):
            return None
        # The spec in build_spec's key order: the head's fields, then the rest.
        spec = {"project": project, "element": name, "kind": kept["kind"], "cache_key": key}
        spec.update(kept)
        command = spec["command"]
        if type(command) is dict and type(command.get("environment")) is int:
            at = command["environment"]
            if not 0 <= at < len(environments):
                return None
            command["environment"] = dict(environments[at])  # (a copy: the caller owns it)
        kept_sources = []
        for entry in sources:
            source = _kept_source(entry, cas)
            if source is None:
                return None
            kept_sources.append(source)
        count = len(plan)
        # Dependencies come first: an index past this element is damage.
        deps = [plan[i] for i in staged if type(i) is int and 0 <= i < count]
        if len(deps) != len(staged):
            return None
        dependencies = spec["dependencies"]
        for at, entry in enumerate(dependencies):
            if type(entry) is int:
                if not 0 <= entry < count:
                    return None
                dependencies[at] = entries[entry]
            elif type(entry) is not dict:
                return None
        if type(whitelist) is not list:
            return None
        entries.append(_dependency_entry(name, spec, whitelist))
        element = KeptElement(
            project=project, name=name, file=file, cache_key=key, sources=kept_sources,
            spec=cast(BuildSpec, spec),
            staged=deps,
        )  # fmt: skip
        plan.append(element)
    return plan


def _kept_source(entry: list[Any], cas: LocalCas) -> Source | None:
    """The source a kept entry names; None when it changed (a local source's
    tree, a patch's bytes) or the entry is damaged."""
    tag = entry[0]
    if tag == "fetch":
        _, kind, key, urls, config, directory, mark_file, line, field = entry
        if (
            SOURCE_KINDS.get(kind) is None
            or type(key) is not str
            or type(urls) is not list
            or not all(type(url) is str for url in urls)
            or type(config) is not dict
        ):
            return None
        return KeptFetchSource(
            kind=kind, key=key, urls=urls, config=config, directory=str(directory),
            mark=Mark(str(mark_file), int(line)), field=str(field),
        )  # fmt: skip
    source: LocalSource | PatchSource
    if tag == "local":
        _, path, relative, directory, mark_file, line, field, hash_, size = entry
        source = LocalSource.kept(
            path=Path(path),
            relative=str(relative),
            digest=Digest(hash=str(hash_), size_bytes=int(size)),
            directory=str(directory),
            mark=Mark(str(mark_file), int(line)),
            field=str(field),
        )
    elif tag == "patch":
        _, path, relative, strip, directory, mark_file, line, field, hash_, size, sha256 = entry
        source = PatchSource.kept(
            path=Path(path),
            relative=str(relative),
            strip_level=int(strip),
            digest=Digest(hash=str(hash_), size_bytes=int(size)),
            sha256=str(sha256),
            directory=str(directory),
            mark=Mark(str(mark_file), int(line)),
            field=str(field),
        )
    else:
        return None
    return source if source.unchanged(cas) else None


def _dependency_entry(name: str, spec: Any, whitelist: list[str]) -> dict[str, Any]:
    """An element's usual entry in its dependents' specs (as
    :meth:`Element.build_spec` makes it, in its key order), from its own spec."""
    return {
        "element": name,
        "cache_key": spec["cache_key"],
        "artifact_uri": spec["artifact_uri"],
        "path": "",
        "select": None,
        "overlap_whitelist": whitelist,
    }


def _code_stats() -> list[Any]:
    """The stat of each module that decides keys and specs: a remex changed
    in place (an editable install) keeps no plan of the code before."""
    root = os.path.dirname(pipeline.__file__)
    stats: list[Any] = []
    paths = [os.path.join(root, name) for name in _CODE_FILES]
    for folder, dirs, files in os.walk(os.path.join(root, "elements")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        paths.extend(os.path.join(folder, f) for f in sorted(files))
    for path in paths:
        try:
            stat: os.stat_result | None = os.stat(path)
        except OSError:
            stat = None
        stats.append([os.path.relpath(path, root), file_stat(stat)])
    return stats


def _node_data(node: MappingNode | None) -> Any:
    """Option values from remex.toml as plain data (their values decide)."""
    return None if node is None else nodes._encode(node)
