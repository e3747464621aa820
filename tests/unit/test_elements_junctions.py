"""Junctions and links, loaded: names, options passed down, sources, and refusals."""

from __future__ import annotations

import hashlib
import io
import tarfile
import textwrap
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.elements import LoadError, load_project

SUB_CONF = """\
name: sub
min-version: 2.0
element-path: elements
options:
  colour:
    type: enum
    description: A colour
    values: [red, blue]
    default: red
    variable: colour
variables:
  shade: "%{colour}-ish"
"""
SUB_ELEMENT = "kind: stack\nvariables:\n  tint: '%{shade}'\n"


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def top(tmp_path: Path, junction: str, extra: dict[str, str] | None = None) -> Path:
    return write(
        tmp_path / "top",
        {
            "project.conf": "name: top\nmin-version: 2.0\nelement-path: elements\n",
            "elements/sub.bst": junction,
            "elements/app.bst": "kind: stack\ndepends:\n- sub.bst:thing.bst\n",
            **(extra or {}),
        },
    )


def sub_project(root: Path) -> Path:
    return write(root, {"project.conf": SUB_CONF, "elements/thing.bst": SUB_ELEMENT})


def test_a_local_junction_passes_its_options_down(tmp_path: Path) -> None:
    # Given a junction to a folder of the project, setting the subproject's option
    sub_project(tmp_path / "top" / "sub")
    junction = "kind: junction\nsources:\n- kind: local\n  path: sub\nconfig:\n  options:\n"
    root = top(tmp_path, junction + "    colour: blue\n")
    # When the project's element is loaded
    plan = load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(["app.bst"])
    # Then the subproject's element is there under its qualified name, its own
    # project's name and variables, with the option given by the junction
    thing, app = plan
    assert (thing.name, thing.project, thing.normal_name) == ("sub.bst:thing.bst", "sub", "thing")
    assert thing.variables["tint"] == "blue-ish"
    assert thing.variables["element-name"] == "thing.bst"
    assert app.runtime_dependencies == [thing]


def test_a_tar_junction_is_staged_into_a_folder_once(tmp_path: Path) -> None:
    # Given the subproject as a tarball (file://), the junction's only source
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
    ref = hashlib.sha256(data.getvalue()).hexdigest()
    junction = f"kind: junction\nsources:\n- kind: tar\n  url: file://{tarball}\n  ref: {ref}\n"
    root = top(tmp_path, junction)
    # When loaded twice with one local CAS
    for _ in range(2):
        plan = load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(["app.bst"])
        # Then the subproject's element loads, with the subproject's defaults
        assert plan[0].variables["tint"] == "red-ish"
    # And the checkout beside the CAS holds the subproject, made once
    [checkout] = (tmp_path / "junctions").iterdir()
    assert (checkout / "project.conf").read_text() == SUB_CONF


@pytest.mark.parametrize(
    ("junction", "extra", "words", "where"),
    [
        (
            "kind: junction\nsources:\n- kind: local\n  path: empty\n",
            {"empty/README": "nothing here\n"},
            "its source holds no project.conf",
            ("elements/sub.bst", 3),
        ),
        (
            "kind: junction\n",
            {},
            "a junction needs exactly one source (the subproject), it has 0",
            ("elements/sub.bst", 1),
        ),
        (
            "kind: stack\n",
            {},
            "sub.bst is a stack element, not a junction",
            ("elements/app.bst", 3),
        ),
    ],
)
def test_a_junction_to_no_project_is_refused(
    tmp_path: Path, junction: str, extra: dict[str, str], words: str, where: tuple[str, int]
) -> None:
    root = top(tmp_path, junction, extra)
    with pytest.raises(LoadError) as info:
        load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(["app.bst"])
    assert words in info.value.reason
    assert (info.value.file, info.value.line) == where


def test_depending_on_a_junction_itself_is_refused(tmp_path: Path) -> None:
    sub_project(tmp_path / "top" / "sub")
    root = top(
        tmp_path,
        "kind: junction\nsources:\n- kind: local\n  path: sub\n",
        {"elements/app.bst": "kind: stack\ndepends:\n- sub.bst\n"},
    )
    with pytest.raises(LoadError) as info:
        load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(["app.bst"])
    assert info.value.reason.startswith("dependency 'sub.bst' is a junction")
    assert (info.value.file, info.value.line, info.value.field) == (
        "elements/app.bst",
        3,
        "depends[0]",
    )


def test_links_resolve_to_their_target_and_cycles_are_refused(tmp_path: Path) -> None:
    sub_project(tmp_path / "top" / "sub")
    root = top(
        tmp_path,
        "kind: junction\nsources:\n- kind: local\n  path: sub\n",
        {
            "elements/alias.bst": "kind: link\nconfig:\n  target: sub.bst:thing.bst\n",
            "elements/app.bst": "kind: stack\ndepends:\n- alias.bst\n",
            "elements/a.bst": "kind: link\nconfig:\n  target: b.bst\n",
            "elements/b.bst": "kind: link\nconfig:\n  target: a.bst\n",
        },
    )
    plan = load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(["app.bst"])
    assert [e.name for e in plan] == ["sub.bst:thing.bst", "app.bst"]
    with pytest.raises(LoadError, match=r"links form a cycle: a\.bst -> b\.bst -> a\.bst"):
        load_project(root, cas=LocalCas(tmp_path / "cas2")).load_targets(["a.bst"])
