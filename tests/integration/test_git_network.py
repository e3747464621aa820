"""git sources over the network: real loopback git servers (smart HTTP and git://).

Repositories are bare repositories under a served folder: ``sub.git`` (one
file, a nested submodule ``deep``), ``deep.git`` and ``super.git`` (a file, a
symlink, and ``ext/sub`` -> ``../sub.git``, relative as projects write it).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.cas import LocalCas, checkout
from pipeline.elements import GitSource, SourceError, load_project
from pipeline.elements.sources import FetchContext, FetchRequest, NetworkSettings
from pipeline.testing.gitserver import GitDaemon, GitHttpServer, closed_port
from tests.hello import file_tree


def git(repo: Path, *args: str, stdin: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    result = subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@example.com",
         "-c", "commit.gpgsign=false", "-C", str(repo), *args],
        check=True, capture_output=True, text=True, env=env, input=stdin,
    )  # fmt: skip
    return result.stdout.strip()


def commit_files(
    work: Path, files: dict[str, str], gitlinks: dict[str, str] | None = None, tag: str = ""
) -> str:
    """Commit ``files`` (and gitlinks path -> commit) in the work tree ``work``."""
    if not (work / ".git").exists():
        work.mkdir(parents=True, exist_ok=True)
        git(work, "init", "-q", "-b", "main")
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    git(work, "add", "-A")
    for path, commit in (gitlinks or {}).items():
        git(work, "update-index", "--add", "--cacheinfo", f"160000,{commit},{path}")
    git(work, "commit", "-q", "-m", "c")
    if tag:
        git(work, "tag", "-a", "-m", tag, tag)
    return git(work, "rev-parse", "HEAD")


def publish(work: Path, served: Path, name: str) -> None:
    bare = served / name
    if bare.exists():
        git(work, "push", "-q", "--force", "--tags", str(bare), "main")
    else:
        git(served, "clone", "-q", "--bare", str(work), name)


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The served folder and the commits: deep, sub, super."""
    root = tmp_path / "served"
    root.mkdir()
    work = tmp_path / "work"
    deep = commit_files(work / "deep", {"deep.txt": "deep\n"})
    publish(work / "deep", root, "deep.git")
    sub = commit_files(
        work / "sub",
        {"sub.txt": "sub\n", ".gitmodules": '[submodule "deep"]\n\tpath = deep\n'
         "\turl = ../deep.git\n"},
        {"deep": deep},
    )  # fmt: skip
    publish(work / "sub", root, "sub.git")
    (work / "super").mkdir(parents=True)
    (work / "super" / "link").symlink_to("top.txt")
    top = commit_files(
        work / "super",
        {"top.txt": "top\n", ".gitmodules": '[submodule "sub"]\n\tpath = ext/sub\n'
         "\turl = ../sub.git\n"},
        {"ext/sub": sub},
        tag="v1.0",
    )  # fmt: skip
    publish(work / "super", root, "super.git")
    return root, {"deep": deep, "sub": sub, "super": top}


def project(root: Path, url: str, source_extra: str = "", aliases: str = "") -> Path:
    conf = "name: gitnet\nelement-path: elements\n"
    if aliases:
        conf += f"aliases:\n{textwrap.indent(aliases, '  ')}"
    (root / "elements").mkdir(parents=True, exist_ok=True)
    (root / "project.conf").write_text(conf)
    (root / "elements" / "e.bst").write_text(
        f"kind: import\nsources:\n- kind: git\n  url: {url}\n" + source_extra
    )
    return root


def load_git(root: Path, cas: LocalCas) -> GitSource:
    element = load_project(root, cas=cas).load_targets(["e.bst"])[0]
    source = element.sources[0]
    assert isinstance(source, GitSource)
    return source


def fetch_ctx(tmp_path: Path, cas: LocalCas) -> FetchContext:
    work, cache = tmp_path / "fetch-work", tmp_path / "fetch-cache"
    work.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    return FetchContext(cas=cas, workdir=work, cache_dir=cache)


def staged_files(cas: LocalCas, request: FetchRequest, ctx: FetchContext, out: Path) -> dict:
    digest = GitSource.fetch(request, ctx)
    checkout(cas, digest, out)
    return file_tree(out)


