"""Download one file over HTTP(S) or FTP: bounded retries, failover, verified by sha256.

:func:`download` tries candidate URLs in order (mirrors first, as
:meth:`SourceContext.url_candidates` orders them). On one URL, connection
errors, timeouts, 408, 429 and 5xx answers are retried with exponential
backoff and equal jitter, ``retries`` times at most; a ``Retry-After`` the
server sends is waited for (never longer than :data:`RETRY_AFTER_CAP`). Any
other 4xx, a wrong sha256, or spent retries move on to the next URL.

The bytes stream into a temporary file in the fetch's scratch folder while
their sha256 is computed; the file gets its final name (``os.replace``) only
once the sha256 is the expected one, and a failed attempt removes its
temporary file. Bytes are stored as the server sent them (no
``Content-Encoding`` decoding), as BuildStream stores them.

HTTP goes through ``requests``: TLS is verified (with
:attr:`NetworkSettings.ca_bundle` when set), proxies and ``.netrc`` come from
the environment, and ``user:password@`` in a URL is sent as basic auth. FTP
goes through the standard library's ``urllib`` (``requests`` has no FTP).
Credentials never appear in messages (:func:`redact_url`).
"""

from __future__ import annotations

import email.utils
import ftplib
import hashlib
import math
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pipeline.elements.errors import SourceError
from pipeline.elements.sources.base import FetchContext, FetchRequest, NetworkSettings

if TYPE_CHECKING:
    # Imported where used: loading a project (remex build, show) imports this
    # module for its kinds, and requests alone costs ~70 ms of start-up.
    import requests

__all__ = [
    "RETRY_AFTER_CAP",
    "DownloadOrigin",
    "Downloaded",
    "download",
    "redact_url",
]

#: The longest ``Retry-After`` honoured, in seconds; a longer one waits this long.
RETRY_AFTER_CAP = 60.0
_CHUNK = 1 << 16
# How often progress is reported: every so many bytes (and at the end).
_PROGRESS_STEP = 1 << 20
# Answers that say "the same request may succeed later".
_TRANSIENT_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class DownloadOrigin:
    """Which source a download is for, as its error messages name it.

    Attributes:
        element: the element's name ("" when not known, e.g. ``remex source track``).
        index: the source's position in the element's ``sources``.
        field: where it is written (``sources[0]``).
        file: the element's file as shown to the user.
        kind: the source kind.
    """

    element: str
    index: int
    field: str
    file: str
    kind: str

    @classmethod
    def of(cls, request: FetchRequest) -> DownloadOrigin:
        """The origin a fetch request names."""
        return cls(
            element=request["element"],
            index=request["index"],
            field=request["field"],
            file=request["file"],
            kind=request["kind"],
        )

    def describe(self) -> str:
        """``element app.bst, source 0 (tar)``."""
        who = f"element {self.element}, " if self.element else ""
        return f"{who}source {self.index} ({self.kind})"


@dataclass(frozen=True)
class Downloaded:
    """A verified download.

    Attributes:
        path: where it is, in the fetch's scratch folder.
        sha256: its hex sha256.
        url: the candidate that served it (credentials included: never log it).
        size: its size in bytes.
    """

    path: Path
    sha256: str
    url: str
    size: int


