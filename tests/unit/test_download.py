"""The downloader's pure parts: redaction, Retry-After, backoff, refusals without a network."""

from __future__ import annotations

import email.utils
import random
import time
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.elements.errors import SourceError
from pipeline.elements.sources import FetchContext, NetworkSettings
from pipeline.elements.sources.download import (
    RETRY_AFTER_CAP,
    DownloadOrigin,
    _backoff,
    _retry_after,
    download,
    redact_url,
)

ORIGIN = DownloadOrigin("app.bst", 1, "sources[1]", "elements/app.bst", "tar")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:p@host:8443/a.tar?x=1", "https://host:8443/a.tar?x=1"),
        ("https://token@host/a.tar", "https://host/a.tar"),
        ("https://host/a.tar?token=abc&v=2", "https://host/a.tar?token=***&v=2"),
        ("ftp://anonymous:me@ftp.host/pub/a.tar", "ftp://ftp.host/pub/a.tar"),
        ("http://host/a.tar", "http://host/a.tar"),
    ],
)
def test_credentials_are_removed_from_urls(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_retry_after_as_seconds_or_a_date() -> None:
    assert _retry_after("3") == 3.0
    assert _retry_after(" 0.5 ") == 0.5
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("-4") == 0.0
    later = email.utils.formatdate(time.time() + 100, usegmt=True)
    assert 90 <= (_retry_after(later) or 0) <= 101


def test_backoff_is_equal_jitter_and_retry_after_wins_up_to_its_cap() -> None:
    settings = NetworkSettings(backoff=2.0)
    rng = random.Random(7)
    for attempt, ceiling in enumerate((2.0, 4.0, 8.0)):
        for _ in range(20):
            assert ceiling / 2 <= _backoff(settings, attempt, None, rng) <= ceiling
    # A server's longer Retry-After is waited for, but never beyond the cap
    assert _backoff(settings, 0, 30.0, rng) == 30.0
    assert _backoff(settings, 0, 10_000.0, rng) == RETRY_AFTER_CAP


def _ctx(tmp_path: Path) -> FetchContext:
    return FetchContext(cas=LocalCas(tmp_path / "cas"), workdir=tmp_path / "w",
                        cache_dir=tmp_path / "c")  # fmt: skip


def test_an_unsupported_scheme_fails_over_and_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        download(["gopher://u:pw@host/x", "mailto:x@y"], _ctx(tmp_path), name="x",
                 sha256=None, origin=ORIGIN)  # fmt: skip
    message = str(info.value)
    assert message.startswith("elements/app.bst: sources[1]: element app.bst, source 1 (tar)")
    assert "gopher://host/x: unsupported URL scheme 'gopher'" in message
    assert "pw" not in message
    assert not info.value.transient
    assert list((tmp_path / "w").iterdir()) == []


def test_no_candidates_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no URL to download from"):
        download([], _ctx(tmp_path), name="x", sha256=None, origin=ORIGIN)
