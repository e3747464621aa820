"""Write an element's artifact files (and its runtime dependencies') into a folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.cas import checkout, merge_trees
from pipeline.digest import Digest
from pipeline.spec import BuildSpec
from pipeline.stages.artifacts import fetch_artifact_files
from pipeline.stages.context import StageContext

__all__ = ["checkout_artifact"]


def checkout_artifact(
    ctx: StageContext,
    spec_or_uri: BuildSpec | str,
    dest: Path,
    *,
    runtime_deps: Sequence[str] = (),
) -> Digest:
    """Check out an artifact's ``files/`` into ``dest``, safely.

    Runtime dependencies are merged first and the element last, so its files
    win, as when BuildStream stages them. ``dest`` may exist; nothing in it is
    replaced (see :func:`pipeline.cas.checkout`), and a hostile tree writes
    nothing at all.

    Args:
        spec_or_uri: the element's build spec, or its artifact URI.
        dest: the folder to write into.
        runtime_deps: artifact URIs of the runtime dependencies, in staging order.

    Returns:
        The digest of the tree written.

    Raises:
        ArtifactNotFoundError: an artifact is not on the artifact server.
        UnsafePathError: a hostile tree, or a symlink in ``dest`` in the way.
        LocalCasError: a path in ``dest`` is in the way, or writing failed.
    """
    uri = spec_or_uri if isinstance(spec_or_uri, str) else spec_or_uri["artifact_uri"]
    roots = [fetch_artifact_files(ctx, u) for u in [*runtime_deps, uri]]
    merged = merge_trees(ctx.local_cas, roots).digest
    checkout(ctx.local_cas, merged, dest)
    return merged
