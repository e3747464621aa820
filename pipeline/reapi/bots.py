"""Bots API client (google.devtools.remoteworkers.v1test2): what ``remex bot`` speaks.

A bot opens a session with ``CreateBotSession`` and then calls
``UpdateBotSession`` over and over: each call reports the state of its leases
(ACTIVE ones are a heartbeat, COMPLETED ones carry the result) and answers
with the leases the server wants it to hold. Both calls are long polls: a
server such as BuildGrid holds the call until it has work for the bot or most
of the client's deadline has passed, and assigns nothing at all when the
deadline is short (BuildGrid 0.4.4: below ~4 s), so bots give ~30 s.

A long poll must not delay a report: :meth:`BotsClient.update_bot_session`
takes an ``interrupt`` event and cancels the call when it is set (a lease
finished, the bot is stopping). The server then drops that call's wait;
nothing is lost, because the next call carries the bot's full state and the
server re-sends any lease it assigned meanwhile (it compares the session
``version``).
"""

from __future__ import annotations

import threading

import grpc

from pipeline.errors import RemoteError
from pipeline.reapi.remote import Remote
from pipeline.reapi.retry import translate_rpc_error
from protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from protos.google.devtools.remoteworkers.v1test2 import bots_pb2_grpc as bots_grpc

__all__ = ["LONG_POLL_TIMEOUT", "BotsClient", "session_is_gone"]

LONG_POLL_TIMEOUT = 30.0
"""Client deadline of one Create/UpdateBotSession long poll, in seconds."""

_SESSION_GONE_CODES = frozenset(
    {"NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "DATA_LOSS"}
)


class BotsClient:
    """The Bots service of one :class:`Remote` (its instance name is the session parent)."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self._stub = remote.stub(bots_grpc.BotsStub)

    def create_bot_session(
        self, session: bots_pb2.BotSession, *, timeout: float = LONG_POLL_TIMEOUT
    ) -> bots_pb2.BotSession:
        """Open a session for ``session.bot_id``; the answer names it and may hold leases.

        A server that knew a session of the same ``bot_id`` closes it (and
        requeues its leases): a restarted bot starts afresh.

        Raises:
            RemoteError: the server refused or failed (after the retry policy).
        """
        request = bots_pb2.CreateBotSessionRequest(
            parent=self.remote.instance_name, bot_session=session
        )
        return self.remote.call(
            lambda: self._stub.CreateBotSession(request, timeout=timeout),
            what="CreateBotSession",
        )

    def update_bot_session(
        self,
        session: bots_pb2.BotSession,
        *,
        timeout: float = LONG_POLL_TIMEOUT,
        interrupt: threading.Event | None = None,
    ) -> bots_pb2.BotSession | None:
        """Report ``session`` (its leases and status); return the server's answer.

        One attempt, no retries: the caller's loop decides (its next call
        carries fresher state than a retry of this one would).

        Args:
            session: the session as the bot sees it now (``name`` as the
                server gave it, ``version`` of the last answer).
            timeout: the long-poll deadline.
            interrupt: when set, the call is cancelled and None is returned.
                It is also set by this call when the answer arrives: clear it
                before building ``session``.

        Returns:
            The answer, or None when ``interrupt`` cut the call short.

        Raises:
            RemoteError: the call failed; ``transient`` says whether trying
                again may succeed (NOT_FOUND/INVALID_ARGUMENT: the server no
                longer knows the session).
        """
        request = bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session)
        what = f"UpdateBotSession on {self.remote.endpoint.url}"
        if interrupt is None:
            try:
                return self._stub.UpdateBotSession(request, timeout=timeout)
            except grpc.RpcError as exc:
                raise translate_rpc_error(exc, what=what) from None
        # The answer rings ``interrupt`` -- but only while this call waits for
        # it: a callback of a call already given up (cancelled, or returned)
        # ringing later would cut the caller's next call short, and so on.
        waiting = [True]

        def ring(_: object) -> None:
            if waiting[0]:
                interrupt.set()

        future = self._stub.UpdateBotSession.future(request, timeout=timeout)
        future.add_done_callback(ring)
        try:
            interrupt.wait()
            if not future.done():
                waiting[0] = False
                future.cancel()
                return None
            return future.result()
        except grpc.FutureCancelledError:
            return None
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:  # cancelled by us
                return None
            raise translate_rpc_error(exc, what=what) from None
        finally:
            waiting[0] = False


def session_is_gone(error: RemoteError) -> bool:
    """True if ``error`` says the server no longer knows the bot's session.

    BuildGrid 0.4.4 answers INVALID_ARGUMENT ("Bot does not exist") once the
    session expired or was replaced, and DATA_LOSS when it closed the session
    over an impossible lease transition; other servers may say NOT_FOUND.
    Either way the server has requeued the session's leases, and the bot must
    open a new session.
    """
    return error.code in _SESSION_GONE_CODES
