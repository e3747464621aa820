"""Merkle trees in the local CAS: import, merge, walk, REAPI Tree messages, safe checkout."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.cas import (
    LocalCas,
    check_directory,
    checkout,
    import_directory,
    iter_tree,
    merge_trees,
    store_tree_message,
    tree_digests,
    tree_from_directories,
    tree_message,
)
from pipeline.digest import EMPTY_DIGEST, Digest, digest_of
from pipeline.errors import (
    DigestMismatchError,
    LocalBlobMissingError,
    LocalCasError,
    UnsafePathError,
)
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
)

# Names whose code point order differs from naive expectations ("Z" < "a" < "é" < "日").
UNICODE_NAMES = ["zeta", "Zeta", "alpha", "émile", "ßtraße", "日本語", "ä", "a b", "-dash"]


@pytest.fixture
def cas(tmp_path: Path) -> LocalCas:
    return LocalCas(tmp_path / "cas")


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _make_sample_tree(root: Path) -> None:
    """A folder with executables, symlinks of both kinds, empty and nested folders."""
    _write(root / "README", b"read me\n")
    _write(root / "bin" / "tool", b"#!/bin/sh\necho hi\n", 0o755)
    _write(root / "bin" / "user-x-only", b"x", 0o744)
    _write(root / "lib" / "libfoo.so.1", os.urandom(3000))
    (root / "lib" / "libfoo.so").symlink_to("libfoo.so.1")
    (root / "abs-link").symlink_to("/usr/bin/env")
    (root / "dangling").symlink_to("../nowhere/at/all")
    (root / "empty").mkdir()
    (root / "deep" / "er" / "est").mkdir(parents=True)
    _write(root / "deep" / "er" / "file", b"")
    for name in UNICODE_NAMES:
        _write(root / "unicode" / name, name.encode())
    (root / "unicode" / "sub-ü").mkdir()


def _snapshot(root: Path) -> dict[str, tuple[str, object]]:
    """Everything a checkout must reproduce, by relative path."""
    result: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", None)
            else:
                result[rel] = ("file", (path.read_bytes(), bool(st.st_mode & stat.S_IXUSR)))
    return result


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- import -------------------------------------------------------------------


def test_import_gives_sorted_nodes_of_every_kind(cas: LocalCas, tmp_path: Path) -> None:
    # Given a folder with executables, symlinks, empty folders and unicode names
    source = tmp_path / "src"
    _make_sample_tree(source)

    # When it is imported
    root = import_directory(cas, source)

    # Then the root lists files, folders and symlinks, each sorted by UTF-8 bytes
    top = cas.get_message(root, Directory)
    assert [n.name for n in top.files] == ["README"]
    assert [n.name for n in top.directories] == ["bin", "deep", "empty", "lib", "unicode"]
    assert [(n.name, n.target) for n in top.symlinks] == [
        ("abs-link", "/usr/bin/env"),
        ("dangling", "../nowhere/at/all"),
    ]
    dirs = dict(iter_tree(cas, root))
    assert [(n.name, n.is_executable) for n in dirs["bin"].files] == [
        ("tool", True),
        ("user-x-only", True),
    ]
    assert dirs["lib"].files[0].digest == digest_of((source / "lib" / "libfoo.so.1").read_bytes())
    assert [(n.name, n.target) for n in dirs["lib"].symlinks] == [("libfoo.so", "libfoo.so.1")]
    assert dirs["empty"] == Directory()
    assert dirs["deep/er/est"] == Directory()
    assert dirs["deep/er"].files[0].digest == EMPTY_DIGEST
    unicode_names = [n.name for n in dirs["unicode"].files]
    assert unicode_names == sorted(UNICODE_NAMES, key=lambda n: n.encode("utf-8"))
    assert [n.name for n in dirs["unicode"].directories] == ["sub-ü"]
    for _, directory in iter_tree(cas, root):
        check_directory(directory)


def test_import_is_deterministic_and_skips_existing_objects(cas: LocalCas, tmp_path: Path) -> None:
    # Given an imported folder
    source = tmp_path / "src"
    _make_sample_tree(source)
    first = import_directory(cas, source)
    objects = cas.stats().objects

    # When it is imported again
    second = import_directory(cas, source)

    # Then the digest is the same and nothing new is stored
    assert first == second
    assert cas.stats().objects == objects
    # And importing into a fresh store gives the same digest
    assert import_directory(LocalCas(tmp_path / "other"), source) == first


def test_import_of_a_big_file_streams_it(cas: LocalCas, tmp_path: Path) -> None:
    # Given a folder holding a 5 MiB file
    data = os.urandom(5 << 20)
    _write(tmp_path / "src" / "big", data)

    # When it is imported
    root = import_directory(cas, tmp_path / "src")

    # Then the file node has the file's digest, and the content is stored
    node = cas.get_message(root, Directory).files[0]
    assert node.digest == digest_of(data)
    assert cas.get(node.digest) == data


def test_import_refuses_a_fifo(cas: LocalCas, tmp_path: Path) -> None:
    # Given a folder with a named pipe
    source = tmp_path / "src"
    source.mkdir()
    os.mkfifo(source / "pipe")

    # Then the import fails naming it
    with pytest.raises(LocalCasError, match="pipe"):
        import_directory(cas, source)


def test_import_refuses_a_socket(cas: LocalCas, tmp_path: Path) -> None:
    # Given a folder with a unix socket (short path: sun_path is limited)
    source = tmp_path / "s"
    source.mkdir()
    cwd = os.getcwd()
    os.chdir(source)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("sock")
            # Then the import fails naming it
            with pytest.raises(LocalCasError, match="sock"):
                import_directory(cas, source)
    finally:
        os.chdir(cwd)


def test_import_refuses_a_name_that_is_not_utf8(cas: LocalCas, tmp_path: Path) -> None:
    # Given a file whose name is not valid UTF-8
    source = tmp_path / "src"
    source.mkdir()
    fd = os.open(os.fsencode(source) + b"/bad-\xff", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)

    # Then the import fails naming it
    with pytest.raises(LocalCasError, match="bad-"):
        import_directory(cas, source)


def test_import_of_a_missing_folder_fails(cas: LocalCas, tmp_path: Path) -> None:
    with pytest.raises(LocalCasError):
        import_directory(cas, tmp_path / "nope")


# --- round trip ---------------------------------------------------------------


def test_import_then_checkout_reproduces_the_tree(cas: LocalCas, tmp_path: Path) -> None:
    # Given an imported folder
    source = tmp_path / "src"
    _make_sample_tree(source)
    root = import_directory(cas, source)

    # When it is checked out, under a strict umask
    dest = tmp_path / "out"
    with _umask(0o077):
        checkout(cas, root, dest)

    # Then contents, x bits, symlink targets and empty folders are the same
    assert _snapshot(dest) == _snapshot(source)
    # And modes are exactly 0o755 / 0o644, whatever the umask
    assert stat.S_IMODE((dest / "bin" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "bin" / "user-x-only").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "README").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "empty").stat().st_mode) == 0o755
    # And re-importing gives the same digest
    assert import_directory(cas, dest) == root


def test_checkout_into_an_existing_folder_with_other_content(cas: LocalCas, tmp_path: Path) -> None:
    # Given a destination that already has a folder of the tree and an unrelated file
    source = tmp_path / "src"
    _write(source / "bin" / "tool", b"tool", 0o755)
    root = import_directory(cas, source)
    dest = tmp_path / "out"
    (dest / "bin").mkdir(parents=True)
    _write(dest / "unrelated", b"keep me")

    # When the tree is checked out there
    checkout(cas, root, dest)

    # Then both are present
    assert (dest / "bin" / "tool").read_bytes() == b"tool"
    assert (dest / "unrelated").read_bytes() == b"keep me"


def test_checkout_refuses_to_replace_an_existing_file(cas: LocalCas, tmp_path: Path) -> None:
    # Given a destination already holding a file the tree also has
    _write(tmp_path / "src" / "f", b"new")
    root = import_directory(cas, tmp_path / "src")
    _write(tmp_path / "out" / "f", b"old")

    # Then the checkout fails and the old file is untouched
    with pytest.raises(LocalCasError, match="already exists"):
        checkout(cas, root, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_bytes() == b"old"


# --- merge --------------------------------------------------------------------


def test_merge_combines_folders_and_reports_overlaps(cas: LocalCas, tmp_path: Path) -> None:
    # Given a base tree and a later tree that overlaps it in several ways
    base = tmp_path / "base"
    _write(base / "usr" / "bin" / "a", b"a")
    _write(base / "etc" / "conf", b"base conf")
    _write(base / "share" / "doc", b"doc")
    _write(base / "opt", b"opt was a file")
    (base / "lib").symlink_to("usr/lib")
    later = tmp_path / "later"
    _write(later / "usr" / "bin" / "b", b"b", 0o755)
    _write(later / "etc" / "conf", b"later conf")
    _write(later / "share", b"share is now a file")
    (base / "empty").mkdir()
    _write(later / "empty", b"empty was an empty folder")
    _write(later / "opt" / "x", b"opt is now a folder")
    _write(later / "lib" / "libc.so", b"lib is now a folder")
    roots = [import_directory(cas, base), import_directory(cas, later)]

    # When they are merged
    result = merge_trees(cas, roots)

    # Then folders are merged, the later tree wins each clash, and clashes are
    # reported; but, as in BuildStream, a file does not replace a non-empty folder
    assert result.overlaps == ["empty", "etc/conf", "lib", "opt"]
    out = tmp_path / "out"
    checkout(cas, result.digest, out)
    assert _snapshot(out) == {
        "empty": ("file", (b"empty was an empty folder", False)),
        "etc": ("dir", None),
        "etc/conf": ("file", (b"later conf", False)),
        "lib": ("dir", None),
        "lib/libc.so": ("file", (b"lib is now a folder", False)),
        "opt": ("dir", None),
        "opt/x": ("file", (b"opt is now a folder", False)),
        "share": ("dir", None),
        "share/doc": ("file", (b"doc", False)),
        "usr": ("dir", None),
        "usr/bin": ("dir", None),
        "usr/bin/a": ("file", (b"a", False)),
        "usr/bin/b": ("file", (b"b", True)),
    }


def test_merge_reports_identical_files_as_overlaps_like_buildstream(
    cas: LocalCas, tmp_path: Path
) -> None:
    # Given two trees shipping the same file
    _write(tmp_path / "one" / "share" / "LICENSE", b"same")
    _write(tmp_path / "two" / "share" / "LICENSE", b"same")
    roots = [import_directory(cas, tmp_path / "one"), import_directory(cas, tmp_path / "two")]

    # Then the merge equals either tree and reports the overlap
    result = merge_trees(cas, roots)
    assert result.digest == roots[0]
    assert result.overlaps == ["share/LICENSE"]


def test_merge_of_three_trees_applies_them_in_order(cas: LocalCas, tmp_path: Path) -> None:
    # Given a folder, then a file, then a folder again at the same path
    _write(tmp_path / "t1" / "x" / "first", b"1")
    _write(tmp_path / "t2" / "x", b"2")
    _write(tmp_path / "t3" / "x" / "third", b"3")
    roots = [import_directory(cas, tmp_path / f"t{n}") for n in (1, 2, 3)]

    # When merged
    result = merge_trees(cas, roots)

    # Then the file is not staged over the non-empty folder (as BuildStream),
    # and the folders merge
    checkout(cas, result.digest, tmp_path / "out")
    assert _listing(tmp_path / "out") == ["x", "x/first", "x/third"]
    assert result.overlaps == []


def test_merge_of_one_or_no_tree(cas: LocalCas, tmp_path: Path) -> None:
    _write(tmp_path / "t" / "f", b"f")
    root = import_directory(cas, tmp_path / "t")
    assert merge_trees(cas, [root]).digest == root
    empty = merge_trees(cas, [])
    assert cas.get_message(empty.digest, Directory) == Directory()
    assert empty.overlaps == []


def test_merge_then_checkout_is_safe_when_a_symlink_is_replaced_by_a_folder(
    cas: LocalCas, tmp_path: Path
) -> None:
    # Given a tree with a symlink pointing outside, and a later tree with a folder there
    outside = tmp_path / "outside"
    outside.mkdir()
    first = cas.put_message(Directory(symlinks=[SymlinkNode(name="a", target=str(outside))]))
    _write(tmp_path / "later" / "a" / "x", b"x")
    second = import_directory(cas, tmp_path / "later")

    # When merged and checked out
    result = merge_trees(cas, [first, second])
    checkout(cas, result.digest, tmp_path / "out")

    # Then the folder is written inside dest, nothing outside
    assert result.overlaps == ["a"]
    assert (tmp_path / "out" / "a" / "x").read_bytes() == b"x"
    assert not (tmp_path / "out" / "a").is_symlink()
    assert list(outside.iterdir()) == []


# --- walking and Tree messages ------------------------------------------------


def test_tree_digests_lists_every_blob_once(cas: LocalCas, tmp_path: Path) -> None:
    # Given a tree with two identical subfolders and duplicate files
    source = tmp_path / "src"
    for sub in ("one", "two"):
        _write(source / sub / "same", b"same")
        _write(source / sub / "also-same", b"same")
    _write(source / "top", b"top")
    root = import_directory(cas, source)

    # When its digests are listed
    digests = tree_digests(cas, root)

    # Then root first, then each Directory and file digest once
    keys = [(d.hash, d.size_bytes) for d in digests]
    assert len(keys) == len(set(keys))
    assert digests[0] == root
    shared = cas.get_message(root, Directory).directories[0].digest
    assert set(keys) == {
        (root.hash, root.size_bytes),
        (shared.hash, shared.size_bytes),
        (digest_of(b"same").hash, 4),
        (digest_of(b"top").hash, 3),
    }
    assert [path for path, _ in iter_tree(cas, root)] == ["", "one", "two"]


def test_tree_message_round_trip(cas: LocalCas, tmp_path: Path) -> None:
    # Given a tree gathered into a REAPI Tree message, and an empty store
    source = tmp_path / "src"
    _make_sample_tree(source)
    root = import_directory(cas, source)
    tree = tree_message(cas, root)
    other = LocalCas(tmp_path / "other")

    # When the Tree message is stored in the other store
    stored_root = store_tree_message(other, tree)

    # Then the same Directories are there
    assert stored_root == root
    assert [p for p, _ in iter_tree(other, stored_root)] == [p for p, _ in iter_tree(cas, root)]


def test_store_tree_message_refuses_an_incomplete_tree(cas: LocalCas) -> None:
    # Given a Tree whose root names a folder not among its children
    child = Directory(files=[FileNode(name="f", digest=EMPTY_DIGEST)])
    root = Directory(
        directories=[DirectoryNode(name="sub", digest=digest_of(child.SerializeToString()))]
    )
    tree = tree_from_directories(root, [])

    # Then storing it fails
    with pytest.raises(DigestMismatchError, match="sub"):
        store_tree_message(cas, tree)


def test_store_tree_message_refuses_a_hostile_child(cas: LocalCas) -> None:
    # Given a Tree with a child naming ".."
    child = Directory(files=[FileNode(name="..", digest=EMPTY_DIGEST)])
    root = Directory(directories=[DirectoryNode(name="sub", digest=cas.put_message(child))])

    # Then storing it fails
    with pytest.raises(UnsafePathError):
        store_tree_message(cas, tree_from_directories(root, [child]))


# --- hostile trees ------------------------------------------------------------

_FILE = FileNode(name="f", digest=EMPTY_DIGEST)


def _hostile(name: str) -> list[Directory]:
    """Directories with a hostile name in each kind of node."""
    return [
        Directory(files=[FileNode(name=name, digest=EMPTY_DIGEST)]),
        Directory(directories=[DirectoryNode(name=name, digest=digest_of(b""))]),
        Directory(symlinks=[SymlinkNode(name=name, target="x")]),
    ]


HOSTILE_DIRECTORIES = [
    *_hostile(".."),
    *_hostile("."),
    *_hostile("a/b"),
    *_hostile("../escape"),
    *_hostile("/abs"),
    *_hostile(""),
    *_hostile("nul\0byte"),
    # duplicate names, within one list and across lists
    Directory(files=[_FILE, _FILE]),
    Directory(files=[_FILE], symlinks=[SymlinkNode(name="f", target="x")]),
    Directory(
        directories=[DirectoryNode(name="a", digest=EMPTY_DIGEST)],
        symlinks=[SymlinkNode(name="a", target="/tmp")],
    ),
    # unsorted
    Directory(
        files=[
            FileNode(name="b", digest=EMPTY_DIGEST),
            FileNode(name="a", digest=EMPTY_DIGEST),
        ]
    ),
    # malformed digest and symlink target
    Directory(files=[FileNode(name="f", digest=Digest(hash="../x", size_bytes=1))]),
    Directory(symlinks=[SymlinkNode(name="s", target="")]),
]


@pytest.mark.parametrize("hostile", HOSTILE_DIRECTORIES)
def test_check_directory_refuses_hostile_directories(hostile: Directory) -> None:
    with pytest.raises(LocalCasError):
        check_directory(hostile)


@pytest.mark.parametrize("hostile", HOSTILE_DIRECTORIES)
def test_checkout_of_a_hostile_tree_writes_nothing(
    cas: LocalCas, tmp_path: Path, hostile: Directory
) -> None:
    # Given a tree whose subfolder is hostile, next to a harmless file
    _write(tmp_path / "harmless", b"h")
    hostile_digest = cas.put_message(hostile)
    root = cas.put_message(
        Directory(
            files=[FileNode(name="harmless", digest=cas.put(b"h"))],
            directories=[DirectoryNode(name="sub", digest=hostile_digest)],
        )
    )
    dest = tmp_path / "out"

    # When it is checked out
    # Then it fails before writing anything
    with pytest.raises(LocalCasError):
        checkout(cas, root, dest)
    assert _listing(dest) == []
    # And the walkers refuse it too
    with pytest.raises(LocalCasError):
        tree_digests(cas, root)
    with pytest.raises(LocalCasError):
        merge_trees(cas, [root, root])


def test_symlink_then_folder_of_the_same_name_is_refused(cas: LocalCas, tmp_path: Path) -> None:
    # Given a Directory with a symlink "a" to a folder outside, and a folder "a" with a file
    outside = tmp_path / "outside"
    outside.mkdir()
    inner = cas.put_message(Directory(files=[FileNode(name="x", digest=cas.put(b"x"))]))
    root = cas.put_message(
        Directory(
            directories=[DirectoryNode(name="a", digest=inner)],
            symlinks=[SymlinkNode(name="a", target=str(outside))],
        )
    )

    # Then the checkout is refused, and nothing is written anywhere
    with pytest.raises(UnsafePathError, match="twice"):
        checkout(cas, root, tmp_path / "out")
    assert list(outside.iterdir()) == []
    assert _listing(tmp_path / "out") == []


def test_checkout_never_writes_through_a_symlink_in_dest(cas: LocalCas, tmp_path: Path) -> None:
    # Given a destination with a symlink "a" to a folder outside
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a").symlink_to(outside)
    # And a tree that writes a/x
    _write(tmp_path / "src" / "a" / "x", b"x")
    root = import_directory(cas, tmp_path / "src")

    # Then the checkout fails and nothing is written outside
    with pytest.raises(UnsafePathError, match="'a'"):
        checkout(cas, root, dest)
    assert list(outside.iterdir()) == []


def test_checkout_never_writes_a_file_through_a_symlink(cas: LocalCas, tmp_path: Path) -> None:
    # Given a destination with a symlink "f" to a file outside
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "f").symlink_to(victim)
    _write(tmp_path / "src" / "f", b"overwrite")
    root = import_directory(cas, tmp_path / "src")

    # Then the checkout fails and the file outside is unchanged
    with pytest.raises(UnsafePathError, match="'f'"):
        checkout(cas, root, dest)
    assert victim.read_bytes() == b"precious"


# --- damaged or incomplete store ----------------------------------------------


def test_checkout_with_a_missing_file_blob_writes_nothing(cas: LocalCas, tmp_path: Path) -> None:
    # Given a tree whose file blob is not in the store
    root = cas.put_message(Directory(files=[FileNode(name="f", digest=digest_of(b"absent"))]))

    # Then the checkout fails before writing
    with pytest.raises(LocalBlobMissingError):
        checkout(cas, root, tmp_path / "out")
    assert _listing(tmp_path / "out") == []


def test_checkout_detects_a_damaged_file_blob(cas: LocalCas, tmp_path: Path) -> None:
    # Given a tree whose file blob was damaged on disk
    _write(tmp_path / "src" / "f", b"original")
    root = import_directory(cas, tmp_path / "src")
    blob = cas.path(digest_of(b"original"))
    blob.chmod(0o644)
    blob.write_bytes(b"damaged!")

    # Then the checkout fails, leaves no half file, and the damaged blob is dropped
    with pytest.raises(LocalBlobMissingError, match="damaged"):
        checkout(cas, root, tmp_path / "out")
    assert not (tmp_path / "out" / "f").exists()
    assert not cas.contains(digest_of(b"original"))


def test_checkout_detects_a_damaged_big_file_blob(cas: LocalCas, tmp_path: Path) -> None:
    # Given a tree whose 3 MiB file blob was damaged on disk
    data = os.urandom(3 << 20)
    _write(tmp_path / "src" / "big", data)
    root = import_directory(cas, tmp_path / "src")
    blob = cas.path(digest_of(data))
    blob.chmod(0o644)
    with open(blob, "r+b") as f:
        f.seek(2 << 20)
        f.write(b"\0" * 16)

    # Then the checkout fails and leaves no half file
    with pytest.raises(LocalBlobMissingError, match="damaged"):
        checkout(cas, root, tmp_path / "out")
    assert not (tmp_path / "out" / "big").exists()


def test_damaged_directory_message_is_detected(cas: LocalCas, tmp_path: Path) -> None:
    # Given a root Directory damaged on disk
    _write(tmp_path / "src" / "f", b"f")
    root = import_directory(cas, tmp_path / "src")
    blob = cas.path(root)
    blob.chmod(0o644)
    blob.write_bytes(b"\0" * root.size_bytes)

    # Then reading the tree (in a process that did not write it) fails as
    # missing (it can be fetched again)
    with pytest.raises(LocalBlobMissingError):
        checkout(LocalCas(cas.root), root, tmp_path / "out")
