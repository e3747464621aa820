"""Applying a source's ``apply`` step (a patch) to the sources merged before it.

The merged tree is checked out into a scratch folder, the system ``patch``
runs there, and the result is imported back into the local CAS: the same
spec always gives the same tree. A patch that does not apply fails the
element for good, with ``patch``'s own output in the message.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pipeline.cas import LocalCas, checkout, import_directory
from pipeline.digest import Digest
from pipeline.stages.errors import BuildFailedError, SpecError

__all__ = ["apply_source_step"]

# A patch that hangs (it never should: stdin is closed) is cut after this.
_PATCH_TIMEOUT = 600.0
_OUTPUT_SHOWN = 4000


def apply_source_step(
    cas: LocalCas,
    element: str,
    index: int,
    step: dict[str, Any],
    directory: list[str],
    merged: Digest,
    tree: Digest,
) -> Digest:
    """The sources ``merged`` so far with ``step`` applied in ``directory``.

    Args:
        step: the source entry's ``apply`` (``{"patch": FILE, "strip": N}``).
        directory: where in the merged sources it applies (parts; [] = top).
        tree: the source's own tree (holding FILE).

    Raises:
        SpecError: an ``apply`` step remex does not know.
        BuildFailedError: nothing to patch there, or ``patch`` failed.
    """
    name, strip = step.get("patch"), step.get("strip")
    if not isinstance(name, str) or not isinstance(strip, int) or "/" in name or strip < 0:
        raise SpecError(element, f"sources[{index}].apply: unknown step {step!r}")
    where = "/".join(directory) or "."
    with tempfile.TemporaryDirectory(prefix="remex-patch-") as scratch:
        root = Path(scratch) / "sources"
        patch_dir = Path(scratch) / "patch"
        checkout(cas, merged, root)
        checkout(cas, tree, patch_dir)
        target = root.joinpath(*directory)
        if not target.is_dir() or target.is_symlink() or not any(target.iterdir()):
            raise BuildFailedError(
                element,
                f"sources[{index}]: nothing to patch in directory {where!r} "
                f"(patch {name}: the earlier sources stage nothing there)",
            )
        try:
            result = subprocess.run(
                ["patch", f"-p{strip}", "-d", str(target), "--no-backup-if-mismatch",
                 "--forward", "-i", str(patch_dir / name)],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=_PATCH_TIMEOUT,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildFailedError(element, f"sources[{index}]: patch {name}: {exc}") from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode("utf-8", "replace").strip()
            raise BuildFailedError(
                element,
                f"sources[{index}]: patch {name} does not apply in {where!r} "
                f"(patch -p{strip}, exit code {result.returncode}):\n{output[-_OUTPUT_SHOWN:]}",
            )
        return import_directory(cas, root)
