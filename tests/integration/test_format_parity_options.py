"""BuildStream as the peer for options, conditionals, includes and list directives.

The real ``bst show`` (BuildStream 2.8.1, this venv's) and remex's loader read
the projects under tests/format_projects/ with the same ``-o`` values; the
variables of each element (and a manual element's commands, composed with
list directives) must be the same. Where ``bst`` refuses a project or an
element, remex must refuse it too.

``bst`` runs as a separate process (its generated REAPI modules would collide
with remex's in one process); ``show`` needs no sandbox.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cas import LocalCas
from pipeline.elements import Element, LoadError, load_project
from pipeline.elements.defaults import DEFAULT_MAX_JOBS

BST = Path(sys.executable).with_name("bst")
PROJECTS = Path(__file__).resolve().parent.parent / "format_projects"

# remex's %{max-jobs} does not depend on the host; give bst the same.
BST_USER_CONFIG = f"build:\n  max-jobs: {DEFAULT_MAX_JOBS}\n"

OPTION_CASES = [
    {},
    {"debug": "true", "flavour": "fancy", "features": "qt,x11"},
    {"flavour": "extra", "machine": "aarch64", "mask": "a.bst,sub/b.bst", "features": "wayland"},
    {"debug": "True", "machine": "i686", "system": "FreeBSD", "features": "gtk, wayland"},
]


def run_bst(
    tmp_path: Path, project: Path, options: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """``bst`` with its own home, cache and config."""
    home = tmp_path / "bst-home"
    for name in ("home", "cache", "config", "tmp"):
        (home / name).mkdir(parents=True, exist_ok=True)
    config = home / "buildstream.conf"
    config.write_text(BST_USER_CONFIG)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BST_", "XDG_")) and key != "HOME"
    }
    env.update(
        HOME=str(home / "home"),
        XDG_CACHE_HOME=str(home / "cache"),
        XDG_CONFIG_HOME=str(home / "config"),
        TMPDIR=str(home / "tmp"),
    )
    option_args = [arg for name, value in options.items() for arg in ("-o", name, value)]
    command = [str(BST), "--no-interactive", "--no-colors", "--config", str(config),
               "--directory", str(project), *option_args, *args]  # fmt: skip
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def bst_show(
    tmp_path: Path, project: Path, options: dict[str, str], fmt: str, *targets: str
) -> dict[str, dict[str, object]]:
    """``bst show --format '=== %{name}\\n<fmt>'`` parsed: element name -> YAML (all strings)."""
    result = run_bst(
        tmp_path, project, options, "show", "--deps", "none", "--format",
        f"=== %{{name}}\n{fmt}", *targets,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown: dict[str, dict[str, object]] = {}
    for block in result.stdout.split("=== ")[1:]:
        name, _, text = block.partition("\n")
        # BaseLoader: every scalar a string, as bst's variables are.
        shown[name.strip()] = yaml.load(text, Loader=yaml.BaseLoader) or {}
    return shown


def remex_load(
    tmp_path: Path, project: Path, options: dict[str, str], targets: list[str]
) -> dict[str, Element]:
    """remex's loader on the same project and options: element name -> Element."""
    loaded = load_project(project, cas=LocalCas(tmp_path / "cas"), options=options)
    plan = loaded.load_targets(targets)
    return {element.name: element for element in plan}


@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: ",".join(o) or "defaults")
def test_variables_match_buildstream(tmp_path: Path, options: dict[str, str]) -> None:
    # Given the options project (every option type, exported; conditionals in
    # project.conf, included files and elements; includes at two levels, one
    # inside an element's variables)
    project = PROJECTS / "options"
    targets = ["a.bst", "sub/b.bst"]

    # When bst and remex load it with the same option values
    shown = bst_show(tmp_path, project, options, "%{vars}", *targets)
    shown_env = bst_show(tmp_path, project, options, "%{env}", *targets)
    elements = remex_load(tmp_path, project, options, targets)

    # Then every element has the same variables and environment
    for name in targets:
        assert elements[name].variables.as_dict() == shown[name], name
        assert elements[name].environment == shown_env[name], name


@pytest.mark.parametrize("options", OPTION_CASES[:2], ids=["defaults", "debug"])
def test_list_directives_match_buildstream(tmp_path: Path, options: dict[str, str]) -> None:
    # Given a manual element whose commands are composed from an include with
    # (<), (>) and (=), one of them inside a conditional
    project = PROJECTS / "options"
    shown = bst_show(tmp_path, project, options, "%{config}", "a.bst")["a.bst"]
    element = remex_load(tmp_path, project, options, ["a.bst"])["a.bst"]

    # Then the commands are the same lists, in the same order
    for step in ("configure-commands", "build-commands", "install-commands"):
        assert element.plugin.commands[step] == shown[step], step
    assert shown["build-commands"][0] == "echo element-before"  # type: ignore[index]


@pytest.mark.parametrize(
    ("project", "target", "options", "words"),
    [
        ("options", "a.bst", {"debug": "maybe"}, "bool option 'debug'"),
        ("options", "a.bst", {"flavour": "odd"}, "enum option 'flavour'"),
        ("options", "a.bst", {"features": "x11,motif"}, "flags option 'features'"),
        ("options", "a.bst", {"machine": "x86-64"}, "arch option 'machine'"),  # no aliases here
        ("options", "a.bst", {"system": "linux"}, "os option 'system'"),
        ("options", "a.bst", {"mask": "nosuch.bst"}, "element-mask option 'mask'"),
        ("options", "a.bst", {"nosuch": "1"}, "unknown option 'nosuch'"),
        ("include-cycle", "a.bst", {}, "include cycle: project.conf -> one.yml -> two.yml"),
        ("refusals", "assertion.bst", {}, "assertion failed: this element needs debug"),
        ("refusals", "undefined.bst", {}, "'nosuch' is undefined"),
        ("refusals", "missing-include.bst", {}, "included file 'nosuch.yml' not found"),
        ("refusals", "leftover.bst", {}, "variables.v"),
        ("refusals", "mixed-directives.bst", {}, "cannot have other keys"),
    ],
)
def test_remex_refuses_what_buildstream_refuses(
    tmp_path: Path, project: str, target: str, options: dict[str, str], words: str
) -> None:
    # Given a project or element BuildStream refuses
    result = run_bst(tmp_path, PROJECTS / project, options, "show", target)
    assert result.returncode != 0, result.stdout

    # Then remex refuses it too, saying why
    with pytest.raises(LoadError) as info:
        remex_load(tmp_path, PROJECTS / project, options, [target])
    assert words in str(info.value)


def test_the_refused_assertion_passes_with_the_option(tmp_path: Path) -> None:
    # The assertion is inside a conditional: with debug on, both load
    project = PROJECTS / "refusals"
    shown = bst_show(tmp_path, project, {"debug": "true"}, "%{vars}", "assertion.bst")
    elements = remex_load(tmp_path, project, {"debug": "true"}, ["assertion.bst"])
    assert elements["assertion.bst"].variables.as_dict() == shown["assertion.bst"]