def test_fetch_over_http_stages_the_commit_and_its_submodules(
    tmp_path: Path, served: tuple[Path, dict[str, str]]
) -> None:
    # Given a project whose git source is on a smart HTTP server, through an alias
    root, commits = served
    cas = LocalCas(tmp_path / "cas")
    with GitHttpServer(root) as server:
        source = load_git(
            project(tmp_path / "p", "srv:super.git", f"  ref: {commits['super']}\n",
                    aliases=f"srv: {server.url}/\n"),
            cas,
        )  # fmt: skip
        request = source.fetch_request("e.bst", 0, "elements/e.bst")
        assert request is not None
        assert request["urls"] == [f"{server.url}/super.git"]

        # When a worker fetches it
        ctx = fetch_ctx(tmp_path, cas)
        reported: list[tuple[int, int | None]] = []
        ctx.progress = lambda done, total: reported.append((done, total))
        tree = staged_files(cas, request, ctx, tmp_path / "out")

        # Then the commit is staged with its submodule and the nested one, recursively
        assert {path for path, entry in tree.items() if entry[0] != "dir"} == {
            ".gitmodules", "top.txt", "link", "ext/sub/.gitmodules", "ext/sub/sub.txt",
            "ext/sub/deep/deep.txt",
        }  # fmt: skip
        assert (tmp_path / "out" / "ext/sub/deep/deep.txt").read_text() == "deep\n"
        assert os.readlink(tmp_path / "out" / "link") == "top.txt"
        # And each repository has its own bare mirror under the cache, named by URL
        mirror = ctx.cache_dir / "git" / hashlib.sha256(request["urls"][0].encode()).hexdigest()
        assert (mirror / "HEAD").is_file()
        assert len(list((ctx.cache_dir / "git").glob("*.lock"))) == 3
        # And the bytes received were reported as they came (Flower's progress)
        assert reported and all(total is None for _, total in reported)
        assert max(done for done, _ in reported) > 0
        fetched = {name: server.fetches(name) for name in ("super.git", "sub.git", "deep.git")}
        assert all(fetched.values()), fetched

        # And a second fetch on the same host finds every commit in its mirrors
        again = GitSource.fetch(request, ctx)
        assert {name: server.fetches(name) for name in fetched} == fetched
        # And a host with an empty cache stages the same tree
        assert again == GitSource.fetch(request, fetch_ctx(tmp_path / "fresh", cas))


def test_checkout_false_leaves_the_submodule_folder_empty(
    tmp_path: Path, served: tuple[Path, dict[str, str]]
) -> None:
    root, commits = served
    cas = LocalCas(tmp_path / "cas")
    with GitHttpServer(root) as server:
        # Given the submodule turned off by path, and checkout-submodules off elsewhere
        off = load_git(
            project(tmp_path / "p", f"{server.url}/super.git",
                    f"  ref: {commits['super']}\n  submodules:\n    ext/sub:\n"
                    "      checkout: false\n"),
            cas,
        )  # fmt: skip
        none = load_git(
            project(tmp_path / "q", f"{server.url}/super.git",
                    f"  ref: {commits['super']}\n  checkout-submodules: false\n"),
            cas,
        )  # fmt: skip
        deep_off = load_git(
            project(tmp_path / "r", f"{server.url}/super.git",
                    f"  ref: {commits['super']}\n  submodules:\n    ext/sub/deep:\n"
                    "      checkout: false\n"),
            cas,
        )  # fmt: skip
        trees = {}
        for name, source in (("off", off), ("none", none), ("deep_off", deep_off)):
            request = source.fetch_request("e.bst", 0, "elements/e.bst")
            assert request is not None
            trees[name] = staged_files(cas, request, fetch_ctx(tmp_path, cas), tmp_path / name)

    # Then the gitlink is an empty folder
    assert trees["off"]["ext/sub"] == ("dir", None) or trees["off"]["ext/sub"][0] == "dir"
    assert not [p for p in trees["off"] if p.startswith("ext/sub/")]
    assert trees["none"] == trees["off"]
    # And a nested path turns off only the nested submodule
    assert "ext/sub/sub.txt" in trees["deep_off"]
    assert not [p for p in trees["deep_off"] if p.startswith("ext/sub/deep/")]
    # And the settings are in the keys as buildstream-plugins keys them
    assert off.unique_key()[2:] == [{"ext/sub": None}, {"submodule_checkout_overrides":
                                    {"ext/sub": False}}]  # fmt: skip
    assert none.unique_key()[2:] == [{"checkout_submodules": False}]
    keys = {s.fetch_request("e", 0, "f")["key"] for s in (off, none, deep_off)}  # type: ignore[index]
    assert len(keys) == 3


