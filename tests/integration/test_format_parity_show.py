"""``bst show --format`` and remex's loader agree on every element of three projects.

tests/projects/kinds (compose, filter, script over manual elements, project
split rules, dependency config), tests/projects/junctions (nested junctions,
options passed down, a link, an include from a junction) and
tests/projects/plugins (the BuildElement kinds of the buildstream-plugins
package and a local plugin, read as data; project-wide ``elements:``
overrides, includes and list directives) are shown by the real ``bst``
(BuildStream 2.8.1 with buildstream-plugins 2.8.0) with each placeholder, and
formatted by :func:`pipeline.elements.show.format_element`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.elements import load_project
from pipeline.elements.show import format_element
from pipeline.testing.bst import Bst

PROJECTS = Path(__file__).parents[1] / "projects"
FORMATS = ("%{vars}", "%{env}", "%{config}", "%{public}", "%{deps}", "%{build-deps}")
SEPARATOR = "@@remex-parity@@"


def shown_by_bst(bst: Bst, target: str, fmt: str) -> dict[str, str]:
    out = bst.run("show", "--deps", "all", "--format", f"{SEPARATOR}%{{name}}\n{fmt}", target)
    shown = {}
    for chunk in out.stdout.split(SEPARATOR)[1:]:
        name, _, text = chunk.partition("\n")
        shown[name] = text.strip()
    return shown


@pytest.fixture(scope="module", params=["kinds", "plugins", "junctions"])
def project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("parity") / request.param
    shutil.copytree(PROJECTS / request.param, dest)
    sysroot = {"kinds": dest / "sysroot", "junctions": dest / "subproject" / "sysroot"}
    if request.param in sysroot:
        # Only loaded, never built: any file will do as the sysroot.
        (sysroot[request.param] / "usr").mkdir(parents=True)
        (sysroot[request.param] / "usr" / "marker").write_text("x\n")
    return dest


@pytest.mark.parametrize("fmt", FORMATS)
def test_show_format_matches_bst(
    project: Path, fmt: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Given the project shown by bst, every element of all.bst's closure (a
    # short home folder: casd's socket path must stay under 108 bytes)
    shown = shown_by_bst(Bst(project, tmp_path_factory.mktemp("bh")), "all.bst", fmt)

    # When remex loads it
    plan = load_project(project, cas=LocalCas(tmp_path / "cas")).load_targets(["all.bst"])

    # Then it knows the same elements and prints each the same
    assert sorted(shown) == sorted(e.name for e in plan)
    for element in plan:
        mine = format_element(element, fmt, state="buildable").strip()
        assert mine == shown[element.name], f"{element.name}: {fmt}"
