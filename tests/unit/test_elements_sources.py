"""Sources: local, tar and git; checked at load, staged safely into the local CAS."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import textwrap
from pathlib import Path

import pytest

from pipeline.cas import LocalCas, import_directory, iter_tree
from pipeline.digest import Digest
from pipeline.elements import (
    Element,
    GitSource,
    LoadError,
    LocalSource,
    SourceError,
    TarSource,
    load_project,
)
from pipeline.elements.sources import source_cache_key

CONF = "name: src\nelement-path: elements\n"


@pytest.fixture
def cas(tmp_path: Path) -> LocalCas:
    return LocalCas(tmp_path / "cas")


def write_project(
    root: Path, element: str, conf: str = CONF, files: dict[str, str] | None = None
) -> Path:
    for relative, text in {
        "project.conf": conf,
        "elements/e.bst": element,
        **(files or {}),
    }.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def load(root: Path, cas: LocalCas) -> Element:
    return load_project(root, cas=cas).load_targets(["e.bst"])[0]


def load_error(root: Path, cas: LocalCas) -> LoadError:
    with pytest.raises(LoadError) as info:
        load(root, cas)
    return info.value


def tree_listing(cas: LocalCas, root: Digest) -> dict[str, tuple[str, object]]:
    """Every entry of a tree: path -> (kind, content or target or executable)."""
    listing: dict[str, tuple[str, object]] = {}
    for path, directory in iter_tree(cas, root):
        prefix = f"{path}/" if path else ""
        for f in directory.files:
            listing[prefix + f.name] = ("file", (cas.get(f.digest), f.is_executable))
        for s in directory.symlinks:
            listing[prefix + s.name] = ("symlink", s.target)
        for d in directory.directories:
            listing[prefix + d.name] = ("dir", None)
    return listing


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --- local ---------------------------------------------------------------------------


def test_local_source_keys_and_stages_its_tree(tmp_path: Path, cas: LocalCas) -> None:
    # Given a local source folder
    root = write_project(
        tmp_path / "p",
        "kind: import\nsources:\n- kind: local\n  path: files\n  directory: sub\n",
        files={"files/a.txt": "a\n", "files/d/b.txt": "b\n"},
    )

    # When the element is loaded and its source staged
    element = load(root, cas)
    source = element.sources[0]
    digest = source.stage(cas, tmp_path / "work")

    # Then the digest is the folder's tree, and the key names it
    assert isinstance(source, LocalSource)
    assert digest == import_directory(cas, root / "files")
    assert source.content_key() == f"{digest.hash}/{digest.size_bytes}"
    assert source.directory == "sub"


def test_local_source_single_file_is_staged_under_its_name(tmp_path: Path, cas: LocalCas) -> None:
    root = write_project(
        tmp_path / "p",
        "kind: import\nsources:\n- kind: local\n  path: files/tool.sh\n",
        files={"files/tool.sh": "#!/bin/sh\n"},
    )
    (root / "files/tool.sh").chmod(0o755)
    digest = load(root, cas).sources[0].stage(cas, tmp_path)
    assert tree_listing(cas, digest) == {"tool.sh": ("file", (b"#!/bin/sh\n", True))}


def test_local_source_changed_after_load_is_refused(tmp_path: Path, cas: LocalCas) -> None:
    root = write_project(
        tmp_path / "p",
        "kind: import\nsources:\n- kind: local\n  path: files\n",
        files={"files/a.txt": "a\n"},
    )
    element = load(root, cas)
    (root / "files/a.txt").write_text("changed\n")
    with pytest.raises(SourceError) as info:
        element.sources[0].stage(cas, tmp_path)
    assert (info.value.file, info.value.line, info.value.field) == (
        "elements/e.bst",
        3,
        "sources[0]",
    )
    assert "changed since the project was loaded" in str(info.value)


def test_missing_local_path_names_file_line_and_field(tmp_path: Path, cas: LocalCas) -> None:
    # Given a local source whose path does not exist
    root = write_project(tmp_path / "p", "kind: import\nsources:\n- kind: local\n  path: nope\n")

    # Then loading fails at the path field
    error = load_error(root, cas)
    assert str(error) == (
        "elements/e.bst:4: sources[0].path: path 'nope' does not exist in the project folder"
    )


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/etc", "must be relative"),
        ("../outside", "must not start with '..'"),
        ("files/../../outside", "leads outside the project folder"),
        ("link", "must not be a symlink"),
    ],
)
def test_local_path_must_stay_in_the_project(
    tmp_path: Path, cas: LocalCas, path: str, words: str
) -> None:
    (tmp_path / "outside").mkdir()
    root = write_project(
        tmp_path / "p",
        f"kind: import\nsources:\n- kind: local\n  path: {path}\n",
        files={"files/a": "a\n"},
    )
    (root / "link").symlink_to(tmp_path / "outside")
    error = load_error(root, cas)
    assert (error.file, error.line, error.field) == ("elements/e.bst", 4, "sources[0].path")
    assert words in error.reason


def test_unknown_source_kind_and_key(tmp_path: Path, cas: LocalCas) -> None:
    root = write_project(tmp_path / "a", "kind: import\nsources:\n- kind: svn\n  url: x\n")
    assert str(load_error(root, cas)) == (
        "elements/e.bst:3: sources[0].kind: unknown source kind 'svn' "
        "(remex supports local, tar, git, zip, remote, patch)"
    )
    root = write_project(
        tmp_path / "b", "kind: import\nsources:\n- kind: local\n  path: .\n  patch: x\n"
    )
    assert load_error(root, cas).field == "sources[0].patch"


def test_source_directory_must_stay_inside(tmp_path: Path, cas: LocalCas) -> None:
    root = write_project(
        tmp_path / "p",
        "kind: import\nsources:\n- kind: local\n  path: files\n  directory: ../up\n",
        files={"files/a": "a\n"},
    )
    error = load_error(root, cas)
    assert (error.line, error.field) == (5, "sources[0].directory")


# --- tar -----------------------------------------------------------------------------


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    """Write a tar.gz of the members; return its sha256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def member(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    return info


def tar_element(url: str, ref: str, extra: str = "") -> str:
    return f"kind: import\nsources:\n- kind: tar\n  url: {url}\n  ref: {ref}\n{extra}"


def good_tarball(path: Path) -> str:
    return make_tar(
        path,
        [
            (member("hello-1.0/", tarfile.DIRTYPE, 0o755), None),
            (member("hello-1.0/README"), b"read me\n"),
            (member("hello-1.0/bin/tool", mode=0o755), b"#!/bin/sh\n"),
            (member("hello-1.0/bin/alias", tarfile.SYMTYPE, link="tool"), None),
            (member("hello-1.0/bin/hard", tarfile.LNKTYPE, link="hello-1.0/bin/tool"), None),
            (member("hello-1.0/empty/", tarfile.DIRTYPE, 0o755), None),
        ],
    )


def test_tar_source_strips_the_top_folder_by_default(tmp_path: Path, cas: LocalCas) -> None:
    # Given a release-style tarball with one top folder
    tarball = tmp_path / "hello.tar.gz"
    sha = good_tarball(tarball)
    root = write_project(tmp_path / "p", tar_element(f"file://{tarball}", sha))

    # When it is loaded and staged
    source = load(root, cas).sources[0]
    digest = source.stage(cas, tmp_path / "work")

    # Then base-dir '*' stripped the top folder; modes, symlinks, hard links kept
    assert isinstance(source, TarSource)
    assert source.base_dir == "*"
    assert tree_listing(cas, digest) == {
        "README": ("file", (b"read me\n", False)),
        "bin": ("dir", None),
        "bin/tool": ("file", (b"#!/bin/sh\n", True)),
        "bin/hard": ("file", (b"#!/bin/sh\n", True)),
        "bin/alias": ("symlink", "tool"),
        "empty": ("dir", None),
    }
    assert source.content_key() == f'["{sha}", "*"]'


def test_tar_base_dir_empty_keeps_everything(tmp_path: Path, cas: LocalCas) -> None:
    tarball = tmp_path / "hello.tar.gz"
    sha = good_tarball(tarball)
    root = write_project(tmp_path / "p", tar_element(f"file://{tarball}", sha, "  base-dir: ''\n"))
    digest = load(root, cas).sources[0].stage(cas, tmp_path)
    assert "hello-1.0/bin/tool" in tree_listing(cas, digest)


def test_tar_url_through_an_alias(tmp_path: Path, cas: LocalCas) -> None:
    tarball = tmp_path / "mirror" / "hello.tar.gz"
    tarball.parent.mkdir()
    sha = good_tarball(tarball)
    conf = CONF + f"aliases:\n  upstream: file://{tmp_path}/mirror/\n"
    root = write_project(tmp_path / "p", tar_element("upstream:hello.tar.gz", sha), conf)
    source = load(root, cas).sources[0]
    assert isinstance(source, TarSource)
    assert source.path == tarball


def test_tar_sha256_mismatch_names_file_line_field_and_both_hashes(
    tmp_path: Path, cas: LocalCas
) -> None:
    # Given a tarball whose ref is another hash
    tarball = tmp_path / "hello.tar.gz"
    actual = good_tarball(tarball)
    wrong = "0" * 64
    root = write_project(tmp_path / "p", tar_element(f"file://{tarball}", wrong))

    # Then loading fails at the ref, showing both hashes
    error = load_error(root, cas)
    assert (error.file, error.line, error.field) == ("elements/e.bst", 5, "sources[0].ref")
    assert wrong in str(error) and actual in str(error)
    assert "sha256 mismatch" in str(error)


def test_tar_other_schemes_are_refused(tmp_path: Path, cas: LocalCas) -> None:
    root = write_project(tmp_path / "p", tar_element("gopher://example.com/x.tar.gz", "0" * 64))
    error = load_error(root, cas)
    assert (error.line, error.field) == (4, "sources[0].url")
    assert "only file://, http(s):// and ftp:// URLs (directly or through a project" in error.reason


def test_a_network_tar_loads_keyed_by_its_ref_and_is_left_to_a_worker(
    tmp_path: Path, cas: LocalCas
) -> None:
    # Given a tarball by https URL through an alias (as real projects have)
    conf = CONF + "aliases:\n  up: https://example.com/\n"
    root = write_project(tmp_path / "p", tar_element("up:x.tar.gz", "a" * 64), conf)
    # When the project loads, then its key comes from the ref, as in bst
    [element] = load_project(root, cas=cas).load_targets(["e.bst"])
    source = element.sources[0]
    assert json.loads(source.content_key())[0] == "a" * 64
    # And a worker fetches it: the request names the candidates and is keyed by
    # the URL as written (not what the alias points at), the ref and base-dir
    request = source.fetch_request("e.bst", 0, "elements/e.bst")
    assert request is not None
    assert request["urls"] == ["https://example.com/x.tar.gz"]
    assert request["key"] == source_cache_key("tar", ["up:x.tar.gz", "a" * 64, "*"])
    assert request["config"] == {"ref": "a" * 64, "base-dir": "*"}
    assert (request["element"], request["index"], request["field"]) == ("e.bst", 0, "sources[0]")


def test_tar_missing_file_and_missing_ref(tmp_path: Path, cas: LocalCas) -> None:
    root = write_project(tmp_path / "a", tar_element(f"file://{tmp_path}/none.tar", "0" * 64))
    assert load_error(root, cas).field == "sources[0].url"
    root = write_project(
        tmp_path / "b", f"kind: import\nsources:\n- kind: tar\n  url: file://{tmp_path}/x.tar\n"
    )
    error = load_error(root, cas)
    assert error.field == "sources[0].ref"
    assert "missing required key 'ref'" in error.reason


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([(member("../evil"), b"x")], "'..' component"),
        ([(member("ok/../../evil"), b"x")], "'..' component"),
        ([(member("/etc/evil"), b"x")], "absolute path"),
        (
            [(member("link", tarfile.SYMTYPE, link="/tmp"), None), (member("link/evil"), b"x")],
            "goes through 'link', which is a symlink",
        ),
        (
            [(member("up", tarfile.SYMTYPE, link="../.."), None)],
            "points outside the tree",
        ),
        ([(member("dev", tarfile.CHRTYPE), None)], "device, fifo"),
        ([(member("fifo", tarfile.FIFOTYPE), None)], "device, fifo"),
        ([(member("hard", tarfile.LNKTYPE, link="/etc/passwd"), None)], "absolute path"),
        ([(member("hard", tarfile.LNKTYPE, link="missing"), None)], "hard link"),
    ],
)
def test_hostile_tarballs_are_refused_and_nothing_is_written(
    tmp_path: Path,
    cas: LocalCas,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    words: str,
) -> None:
    # Given a tarball with a hostile member (loading only checks its sha256)
    tarball = tmp_path / "evil.tar.gz"
    sha = make_tar(tarball, members)
    root = write_project(tmp_path / "p", tar_element(f"file://{tarball}", sha, "  base-dir: ''\n"))
    source = load(root, cas).sources[0]
    workdir = tmp_path / "work" / "deep"
    workdir.mkdir(parents=True)
    before = files_under(tmp_path)

    # When it is staged
    with pytest.raises(SourceError) as info:
        source.stage(cas, workdir)

    # Then it is refused, naming the element and member, and no file appeared
    assert words in str(info.value)
    assert info.value.file == "elements/e.bst"
    assert info.value.field == "sources[0]"
    after = {p for p in files_under(tmp_path) if not p.startswith("cas/")}
    assert after == {p for p in before if not p.startswith("cas/")}
    assert not (tmp_path / "evil").exists()


