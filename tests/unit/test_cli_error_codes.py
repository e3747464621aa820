"""cli.errors.handles_errors: one line on stderr and the exit code for each kind of error."""

from __future__ import annotations

import pytest
import redis

from cli.errors import handles_errors
from pipeline.elements import LoadError
from pipeline.errors import ConfigError, LocalCasError, RemoteError


def exit_of(exc: BaseException, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    @handles_errors
    def command() -> None:
        raise exc

    with pytest.raises(SystemExit) as info:
        command()
    code = info.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (ConfigError("REMEX_CAS_QUOTA: not a size: 'abc'"), 2, "REMEX_CAS_QUOTA"),
        (LoadError("bad", file="elements/a.bst", line=3), 2, "elements/a.bst:3"),
        (KeyError("no build 0123abcd"), 1, "no build 0123abcd"),
        (RemoteError("FetchDirectory on grpc://h:1 failed: UNAVAILABLE"), 1, "UNAVAILABLE"),
        (LocalCasError("cannot write to the local CAS"), 1, "local CAS"),
        (redis.ConnectionError("Error 111 connecting to 127.0.0.1:1.\nRefused."), 1, "127.0.0.1:1"),
        (redis.AuthenticationError("invalid username-password pair"), 1, "invalid"),
        (TimeoutError("still running after 5 s"), 3, "still running"),
    ],
    ids=[
        "config",
        "load",
        "missing-build",
        "remote",
        "local-cas",
        "redis",
        "redis-auth",
        "timeout",
    ],
)
def test_each_kind_of_error_is_one_line_and_its_exit_code(
    capsys: pytest.CaptureFixture[str], exc: BaseException, code: int, text: str
) -> None:
    # When a command raises it
    got, err = exit_of(exc, capsys)

    # Then stderr is one line naming it, and the exit code says what kind it is
    assert got == code
    assert err.startswith("remex: ") and err.count("\n") == 1
    assert text in err


def test_a_bug_keeps_its_traceback() -> None:
    # Given an error that is none of remex's, the broker's or a server's
    @handles_errors
    def command() -> None:
        raise ZeroDivisionError("bug")

    # Then it is not turned into a message
    with pytest.raises(ZeroDivisionError):
        command()
