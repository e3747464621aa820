"""Downloads against a real loopback HTTP server (pipeline.testing.httpserver):
retries, Retry-After, timeouts, failover, checksums, credentials, no partial files."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cas import LocalCas, iter_tree
from pipeline.elements.errors import SourceError
from pipeline.elements.sources import FetchContext, FetchRequest, NetworkSettings, TarSource
from pipeline.elements.sources.download import DownloadOrigin, download
from pipeline.testing.httpserver import HttpServerProcess, LoopbackHttpServer

FAST = NetworkSettings(connect_timeout=2.0, read_timeout=2.0, retries=3, backoff=0.01)


def make_tarball(path: Path, text: bytes = b"hello\n") -> str:
    """``pkg-1.0/hello.txt`` in a gzipped tarball; returns its sha256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("pkg-1.0/hello.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


@pytest.fixture
def served(tmp_path: Path) -> Path:
    folder = tmp_path / "served"
    folder.mkdir()
    return folder


@pytest.fixture
def server(served: Path) -> Iterator[LoopbackHttpServer]:
    with LoopbackHttpServer(served, retry_after=0.3) as s:
        yield s


@pytest.fixture
def ctx(tmp_path: Path) -> FetchContext:
    return FetchContext(
        cas=LocalCas(tmp_path / "cas"),
        workdir=tmp_path / "work",
        cache_dir=tmp_path / "cache",
        network=FAST,
    )


def request(urls: list[str], ref: str) -> FetchRequest:
    return FetchRequest(
        kind="tar",
        key="k" * 64,
        element="base/pkg.bst",
        index=2,
        field="sources[2]",
        file="elements/base/pkg.bst",
        urls=urls,
        config={"ref": ref, "base-dir": "*"},
    )


def staged_files(cas: LocalCas, root: object) -> dict[str, bytes]:
    out = {}
    for path, directory in iter_tree(cas, root):  # type: ignore[arg-type]
        for f in directory.files:
            out[f"{path}/{f.name}" if path else f.name] = cas.get(f.digest)
    return out


def test_a_tarball_is_downloaded_once_and_staged(
    served: Path, server: LoopbackHttpServer, ctx: FetchContext
) -> None:
    # Given a tarball on the server
    ref = make_tarball(served / "pkg.tar.gz")
    seen: list[tuple[int, int | None]] = []
    ctx.progress = lambda done, total: seen.append((done, total))
    # When a worker fetches it
    root = TarSource.fetch(request([server.url("pkg.tar.gz")], ref), ctx)
    # Then its base-dir's content is the tree, fetched with one GET
    assert staged_files(ctx.cas, root) == {"hello.txt": b"hello\n"}
    assert server.count(file="pkg.tar.gz") == 1
    size = (served / "pkg.tar.gz").stat().st_size
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    # And nothing is left in the scratch folder
    assert list(ctx.workdir.iterdir()) == []


def test_a_flaky_endpoint_succeeds_after_retries_honouring_retry_after(
    served: Path, server: LoopbackHttpServer, ctx: FetchContext
) -> None:
    # Given an endpoint answering 503 with Retry-After 0.3 twice, then the file
    ref = make_tarball(served / "pkg.tar.gz")
    started = time.monotonic()
    root = TarSource.fetch(request([server.url("flaky/2/pkg.tar.gz")], ref), ctx)
    # Then the third GET got it, after waiting at least the two Retry-Afters
    assert staged_files(ctx.cas, root) == {"hello.txt": b"hello\n"}
    assert server.count("flaky/2/pkg.tar.gz", status=503) == 2
    assert server.count("flaky/2/pkg.tar.gz", status=200) == 1
    assert time.monotonic() - started >= 0.6


def test_retries_are_bounded_and_backoff_grows_with_jitter(
    served: Path, server: LoopbackHttpServer, ctx: FetchContext
) -> None:
    # Given an endpoint that always answers 500, and a recording sleep
    waits: list[float] = []
    ctx.network = NetworkSettings(retries=3, backoff=1.0, connect_timeout=2, read_timeout=2)
    origin = DownloadOrigin("e.bst", 0, "sources[0]", "elements/e.bst", "tar")
    with pytest.raises(SourceError) as info:
        download([server.url("status/500/x")], ctx, name="x", sha256="0" * 64, origin=origin,
                 sleep=waits.append, rng=random.Random(1))  # fmt: skip
    # Then 1 + 3 attempts were made, waiting in [c/2, c] with c = 1, 2, 4
    assert server.count("status/500/x") == 4
    assert len(waits) == 3
    for wait, ceiling in zip(waits, (1.0, 2.0, 4.0), strict=True):
        assert ceiling / 2 <= wait <= ceiling
    # And the failure is transient (a 5xx may pass later) and says what happened
    assert info.value.transient
    assert "HTTP 500" in str(info.value) and "after 4 attempts" in str(info.value)


def test_a_hung_endpoint_times_out_and_fails_over_to_a_mirror(
    served: Path, server: LoopbackHttpServer, ctx: FetchContext
) -> None:
    # Given a primary that never answers and a mirror that has the file
    ref = make_tarball(served / "pkg.tar.gz")
    ctx.network = NetworkSettings(connect_timeout=1, read_timeout=0.5, retries=1, backoff=0.01)
    started = time.monotonic()
    urls = [server.url("hang/pkg.tar.gz"), server.url("pkg.tar.gz")]
    root = TarSource.fetch(request(urls, ref), ctx)
    # Then after two timed-out attempts on the primary the mirror served it
    assert staged_files(ctx.cas, root) == {"hello.txt": b"hello\n"}
    assert len([e for e in server.entries if e.path == "/hang/pkg.tar.gz"]) == 2
    assert server.count(file="pkg.tar.gz", status=200) == 1
    assert time.monotonic() - started < 10


def test_wrong_bytes_everywhere_are_refused_naming_the_source_and_both_hashes(
    served: Path, server: LoopbackHttpServer, ctx: FetchContext
) -> None:
    # Given two candidates, both serving bytes whose sha256 is not the ref
    ref = make_tarball(served / "pkg.tar.gz")
    data = bytearray((served / "pkg.tar.gz").read_bytes())
    data[0] ^= 0xFF
    actual = hashlib.sha256(data).hexdigest()
    urls = [
        server.url("wrong/pkg.tar.gz", user=("alice", "s3cret")),
        server.url("wrong/pkg.tar.gz"),
    ]
    with pytest.raises(SourceError) as info:
        TarSource.fetch(request(urls, ref), ctx)
    error = info.value
    message = str(error)
    # Then the error is permanent and names element, source index, URLs, both hashes
    assert not error.transient
    assert "element base/pkg.bst, source 2 (tar)" in message
    assert error.file == "elements/base/pkg.bst" and error.field == "sources[2]"
    assert f"expected sha256 {ref}" in message and f"sha256 is {actual}" in message
    assert message.count(f"{server.base_url}/wrong/pkg.tar.gz") == 2
    # And no credentials, no retry on a checksum mismatch, no file left behind
    assert "s3cret" not in message and "alice" not in message
    assert server.count("wrong/pkg.tar.gz") == 2
    assert list(ctx.workdir.iterdir()) == []


def test_wrong_bytes_fail_over_to_the_next_candidate(
    served: Path, server: LoopbackHttpServer, ctx: FetchContext
) -> None:
    ref = make_tarball(served / "pkg.tar.gz")
    urls = [server.url("wrong/pkg.tar.gz"), server.url("status/404/x"), server.url("pkg.tar.gz")]
    root = TarSource.fetch(request(urls, ref), ctx)
    assert staged_files(ctx.cas, root) == {"hello.txt": b"hello\n"}
    # A 404 is not retried: one GET each
    assert [server.count(p) for p in ("wrong/pkg.tar.gz", "status/404/x", "pkg.tar.gz")] == [1] * 3


def test_a_4xx_everywhere_is_permanent(server: LoopbackHttpServer, ctx: FetchContext) -> None:
    with pytest.raises(SourceError) as info:
        urls = [server.url("none.tar"), server.url("status/403/x")]
        TarSource.fetch(request(urls, "0" * 64), ctx)
    assert not info.value.transient
    assert "HTTP 404" in str(info.value) and "HTTP 403" in str(info.value)
    assert list(ctx.workdir.iterdir()) == []


def test_basic_auth_from_the_url(served: Path, tmp_path: Path, ctx: FetchContext) -> None:
    # Given a server that wants basic auth
    ref = make_tarball(served / "pkg.tar.gz")
    with LoopbackHttpServer(served, auth=("bob", "pw:1")) as server:
        # Then without credentials it is a 401, with them the file
        with pytest.raises(SourceError, match="HTTP 401"):
            TarSource.fetch(request([server.url("pkg.tar.gz")], ref), ctx)
        root = TarSource.fetch(request([server.url("pkg.tar.gz", user=("bob", "pw:1"))], ref), ctx)
    assert staged_files(ctx.cas, root) == {"hello.txt": b"hello\n"}


def test_a_server_process_killed_fails_over_to_the_mirror(
    served: Path, tmp_path: Path, server: LoopbackHttpServer, ctx: FetchContext
) -> None:
    # Given the primary as a separate process, killed by its pid
    ref = make_tarball(served / "pkg.tar.gz")
    with HttpServerProcess(served, tmp_path / "primary.log") as primary:
        root = TarSource.fetch(request([primary.url("pkg.tar.gz")], ref), ctx)
        assert staged_files(ctx.cas, root) == {"hello.txt": b"hello\n"}
        assert primary.count(file="pkg.tar.gz", status=200) == 1
        primary_url = primary.url("pkg.tar.gz")
        primary.kill()
    # When the primary is down, then the mirror (second candidate) serves it
    root = TarSource.fetch(request([primary_url, server.url("pkg.tar.gz")], ref), ctx)
    assert staged_files(ctx.cas, root) == {"hello.txt": b"hello\n"}
    assert server.count(file="pkg.tar.gz") == 1


def test_the_temporary_file_is_removed_when_a_download_is_cut_off(
    served: Path, tmp_path: Path, ctx: FetchContext
) -> None:
    # Given a slow endpoint and a server that stops mid-download
    (served / "big.bin").write_bytes(b"x" * 400_000)
    ctx.network = NetworkSettings(connect_timeout=1, read_timeout=1, retries=0, backoff=0.01)
    server = LoopbackHttpServer(served, slow_chunk=8192, slow_interval=0.05).start()
    seen: list[int] = []

    def progress(done: int, total: int | None) -> None:
        seen.append(done)
        # A file in the scratch folder exists only while downloading, hidden
        names = [p.name for p in ctx.workdir.iterdir()]
        assert all(n.startswith(".download-") and n.endswith(".part") for n in names)
        if done >= 1 << 20 or len(seen) > 1:
            return
        server.stop()  # the server goes away after the headers

    ctx.progress = progress
    origin = DownloadOrigin("e.bst", 0, "sources[0]", "elements/e.bst", "remote")
    with pytest.raises(SourceError) as info:
        download([server.url("slow/big.bin")], ctx, name="big", sha256=None, origin=origin)
    # Then the error is transient and nothing is left in the scratch folder
    assert info.value.transient
    assert list(ctx.workdir.iterdir()) == []
