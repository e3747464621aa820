"""``remex artifact list|show|log|delete|checkout`` as a user runs them, on a
real stack (redis-server, an execution and an artifact buildbox-casd, two
workers): build, list, show, log, delete, the rebuild that follows, checkout,
and the refusals (not found: exit 1; bad usage: exit 2; never a traceback).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.servers import RemexStack
from pipeline.testing.dag import DagProject, file_name

NO_SUCH_KEY = "0" * 64


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one ``remex: ...`` line of a refusal with exit ``code``."""
    assert result.returncode == code, f"{result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("remex: "), result.stderr
    return lines[-1]


def full_key(stack: RemexStack, project: Path, element: str) -> str:
    out = ok(stack.cli("show", "-C", project, "--deps", "none", "--format", "%{full-key}", element))
    key = out.strip()
    assert len(key) == 64, out
    return key


def states(output: dict[str, Any]) -> dict[str, str]:
    return {e["element"]: e["state"] for e in output["elements"]}


@pytest.fixture(scope="module")
def built(
    remex_stack: RemexStack, tmp_path_factory: pytest.TempPathFactory, busybox_sysroot: Path
) -> DagProject:
    from pipeline.testing.dag import make_dag_project

    project = make_dag_project(
        tmp_path_factory.mktemp("artifacts") / "p",
        n=3,
        shape="chain",
        salt="artifact-commands",
        sysroot=busybox_sysroot,
    )
    code, output = remex_stack.build_json(project.path, *project.targets)
    assert code == 0, output
    return project


def test_list_show_log_checkout_delete_and_the_rebuild(
    remex_stack: RemexStack, built: DagProject, tmp_path: Path
) -> None:
    cli: Callable[..., subprocess.CompletedProcess[str]] = remex_stack.cli
    project, element = built.path, built.elements[1]
    key = full_key(remex_stack, project, element)

    # list by element: its key, size, name
    listed = ok(cli("artifact", "list", "-C", project, element))
    assert listed.startswith(key), listed
    assert "files" in listed and element.removesuffix(".bst") in listed
    # list by key prefix: found through the index the worker wrote
    by_key = ok(cli("artifact", "list", "--key", key[:10]))
    assert key in by_key
    [entry] = json.loads(ok(cli("artifact", "list", "--key", key, "--json")))
    assert entry["key"] == key and entry["cached"] and entry["files"] >= 1
    ref = entry["ref"]

    # show: cached, key, files, size, who pushed it and when
    shown = ok(cli("artifact", "show", "-C", project, element))
    assert shown.startswith(f"cached      {key[:16]}  {element}"), shown
    [record] = json.loads(ok(cli("artifact", "show", "-C", project, element, "--json")))
    assert record["host"] and record["pushed"] and record["size_bytes"] > 0
    # by its ref and by its key, the same artifact
    assert key[:16] in ok(cli("artifact", "show", ref))
    assert key[:16] in ok(cli("artifact", "show", key[:12]))
    # a ref with wildcards, as bst
    project_name = ref.split("/")[0]
    assert key[:16] in ok(cli("artifact", "show", f"{project_name}/{ref.split('/')[1]}/*"))

    # log: the artifact's, as remex log prints it
    log = ok(cli("artifact", "log", "-C", project, element))
    assert log == ok(cli("log", "-C", project, element))
    out_dir = tmp_path / "logs"
    ok(cli("artifact", "log", "-C", project, element, "--out", out_dir))
    assert (out_dir / f"{ref}.log").read_text() == log

    # checkout: by element (as remex checkout) and by ref
    ok(cli("artifact", "checkout", "-C", project, "--no-integrate", element, tmp_path / "a"))
    ok(cli("artifact", "checkout", ref, tmp_path / "b"))
    for dest in (tmp_path / "a", tmp_path / "b"):
        [path] = [p for p in dest.rglob(file_name(element))]
        assert path.read_bytes() == built.expected[element][file_name(element)]

    # delete: gone for show, list, log and checkout
    assert f"deleted {element}" in ok(cli("artifact", "delete", "-C", project, element))
    assert refused(cli("artifact", "show", "-C", project, element), 1) == (
        "remex: 1 of 1 artifact(s) not cached"
    )
    refused(cli("artifact", "list", "--key", key), 1)
    shown = ok(cli("show", "-C", project, "--deps", "none", element))
    assert shown.startswith("buildable"), shown
    refused(cli("artifact", "list", "-C", project, element), 1)
    assert "is not cached" in refused(cli("checkout", "-C", project, element, tmp_path / "c"), 1)
    assert "is not cached" in refused(cli("artifact", "checkout", ref, tmp_path / "d"), 1)
    assert "nothing deleted" in refused(cli("artifact", "delete", ref), 1)
    # the others are untouched
    assert ok(cli("artifact", "show", "-C", project, built.elements[0])).startswith("cached")

    # the next build makes it again; what it depends on is still found cached
    # (its dependents go through the pipeline too, whose last stage finds
    # their artifacts there: submit looks up no further than a miss)
    code, output = remex_stack.build_json(project, *built.targets)
    assert code == 0, output
    assert states(output)[element] == "built", states(output)
    # from the action's cached result: delete keeps the ActionCache entry
    [rebuilt] = [e for e in output["elements"] if e["element"] == element]
    assert rebuilt["action_cached"] is True, rebuilt
    assert states(output)[built.elements[0]] == "cached", states(output)
    assert states(output)["base.bst"] == "cached", states(output)
    assert ok(cli("artifact", "show", "-C", project, element)).startswith("cached")
    assert key in ok(cli("artifact", "list", "--key", key))


def test_not_found_is_one_sentence_exit_1(remex_stack: RemexStack, built: DagProject) -> None:
    cli = remex_stack.cli
    ref = f"nosuch/element/{NO_SUCH_KEY}"
    assert "not cached" in refused(cli("artifact", "show", ref), 1)
    assert "no build log" in refused(cli("artifact", "log", ref), 1)
    assert "nothing deleted" in refused(cli("artifact", "delete", ref), 1)
    assert "not cached" in refused(cli("artifact", "checkout", ref, "/nonexistent/x"), 1)
    assert "in the artifact index" in refused(cli("artifact", "list", "--key", "0000000"), 1)
    assert "in the artifact index" in refused(cli("artifact", "show", "nosuch/*/*"), 1)


def test_bad_usage_is_exit_2(remex_stack: RemexStack, built: DagProject) -> None:
    cli = remex_stack.cli
    assert "give ARTIFACTS" in refused(cli("artifact", "list"), 2)
    assert "is not an element" in refused(cli("artifact", "show", "not-a-key"), 2)
    assert "hex digits" in refused(cli("artifact", "list", "--key", "xyz"), 2)
    refused(cli("artifact", "show", "-C", built.path, "nosuch.bst"), 2)
    ref = f"p/e/{NO_SUCH_KEY}"
    assert "--deps run" in refused(cli("artifact", "checkout", "--deps", "run", ref, "x"), 2)
    result = cli("artifact", "show")  # a missing argument: click's usage error
    assert result.returncode == 2 and "Traceback" not in result.stderr
