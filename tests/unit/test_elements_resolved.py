"""Resolved plans kept between submits (pipeline.elements.resolved, api._submit_plan)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
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
from pipeline.elements.sources import source_cache_key

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
) -> tuple[list[str], list[dict[str, Any]], list[list[str]], str, str]:
    """What submit makes of the plan: names, specs (as sent), staged
    dependencies, the fetch requests of its network sources (as JSON), and
    the specs as JSON (their bytes, keys in order)."""
    config = config or load_config(project, environ={})
    elements, keep = api._submit_plan(
        project, list(targets), cas=cas, options=options, config=config
    )
    ctx: Any = SimpleNamespace(local_cas=cas)
    specs = []
    requests = []
    for index, element in enumerate(elements):
        planned = api.stage_local_sources(ctx, element, project.parent / f"work{index}")
        specs.append(element.build_spec(planned.digests))
        requests.extend(request for _, request in planned.requests)
        # As submit does: a network source found in the source cache, or not.
        for at, _ in planned.requests:
            entry = specs[-1]["sources"][at]
            entry.pop("digest")
            entry["uri"] = "urn:example"
    # (Compared before keep: what was sent, not what keep made of it.)
    text = json.dumps(specs)
    sent = json.loads(text)
    if keep is not None:
        keep(specs)
    staged = [[d.name for d in e.staged_dependencies()] for e in elements]
    return [e.name for e in elements], sent, staged, json.dumps(requests), text


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


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # a spec naming an element itself (its head names it)
        (b'{"kind":"manual"', b'{"element":"z.bst","kind":"manual"'),
        # a build environment the plan does not have
        (b'"environment":0', b'"environment":7'),
        (b'"environment":0', b'"environment":-1'),
    ],
)
def test_a_file_of_the_right_checksum_but_a_wrong_shape_is_a_miss(
    project: Path,
    cas: LocalCas,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    old: bytes,
    new: bytes,
) -> None:
    # Given a kept file rewritten with a valid checksum over a wrong plan
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas)
    file = cache_file(cache)
    raw = file.read_bytes()
    head, rest = raw.split(b"\n", 1)
    _, body = rest.split(b"\n", 1)
    assert old in body
    body = body.replace(old, new, 1)
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


# --- network sources -------------------------------------------------------------

NET_CONF = """\
name: net
element-path: elements
aliases:
  upstream: https://user:secret@downloads.example/pub/
  forge: https://git.example/