def test_submodule_url_override_through_an_alias(
    tmp_path: Path, served: tuple[Path, dict[str, str]]
) -> None:
    # Given the submodule's URL replaced by one through an alias, on another server
    root, commits = served
    cas = LocalCas(tmp_path / "cas")
    other = tmp_path / "other"
    other.mkdir()
    git(other, "clone", "-q", "--bare", str(root / "sub.git"), "renamed.git")
    git(other, "clone", "-q", "--bare", str(root / "deep.git"), "deep.git")
    with GitHttpServer(root) as server, GitDaemon(other) as daemon:
        source = load_git(
            project(tmp_path / "p", f"{server.url}/super.git",
                    f"  ref: {commits['super']}\n  submodules:\n    ext/sub:\n"
                    "      url: mine:renamed.git\n", aliases=f"mine: {daemon.url}/\n"),
            cas,
        )  # fmt: skip
        request = source.fetch_request("e.bst", 0, "elements/e.bst")
        assert request is not None
        tree = staged_files(cas, request, fetch_ctx(tmp_path, cas), tmp_path / "out")

    # Then the submodule comes from the override (git://), and its own relative
    # submodule is resolved against that URL
    assert "ext/sub/sub.txt" in tree
    assert "ext/sub/deep/deep.txt" in tree
    assert server.fetches("sub.git") == 0


def test_git_protocol_and_a_describe_ref(
    tmp_path: Path, served: tuple[Path, dict[str, str]]
) -> None:
    # Given the repository on `git daemon` and a ref in git-describe form
    root, commits = served
    cas = LocalCas(tmp_path / "cas")
    with GitDaemon(root) as daemon:
        source = load_git(
            project(tmp_path / "p", f"{daemon.url}/super.git",
                    f"  ref: v1.0-0-g{commits['super']}\n  checkout-submodules: false\n"),
            cas,
        )  # fmt: skip
        # When it is staged on the submitting host (a junction would do that)
        digest = source.stage(cas, tmp_path / "scratch")
    checkout(cas, digest, tmp_path / "out")

    # Then the commit is staged, and keyed by its commit alone
    assert (tmp_path / "out" / "top.txt").read_text() == "top\n"
    assert source.unique_key()[:2] == [f"{daemon.url}/super.git", commits["super"]]


def test_failover_to_the_next_url_when_the_first_is_down(
    tmp_path: Path, served: tuple[Path, dict[str, str]]
) -> None:
    root, commits = served
    cas = LocalCas(tmp_path / "cas")
    down = f"http://127.0.0.1:{closed_port()}/super.git"
    with GitHttpServer(root) as server:
        source = load_git(
            project(tmp_path / "p", f"{server.url}/super.git",
                    f"  ref: {commits['super']}\n  checkout-submodules: false\n"),
            cas,
        )  # fmt: skip
        request = source.fetch_request("e.bst", 0, "elements/e.bst")
        assert request is not None
        # Given a first candidate that refuses connections (as a dead mirror would)
        request["urls"] = [down, *request["urls"]]
        tree = staged_files(cas, request, fetch_ctx(tmp_path, cas), tmp_path / "out")
        assert "top.txt" in tree
        assert server.fetches("super.git") >= 1

        # And a commit no candidate has is a permanent error naming the URLs
        request["config"]["commit"] = "0" * 40
        with pytest.raises(SourceError) as info:
            GitSource.fetch(request, fetch_ctx(tmp_path, cas))
    message = str(info.value)
    assert "e.bst: sources[0]" in message
    assert down in message and f"{server.url}/super.git" in message
    assert "the commit is not there" in message
    # Both URLs fail, the first one for a network reason: worth retrying later
    assert info.value.transient


def test_a_missing_commit_on_a_live_server_is_permanent(
    tmp_path: Path, served: tuple[Path, dict[str, str]]
) -> None:
    root, _ = served
    cas = LocalCas(tmp_path / "cas")
    with GitHttpServer(root) as server:
        source = load_git(
            project(tmp_path / "p", f"{server.url}/super.git", f"  ref: {'1' * 40}\n"), cas
        )
        request = source.fetch_request("e.bst", 0, "elements/e.bst")
        assert request is not None
        with pytest.raises(SourceError) as info:
            GitSource.fetch(request, fetch_ctx(tmp_path, cas))
    assert not info.value.transient
    assert f"cannot fetch commit {'1' * 40} of repository" in str(info.value)


