"""The one exception root of remex.

Every error remex raises derives from :class:`RemexError`. Its ``transient``
flag alone decides whether a caller (the RPC retry wrapper, a Celery task)
may try the same work again: transient errors are retried with backoff,
permanent ones fail at once.
"""

from __future__ import annotations


class RemexError(Exception):
    """Base of every remex error.

    Args:
        message: what went wrong, for a person.
        transient: override the class default; True when trying again later may succeed.
    """

    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient


# --- the remote (REAPI) side -------------------------------------------------


class RemoteError(RemexError):
    """A REAPI server answered with an error, or could not be reached.

    ``code`` is the gRPC status code name (``"UNAVAILABLE"``, ``"NOT_FOUND"`` ...).
    """

    def __init__(
        self, message: str, *, code: str = "UNKNOWN", transient: bool | None = None
    ) -> None:
        super().__init__(message, transient=transient)
        self.code = code


class BlobNotFoundError(RemoteError):
    """A blob the caller asked for is not in the remote CAS."""


class MissingBlobsError(RemoteError):
    """Execute failed with FAILED_PRECONDITION: the server's CAS lacks input blobs.

    ``digests`` lists the missing blobs as ``"hash/size"`` strings; it is
    empty when the server did not say which (``detail`` is what it said).
    """

    def __init__(self, digests: list[str], *, detail: str = "", code: str = "") -> None:
        if digests:
            shown = ", ".join(digests[:10]) + (" ..." if len(digests) > 10 else "")
            message = f"the execution server's CAS lacks {len(digests)} input blob(s): {shown}"
        else:
            message = f"the execution server's CAS lacks input blobs: {detail or '(unnamed)'}"
        super().__init__(message, code=code or "FAILED_PRECONDITION", transient=False)
        self.digests = digests


class OperationLostError(RemoteError):
    """The server no longer knows an operation (WaitExecution answered NOT_FOUND)."""

    def __init__(self, operation_name: str, *, transient: bool | None = None) -> None:
        super().__init__(
            f"operation {operation_name!r} is lost on the server",
            code="NOT_FOUND",
            transient=transient,
        )
        self.operation_name = operation_name


class ExecutionError(RemoteError):
    """Execute finished with a non-OK status inside its ExecuteResponse."""


class ProtocolError(RemoteError):
    """A server broke the protocol: a blob not matching its digest, a hostile path,
    a malformed answer. Never retried: the same server will likely do it again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="DATA_LOSS", transient=False)


class DigestMismatchError(ProtocolError):
    """Downloaded (or offered) content does not hash to the digest it was sent for."""


class IncompatibleServerError(RemoteError):
    """The server's capabilities do not fit remex (API version, digest function)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="FAILED_PRECONDITION", transient=False)


# --- the local side ----------------------------------------------------------


class LocalCasError(RemexError):
    """The local content-addressable store failed."""


class LocalBlobMissingError(LocalCasError):
    """A blob is not in the local CAS."""


class UnsafePathError(LocalCasError):
    """A tree names a path that could escape the target folder ('..', '/', '.')
    or a checkout would write through a symlink."""


class BrokerUnavailableError(RemexError):
    """Redis (the broker and the scheduler's state) could not be reached, after
    retrying with backoff for a bounded time."""

    transient = True


class ConfigError(RemexError):
    """Bad configuration or input given by the user."""
