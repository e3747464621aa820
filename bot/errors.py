"""Errors of ``remex bot``: each decides how a lease is reported.

A failure of the bot itself (a runner that crashed, inputs it could not
fetch) is reported with a retryable lease status, so the server requeues the
job; a command that fails is not an error at all (its exit code is in the
ActionResult).
"""

from __future__ import annotations

from pipeline.errors import RemexError


class BotError(RemexError):
    """Base of the bot's errors."""


class RunnerError(BotError):
    """The runner failed (not the command): the lease is given back to be retried."""

    transient = True


class MissingInputsError(BotError):
    """The server's CAS lacks blobs the action needs (``digests``: ``hash/size``).

    Reported as FAILED_PRECONDITION with MISSING violations, as REAPI asks,
    so the client uploads them and executes again.
    """

    def __init__(self, digests: list[str]) -> None:
        shown = ", ".join(digests[:5]) + (" ..." if len(digests) > 5 else "")
        super().__init__(f"the CAS lacks {len(digests)} input blob(s): {shown}")
        self.digests = digests


class BadActionError(BotError):
    """The action cannot run as given (an output path escaping the input root ...)."""


class LeaseCancelled(BotError):
    """The run was stopped because the lease was cancelled or is being given back."""
