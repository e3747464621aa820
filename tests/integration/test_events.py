"""Events, on-error modes and the build listing with real ``remex worker``
processes, redis-server (AOF on, so it can be restarted) and buildbox-casd.

A stack of the module's own: two workers whose heartbeat timeout is 5 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.servers import RemexStack
from pipeline.testing.dag import DagProject
from tests.integration.test_pipeline import BUILD_TIMEOUT, build_ids, wait_for

STAGES = ("stage_to_cas", "upload", "execute", "fetch_outputs", "push_artifact")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    with RemexStack(
        tmp_path_factory.mktemp("events-stack"), workers=2, persistent_redis=True
    ) as remex:
        yield remex


def communicate(process: subprocess.Popen[str], stack: RemexStack) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"did not finish:\n{stderr}\n{stack.logs()}") from None
    return process.returncode, stdout, stderr


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """Every line of stdout is one JSON object (else the test fails here)."""
    return [json.loads(line) for line in stdout.splitlines()]


def stream_key(id_: str) -> tuple[int, int]:
    ms, _, seq = id_.partition("-")
    return int(ms), int(seq)


def assert_in_order(events: list[dict[str, Any]]) -> None:
    """Ids never go back and no event is repeated (the events of one stream
    entry share its id: a worker records the stage starts of many elements
    at once), and each element's events follow its life: queued, some of its
    five stages in order (a worker records only the latest stage an element
    reached since its last batch), then built."""
    ids = [stream_key(e["id"]) for e in events]
    assert ids == sorted(ids), "out of order"
    seen_events = [(e["id"], e.get("element"), e["event"], e.get("stage")) for e in events]
    assert len(set(seen_events)) == len(seen_events), "repeated"
    per_element: dict[str, list[str]] = {}
    for event in events:
        if event.get("element"):
            what = event["event"] + (f":{event['stage']}" if event["event"] == "stage" else "")
            per_element.setdefault(event["element"], []).append(what)
    for element, seen in per_element.items():
        if seen == ["cached"]:
            continue
        # The last attempt (a re-send after a fault starts again with queued).
        last = len(seen) - 1 - seen[::-1].index("queued")
        life = [s for s in seen[last:] if s != "operation"]
        if element == "all.bst":
            continue  # a stack element: no execute stage to speak of, same path anyway
        assert life[0] == "queued" and life[-1] == "built", (element, seen)
        stages = [s.removeprefix("stage:") for s in life[1:-1]]
        assert all(s in STAGES for s in stages), (element, seen)
        order = [STAGES.index(s) for s in stages]
        assert order == sorted(set(order)), (element, seen)


# --- events of a real build ----------------------------------------------------------------


def test_json_lines_prints_every_event_of_a_build_in_order(
    stack: RemexStack, project_factory: Callable[..., DagProject]
) -> None:
    # Given a small DAG
    project = project_factory(n=6, shape="dag", layers=2)
    # When it is built with --json-lines
    result = stack.cli("build", "-C", project.path, *project.targets, "--json-lines")
    # Then stdout is JSON lines: the events, then the summary
    assert result.returncode == 0, result.stderr + stack.logs()
    lines = json_lines(result.stdout)
    summary, events = lines[-1], lines[:-1]
    assert summary["event"] == "summary" and summary["status"] == "succeeded"
    assert events[0]["event"] == "submitted" and events[-1]["event"] == "finished"
    assert events[-1]["status"] == "succeeded"
    assert_in_order(events)
    # And every element built says where it ran and how long it took
    for event in events:
        if event["event"] == "stage":
            assert event["host"] in ("w1", "w2") and event["worker"]
        if event["event"] == "built":
            assert event["finished"] >= event["started"] > 0
    built = {e["element"] for e in events if e["event"] in ("built", "cached")}
    assert built == set(project.all_elements)
    # And the execute stage named its operation
    assert any(e["event"] == "operation" and e["operation"] for e in events)
    # And pipeline.events reads the same events afterwards, and resumes after any id
    build_id = summary["build"]
    again = stack.cli("status", build_id, "--json-lines")
    assert again.returncode == 0, again.stderr
    assert json_lines(again.stdout)[:-1] == events
    followed = stack.cli("status", build_id, "--follow")
    assert followed.returncode == 0, followed.stderr
    assert f"remex: build {build_id} succeeded" in followed.stdout


def test_status_follow_survives_a_redis_restart_without_loss_or_repeats(
    stack: RemexStack, project_factory: Callable[..., DagProject]
) -> None:
    # Given a build of 2 s actions, and a follower started elsewhere
    project = project_factory(n=8, shape="dag", layers=2, sleep=2)
    known = build_ids(stack)
    build = stack.cli_popen("build", "-C", project.path, *project.targets, "--json")
    [build_id] = wait_for("the build to be submitted", lambda: build_ids(stack) - known, 60)
    follower = stack.cli_popen("status", build_id, "--follow", "--json-lines")
    scheduler = stack.scheduler()
    wait_for(
        "an element executing",
        lambda: any(e.info.get("stage") == "execute" for e in scheduler.status(build_id).elements),
    )
    # When redis-server is SIGKILLed mid-build and started again 3 s later
    stack.redis.kill()
    time.sleep(3)
    stack.redis.start()
    # Then the build and the follower both end
    code, _, build_err = communicate(build, stack)
    assert code == 0, build_err + stack.logs()
    code, stdout, stderr = communicate(follower, stack)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    lines = json_lines(stdout)
    events = lines[:-1]
    assert lines[-1]["event"] == "summary" and events[-1]["event"] == "finished"
    # And no event was repeated, and none the stream holds was missed
    assert_in_order(events)
    stream = [str(i) for i, _ in scheduler.redis.xrange(scheduler.keys.events(build_id))]
    seen = {e["id"] for e in events}
    assert [i for i in stream if i not in seen] == []


# --- on-error ------------------------------------------------------------------------------

# A unique length for the long action, to find its process on this host.
LONG_SLEEP = "47.25"


def branches_project(root: Path, sysroot: Path, *, b_sleep: str) -> Path:
    """Three branches: a (fails after 2 s), b1 (sleeps ``b_sleep``) -> b2,
    c1 (sleeps 4 s) -> c2; all.bst stacks the tops. a, b1 and c1 start
    together (two workers of four threads), so b1 and c1 run when a fails."""
    shutil.copytree(sysroot, root / "sysroot", symlinks=True)
    elements = root / "elements"
    elements.mkdir()
    salt = uuid.uuid4().hex
    (root / "project.conf").write_text(
        f"name: branches\nmin-version: 2.0\nelement-path: elements\n"
        f"environment:\n  SALT: '{salt}'\n"
    )
    (elements / "base.bst").write_text("kind: import\nsources:\n- kind: local\n  path: sysroot\n")

    def manual(name: str, deps: list[str], commands: list[str]) -> None:
        lines = ["kind: manual", "build-depends:", "- base.bst", *(f"- {d}" for d in deps)]
        lines += ["config:", "  build-commands:", *(f"  - '{c}'" for c in commands)]
        lines += [
            "  install-commands:",
            f"  - 'mkdir -p %{{install-root}}/out && touch %{{install-root}}/out/{name}'",
        ]
        (elements / f"{name}.bst").write_text("\n".join(lines) + "\n")

    manual("a", [], ["sleep 2", "exit 1"])
    manual("b1", [], [f"sleep {b_sleep}"])
    manual("b2", ["b1.bst"], ["true"])
    manual("c1", [], ["sleep 4"])
    manual("c2", ["c1.bst"], ["true"])
    (elements / "all.bst").write_text("kind: stack\ndepends:\n- a.bst\n- b2.bst\n- c2.bst\n")
    return root


def build_with(stack: RemexStack, project: Path, mode: str) -> tuple[int, list[dict[str, Any]]]:
    result = stack.cli("build", "-C", project, "all.bst", "--json-lines", "--on-error", mode)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json_lines(result.stdout)


def final_states(lines: list[dict[str, Any]]) -> dict[str, str]:
    return {e["element"]: e["state"] for e in lines[-1]["elements"]}


def test_on_error_continue_builds_the_other_branches(
    stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    project = branches_project(tmp_path / "p", busybox_sysroot, b_sleep="2")
    code, lines = build_with(stack, project, "continue")
    assert code == 1
    assert final_states(lines) == {
        "base.bst": final_states(lines)["base.bst"],
        "a.bst": "failed",
        "b1.bst": "built",
        "b2.bst": "built",
        "c1.bst": "built",
        "c2.bst": "built",
        "all.bst": "skipped",
    }


def test_on_error_quit_starts_nothing_new(
    stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given three branches whose b1 and c1 still run when a fails
    project = branches_project(tmp_path / "p", busybox_sysroot, b_sleep="5")
    # When built with --on-error quit
    code, lines = build_with(stack, project, "quit")
    # Then the build fails; the running ones finished, nothing started after the failure
    assert code == 1 and lines[-1]["status"] == "failed"
    states = final_states(lines)
    assert states["a.bst"] == "failed"
    assert (states["b1.bst"], states["c1.bst"]) == ("built", "built")
    assert (states["b2.bst"], states["c2.bst"], states["all.bst"]) == (
        "cancelled",
        "cancelled",
        "skipped",
    )
    events = lines[:-1]
    failed_at = next(i for i, e in enumerate(events) if e["event"] == "failed")
    assert not [e for e in events[failed_at:] if e["event"] in ("queued", "waiting")]
    assert "a.bst failed and on-error is quit" in next(
        e["error"] for e in events if e.get("element") == "b2.bst" and e["event"] == "cancelled"
    )


def sleeping_processes() -> list[int]:
    """PIDs on this host whose command line ends with ``LONG_SLEEP``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if LONG_SLEEP.encode() in args and any(a.endswith(b"sleep") for a in args):
            found.append(int(proc.name))
    return found


