"""The one exception of the server launchers."""

from __future__ import annotations


class ServerError(RuntimeError):
    """A server could not be started or cleaned up, or a required program is missing."""
