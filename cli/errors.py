"""The one place where the command line turns errors into messages and exit codes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import click

from pipeline.errors import ConfigError, RemexError

P = ParamSpec("P")
R = TypeVar("R")

RUNTIME_ERROR = 1
"""Exit code: the work could not be done (a server unreachable or failing, a
build that failed) or what was asked for is not there (an unknown build id,
an artifact not found)."""
USAGE_ERROR = 2
"""Exit code: bad input or bad configuration (the user's files, options,
settings)."""
TIMEOUT = 3
"""Exit code: ``--timeout`` passed before the build was done."""


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    """Print ``remex: MESSAGE`` on stderr and exit with ``code``."""
    click.echo(f"remex: {message}", err=True)
    sys.exit(code)


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn remex's errors into one line on stderr and an exit code.

    Exit 2 (:data:`USAGE_ERROR`): a :class:`~pipeline.errors.ConfigError`
    (bad settings, and ElementError: bad project files). Exit 1
    (:data:`RUNTIME_ERROR`): a missing build (``KeyError``), any other RemexError
    (RemoteError: a REAPI server unreachable or failing ...), a broker that
    cannot be reached (Redis or kombu connection errors), a server that
    cannot start (:class:`pipeline.servers.ServerError`). Exit 3: a
    ``TimeoutError``. Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc))
        except RemexError as exc:
            fail(str(exc), code=RUNTIME_ERROR)
        except KeyError as exc:  # not found, as bst: exit 1
            fail(str(exc.args[0]) if exc.args else str(exc), code=RUNTIME_ERROR)
        except TimeoutError as exc:
            fail(str(exc), code=TIMEOUT)
        except Exception as exc:
            message = broker_error_message(exc)
            if message is not None:
                fail(message, code=RUNTIME_ERROR)
            if _is_server_error(exc):
                fail(str(exc), code=RUNTIME_ERROR)
            raise

    return wrapper


def broker_error_message(exc: BaseException) -> str | None:
    """One sentence for an error of the broker's client library, else None.

    redis-py's errors (ConnectionError, TimeoutError, AuthenticationError ...)
    and kombu's OperationalError (Celery publishing to a broker that is gone)
    reach the CLI from the scheduler and from Celery; their text names the
    host and port, never the password.
    """
    # Looked up, not imported: a command that never touched Redis or kombu
    # cannot have raised their errors, and need not pay for importing them.
    for module, name in (
        ("redis.exceptions", "RedisError"),
        ("kombu.exceptions", "OperationalError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            detail = " ".join(str(exc).split()) or type(exc).__name__
            return f"the broker (Redis) failed or cannot be reached: {detail}"
    return None


def _is_server_error(exc: Exception) -> bool:
    # Only ``remex up`` starts servers: their module is loaded iff one was
    # started, so the other commands do not pay for importing it.
    servers = sys.modules.get("pipeline.servers")
    server_error = getattr(servers, "ServerError", None)
    return isinstance(server_error, type) and isinstance(exc, server_error)
