"""``-o NAME VALUE``, remex.toml's ``[projects.NAME.options]`` and bad project
input, through the ``remex`` command line against a real stack.

A build submitted with options builds what ``remex show`` with the same
options shows; each kind of bad input is one line on stderr naming the file,
the line and the field, a non-zero exit, and nothing enqueued.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import redis

from pipeline.broker import DEFAULT_QUEUE
from pipeline.servers import RemexStack

GREET_CONF = """\
name: greet
min-version: 2.0
element-path: elements
options:
  greeting:
    type: enum
    description: what to say
    values: [hello, bye]
    default: hello
    variable: greeting
  loud:
    type: bool
    description: shout as well
    default: false
"""

GREET_ELEMENT = """\
kind: manual
build-depends: [base.bst]
config:
  install-commands:
  - mkdir -p %{install-root}/usr/share/greet
  - echo %{greeting} > %{install-root}/usr/share/greet/message
  (?):
  - loud:
      install-commands:
        (>):
        - echo LOUD >> %{install-root}/usr/share/greet/message
"""


def write_files(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def greet_project(root: Path, sysroot: Path) -> Path:
    shutil.copytree(sysroot, root / "sysroot", symlinks=True)
    return write_files(
        root,
        {
            "project.conf": GREET_CONF,
            "elements/base.bst": "kind: import\nsources:\n- kind: local\n  path: sysroot\n",
            "elements/greet.bst": GREET_ELEMENT,
        },
    )


def shown(stack: RemexStack, project: Path, *args: str) -> dict[str, tuple[str, str]]:
    """``remex show --format``: element -> (state, full key)."""
    result = stack.cli("show", "-C", project, "-f", "%{name} %{state} %{full-key}", *args)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    return {name: (state, key) for name, state, key in lines}


def test_a_build_with_options_builds_what_show_with_them_shows(
    remex_stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given a project with an enum and a bool option, both used by greet.bst
    project = greet_project(tmp_path / "greet", busybox_sysroot)
    options = ("-o", "greeting", "bye", "-o", "loud", "true")
    before = shown(remex_stack, project, *options, "greet.bst")
    # (nothing built yet: base.bst has all it needs, greet.bst waits for base.bst)
    assert {name: state for name, (state, _) in before.items()} == {
        "base.bst": "buildable", "greet.bst": "waiting",
    }  # fmt: skip
    # When it is built with -o
    code, output = remex_stack.build_json(project, "greet.bst", *options)
    # Then the build succeeds, and show with the same options says cached, same key
    assert code == 0, output
    after = shown(remex_stack, project, *options, "greet.bst")
    assert after == {"base.bst": ("cached", before["base.bst"][1]),
                     "greet.bst": ("cached", before["greet.bst"][1])}  # fmt: skip
    # And the artifact holds what the options say
    checkout = remex_stack.cli("checkout", "-C", project, *options, "greet.bst", tmp_path / "out")
    assert checkout.returncode == 0, checkout.stderr
    assert (tmp_path / "out/usr/share/greet/message").read_text() == "bye\nLOUD\n"
    # And without the options greet.bst is another element, not built
    default = shown(remex_stack, project, "greet.bst")
    assert default["greet.bst"][0] == "buildable"
    assert default["greet.bst"][1] != after["greet.bst"][1]
    # When the project's remex.toml sets the same values
    (project / "remex.toml").write_text('[projects.greet.options]\ngreeting = "bye"\nloud = true\n')
    # Then show without -o finds the build; and -o wins over remex.toml
    assert shown(remex_stack, project, "greet.bst") == after
    quiet = shown(remex_stack, project, "-o", "loud", "false", "greet.bst")
    assert quiet["greet.bst"][0] == "buildable"


# --- bad input: one error naming file, line and field; nothing enqueued -------------

STACK_ELEMENT = "kind: stack\n"
LOCAL_PLUGIN = """\
from buildstream import Element


class Mine(Element):
    BST_MIN_VERSION = "2.0"


def setup():
    return Mine
