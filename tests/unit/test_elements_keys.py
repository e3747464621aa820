"""Cache keys: every input that can change an artifact changes the key; layout does not."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.elements import KEY_FORMAT_VERSION, canonical_json, key_description, load_project
from pipeline.elements.keys import key_text

CONF = "name: keys\nelement-path: elements\n"

BASE = "kind: import\nsources:\n- kind: local\n  path: files/base\n"
LIB = "kind: manual\nbuild-depends: [base.bst]\nconfig:\n  install-commands: [touch lib]\n"
APP = """\
kind: manual
depends:
- base.bst
- lib.bst
sources:
- kind: local
  path: files/app
environment:
  CFLAGS: -O2
  NOCACHE_ME: x
environment-nocache:
- NOCACHE_ME
variables:
  flavour: plain
config:
  build-commands:
  - make FLAVOUR=%{flavour}
  install-commands:
  - make install
sandbox:
  build-os: linux
  build-arch: x86-64
"""


def keys(
    tmp_path: Path,
    *,
    conf: str = CONF,
    app: str = APP,
    lib: str = LIB,
    base: str = BASE,
    files: dict[str, str] | None = None,
) -> dict[str, str]:
    """Load a fresh copy of the project; return every element's cache key."""
    root = tmp_path / f"p{len(list(tmp_path.glob('p*')))}"
    tree = {
        "project.conf": conf,
        "elements/base.bst": base,
        "elements/lib.bst": lib,
        "elements/app.bst": app,
        "files/base/bin/sh": "#!busybox\n",
        "files/app/main.c": "int main;\n",
        **(files or {}),
    }
    for relative, text in tree.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    project = load_project(root, cas=LocalCas(tmp_path / "cas"))
    return {e.name: e.cache_key for e in project.load_targets(["app.bst"])}


@pytest.fixture
def reference(tmp_path: Path) -> dict[str, str]:
    return keys(tmp_path)


def test_keys_are_stable_and_hex(tmp_path: Path, reference: dict[str, str]) -> None:
    # Given the same project loaded twice, from two folders
    again = keys(tmp_path)

    # Then every key is the same 64-hex SHA-256
    assert again == reference
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in reference.values())
    assert len(set(reference.values())) == 3


def test_reformatting_and_reordering_yaml_does_not_change_keys(
    tmp_path: Path, reference: dict[str, str]
) -> None:
    # Given app.bst rewritten: flow style, comments, quoting, keys reordered
    rewritten = textwrap.dedent(
        """\
        # The app, written differently.
        sandbox: {build-arch: "x86-64", build-os: 'linux'}
        config:
          install-commands: ["make install"]
          build-commands:
            - "make FLAVOUR=%{flavour}"
        variables: {flavour: plain}
        environment-nocache: [NOCACHE_ME]
        environment:
          NOCACHE_ME: x
          CFLAGS: "-O2"
        sources: [{path: files/app, kind: local}]
        depends: [base.bst, lib.bst]
        kind: manual
        description: descriptions do not matter
        """
    )

    # Then no key changes
    assert keys(tmp_path, app=rewritten) == reference


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("make install", "make install-strip"),  # a command
        ("FLAVOUR=%{flavour}", "FLAVOUR=%{flavour} V=1"),  # a command through a variable
        ("flavour: plain", "flavour: spicy"),  # a variable used by a command
        ("CFLAGS: -O2", "CFLAGS: -O3"),  # an environment value
        ("  CFLAGS: -O2\n", "  CFLAGS: -O2\n  LDFLAGS: -s\n"),  # a new environment variable
        ("build-arch: x86-64", "build-arch: aarch64"),  # the sandbox arch
        ("build-os: linux", "build-os: freebsd"),  # the sandbox os
        ("  path: files/app\n", "  path: files/app\n  directory: sub\n"),  # source directory
        ("build-commands:", "configure-commands: [./configure]\n  build-commands:"),
    ],
)
def test_each_input_of_the_element_changes_its_key(
    tmp_path: Path, reference: dict[str, str], old: str, new: str
) -> None:
    assert old in APP
    changed = keys(tmp_path, app=APP.replace(old, new))
    assert changed["app.bst"] != reference["app.bst"]
    # ... and only its own key: nothing depends on app.bst
    assert changed["lib.bst"] == reference["lib.bst"]


def test_nocache_environment_does_not_change_the_key(
    tmp_path: Path, reference: dict[str, str]
) -> None:
    changed = keys(tmp_path, app=APP.replace("NOCACHE_ME: x", "NOCACHE_ME: y"))
    assert changed == reference


def test_public_data_changes_the_key_and_its_dependents(
    tmp_path: Path, reference: dict[str, str]
) -> None:
    # Given lib.bst gains an integration command (BuildStream keys public data too)
    lib = "kind: manual\ndepends: [base.bst]\npublic: {bst: {integration-commands: [ldconfig]}}\n"
    changed = keys(tmp_path, lib=lib)
    plain = keys(tmp_path, lib="kind: manual\ndepends: [base.bst]\n")

    # Then its key changes, and so does that of app.bst, which runs the command
    assert changed["lib.bst"] != plain["lib.bst"]
    assert changed["app.bst"] != plain["app.bst"]


