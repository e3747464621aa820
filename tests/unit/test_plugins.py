"""plugins.py: project.conf ``plugins:`` read as data, never importing a plugin.

Uses the real buildstream-plugins 2.8.0 installed in the test environment, a
local plugin folder, and fake pip distributions (a .dist-info in a temporary
folder put on sys.path).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import MappingNode, Node, ScalarNode, load_yaml
from pipeline.elements.plugins import (
    CORE_KIND_NAMES,
    core_kind_defaults,
    declare_plugins,
    load_plugins,
    source_plugin_kinds,
)

BUILD_KINDS = ("autotools", "cmake", "make", "meson", "pip", "setuptools")


def _plugins_node(tmp_path: Path, text: str) -> Node | None:
    (tmp_path / "project.conf").write_text(text)
    return load_yaml(tmp_path / "project.conf", "project.conf").get("plugins")


def _scalar(node: MappingNode, *path: str) -> str | None:
    current: MappingNode = node
    for key in path[:-1]:
        child = current.get_mapping(key)
        assert child is not None
        current = child
    leaf = current.get(path[-1])
    assert isinstance(leaf, ScalarNode)
    return leaf.value


def _fake_dist(site: Path, name: str, kinds: dict[str, str], *, version: str = "1.0") -> None:
    """A pip distribution ``name`` with element plugins {kind: python source}."""
    package = name.replace("-", "_")
    info = site / f"{package}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    records = []
    entry_points = ["[buildstream.plugins.elements]"]
    (site / package / "elements").mkdir(parents=True)
    (site / package / "__init__.py").write_text("raise ImportError('never imported')\n")
    for kind, source in kinds.items():
        (site / package / "elements" / f"{kind}.py").write_text(source)
        (site / package / "elements" / f"{kind}.yaml").write_text(
            f"variables:\n  {kind}-flag: on\n"
        )
        records += [f"{package}/elements/{kind}.py,,", f"{package}/elements/{kind}.yaml,,"]
        entry_points.append(f"{kind} = {package}.elements.{kind}")
    (info / "RECORD").write_text("\n".join(records) + "\n")
    (info / "entry_points.txt").write_text("\n".join(entry_points) + "\n")


def test_buildstream_plugins_build_kinds_load_as_data(tmp_path: Path) -> None:
    # Given a project declaring every element kind of buildstream-plugins
    node = _plugins_node(
        tmp_path,
        "plugins:\n- origin: pip\n  package-name: buildstream-plugins>=2.0\n"
        f"  elements: [{', '.join(BUILD_KINDS)}]\n  sources: [git, {{kind: patch}}]\n",
    )
    # When they are loaded
    kinds = load_plugins(node, tmp_path)
    # Then each is a BuildElement with its YAML defaults, marked with that file
    assert sorted(kinds) == sorted(BUILD_KINDS)
    for kind in BUILD_KINDS:
        assert kinds[kind].build_element
        assert kinds[kind].origin == "pip package buildstream-plugins 2.8.0"
        assert kinds[kind].defaults.mark.file == (
            f"buildstream-plugins:buildstream_plugins/elements/{kind}.yaml"
        )
    assert _scalar(kinds["autotools"].defaults, "variables", "conf-cmd") == "%{conf-root}/configure"
    assert _scalar(kinds["cmake"].defaults, "variables", "generator") == "Ninja"
    assert _scalar(kinds["meson"].defaults, "variables", "meson") is not None
    # And the plugin modules were never imported
    assert not any(name.startswith("buildstream_plugins") for name in sys.modules)
    # And the source kinds are recorded
    assert source_plugin_kinds(node, tmp_path) == {
        "git": "pip buildstream-plugins>=2.0",
        "patch": "pip buildstream-plugins>=2.0",
    }


def test_source_kind_is_not_an_element_kind(tmp_path: Path) -> None:
    # Given a source kind of the package named as an element kind
    node = _plugins_node(
        tmp_path,
        "plugins:\n- origin: pip\n  package-name: buildstream-plugins\n"
        "  elements:\n  - make\n  - git\n",
    )
    # When loaded, Then the error names the package and kind at its line
    with pytest.raises(LoadError, match=r"has no element kind 'git'") as info:
        load_plugins(node, tmp_path)
    assert (info.value.file, info.value.line, info.value.field) == (
        "project.conf",
        6,
        "plugins[0].elements[1]",
    )


def test_missing_package_says_what_to_install(tmp_path: Path) -> None:
    # Given a package that is not installed
    node = _plugins_node(
        tmp_path,
        "plugins:\n- origin: pip\n  package-name: remex-no-such-plugins>=1.0\n"
        "  elements:\n  - frobnicate\n",
    )
    # When declared, Then nothing fails yet (bst resolves a kind when it is used)
    declared = declare_plugins(node, tmp_path)
    # When resolved, Then the error names kind, package and the pip command
    with pytest.raises(LoadError) as info:
        declared["frobnicate"].resolve()
    assert info.value.reason == (
        "element kind 'frobnicate' needs the pip package 'remex-no-such-plugins', which is "
        "not installed; run: pip install 'remex-no-such-plugins>=1.0'"
    )
    assert (info.value.file, info.value.line) == ("project.conf", 5)


def test_version_conflict(tmp_path: Path) -> None:
    node = _plugins_node(
        tmp_path,
        "plugins:\n- origin: pip\n  package-name: buildstream-plugins<2\n  elements: [make]\n",
    )
    with pytest.raises(LoadError, match=r"2\.8\.0 is installed but 'buildstream-plugins<2'"):
        load_plugins(node, tmp_path)


def test_fake_distribution_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an installed distribution with a BuildElement kind reached through a
    # local base class and a renamed import, and a kind that is a plain Element
    site = tmp_path / "site"
    _fake_dist(
        site,
        "acme-plugins",
        {
            "acmebuild": (
                "import buildstream as bst\n"
                "class Base(bst.BuildElement):\n    pass\n"
                "class Acme(Base):\n    pass\n"
                "def setup():\n    return Acme\n"
            ),
            "acmeimport": (
                "from buildstream import Element, BuildElement\n"
                "class Helper(BuildElement):\n    pass\n"
                "class AcmeImport(Element):\n    pass\n"
                "def setup():\n    return AcmeImport\n"
            ),
        },
    )
    monkeypatch.syspath_prepend(str(site))
    project = tmp_path / "project"
    project.mkdir()
    node = _plugins_node(
        project,
        "plugins:\n- origin: pip\n  package-name: acme-plugins\n  elements:\n"
        "  - acmebuild\n  - kind: acmeimport\n    allow-deprecated: true\n",
    )
    declared = declare_plugins(node, project)
    # When the BuildElement kind is resolved, Then its defaults are read
    acme = declared["acmebuild"].resolve()
    assert acme.build_element
    assert _scalar(acme.defaults, "variables", "acmebuild-flag") == "on"
    # When the other is resolved, Then it is refused, naming kind and package
    with pytest.raises(LoadError) as info:
        declared["acmeimport"].resolve()
    assert "element kind 'acmeimport' from pip package acme-plugins 1.0 is not a BuildElement" in (
        info.value.reason
    )
    assert "only BuildElement plugin kinds" in info.value.reason
    assert (info.value.line, info.value.field) == (6, "plugins[0].elements[1].kind")


def test_local_plugins(tmp_path: Path) -> None:
    # Given a local plugin folder with a BuildElement kind (with and without YAML)
    folder = tmp_path / "plugins" / "elements"
    folder.mkdir(parents=True)
    (folder / "mine.py").write_text(
        "from buildstream.buildelement import BuildElement as BE\n"
        "class Mine(BE):\n    pass\n\ndef setup():\n    return Mine\n"
    )
    (folder / "mine.yaml").write_text("config:\n  build-commands:\n  - make mine\n")
    (folder / "bare.py").write_text(
        "import buildstream\nclass Bare(buildstream.BuildElement):\n    pass\n"
        "def setup():\n    return Bare\n"
    )
    node = _plugins_node(
        tmp_path,
        "plugins:\n- origin: local\n  path: plugins/elements\n  elements: [mine, bare, gone]\n",
    )
    declared = declare_plugins(node, tmp_path)
    # When resolved, Then the YAML is read with marks naming it
    mine = declared["mine"].resolve()
    assert mine.origin == "local plugins folder plugins/elements"
    assert mine.defaults.mark.file == "plugins/elements/mine.yaml"
    assert "config" in mine.defaults
    # And a kind without YAML has empty defaults
    assert declared["bare"].resolve().defaults.entries == {}
    # And a kind without its file is an error at its entry
    with pytest.raises(LoadError, match=r"no plugin file plugins/elements/gone\.py"):
        declared["gone"].resolve()


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("plugins: {origin: pip}\n", "expected a list of plugin origins", 1),
        ("plugins:\n- pip\n", "expected a mapping with an 'origin'", 2),
        ("plugins:\n- elements: [a]\n", "missing required key 'origin'", 2),
        ("plugins:\n- origin: conda\n", "unknown plugin origin 'conda'", 2),
        (
            "plugins:\n- origin: junction\n  junction: sub.bst\n  elements: [a]\n",
            r"plugins from a junction \(origin: junction\) are not supported",
            2,
        ),
        ("plugins:\n- origin: pip\n  elements: [a]\n", "missing required key 'package-name'", 2),
        ("plugins:\n- origin: pip\n  package-name: '>=1'\n", "malformed package-name", 3),
        ("plugins:\n- origin: pip\n  package-name: a b\n", "malformed package-name", 3),
        ("plugins:\n- origin: pip\n  package-name: x\n  path: y\n", "unknown key", 4),
        ("plugins:\n- origin: local\n  path: ../out\n", "outside the project", 3),
        ("plugins:\n- origin: local\n  path: nowhere\n", "not a folder in the project", 3),
        (
            "plugins:\n- origin: pip\n  package-name: x\n  elements: [a]\n"
            "- origin: pip\n  package-name: y\n  elements: [a]\n",
            "more than one element plugin registered as kind 'a'",
            7,
        ),
        ("plugins:\n- origin: pip\n  package-name: x\n  elements: [[a]]\n", "a kind name", 4),
    ],
)
def test_bad_declarations(tmp_path: Path, text: str, message: str, line: int) -> None:
    # Given a bad plugins: entry, When declared, Then a LoadError at its line
    node = _plugins_node(tmp_path, text)
    with pytest.raises(LoadError, match=message) as info:
        declare_plugins(node, tmp_path)
    assert (info.value.file, info.value.line) == ("project.conf", line)


def test_no_plugins(tmp_path: Path) -> None:
    assert load_plugins(None, tmp_path) == {}
    assert load_plugins(_plugins_node(tmp_path, "plugins:\n"), tmp_path) == {}


def test_core_kind_defaults() -> None:
    # Given BuildStream's core kinds, When their defaults are read, Then they hold bst's values
    assert set(CORE_KIND_NAMES) == {
        "manual", "import", "stack", "compose", "filter", "script", "junction", "link"
    }  # fmt: skip
    manual = core_kind_defaults("manual").get_mapping("config")
    assert manual is not None
    assert [n.value for n in manual.get_str_list("strip-commands") or []] == ["%{strip-binaries}"]
    assert _scalar(core_kind_defaults("compose"), "config", "include-orphans") == "True"
    assert _scalar(core_kind_defaults("filter"), "config", "include-orphans") == "False"
    assert _scalar(core_kind_defaults("filter"), "config", "pass-integration") == "False"
    assert _scalar(core_kind_defaults("import"), "config", "target") == "/"
    assert _scalar(core_kind_defaults("script"), "variables", "cwd") == "/"
    assert _scalar(core_kind_defaults("script"), "config", "root-read-only") == "False"
    for kind in ("stack", "junction", "link"):
        assert core_kind_defaults(kind).entries == {}
    with pytest.raises(KeyError):
        core_kind_defaults("autotools")
