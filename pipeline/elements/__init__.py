"""BuildStream-style projects: load, check, resolve, key, and describe builds.

The subset of BuildStream 2's format that remex reads is described in
``ARCHITECTURE.md`` ("Elements")::

    project = load_project(Path("examples/hello"), cas=LocalCas(cache_dir))
    plan = project.load_targets(["app.bst"])    # dependencies first, all checked
    for element in plan:
        digests = [source.stage(cas, workdir) for source in element.sources]
        build_spec = element.build_spec(digests)  # JSON for the stages

Every error found in the user's files is a :class:`LoadError` (or, when a
source is staged, a :class:`SourceError`) whose message names the file, the
line and the field.
"""

from __future__ import annotations

from pipeline.elements.element import Dependency, Element
from pipeline.elements.errors import ElementError, LoadError, SourceError
from pipeline.elements.keys import KEY_FORMAT_VERSION, canonical_json, key_description
from pipeline.elements.kinds import CORE_KINDS, Kind
from pipeline.elements.project import Project, load_project
from pipeline.elements.sources import GitSource, LocalSource, Source, TarSource

__all__ = [
    "CORE_KINDS",
    "KEY_FORMAT_VERSION",
    "Dependency",
    "Element",
    "ElementError",
    "GitSource",
    "Kind",
    "LoadError",
    "LocalSource",
    "Project",
    "Source",
    "SourceError",
    "TarSource",
    "canonical_json",
    "key_description",
    "load_project",
]
