"""Source kinds as classes: the registry, plugin source kinds, project.conf ``sources:``
defaults, provenance, and the project.conf keys remex accepts without using."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline import api
from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements import Element, LoadError, load_project
from pipeline.elements.nodes import MappingNode, Mark
from pipeline.elements.sources import (
    SOURCE_KINDS,
    GitSource,
    LocalSource,
    PatchSource,
    RemoteSource,
    Source,
    SourceContext,
    TarSource,
    ZipSource,
    load_source,
    project_path,
    resolve_alias,
)
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory, FileNode

CONF = "name: src\nelement-path: elements\n"
PLUGINS = "plugins:\n- origin: pip\n  package-name: buildstream-plugins\n  sources: [{kinds}]\n"


@pytest.fixture
def cas(tmp_path: Path) -> LocalCas:
    return LocalCas(tmp_path / "cas")


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def load(root: Path, cas: LocalCas, target: str = "e.bst") -> Element:
    return load_project(root, cas=cas).load_targets([target])[0]


def load_error(root: Path, cas: LocalCas) -> LoadError:
    with pytest.raises(LoadError) as info:
        load(root, cas)
    return info.value


def tarball(path: Path) -> str:
    """A tarball with ``top/a.txt``; returns its sha256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("top/a.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"a\n"))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


# --- the registry ---------------------------------------------------------------------


def test_every_kind_is_one_class_in_its_own_module() -> None:
    # Then each registered kind is a Source subclass named by its own `kind`, in its own file
    assert {
        "local": LocalSource,
        "tar": TarSource,
        "git": GitSource,
        "zip": ZipSource,
        "remote": RemoteSource,
        "patch": PatchSource,
    } == SOURCE_KINDS
    modules = {cls.__module__ for cls in SOURCE_KINDS.values()}
    assert modules == {
        "pipeline.elements.sources.local",
        "pipeline.elements.sources.tar",
        "pipeline.elements.sources.git",
        "pipeline.elements.sources.zip",
        "pipeline.elements.sources.remote",
        "pipeline.elements.sources.patch",
    }
    for name, cls in SOURCE_KINDS.items():
        assert issubclass(cls, Source) and cls.kind == name
    # And the helpers other modules use are still importable from the package
    assert callable(project_path) and callable(resolve_alias) and callable(load_source)


class _TextSource(Source):
    """A kind a test adds: ``text`` becomes one file named ``name``."""

    kind: ClassVar[str] = "text"

    def __init__(self, *, text: str, directory: str, mark: Mark, field: str) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.text = text

    @classmethod
    def load(cls, node: MappingNode, ctx: SourceContext) -> _TextSource:
        node.validate_keys(("kind", "text", "directory", "provenance"))
        text = ctx.variables.expand_node(node.require_str("text"))
        return cls(text=text, directory="", mark=node.mark, field=node.path)

    def content_key(self) -> str:
        return self.text

    def stage(self, cas: LocalCas, workdir: Path) -> Digest:
        # The text as one file, ``text``.
        blob = cas.put(self.text.encode())
        return cas.put_message(Directory(files=[FileNode(name="text", digest=blob)]))


def test_a_new_kind_needs_only_its_class_in_the_registry(
    tmp_path: Path, cas: LocalCas, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a kind registered by name and nothing else
    monkeypatch.setitem(SOURCE_KINDS, "text", _TextSource)
    root = write(
        tmp_path / "p",
        {
            "project.conf": CONF + "sources:\n  text:\n    config:\n      text: '%{greeting}'\n",
            "elements/e.bst": "kind: import\nvariables:\n  greeting: hi\nsources:\n- kind: text\n",
        },
    )
    # When an element uses it
    source = load(root, cas).sources[0]
    # Then it is loaded by that class, with the project's defaults and variables
    assert isinstance(source, _TextSource)
    assert source.text == "hi"
    assert source.key_description() == {"kind": "text", "directory": "", "content": "hi"}


# --- plugin source kinds --------------------------------------------------------------


def git_repo(path: Path) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "PATH": "/usr/bin:/bin", "HOME": str(path)}  # fmt: skip
    path.mkdir()
    (path / "f.txt").write_text("f\n")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", "-C", str(path), *args], check=True, env=env)
    out = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "HEAD"], check=True, env=env, capture_output=True
    )
    return out.stdout.decode().strip()


