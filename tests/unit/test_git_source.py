"""git sources: network URLs, refs, submodule settings and keys (no network)."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from pipeline.cas import LocalCas, checkout
from pipeline.elements import GitSource, LoadError, load_project
from pipeline.elements.sources import source_cache_key
from pipeline.elements.sources.git import is_network_git_url
from pipeline.elements.sources.git_mirror import mirror_path, redact, resolve_relative_url
from pipeline.elements.sources.helpers import loading_for_tracking

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONF = "name: g\nelement-path: elements\naliases:\n  up: https://git.example.com/\n"


def load(tmp_path: Path, source: str) -> GitSource:
    root = tmp_path / "p"
    (root / "elements").mkdir(parents=True, exist_ok=True)
    (root / "project.conf").write_text(CONF)
    (root / "elements" / "e.bst").write_text(
        "kind: import\nsources:\n- kind: git\n" + textwrap.indent(textwrap.dedent(source), "  ")
    )
    element = load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(["e.bst"])[0]
    assert isinstance(element.sources[0], GitSource)
    return element.sources[0]


def load_error(tmp_path: Path, source: str) -> LoadError:
    with pytest.raises(LoadError) as info:
        load(tmp_path, source)
    return info.value


@pytest.mark.parametrize(
    ("url", "network"),
    [
        ("https://h/r.git", True),
        ("git://h/r.git", True),
        ("ssh://git@h/r.git", True),
        ("git@h:group/r.git", True),
        ("h:r.git", True),
        ("file:///srv/r.git", True),
        ("/srv/r.git", False),
        ("repo", False),
        ("./a:b", False),
    ],
)
def test_which_urls_git_fetches(url: str, network: bool) -> None:
    assert is_network_git_url(url) is network


def test_an_alias_url_is_keyed_as_written_and_fetched_as_resolved(tmp_path: Path) -> None:
    # Given a source through an alias with a git-describe ref
    source = load(tmp_path, f"url: up:app.git\nref: v2.1-4-g{COMMIT}\n")

    # Then its request tries the alias's URL, keyed by the URL as written and the commit
    request = source.fetch_request("e.bst", 0, "elements/e.bst")
    assert request is not None
    assert request["urls"] == ["https://git.example.com/app.git"]
    assert request["key"] == source_cache_key("git", ["up:app.git", COMMIT])
    assert request["config"]["commit"] == COMMIT
    assert (request["field"], request["file"]) == ("sources[0]", "elements/e.bst")
    # And the element key's part is the commit alone, as before submodules existed
    assert source.content_key() == COMMIT


def test_an_ssh_url_is_accepted_and_passed_to_git(tmp_path: Path) -> None:
    source = load(tmp_path, f"url: git@git.example.com:team/app.git\nref: {COMMIT}\n")
    request = source.fetch_request("e.bst", 0, "elements/e.bst")
    assert request is not None and request["urls"] == ["git@git.example.com:team/app.git"]


def test_submodule_settings_enter_the_keys_as_buildstream_plugins_keys_them(
    tmp_path: Path,
) -> None:
    source = load(
        tmp_path,
        f"""\
        url: up:app.git
        ref: {COMMIT}
        checkout-submodules: false
        submodules:
          lib/one:
            url: up:one.git
          lib/two:
            checkout: true
        """,
    )
    assert source.unique_key() == [
        "up:app.git", COMMIT, {"checkout_submodules": False},
        {"lib/one": "up:one.git", "lib/two": None},
        {"submodule_checkout_overrides": {"lib/two": True}},
    ]  # fmt: skip
    assert source.content_key() != COMMIT
    config = source.fetch_request("e", 0, "f")["config"]  # type: ignore[index]
    assert config["submodules"]["lib/one"]["urls"] == ["https://git.example.com/one.git"]
    assert config["aliases"] == {"up": ["https://git.example.com/"]}


@pytest.mark.parametrize(
    ("source", "line", "field", "words"),
    [
        (f"url: up:a\nref: {COMMIT}\nref-format: short\n", 6, "sources[0].ref-format",
         "ref-format must be one of sha1, git-describe, got 'short'"),
        (f"url: up:a\nref: {COMMIT}\ncheckout-submodules: maybe\n", 6,
         "sources[0].checkout-submodules", "expected a boolean"),
        (f"url: up:a\nref: {COMMIT}\nsubmodules:\n  x:\n    branch: b\n", 8,
         "sources[0].submodules.x.branch", "expected one of: checkout, url"),
        (f"url: up:a\nref: {COMMIT}\ntags:\n- tag: v1\n", 7, "sources[0].tags[0].commit",
         "missing required key 'commit'"),
        (f"url: up:a\nref: {COMMIT}\ntags:\n- {{tag: v1, commit: {COMMIT}}}\n", 7,
         "sources[0].tags[0].annotated", "missing required key 'annotated'"),
        ("url: gopher://h/a\nref: x\n", 4, "sources[0].url", "scheme 'gopher'"),
        ("url: up:a\nref: abc123\n", 5, "sources[0].ref", "expected a full commit id"),
        ("url: up:a\ntrack: main\n", 3, "sources[0].ref", "missing required key 'ref'"),
    ],
)  # fmt: skip
def test_bad_git_sources_name_file_line_and_field(
    tmp_path: Path, source: str, line: int, field: str, words: str
) -> None:
    error = load_error(tmp_path, source)
    assert (error.file, error.line, error.field) == ("elements/e.bst", line, field), error
    assert words in error.reason


def test_while_tracking_a_source_with_track_may_have_no_ref(tmp_path: Path) -> None:
    with loading_for_tracking():
        source = load(tmp_path, "url: up:a.git\ntrack: main\n")
        # A source with neither can never be resolved: still an error
        assert "missing required key 'ref'" in load_error(tmp_path / "q", "url: up:a\n").reason
    assert source.commit is None and source.track_name == "main"
    assert source.fetch_request("e", 0, "f") is None


@pytest.mark.parametrize(
    ("base", "relative", "resolved"),
    [
        ("https://h/group/app.git", "../lib.git", "https://h/group/lib.git"),
        ("https://h/app.git", "../lib.git", "https://h/lib.git"),
        ("https://h/app", "./lib", "https://h/app/lib"),
        ("git@h:group/app.git", "../lib.git", "git@h:group/lib.git"),
        ("git@h:app.git", "../lib.git", "git@h:lib.git"),
        ("/srv/git/app", "../lib", "/srv/git/lib"),
        ("https://h/group/app.git", "https://other/lib.git", "https://other/lib.git"),
    ],
)
def test_relative_submodule_urls_resolve_as_git_resolves_them(
    base: str, relative: str, resolved: str
) -> None:
    assert resolve_relative_url(base, relative) == resolved


def test_mirrors_are_named_by_url_and_credentials_never_shown(tmp_path: Path) -> None:
    assert mirror_path(tmp_path, "https://h/a.git") != mirror_path(tmp_path, "https://h/b.git")
    assert mirror_path(tmp_path, "https://h/a.git").parent == tmp_path / "git"
    assert redact("https://user:secret@h/a.git: failed") == "https://h/a.git: failed"


def run_git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@example.com",
         "-c", "commit.gpgsign=false", "-C", str(repo), *args],
        check=True, capture_output=True, text=True, env=env,
    ).stdout.strip()  # fmt: skip


def make_repo(path: Path, files: dict[str, str], gitlinks: dict[str, str] | None = None) -> str:
    path.mkdir(parents=True)
    run_git(path, "init", "-q", "-b", "main")
    for name, text in files.items():
        (path / name).write_text(text)
    run_git(path, "add", "-A")
    for sub_path, commit in (gitlinks or {}).items():
        run_git(path, "update-index", "--add", "--cacheinfo", f"160000,{commit},{sub_path}")
    run_git(path, "commit", "-q", "-m", "c")
    return run_git(path, "rev-parse", "HEAD")


def test_a_local_repository_stages_its_submodules_with_the_same_code(tmp_path: Path) -> None:
    # Given a local repository (a path, staged by the submitter) whose submodules
    # are a relative path and a URL through a project alias (file:// here)
    repos = tmp_path / "repos"
    one = make_repo(repos / "one", {"one.txt": "1\n"})
    two = make_repo(repos / "two", {"two.txt": "2\n"})
    modules = (
        '[submodule "a"]\n\tpath = a\n\turl = ../one\n'
        '[submodule "b"]\n\tpath = lib/b\n\turl = mine:two\n'
    )
    top = make_repo(repos / "top", {".gitmodules": modules}, {"a": one, "lib/b": two})
    root = tmp_path / "p"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text(
        f"name: g\nelement-path: elements\naliases:\n  mine: file://{repos}/\n"
    )
    (root / "elements" / "e.bst").write_text(
        f"kind: import\nsources:\n- kind: git\n  url: {repos / 'top'}\n  ref: {top}\n"
    )
    cas = LocalCas(tmp_path / "cas")
    source = load_project(root, cas=cas).load_targets(["e.bst"])[0].sources[0]
    assert isinstance(source, GitSource)
    assert source.fetch_request("e", 0, "f") is None  # the submitter stages it

    # When it is staged
    checkout(cas, source.stage(cas, tmp_path / "scratch"), tmp_path / "out")

    # Then both submodules are in the tree at their gitlink commits
    assert (tmp_path / "out" / "a" / "one.txt").read_text() == "1\n"
    assert (tmp_path / "out" / "lib" / "b" / "two.txt").read_text() == "2\n"


def test_a_relative_submodule_url_override_resolves_against_the_superproject(
    tmp_path: Path,
) -> None:
    # Given .gitmodules pointing nowhere useful, and the source's override relative
    repos = tmp_path / "repos"
    two = make_repo(repos / "two", {"two.txt": "2\n"})
    modules = '[submodule "b"]\n\tpath = lib/b\n\turl = https://gone.invalid/two.git\n'
    top = make_repo(repos / "top", {".gitmodules": modules}, {"lib/b": two})
    root = tmp_path / "p"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text("name: g\nelement-path: elements\n")
    (root / "elements" / "e.bst").write_text(
        f"kind: import\nsources:\n- kind: git\n  url: file://{repos / 'top'}\n  ref: {top}\n"
        "  submodules:\n    lib/b:\n      url: ../two\n"
    )
    cas = LocalCas(tmp_path / "cas")
    source = load_project(root, cas=cas).load_targets(["e.bst"])[0].sources[0]
    # When it is staged, Then the override, resolved like a .gitmodules URL, was used
    checkout(cas, source.stage(cas, tmp_path / "scratch"), tmp_path / "out")
    assert (tmp_path / "out" / "lib" / "b" / "two.txt").read_text() == "2\n"


def test_a_repository_by_relative_path_resolves_its_relative_submodules(tmp_path: Path) -> None:
    # Given a repository inside the project, written as a relative path
    root = tmp_path / "p"
    one = make_repo(root / "repos" / "one", {"one.txt": "1\n"})
    modules = '[submodule "a"]\n\tpath = a\n\turl = ../one\n'
    top = make_repo(root / "repos" / "top", {".gitmodules": modules}, {"a": one})
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text("name: g\nelement-path: elements\n")
    (root / "elements" / "e.bst").write_text(
        f"kind: import\nsources:\n- kind: git\n  url: repos/top\n  ref: {top}\n"
    )
    cas = LocalCas(tmp_path / "cas")
    source = load_project(root, cas=cas).load_targets(["e.bst"])[0].sources[0]
    assert isinstance(source, GitSource) and source.unique_key() == ["repos/top", top]
    checkout(cas, source.stage(cas, tmp_path / "scratch"), tmp_path / "out")
    assert (tmp_path / "out" / "a" / "one.txt").read_text() == "1\n"
