"""The ``zip`` and ``remote`` source kinds from ``file://`` URLs (no network):
loading, keys, staging, hostile archives, fetch requests and track."""

from __future__ import annotations

import hashlib
import io
import stat
import textwrap
import zipfile
from pathlib import Path

import pytest

from pipeline.cas import LocalCas, iter_tree
from pipeline.digest import Digest
from pipeline.elements import Element, LoadError, SourceError, load_project
from pipeline.elements.sources import (
    FetchContext,
    RemoteSource,
    ZipSource,
    source_cache_key,
)

CONF = "name: zr\nelement-path: elements\n"


@pytest.fixture
def cas(tmp_path: Path) -> LocalCas:
    return LocalCas(tmp_path / "cas")


def load(root: Path, cas: LocalCas, element: str, conf: str = CONF) -> Element:
    for name, text in {"project.conf": conf, "elements/e.bst": element}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return load_project(root, cas=cas).load_targets(["e.bst"])[0]


def load_error(root: Path, cas: LocalCas, element: str) -> LoadError:
    with pytest.raises(LoadError) as info:
        load(root, cas, element)
    return info.value


def make_zip(path: Path, members: list[tuple[str, bytes, int]]) -> str:
    """A zip made on Unix: (name, content, mode) members; returns its sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content, mode in members:
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = mode << 16
            archive.writestr(info, content)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def listing(cas: LocalCas, root: Digest) -> dict[str, object]:
    out: dict[str, object] = {}
    for path, directory in iter_tree(cas, root):
        prefix = f"{path}/" if path else ""
        for f in directory.files:
            out[prefix + f.name] = (cas.get(f.digest), f.is_executable)
        for s in directory.symlinks:
            out[prefix + s.name] = ("->", s.target)
        for d in directory.directories:
            out.setdefault(prefix + d.name + "/", "dir")
    return out


def zip_element(url: str, ref: str, extra: str = "") -> str:
    return f"kind: import\nsources:\n- kind: zip\n  url: {url}\n  ref: {ref}\n{extra}"


GOOD = [
    ("pkg-1.0/", b"", stat.S_IFDIR | 0o755),
    ("pkg-1.0/README", b"read me\n", stat.S_IFREG | 0o644),
    ("pkg-1.0/bin/tool", b"#!/bin/sh\n", stat.S_IFREG | 0o755),
    ("pkg-1.0/bin/alias", b"tool", stat.S_IFLNK | 0o777),
    ("zz-other/x", b"x", stat.S_IFREG | 0o644),
]


def test_zip_stages_its_base_dir_with_modes_and_symlinks(tmp_path: Path, cas: LocalCas) -> None:
    # Given a zip with a top folder, an executable and a symlink
    ref = make_zip(tmp_path / "a.zip", GOOD)
    element = load(tmp_path / "p", cas, zip_element(f"file://{tmp_path}/a.zip", ref))
    source = element.sources[0]
    assert isinstance(source, ZipSource) and source.base_dir == "*"
    # When staged, Then the first top folder's content is the tree, modes kept
    assert listing(cas, source.stage(cas, tmp_path / "w")) == {
        "README": (b"read me\n", False),
        "bin/": "dir",
        "bin/tool": (b"#!/bin/sh\n", True),
        "bin/alias": ("->", "tool"),
    }
    # And a file:// zip is staged by the submitter: no fetch request
    assert source.fetch_request("e.bst", 0, "elements/e.bst") is None


def test_zip_base_dir_empty_keeps_everything(tmp_path: Path, cas: LocalCas) -> None:
    ref = make_zip(tmp_path / "a.zip", GOOD)
    element = load(
        tmp_path / "p", cas, zip_element(f"file://{tmp_path}/a.zip", ref, "  base-dir: ''\n")
    )
    tree = listing(cas, element.sources[0].stage(cas, tmp_path / "w"))
    assert {"pkg-1.0/README", "zz-other/x"} <= set(tree)


def test_zip_base_dir_matches_implied_folders(tmp_path: Path, cas: LocalCas) -> None:
    # Given a zip without folder entries (as some tools write them)
    ref = make_zip(tmp_path / "a.zip", [("src/a/b.txt", b"b", stat.S_IFREG | 0o644)])
    element = load(tmp_path / "p", cas, zip_element(f"file://{tmp_path}/a.zip", ref))
    assert listing(cas, element.sources[0].stage(cas, tmp_path / "w")) == {
        "a/": "dir",
        "a/b.txt": (b"b", False),
    }


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([("../evil", b"x", stat.S_IFREG | 0o644)], "has a '..' component"),
        ([("top/../../evil", b"x", stat.S_IFREG | 0o644)], "has a '..' component"),
        ([("/etc/passwd", b"x", stat.S_IFREG | 0o644)], "has an absolute path"),
        ([("top/link", b"../../etc", stat.S_IFLNK | 0o777)], "points outside the tree"),
        ([("top/dev", b"", stat.S_IFCHR | 0o644)], "device, fifo or other special file"),
        (
            [("top/l", b"/tmp", stat.S_IFLNK | 0o777), ("top/l/x", b"x", stat.S_IFREG | 0o644)],
            "which is a symlink",
        ),
    ],
)
def test_hostile_zips_are_refused_naming_the_member(
    tmp_path: Path, cas: LocalCas, members: list[tuple[str, bytes, int]], words: str
) -> None:
    ref = make_zip(tmp_path / "bad.zip", members)
    element = load(
        tmp_path / "p", cas, zip_element(f"file://{tmp_path}/bad.zip", ref, "  base-dir: ''\n")
    )
    with pytest.raises(SourceError) as info:
        element.sources[0].stage(cas, tmp_path / "w")
    assert words in str(info.value)
    assert (info.value.file, info.value.line) == ("elements/e.bst", 3)


def test_a_corrupt_zip_is_one_clear_error(tmp_path: Path, cas: LocalCas) -> None:
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    ref = hashlib.sha256(b"not a zip").hexdigest()
    element = load(tmp_path / "p", cas, zip_element(f"file://{tmp_path}/bad.zip", ref))
    with pytest.raises(SourceError, match="cannot read the zip archive"):
        element.sources[0].stage(cas, tmp_path / "w")


def test_a_member_in_a_compression_method_zipfile_cannot_read_is_refused(
    tmp_path: Path, cas: LocalCas
) -> None:
    # Given a zip whose member says deflate64 (method 9), which zipfile cannot read
    make_zip(tmp_path / "d64.zip", [("top/a.txt", b"a", stat.S_IFREG | 0o644)])
    data = bytearray((tmp_path / "d64.zip").read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.index(signature)
        data[at + offset : at + offset + 2] = (9).to_bytes(2, "little")
    (tmp_path / "d64.zip").write_bytes(bytes(data))
    ref = hashlib.sha256(bytes(data)).hexdigest()
    element = load(tmp_path / "p", cas, zip_element(f"file://{tmp_path}/d64.zip", ref))
    # When it is staged, Then it is one clear error naming the member and the method
    with pytest.raises(SourceError, match=r"'top/a.txt' uses compression method 9"):
        element.sources[0].stage(cas, tmp_path / "w")


def test_zip_ref_must_match_and_be_a_sha256(tmp_path: Path, cas: LocalCas) -> None:
    make_zip(tmp_path / "a.zip", GOOD)
    error = load_error(tmp_path / "p", cas, zip_element(f"file://{tmp_path}/a.zip", "0" * 64))
    assert error.field == "sources[0].ref" and "sha256 mismatch" in error.reason
    error = load_error(tmp_path / "q", cas, zip_element(f"file://{tmp_path}/a.zip", "abc"))
    assert "expected the zip archive's sha256" in error.reason


def test_network_zip_and_remote_requests_are_keyed_by_url_as_written(
    tmp_path: Path, cas: LocalCas
) -> None:
    conf = CONF + "aliases:\n  up: https://example.com/dl/\n"
    element = (
        "kind: import\nsources:\n"
        f"- kind: zip\n  url: up:a.zip\n  ref: {'a' * 64}\n  base-dir: src\n"
        f"- kind: remote\n  url: up:tools/run.sh?x=1\n  ref: {'b' * 64}\n  executable: true\n"
        "  directory: bin\n"
    )
    zip_source, remote = load(tmp_path / "p", cas, element, conf).sources
    z = zip_source.fetch_request("e.bst", 0, "elements/e.bst")
    r = remote.fetch_request("e.bst", 1, "elements/e.bst")
    assert z is not None and r is not None
    assert z["key"] == source_cache_key("zip", ["up:a.zip", "a" * 64, "src"])
    assert z["urls"] == ["https://example.com/dl/a.zip"]
    assert r["key"] == source_cache_key("remote", ["up:tools/run.sh?x=1", "b" * 64, "run.sh", True])
    assert r["config"] == {"ref": "b" * 64, "filename": "run.sh", "executable": True}
    assert (r["index"], r["field"]) == (1, "sources[1]")


def test_remote_stages_one_file_named_and_executable(tmp_path: Path, cas: LocalCas) -> None:
    (tmp_path / "tool.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    ref = hashlib.sha256(b"#!/bin/sh\necho hi\n").hexdigest()
    base = (
        f"kind: import\nsources:\n- kind: remote\n  url: file://{tmp_path}/tool.sh\n  ref: {ref}\n"
    )
    # By default: the URL's basename, not executable
    plain = load(tmp_path / "p", cas, base).sources[0]
    assert isinstance(plain, RemoteSource)
    assert listing(cas, plain.stage(cas, tmp_path / "w")) == {
        "tool.sh": (b"#!/bin/sh\necho hi\n", False)
    }
    # With filename and executable: that name, executable, and another key
    named = load(tmp_path / "q", cas, base + "  filename: run\n  executable: true\n").sources[0]
    assert listing(cas, named.stage(cas, tmp_path / "w")) == {
        "run": (b"#!/bin/sh\necho hi\n", True)
    }
    assert named.content_key() != plain.content_key()
    # And track gives the file's sha256
    ctx = FetchContext(cas=cas, workdir=tmp_path / "t", cache_dir=tmp_path / "c")
    assert named.track(ctx) == ref


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("  filename: a/b\n", "sources[0].filename", "must be a plain file name"),
        ("  filename: '..'\n", "sources[0].filename", "must be a plain file name"),
        ("  executable: yes\n", "sources[0].executable", "expected a boolean"),
        ("  base-dir: x\n", "sources[0].base-dir", "unknown key"),
    ],
)
def test_remote_bad_keys(tmp_path: Path, cas: LocalCas, extra: str, field: str, words: str) -> None:
    (tmp_path / "f").write_bytes(b"x")
    ref = hashlib.sha256(b"x").hexdigest()
    element = f"kind: import\nsources:\n- kind: remote\n  url: file://{tmp_path}/f\n  ref: {ref}\n"
    error = load_error(tmp_path / "p", cas, element + extra)
    assert error.field == field and words in error.reason


def test_a_remote_url_without_a_file_name_needs_filename(tmp_path: Path, cas: LocalCas) -> None:
    element = f"kind: import\nsources:\n- kind: remote\n  url: https://h/\n  ref: {'c' * 64}\n"
    error = load_error(tmp_path / "p", cas, element)
    assert error.field == "sources[0].filename" and "plain file name" in error.reason


def test_zip_from_buildstream_plugins_is_remex_zip(tmp_path: Path, cas: LocalCas) -> None:
    ref = make_zip(tmp_path / "a.zip", GOOD)
    conf = CONF + "plugins:\n- origin: pip\n  package-name: buildstream-plugins\n  sources: [zip]\n"
    element = load(tmp_path / "p", cas, zip_element(f"file://{tmp_path}/a.zip", ref), conf)
    assert isinstance(element.sources[0], ZipSource)
