"""The one place where the command line turns errors into messages and exit codes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import click

from pipeline.errors import RemexError

P = ParamSpec("P")
R = TypeVar("R")

USAGE_ERROR = 2
"""Exit code: bad input, bad configuration, a server that cannot be reached."""
TIMEOUT = 3
"""Exit code: ``--timeout`` passed before the build was done."""


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    """Print ``remex: MESSAGE`` on stderr and exit with ``code``."""
    click.echo(f"remex: {message}", err=True)
    sys.exit(code)


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn remex's errors into one line on stderr and an exit code.

    :class:`~pipeline.errors.RemexError` (ConfigError, ElementError,
    RemoteError ...) and a server that cannot start
    (:class:`pipeline.servers.ServerError`) exit 2, a missing build
    (``KeyError``) exits 2, a ``TimeoutError`` exits 3. Anything else is a
    bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except RemexError as exc:
            fail(str(exc))
        except KeyError as exc:
            fail(str(exc.args[0]) if exc.args else str(exc))
        except TimeoutError as exc:
            fail(str(exc), code=TIMEOUT)
        except Exception as exc:
            if _is_server_error(exc):
                fail(str(exc))
            raise

    return wrapper


def _is_server_error(exc: Exception) -> bool:
    # Only ``remex up`` starts servers: their module is loaded iff one was
    # started, so the other commands do not pay for importing it.
    servers = sys.modules.get("pipeline.servers")
    server_error = getattr(servers, "ServerError", None)
    return isinstance(server_error, type) and isinstance(exc, server_error)