def test_the_kind_changes_the_key(tmp_path: Path) -> None:
    # Given two elements identical but for their kind
    one = keys(tmp_path, lib="kind: manual\ndepends: [base.bst]\n")
    two = keys(tmp_path, lib="kind: stack\ndepends: [base.bst]\n")
    assert one["lib.bst"] != two["lib.bst"]


def test_source_content_changes_the_key(tmp_path: Path, reference: dict[str, str]) -> None:
    changed = keys(tmp_path, files={"files/app/main.c": "int main(void);\n"})
    assert changed["app.bst"] != reference["app.bst"]
    assert changed["lib.bst"] == reference["lib.bst"]


def test_a_dependency_key_changes_its_dependents(tmp_path: Path, reference: dict[str, str]) -> None:
    # Given a change to base.bst's content
    changed = keys(tmp_path, files={"files/base/bin/sh": "#!other\n"})

    # Then base.bst and everything built with it change
    assert all(changed[name] != reference[name] for name in reference)


def test_a_runtime_dependency_of_a_build_dependency_changes_the_key(tmp_path: Path) -> None:
    # Given lib.bst needing extra.bst at run time; app.bst builds with lib.bst
    extra = {"elements/extra.bst": "kind: manual\nconfig:\n  install-commands: [echo 1]\n"}
    lib = "kind: manual\nbuild-depends: [base.bst]\nruntime-depends: [extra.bst]\n"
    before = keys(tmp_path, lib=lib, files=extra)

    # When extra.bst changes (lib.bst's own key does not: it is runtime only)
    extra2 = {"elements/extra.bst": "kind: manual\nconfig:\n  install-commands: [echo 2]\n"}
    after = keys(tmp_path, lib=lib, files=extra2)

    # Then app.bst's key changes, since extra.bst is staged to build it
    assert after["lib.bst"] == before["lib.bst"]
    assert after["app.bst"] != before["app.bst"]


def test_project_settings_enter_through_what_they_change(
    tmp_path: Path, reference: dict[str, str]
) -> None:
    # Project variables and environment change the elements that use them
    env = keys(tmp_path, conf=CONF + "environment:\n  LANG: C.UTF-8\n")
    assert env["app.bst"] != reference["app.bst"]
    assert env["base.bst"] == reference["base.bst"]  # an import runs no commands
    prefix = keys(tmp_path, conf=CONF + "variables:\n  install-root: /install\n")
    assert prefix["app.bst"] != reference["app.bst"]


def test_import_config_changes_the_key(tmp_path: Path, reference: dict[str, str]) -> None:
    changed = keys(tmp_path, base=BASE + "config:\n  target: /sysroot\n")
    assert changed["base.bst"] != reference["base.bst"]


def test_description_is_canonical_json(tmp_path: Path) -> None:
    # Given a loaded element
    root = tmp_path / "p"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text(CONF)
    (root / "elements/a.bst").write_text("kind: manual\nconfig:\n  build-commands: [make]\n")
    element = load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(["a.bst"])[0]

    # Then its key is the SHA-256 of its description's canonical JSON
    description = key_description(element)
    assert description["remex-key-format"] == KEY_FORMAT_VERSION
    assert description["kind"] == "manual"
    text = canonical_json(description)
    assert text == json.dumps(
        description, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert element.cache_key == hashlib.sha256(text.encode()).hexdigest()


def test_key_text_is_the_canonical_json_of_the_description(tmp_path: Path) -> None:
    # Given elements sharing their kind's public data (b, c), one with public
    # data of its own and a non-ASCII name (d), dependencies shared by several
    # dependents, and a fatal warning
    root = tmp_path / "p"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text(CONF + "fatal-warnings: [overlaps]\n")
    (root / "elements/a.bst").write_text("kind: manual\nconfig:\n  build-commands: [make]\n")
    (root / "elements/b.bst").write_text("kind: manual\nbuild-depends: [a.bst]\n")
    (root / "elements/c.bst").write_text("kind: manual\nbuild-depends: [a.bst, b.bst]\n")
    (root / "elements/dé.bst").write_text(
        "kind: manual\nbuild-depends: [a.bst, c.bst]\n"
        "public:\n  bst:\n    integration-commands: [ldconfig é]\n  other: {z: 1, a: [x]}\n"
    )
    (root / "elements/e.bst").write_text("kind: stack\ndepends: [dé.bst, c.bst]\n")
    project = load_project(root, cas=LocalCas(tmp_path / "cas"))
    elements = project.load_targets(["e.bst"])
    by_name = {e.name: e for e in elements}

    # Then each key is the SHA-256 of the description's canonical JSON, made whole
    assert by_name["b.bst"].public is by_name["c.bst"].public
    for element in elements:
        text = canonical_json(key_description(element))
        assert key_text(element) == text
        assert element.cache_key == hashlib.sha256(text.encode()).hexdigest()
    assert '"public":' in key_text(by_name["dé.bst"])
    assert '"fatal-warnings":["overlaps"]' in key_text(by_name["a.bst"])
