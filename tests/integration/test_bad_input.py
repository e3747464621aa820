"""Bad input in examples/hello is refused when the project is loaded, before anything runs.

Each test copies the project, puts one defect in it, and builds it the way
``remex build`` does (:func:`tests.hello.load_and_build`) against a real
buildbox-casd. The error must be a LoadError whose message names the file,
the line and the field, and no RPC at all may have reached the server: no
source snapshot, no upload, no Execute, no artifact.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.elements import LoadError, load_project
from pipeline.reapi.asset import AssetClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.servers import CasdServer
from tests.hello import calls, copy_hello_project, load_and_build, stage_context


@dataclass(frozen=True)
class Defect:
    """Where the error must point: file (relative to the project), line, field."""

    file: str
    line: int
    field: str | None
    words: tuple[str, ...]
    """Words the message must hold (what is wrong)."""
    also: tuple[tuple[str, int, str | None], ...] = ()
    """Other (file, line, field) the error may point at instead (a cycle has many edges)."""


def line_of(path: Path, text: str) -> int:
    """The 1-based line of the only line of ``path`` that holds ``text``."""
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    assert len(lines) == 1, f"{text!r} is on lines {lines} of {path}"
    return lines[0]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    path.write_text(text.replace(old, new))


# --- the defects: each changes a copy of the project and says where the error is


def malformed_yaml(project: Path) -> Defect:
    element = project / "elements/name.bst"
    edit(
        element,
        "  - tr -d '\\n' < name.txt > name\n",
        "  - tr -d '\\n' < name.txt > name\n  - [a, b\n",
    )
    # The unclosed flow sequence is noticed on the line after it; either line will do.
    return Defect(
        "elements/name.bst",
        line_of(element, "- [a, b"),
        None,
        ("malformed YAML",),
        also=(("elements/name.bst", line_of(element, "install-commands:"), None),),
    )


def unknown_kind(project: Path) -> Defect:
    element = project / "elements/hello.bst"
    edit(element, "kind: manual\n", "kind: manul\n")
    return Defect("elements/hello.bst", line_of(element, "kind: manul"), "kind", ("manul",))


def unknown_key(project: Path) -> Defect:
    element = project / "elements/greeting.bst"
    edit(element, "  build-commands:\n", "  build-comands:\n")
    return Defect(
        "elements/greeting.bst",
        line_of(element, "build-comands"),
        "config.build-comands",
        ("unknown key",),
    )


def missing_dependency_file(project: Path) -> Defect:
    element = project / "elements/hello.bst"
    edit(element, "- greeting.bst\n", "- greetings.bst\n")
    return Defect(
        "elements/hello.bst",
        line_of(element, "greetings.bst"),
        "depends[1]",
        ("greetings.bst", "not found"),
    )


def dependency_cycle(project: Path) -> Defect:
    # app.bst -> hello.bst -> name.bst -> app.bst: any of the three edges may be named
    element = project / "elements/name.bst"
    edit(element, "build-depends:\n- base.bst\n", "build-depends:\n- base.bst\n- app.bst\n")
    app, hello = project / "elements/app.bst", project / "elements/hello.bst"
    return Defect(
        "elements/name.bst",
        line_of(element, "- app.bst"),
        "build-depends[1]",
        ("cycle", "app.bst -> hello.bst -> name.bst -> app.bst"),
        also=(
            ("elements/app.bst", line_of(app, "- hello.bst"), "depends[0]"),
            ("elements/hello.bst", line_of(hello, "filename: name.bst"), "depends[2]"),
        ),
    )


def missing_local_source(project: Path) -> Defect:
    element = project / "elements/name.bst"
    edit(element, "path: files/name\n", "path: files/nobody\n")
    return Defect(
        "elements/name.bst",
        line_of(element, "files/nobody"),
        "sources[0].path",
        ("files/nobody", "does not exist"),
    )


def tar_sha256_mismatch(project: Path) -> Defect:
    tarball = project / "files" / "extra.tar"
    with tarfile.open(tarball, "w") as tar:
        data = b"extra\n"
        info = tarfile.TarInfo("extra/extra.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    actual = hashlib.sha256(tarball.read_bytes()).hexdigest()
    wrong = hashlib.sha256(b"not the tarball").hexdigest()
    element = project / "elements/name.bst"
    edit(
        element,
        "  path: files/name\n",
        f"  path: files/name\n- kind: tar\n  url: file://{tarball}\n  ref: {wrong}\n",
    )
    return Defect(
        "elements/name.bst",
        line_of(element, f"ref: {wrong}"),
        "sources[1].ref",
        ("sha256", wrong, actual),
    )


def git_ref_not_found(project: Path) -> Defect:
    repo = project / "upstream"
    repo.mkdir()
    (repo / "README").write_text("upstream\n")
    git = ["git", "-c", "user.name=x", "-c", "user.email=x@y", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "README"], ["commit", "-q", "-m", "first"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    missing = ("0" if head[0] != "0" else "1") + head[1:]  # well formed, not in the repo
    element = project / "elements/greeting.bst"
    edit(
        element,
        "  path: files/greeting\n",
        f"  path: files/greeting\n- kind: git\n  url: file://{repo}\n  ref: {missing}\n",
    )
    return Defect(
        "elements/greeting.bst",
        line_of(element, f"ref: {missing}"),
        "sources[1].ref",
        (missing, "not found"),
    )


DEFECTS: dict[str, Callable[[Path], Defect]] = {
    "malformed-yaml": malformed_yaml,
    "unknown-kind": unknown_kind,
    "unknown-key": unknown_key,
    "missing-dependency-file": missing_dependency_file,
    "dependency-cycle": dependency_cycle,
    "missing-local-source": missing_local_source,
    "tar-sha256-mismatch": tar_sha256_mismatch,
    "git-ref-not-found": git_ref_not_found,
}


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasdServer]:
    """A private casd (execution and artifacts): nothing but these tests talks to it."""
    with CasdServer(tmp_path_factory.mktemp("casd-bad-input"), jobs=1) as casd:
        yield casd


@pytest.fixture(scope="module")
def clean_artifact_uris(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The artifact URIs of the project without defects (loaded only, never built)."""
    work = tmp_path_factory.mktemp("clean")
    project = copy_hello_project(work / "hello")
    plan = load_project(project, cas=LocalCas(work / "cas")).load_targets(["app.bst"])
    return [element.artifact_uri for element in plan]


