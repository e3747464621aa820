"""The five stages of an element's build, as plain functions (no Celery).

``stage_to_cas`` -> ``upload`` -> ``execute`` -> ``fetch_outputs`` ->
``push_artifact``. Each takes ``(ctx, spec, state)`` and returns a new state
dict of small JSON values (see :mod:`pipeline.stages.state`), works from the
:class:`~pipeline.spec.BuildSpec` alone (no project folder), and is
idempotent: run twice, it does the work once and returns the same result.
The Celery tasks wrap them one to one; :func:`run_stages` chains them
in-process.
"""

from __future__ import annotations

from pipeline.stages.artifacts import (
    fetch_artifact_files,
    lookup_artifact,
    read_artifact_meta,
    read_logs,
)
from pipeline.stages.checkout import checkout_artifact
from pipeline.stages.context import StageContext
from pipeline.stages.errors import (
    ArtifactNotFoundError,
    BuildFailedError,
    DependencyArtifactMissingError,
    SourceMissingError,
    SpecError,
    StageError,
)
from pipeline.stages.execution import execute, fetch_outputs
from pipeline.stages.push import push_artifact
from pipeline.stages.run import ElementResult, build_plan, run_stages, snapshot_sources
from pipeline.stages.staging import ensure_local_action, stage_to_cas, upload
from pipeline.stages.state import VOLATILE_KEYS, State, is_pending, stable

__all__ = [
    "VOLATILE_KEYS",
    "ArtifactNotFoundError",
    "BuildFailedError",
    "DependencyArtifactMissingError",
    "ElementResult",
    "SourceMissingError",
    "SpecError",
    "StageContext",
    "StageError",
    "State",
    "build_plan",
    "checkout_artifact",
    "ensure_local_action",
    "execute",
    "fetch_artifact_files",
    "fetch_outputs",
    "is_pending",
    "lookup_artifact",
    "push_artifact",
    "read_artifact_meta",
    "read_logs",
    "run_stages",
    "snapshot_sources",
    "stable",
    "stage_to_cas",
    "upload",
]
