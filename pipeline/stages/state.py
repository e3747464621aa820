"""The state passed from stage to stage: a small JSON dict.

Each stage takes the state the previous one returned and returns a new dict
(the input is never changed) with what it added. Digests travel as
``{"hash", "size_bytes"}``; the ActionResult, a few hundred bytes, travels
inline as base64 of its serialized form.

Keys (see the stage functions for when each is set):

``action``, ``command``, ``input_root``
    digests of the Action, its Command and its input root (``manual``; else
    ``action`` is None).
``overlaps``
    staging report (:mod:`pipeline.stages.overlaps`): ``count`` and ``paths``
    (absolute; the first ones) of the files a later dependency replaced,
    ``not_whitelisted``, ``details`` (each path's elements, bottom-most
    first, and whether whitelisted), ``unstaged`` files and the
    ``warnings`` as BuildStream words them.
``cached``
    True when the ActionCache already held a successful result (no execution).
``skip_cache_lookup``
    True when the ActionCache held a result that must not be reused (a failure).
``operation``, ``remote_stage``
    the pending operation's name and its REAPI execution stage (QUEUED,
    EXECUTING ...), while ``execute`` waits for it (gone once it is done).
``action_result``
    base64 of the serialized ActionResult.
``files``, ``stdout``, ``stderr``
    digests of the output tree and the logs, in the local CAS.
``exit_code``
    the command's exit code (None for ``import`` and ``stack``).
``execution``
    what the server said about the run: worker, ISO timestamps, seconds.
``artifact``
    digest of the artifact's root Directory, pushed under the artifact URI.
``timings``, ``uploaded``, ``remote_cache_hit``
    observations (wall seconds per stage; blobs and bytes sent; whether
    Execute was answered from the server's ActionCache): the only keys whose
    values may differ when a stage runs twice.
``reupload``, ``reuploads``, ``transient_failures``
    kept by the task runner across re-queues (see :mod:`pipeline.stages.policy`).
    With ``reupload`` or ``reuploads`` set, ``upload`` asks the server what
    it lacks (FindMissingBlobs) instead of sending only what staging made.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Mapping
from typing import Any, TypedDict, cast

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from pipeline.digest import Digest, digest_from_json, digest_to_json
from pipeline.stages.errors import SpecError
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import ActionResult

__all__ = [
    "VOLATILE_KEYS",
    "State",
    "decode_action_result",
    "encode_action_result",
    "is_pending",
    "stable",
    "without_operation",
]

DigestDict = dict[str, Any]
"""A digest as JSON: ``{"hash", "size_bytes"}``."""


class State(TypedDict, total=False):
    """The state a stage hands to the next (see the module docstring for each key)."""

    action: DigestDict | None
    command: DigestDict
    input_root: DigestDict
    overlaps: dict[str, Any]
    rederived_from: str
    cached: bool
    skip_cache_lookup: bool
    operation: str
    remote_stage: str
    action_result: str
    files: DigestDict
    stdout: DigestDict
    stderr: DigestDict
    exit_code: int | None
    execution: dict[str, Any] | None
    artifact: DigestDict
    timings: dict[str, float]
    uploaded: dict[str, int]
    remote_cache_hit: bool
    reupload: bool
    reuploads: int
    transient_failures: int
    source: DigestDict
    """A fetch node's result: the fetched source's tree."""
    downloaded: bool
    """A fetch node's result: whether it downloaded (False: the cache had it)."""


VOLATILE_KEYS = frozenset({"timings", "uploaded", "remote_cache_hit"})
"""State keys that record observations, not results."""

# Keys set by the stages; stage_to_cas clears them so that a chain started
# again from the top never carries a stale result forward.
STAGE_KEYS = frozenset(
    {
        "action",
        "command",
        "input_root",
        "overlaps",
        "rederived_from",
        "cached",
        "skip_cache_lookup",
        "operation",
        "remote_stage",
        "action_result",
        "files",
        "stdout",
        "stderr",
        "exit_code",
        "execution",
        "artifact",
        "timings",
        "uploaded",
        "remote_cache_hit",
    }
)


def stable(state: Mapping[str, Any]) -> State:
    """The state without its observations (:data:`VOLATILE_KEYS`), for comparisons."""
    return cast(State, {k: v for k, v in state.items() if k not in VOLATILE_KEYS})


def without_operation(state: State) -> State:
    """A copy of ``state`` without the pending operation (to Execute afresh)."""
    new = state.copy()
    new.pop("operation", None)
    new.pop("remote_stage", None)
    return new


def is_pending(state: Mapping[str, Any]) -> bool:
    """True when ``execute`` returned before its operation finished."""
    return bool(state.get("operation")) and "action_result" not in state


def encode_action_result(result: ActionResult) -> str:
    return base64.b64encode(result.SerializeToString(deterministic=True)).decode("ascii")


def decode_action_result(element: str, text: str) -> ActionResult:
    """Inverse of :func:`encode_action_result`.

    Raises:
        SpecError: the text is not a base64 ActionResult.
    """
    result = ActionResult()
    try:
        result.ParseFromString(base64.b64decode(text.encode("ascii"), validate=True))
    except (binascii.Error, DecodeError, ValueError, AttributeError) as exc:
        raise SpecError(element, "state['action_result'] is not a base64 ActionResult") from exc
    return result


def digest_in(element: str, state: Mapping[str, Any], key: str) -> Digest:
    """The digest stored under ``key``.

    Raises:
        SpecError: the key is missing or not a digest (a stage ran out of order).
    """
    value = state.get(key)
    if not isinstance(value, dict):
        raise SpecError(element, f"the stage state lacks {key!r} (did an earlier stage run?)")
    try:
        return digest_from_json(value)
    except ValueError as exc:
        raise SpecError(element, f"state[{key!r}] is not a digest: {value!r}") from exc


def with_timing(state: State | dict[str, Any], stage: str, seconds: float) -> State:
    """``state`` (changed in place) with ``seconds`` added to ``timings[stage]``."""
    timings = dict(state.get("timings") or {})
    timings[stage] = round(float(timings.get(stage, 0.0)) + seconds, 4)
    state["timings"] = timings
    return cast(State, state)


def timestamp_iso(ts: Timestamp) -> str | None:
    """ISO 8601 (UTC) of a protobuf Timestamp, or None when it is unset (zero)."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=datetime.UTC).isoformat()


def dj(digest: Digest) -> dict[str, Any]:
    """Short for :func:`pipeline.digest.digest_to_json`."""
    return digest_to_json(digest)