def test_buildstream_plugins_git_is_remex_git(tmp_path: Path, cas: LocalCas) -> None:
    # Given a project that declares git from buildstream-plugins, as bst 2 needs
    commit = git_repo(tmp_path / "repo")
    root = write(
        tmp_path / "p",
        {
            "project.conf": CONF + PLUGINS.format(kinds="git"),
            "elements/e.bst": f"""\
                kind: import
                sources:
                - kind: git
                  url: {tmp_path}/repo
                  track: main
                  ref: {commit}
                  version: '1.0'
                """,
        },
    )
    # When loaded, Then remex's git reads it (version only feeds bst's reports)
    source = load(root, cas).sources[0]
    assert isinstance(source, GitSource)
    assert source.content_key() == commit


def test_declared_plugin_source_kind_remex_lacks_is_refused_at_its_kind_line(
    tmp_path: Path, cas: LocalCas
) -> None:
    # Given buildstream-plugins' cargo declared and used
    root = write(
        tmp_path / "p",
        {
            "project.conf": CONF + PLUGINS.format(kinds="git, cargo"),
            "elements/e.bst": "kind: import\nsources:\n- kind: cargo\n  url: x\n",
        },
    )
    # When loaded, Then the error names the kind, the package and that remex lacks it
    error = load_error(root, cas)
    assert (error.file, error.line, error.field) == ("elements/e.bst", 3, "sources[0].kind")
    assert error.reason == (
        "source kind 'cargo' from pip package buildstream-plugins (declared at "
        "project.conf:6, plugins[0].sources[1]) is not implemented by remex: remex runs "
        "no source plugins and does not implement it"
    )


def test_a_kind_remex_has_declared_from_another_package_is_refused(
    tmp_path: Path, cas: LocalCas
) -> None:
    # Given git declared from some other package (its keys may mean something else)
    conf = CONF + "plugins:\n- origin: pip\n  package-name: acme_plugins>=1\n  sources: [git]\n"
    root = write(
        tmp_path / "p",
        {"project.conf": conf, "elements/e.bst": "kind: import\nsources:\n- kind: git\n"},
    )
    error = load_error(root, cas)
    assert error.field == "sources[0].kind"
    assert "source kind 'git' from pip package acme-plugins" in error.reason
    assert "remex's own 'git' is not that plugin" in error.reason
    assert "buildstream-plugins" in error.reason


def test_a_local_plugin_source_kind_is_refused(tmp_path: Path, cas: LocalCas) -> None:
    conf = CONF + "plugins:\n- origin: local\n  path: plugins\n  sources: [mine]\n"
    root = write(
        tmp_path / "p",
        {
            "project.conf": conf,
            "plugins/mine.py": "",
            "elements/e.bst": "kind: import\nsources:\n- kind: mine\n",
        },
    )
    assert load_error(root, cas).reason.startswith(
        "source kind 'mine' from local plugins folder plugins (declared at project.conf:6"
    )


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("cargo", "comes from the plugin package buildstream-plugins, not BuildStream's core"),
        ("pip", "comes from the plugin package buildstream-plugins"),
        ("workspace", "internal to BuildStream"),
    ],
)
def test_unknown_kind_says_where_such_a_kind_comes_from(
    tmp_path: Path, cas: LocalCas, kind: str, words: str
) -> None:
    root = write(
        tmp_path / "p",
        {"project.conf": CONF, "elements/e.bst": f"kind: import\nsources:\n- kind: {kind}\n"},
    )
    error = load_error(root, cas)
    assert (error.line, error.field) == (3, "sources[0].kind")
    assert words in error.reason


# --- project.conf sources: ------------------------------------------------------------


