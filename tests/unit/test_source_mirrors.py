"""Source mirrors: project.conf ``mirrors`` read, and the candidates' order as BuildStream's."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from pipeline import api
from pipeline.cas import LocalCas
from pipeline.config import load_config
from pipeline.elements import load_project
from pipeline.elements.sources.mirrors import SourceMirror, url_candidates

ALIASES = {"foo": "FOO/", "bar": "BAR/"}
# BuildStream's own mirror test layout (tests/frontend/mirror.py), as data.
MIRRORS = (
    SourceMirror("middle-earth", {"foo": ("OOF/",), "bar": ("RAB/",)}),
    SourceMirror("arrakis", {"foo": ("OFO/", "OFO2/"), "bar": ("RBA/",)}),
    SourceMirror("oz", {"foo": ("ooF/",)}),
)


def test_without_a_default_the_first_mirror_then_the_others_then_the_alias() -> None:
    assert url_candidates("foo:repo1", ALIASES, MIRRORS, None) == [
        "OOF/repo1", "OFO/repo1", "OFO2/repo1", "ooF/repo1", "FOO/repo1",
    ]  # fmt: skip


def test_the_default_mirror_comes_first_the_others_keep_their_order() -> None:
    assert url_candidates("foo:repo1", ALIASES, MIRRORS, "arrakis") == [
        "OFO/repo1", "OFO2/repo1", "OOF/repo1", "ooF/repo1", "FOO/repo1",
    ]  # fmt: skip
    assert url_candidates("bar:x", ALIASES, MIRRORS, "oz") == ["RAB/x", "RBA/x", "BAR/x"]


def test_urls_without_a_declared_alias_have_no_mirrors() -> None:
    assert url_candidates("https://h/x.tar", ALIASES, MIRRORS, None) == ["https://h/x.tar"]
    assert url_candidates("baz:x.tar", ALIASES, MIRRORS, None) == ["baz:x.tar"]
    assert url_candidates("foo:x", ALIASES, (), None) == ["FOO/x"]


def test_a_mirror_repeating_the_alias_value_is_tried_once() -> None:
    mirrors = (SourceMirror("same", {"foo": ("FOO/",)}),)
    assert url_candidates("foo:x", ALIASES, mirrors, None) == ["FOO/x"]


@pytest.mark.parametrize(
    ("default", "first"),
    [(None, "https://eu.mirror/up/"), ("us", "https://us.mirror/up/"), ("none", None)],
)
def test_a_project_s_mirrors_order_a_network_source_s_urls(
    tmp_path: Path, default: str | None, first: str | None
) -> None:
    # Given a project with an alias and two mirrors of it
    conf = """\
        name: m
        element-path: elements
        aliases:
          up: https://upstream.example/
        mirrors:
        - name: eu
          aliases:
            up: [https://eu.mirror/up/]
        - name: us
          kind: default
          aliases:
            up: [https://us.mirror/up/]
            other: [https://x/]
        """
    element = f"kind: import\nsources:\n- kind: tar\n  url: up:pkg.tar.gz\n  ref: {'a' * 64}\n"
    for name, text in {"project.conf": conf, "elements/e.bst": element}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    # When it loads with the user's default mirror
    project = load_project(tmp_path, cas=LocalCas(tmp_path / "cas"), default_mirror=default)
    [e] = project.load_targets(["e.bst"])
    request = e.sources[0].fetch_request("e.bst", 0, "elements/e.bst")
    assert request is not None
    # Then the default mirror comes first (or the first one), the alias's value last
    urls = request["urls"]
    assert urls[-1] == "https://upstream.example/pkg.tar.gz"
    assert sorted(urls[:2]) == [
        "https://eu.mirror/up/pkg.tar.gz",
        "https://us.mirror/up/pkg.tar.gz",
    ]
    if first is not None:
        assert urls[0] == first + "pkg.tar.gz"
    else:  # an unknown default mirror changes nothing (bst: the listed order)
        assert urls[0] == "https://eu.mirror/up/pkg.tar.gz"


def test_the_configured_default_mirror_reaches_the_fetch_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project with two mirrors, and the user's config choosing the second
    conf = (
        "name: m\nelement-path: elements\naliases:\n  up: https://upstream.example/\n"
        "mirrors:\n- name: eu\n  aliases:\n    up:\n    - https://eu.mirror/\n"
        "- name: us\n  aliases:\n    up:\n    - https://us.mirror/\n"
    )
    element = f"kind: import\nsources:\n- kind: tar\n  url: up:p.tar\n  ref: {'a' * 64}\n"
    (tmp_path / "elements").mkdir()
    (tmp_path / "project.conf").write_text(conf)
    (tmp_path / "elements/e.bst").write_text(element)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "REMEX_STACK_DIR": str(tmp_path / "x")}

    def first_url(environ: dict[str, str]) -> str:
        config = load_config(tmp_path, environ)
        [e], _ = api.plan_targets(
            tmp_path, ["e.bst"], cas=LocalCas(tmp_path / "cas"), config=config
        )
        request = e.sources[0].fetch_request("e.bst", 0, "elements/e.bst")
        assert request is not None
        return request["urls"][0]

    # When planned, Then the default mirror's URL is tried first
    assert first_url(env) == "https://eu.mirror/p.tar"
    assert first_url(env | {"REMEX_FETCH_DEFAULT_MIRROR": "us"}) == "https://us.mirror/p.tar"
    # And --default-mirror on the command line is that variable for the process
    monkeypatch.setenv("REMEX_FETCH_DEFAULT_MIRROR", "")  # restored after the test
    result = CliRunner().invoke(
        main, ["show", "--default-mirror", "us", "-C", str(tmp_path / "none"), "e.bst"]
    )
    assert result.exit_code != 0  # no project there: only the option's effect matters
    assert os.environ["REMEX_FETCH_DEFAULT_MIRROR"] == "us"
