"""Resolved plans kept between loads: an unchanged project is not loaded again.

Submitting a large project spends most of its time loading it: reading its
files (even from the parsed-file cache), resolving every element and
computing its cache key. Most submits load a project that did not change
since the last one. :class:`ResolvedCache` keeps, per project folder, the
last plan a submit loaded: every element's name, file, cache key, staged
dependencies, local sources and build spec, with what that load depended on:

- the inputs given to it (targets, options, option values from remex.toml,
  default mirror, ``max-jobs``, the host's OS and architecture) and remex's
  own code (its version, the key format, the stat of each module of
  ``pipeline/elements``);
- the stat of every file the load read (project.conf, its includes, every
  element file, plugin files; missing ones as missing);
- the tree digest of every local source.

A later load with the same inputs whose files all have the same stat and
whose local sources import to the same trees takes the plan as kept,
without reading, resolving or keying anything; anything else is a miss,
and the project is loaded as usual (then kept again). Only loads that
worked are kept, so a hit never hides an error; warnings are not kept
either, as loading prints none. Plans are kept only when checking them is
that simple: no junction, no source but ``local`` ones, no ``element-mask``
option (its values are the element files present), targets named (the
default targets are the files present), every file's stat settled (see
:data:`pipeline.elements.nodes.SETTLED_NS`). A damaged, torn or foreign
file is a miss (header, checksum and shape are checked); writers write a
temporary file and rename it, so concurrent submits never see half a file.

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
from pipeline.digest import Digest, digest_to_json
from pipeline.elements import nodes
from pipeline.elements.defaults import host_arch, host_os
from pipeline.elements.element import Element
from pipeline.elements.errors import LoadError
from pipeline.elements.keys import KEY_FORMAT_VERSION
from pipeline.elements.nodes import FileStat, MappingNode, Mark, file_stat
from pipeline.elements.options import host_os_name
from pipeline.elements.project import Project
from pipeline.elements.sources import LocalSource, Source
from pipeline.spec import BuildSpec

__all__ = ["KeptElement", "PlannedElement", "ResolvedCache", "spec_text"]

_HEADER = b"remex-resolved 2 "
_PERSON = b"remex-resolved-2"
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
        sources: list[LocalSource],
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
    ) -> ResolvedCache | None:
        """The kept plan of ``project_dir`` for these inputs; None when plans
        are not kept (no parsed-file cache, or no targets named: the
        project's default targets depend on the files present)."""
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
        body = nodes._checked_body(raw[first + 1 :], _HEADER)
        if body is None:
            return None
        try:
            data = json.loads(body)
            return _kept_plan(data, cas)
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
    if not elements or project.uses_junctions or len(specs) != len(elements):
        return None
    if any(option.type == "element-mask" for option in project.options.options.values()):
        return None  # (its values are the element files present, not only those read)
    settled_before = time.time_ns() - nodes.SETTLED_NS
    for stat in reads.values():
        # A file changed within the timestamp granularity may change again
        # with the same stat: such a load is not kept (as FolderCache).
        if stat is not None and max(stat[1], stat[2]) >= settled_before:
            return None
    index = {element.name: i for i, element in enumerate(elements)}
    entries = [_dependency_entry(element.name, spec, element.overlap_whitelist)
               for element, spec in zip(elements, specs, strict=True)]  # fmt: skip
    parts = []
    for element, spec in zip(elements, specs, strict=True):
        if element.project != project.name:
            return None
        sources = []
        for source in element.sources:
            if type(source) is not LocalSource:
                return None  # (its key may depend on more than its file)
            digest = source.digest
            where = source.mark
            sources.append(
                [str(source.path), source.relative, source.directory, where.file, where.line,
                 source.field, digest.hash, digest.size_bytes]
            )  # fmt: skip
        staged = [index[d.name] for d in element.staged_dependencies()]
        head = spec_text(
            [element.name, element.file, element.cache_key, staged, sources,
             element.overlap_whitelist]
        )  # fmt: skip
        # A dependency's usual entry (most of a large plan's bytes) is written
        # as the dependency's index, and made once when read.
        dependencies = []
        for entry in spec["dependencies"]:
            at = index.get(entry["element"])
            dependencies.append(at if at is not None and entry == entries[at] else entry)
        spec = {**spec, "dependencies": dependencies}  # type: ignore[typeddict-item]
        parts.append(f"{head[:-1]},{spec_text(spec)}]")
    head = spec_text({"project": project.name, "files": reads})
    return f'{head[:-1]},"elements":[{",".join(parts)}]}}'


def _kept_plan(data: dict[str, Any], cas: LocalCas) -> list[KeptElement] | None:
    """The plan ``data`` holds, if every file and local source is as it was."""
    project = data["project"]
    files = data["files"]
    if type(project) is not str or type(files) is not dict:
        return None
    for path, kept in files.items():
        try:
            stat: os.stat_result | None = os.stat(path)
        except OSError:
            stat = None
        if file_stat(stat) != kept:
            return None
    plan: list[KeptElement] = []
    # Each element's usual entry in its dependents' specs (shared: read-only).
    entries: list[dict[str, Any]] = []
    for name, file, key, staged, sources, whitelist, spec in data["elements"]:
        if (
            type(name) is not str
            or type(file) is not str
            or type(key) is not str
            or type(spec) is not dict
            or spec["element"] != name
            or spec["cache_key"] != key
            or spec["project"] != project
            or len(spec["sources"]) != len(sources)
        ):
            return None
        local = []
        for path, relative, directory, mark_file, line, field, hash_, size in sources:
            source = LocalSource.kept(
                path=Path(path),
                relative=str(relative),
                digest=Digest(hash=str(hash_), size_bytes=int(size)),
                directory=str(directory),
                mark=Mark(str(mark_file), int(line)),
                field=str(field),
            )
            if not source.unchanged(cas):
                return None
            local.append(source)
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
            project=project, name=name, file=file, cache_key=key, sources=local,
            spec=cast(BuildSpec, spec),
            staged=deps,
        )  # fmt: skip
        plan.append(element)
    return plan


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
