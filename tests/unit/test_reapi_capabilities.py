"""A server's capabilities, checked against remex and reduced to what it needs."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from pipeline.errors import IncompatibleServerError, RemoteError
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import (
    BATCH_OVERHEAD_MARGIN,
    GRPC_DEFAULT_MESSAGE_LIMIT,
    Remote,
    ServerCapabilities,
    parse_capabilities,
)
from pipeline.reapi.retry import Retrier, RetryPolicy
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from protos.build.bazel.semver import semver_pb2
from tests.fakeserver import serve_capabilities

MiB = 1024 * 1024
WHERE = "grpc://cas.example.com:8980"


def server_caps(
    *,
    low: tuple[int, int] | None = (2, 0),
    high: tuple[int, int] | None = (2, 3),
    digest_functions: tuple[int, ...] = (re_pb2.DigestFunction.SHA256,),
    max_batch: int = 0,
    compressors: tuple[int, ...] = (),
    execution: re_pb2.ExecutionCapabilities | None = None,
    ac_update: bool = False,
) -> re_pb2.ServerCapabilities:
    """A ServerCapabilities message; ``None`` versions are left unset."""
    raw = re_pb2.ServerCapabilities(
        cache_capabilities=re_pb2.CacheCapabilities(
            digest_functions=list(digest_functions),
            max_batch_total_size_bytes=max_batch,
            supported_compressors=list(compressors),
            action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                update_enabled=ac_update
            ),
        )
    )
    if low is not None:
        raw.low_api_version.CopyFrom(semver_pb2.SemVer(major=low[0], minor=low[1]))
    if high is not None:
        raw.high_api_version.CopyFrom(semver_pb2.SemVer(major=high[0], minor=high[1]))
    if execution is not None:
        raw.execution_capabilities.CopyFrom(execution)
    return raw


# ------------------------------------------------------------- API versions


@pytest.mark.parametrize(
    ("low", "high"),
    [((2, 0), (2, 3)), ((2, 0), (2, 0)), ((2, 3), (2, 11)), ((1, 0), (2, 0)), ((2, 1), (2, 2))],
)
def test_overlapping_api_versions_are_accepted(low: tuple[int, int], high: tuple[int, int]) -> None:
    # Given a server whose API range overlaps remex's 2.0..2.3
    raw = server_caps(low=low, high=high)
    # When its capabilities are parsed
    caps = parse_capabilities(raw, where=WHERE)
    # Then they are accepted and the server's range is kept
    assert (caps.low_api, caps.high_api) == (low, high)
    assert caps.raw is raw


@pytest.mark.parametrize(
    ("low", "high", "shown"),
    [
        ((3, 0), (3, 1), "3.0..3.1"),
        ((1, 0), (1, 9), "1.0..1.9"),
        ((2, 4), (2, 5), "2.4..2.5"),
    ],
)
def test_disjoint_api_versions_are_incompatible_naming_both_ranges(
    low: tuple[int, int], high: tuple[int, int], shown: str
) -> None:
    # Given a server whose API range does not overlap remex's
    raw = server_caps(low=low, high=high)
    # When its capabilities are parsed
    with pytest.raises(IncompatibleServerError) as info:
        parse_capabilities(raw, where=WHERE)
    # Then the error names the server, its range and remex's range, and is permanent
    message = str(info.value)
    assert WHERE in message
    assert shown in message
    assert "2.0..2.3" in message
    assert info.value.transient is False
    assert info.value.code == "FAILED_PRECONDITION"
    assert isinstance(info.value, RemoteError)


def test_missing_api_versions_default_to_2_0() -> None:
    # Given a server that reports no API versions at all
    raw = server_caps(low=None, high=None)
    # When its capabilities are parsed
    caps = parse_capabilities(raw, where=WHERE)
    # Then it is taken to speak 2.0 only
    assert caps.low_api == (2, 0)
    assert caps.high_api == (2, 0)


def test_missing_high_api_version_defaults_to_the_low_one() -> None:
    # Given a server reporting only a low version of 2.2
    caps = parse_capabilities(server_caps(low=(2, 2), high=None), where=WHERE)
    # Then its high version is taken to be 2.2 as well
    assert caps.high_api == (2, 2)


def test_missing_high_version_with_a_too_new_low_one_is_incompatible() -> None:
    # Given a server reporting only a low version of 3.0
    # When its capabilities are parsed
    # Then it is incompatible
    with pytest.raises(IncompatibleServerError, match=r"3\.0\.\.3\.0"):
        parse_capabilities(server_caps(low=(3, 0), high=None), where=WHERE)


def test_missing_low_version_defaults_to_2_0() -> None:
    # Given a server reporting only a high version of 2.3
    caps = parse_capabilities(server_caps(low=None, high=(2, 3)), where=WHERE)
    # Then its low version is taken to be 2.0
    assert (caps.low_api, caps.high_api) == ((2, 0), (2, 3))


# --------------------------------------------------------- digest functions


def test_a_server_offering_only_sha1_is_incompatible() -> None:
    # Given a server whose CAS speaks SHA1 only
    raw = server_caps(digest_functions=(re_pb2.DigestFunction.SHA1,))
    # When its capabilities are parsed
    with pytest.raises(IncompatibleServerError) as info:
        parse_capabilities(raw, where=WHERE)
    # Then the error says SHA256 is missing and what the server offers
    assert "SHA256" in str(info.value)
    assert "SHA1" in str(info.value)
    assert WHERE in str(info.value)


def test_an_execution_service_offering_only_sha1_is_incompatible() -> None:
    # Given a server without cache digest functions whose execution service says SHA1
    raw = server_caps(
        digest_functions=(),
        execution=re_pb2.ExecutionCapabilities(
            digest_function=re_pb2.DigestFunction.SHA1, exec_enabled=True
        ),
    )
    # When its capabilities are parsed
    # Then it is incompatible
    with pytest.raises(IncompatibleServerError, match="SHA1"):
        parse_capabilities(raw, where=WHERE)


@pytest.mark.parametrize(
    "functions",
    [
        (re_pb2.DigestFunction.SHA256,),
        (re_pb2.DigestFunction.SHA1, re_pb2.DigestFunction.SHA256),
        (re_pb2.DigestFunction.BLAKE3, re_pb2.DigestFunction.SHA256),
    ],
    ids=["sha256", "sha1+sha256", "blake3+sha256"],
)
def test_a_server_offering_sha256_among_others_is_accepted(functions: tuple[int, ...]) -> None:
    # Given a server offering SHA256, maybe besides others
    # When its capabilities are parsed
    # Then they are accepted
    parse_capabilities(server_caps(digest_functions=functions), where=WHERE)


def test_sha256_from_the_execution_capabilities_counts() -> None:
    # Given a server whose cache lists SHA1 but whose execution service uses SHA256
    raw = server_caps(
        digest_functions=(re_pb2.DigestFunction.SHA1,),
        execution=re_pb2.ExecutionCapabilities(
            digest_function=re_pb2.DigestFunction.SHA256,
            digest_functions=[re_pb2.DigestFunction.SHA256],
        ),
    )
    # When its capabilities are parsed
    # Then they are accepted
    parse_capabilities(raw, where=WHERE)


def test_a_server_naming_no_digest_function_is_taken_to_use_sha256() -> None:
    # Given an (old) server that lists no digest functions, or only UNKNOWN
    for functions in ((), (re_pb2.DigestFunction.UNKNOWN,)):
        # When its capabilities are parsed
        # Then they are accepted
        parse_capabilities(server_caps(digest_functions=functions), where=WHERE)


# ------------------------------------------------------------- batch limit


def test_no_batch_limit_means_grpcs_4_mib_minus_the_margin() -> None:
    # Given a server that sets no batch limit (0)
    caps = parse_capabilities(server_caps(max_batch=0), where=WHERE)
    # Then remex still keeps to gRPC's default 4 MiB message limit, minus framing room
    assert 4 * MiB == GRPC_DEFAULT_MESSAGE_LIMIT
    assert caps.max_batch_total_size_bytes == 4 * MiB - BATCH_OVERHEAD_MARGIN


def test_a_batch_limit_above_4_mib_is_capped() -> None:
    # Given a server allowing 100 MiB batches
    caps = parse_capabilities(server_caps(max_batch=100 * MiB), where=WHERE)
    # Then remex still keeps to 4 MiB minus the margin
    assert caps.max_batch_total_size_bytes == 4 * MiB - BATCH_OVERHEAD_MARGIN


@pytest.mark.parametrize("limit", [1 * MiB, 4 * MiB, 2 * BATCH_OVERHEAD_MARGIN])
def test_a_smaller_server_batch_limit_is_kept_minus_the_margin(limit: int) -> None:
    # Given a server with a batch limit of at most 4 MiB
    caps = parse_capabilities(server_caps(max_batch=limit), where=WHERE)
    # Then its limit is used, minus the framing margin
    assert caps.max_batch_total_size_bytes == limit - BATCH_OVERHEAD_MARGIN


@pytest.mark.parametrize("limit", [1, 2, 1000, 32 * 1024, BATCH_OVERHEAD_MARGIN])
def test_a_tiny_server_batch_limit_still_leaves_room_for_data(limit: int) -> None:
    # Given a server whose batch limit is no larger than the framing margin
    caps = parse_capabilities(server_caps(max_batch=limit), where=WHERE)
    # Then the effective limit is positive and within the server's own
    assert 0 < caps.max_batch_total_size_bytes <= limit


# --------------------------------------------------- compression, execution


def test_zstd_is_detected_from_the_supported_compressors() -> None:
    # Given a server whose CAS accepts zstd and deflate
    raw = server_caps(
        compressors=(
            re_pb2.Compressor.IDENTITY,
            re_pb2.Compressor.ZSTD,
            re_pb2.Compressor.DEFLATE,
        )
    )
    # When its capabilities are parsed
    caps = parse_capabilities(raw, where=WHERE)
    # Then zstd is supported and IDENTITY is not listed as a compressor
    assert caps.supports_zstd is True
    assert caps.compressors == frozenset({re_pb2.Compressor.ZSTD, re_pb2.Compressor.DEFLATE})


@pytest.mark.parametrize(
    "compressors",
    [(), (re_pb2.Compressor.IDENTITY,), (re_pb2.Compressor.DEFLATE,)],
    ids=["none", "identity", "deflate"],
)
def test_no_zstd_without_it_in_the_supported_compressors(compressors: tuple[int, ...]) -> None:
    # Given a server whose CAS does not list zstd
    caps = parse_capabilities(server_caps(compressors=compressors), where=WHERE)
    # Then zstd is not supported
    assert caps.supports_zstd is False
    assert re_pb2.Compressor.IDENTITY not in caps.compressors


@pytest.mark.parametrize("enabled", [True, False])
def test_execution_enabled_follows_the_execution_capabilities(enabled: bool) -> None:
    # Given a server with execution capabilities, execution on or off
    raw = server_caps(
        execution=re_pb2.ExecutionCapabilities(
            digest_function=re_pb2.DigestFunction.SHA256, exec_enabled=enabled
        )
    )
    # When its capabilities are parsed
    # Then execution_enabled says so
    assert parse_capabilities(raw, where=WHERE).execution_enabled is enabled


def test_a_cache_only_server_has_no_execution() -> None:
    # Given a server without execution capabilities (a plain CAS)
    caps = parse_capabilities(server_caps(), where=WHERE)
    # Then execution is not enabled
    assert caps.execution_enabled is False


@pytest.mark.parametrize("enabled", [True, False])
def test_action_cache_update_enabled_is_read(enabled: bool) -> None:
    # Given a server that does or does not let clients write the action cache
    caps = parse_capabilities(server_caps(ac_update=enabled), where=WHERE)
    # Then action_cache_update_enabled says so
    assert caps.action_cache_update_enabled is enabled


# ------------------------------------------------------ through a Remote


class FixedCapabilities(re_grpc.CapabilitiesServicer):
    """Answers every GetCapabilities with one message, recording instance names."""

    def __init__(self, answer: re_pb2.ServerCapabilities) -> None:
        self.answer = answer
        self.instance_names: list[str] = []

    def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> re_pb2.ServerCapabilities:
        self.instance_names.append(request.instance_name)
        return self.answer


@pytest.fixture
def capabilities_server() -> Iterator[tuple[FixedCapabilities, int]]:
    servicer = FixedCapabilities(server_caps())
    with serve_capabilities(servicer) as port:
        yield servicer, port


def test_remote_asks_once_for_its_instance_and_parses_the_answer(
    capabilities_server: tuple[FixedCapabilities, int],
) -> None:
    # Given a compatible server and a Remote on one of its instances
    servicer, port = capabilities_server
    servicer.answer = server_caps(
        max_batch=MiB,
        compressors=(re_pb2.Compressor.ZSTD,),
        execution=re_pb2.ExecutionCapabilities(
            digest_function=re_pb2.DigestFunction.SHA256, exec_enabled=True
        ),
    )
    endpoint = Endpoint(f"grpc://127.0.0.1:{port}", instance_name="main")
    with Remote(endpoint, retrier=Retrier(RetryPolicy(max_attempts=1))) as remote:
        # When its capabilities are asked twice
        caps = remote.capabilities()
        again = remote.capabilities()
    # Then one request for the instance was made and the answer reduced
    assert servicer.instance_names == ["main"]
    assert again is caps
    assert isinstance(caps, ServerCapabilities)
    assert caps.max_batch_total_size_bytes == MiB - BATCH_OVERHEAD_MARGIN
    assert caps.supports_zstd
    assert caps.execution_enabled


def test_remote_reports_an_incompatible_server_with_its_url(
    capabilities_server: tuple[FixedCapabilities, int],
) -> None:
    # Given a server that speaks REAPI 3 only
    servicer, port = capabilities_server
    servicer.answer = server_caps(low=(3, 0), high=(3, 1))
    url = f"grpc://127.0.0.1:{port}"
    retrier = Retrier(RetryPolicy(max_attempts=3))
    # When its capabilities are asked
    with (
        Remote(Endpoint(url), retrier=retrier) as remote,
        pytest.raises(IncompatibleServerError) as info,
    ):
        remote.capabilities()
    # Then the error names the URL, and the (permanent) answer was not asked again
    assert url in str(info.value)
    assert len(servicer.instance_names) == 1
