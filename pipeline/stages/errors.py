"""Errors of the stages: an element that cannot be built, and why.

All derive from :class:`StageError` (a :class:`~pipeline.errors.RemexError`)
and are permanent: trying the same stage again with the same spec fails the
same way. Transient trouble (a server down) arrives as the REAPI layer's own
:class:`~pipeline.errors.RemoteError` and is not wrapped.
"""

from __future__ import annotations

from pipeline.errors import RemexError

__all__ = [
    "ArtifactNotFoundError",
    "BuildFailedError",
    "DependencyArtifactMissingError",
    "SourceMissingError",
    "SourceNotFetchedError",
    "SpecError",
    "StageError",
]


class StageError(RemexError):
    """Base of the errors raised by :mod:`pipeline.stages`; ``element`` names the element."""

    def __init__(self, element: str, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message, transient=transient)
        self.element = element


class SpecError(StageError):
    """The build spec is malformed (a bad path, a ``manual`` element without a command)."""

    def __init__(self, element: str, problem: str) -> None:
        super().__init__(element, f"{element}: bad build spec: {problem}")


class BuildFailedError(StageError):
    """The element failed to build: its command exited non-zero, timed out, or
    its configuration names something that is not there.

    Attributes:
        exit_code: the command's exit code, or None when no command ran to its end.
        stdout_tail, stderr_tail: the last lines of the command's output.
        failure_uri: where the failure record was pushed (Remote Asset), if it was.
    """

    def __init__(
        self,
        element: str,
        reason: str,
        *,
        exit_code: int | None = None,
        stdout_tail: str = "",
        stderr_tail: str = "",
        failure_uri: str | None = None,
    ) -> None:
        message = f"{element}: {reason}"
        logs = [
            f"--- {name} (last lines) ---\n{tail.rstrip()}"
            for name, tail in (("stdout", stdout_tail), ("stderr", stderr_tail))
            if tail.strip()
        ]
        if logs:
            message += "\n" + "\n".join(logs)
        super().__init__(element, message)
        self.reason = reason
        self.exit_code = exit_code
        self.stdout_tail = stdout_tail
        self.stderr_tail = stderr_tail
        self.failure_uri = failure_uri


class DependencyArtifactMissingError(StageError):
    """A dependency's artifact is not on the artifact server."""

    def __init__(self, element: str, dependency: str, uri: str) -> None:
        super().__init__(
            element,
            f"{element}: the artifact of dependency {dependency} is not on the artifact "
            f"server ({uri}); build {dependency} first",
        )
        self.dependency = dependency
        self.uri = uri


class SourceMissingError(StageError):
    """A source tree is not in the artifact server's CAS (it was never snapshotted)."""

    def __init__(self, element: str, index: int, kind: str, digest: str) -> None:
        super().__init__(
            element,
            f"{element}: source #{index + 1} ({kind}, tree {digest}) is not in the artifact "
            "server's CAS; sources must be snapshotted there before the build",
        )
        self.digest = digest


class ArtifactNotFoundError(StageError):
    """No artifact (or failure record) is stored under the URI asked for."""

    def __init__(self, uri: str, what: str = "artifact") -> None:
        super().__init__(uri, f"no {what} stored under {uri}")
        self.uri = uri


class SourceNotFetchedError(StageError):
    """A source given by its source cache URI is not in the source cache (its
    fetch node did not run, or the artifact server lost it)."""

    def __init__(self, element: str, index: int, kind: str, uri: str) -> None:
        super().__init__(
            element,
            f"{element}: source #{index + 1} ({kind}) is not in the source cache "
            f"({uri or 'no URI in the spec'}); fetch it first (remex source fetch {element})",
        )
        self.uri = uri
