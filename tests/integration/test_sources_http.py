"""tar, zip and remote sources over HTTP from a real loopback server: fetched as a
worker fetches them, tracked, and hostile archives refused."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cas import LocalCas, iter_tree
from pipeline.digest import Digest
from pipeline.elements import SourceError, load_project
from pipeline.elements.sources import (
    SOURCE_KINDS,
    FetchContext,
    NetworkSettings,
    Source,
)
from pipeline.testing.httpserver import LoopbackHttpServer


def make_zip(path: Path, members: list[tuple[str, bytes, int]]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content, mode in members:
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = mode << 16
            archive.writestr(info, content)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def files(cas: LocalCas, root: Digest) -> dict[str, tuple[bytes, bool]]:
    out = {}
    for path, directory in iter_tree(cas, root):
        for f in directory.files:
            out[f"{path}/{f.name}" if path else f.name] = (cas.get(f.digest), f.is_executable)
    return out


@pytest.fixture
def served(tmp_path: Path) -> Path:
    folder = tmp_path / "served"
    folder.mkdir()
    return folder


@pytest.fixture
def server(served: Path) -> Iterator[LoopbackHttpServer]:
    with LoopbackHttpServer(served) as s:
        yield s


@pytest.fixture
def ctx(tmp_path: Path) -> FetchContext:
    return FetchContext(
        cas=LocalCas(tmp_path / "cas"),
        workdir=tmp_path / "work",
        cache_dir=tmp_path / "cache",
        network=NetworkSettings(connect_timeout=2, read_timeout=2, retries=1, backoff=0.01),
    )


def load_sources(root: Path, server: LoopbackHttpServer, sources: str) -> list[Source]:
    conf = f"name: net\nelement-path: elements\naliases:\n  srv: {server.base_url}/\n"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text(conf)
    (root / "elements/e.bst").write_text("kind: import\nsources:\n" + textwrap.dedent(sources))
    project = load_project(root, cas=LocalCas(root / "cas"))
    return list(project.load_targets(["e.bst"])[0].sources)


def load_sources_from(root: Path) -> list[Source]:
    project = load_project(root, cas=LocalCas(root / "cas"))
    return list(project.load_targets(["e.bst"])[0].sources)


def fetch(source: Source, index: int, ctx: FetchContext) -> Digest:
    # As a worker: from the JSON request alone, through the kind's class.
    request = source.fetch_request("e.bst", index, "elements/e.bst")
    assert request is not None
    return SOURCE_KINDS[request["kind"]].fetch(request, ctx)


def test_tar_zip_and_remote_are_fetched_over_http_once_each(
    served: Path, server: LoopbackHttpServer, ctx: FetchContext, tmp_path: Path
) -> None:
    # Given a tarball, a zip and a script on the server
    tar_ref = make_tar(served / "t.tar.xz", [("t-1/a.txt", b"tar\n")])
    zip_ref = make_zip(
        served / "z.zip",
        [("z-1/b.txt", b"zip\n", stat.S_IFREG | 0o644), ("z-1/run", b"#!", stat.S_IFREG | 0o755)],
    )
    (served / "tool.sh").write_bytes(b"#!/bin/sh\n")
    tool_ref = hashlib.sha256(b"#!/bin/sh\n").hexdigest()
    tar, zip_, remote = load_sources(
        tmp_path / "p",
        server,
        f"""\
        - kind: tar
          url: srv:t.tar.xz
          ref: {tar_ref}
        - kind: zip
          url: srv:z.zip
          ref: {zip_ref}
        - kind: remote
          url: srv:tool.sh
          ref: {tool_ref}
          executable: true
        """,
    )
    # When a worker fetches each, Then each is staged from one GET
    assert files(ctx.cas, fetch(tar, 0, ctx)) == {"a.txt": (b"tar\n", False)}
    assert files(ctx.cas, fetch(zip_, 1, ctx)) == {"b.txt": (b"zip\n", False), "run": (b"#!", True)}
    assert files(ctx.cas, fetch(remote, 2, ctx)) == {"tool.sh": (b"#!/bin/sh\n", True)}
    for name in ("t.tar.xz", "z.zip", "tool.sh"):
        assert server.count(file=name) == 1, name
    assert list(ctx.workdir.iterdir()) == []


def test_track_downloads_the_url_and_gives_its_sha256(
    served: Path, server: LoopbackHttpServer, ctx: FetchContext, tmp_path: Path
) -> None:
    # Given sources whose refs are out of date
    tar_ref = make_tar(served / "t.tar.xz", [("t-1/a.txt", b"new\n")])
    zip_ref = make_zip(served / "z.zip", [("z/x", b"new", stat.S_IFREG | 0o644)])
    (served / "f.bin").write_bytes(b"new bytes")
    old = "0" * 64
    sources = load_sources(
        tmp_path / "p",
        server,
        f"""\
        - kind: tar
          url: srv:t.tar.xz
          ref: {old}
        - kind: zip
          url: srv:z.zip
          ref: {old}
        - kind: remote
          url: srv:f.bin
          ref: {old}
        """,
    )
    # When tracked, Then each gives the sha256 the server's file has now
    assert [s.track(ctx) for s in sources] == [
        tar_ref,
        zip_ref,
        hashlib.sha256(b"new bytes").hexdigest(),
    ]
    assert list(ctx.workdir.iterdir()) == []
    # And a URL that fails is an error naming it
    (served / "f.bin").unlink()
    with pytest.raises(SourceError, match=r"f\.bin: HTTP 404"):
        sources[2].track(ctx)


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize("name", ["../escape.txt", "/etc/evil", "top/../../escape"])
def test_hostile_archives_over_http_are_refused_permanently(
    served: Path,
    server: LoopbackHttpServer,
    ctx: FetchContext,
    tmp_path: Path,
    kind: str,
    name: str,
) -> None:
    # Given an archive whose member climbs out or is absolute, with the right ref
    if kind == "tar":
        ref = make_tar(served / "bad", [("top/ok", b"ok"), (name, b"x")])
    else:
        ref = make_zip(served / "bad", [("top/ok", b"ok", 0o100644), (name, b"x", 0o100644)])
    [source] = load_sources(
        tmp_path / "p", server, f"- kind: {kind}\n  url: srv:bad\n  ref: {ref}\n  base-dir: ''\n"
    )
    # When fetched, Then it is refused, naming the source and the member, not retried
    with pytest.raises(SourceError) as info:
        fetch(source, 0, ctx)
    message = str(info.value)
    assert f"element e.bst, source 0 ({kind})" in message
    assert repr(name) in message
    assert not info.value.transient
    assert server.count(file="bad") == 1
    assert list(ctx.workdir.iterdir()) == []


def test_remex_source_track_writes_the_sha256_of_tarballs_without_a_ref(
    served: Path, server: LoopbackHttpServer, tmp_path: Path
) -> None:
    # Given a tar source with no ref yet and a remote one with an old ref, with comments
    tar_ref = make_tar(served / "t.tar.xz", [("t-1/a.txt", b"a\n")])
    (served / "tool.sh").write_bytes(b"#!/bin/sh\n")
    root = tmp_path / "p"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text(
        f"name: net\nelement-path: elements\naliases:\n  srv: {server.base_url}/\n"
    )
    element = (
        "kind: import  # the top\n"
        "sources:\n"
        "- kind: tar\n"
        "  url: srv:t.tar.xz  # the tarball\n"
        "- kind: remote\n"
        "  url: srv:tool.sh\n"
        f"  ref: {'0' * 64}  # old\n"
    )
    (root / "elements/e.bst").write_text(element)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
    env.update(REMEX_CAS_DIR=str(tmp_path / "cas"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    remex = Path(sys.executable).with_name("remex")
    # When `remex source track` runs
    result = subprocess.run(
        [str(remex), "source", "track", "-C", str(root), "e.bst"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    # Then both refs are written, the rest of the file as it was
    assert result.returncode == 0, result.stderr
    tool_ref = hashlib.sha256(b"#!/bin/sh\n").hexdigest()
    assert (root / "elements/e.bst").read_text() == (
        "kind: import  # the top\n"
        "sources:\n"
        "- kind: tar\n"
        "  url: srv:t.tar.xz  # the tarball\n"
        f"  ref: {tar_ref}\n"
        "- kind: remote\n"
        "  url: srv:tool.sh\n"
        f"  ref: {tool_ref}  # old\n"
    )
    # And the project now loads with those refs
    sources = load_sources_from(root)
    assert sources[0].content_key().startswith(f'["{tar_ref}"')


def test_a_junction_over_http_is_downloaded_by_the_first_load_only(
    served: Path, server: LoopbackHttpServer, tmp_path: Path
) -> None:
    # Given a junction whose subproject is a tarball on the server
    sub = {
        "sub-1/project.conf": b"name: sub\nelement-path: elements\n",
        "sub-1/elements/lib.bst": b"kind: import\nsources:\n- kind: local\n  path: files\n",
        "sub-1/files/lib.txt": b"lib\n",
    }
    ref = make_tar(served / "sub.tar.xz", list(sub.items()))
    root = tmp_path / "p"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text(
        f"name: top\nelement-path: elements\naliases:\n  srv: {server.base_url}/\n"
    )
    (root / "elements/sub.bst").write_text(
        f"kind: junction\nsources:\n- kind: tar\n  url: srv:sub.tar.xz\n  ref: {ref}\n"
    )
    (root / "elements/app.bst").write_text("kind: stack\ndepends:\n- sub.bst:lib.bst\n")
    cas = LocalCas(tmp_path / "cas")
    # When the project is loaded twice (two submits)
    keys = []
    for _ in range(2):
        project = load_project(root, cas=cas)
        loaded = {e.name: e for e in project.load_targets(["app.bst"])}
        keys.append((loaded["app.bst"].cache_key, loaded["sub.bst:lib.bst"].cache_key))
    # Then the subproject's element is there, with the same key, and the
    # tarball was downloaded once
    assert keys[0] == keys[1]
    assert server.count(file="sub.tar.xz") == 1