def test_tar_base_dir_glob_without_match_is_an_error(tmp_path: Path, cas: LocalCas) -> None:
    tarball = tmp_path / "hello.tar.gz"
    sha = good_tarball(tarball)
    root = write_project(
        tmp_path / "p", tar_element(f"file://{tarball}", sha, "  base-dir: 'other-*'\n")
    )
    with pytest.raises(SourceError, match="base-dir"):
        load(root, cas).sources[0].stage(cas, tmp_path)


def test_tar_default_base_dir_needs_a_folder(tmp_path: Path, cas: LocalCas) -> None:
    # Given a tarball of top-level files only: '*' matches folders, as in BuildStream
    tarball = tmp_path / "flat.tar.gz"
    sha = make_tar(tarball, [(member("a.txt"), b"a"), (member("b.txt"), b"b")])
    root = write_project(tmp_path / "p", tar_element(f"file://{tarball}", sha))
    with pytest.raises(SourceError, match="no folder of the archive matches base-dir"):
        load(root, cas).sources[0].stage(cas, tmp_path)


def test_tar_changed_after_load_is_refused(tmp_path: Path, cas: LocalCas) -> None:
    tarball = tmp_path / "hello.tar.gz"
    sha = good_tarball(tarball)
    root = write_project(tmp_path / "p", tar_element(f"file://{tarball}", sha))
    source = load(root, cas).sources[0]
    make_tar(tarball, [(member("x"), b"other")])
    with pytest.raises(SourceError, match="changed since the project was loaded"):
        source.stage(cas, tmp_path)


