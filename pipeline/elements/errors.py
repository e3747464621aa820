"""Errors of project and element loading.

Every message names where the problem is, as ``file:line: field: what``, e.g.
``elements/app.bst:7: config.build-commands: expected a list of strings``.
The parts are kept as attributes too, for programs and tests.
"""

from __future__ import annotations

from pipeline.errors import ConfigError


class ElementError(ConfigError):
    """A problem with a project, an element or a source, found in the user's files.

    Args:
        message: what went wrong.
        file: the file at fault, relative to the project folder (``elements/app.bst``).
        line: 1-based line in ``file``.
        field: the dotted path of the field at fault (``config.build-commands[2]``).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(_format(message, file, line, field))
        self.reason = message
        self.file = file
        self.line = line
        self.field = field


class LoadError(ElementError):
    """The project or an element cannot be loaded: bad YAML, a bad key or value,
    a missing file, a dependency cycle, a source not matching its ref."""


class SourceError(ElementError):
    """A source cannot be staged: a hostile tarball, a local source changed since
    the project was loaded, a git command failing."""


def _format(message: str, file: str | None, line: int | None, field: str | None) -> str:
    where = ""
    if file is not None:
        where = file if line is None else f"{file}:{line}"
    if field:
        where = f"{where}: {field}" if where else field
    return f"{where}: {message}" if where else message