def test_project_sources_defaults_compose_under_each_source(tmp_path: Path, cas: LocalCas) -> None:
    # Given project-wide tar defaults, one overridden by an element
    sha = tarball(tmp_path / "t.tar")
    conf = CONF + textwrap.dedent(f"""\
        variables:
          keep: ''
        sources:
          tar:
            config:
              url: file://{tmp_path}/t.tar
              base-dir: '%{{keep}}'
        """)
    root = write(
        tmp_path / "p",
        {
            "project.conf": conf,
            "elements/e.bst": f"kind: import\nsources:\n- kind: tar\n  ref: {sha}\n",
            "elements/f.bst": f"kind: import\nsources:\n- kind: tar\n  ref: {sha}\n"
            "  base-dir: '*'\n",
        },
    )
    # When loaded
    e = load(root, cas).sources[0]
    f = load(root, cas, "f.bst").sources[0]
    # Then the defaults fill in what the source leaves out, variables expanded,
    # and the source's own keys win
    assert isinstance(e, TarSource) and isinstance(f, TarSource)
    assert (e.path, e.base_dir) == (tmp_path / "t.tar", "")
    assert f.base_dir == "*"
    assert (e.field, e.mark.file, e.mark.line) == ("sources[0]", "elements/e.bst", 3)


def test_project_sources_default_errors_point_at_project_conf(
    tmp_path: Path, cas: LocalCas
) -> None:
    # Given a bad default url
    conf = CONF + "sources:\n  tar:\n    config:\n      url: gopher://example.com/x.tar\n"
    root = write(
        tmp_path / "p",
        {"project.conf": conf, "elements/e.bst": "kind: import\nsources:\n- kind: tar\n"},
    )
    # Then the error is at the line of project.conf that set it
    error = load_error(root, cas)
    assert (error.file, error.line) == ("project.conf", 6)
    assert "only file://, http(s):// and ftp:// URLs" in error.reason


@pytest.mark.parametrize(
    ("sources", "line", "field", "words"),
    [
        ("  tar:\n    config:\n      directory: sub\n", 6, "sources.tar.config.directory",
         "BuildStream reads it from each source only"),
        ("  tar:\n    defaults: {}\n", 5, "sources.tar.defaults", "unknown key"),
        ("  tar: [a]\n", 4, "sources.tar", "expected a mapping"),
    ],
)  # fmt: skip
def test_project_sources_bad_shapes_are_refused(
    tmp_path: Path, cas: LocalCas, sources: str, line: int, field: str, words: str
) -> None:
    root = write(
        tmp_path / "p",
        {"project.conf": CONF + "sources:\n" + sources, "elements/e.bst": "kind: stack\n"},
    )
    error = load_error(root, cas)
    assert (error.file, error.line, error.field) == ("project.conf", line, field)
    assert words in error.reason


# --- provenance -----------------------------------------------------------------------


def local_element(provenance: str) -> str:
    return f"kind: import\nsources:\n- kind: local\n  path: files\n  provenance:\n{provenance}"


def test_provenance_attributes_default_to_bst_ones(tmp_path: Path, cas: LocalCas) -> None:
    root = write(
        tmp_path / "p",
        {
            "project.conf": CONF,
            "files/a": "a\n",
            "elements/e.bst": local_element("    homepage: https://x\n    issue-tracker: y\n"),
            "elements/f.bst": local_element("    licence: MIT\n"),
        },
    )
    assert isinstance(load(root, cas).sources[0], LocalSource)
    with pytest.raises(LoadError) as info:
        load(root, cas, "f.bst")
    assert (info.value.line, info.value.field) == (6, "sources[0].provenance.licence")
    assert "not declared in project.conf source-provenance-attributes" in info.value.reason


def test_project_provenance_attributes_replace_the_defaults(tmp_path: Path, cas: LocalCas) -> None:
    conf = CONF + "source-provenance-attributes:\n  licence: the licence\n"
    root = write(
        tmp_path / "p",
        {
            "project.conf": conf,
            "files/a": "a\n",
            "elements/e.bst": local_element("    licence: MIT\n"),
            "elements/f.bst": local_element("    homepage: https://x\n"),
        },
    )
    load(root, cas)
    with pytest.raises(LoadError, match="'homepage' is not declared"):
        load(root, cas, "f.bst")


# --- project.conf keys remex accepts without using --------------------------------------