# --- the tests -----------------------------------------------------------------


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_bad_input_is_refused_at_load_time_naming_file_line_and_field(
    defect: str, server: CasdServer, clean_artifact_uris: list[str], tmp_path: Path
) -> None:
    # Given a copy of examples/hello with one defect
    project = copy_hello_project(tmp_path / "hello")
    expected = DEFECTS[defect](project)
    with stage_context(tmp_path / "cas", server.url, server.url) as ctx:
        # When it is built
        with pytest.raises(LoadError) as raised:
            load_and_build(ctx, project, ["app.bst"], scratch=tmp_path / "scratch")
        execution_calls, artifact_calls = calls(ctx)
    error = raised.value
    message = str(error)
    # Then the error names the file, the line and the field
    where = (error.file, error.line, error.field)
    places = [(expected.file, expected.line, expected.field), *expected.also]
    assert where in places, message
    assert f"{error.file}:{error.line}" in message
    if error.field is not None:
        assert error.field in message
    for word in expected.words:
        assert word in message
    # And it came before anything reached a server: nothing staged, executed or pushed
    assert not execution_calls and not artifact_calls, (execution_calls, artifact_calls)
    with Remote(Endpoint(server.url)) as remote:
        assets = AssetClient(remote)
        assert [uri for uri in clean_artifact_uris if assets.fetch_directory([uri])] == []
