"""lower_cpu_priority: the process's nice value, and its session's autogroup
only when the process leads that session. Each case runs in a child process
(a nice value, once raised, cannot be lowered again without privileges)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.servers.process import lower_cpu_priority

CHILD = """
import json, os, sys, threading
from pathlib import Path
from pipeline.servers.process import lower_cpu_priority
done = lower_cpu_priority(int(sys.argv[1]), autogroup=Path(sys.argv[2]))
later = []
thread = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0)))
thread.start(); thread.join()
print(json.dumps({"done": done, "nice": os.getpriority(os.PRIO_PROCESS, 0), "thread": later[0]}))
"""


def run_child(nice: int, autogroup: Path, *, own_session: bool) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(nice), str(autogroup)],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=own_session,
        cwd=Path(__file__).parents[2],
    )
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_a_session_leader_lowers_itself_its_threads_and_its_autogroup(tmp_path: Path) -> None:
    autogroup = tmp_path / "autogroup"
    autogroup.write_text("/autogroup-42 nice 0\n")
    answer = run_child(10, autogroup, own_session=True)
    assert answer == {"done": True, "nice": 10, "thread": 10}
    assert autogroup.read_text() == "10\n"


def test_a_process_in_another_session_leaves_that_sessions_autogroup_alone(
    tmp_path: Path,
) -> None:
    autogroup = tmp_path / "autogroup"
    autogroup.write_text("/autogroup-42 nice 0\n")
    answer = run_child(7, autogroup, own_session=False)
    assert answer == {"done": False, "nice": 7, "thread": 7}
    assert autogroup.read_text() == "/autogroup-42 nice 0\n"


def test_an_autogroup_already_lower_and_a_kernel_without_autogroups(tmp_path: Path) -> None:
    autogroup = tmp_path / "autogroup"
    autogroup.write_text("/autogroup-42 nice 15\n")
    assert run_child(10, autogroup, own_session=True)["done"] is True
    assert autogroup.read_text() == "/autogroup-42 nice 15\n"
    answer = run_child(10, tmp_path / "missing", own_session=True)
    assert answer == {"done": False, "nice": 10, "thread": 10}


def test_nice_zero_changes_nothing_and_out_of_range_is_refused(tmp_path: Path) -> None:
    autogroup = tmp_path / "autogroup"
    autogroup.write_text("/autogroup-42 nice 0\n")
    assert run_child(0, autogroup, own_session=True) == {"done": False, "nice": 0, "thread": 0}
    assert autogroup.read_text() == "/autogroup-42 nice 0\n"
    with pytest.raises(ValueError, match="0-19"):
        lower_cpu_priority(20)