class _AttemptFailed(Exception):
    """One attempt at one URL failed; ``retry`` says whether the same URL may work later."""

    def __init__(self, reason: str, *, retry: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.retry_after = retry_after


@dataclass
class _Tried:
    url: str
    reason: str
    transient: bool


@dataclass
class _Attempt:
    """State of one download into one temporary file."""

    settings: NetworkSettings
    progress: Callable[[int, int | None], None]
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    done: int = 0


def redact_url(url: str) -> str:
    """``url`` without its ``user:password@`` part, and with secret-looking query
    parameters (``token``, ``password``, ``signature`` ...) masked, for messages
    and progress reports."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        secret = ("password", "passwd", "token", "access_token", "secret", "key", "signature")
        cleaned = [(k, "***" if k.lower() in secret else v) for k, v in pairs]
        query = urllib.parse.urlencode(cleaned, safe="*")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def download(
    urls: Sequence[str],
    ctx: FetchContext,
    *,
    name: str,
    sha256: str | None,
    origin: DownloadOrigin,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> Downloaded:
    """Download the first candidate of ``urls`` whose content has ``sha256``.

    Args:
        urls: the candidates, in the order to try them.
        ctx: scratch folder (``ctx.workdir``), network settings, progress callback.
        name: the file's name in ``ctx.workdir`` once verified.
        sha256: the expected hex sha256; None takes the first complete download
            (tracking a URL's current content).
        origin: the source, for messages.
        sleep: waits between retries (tests pass a fake).
        rng: jitter source (tests pass a seeded one).

    Returns:
        the verified file in ``ctx.workdir``.

    Raises:
        SourceError: every candidate failed. The message names the source,
            every URL tried (credentials removed) with why, and the expected
            and actual sha256 where they differed. ``transient`` is True when
            some URL failed in a way that may pass later (network, 5xx).
    """
    if not urls:
        raise _error(origin, f"{origin.describe()}: no URL to download from")
    rng = rng or random.Random()
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    target = ctx.workdir / name
    tried: list[_Tried] = []
    import requests

    with requests.Session() as session:
        for url in urls:
            result = _download_one(session, url, ctx, sha256, sleep, rng, tried)
            if result is not None:
                temp, digest, size = result
                os.replace(temp, target)
                return Downloaded(path=target, sha256=digest, url=url, size=size)
    transient = any(t.transient for t in tried)
    listing = "; ".join(f"{redact_url(t.url)}: {t.reason}" for t in tried)
    expected = f" (expected sha256 {sha256})" if sha256 else ""
    error = _error(origin, f"{origin.describe()}: download failed{expected}: {listing}")
    error.transient = transient
    raise error


def _error(origin: DownloadOrigin, message: str) -> SourceError:
    return SourceError(message, file=origin.file or None, field=origin.field or None)


def _download_one(
    session: requests.Session,
    url: str,
    ctx: FetchContext,
    sha256: str | None,
    sleep: Callable[[float], None],
    rng: random.Random,
    tried: list[_Tried],
) -> tuple[Path, str, int] | None:
    """Try one URL (with its retries); the verified temporary file, or None (noted in ``tried``)."""
    settings = ctx.network
    attempt_number = 0
    while True:
        fd, temp_name = tempfile.mkstemp(dir=ctx.workdir, prefix=".download-", suffix=".part")
        temp = Path(temp_name)
        keep = False
        try:
            with os.fdopen(fd, "wb") as out:
                attempt = _Attempt(settings, ctx.progress)
                _stream(session, url, attempt, out)
            digest = attempt.hasher.hexdigest()
            if sha256 is not None and digest != sha256:
                tried.append(_Tried(url, f"sha256 is {digest}, expected {sha256}", False))
                return None
            keep = True
            return temp, digest, attempt.done
        except _AttemptFailed as failure:
            if not failure.retry or attempt_number >= settings.retries:
                spent = f" (after {attempt_number + 1} attempts)" if attempt_number else ""
                tried.append(_Tried(url, failure.reason + spent, failure.retry))
                return None
            sleep(_backoff(settings, attempt_number, failure.retry_after, rng))
            attempt_number += 1
        finally:
            if not keep:
                temp.unlink(missing_ok=True)


def _backoff(
    settings: NetworkSettings, attempt: int, retry_after: float | None, rng: random.Random
) -> float:
    """Equal jitter: a random time in [c/2, c], c = backoff * 2**attempt; at least the
    server's Retry-After (capped)."""
    ceiling = settings.backoff * (2**attempt)
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return delay


def _stream(session: requests.Session, url: str, attempt: _Attempt, out: BinaryIO) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        chunks, total = _http_chunks(session, url, attempt.settings)
    elif scheme == "ftp":
        chunks, total = _ftp_chunks(url, attempt.settings)
    else:
        raise _AttemptFailed(f"unsupported URL scheme {scheme!r}", retry=False)
    reported = 0
    attempt.progress(0, total)
    for chunk in chunks:
        out.write(chunk)
        attempt.hasher.update(chunk)
        attempt.done += len(chunk)
        if attempt.done - reported >= _PROGRESS_STEP:
            attempt.progress(attempt.done, total)
            reported = attempt.done
    if total is not None and attempt.done != total:
        raise _AttemptFailed(f"connection closed after {attempt.done} of {total} bytes", retry=True)
    attempt.progress(attempt.done, total)


def _http_chunks(
    session: requests.Session, url: str, settings: NetworkSettings
) -> tuple[Iterator[bytes], int | None]:
    import requests

    verify: bool | str = str(settings.ca_bundle) if settings.ca_bundle is not None else True
    try:
        response = session.get(
            url,
            stream=True,
            timeout=(settings.connect_timeout, settings.read_timeout),
            verify=verify,
            # The stored bytes must be the server's: no transparent gzip.
            headers={"Accept-Encoding": "identity"},
        )
    except requests.exceptions.SSLError as exc:
        raise _AttemptFailed(f"TLS error: {_short(exc)}", retry=False) from None
    except requests.exceptions.InvalidURL as exc:
        raise _AttemptFailed(f"invalid URL: {_short(exc)}", retry=False) from None
    except requests.exceptions.Timeout:
        raise _AttemptFailed("timed out", retry=True) from None
    except requests.exceptions.RequestException as exc:
        raise _AttemptFailed(f"connection failed: {_short(exc)}", retry=True) from None
    status = response.status_code
    if status != 200:
        response.close()
        transient = status >= 500 or status in _TRANSIENT_STATUS
        retry_after = _retry_after(response.headers.get("Retry-After"))
        reason = f"HTTP {status}" + (f" {response.reason}" if response.reason else "")
        raise _AttemptFailed(reason, retry=transient, retry_after=retry_after)
    total = _content_length(response)
    return _http_body(response), total


def _http_body(response: requests.Response) -> Iterator[bytes]:
    import requests

    try:
        yield from response.raw.stream(_CHUNK, decode_content=False)
    except requests.exceptions.RequestException as exc:
        raise _AttemptFailed(f"download interrupted: {_short(exc)}", retry=True) from None
    except Exception as exc:  # urllib3's ReadTimeoutError, ProtocolError ...
        if isinstance(exc, _AttemptFailed):
            raise
        what = "timed out" if "timed out" in str(exc).lower() else f"interrupted: {_short(exc)}"
        raise _AttemptFailed(f"download {what}", retry=True) from None
    finally:
        response.close()


def _content_length(response: requests.Response) -> int | None:
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def _ftp_chunks(url: str, settings: NetworkSettings) -> tuple[Iterator[bytes], int | None]:
    # urllib's FTP handler takes one timeout for connecting and reading.
    timeout = max(settings.connect_timeout, settings.read_timeout)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.URLError as exc:
        # urllib wraps ftplib's error once or twice, chained as cause or context.
        inner = _ftplib_error(exc)
        if inner is not None:
            # error_perm: a 5xx reply (no such file, login refused): asking again will not help.
            retry = not isinstance(inner, ftplib.error_perm)
            raise _AttemptFailed(f"FTP error: {_short(inner)}", retry=retry) from None
        raise _AttemptFailed(f"FTP error: {_short(exc)}", retry=True) from None
    except (OSError, ftplib.Error) as exc:
        raise _AttemptFailed(f"FTP error: {_short(exc)}", retry=True) from None
    length = response.headers.get("Content-length", "")
    total = int(length) if str(length).isdigit() else None

    def body() -> Iterator[bytes]:
        try:
            while chunk := response.read(_CHUNK):
                yield chunk
        except (OSError, ftplib.Error) as exc:
            raise _AttemptFailed(f"FTP download interrupted: {_short(exc)}", retry=True) from None
        finally:
            response.close()

    return body(), total


def _ftplib_error(exc: BaseException) -> ftplib.Error | None:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None or isinstance(seen, ftplib.Error):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _short(exc: BaseException) -> str:
    """An exception's text on one line, the innermost reason first (urllib3 wraps a
    refused connection in two layers of pool and URL details)."""
    inner: BaseException = exc
    for _ in range(4):
        nested = inner.args[0] if inner.args else None
        reason = getattr(nested, "reason", None) if nested is not None else None
        if isinstance(nested, BaseException) and isinstance(reason, BaseException):
            inner = reason
        elif isinstance(nested, BaseException):
            inner = nested
        else:
            break
    text = " ".join(str(inner).split())
    # "HTTPConnection(host='h', port=1): Failed to ..." -> "Failed to ..."
    text = re.sub(r"^\w*Connection(Pool)?\([^)]*\): ", "", text)
    return text[:300]
