"""The staging window with real workers: a worker stages no more elements at
once than ``[worker] staging`` says, and the build is the same.

One worker of eight threads and an execution buildbox-casd of two jobs: a
wide build's twelve leaves all become ready together, so the worker takes
eight of their first stages at once and all but the window's places wait.
What the worker did is read back with the ``remex_stats`` inspect command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from pipeline.servers import RemexStack
from pipeline.testing.dag import make_dag_project


def remex_stats(stack: RemexStack) -> dict[str, Any]:
    """The ``remex_stats`` reply of the stack's one worker (not of its fetch pool)."""
    app = Celery("remex-test", broker=stack.env["REMEX_BROKER_URL"])
    try:
        replies = app.control.broadcast("remex_stats", reply=True, timeout=5.0)
    finally:
        app.close()
    nodes = {node: stats for reply in replies or [] for node, stats in reply.items()}
    workers = [stats for node, stats in nodes.items() if node.startswith("remex-w1@")]
    assert len(workers) == 1, nodes
    stats: dict[str, Any] = workers[0]
    return stats


def build_wide(stack: RemexStack, tmp_path: Path, sysroot: Path) -> None:
    """Build a wide project of twelve leaves; check every element was built."""
    project = make_dag_project(tmp_path / "wide", 12, shape="wide", sysroot=sysroot)
    done = stack.cli("build", "--json", "-C", project.path, *project.targets, timeout=180)
    assert done.returncode == 0, f"{done.stderr}\n{stack.logs()}"
    states = {e["element"]: e["state"] for e in json.loads(done.stdout)["elements"]}
    assert set(project.elements) <= set(states) and set(states.values()) == {"built"}


@pytest.mark.parametrize(("staging", "waited"), [(1, True), (0, False)])
def test_a_worker_stages_as_many_elements_at_once_as_its_window_allows(
    tmp_path: Path, busybox_sysroot: Path, staging: int, waited: bool
) -> None:
    # Given a worker of eight threads whose window has one place, or no limit
    with RemexStack(
        tmp_path / "stack", workers=1, concurrency=8, jobs=2, worker_staging=staging
    ) as stack:
        # When a wide build's twelve leaves become ready together
        build_wide(stack, tmp_path, busybox_sysroot)
        # Then every element is built (build_wide checks); with one place the
        # worker never staged two at once, the others waiting their turn,
        # and without a limit none waited
        stats = remex_stats(stack)
    assert stats["staging_size"] == staging
    assert stats["staging_peak"] == staging
    assert (stats["staging_waits"] > 0) is waited
    assert (stats["staging_waited_ms"] > 0) is waited
