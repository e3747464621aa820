"""Variables, environment and sandbox: BuildStream's defaults, layering, expansion, errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.elements import Element, LoadError, load_project
from pipeline.elements.defaults import DEFAULT_ENVIRONMENT, canonical_arch
from pipeline.elements.nodes import Mark
from pipeline.elements.variables import Definition, Variables

CONF = "name: proj\nelement-path: elements\n"


def load(tmp_path: Path, elements: dict[str, str], conf: str = CONF, target: str = "") -> Element:
    root = tmp_path / "project"
    files = {"project.conf": conf, **{f"elements/{k}": v for k, v in elements.items()}}
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    project = load_project(root, cas=LocalCas(tmp_path / "cas"))
    return project.load_targets([target or next(iter(elements))])[-1]


def load_error(tmp_path: Path, elements: dict[str, str], conf: str = CONF) -> LoadError:
    with pytest.raises(LoadError) as info:
        load(tmp_path, elements, conf)
    return info.value


def test_buildstream_default_variables(tmp_path: Path) -> None:
    # Given an element in a sub-folder and no variables anywhere
    element = load(tmp_path, {"libs/app.bst": "kind: manual\n"})

    # Then the variables are BuildStream's defaults
    v = element.variables
    assert v["prefix"] == "/usr"
    assert v["exec_prefix"] == "/usr"
    assert v["bindir"] == "/usr/bin"
    assert v["sbindir"] == "/usr/sbin"
    assert v["libexecdir"] == "/usr/libexec"
    assert v["datadir"] == "/usr/share"
    assert v["sysconfdir"] == "/etc"
    assert v["sharedstatedir"] == "/usr/com"
    assert v["localstatedir"] == "/var"
    assert v["lib"] == "lib"
    assert v["libdir"] == "/usr/lib"
    assert v["debugdir"] == "/usr/lib/debug"
    assert v["includedir"] == "/usr/include"
    assert v["docdir"] == "/usr/share/doc"
    assert v["infodir"] == "/usr/share/info"
    assert v["mandir"] == "/usr/share/man"
    assert v["install-root"] == "/buildstream-install"
    assert v["strip-binaries"] == ""
    assert v["project-name"] == "proj"
    # element-name is the element's path relative to element-path, .bst included
    assert v["element-name"] == "libs/app.bst"
    assert v["build-root"] == "/buildstream/proj/libs/app.bst"
    assert v["max-jobs"] == "8"


def test_nested_expansion_follows_overrides_through_every_layer(tmp_path: Path) -> None:
    # Given prefix overridden by the project, and lib by the element
    conf = CONF + "variables:\n  prefix: /opt/%{tool}\n  tool: hammer\n"
    element = load(
        tmp_path,
        {"a.bst": "kind: manual\nvariables:\n  lib: lib64\n  tool: saw\n"},
        conf,
    )

    # Then defaults referring to them follow, using the latest layer's values
    assert element.variables["libdir"] == "/opt/saw/lib64"
    assert element.variables["bindir"] == "/opt/saw/bin"
    assert element.variables["debugdir"] == "/opt/saw/lib64/debug"


def test_variables_expand_in_commands_environment_and_import_config(tmp_path: Path) -> None:
    conf = CONF + "environment:\n  PREFIX: '%{prefix}'\n"
    manual = load(
        tmp_path,
        {
            "a.bst": """\
                kind: manual
                environment:
                  DEST: "%{install-root}%{bindir}"
                config:
                  install-commands:
                  - install -D tool %{install-root}%{bindir}/tool
            """
        },
        conf,
    )
    assert manual.plugin.commands["install-commands"] == [
        "install -D tool /buildstream-install/usr/bin/tool"
    ]
    assert manual.environment["PREFIX"] == "/usr"
    assert manual.environment["DEST"] == "/buildstream-install/usr/bin"


def test_a_lone_percent_is_literal(tmp_path: Path) -> None:
    # BuildStream has no escape: only %{name} is a reference
    element = load(
        tmp_path,
        {"a.bst": "kind: manual\nconfig:\n  build-commands:\n  - printf '100%% %s %{x' %%{lib}\n"},
    )
    assert element.plugin.commands["build-commands"] == ["printf '100%% %s %{x' %lib"]


def test_undefined_variable_in_a_command_names_file_line_field_and_variable(
    tmp_path: Path,
) -> None:
    error = load_error(
        tmp_path,
        {"a.bst": "kind: manual\nconfig:\n  build-commands:\n  - make\n  - cp x %{bindr}/x\n"},
    )
    assert str(error) == ("elements/a.bst:5: config.build-commands[1]: undefined variable 'bindr'")


def test_undefined_variable_in_a_definition_is_reported_there_even_if_unused(
    tmp_path: Path,
) -> None:
    # Given project.conf defining a variable that refers to nothing, never used
    conf = CONF + "variables:\n  ok: fine\n  broken: '%{nowhere}/x'\n"
    error = load_error(tmp_path, {"a.bst": "kind: manual\n"}, conf)

    # Then the error is at that definition, as BuildStream checks every variable
    assert str(error) == "project.conf:5: variables.broken: undefined variable 'nowhere'"


def test_undefined_variable_in_a_source_field(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, {"a.bst": "kind: import\nsources:\n- kind: local\n  path: '%{srcdir}'\n"}
    )
    assert str(error) == "elements/a.bst:4: sources[0].path: undefined variable 'srcdir'"


def test_undefined_variable_in_environment(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"a.bst": "kind: manual\nenvironment:\n  X: '%{y}'\n"})
    assert str(error) == "elements/a.bst:3: environment.X: undefined variable 'y'"


def test_circular_variables_print_the_cycle(tmp_path: Path) -> None:
    # Given a -> b -> c -> a across the project and the element
    conf = CONF + "variables:\n  a: '%{b}'\n"
    error = load_error(
        tmp_path, {"e.bst": "kind: manual\nvariables:\n  b: x%{c}\n  c: '%{a}y'\n"}, conf
    )

    # Then the cycle is printed, at the first variable's definition
    assert (
        str(error) == "project.conf:4: variables.a: circular variable reference: a -> b -> c -> a"
    )


def test_self_reference_is_circular(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"e.bst": "kind: manual\nvariables:\n  prefix: '%{prefix}/x'\n"})
    assert str(error) == (
        "elements/e.bst:3: variables.prefix: circular variable reference: prefix -> prefix"
    )


@pytest.mark.parametrize("name", ["project-name", "element-name", "max-jobs"])
def test_protected_variables_cannot_be_redefined(tmp_path: Path, name: str) -> None:
    error = load_error(tmp_path, {"e.bst": f"kind: manual\nvariables:\n  {name}: x\n"})
    assert (error.file, error.line, error.field) == ("elements/e.bst", 3, f"variables.{name}")


def test_notparallel_sets_max_jobs_to_one(tmp_path: Path) -> None:
    element = load(tmp_path, {"e.bst": "kind: manual\nvariables:\n  notparallel: true\n"})
    assert element.variables["max-jobs"] == "1"


def test_variables_class_resolves_lazily_and_reports_cycles() -> None:
    mark = Mark("f.bst", 1)
    variables = Variables(
        {
            "a": Definition("%{b}-%{b}", mark, "variables.a"),
            "b": Definition("B", mark, "variables.b"),
        }
    )
    assert variables["a"] == "B-B"
    assert variables.get("zzz") is None
    assert variables.expand("<%{a}>", mark=mark, field="f") == "<B-B>"
    deep = Variables(
        {f"v{i}": Definition(f"%{{v{i + 1}}}", mark, f"v{i}") for i in range(5000)}
        | {"v5000": Definition("end", mark, "v5000")}
    )
    with pytest.raises(LoadError):
        deep["v0"]  # too deep for recursion: an error, not a crash


# --- environment -----------------------------------------------------------------


def test_default_environment_is_buildstreams(tmp_path: Path) -> None:
    element = load(tmp_path, {"e.bst": "kind: manual\n"})
    assert element.environment == {
        "HOME": "/tmp",
        "LC_ALL": "C",
        "LOGNAME": "tomjon",
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "SHELL": "/bin/sh",
        "SOURCE_DATE_EPOCH": "1321009871",
        "TERM": "dumb",
        "TZ": "UTC",
        "USER": "tomjon",
        "USERNAME": "tomjon",
    }
    assert set(DEFAULT_ENVIRONMENT) == set(element.environment)


def test_environment_layers_and_sorting(tmp_path: Path) -> None:
    conf = CONF + "environment:\n  PATH: /opt/bin:/usr/bin\n  ZED: project\n  CC: gcc\n"
    element = load(
        tmp_path, {"e.bst": "kind: manual\nenvironment:\n  CC: clang\n  AA: '1'\n"}, conf
    )
    assert element.environment["PATH"] == "/opt/bin:/usr/bin"
    assert element.environment["ZED"] == "project"
    assert element.environment["CC"] == "clang"
    # In BuildStream's order: the defaults first, as show --format %{env} prints it
    assert list(element.environment)[:3] == ["PATH", "SHELL", "TERM"]


def test_environment_values_must_be_strings(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"e.bst": "kind: manual\nenvironment:\n  X: [1]\n"})
    assert str(error) == "elements/e.bst:3: environment.X: expected a string, got a list"


# --- sandbox -----------------------------------------------------------------------


def test_sandbox_names_are_canonical(tmp_path: Path) -> None:
    element = load(
        tmp_path,
        {
            "e.bst": "kind: manual\nvariables:\n  arch: AMD64\n"
            "sandbox:\n  build-os: Linux\n  build-arch: '%{arch}'\n"
        },
    )
    assert (element.build_os, element.build_arch) == ("linux", "x86-64")


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("x86_64", "x86-64"), ("aarch64", "aarch64"), ("i686", "x86-32"), ("ppc64le", "power-isa-le"),
     ("riscv64", "rv64g"), ("armv8l", "aarch64")],
)  # fmt: skip
def test_canonical_arch(given: str, canonical: str) -> None:
    assert canonical_arch(given) == canonical


def test_bad_build_root_is_an_error_at_its_definition(tmp_path: Path) -> None:
    error = load_error(tmp_path, {"e.bst": "kind: manual\nvariables:\n  install-root: relative\n"})
    assert (error.file, error.line, error.field) == ("elements/e.bst", 3, "variables.install-root")