"""

BAD_INPUTS = {
    "unknown option": (
        {"elements/a.bst": STACK_ELEMENT}, ("-o", "nosuch", "1"),
        "project.conf:4: options.nosuch: unknown option 'nosuch'",
    ),
    "invalid option value": (
        {"elements/a.bst": STACK_ELEMENT}, ("-o", "greeting", "sweet"),
        "project.conf:5: options.greeting: invalid value 'sweet'",
    ),
    "invalid option value in remex.toml": (
        {"elements/a.bst": STACK_ELEMENT,
         "remex.toml": '[projects.greet.options]\ngreeting = "hello"\nloud = "maybe"\n'}, (),
        "{project}/remex.toml:3: projects.greet.options.loud: ",
    ),
    "bad (?) expression": (
        {"elements/a.bst": """\
            kind: stack
            variables:
              (?):
              - greeting === "bye":
                  x: y
            """}, (),
        "elements/a.bst:4: variables.(?)[0]",
    ),
    "include cycle": (
        {"elements/a.bst": "kind: stack\n(@): include/one.yml\n",
         "include/one.yml": "(@): include/two.yml\n",
         "include/two.yml": "(@): include/one.yml\n"}, (),
        "include/two.yml:1: (@): include cycle: ",
    ),
    "missing include": (
        {"elements/a.bst": "kind: stack\n(@): include/none.yml\n"}, (),
        "elements/a.bst:2: (@): ",
    ),
    "missing plugin package": (
        {"project.conf+": """\
            plugins:
            - origin: pip
              package-name: remex-no-such-plugins
              elements: [nosuchkind]
            """,
         "elements/a.bst": "kind: nosuchkind\n"}, (),
        "project.conf:18: plugins[0].elements[0]: element kind 'nosuchkind' needs the pip "
        "package 'remex-no-such-plugins', which is not installed",
    ),
    "plugin kind not a BuildElement": (
        {"project.conf+": """\
            plugins:
            - origin: local
              path: plugins
              elements: [mine]
            """,
         "plugins/mine.py": LOCAL_PLUGIN,
         "elements/a.bst": "kind: mine\n"}, (),
        "project.conf:18: plugins[0].elements[0]: element kind 'mine' from local plugins "
        "folder plugins is not a BuildElement",
    ),
    "compose of a missing domain": (
        {"elements/b.bst": "kind: import\nsources:\n- kind: local\n  path: files\n",
         "files/x": "x\n",
         "elements/a.bst": """\
            kind: compose
            build-depends: [b.bst]
            config:
              include: [no-such-domain]
            """}, (),
        "elements/a.bst:4: config.include",
    ),
}  # fmt: skip


def enqueued(stack: RemexStack) -> tuple[list[bytes], int]:
    """Every build's keys in Redis and the length of the stage queue."""
    client = redis.Redis.from_url(stack.redis.url)
    try:
        return sorted(client.keys("remex:build*")), int(client.llen(DEFAULT_QUEUE))
    finally:
        client.close()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_and_nothing_is_enqueued(
    remex_stack: RemexStack, tmp_path: Path, case: str
) -> None:
    # Given a small project with one thing wrong
    files, args, where = BAD_INPUTS[case]
    files = dict(files)
    conf = GREET_CONF + textwrap.dedent(files.pop("project.conf+", ""))
    project = write_files(tmp_path / "p", {"project.conf": conf, **files})
    before = enqueued(remex_stack)
    # When it is built
    result = remex_stack.cli("build", "-C", project, "a.bst", *args)
    # Then the build is refused with one line naming the file, line and field
    assert result.returncode == 2, f"{result.stdout}\n{result.stderr}"
    lines = result.stderr.splitlines()
    where = where.format(project=project)
    assert len(lines) == 1 and lines[0].startswith(f"remex: {where}"), result.stderr
    # And nothing was enqueued
    assert enqueued(remex_stack) == before
    # And show refuses it the same way
    show = remex_stack.cli("show", "-C", project, "a.bst", *args)
    assert show.returncode == 2 and show.stderr == result.stderr