# --- git -----------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com",
         "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    )  # fmt: skip
    return result.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    """A git repository with a file, an executable, a symlink and export-ignore."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    (path / "src").mkdir()
    (path / "src" / "main.c").write_text("int main;\n")
    (path / "run.sh").write_text("#!/bin/sh\n")
    (path / "run.sh").chmod(0o755)
    (path / "link").symlink_to("src/main.c")
    (path / ".gitattributes").write_text("src export-ignore\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "first")
    return path, git(path, "rev-parse", "HEAD")


def git_element(url: str, ref: str) -> str:
    return f"kind: import\nsources:\n- kind: git\n  url: {url}\n  ref: {ref}\n  directory: code\n"


def test_git_source_stages_the_commit(
    tmp_path: Path, cas: LocalCas, repo: tuple[Path, str]
) -> None:
    # Given a commit of a local repository
    path, commit = repo
    root = write_project(tmp_path / "p", git_element(f"file://{path}", commit))

    # When it is loaded and staged (after the work tree changed)
    source = load(root, cas).sources[0]
    (path / "run.sh").write_text("uncommitted\n")
    digest = source.stage(cas, tmp_path / "work")

    # Then the commit's content is staged: exec bits, symlinks, and files that
    # `git archive` would drop for export-ignore
    assert isinstance(source, GitSource)
    assert source.content_key() == commit
    assert source.directory == "code"
    assert tree_listing(cas, digest) == {
        ".gitattributes": ("file", (b"src export-ignore\n", False)),
        "link": ("symlink", "src/main.c"),
        "run.sh": ("file", (b"#!/bin/sh\n", True)),
        "src": ("dir", None),
        "src/main.c": ("file", (b"int main;\n", False)),
    }


def test_git_url_may_be_a_relative_path_or_alias(
    tmp_path: Path, cas: LocalCas, repo: tuple[Path, str]
) -> None:
    path, commit = repo
    conf = CONF + f"aliases:\n  local: file://{path.parent}/\n"
    root = write_project(tmp_path / "p", git_element("local:repo", commit), conf)
    assert load(root, cas).sources[0].content_key() == commit
    root = write_project(tmp_path / "q", git_element("../repo", commit))
    assert load(root, cas).sources[0].content_key() == commit


def test_git_ref_not_in_repository_names_file_line_and_field(
    tmp_path: Path, cas: LocalCas, repo: tuple[Path, str]
) -> None:
    # Given a ref that is a well-formed commit id but not in the repository
    path, _ = repo
    missing = "1234567890abcdef1234567890abcdef12345678"
    root = write_project(tmp_path / "p", git_element(str(path), missing))

    # Then loading fails at the ref field
    error = load_error(root, cas)
    assert str(error) == (
        f"elements/e.bst:5: sources[0].ref: commit {missing} not found in git repository {path}"
    )


def test_git_ref_must_be_a_full_commit(
    tmp_path: Path, cas: LocalCas, repo: tuple[Path, str]
) -> None:
    path, commit = repo
    root = write_project(tmp_path / "p", git_element(str(path), commit[:12]))
    assert load_error(root, cas).field == "sources[0].ref"
    # BuildStream git's `git describe` form is accepted
    root = write_project(tmp_path / "q", git_element(str(path), f"v1.0-3-g{commit}"))
    assert load(root, cas).sources[0].content_key() == commit


def test_git_url_not_a_repository(tmp_path: Path, cas: LocalCas) -> None:
    (tmp_path / "plain").mkdir()
    root = write_project(tmp_path / "p", git_element(str(tmp_path / "plain"), "a" * 40))
    error = load_error(root, cas)
    assert (error.line, error.field) == (4, "sources[0].url")
    assert "not a git repository" in error.reason
    root = write_project(tmp_path / "q", git_element("gopher://example.com/x.git", "a" * 40))
    assert "git URL scheme 'gopher' is not supported" in load_error(root, cas).reason


def test_git_url_inside_another_repository_is_not_a_repository(
    tmp_path: Path, cas: LocalCas, repo: tuple[Path, str]
) -> None:
    # Given a plain folder inside a repository's work tree
    path, commit = repo
    (path / "plain").mkdir()

    # Then it is not taken for that repository
    root = write_project(tmp_path / "p", git_element(str(path / "plain"), commit))
    assert "not a git repository" in load_error(root, cas).reason
