"""A connection to one REAPI server: channel, instance name, retries, capabilities.

Every client in this package (CAS, ActionCache, Execution, Remote Asset) is
built on a :class:`Remote` and makes each RPC through :meth:`Remote.call`, so
the retry policy and the error translation live in one place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from pipeline.errors import IncompatibleServerError
from pipeline.reapi.channel import ConnectionSettings, Endpoint, open_channel
from pipeline.reapi.retry import NO_RETRY, Retrier, RetryPolicy
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from protos.build.bazel.semver import semver_pb2

T = TypeVar("T")

# The REAPI versions remex speaks. 2.1 brought output_paths, which remex uses.
OUR_LOW_API = (2, 0)
OUR_HIGH_API = (2, 3)

# gRPC refuses messages above 4 MiB by default; a server that leaves
# max_batch_total_size_bytes at 0 ("no limit") still has that one.
GRPC_DEFAULT_MESSAGE_LIMIT = 4 * 1024 * 1024
# Room for the request's own framing (digests, instance name) around the data.
BATCH_OVERHEAD_MARGIN = 64 * 1024

DEFAULT_RPC_TIMEOUT = 60.0
"""Seconds one attempt of a unary RPC may take, unless ``request-timeout`` is set."""


def retry_policy(connection: ConnectionSettings) -> RetryPolicy:
    """The retry policy of an endpoint with these settings.

    ``retry-limit`` N means N + 1 attempts; ``retry-delay`` is the first
    backoff. The overall deadline is the default one (60 s) unless
    ``request-timeout`` or ``retry-limit`` is set: then it is long enough for
    every attempt to run its ``request-timeout``, so that ``retry-limit``,
    not the deadline, bounds the attempts at a server that never answers.
    """
    default = RetryPolicy()
    attempts = (
        default.max_attempts if connection.retry_limit is None else connection.retry_limit + 1
    )
    initial = default.initial_backoff if connection.retry_delay is None else connection.retry_delay
    timeout = request_timeout(connection)
    max_backoff = max(default.max_backoff, initial)
    deadline = default.deadline
    if connection.request_timeout is not None or connection.retry_limit is not None:
        deadline = max(deadline, attempts * (timeout + max_backoff))
    return RetryPolicy(
        max_attempts=attempts,
        initial_backoff=initial,
        max_backoff=max_backoff,
        deadline=deadline,
    )


def request_timeout(connection: ConnectionSettings) -> float:
    """Seconds one attempt of a unary RPC may take on an endpoint with these settings."""
    return DEFAULT_RPC_TIMEOUT if connection.request_timeout is None else connection.request_timeout


@dataclass(frozen=True)
class ServerCapabilities:
    """What a server said it can do, reduced to what remex needs."""

    low_api: tuple[int, int]
    high_api: tuple[int, int]
    max_batch_total_size_bytes: int
    """Effective limit for one BatchUpdate/BatchRead request, never 0."""
    compressors: frozenset[int]
    """``Compressor.Value`` numbers the CAS accepts (besides IDENTITY)."""
    execution_enabled: bool
    action_cache_update_enabled: bool
    raw: re_pb2.ServerCapabilities

    @property
    def supports_zstd(self) -> bool:
        return re_pb2.Compressor.ZSTD in self.compressors


def _semver(v: semver_pb2.SemVer) -> tuple[int, int]:
    return (v.major, v.minor)


def parse_capabilities(raw: re_pb2.ServerCapabilities, *, where: str) -> ServerCapabilities:
    """Check a server's capabilities against remex and reduce them.

    Raises:
        IncompatibleServerError: no overlap in API versions, or no SHA-256.
    """
    low = _semver(raw.low_api_version) if raw.HasField("low_api_version") else (2, 0)
    high = _semver(raw.high_api_version) if raw.HasField("high_api_version") else low
    if high < OUR_LOW_API or low > OUR_HIGH_API:
        raise IncompatibleServerError(
            f"{where} speaks REAPI {low[0]}.{low[1]}..{high[0]}.{high[1]}, "
            f"remex speaks {OUR_LOW_API[0]}.{OUR_LOW_API[1]}..{OUR_HIGH_API[0]}.{OUR_HIGH_API[1]}"
        )
    cache = raw.cache_capabilities
    functions = set(cache.digest_functions)
    if raw.HasField("execution_capabilities"):
        functions.add(raw.execution_capabilities.digest_function)
        functions.update(raw.execution_capabilities.digest_functions)
    functions.discard(re_pb2.DigestFunction.UNKNOWN)
    if functions and re_pb2.DigestFunction.SHA256 not in functions:
        names = sorted(re_pb2.DigestFunction.Value.Name(f) for f in functions)
        raise IncompatibleServerError(f"{where} does not offer SHA256 digests (only {names})")
    limit = cache.max_batch_total_size_bytes
    if limit <= 0 or limit > GRPC_DEFAULT_MESSAGE_LIMIT:
        limit = GRPC_DEFAULT_MESSAGE_LIMIT
    # A server limit at or below the margin would leave nothing (or less) for data.
    margin = min(BATCH_OVERHEAD_MARGIN, limit // 2)
    compressors = frozenset(cache.supported_compressors) - {re_pb2.Compressor.IDENTITY}
    return ServerCapabilities(
        low_api=low,
        high_api=high,
        max_batch_total_size_bytes=limit - margin,
        compressors=compressors,
        execution_enabled=raw.execution_capabilities.exec_enabled,
        action_cache_update_enabled=cache.action_cache_update_capabilities.update_enabled,
        raw=raw,
    )


class Remote:
    """One REAPI server (or instance of one).

    Args:
        endpoint: URL, instance name, TLS and token settings.
        retrier: the retry policy for every call (by default the one the
            endpoint's connection settings give, see :func:`retry_policy`).
        invocation_id: sent as ``tool_invocation_id`` in RequestMetadata.
        correlated_id: sent as ``correlated_invocations_id`` (a build id).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        retrier: Retrier | None = None,
        invocation_id: str | None = None,
        correlated_id: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.instance_name = endpoint.instance_name
        self.retrier = retrier or Retrier(retry_policy(endpoint.connection))
        self.request_timeout = request_timeout(endpoint.connection)
        """Seconds one attempt of a unary RPC may take (``request-timeout``)."""
        self.channel: grpc.Channel = open_channel(
            endpoint, invocation_id=invocation_id, correlated_id=correlated_id
        )
        self._stubs: dict[type, Any] = {}
        self._lock = threading.Lock()
        self._capabilities: ServerCapabilities | None = None

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Remote({self.endpoint.url!r}, instance={self.instance_name!r})"

    def close(self) -> None:
        self.channel.close()

    def stub(self, stub_class: type[T]) -> T:
        """The (cached) stub of ``stub_class`` on this channel."""
        with self._lock:
            stub = self._stubs.get(stub_class)
            if stub is None:
                stub = self._stubs[stub_class] = stub_class(self.channel)  # type: ignore[call-arg]
            return stub  # type: ignore[no-any-return]

    def call(self, fn: Callable[[], T], *, what: str) -> T:
        """Run ``fn`` (one or more RPCs) under the retry policy; see :class:`Retrier`."""
        return self.retrier.call(fn, what=f"{what} on {self.endpoint.url}")

    def capabilities(self, *, timeout: float | None = None) -> ServerCapabilities:
        """The server's capabilities (asked once, then cached); ``timeout``
        bounds each attempt (default: :attr:`request_timeout`).

        Raises:
            IncompatibleServerError: the server cannot work with remex.
            RemoteError: the server could not be asked.
        """
        if self._capabilities is None:
            stub = self.stub(re_grpc.CapabilitiesStub)
            request = re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name)
            deadline = self.request_timeout if timeout is None else timeout
            raw = self.call(
                lambda: stub.GetCapabilities(request, timeout=deadline),
                what="GetCapabilities",
            )
            self._capabilities = parse_capabilities(raw, where=self.endpoint.url)
        return self._capabilities


def probe_capabilities(
    url: str, *, instance_name: str = "", timeout: float = 5.0
) -> ServerCapabilities:
    """Ask the server at ``url`` once for its capabilities, without retrying:
    the health check of a server being started (its launcher polls).

    Raises:
        IncompatibleServerError: the server cannot work with remex.
        RemoteError: the server did not answer within ``timeout`` s.
        ConfigError: ``url`` is not an endpoint URL.
    """
    endpoint = Endpoint(url, instance_name=instance_name)
    with Remote(endpoint, retrier=Retrier(NO_RETRY)) as remote:
        return remote.capabilities(timeout=timeout)
