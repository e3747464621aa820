"""Real workers keep their local CAS within ``cas.quota`` while elements of
several MB build, and every artifact is still right."""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.servers import RemexStack

MB = 1024 * 1024
QUOTA = 4 * MB
ELEMENT_SIZE = 2 * MB
ELEMENTS = 8
CONCURRENCY = 2


def make_project(folder: Path) -> dict[str, bytes]:
    """``ELEMENTS`` import elements of ``ELEMENT_SIZE`` bytes each (all
    different) and ``all.bst`` depending on them; returns each file's content."""
    (folder / "elements").mkdir(parents=True)
    (folder / "project.conf").write_text("name: quota\nmin-version: 2.0\nelement-path: elements\n")
    contents: dict[str, bytes] = {}
    names = []
    for index in range(ELEMENTS):
        name = f"big{index}"
        data = b"".join(
            hashlib.sha256(f"{name}-{block}".encode()).digest()
            for block in range(ELEMENT_SIZE // 32)
        )
        files = folder / "files" / name
        files.mkdir(parents=True)
        (files / f"{name}.bin").write_bytes(data)
        contents[name] = data
        (folder / "elements" / f"{name}.bst").write_text(
            f"kind: import\nsources:\n- kind: local\n  path: files/{name}\n"
        )
        names.append(f"{name}.bst")
    (folder / "elements" / "all.bst").write_text(
        "kind: stack\ndepends:\n" + "".join(f"- {n}\n" for n in names)
    )
    return contents


@pytest.fixture(scope="module")
def quota_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    """Two workers (2 threads each) whose local CAS quota is 4 MB."""
    with RemexStack(
        tmp_path_factory.mktemp("quota-stack"),
        workers=2,
        concurrency=CONCURRENCY,
        extra_env={"REMEX_CAS_QUOTA": str(QUOTA)},
    ) as stack:
        yield stack


class PeakWatcher:
    """Samples the size of some local CAS folders until stopped."""

    def __init__(self, folders: list[Path]) -> None:
        self.stores = [LocalCas(folder) for folder in folders]
        self.peaks = [0] * len(folders)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for index, store in enumerate(self.stores):
                self.peaks[index] = max(self.peaks[index], store.size_bytes())


def test_workers_keep_their_cas_within_its_quota(quota_stack: RemexStack, tmp_path: Path) -> None:
    # Given elements of 2 MB each, 16 MB in all, and workers with a 4 MB quota
    contents = make_project(tmp_path / "project")
    folders = [worker.cas_dir for worker in quota_stack.workers]

    # When they are built
    with PeakWatcher(folders) as watcher:
        code, output = quota_stack.build_json(tmp_path / "project", "all.bst", timeout=300)

    # Then every element built
    assert code == 0, f"{output}\n{quota_stack.logs()}"
    assert {e["state"] for e in output["elements"]} == {"built"}
    # And no worker's CAS went past its quota by more than what its running
    # stages held (pinned: never removed) when a write passed it
    for folder, peak in zip(folders, watcher.peaks, strict=True):
        assert peak <= QUOTA + CONCURRENCY * ELEMENT_SIZE, (folder, peak)
    # And once they were done, each was within its quota: together far less
    # than the 16 MB they built
    finals = [LocalCas(folder).size_bytes() for folder in folders]
    assert all(final <= QUOTA for final in finals), finals
    # And the artifacts are whole: each checks out with its content
    for name in ("big0", f"big{ELEMENTS - 1}"):
        dest = tmp_path / f"out-{name}"
        result = quota_stack.cli(
            "checkout", "-C", tmp_path / "project", f"{name}.bst", dest, "--no-integrate"
        )
        assert result.returncode == 0, result.stderr
        assert (dest / f"{name}.bin").read_bytes() == contents[name]


SHARED_QUOTA = 12 * MB
GENERATED = 4


def make_generating_project(folder: Path, sysroot: Path) -> dict[str, bytes]:
    """``GENERATED`` ``manual`` elements, each copying a 2 MB input (an
    ``import`` element of its own) into a 2 MB output, on a busybox sysroot;
    returns each output's expected content."""
    shutil.copytree(sysroot, folder / "sysroot", symlinks=True)
    (folder / "elements").mkdir()
    (folder / "project.conf").write_text("name: gen\nmin-version: 2.0\nelement-path: elements\n")
    (folder / "elements" / "base.bst").write_text(
        "kind: import\nsources:\n- kind: local\n  path: sysroot\n"
    )
    expected: dict[str, bytes] = {}
    for index in range(GENERATED):
        data = b"".join(
            hashlib.sha256(f"input{index}-{block}".encode()).digest()
            for block in range(ELEMENT_SIZE // 32)
        )
        files = folder / "files" / f"input{index}" / "data"
        files.mkdir(parents=True)
        (files / f"input{index}.bin").write_bytes(data)
        (folder / "elements" / f"input{index}.bst").write_text(
            f"kind: import\nsources:\n- kind: local\n  path: files/input{index}\n"
        )
        (folder / "elements" / f"gen{index}.bst").write_text(
            "kind: manual\n"
            f"build-depends:\n- base.bst\n- input{index}.bst\n"
            "config:\n"
            "  install-commands:\n"
            f'  - "cp /data/input{index}.bin %{{install-root}}/gen{index}.bin"\n'
            f'  - "echo gen{index} >> %{{install-root}}/gen{index}.bin"\n'
        )
        expected[f"gen{index}"] = data + f"gen{index}\n".encode()
    (folder / "elements" / "all.bst").write_text(
        "kind: stack\ndepends:\n" + "".join(f"- gen{i}.bst\n" for i in range(GENERATED))
    )
    return expected


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    """Two workers (2 threads each) sharing one local CAS folder, quota 12 MB."""
    workdir = tmp_path_factory.mktemp("shared-quota-stack")
    with RemexStack(
        workdir,
        workers=2,
        concurrency=CONCURRENCY,
        extra_env={"REMEX_CAS_QUOTA": str(SHARED_QUOTA), "REMEX_CAS_DIR": str(workdir / "cas")},
    ) as stack:
        yield stack


def test_workers_sharing_a_cas_keep_it_within_its_quota(
    shared_stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given actions whose inputs and outputs come to ~18 MB, and two workers
    # sharing one local CAS folder with a 12 MB quota
    expected = make_generating_project(tmp_path / "project", busybox_sysroot)
    [folder] = {worker.cas_dir for worker in shared_stack.workers}

    # When they are built
    with PeakWatcher([folder]) as watcher:
        code, output = shared_stack.build_json(tmp_path / "project", "all.bst", timeout=300)

    # Then everything built
    assert code == 0, f"{output}\n{shared_stack.logs()}"
    assert {e["state"] for e in output["elements"]} == {"built"}
    # And the shared folder held at most the quota plus what the four
    # running stages used (input root ~4 MB and output 2 MB each)
    assert watcher.peaks[0] <= SHARED_QUOTA + 4 * 3 * ELEMENT_SIZE, watcher.peaks
    # And within its quota once they were done
    assert LocalCas(folder).size_bytes() <= SHARED_QUOTA
    # And the outputs are right
    for name, content in expected.items():
        dest = tmp_path / f"out-{name}"
        result = shared_stack.cli(
            "checkout", "-C", tmp_path / "project", f"{name}.bst", dest, "--no-integrate"
        )
        assert result.returncode == 0, result.stderr
        assert (dest / f"{name}.bin").read_bytes() == content
