"""project.conf ``sandbox``, ``fatal-warnings`` and ``min-version``; element
``sandbox: build-uid/build-gid`` and ``public: bst: overlap-whitelist``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.elements import Element, LoadError, load_project


def load(tmp_path: Path, conf: str, elements: dict[str, str], target: str) -> list[Element]:
    root = tmp_path / "project"
    for name, text in {"project.conf": conf, **elements}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets([target])


def one(tmp_path: Path, conf: str, element: str) -> Element:
    return load(tmp_path, conf, {"app.bst": element}, "app.bst")[-1]


CONF = "name: p\nmin-version: 2.0\n"


def test_build_uid_and_gid_become_platform_properties_and_enter_the_key(tmp_path: Path) -> None:
    # Given the same manual element without, then with, a build uid and gid
    plain = one(tmp_path / "1", CONF, "kind: manual\n")
    with_ids = one(
        tmp_path / "2",
        CONF,
        "kind: manual\nvariables:\n  uid: '1234'\n"
        "sandbox:\n  build-uid: '%{uid}'\n  build-gid: 99\n",
    )

    # Then the action asks buildbox-run for them (BuildStream's property names)
    assert "unixUID" not in plain.platform
    assert with_ids.platform["unixUID"] == "1234" and with_ids.platform["unixGID"] == "99"
    assert with_ids.build_spec([])["command"]["platform"]["unixUID"] == "1234"  # type: ignore[index]
    # and the cache key changes
    assert plain.cache_key != with_ids.cache_key


def test_project_sandbox_is_under_the_kind_overrides_and_the_element(tmp_path: Path) -> None:
    conf = CONF + textwrap.dedent("""\
        sandbox:
          build-uid: 10
          build-gid: 20
        elements:
          manual:
            sandbox:
              build-gid: 30
        """)
    elements = {
        "a.bst": "kind: manual\n",
        "b.bst": "kind: manual\nsandbox:\n  build-uid: 40\n",
        "c.bst": "kind: stack\ndepends: [a.bst, b.bst]\n",
    }
    plan = {e.name: e for e in load(tmp_path, conf, elements, "c.bst")}
    assert (plan["a.bst"].build_uid, plan["a.bst"].build_gid) == (10, 30)
    assert (plan["b.bst"].build_uid, plan["b.bst"].build_gid) == (40, 30)


def test_a_bad_project_sandbox_key_names_project_conf(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as info:
        one(tmp_path, CONF + "sandbox:\n  build-user: 1\n", "kind: manual\n")
    assert str(info.value).startswith("project.conf:4: sandbox.build-user:")


def test_fatal_warnings_reach_the_spec_and_the_key(tmp_path: Path) -> None:
    element = "kind: manual\n"
    plain = one(tmp_path / "1", CONF, element)
    fatal = one(tmp_path / "2", CONF + "fatal-warnings:\n- overlaps\n- git:unused\n", element)
    assert fatal.build_spec([])["fatal_warnings"] == ["git:unused", "overlaps"]
    assert plain.build_spec([])["fatal_warnings"] == []
    assert plain.cache_key != fatal.cache_key


def test_element_level_fatal_warnings_are_refused_as_in_buildstream(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"app.bst:2: fatal-warnings"):
        one(tmp_path, CONF, "kind: manual\nfatal-warnings: [overlaps]\n")


def test_each_dependency_carries_its_own_expanded_overlap_whitelist(tmp_path: Path) -> None:
    elements = {
        "a.bst": "kind: manual\n",
        "b.bst": textwrap.dedent("""\
            kind: manual
            public:
              bst:
                overlap-whitelist:
                - '%{bindir}/tool'
                - /etc/**
            """),
        "app.bst": "kind: manual\nbuild-depends: [a.bst, b.bst]\n",
    }
    app = load(tmp_path, CONF, elements, "app.bst")[-1]
    deps = {d["element"]: d["overlap_whitelist"] for d in app.build_spec([])["dependencies"]}  # type: ignore[typeddict-item]
    assert deps == {"a.bst": [], "b.bst": ["/usr/bin/tool", "/etc/**"]}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2.0", None),
        ("2.8", None),
        ("2.8.1", None),
        ("2.9", "requires at least BuildStream 2.9 (min-version 2.9); remex implements"),
        ("3.0", "requires BuildStream 3 (min-version 3.0)"),
        ("1.4", "requires BuildStream 1 (min-version 1.4)"),
        ("2", "malformed min-version '2': expected MAJOR.MINOR"),
        ("two.zero", "malformed min-version 'two.zero'"),
    ],
)
def test_min_version_is_checked_as_buildstream_checks_it(
    tmp_path: Path, value: str, message: str | None
) -> None:
    conf = f"name: p\nmin-version: '{value}'\n"
    if message is None:
        one(tmp_path, conf, "kind: stack\n")
        return
    with pytest.raises(LoadError) as info:
        one(tmp_path, conf, "kind: stack\n")
    assert str(info.value).startswith("project.conf:2: min-version: ")
    assert message in str(info.value)