def test_on_error_terminate_cancels_a_long_running_action(
    stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given three branches, b1 a long sleep
    project = branches_project(tmp_path / "p", busybox_sysroot, b_sleep=LONG_SLEEP)
    started = time.monotonic()
    # When built with --on-error terminate
    process = stack.cli_popen(
        "build", "-C", project, "all.bst", "--json-lines", "--on-error", "terminate"
    )
    # (while the long action runs on the execution server)
    wait_for("the long action to run", sleeping_processes, timeout=60)
    code, stdout, stderr = communicate(process, stack)
    seconds = time.monotonic() - started
    assert "Traceback" not in stderr, stderr
    lines = json_lines(stdout)
    # Then the build fails at once (not after the long sleep), b1 cancelled while running
    assert code == 1 and lines[-1]["status"] == "failed"
    assert seconds < 40, seconds
    states = final_states(lines)
    assert states["a.bst"] == "failed" and states["b1.bst"] == "cancelled"
    assert states["b2.bst"] == "cancelled"
    # And its action stopped on the execution server too
    wait_for("the long action to stop", lambda: not sleeping_processes(), timeout=15)


# --- the listing ---------------------------------------------------------------------------


def test_builds_lists_them_with_counts(
    stack: RemexStack, project_factory: Callable[..., DagProject]
) -> None:
    project = project_factory(n=3, shape="wide")
    result = stack.cli("build", "-C", project.path, *project.targets, "--json", "--priority", "3")
    assert result.returncode == 0, result.stderr
    build_id = json.loads(result.stdout)["build"]
    listed = stack.cli("builds", "--state", "succeeded", "--json")
    assert listed.returncode == 0, listed.stderr
    ours = next(b for b in json.loads(listed.stdout) if b["build"] == build_id)
    assert ours["project"] == "dag" and ours["targets"] == list(project.targets)
    assert ours["priority"] == 3 and ours["on_error"] == "continue"
    assert ours["host"] and ours["user"] and ours["duration"] > 0
    counts = ours["counts"]
    assert counts["total"] == 5 and counts["active"] == 0
    assert counts.get("built", 0) + counts.get("cached", 0) == 5
    assert all(b["status"] == "succeeded" for b in json.loads(listed.stdout))
    human = stack.cli("builds")
    assert human.returncode == 0
    header, *rows = human.stdout.splitlines()
    assert header.split()[:2] == ["BUILD", "STATUS"]
    row = next(r for r in rows if r.startswith(build_id))
    assert row.split()[1:4] == ["succeeded", "dag", "all.bst"]
    running = stack.cli("builds", "--state", "running", "--json")
    assert build_id not in running.stdout


@pytest.mark.parametrize("args", [["--follow"], ["--json-lines"], ["--follow", "--json-lines"]])
def test_following_an_unknown_build_is_one_sentence_exit_1(
    stack: RemexStack, args: list[str]
) -> None:
    result = stack.cli("status", "0123abcd", *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip() == "remex: no build '0123abcd'"
    assert result.stdout == ""
