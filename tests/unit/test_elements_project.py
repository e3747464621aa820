"""Projects and elements: project.conf, element keys, dependencies, the plan, build specs."""

from __future__ import annotations

import dataclasses
import json
import posixpath
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from pipeline import spec
from pipeline.cas import LocalCas
from pipeline.digest import digest_of, digest_to_json
from pipeline.elements import Element, ElementError, LoadError, Project, load_project
from pipeline.elements.defaults import host_arch
from pipeline.elements.kinds.base import StagedDependency
from pipeline.elements.kinds.manual import BuildElementKind, sandbox_folder
from pipeline.elements.variables import Definition, Variables
from pipeline.errors import ConfigError

CONF = "name: test\nelement-path: elements\n"
PROJECTS = Path(__file__).resolve().parents[1] / "projects"


def write(root: Path, files: dict[str, str]) -> Path:
    """Write dedented text files under ``root``."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def project(tmp_path: Path, elements: dict[str, str], conf: str = CONF) -> Project:
    root = tmp_path / "project"
    write(root, {"project.conf": conf, **{f"elements/{k}": v for k, v in elements.items()}})
    return load_project(root, cas=LocalCas(tmp_path / "cas"))


def load_error(
    tmp_path: Path, elements: dict[str, str], target: str, conf: str = CONF
) -> LoadError:
    with pytest.raises(LoadError) as info:
        project(tmp_path, elements, conf).load_targets([target])
    return info.value


def names(elements: list[Element]) -> list[str]:
    return [e.name for e in elements]


# --- project.conf ----------------------------------------------------------------


def test_project_conf_accepts_every_supported_key(tmp_path: Path) -> None:
    # Given a project.conf using each supported key
    conf = """\
        name: demo
        min-version: 2.0
        element-path: elements
        variables:
          prefix: /opt
        environment:
          FOO: bar
        environment-nocache:
        - FOO
        aliases:
          mirror: file:///srv/mirror/
    """

    # When it is loaded
    proj = project(tmp_path, {"a.bst": "kind: stack\n"}, textwrap.dedent(conf))

    # Then its values are there
    assert proj.name == "demo"
    assert proj.element_path == (tmp_path / "project" / "elements").resolve()
    assert proj.aliases == {"mirror": "file:///srv/mirror/"}
    assert proj.element_names() == ["a.bst"]


def test_element_path_defaults_to_the_project_folder(tmp_path: Path) -> None:
    root = write(tmp_path / "p", {"project.conf": "name: p\n", "a.bst": "kind: stack\n"})
    proj = load_project(root, cas=LocalCas(tmp_path / "cas"))
    assert proj.element_path == root.resolve()
    assert names(proj.load_targets(["a.bst"])) == ["a.bst"]


def test_project_conf_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as info:
        project(tmp_path, {}, "name: p\nelement-path: elements\nbogus: 1\n")
    assert str(info.value).startswith("project.conf:3: bogus: unknown key")


def test_project_conf_buildstream_key_remex_lacks_says_not_supported(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as info:
        project(tmp_path, {}, "name: p\nelement-path: elements\njunctions: {}\n")
    assert str(info.value) == "project.conf:3: junctions: not supported by remex"


def test_project_conf_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as info:
        project(tmp_path, {}, "element-path: elements\n")
    assert str(info.value) == "project.conf:1: name: missing required key 'name'"


def test_project_conf_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as info:
        load_project(tmp_path, cas=LocalCas(tmp_path / "cas"))
    assert info.value.file == "project.conf"


def test_element_path_may_not_leave_the_project(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    with pytest.raises(LoadError) as info:
        project(tmp_path, {}, "name: p\nelement-path: ../outside\n")
    assert info.value.field == "element-path"
    assert info.value.line == 2


def test_malformed_project_conf_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as info:
        project(tmp_path, {}, "name: p\nvariables: [\n")
    assert info.value.file == "project.conf"
    assert info.value.line is not None
    assert "malformed YAML" in str(info.value)


# --- element keys ----------------------------------------------------------------


def test_manual_element_with_every_key(tmp_path: Path) -> None:
    # Given a manual element using every supported key
    proj = project(
        tmp_path,
        {
            "base.bst": "kind: import\n",
            "tool.bst": "kind: stack\n",
            "app.bst": """\
                kind: manual
                description: The app
                depends:
                - base.bst
                build-depends:
                - tool.bst
                runtime-depends: []
                sources: []
                variables:
                  flavour: sweet
                environment:
                  FLAVOUR: "%{flavour}"
                environment-nocache:
                - FLAVOUR
                config:
                  configure-commands: [./configure]
                  build-commands: [make]
                  install-commands: ["make DESTDIR=%{install-root} install"]
                  strip-commands: []
                sandbox:
                  build-os: Linux
                  build-arch: x86_64
                public:
                  bst:
                    split-rules: {}
            """,
        },
    )

    # When it is loaded
    app = proj.load_targets(["app.bst"])[-1]

    # Then every value is resolved
    assert app.kind == "manual"
    assert app.description == "The app"
    assert names(app.build_dependencies) == ["base.bst", "tool.bst"]
    assert names(app.runtime_dependencies) == ["base.bst"]
    assert app.environment["FLAVOUR"] == "sweet"
    assert "FLAVOUR" in app.environment_nocache
    assert app.plugin.commands == {
        "configure-commands": ["./configure"],
        "build-commands": ["make"],
        "install-commands": ["make DESTDIR=/buildstream-install install"],
        "strip-commands": [],
    }
    assert (app.build_os, app.build_arch) == ("linux", "x86-64")
    assert app.file == "elements/app.bst"


def test_unknown_element_key_names_file_line_and_key(tmp_path: Path) -> None:
    # Given an element with a misspelt key on line 3
    error = load_error(
        tmp_path, {"app.bst": "kind: manual\ndepends: []\nbuild-depend: [x.bst]\n"}, "app.bst"
    )

    # Then the error names the file, the line and the key
    assert str(error).startswith("elements/app.bst:3: build-depend: unknown key")


def test_unknown_kind_names_file_line_and_field(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"app.bst": "# app\nkind: autotools\n"}, "app.bst")
    assert str(error) == (
        "elements/app.bst:2: kind: unknown element kind 'autotools' "
        "(remex supports compose, filter, import, junction, link, manual, script, stack; a plugin "
        "kind must be declared in project.conf 'plugins')"
    )


def test_missing_kind_is_an_error(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"app.bst": "description: no kind\n"}, "app.bst")
    assert (error.file, error.field) == ("elements/app.bst", "kind")
    assert "missing required key" in error.reason


def test_unknown_config_key_names_file_line_and_key(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        {"app.bst": "kind: manual\nconfig:\n  build-commands: [make]\n  bulid-commands: [x]\n"},
        "app.bst",
    )
    assert str(error).startswith("elements/app.bst:4: config.bulid-commands: unknown key")


def test_commands_must_be_a_list_of_strings(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, {"app.bst": "kind: manual\nconfig:\n  build-commands: make\n"}, "app.bst"
    )
    assert str(error) == (
        "elements/app.bst:3: config.build-commands: cannot replace a list "
        "(written at <core kind manual>/manual.yaml:6) with a string"
    )


def test_unknown_sandbox_key_and_arch_are_errors(tmp_path: Path) -> None:
    error = load_error(
        tmp_path / "1", {"app.bst": "kind: manual\nsandbox:\n  remote-apis-socket: {}\n"}, "app.bst"
    )
    assert str(error) == "elements/app.bst:3: sandbox.remote-apis-socket: not supported by remex"
    error = load_error(
        tmp_path / "3", {"app.bst": "kind: manual\nsandbox:\n  build-uid: me\n"}, "app.bst"
    )
    assert str(error) == (
        "elements/app.bst:3: sandbox.build-uid: build-uid must be an integer, got 'me'"
    )
    error = load_error(
        tmp_path / "2", {"app.bst": "kind: manual\nsandbox:\n  build-arch: vax\n"}, "app.bst"
    )
    assert str(error) == "elements/app.bst:3: sandbox.build-arch: unknown architecture 'vax'"


def test_manual_default_commands_are_buildstreams(tmp_path: Path) -> None:
    # Given a manual element without config
    app = project(tmp_path, {"app.bst": "kind: manual\n"}).load_targets(["app.bst"])[0]

    # Then the commands are BuildStream's manual defaults (strip runs %{strip-binaries})
    assert app.plugin.commands == {
        "configure-commands": [],
        "build-commands": [],
        "install-commands": [],
        "strip-commands": [""],
    }
    # And whitespace-only commands are left out of the script
    assert app.plugin.script(app, app.staged_dependencies()) == ""


def test_import_config_defaults_and_values(tmp_path: Path) -> None:
    proj = project(
        tmp_path,
        {
            "a.bst": "kind: import\n",
            "b.bst": "kind: import\nconfig:\n  source: /files/\n  target: '%{prefix}'\n",
        },
    )
    a, b = proj.load_targets(["a.bst", "b.bst"])
    assert (a.plugin.source, a.plugin.target) == ("", "")
    assert (b.plugin.source, b.plugin.target) == ("files", "usr")


def test_import_config_may_not_climb_out(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"a.bst": "kind: import\nconfig:\n  target: ../../etc\n"}, "a.bst")
    assert (error.file, error.line, error.field) == ("elements/a.bst", 3, "config.target")


def test_stack_takes_no_sources_or_config(tmp_path: Path) -> None:
    (tmp_path / "project" / "files").mkdir(parents=True)
    error = load_error(
        tmp_path,
        {"s.bst": "kind: stack\nsources:\n- kind: local\n  path: files\n"},
        "s.bst",
    )
    assert str(error) == "elements/s.bst:2: sources: stack elements take no sources"
    error = load_error(tmp_path / "2", {"s.bst": "kind: stack\nconfig:\n  x: 1\n"}, "s.bst")
    assert str(error) == "elements/s.bst:2: config: stack elements take no config"


def test_stack_dependencies_must_be_build_and_runtime(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        {"a.bst": "kind: stack\n", "s.bst": "kind: stack\nbuild-depends:\n- a.bst\n"},
        "s.bst",
    )
    assert (error.file, error.line, error.field) == ("elements/s.bst", 3, "build-depends[0]")
    assert "both build and runtime" in error.reason


def test_errors_are_permanent_config_errors(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"a.bst": "kind: nope\n"}, "a.bst")
    assert isinstance(error, ElementError)
    assert isinstance(error, ConfigError)
    assert error.transient is False


# --- dependencies ----------------------------------------------------------------


def test_dependency_forms(tmp_path: Path) -> None:
    # Given every way of writing a dependency
    leaves = {f"{n}.bst": "kind: import\n" for n in ("a", "b", "c", "d", "e", "f", "g", "h")}
    proj = project(
        tmp_path,
        {
            **leaves,
            "top.bst": """\
                kind: manual
                depends:
                - a.bst
                - filename: b.bst
                - filename: c.bst
                  type: build
                - filename: d.bst
                  type: runtime
                - filename: [e.bst, f.bst]
                  type: all
                build-depends:
                - g.bst
                - filename: d.bst
                runtime-depends:
                - filename: h.bst
            """,
        },
    )

    # When it is loaded
    top = proj.load_targets(["top.bst"])[-1]

    # Then each dependency has the right types (d.bst: runtime and build, merged)
    kinds = {d.element.name: (d.build, d.runtime) for d in top.dependencies}
    assert kinds == {
        "a.bst": (True, True),
        "b.bst": (True, True),
        "c.bst": (True, False),
        "d.bst": (True, True),
        "e.bst": (True, True),
        "f.bst": (True, True),
        "g.bst": (True, False),
        "h.bst": (False, True),
    }


def test_dependency_type_only_in_depends(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        {
            "a.bst": "kind: import\n",
            "top.bst": "kind: manual\nbuild-depends:\n- filename: a.bst\n  type: build\n",
        },
        "top.bst",
    )
    assert (error.line, error.field) == (4, "build-depends[0].type")


def test_bad_dependency_type_names_file_line_and_field(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        {
            "a.bst": "kind: import\n",
            "top.bst": "kind: manual\ndepends:\n- filename: a.bst\n  type: sometimes\n",
        },
        "top.bst",
    )
    assert str(error) == (
        "elements/top.bst:4: depends[0].type: dependency type 'sometimes' is not "
        "build, runtime or all"
    )


def test_a_dependency_through_a_missing_junction_is_refused(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, {"top.bst": "kind: manual\ndepends:\n- sub.bst:a.bst\n"}, "top.bst"
    )
    assert (error.line, error.field) == (3, "depends[0]")
    assert error.reason == "junction 'sub.bst' not found (no file elements/sub.bst)"


def test_missing_dependency_names_referencing_file_line_and_name(tmp_path: Path) -> None:
    # Given an element depending on a file that does not exist
    error = load_error(
        tmp_path,
        {
            "a.bst": "kind: import\n",
            "app.bst": "kind: manual\ndepends:\n- a.bst\n- libs/missing.bst\n",
        },
        "app.bst",
    )

    # Then the error is at the reference, naming the dependency
    assert str(error) == (
        "elements/app.bst:4: depends[1]: dependency 'libs/missing.bst' not found "
        "(no file elements/libs/missing.bst)"
    )


def test_missing_target_names_the_file(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"a.bst": "kind: import\n"}, "nope.bst")
    assert str(error) == "elements/nope.bst: element 'nope.bst' not found"


def test_dependency_cycle_is_printed_at_the_first_file(tmp_path: Path) -> None:
    # Given a.bst -> b.bst -> c.bst -> a.bst, reached from top.bst
    error = load_error(
        tmp_path,
        {
            "top.bst": "kind: stack\ndepends:\n- a.bst\n",
            "a.bst": "kind: manual\n\nbuild-depends:\n- b.bst\n",
            "b.bst": "kind: manual\ndepends:\n- c.bst\n",
            "c.bst": "kind: manual\nruntime-depends:\n- a.bst\n",
        },
        "top.bst",
    )

    # Then the cycle is printed, at the first element's reference to the next
    assert str(error) == (
        "elements/a.bst:4: build-depends[0]: dependency cycle: a.bst -> b.bst -> c.bst -> a.bst"
    )


def test_self_dependency_is_a_cycle(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"a.bst": "kind: manual\ndepends: [a.bst]\n"}, "a.bst")
    assert str(error) == "elements/a.bst:2: depends[0]: dependency cycle: a.bst -> a.bst"


def test_errors_in_dependencies_are_found_at_load(tmp_path: Path) -> None:
    # Given a target whose dependency's dependency has an unknown key
    error = load_error(
        tmp_path,
        {
            "top.bst": "kind: stack\ndepends: [mid.bst]\n",
            "mid.bst": "kind: stack\ndepends: [low.bst]\n",
            "low.bst": "kind: import\nsorces: []\n",
        },
        "top.bst",
    )
    assert (error.file, error.line, error.field) == ("elements/low.bst", 2, "sorces")


# --- the plan and staging order -----------------------------------------------------


def _diamond(tmp_path: Path) -> Project:
    return project(
        tmp_path,
        {
            "base.bst": "kind: import\n",
            "libs/zlib.bst": "kind: manual\nbuild-depends: [base.bst]\n",
            "libs/ssl.bst": "kind: manual\nbuild-depends: [base.bst]\n"
            "runtime-depends: [libs/zlib.bst]\n",
            "tool.bst": "kind: manual\nbuild-depends: [base.bst]\n"
            "runtime-depends: [libs/ssl.bst]\n",
            "docs.bst": "kind: import\n",
            "app.bst": """\
                kind: manual
                depends:
                - tool.bst
                - base.bst
                - filename: docs.bst
                  type: runtime
                build-depends:
                - libs/zlib.bst
            """,
            "all.bst": "kind: stack\ndepends: [app.bst, tool.bst]\n",
        },
    )


def test_plan_has_every_dependency_before_its_dependents(tmp_path: Path) -> None:
    # Given a project with shared dependencies
    proj = _diamond(tmp_path)

    # When the top is loaded
    plan = proj.load_targets(["all.bst"])

    # Then every element comes once, after all its dependencies
    assert sorted(names(plan)) == sorted(proj.element_names())
    position = {e.name: i for i, e in enumerate(plan)}
    for element in plan:
        for dep in element.dependencies:
            assert position[dep.element.name] < position[element.name]


def test_plan_and_staging_order_are_deterministic(tmp_path: Path) -> None:
    first = _diamond(tmp_path / "1")
    second = _diamond(tmp_path / "2")
    plan1, plan2 = first.load_targets(["all.bst"]), second.load_targets(["all.bst"])
    assert names(plan1) == names(plan2)
    assert names(plan1[-2].staged_dependencies()) == names(plan2[-2].staged_dependencies())


def test_dependencies_are_sorted_as_buildstream_sorts_them(tmp_path: Path) -> None:
    # Given app.bst declaring tool.bst before base.bst, which tool.bst needs,
    # and docs.bst (runtime only) before libs/zlib.bst
    app = _diamond(tmp_path).load_targets(["app.bst"])[-1]

    # Then a dependency needed by another direct one comes first; runtime-only ones last
    assert names([d.element for d in app.dependencies]) == [
        "base.bst",
        "libs/zlib.bst",
        "tool.bst",
        "docs.bst",
    ]


def test_staged_dependencies_are_build_deps_plus_their_runtime_closure(tmp_path: Path) -> None:
    # Given app.bst building with tool.bst, whose runtime needs reach libs/ssl and libs/zlib
    proj = _diamond(tmp_path)
    app = proj.load_targets(["app.bst"])[-1]

    # When its staged dependencies are listed
    staged = proj.staged_dependencies(app)

    # Then they are each build dependency's runtime closure, dependencies first,
    # without the runtime-only docs.bst and without app.bst itself
    assert names(staged) == ["base.bst", "libs/zlib.bst", "libs/ssl.bst", "tool.bst"]


def test_runtime_closure_ends_with_the_element(tmp_path: Path) -> None:
    proj = _diamond(tmp_path)
    tool = next(e for e in proj.load_targets(["all.bst"]) if e.name == "tool.bst")
    assert names(tool.runtime_closure()) == ["libs/zlib.bst", "libs/ssl.bst", "tool.bst"]


def test_loading_twice_reuses_elements(tmp_path: Path) -> None:
    proj = _diamond(tmp_path)
    first = proj.load_targets(["app.bst"])
    second = proj.load_targets(["all.bst"])
    assert first[-1] is proj.element("app.bst")
    assert next(e for e in second if e.name == "app.bst") is first[-1]


# --- build specs -------------------------------------------------------------------


def test_manual_build_spec(tmp_path: Path) -> None:
    # Given a manual element in a sub-folder with a local source and a dependency
    root = tmp_path / "project"
    write(root, {"files/src/main.c": "int main;\n"})
    proj = project(
        tmp_path,
        {
            "base.bst": "kind: import\n",
            "libs/foo.bst": """\
                kind: manual
                depends: [base.bst]
                sources:
                - kind: local
                  path: files/src
                  directory: src
                environment:
                  CFLAGS: -O2
                config:
                  build-commands:
                  - cd src && cc main.c
                  install-commands:
                  - make install DESTDIR="%{install-root}"
            """,
        },
    )
    base, foo = proj.load_targets(["libs/foo.bst"])
    digest = digest_of(b"any tree")

    # When its build spec is made
    build = foo.build_spec([digest])

    # Then it follows the contract in pipeline/spec.py
    assert build["project"] == "test"
    assert build["element"] == "libs/foo.bst"
    assert build["kind"] == "manual"
    assert build["cache_key"] == foo.cache_key
    assert build["artifact_uri"] == spec.artifact_uri("test", "libs-foo", foo.cache_key)
    assert build["dependencies"] == [
        {
            "element": "base.bst",
            "cache_key": base.cache_key,
            "artifact_uri": spec.artifact_uri("test", "base", base.cache_key),
            "path": "",
            "select": None,
            "overlap_whitelist": [],
        }
    ]
    assert build["runtime_dependencies"] == ["base.bst"]
    assert build["fatal_warnings"] == []
    assert build["sources"] == [
        {"kind": "local", "digest": digest_to_json(digest), "directory": "src"}
    ]
    assert build["source_root"] == "buildstream/test/libs/foo.bst"
    assert (build["files_root"], build["files_target"]) == ("", "")
    assert build["select_outputs"] is False
    command = build["command"]
    assert command is not None
    assert command["arguments"] == [
        "sh",
        "-c",
        "-e",
        "sh -c -e 'cd src && cc main.c\n'\n"
        "sh -c -e 'make install DESTDIR=\"/buildstream-install\"\n'\n",
    ]
    assert command["working_directory"] == "buildstream/test/libs/foo.bst"
    assert command["output_path"] == "buildstream-install"
    assert command["platform"] == {"OSFamily": "linux", "ISA": host_arch()}
    assert command["timeout_seconds"] is None
    assert list(command["environment"]) == sorted(command["environment"])
    assert command["environment"]["CFLAGS"] == "-O2"


def test_import_and_stack_build_specs(tmp_path: Path) -> None:
    write(tmp_path / "project", {"files/a": "a\n"})
    proj = project(
        tmp_path,
        {
            "base.bst": """\
                kind: import
                sources:
                - kind: local
                  path: files
                config:
                  source: /
                  target: /opt/base
            """,
            "all.bst": "kind: stack\ndepends: [base.bst]\n",
        },
    )
    base, top = proj.load_targets(["all.bst"])
    digest = digest_of(b"tree")

    imported = base.build_spec([digest])
    assert (imported["source_root"], imported["files_root"]) == ("", "")
    assert imported["files_target"] == "opt/base"
    assert imported["command"] is None
    assert imported["dependencies"] == []

    stacked = top.build_spec([])
    assert stacked["kind"] == "stack"
    assert stacked["command"] is None
    assert stacked["sources"] == []
    assert stacked["dependencies"] == []
    assert stacked["runtime_dependencies"] == ["base.bst"]


def test_build_spec_wants_one_digest_per_source(tmp_path: Path) -> None:
    app = project(tmp_path, {"app.bst": "kind: manual\n"}).load_targets(["app.bst"])[0]
    with pytest.raises(ValueError):
        app.build_spec([digest_of(b"x")])


def test_script_runs_each_command_as_buildstream_does(tmp_path: Path) -> None:
    # Given commands that cd, set variables, and end with a failing test
    app = project(
        tmp_path,
        {
            "app.bst": """\
                kind: manual
                config:
                  configure-commands:
                  - cd / && X=1
                  build-commands:
                  - |
                    echo "$(pwd) ${X:-unset} it's"
                  - test -e /nonexistent && echo never
                  install-commands:
                  - echo not reached
            """
        },
    ).load_targets(["app.bst"])[0]
    workdir = tmp_path / "work"
    workdir.mkdir()

    # When the action's arguments run
    command = app.build_spec([])["command"]
    assert command is not None
    result = subprocess.run(
        command["arguments"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )

    # Then each command started afresh in the working folder, and the failing
    # last line of a command stopped the build, as under BuildStream
    assert result.stdout == f"{workdir} unset it's\n"
    assert result.returncode != 0


def test_a_build_elements_config_is_what_expanding_it_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given BuildElement kinds (plugin packages' and a local one whose
    # defaults have no configure-commands) and elements whose config has
    # commands with variables, a null step, an empty step, list directives
    root = tmp_path / "plugins"
    shutil.copytree(PROJECTS / "plugins", root)
    defaults = root / "localplugins/mybuild.yaml"
    defaults.write_text(defaults.read_text().replace("  configure-commands: []\n", ""))
    write(
        root,
        {
            "elements/nulls.bst": """\
                kind: mybuild
                variables:
                  word: hi
                config:
                  configure-commands: ~
                  build-commands:
                  - echo %{word} > %{install-root}/a
                  install-commands: []
                """,
        },
    )
    targets = ["all.bst", "nulls.bst"]
    made = load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(targets)
    # When the same project is loaded with every config expanded by the loader
    monkeypatch.setattr(BuildElementKind, "expanded_config", lambda self, config: None)
    expanded = load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(targets)
    # Then each element's config (what show's %{config} prints) is the same,
    # key order and nulls included, and so is each key
    assert [json.dumps(e.config) for e in made] == [json.dumps(e.config) for e in expanded]
    assert [e.cache_key for e in made] == [e.cache_key for e in expanded]
    nulls = next(e for e in made if e.name == "nulls.bst")
    assert nulls.config["configure-commands"] is None
    assert nulls.config["build-commands"] == ["echo hi > /buildstream-install/a"]
    assert any(e.kind == "cmake" for e in made)


def test_an_undefined_variable_in_a_build_elements_config_is_reported(tmp_path: Path) -> None:
    # Given a build element whose command uses an undefined variable
    message = str(
        load_error(
            tmp_path,
            {"a.bst": "kind: manual\nconfig:\n  install-commands:\n  - echo %{nope}\n"},
            "a.bst",
        )
    )
    # Then the load says so, at the command
    assert "undefined variable 'nope'" in message
    assert "a.bst:4" in message


def test_dependencies_are_frozen_values(tmp_path: Path) -> None:
    # Given a loaded element with a dependency
    loaded = project(
        tmp_path, {"a.bst": "kind: stack\n", "b.bst": "kind: stack\ndepends: [a.bst]\n"}
    ).load_targets(["b.bst"])
    (dep,) = loaded[1].dependencies
    # Then it compares by value, cannot be changed, and is copied with a change
    assert dep == dataclasses.replace(dep)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dep.build = False  # type: ignore[misc]
    changed = dataclasses.replace(dep, runtime=False)
    assert (changed.runtime, changed.element, dep.runtime) == (False, dep.element, True)
    staged = StagedDependency(dep.element, path="usr")
    assert staged == StagedDependency(element=dep.element, path="usr", select=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        staged.path = ""  # type: ignore[misc]


@pytest.mark.parametrize(
    "value",
    ["/a", "/buildstream/p/e.bst", "/", "//", "///x", "//a", "/a//b", "/a/../b", "/a/./b",
     "/a/.hidden", "/...", "/a/", "/.", "/a/..", "a/b", "", "./a", "/a b/c"],
)  # fmt: skip
@pytest.mark.parametrize("root_allowed", [False, True])
def test_a_sandbox_folder_is_checked_as_normpath_checks_it(value: str, root_allowed: bool) -> None:
    # Given a variable holding a folder
    variables = Variables({"build-root": Definition(value, None, "variables.build-root")})
    # When it is read as a sandbox folder
    try:
        got: object = sandbox_folder(variables, "build-root", root_allowed=root_allowed)
    except LoadError as error:
        got = str(error)
    # Then the answer is what the rule gives with the path normalised
    normal = posixpath.normpath(value) if value else ""
    if (
        not value.startswith("/")
        or (normal == "/" and not root_allowed)
        or ".." in value.split("/")
    ):
        assert isinstance(got, str) and "must be" in got
    else:
        assert got == value