def remex(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "REMEX_"))}
    env.update(REMEX_CAS_DIR=str(home / "cas"), XDG_CACHE_HOME=str(home / "cache"))
    remex_bin = Path(sys.executable).with_name("remex")
    return subprocess.run(
        [str(remex_bin), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_source_track_writes_the_refs_and_keeps_the_files_otherwise(
    tmp_path: Path, served: tuple[Path, dict[str, str]]
) -> None:
    root, commits = served
    with GitHttpServer(root) as server:
        # Given elements that track a branch and a tag, without refs, with comments
        proj = project(tmp_path / "p", "srv:super.git", aliases=f"srv: {server.url}/\n")
        app = (
            "# The application.\n"
            "kind: import\n"
            "depends:\n- lib.bst  # the library\n"
            "sources:\n"
            "- kind: git  # upstream\n"
            "  url: srv:super.git   # via the alias\n"
            "  track: main\n"
            "  checkout-submodules: false\n"
            "\n"
            "# end\n"
        )
        lib = (
            "kind: import\n"
            "sources:\n"
            "- kind: git\n"
            "  url: srv:super.git\n"
            "  track: v1.0\n"
            "  ref-format: git-describe\n"
            '  ref: "stale-1-g{}"  # old\n'.format("a" * 40)
        )
        (proj / "elements" / "e.bst").write_text(app)
        (proj / "elements" / "lib.bst").write_text(lib)

        # When `remex source track --deps all` runs
        result = remex("source", "track", "-C", str(proj), "--deps", "all", "e.bst",
                       home=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr

        # Then each ref is written, and nothing else in the files changed
        top = commits["super"]
        assert (proj / "elements" / "e.bst").read_text() == app.replace(
            "  checkout-submodules: false\n", f"  checkout-submodules: false\n  ref: {top}\n"
        )
        assert (proj / "elements" / "lib.bst").read_text() == lib.replace(
            f"stale-1-g{'a' * 40}", f"v1.0-0-g{top}"
        )
        assert result.stdout.splitlines() == [
            f"elements/lib.bst:7: lib.bst: sources[0]: ref stale-1-g{'a' * 40} -> v1.0-0-g{top}",
            f"elements/e.bst:10: e.bst: sources[0]: ref (none) -> {top}",
            "2 ref(s) changed",
        ]

        # And the project now loads and stages with those refs
        cas = LocalCas(tmp_path / "cas2")
        staged = load_git(proj, cas).stage(cas, tmp_path / "scratch")
        checkout(cas, staged, tmp_path / "out")
        assert (tmp_path / "out" / "top.txt").read_text() == "top\n"

        # When main moves on, tracking again changes only e.bst's ref
        work = tmp_path / "work" / "super"
        newer = commit_files(work, {"top.txt": "newer\n"})
        publish(work, root, "super.git")
        again = remex("source", "track", "-C", str(proj), "e.bst", home=tmp_path)
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines() == [
            f"elements/e.bst:10: e.bst: sources[0]: ref {top} -> {newer}",
            "1 ref(s) changed",
        ]
        assert remex("source", "track", "-C", str(proj), "e.bst",
                     home=tmp_path).stdout == "0 ref(s) changed\n"  # fmt: skip


def test_source_track_refuses_a_junction_s_elements_as_bst(tmp_path: Path) -> None:
    # Given a project with a junction to a local subproject whose element tracks a branch
    proj = tmp_path / "p"
    (proj / "elements").mkdir(parents=True)
    (proj / "project.conf").write_text("name: top\nelement-path: elements\n")
    (proj / "elements" / "j.bst").write_text(
        "kind: junction\nsources:\n- kind: local\n  path: sub\n"
    )
    (proj / "elements" / "top.bst").write_text("kind: stack\ndepends:\n- j.bst:x.bst\n")
    (proj / "sub" / "elements").mkdir(parents=True)
    (proj / "sub" / "project.conf").write_text("name: sub\nelement-path: elements\n")
    repo = tmp_path / "repo"
    commit_files(repo, {"a": "a\n"})
    x = f"kind: import\nsources:\n- kind: git\n  url: file://{repo}\n  track: main\n"
    (proj / "sub" / "elements" / "x.bst").write_text(x)

    # When its element is tracked, directly or across the junction
    direct = remex("source", "track", "-C", str(proj), "j.bst:x.bst", home=tmp_path)
    across = remex("source", "track", "-C", str(proj), "-J", "--deps", "all", "top.bst",
                   home=tmp_path)  # fmt: skip
    # Then bst's refusal (refs are inline), and the file is untouched
    for result in (direct, across):
        assert result.returncode == 2
        assert "Untrackable sources" in result.stderr and "j.bst:x.bst" in result.stderr
    assert (proj / "sub" / "elements" / "x.bst").read_text() == x
    # And without -J, --deps all leaves the subproject out, as bst does
    quiet = remex("source", "track", "-C", str(proj), "--deps", "all", "top.bst", home=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "0 ref(s) changed\n"


FETCH_SCRIPT = """\
import json, sys
from pathlib import Path
from pipeline.cas import LocalCas
from pipeline.elements.sources import FetchContext, GitSource
request = json.loads(sys.argv[1])
cache, work = Path(sys.argv[2]), Path(sys.argv[3])
work.mkdir(parents=True)
ctx = FetchContext(cas=LocalCas(work / "cas"), workdir=work, cache_dir=cache)
print(GitSource.fetch(request, ctx).hash)
"""


def test_two_processes_on_a_host_fetch_a_mirror_once(
    tmp_path: Path, served: tuple[Path, dict[str, str]]
) -> None:
    root, commits = served
    cas = LocalCas(tmp_path / "cas")
    with GitHttpServer(root) as server:
        source = load_git(
            project(tmp_path / "p", f"{server.url}/super.git",
                    f"  ref: {commits['super']}\n  checkout-submodules: false\n"),
            cas,
        )  # fmt: skip
        request = source.fetch_request("e.bst", 0, "elements/e.bst")
        assert request is not None
        # Given what one fetch into an empty mirror costs the server
        GitSource.fetch(request, fetch_ctx(tmp_path / "alone", cas))
        once = server.fetches("super.git")
        assert once >= 1

        # When two processes fetch the same source into one cache folder at once
        cache = tmp_path / "shared-cache"
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FETCH_SCRIPT,
                    json.dumps(request),
                    str(cache),
                    str(tmp_path / f"worker{i}"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outputs = [proc.communicate(timeout=120) for proc in procs]

    # Then both stage the same tree, and the server saw only one more fetch
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert server.fetches("super.git") == 2 * once
    assert len(list((cache / "git").iterdir())) == 2  # the mirror and its lock file


def test_track_tags_writes_tags_and_the_build_sees_them_with_git_describe(
    tmp_path: Path, served: tuple[Path, dict[str, str]]
) -> None:
    root, commits = served
    work = tmp_path / "work" / "super"
    newer = commit_files(work, {"top.txt": "newer\n"})
    publish(work, root, "super.git")
    with GitHttpServer(root) as server:
        # Given a source tracking main with track-tags and git-describe refs
        proj = project(tmp_path / "p", "srv:super.git", aliases=f"srv: {server.url}/\n")
        text = (
            "kind: import\nsources:\n- kind: git\n  url: srv:super.git\n  track: main\n"
            "  track-tags: true\n  ref-format: git-describe\n  checkout-submodules: false\n"
        )
        (proj / "elements" / "e.bst").write_text(text)

        # When it is tracked
        result = remex("source", "track", "-C", str(proj), "e.bst", home=tmp_path)
        assert result.returncode == 0, result.stderr

        # Then the ref and the tags bst would write are there, after the source's keys
        assert (proj / "elements" / "e.bst").read_text() == text + (
            f"  ref: v1.0-1-g{newer}\n"
            "  tags:\n"
            "  - tag: v1.0\n"
            f"    commit: {commits['super']}\n"
            "    annotated: true\n"
        )
        assert "e.bst: sources[0]: tags written (1 entries)" in result.stdout
        # And tracking again changes nothing
        again = remex("source", "track", "-C", str(proj), "e.bst", home=tmp_path)
        assert again.stdout == "0 ref(s) changed\n", again.stdout

        # And the staged source holds a .git where `git describe` finds the tag
        cas = LocalCas(tmp_path / "cas")
        source = load_git(proj, cas)
        assert source.unique_key()[2] == {"tags": {"v1.0": [commits["super"], True]}}
        checkout(cas, source.stage(cas, tmp_path / "scratch"), tmp_path / "out")
    described = git(tmp_path / "out", "describe", "--tags", "--abbrev=40")
    assert described == f"v1.0-1-g{newer}"
    assert (tmp_path / "out" / "top.txt").read_text() == "newer\n"


@pytest.mark.parametrize("scheme", ["http", "git"])
def test_a_hung_server_times_out_and_the_next_url_is_tried(
    tmp_path: Path, served: tuple[Path, dict[str, str]], scheme: str
) -> None:
    # (git:// has no low-speed limit of its own: remex cuts a silent fetch)
    root, commits = served
    cas = LocalCas(tmp_path / "cas")
    # Given a first URL whose server accepts connections and never answers
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        hung.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(hung.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        with GitHttpServer(root) as server:
            source = load_git(
                project(tmp_path / "p", f"{server.url}/super.git",
                        f"  ref: {commits['super']}\n  checkout-submodules: false\n"),
                cas,
            )  # fmt: skip
            request = source.fetch_request("e.bst", 0, "elements/e.bst")
            assert request is not None
            request["urls"] = [f"{scheme}://127.0.0.1:{hung.getsockname()[1]}/super.git",
                               *request["urls"]]  # fmt: skip
            ctx = fetch_ctx(tmp_path, cas)
            ctx.network = NetworkSettings(connect_timeout=2, read_timeout=2)

            # When it is fetched, Then the hung URL is given up after the read
            # timeout and the next one gives the commit
            started = time.monotonic()
            tree = staged_files(cas, request, ctx, tmp_path / "out")
            assert "top.txt" in tree
            assert time.monotonic() - started < 30
            assert held, "the hung server was never asked"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        hung.close()


def test_source_track_errors_name_file_line_and_field(tmp_path: Path) -> None:
    # Given a source tracking a branch on a server that is down
    down = f"http://127.0.0.1:{closed_port()}/super.git"
    proj = project(tmp_path / "p", down, "  track: main\n")
    # When it is tracked
    result = remex("source", "track", "-C", str(proj), "e.bst", home=tmp_path)
    # Then one line names where the source is and what failed, and nothing is written
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "elements/e.bst:3: sources[0]: cannot fetch to track 'main'" in lines[0]
    assert down in lines[0]
    assert "ref:" not in (proj / "elements" / "e.bst").read_text()
    # And an unknown element is one sentence too
    missing = remex("source", "track", "-C", str(proj), "nope.bst", home=tmp_path)
    assert missing.returncode == 2 and "nope.bst" in missing.stderr
    assert "Traceback" not in missing.stderr + result.stderr


def test_source_track_uses_the_fetch_settings(tmp_path: Path) -> None:
    # Given a branch to track on a git:// server that accepts and never
    # answers, and a project whose remex.toml sets a 2 s read timeout
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    proj = project(
        tmp_path / "p", f"git://127.0.0.1:{hung.getsockname()[1]}/super.git", "  track: main\n"
    )
    (proj / "remex.toml").write_text("[fetch]\nread-timeout = 2\n")
    try:
        # When it is tracked
        started = time.monotonic()
        result = remex("source", "track", "-C", str(proj), "e.bst", home=tmp_path)
        took = time.monotonic() - started
    finally:
        hung.close()
    # Then the fetch is given up after the project's read timeout (the
    # default is 60 s), and the error says why
    assert result.returncode == 2, result.stderr
    assert "nothing received for 2 s" in result.stderr
    assert took < 30, took


def test_a_junction_fetched_by_the_submitter_uses_the_fetch_settings(tmp_path: Path) -> None:
    # Given a junction to a subproject on a git:// server that accepts and
    # never answers, and a project whose remex.toml sets a 2 s read timeout
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    proj = tmp_path / "p"
    (proj / "elements").mkdir(parents=True)
    (proj / "project.conf").write_text("name: top\nelement-path: elements\n")
    (proj / "elements" / "j.bst").write_text(
        "kind: junction\nsources:\n- kind: git\n"
        f"  url: git://127.0.0.1:{hung.getsockname()[1]}/sub.git\n  ref: {'a' * 40}\n"
    )
    (proj / "elements" / "top.bst").write_text("kind: stack\ndepends:\n- j.bst:x.bst\n")
    (proj / "remex.toml").write_text("[fetch]\nread-timeout = 2\n")
    try:
        # When the project is loaded (the junction's subproject is fetched here)
        started = time.monotonic()
        result = remex("show", "-C", str(proj), "top.bst", home=tmp_path)
        took = time.monotonic() - started
    finally:
        hung.close()
    # Then the fetch is given up after the project's read timeout (the
    # default is 60 s), and the error names the junction and says why
    assert result.returncode == 2, result.stderr
    assert "j.bst" in result.stderr and "nothing received for 2 s" in result.stderr
    assert "Traceback" not in result.stderr
    assert took < 30, took