IGNORED = """\
shell:
  command: [sh, -i]
  environment:
    DISPLAY: $DISPLAY
  host-files:
  - /etc/resolv.conf
  - {path: /etc/hosts, optional: true}
artifacts:
- url: https://cache.example.com:11001
  push: true
source-caches: []
defaults:
  targets: [b.bst]
ref-storage: inline
source-provenance-attributes:
  homepage: the home page
"""


def test_keys_that_do_not_change_a_build_are_accepted(tmp_path: Path, cas: LocalCas) -> None:
    # Given a project.conf with bst-only settings and default targets
    root = write(
        tmp_path / "p",
        {
            "project.conf": CONF + IGNORED,
            "elements/a.bst": "kind: stack\n",
            "elements/b.bst": "kind: stack\n",
        },
    )
    plain = write(tmp_path / "q", {"project.conf": CONF, "elements/a.bst": "kind: stack\n"})
    # When loaded, Then they change no key, and the default targets are bst's
    with_keys = load_project(root, cas=cas)
    assert with_keys.default_targets() == ["b.bst"]
    assert (
        with_keys.load_targets(["a.bst"])[0].cache_key
        == load_project(plain, cas=cas).load_targets(["a.bst"])[0].cache_key
    )
    # And with no defaults, every element is a default target (as bst)
    root_all = write(tmp_path / "r", {"project.conf": CONF, "elements/x/a.bst": "kind: stack\n",
                                      "elements/b.bst": "kind: stack\n"})  # fmt: skip
    assert load_project(root_all, cas=cas).default_targets() == ["b.bst", "x/a.bst"]


def test_plan_with_no_targets_uses_the_default_targets(tmp_path: Path, cas: LocalCas) -> None:
    root = write(
        tmp_path / "p",
        {
            "project.conf": CONF + "defaults:\n  targets: [b.bst]\n",
            "elements/a.bst": "kind: stack\n",
            "elements/b.bst": "kind: stack\ndepends: [a.bst]\n",
        },
    )
    assert [e.name for e in api.plan(root, [], cas=cas)] == ["a.bst", "b.bst"]


@pytest.mark.parametrize(
    ("extra", "line", "field", "words"),
    [
        ("ref-storage: project.refs\n", 3, "ref-storage",
         "ref-storage 'project.refs' is not supported by remex"),
        ("ref-storage: elsewhere\n", 3, "ref-storage", "invalid ref-storage 'elsewhere'"),
        ("shell:\n  cmd: [sh]\n", 4, "shell.cmd", "unknown key in shell"),
        ("artifacts:\n  url: x\n", 3, "artifacts", "expected a list of remotes"),
        ("source-caches:\n- push: true\n", 4, "source-caches[0].url", "missing required key"),
        ("defaults:\n  target: [a.bst]\n", 4, "defaults.target", "unknown key in defaults"),
        ("mirrors:\n- name: m\n  kind: gitlab\n", 5, "mirrors[0].kind", "a BuildStream plugin"),
        ("mirrors:\n- aliases: {}\n", 4, "mirrors[0].name", "missing required key 'name'"),
        ("mirrors:\n- name: m\n  aliases:\n    foo: x\n", 6, "mirrors[0].aliases.foo",
         "expected a list of URL prefixes for alias 'foo'"),
        ("mirrors:\n- name: m\n  aliases: {}\n- name: m\n  aliases: {}\n", 6,
         "mirrors[1].name", "a mirror named 'm' is already declared"),
        ("mirrors:\n- name: m\n  url: x\n  aliases: {}\n", 5, "mirrors[0].url", "unknown key"),
        ("default-mirror: x\n", 3, "default-mirror", "[fetch] default-mirror in remex.toml"),
        ("remote-execution: {}\n", 3, "remote-execution", "user configuration"),
    ],
)  # fmt: skip
def test_project_keys_shapes_and_refusals(
    tmp_path: Path, cas: LocalCas, extra: str, line: int, field: str, words: str
) -> None:
    root = write(tmp_path / "p", {"project.conf": CONF + extra, "elements/a.bst": "kind: stack\n"})
    with pytest.raises(LoadError) as info:
        load_project(root, cas=cas)
    assert (info.value.file, info.value.line, info.value.field) == ("project.conf", line, field)
    assert words in info.value.reason
