"""Resolved plans kept between submits (pipeline.elements.resolved, api._submit_plan)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline import api
from pipeline.cas import LocalCas
from pipeline.config import load_config
from pipeline.elements import nodes, resolved
from pipeline.elements.errors import LoadError, SourceError
from pipeline.elements.project import Project
from pipeline.elements.resolved import KeptElement, PlannedElement

PROJECTS = Path(__file__).resolve().parents[1] / "projects"

CONF = """\
name: kept
element-path: elements
options:
  debug:
    type: bool
    description: debug build
    default: false
(@): [include/vars.yml]
"""
VARS = """\
variables:
  greeting: hello
"""
BASE = """\
kind: import
sources:
- kind: local
  path: files
"""
A = """\
kind: manual
build-depends: [base.bst]
variables:
  extra: plain
(?):
- debug:
    variables:
      extra: debug
config:
  build-commands:
  - echo %{greeting} %{extra} > %{install-root}/a
"""
B = """\
kind: manual
build-depends: [base.bst, a.bst]
config:
  install-commands: [echo b]
"""
ALL = """\
kind: stack
depends: [a.bst, b.bst]
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("REMEX_PARSED_CACHE", str(folder))
    # Files written by the test are trusted at once (their edits change the size).
    monkeypatch.setattr(nodes, "SETTLED_NS", -10_000_000_000)
    return folder


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    for name, text in {
        "project.conf": CONF,
        "include/vars.yml": VARS,
        "elements/base.bst": BASE,
        "elements/a.bst": A,
        "elements/b.bst": B,
        "elements/all.bst": ALL,
        "files/etc/hello": "hi\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def cas(tmp_path: Path) -> LocalCas:
    return LocalCas(tmp_path / "cas")


class Loads:
    """Counts the project loads (a kept plan is taken without one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = Project.load_targets

        def counted(project: Project, targets: list[str]) -> Any:
            self.count += 1
            return real(project, targets)

        monkeypatch.setattr(Project, "load_targets", counted)


def submit_plan(
    project: Path,
    cas: LocalCas,
    *,
    targets: Sequence[str] = ("all.bst",),
    options: dict[str, str] | None = None,
    config: Any = None,
) -> tuple[list[str], list[dict[str, Any]], list[list[str]]]:
    """What submit makes of the plan: names, specs (as sent), staged dependencies."""
    config = config or load_config(project, environ={})
    elements, keep = api._submit_plan(
        project, list(targets), cas=cas, options=options, config=config
    )
    ctx: Any = SimpleNamespace(local_cas=cas)
    specs = []
    for index, element in enumerate(elements):
        planned = api.stage_local_sources(ctx, element, project.parent / f"work{index}")
        specs.append(element.build_spec(planned.digests))
    if keep is not None:
        keep(specs)
    staged = [[d.name for d in e.staged_dependencies()] for e in elements]
    return [e.name for e in elements], specs, staged


def test_an_unchanged_project_is_taken_as_kept_with_the_same_specs(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project submitted once (loaded, then kept)
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas)
    assert loads.count == 1
    # When it is submitted again, unchanged
    again = submit_plan(project, cas)
    elements, _ = api._submit_plan(
        project, ["all.bst"], cas=cas, options=None, config=load_config(project, environ={})
    )
    # Then nothing was loaded, and the plan, its keys and specs are the same
    assert loads.count == 1
    assert again == first
    assert all(isinstance(e, KeptElement) for e in elements)
    assert [e.cache_key for e in elements] == [s["cache_key"] for s in first[1]]
    # ... and the same as with the caches off
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert submit_plan(project, cas) == first


def edit_element(project: Path) -> None:
    (project / "elements/b.bst").write_text(B.replace("echo b", "echo bb"))


def edit_conf(project: Path) -> None:
    (project / "project.conf").write_text(CONF + "environment:\n  EXTRA: x\n")


def edit_include(project: Path) -> None:
    (project / "include/vars.yml").write_text(VARS.replace("hello", "hello!"))


def edit_source(project: Path) -> None:
    (project / "files/etc/hello").write_text("hi there\n")


def touch_element(project: Path) -> None:
    # Same content, a new stat: loaded again (and keyed the same).
    path = project / "elements/a.bst"
    time.sleep(0.02)
    path.write_text(path.read_text())


@pytest.mark.parametrize(
    "edit", [edit_element, edit_conf, edit_include, edit_source, touch_element]
)
def test_a_changed_file_is_loaded_again(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch, edit: Any
) -> None:
    # Given a project kept by a submit
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas)
    # When one of its inputs changes
    edit(project)
    after = submit_plan(project, cas)
    # Then it is loaded again, and gives what a load without caches gives
    assert loads.count == 2
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert after == submit_plan(project, cas)
    if edit is touch_element:
        assert after == first
    else:
        assert after != first
    # ... and that load is kept in turn
    monkeypatch.setenv("REMEX_PARSED_CACHE", str(cache))
    submit_plan(project, cas)
    assert loads.count == 3  # (one more: the caches-off load above)


@pytest.mark.parametrize(
    "change",
    [
        {"targets": ["b.bst"]},
        {"options": {"debug": "true"}},
    ],
)
def test_other_inputs_are_not_the_kept_plan(
    project: Path,
    cas: LocalCas,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, Any],
) -> None:
    # Given a project kept for all.bst without options
    loads = Loads(monkeypatch)
    submit_plan(project, cas)
    # When it is submitted with other targets or options
    other = submit_plan(project, cas, **change)
    # Then it is loaded, as without caches
    assert loads.count == 2
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert other == submit_plan(project, cas, **change)


def test_option_values_from_remex_toml_are_an_input(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project kept with debug unset
    loads = Loads(monkeypatch)
    plain = submit_plan(project, cas)
    # When remex.toml sets the option
    (project / "remex.toml").write_text("[projects.kept.options]\ndebug = true\n")
    config = load_config(project, environ={})
    debug = submit_plan(project, cas, config=config)
    # Then the project is loaded again with it
    assert loads.count == 2
    assert debug != plain
    assert "hello debug" in str(debug[1][1]["command"])


def test_remex_code_is_an_input(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a kept project
    loads = Loads(monkeypatch)
    submit_plan(project, cas)
    # When remex's loader code changes (its modules' stat), or its version
    monkeypatch.setattr(resolved, "_code_stats", lambda: [["elements/keys.py", [1, 2, 3, 4]]])
    submit_plan(project, cas)
    monkeypatch.setattr("pipeline.__version__", "0.0.0-other")
    submit_plan(project, cas)
    # Then each loads the project again
    assert loads.count == 3


def test_a_plugin_file_is_an_input(
    tmp_path: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the plugins project (a local plugin kind) kept
    project = tmp_path / "plugins"
    shutil.copytree(PROJECTS / "plugins", project)
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas, targets=["mybuild.bst"])
    submit_plan(project, cas, targets=["mybuild.bst"])
    assert loads.count == 1
    # When the plugin's defaults change
    yaml = project / "localplugins/mybuild.yaml"
    yaml.write_text(yaml.read_text() + "\n# changed\n")
    submit_plan(project, cas, targets=["mybuild.bst"])
    # Then it is loaded again
    assert loads.count == 2
    assert first[0] == ["mybuild.bst"] or "mybuild.bst" in first[0]


def cache_file(cache: Path) -> Path:
    (file,) = (cache / "resolved").iterdir()
    return file


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty", "garbage"])
def test_a_damaged_file_is_a_miss(
    project: Path,
    cas: LocalCas,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    damage: str,
) -> None:
    # Given a kept project whose kept file is damaged
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas)
    file = cache_file(cache)
    raw = file.read_bytes()
    if damage == "flip":
        middle = len(raw) // 2
        raw = raw[:middle] + bytes([raw[middle] ^ 0x01]) + raw[middle + 1 :]
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "header":
        raw = raw.replace(resolved._HEADER, b"remex-resolved 9 ", 1)
    elif damage == "empty":
        raw = b""
    else:
        raw = os.urandom(4096)
    file.write_bytes(raw)
    # When it is submitted again
    again = submit_plan(project, cas)
    # Then it is loaded (the damage ignored), the same as before
    assert loads.count == 2
    assert again == first


def test_a_file_of_the_right_checksum_but_a_wrong_shape_is_a_miss(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a kept file rewritten with a valid checksum over a wrong plan
    # (an element whose spec names another element)
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas)
    file = cache_file(cache)
    raw = file.read_bytes()
    head, rest = raw.split(b"\n", 1)
    _, body = rest.split(b"\n", 1)
    body = body.replace(b'"element":"a.bst"', b'"element":"z.bst"', 1)
    file.unlink()
    nodes._write_file(str(file), head + b"\n" + resolved._HEADER, body)
    # When it is submitted again
    again = submit_plan(project, cas)
    # Then it is loaded, not taken
    assert loads.count == 2
    assert again == first


def test_an_error_is_never_hidden_nor_kept(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a kept project
    submit_plan(project, cas)
    # When an element file breaks
    (project / "elements/b.bst").write_text(B + "bogus: 1\n")
    # Then the submit reports it, each time (the kept plan is not taken)
    for _ in range(2):
        with pytest.raises(LoadError, match="bogus"):
            submit_plan(project, cas)
    # ... and a project whose first load fails keeps nothing
    shutil.rmtree(cache)
    with pytest.raises(LoadError, match="bogus"):
        submit_plan(project, cas)
    assert not (cache / "resolved").exists()


def test_a_local_source_changed_after_the_check_is_still_refused(
    project: Path, cas: LocalCas, cache: Path, tmp_path: Path
) -> None:
    # Given a kept plan taken again
    submit_plan(project, cas)
    config = load_config(project, environ={})
    elements, keep = api._submit_plan(project, ["all.bst"], cas=cas, options=None, config=config)
    assert keep is None
    base = elements[0]
    # When its local source changes before it is staged
    (project / "files/etc/hello").write_text("changed\n")
    # Then staging refuses it, as after a load
    with pytest.raises(SourceError, match="changed since the project was loaded"):
        base.sources[0].stage(cas, tmp_path / "work")


def test_a_fresh_file_is_not_kept(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given files changed just now (their stat could repeat within the
    # file system's time granularity)
    monkeypatch.setattr(nodes, "SETTLED_NS", 3_000_000_000)
    loads = Loads(monkeypatch)
    # When the project is submitted twice
    submit_plan(project, cas)
    submit_plan(project, cas)
    # Then both loaded it: nothing was kept
    assert loads.count == 2
    assert not (cache / "resolved").exists()


def test_no_targets_keep_nothing(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (The default targets depend on which files exist.)
    loads = Loads(monkeypatch)
    submit_plan(project, cas, targets=())
    submit_plan(project, cas, targets=())
    assert loads.count == 2


def test_a_kept_element_is_a_planned_element(project: Path, cas: LocalCas, cache: Path) -> None:
    # (The protocol submit's helpers take: both kinds of element satisfy it.)
    submit_plan(project, cas)
    config = load_config(project, environ={})
    elements, _ = api._submit_plan(project, ["all.bst"], cas=cas, options=None, config=config)
    planned: Sequence[PlannedElement] = elements
    assert [e.name for e in planned] == ["base.bst", "a.bst", "b.bst", "all.bst"]
    with pytest.raises(ValueError, match="source"):
        planned[0].build_spec([])


def test_an_element_mask_option_keeps_nothing(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project with an element-mask option (its values are the files present)
    conf = project / "project.conf"
    conf.write_text(
        conf.read_text().replace(
            "options:\n",
            "options:\n  mask:\n    type: element-mask\n    description: m\n    default: []\n",
        )
    )
    loads = Loads(monkeypatch)
    # When it is submitted twice
    submit_plan(project, cas)
    submit_plan(project, cas)
    # Then both loaded it
    assert loads.count == 2
    assert not (cache / "resolved").exists()


def test_concurrent_submits_keep_a_whole_plan(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a plan loaded, and two submits keeping it at once (each writes a
    # temporary file and renames it)
    config = load_config(project, environ={})
    first = submit_plan(project, cas)
    file = cache_file(cache)
    file.unlink()
    keeps = []
    for _ in range(2):
        elements, keep = api._submit_plan(
            project, ["all.bst"], cas=cas, options=None, config=config
        )
        assert keep is not None
        keeps.append((elements, keep))
    ctx: Any = SimpleNamespace(local_cas=cas)
    specs = [
        e.build_spec(api.stage_local_sources(ctx, e, project.parent / "w").digests)
        for e in keeps[0][0]
    ]
    threads = [threading.Thread(target=keep, args=(specs,)) for _, keep in keeps for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then the kept file is whole (taken by the next submit), no temporary file is left
    loads = Loads(monkeypatch)
    assert submit_plan(project, cas) == first
    assert loads.count == 0
    assert [p.name for p in (cache / "resolved").iterdir()] == [file.name]


@pytest.mark.parametrize("name", ["kinds", "overlaps"])
def test_dependency_entries_of_every_shape_come_back_the_same(
    tmp_path: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Given a project whose specs stage dependencies elsewhere (script
    # locations), select parts of them (filter) or whitelist overlaps
    project = tmp_path / name
    shutil.copytree(PROJECTS / name, project)
    (project / "sysroot/usr/bin").mkdir(parents=True)
    (project / "sysroot/usr/bin/sh").write_text("#!/bin/true\n")
    targets = sorted(p.name for p in (project / "elements").glob("*.bst"))
    loads = Loads(monkeypatch)
    # When it is submitted twice (loaded and kept, then taken as kept)
    first = submit_plan(project, cas, targets=targets)
    again = submit_plan(project, cas, targets=targets)
    # Then the kept plan gives what a load without caches gives
    assert loads.count == 1
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert first == again == submit_plan(project, cas, targets=targets)
    whitelists = [d["overlap_whitelist"] for s in first[1] for d in s["dependencies"]]
    locations = [d["path"] for s in first[1] for d in s["dependencies"]]
    assert any(whitelists) if name == "overlaps" else any(locations)
