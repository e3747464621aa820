"""One lease, from its payload to the status and ActionResult the server gets.

How outcomes map to the lease (BuildGrid requeues a job whose lease completes
with INTERNAL or UNAVAILABLE, up to its attempt limit):

==================================  =======================================
the command ran (any exit code)     OK + ActionResult
it ran past ``Action.timeout``      DEADLINE_EXCEEDED + ActionResult (logs)
the CAS lacks inputs                FAILED_PRECONDITION, MISSING violations
the action is malformed             INVALID_ARGUMENT
the runner or the bot failed        UNAVAILABLE (transient) / INTERNAL: retried
given back (bot stopping)           UNAVAILABLE: retried elsewhere
==================================  =======================================
"""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2

from bot.errors import BadActionError, LeaseCancelled, MissingInputsError
from bot.runners import Runner, RunRequest, remove_tree
from pipeline.digest import digest_to_str
from pipeline.errors import BlobNotFoundError, RemexError
from pipeline.reapi.cas import CasClient
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

__all__ = ["LeaseReport", "LeaseRunner", "action_of", "give_back_report", "status"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseReport:
    """How a finished lease is reported: its status and, when the action ran, its result."""

    status: status_pb2.Status
    result: re_pb2.ActionResult | None = None

    @property
    def code_name(self) -> str:
        return code_pb2.Code.Name(self.status.code)


def status(code: int, message: str = "") -> status_pb2.Status:
    """A ``google.rpc.Status``."""
    return status_pb2.Status(code=code, message=message)


def give_back_report(reason: str) -> LeaseReport:
    """The report of a lease the bot hands back unfinished (the server requeues it)."""
    return LeaseReport(status(code_pb2.UNAVAILABLE, reason))


def action_of(payload: any_pb2.Any, cas: CasClient) -> re_pb2.Action:
    """The Action a lease carries: inline (``Any(Action)``) or by digest (``Any(Digest)``).

    Raises:
        BadActionError: the payload is neither.
        MissingInputsError: the Action named by digest is not in the CAS.
        RemexError: the CAS could not be read.
    """
    action = re_pb2.Action()
    if payload.Unpack(action):
        return action
    digest = re_pb2.Digest()
    if payload.Unpack(digest):
        try:
            return cas.read_message(digest, re_pb2.Action)
        except BlobNotFoundError:
            raise MissingInputsError([digest_to_str(digest)]) from None
    raise BadActionError(f"lease payload is not an Action nor a Digest: {payload.type_url!r}")


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _missing_status(error: MissingInputsError) -> status_pb2.Status:
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type="MISSING", subject=f"blobs/{digest}", description="input blob not in the CAS"
            )
            for digest in error.digests
        ]
    )
    result = status(code_pb2.FAILED_PRECONDITION, str(error))
    result.details.add().Pack(failure)
    return result


class LeaseRunner:
    """Runs leases with a :class:`~bot.runners.Runner` and turns every outcome into a report.

    Args:
        runner: what runs the action.
        cas: the server's CAS (for Actions sent by digest).
        worker_name: ``ExecutedActionMetadata.worker`` (the bot id).
        workdir: where each run gets a private folder.
    """

    def __init__(self, runner: Runner, cas: CasClient, *, worker_name: str, workdir: Path) -> None:
        self.runner = runner
        self.cas = cas
        self.worker_name = worker_name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def __call__(self, payload: any_pb2.Any, cancel: threading.Event) -> LeaseReport:
        """Run the action in ``payload``; setting ``cancel`` stops it.

        Raises:
            LeaseCancelled: ``cancel`` was set (the caller knows why).
        """
        started = _now()
        try:
            action = action_of(payload, self.cas)
            run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))
            try:
                outcome = self.runner.run(RunRequest(action, run_dir, cancel))
            finally:
                remove_tree(run_dir)
        except LeaseCancelled:
            raise
        except MissingInputsError as exc:
            log.warning("lease: %s", exc)
            return LeaseReport(_missing_status(exc))
        except BadActionError as exc:
            log.warning("lease: bad action: %s", exc)
            return LeaseReport(status(code_pb2.INVALID_ARGUMENT, str(exc)))
        except RemexError as exc:
            log.warning("lease: the %s runner failed: %s", self.runner.name, exc)
            code = code_pb2.UNAVAILABLE if exc.transient else code_pb2.INTERNAL
            return LeaseReport(status(code, f"remex bot {self.worker_name}: {exc}"))
        except Exception as exc:  # a bug or an OS failure: the job goes elsewhere
            log.exception("lease: unexpected failure")
            return LeaseReport(status(code_pb2.INTERNAL, f"remex bot {self.worker_name}: {exc!r}"))
        result = outcome.result
        metadata = result.execution_metadata
        metadata.worker = self.worker_name
        metadata.worker_start_timestamp.CopyFrom(started)
        metadata.worker_completed_timestamp.CopyFrom(_now())
        if outcome.timed_out:
            seconds = action.timeout.seconds + action.timeout.nanos / 1e9
            return LeaseReport(
                status(
                    code_pb2.DEADLINE_EXCEEDED, f"the action ran past its timeout ({seconds:g} s)"
                ),
                result,
            )
        return LeaseReport(status(code_pb2.OK), result)