mirrors:
- name: near
  aliases:
    upstream: [https://near.example/pub/]
- name: far
  aliases:
    upstream: [https://far.example/pub/]
"""
TARBALL_REF = hashlib.sha256(b"lib-1.0").hexdigest()
NET_ELEMENTS = {
    "base.bst": BASE,
    "lib.bst": f"""\
kind: manual
build-depends: [base.bst]
sources:
- kind: tar
  url: upstream:lib-1.0.tar.gz
  ref: {TARBALL_REF}
- kind: patch
  path: patches/fix.patch
config:
  install-commands: [make install]
""",
    "tool.bst": """\
kind: manual
build-depends: [base.bst, lib.bst]
sources:
- kind: git
  url: forge:tool.git
  ref: 0123456789abcdef0123456789abcdef01234567
""",
    "all.bst": "kind: stack\ndepends: [lib.bst, tool.bst]\n",
}


@pytest.fixture
def net_project(tmp_path: Path) -> Path:
    # Tarballs and git repositories by URL (never fetched: only their
    # requests are made), through aliases and mirrors; a patch of the project.
    root = tmp_path / "net"
    files = {f"elements/{name}": text for name, text in NET_ELEMENTS.items()}
    files.update({"project.conf": NET_CONF, "files/etc/hello": "hi\n",
                  "patches/fix.patch": "--- a/x\n+++ b/x\n"})  # fmt: skip
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_network_sources_are_kept_with_their_fetch_requests(
    net_project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project of tar, git and patch sources submitted once
    loads = Loads(monkeypatch)
    first = submit_plan(net_project, cas)
    # When it is submitted again, unchanged
    again = submit_plan(net_project, cas)
    # Then it was not loaded again: specs and fetch requests are the same,
    # and the same as with the caches off
    assert loads.count == 1
    assert again == first
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert submit_plan(net_project, cas) == first
    requests = json.loads(first[3])
    assert [r["kind"] for r in requests] == ["tar", "git"]
    assert requests[0]["urls"] == [
        "https://near.example/pub/lib-1.0.tar.gz",
        "https://far.example/pub/lib-1.0.tar.gz",
        "https://user:secret@downloads.example/pub/lib-1.0.tar.gz",
    ]
    assert requests[0]["element"] == "lib.bst" and requests[1]["field"] == "sources[0]"


def test_the_kept_plan_is_the_users_own(net_project: Path, cas: LocalCas, cache: Path) -> None:
    # (Its fetch requests hold URLs with credentials, as project.conf and
    # the parsed-file cache beside it do.)
    submit_plan(net_project, cas)
    assert stat.S_IMODE(cache_file(cache).stat().st_mode) == 0o600
    assert b"user:secret@" in cache_file(cache).read_bytes()


def edit_alias_credential(project: Path, environ: dict[str, str]) -> None:
    conf = project / "project.conf"
    conf.write_text(conf.read_text().replace("user:secret", "user:other"))


def edit_mirror(project: Path, environ: dict[str, str]) -> None:
    conf = project / "project.conf"
    conf.write_text(conf.read_text().replace("near.example", "nearer.example"))


def default_mirror_variable(project: Path, environ: dict[str, str]) -> None:
    environ["REMEX_FETCH_DEFAULT_MIRROR"] = "far"


def default_mirror_file(project: Path, environ: dict[str, str]) -> None:
    (project / "remex.toml").write_text('[fetch]\ndefault-mirror = "far"\n')


def fetch_setting(project: Path, environ: dict[str, str]) -> None:
    (project / "remex.toml").write_text("[fetch]\nretries = 7\n")


def user_config(project: Path, environ: dict[str, str]) -> None:
    user = project.parent / "user.toml"
    user.write_text("[fetch]\nread-timeout = 5\n")
    environ["REMEX_CONFIG"] = str(user)


def edit_patch(project: Path, environ: dict[str, str]) -> None:
    (project / "patches/fix.patch").write_text("--- a/y\n+++ b/y\n")


@pytest.mark.parametrize(
    "change",
    [edit_alias_credential, edit_mirror, default_mirror_variable, default_mirror_file,
     fetch_setting, user_config, edit_patch],
)  # fmt: skip
def test_what_makes_a_fetch_request_is_an_input(
    net_project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch, change: Any
) -> None:
    # Given a project of network sources kept by a submit
    loads = Loads(monkeypatch)
    first = submit_plan(net_project, cas)
    # When what its fetch requests are made of changes (the project's
    # aliases and mirrors, the configuration from a file or the environment)
    environ: dict[str, str] = {}
    change(net_project, environ)
    config = load_config(net_project, environ=environ)
    after = submit_plan(net_project, cas, config=config)
    # Then it is loaded again, and gives what a load without caches gives
    assert loads.count == 2
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert after == submit_plan(net_project, cas, config=config)
    if change in (fetch_setting, user_config):
        assert after == first  # (nothing sent changed: a miss costs a load only)
    elif change is edit_patch:
        assert after[1] != first[1]
    else:
        assert after[3] != first[3]


def test_a_git_repository_on_this_host_keeps_nothing(
    net_project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (Loading a file:// git URL checks the commit in that repository.)
    tool = net_project / "elements/tool.bst"
    tool.write_text(tool.read_text().replace("forge:tool.git", "file:///nowhere/tool.git"))
    monkeypatch.setattr("pipeline.elements.sources.git._check_file_url_commit", lambda *a: None)
    loads = Loads(monkeypatch)
    submit_plan(net_project, cas)
    submit_plan(net_project, cas)
    assert loads.count == 2


# --- junctions -------------------------------------------------------------------


@pytest.fixture
def junctions(tmp_path: Path) -> Path:
    # The junctions project (a local junction to subproject/, which has its
    # own to deeper/, an include through the junction, a link)
    root = tmp_path / "junctions"
    shutil.copytree(PROJECTS / "junctions", root)
    (root / "subproject/sysroot/usr/bin").mkdir(parents=True)
    (root / "subproject/sysroot/usr/bin/sh").write_text("#!/bin/true\n")
    return root


def test_a_project_with_local_junctions_is_kept(
    junctions: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the junctions project submitted once
    loads = Loads(monkeypatch)
    first = submit_plan(junctions, cas)
    # When it is submitted again, unchanged
    again = submit_plan(junctions, cas)
    # Then it was taken as kept, the same as with the caches off
    assert loads.count == 1
    assert again == first
    assert "sub.bst:deeper.bst:leaf.bst" in first[0]
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert submit_plan(junctions, cas) == first


@pytest.mark.parametrize(
    ("path", "old", "new"),
    [
        ("subproject/elements/lib.bst", "mkdir -p", "mkdir -vp"),
        ("subproject/project.conf", "hello, fancy", "hello, very fancy"),
        ("subproject/include/common.yml", "", "\n# edited\n"),
        ("subproject/deeper/elements/leaf.bst", "", "\n# edited\n"),
        ("subproject/deeper/files/leaf/leaf", "", "more\n"),
    ],
)
def test_a_changed_subproject_file_is_loaded_again(
    junctions: Path,
    cas: LocalCas,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    old: str,
    new: str,
) -> None:
    # Given the junctions project kept
    loads = Loads(monkeypatch)
    first = submit_plan(junctions, cas)
    # When a file of a subproject changes (its project.conf, an element, an
    # include, a local source)
    file = junctions / path
    text = file.read_text()
    file.write_text(text.replace(old, new, 1) if old else text + new)
    after = submit_plan(junctions, cas)
    # Then it is loaded again, as without caches
    assert loads.count == 2
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert after == submit_plan(junctions, cas)
    if "common.yml" not in path and "leaf.bst" not in path:
        assert after != first


SUB_CONF = "name: sub\nmin-version: 2.0\nelement-path: elements\n"
SUB_ELEMENT = "kind: stack\n"


def network_junction(tmp_path: Path) -> tuple[Path, Path]:
    """A project with a junction to a tarball by URL, and the folder a
    first load would have staged it into (beside the local CAS)."""
    url = "https://downloads.example/sub.tar.gz"
    ref = hashlib.sha256(b"sub").hexdigest()
    root = tmp_path / "top"
    for name, text in {
        "project.conf": "name: top\nmin-version: 2.0\nelement-path: elements\n",
        "elements/sub.bst": f"kind: junction\nsources:\n- kind: tar\n  url: {url}\n  ref: {ref}\n",
        "elements/all.bst": "kind: stack\ndepends:\n- sub.bst:thing.bst\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    key = source_cache_key("tar", [url, ref, "*"])
    staged = tmp_path / "junctions" / f"source-{key}"
    (staged / "elements").mkdir(parents=True)
    (staged / "project.conf").write_text(SUB_CONF)
    (staged / "elements/thing.bst").write_text(SUB_ELEMENT)
    return root, staged


def test_a_network_junction_is_kept_while_its_staged_folder_is(
    tmp_path: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project whose junction's tarball was staged by an earlier load
    project, staged = network_junction(tmp_path)
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas)
    assert first[0] == ["sub.bst:thing.bst", "all.bst"]
    # When it is submitted again
    again = submit_plan(project, cas)
    # Then it is taken as kept (the staged subproject's files are its inputs)
    assert loads.count == 1
    assert again == first
    assert str(staged / "elements/thing.bst").encode() in cache_file(cache).read_bytes()
    # When the staged folder is removed and staged again (as a fetch would)
    shutil.rmtree(staged)
    (staged / "elements").mkdir(parents=True)
    (staged / "project.conf").write_text(SUB_CONF)
    (staged / "elements/thing.bst").write_text(SUB_ELEMENT)
    after = submit_plan(project, cas)
    # Then the kept plan is not taken (its files are others), and the load
    # gives what it gave
    assert loads.count == 2
    assert after == first


def test_a_missing_staged_junction_is_a_miss(
    tmp_path: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project with a network junction kept
    project, staged = network_junction(tmp_path)
    submit_plan(project, cas)
    # When the staged folder is gone
    shutil.rmtree(staged)
    # Then the next submit loads the project (which fetches the junction:
    # here, it is staged in place by the stub)
    fetched: list[str] = []

    def stage_again(self: Any, file: Any, source: Any) -> Path:
        fetched.append(file.name)
        (staged / "elements").mkdir(parents=True)
        (staged / "project.conf").write_text(SUB_CONF)
        (staged / "elements/thing.bst").write_text(SUB_ELEMENT)
        return staged

    monkeypatch.setattr(Project, "_junction_directory", stage_again)
    submit_plan(project, cas)
    assert fetched == ["sub.bst"]


def test_a_file_tarball_junction_keeps_nothing(
    tmp_path: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (The load reads the tarball to check its sha256: not a recorded file.)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, text in {
            "sub/project.conf": SUB_CONF,
            "sub/elements/thing.bst": SUB_ELEMENT,
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    tarball = tmp_path / "sub.tar.gz"
    tarball.write_bytes(data.getvalue())
    project, _ = network_junction(tmp_path)
    ref = hashlib.sha256(data.getvalue()).hexdigest()
    (project / "elements/sub.bst").write_text(
        f"kind: junction\nsources:\n- kind: tar\n  url: file://{tarball}\n  ref: {ref}\n"
    )
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas)
    assert submit_plan(project, cas) == first
    assert loads.count == 2


@pytest.mark.parametrize(
    "name", ["examples/hello", "examples/toolchain", "tests/projects/junctions"]
)
def test_kept_plans_of_the_shipped_projects_are_their_loads(
    tmp_path: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Given a copy of a shipped project (with the folders its scripts make)
    project = tmp_path / "copy"
    shutil.copytree(PROJECTS.parents[1] / name, project)
    for folder in ("sysroot", "subproject/sysroot", "amhello"):
        if (project / folder).parent.is_dir():
            (project / folder / "usr/bin").mkdir(parents=True, exist_ok=True)
            (project / folder / "usr/bin/sh").write_text("#!/bin/true\n")
    targets = sorted(
        p.name
        for p in (project / "elements").glob("*.bst")
        if "kind: junction" not in p.read_text()
    )
    loads = Loads(monkeypatch)
    # When it is submitted twice (loaded and kept, then taken as kept)
    first = submit_plan(project, cas, targets=targets)
    again = submit_plan(project, cas, targets=targets)
    # Then the kept plan is what a load without caches gives
    assert loads.count == 1
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert first == again == submit_plan(project, cas, targets=targets)


def test_a_kept_network_spec_is_as_loaded_whatever_submit_made_of_it(
    net_project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a plan kept by a submit that pointed its network sources at the
    # source cache (a URI, the digest dropped: see submit_plan)
    submit_plan(net_project, cas)
    config = load_config(net_project, environ={})
    ctx: Any = SimpleNamespace(local_cas=cas)

    def specs() -> str:
        elements, _ = api._submit_plan(
            net_project, ["all.bst"], cas=cas, options=None, config=config
        )
        return json.dumps(
            [
                e.build_spec(api.stage_local_sources(ctx, e, net_project.parent / "w").digests)
                for e in elements
            ]
        )

    # When the kept plan's specs are made, before submit changes them
    kept = specs()
    # Then they are the bytes a load gives
    monkeypatch.setenv("REMEX_PARSED_CACHE", "off")
    assert kept == specs()


def test_another_local_cas_is_another_input(
    tmp_path: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project with a network junction kept with one local CAS
    project, staged = network_junction(tmp_path)
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas)
    # When it is submitted with another (whose junctions folder has the
    # subproject too)
    other = LocalCas(tmp_path / "other/cas")
    shutil.copytree(staged, tmp_path / "other/junctions" / staged.name)
    after = submit_plan(project, other)
    # Then it is loaded (its subproject read from there), the same plan
    assert loads.count == 2
    assert after == first


def test_a_plan_whose_files_changed_is_dropped_before_it_is_decoded(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a kept project whose file lists the files read on a line of its own
    submit_plan(project, cas)
    raw = cache_file(cache).read_bytes()
    _, _, files, _ = raw.split(b"\n", 3)
    assert set(json.loads(files)) >= {str(project / "elements/b.bst")}
    # When an element file changes
    edit_element(project)
    calls: list[str] = []
    real_plan, real_checked = resolved._kept_plan, nodes._checked_body

    def kept_plan(*args: Any) -> Any:
        calls.append("decoded")
        return real_plan(*args)

    def checked_body(raw: bytes, header: bytes) -> bytes | None:
        calls.append("hashed")
        return real_checked(raw, header)

    monkeypatch.setattr(resolved, "_kept_plan", kept_plan)
    monkeypatch.setattr(nodes, "_checked_body", checked_body)
    cache_obj = resolved.ResolvedCache.open(
        project, ["all.bst"], options=None, option_values=None, default_mirror=None, max_jobs=8,
        fetch=api._fetch_inputs(load_config(project, environ={})),
        junctions_dir=str(cas.root.parent / "junctions"),
    )  # fmt: skip
    assert cache_obj is not None and cache_obj.file == str(cache_file(cache))
    # Then the plan is a miss, found without hashing nor decoding the rest
    assert cache_obj.load(cas) is None
    assert calls == []
    # (while an unchanged one is hashed and decoded, then taken)
    (project / "elements/b.bst").write_text(B)
    submit_plan(project, cas)
    assert cache_obj.load(cas) is not None
    assert calls[-2:] == ["hashed", "decoded"]


def test_damage_past_the_files_line_is_still_a_miss(
    project: Path, cas: LocalCas, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a kept project whose elements (after the files line) are damaged,
    # the files line intact
    loads = Loads(monkeypatch)
    first = submit_plan(project, cas)
    file = cache_file(cache)
    raw = file.read_bytes()
    at = raw.index(b'"b.bst"', raw.index(b"\n{"))
    file.write_bytes(raw[:at] + raw[at:].replace(b"b.bst", b"c.bst", 1))
    # When it is submitted again
    again = submit_plan(project, cas)
    # Then the checksum refuses it: loaded again, the same as before
    assert loads.count == 2
    assert again == first
