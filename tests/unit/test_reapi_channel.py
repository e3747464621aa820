"""Channels to REAPI servers: URL parsing, RequestMetadata, bearer tokens, TLS.

The servers are real, in-process gRPC servers on 127.0.0.1 (or a unix socket)
that record the metadata of every call; certificates are made on the fly with
the ``cryptography`` package.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import random
import tempfile
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import pipeline
from pipeline.errors import ConfigError, RemoteError
from pipeline.reapi.channel import (
    REQUEST_METADATA_KEY,
    Endpoint,
    Target,
    action_context,
    open_channel,
    parse_url,
)
from pipeline.reapi.remote import Remote
from pipeline.reapi.retry import Retrier, RetryPolicy
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from protos.build.bazel.semver import semver_pb2

# ---------------------------------------------------------------- parse_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("grpc://cas.example.com:8980", Target("cas.example.com:8980", secure=False)),
        ("http://cas.example.com:8080", Target("cas.example.com:8080", secure=False)),
        ("grpcs://cas.example.com:8981", Target("cas.example.com:8981", secure=True)),
        ("https://cas.example.com:8443", Target("cas.example.com:8443", secure=True)),
        ("https://cas.example.com", Target("cas.example.com:443", secure=True)),
        ("grpcs://cas.example.com", Target("cas.example.com:443", secure=True)),
        ("grpc://127.0.0.1:50051", Target("127.0.0.1:50051", secure=False)),
        ("grpc://[::1]:50051", Target("[::1]:50051", secure=False)),
        ("grpcs://[2001:db8::7]", Target("[2001:db8::7]:443", secure=True)),
        ("unix:/run/casd.sock", Target("unix:/run/casd.sock", secure=False)),
        ("unix:///run/casd.sock", Target("unix:/run/casd.sock", secure=False)),
    ],
)
def test_parse_url_accepts_the_documented_forms(url: str, expected: Target) -> None:
    # Given a URL in one of the accepted spellings
    # When it is parsed
    target = parse_url(url)
    # Then it yields the gRPC target and the TLS flag
    assert target == expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://cas.example.com:21",
        "cas.example.com:8980",
        "grpc://cas.example.com",
        "http://cas.example.com",
        "grpc://:8980",
        "grpc://cas.example.com:notaport",
        "grpc://cas.example.com:99999",
        "unix:relative/casd.sock",
        "unix://relative/casd.sock",
        "unix:",
    ],
)
def test_parse_url_rejects_bad_urls_naming_them(url: str) -> None:
    # Given a URL with an unknown scheme, no host, no or a bad port, or a relative socket
    # When it is parsed
    with pytest.raises(ConfigError) as info:
        parse_url(url)
    # Then a permanent ConfigError names the URL
    assert url in str(info.value)
    assert info.value.transient is False


# ------------------------------------------------------------ test servers


def capabilities_message() -> re_pb2.ServerCapabilities:
    return re_pb2.ServerCapabilities(
        cache_capabilities=re_pb2.CacheCapabilities(
            digest_functions=[re_pb2.DigestFunction.SHA256]
        ),
        low_api_version=semver_pb2.SemVer(major=2),
        high_api_version=semver_pb2.SemVer(major=2, minor=3),
    )


@dataclass
class RecordingCapabilities(re_grpc.CapabilitiesServicer):
    """A Capabilities service that records the metadata of each call."""

    calls: list[dict[str, str | bytes]] = field(default_factory=list)

    def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> re_pb2.ServerCapabilities:
        self.calls.append(dict(context.invocation_metadata()))
        return capabilities_message()

    def request_metadata(self, index: int) -> re_pb2.RequestMetadata:
        raw = self.calls[index][REQUEST_METADATA_KEY]
        assert isinstance(raw, bytes)
        return re_pb2.RequestMetadata.FromString(raw)


@dataclass
class Server:
    servicer: RecordingCapabilities
    port: int


def start_server(
    address: str, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.Server, RecordingCapabilities, int]:
    servicer = RecordingCapabilities()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    re_grpc.add_CapabilitiesServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    server.start()
    return server, servicer, port


@pytest.fixture
def server() -> Iterator[Server]:
    grpc_server, servicer, port = start_server("127.0.0.1:0")
    try:
        yield Server(servicer, port)
    finally:
        grpc_server.stop(grace=None)


def one_shot() -> Retrier:
    """A retrier that never retries, so failures show at once and never sleep."""
    return Retrier(RetryPolicy(max_attempts=1))


def ask(remote: Remote) -> re_pb2.ServerCapabilities:
    """One GetCapabilities RPC, bypassing Remote's cache of the answer."""
    stub = remote.stub(re_grpc.CapabilitiesStub)
    request = re_pb2.GetCapabilitiesRequest(instance_name=remote.instance_name)
    return remote.call(lambda: stub.GetCapabilities(request, timeout=5), what="GetCapabilities")


# --------------------------------------------------------- RequestMetadata


def test_every_call_carries_request_metadata_naming_remex(server: Server) -> None:
    # Given a Remote on a recording server
    with Remote(Endpoint(f"grpc://127.0.0.1:{server.port}"), retrier=one_shot()) as remote:
        # When it makes three calls
        for _ in range(3):
            ask(remote)
    # Then each carried RequestMetadata with remex's name and version
    assert len(server.servicer.calls) == 3
    for index in range(3):
        metadata = server.servicer.request_metadata(index)
        assert metadata.tool_details.tool_name == "remex"
        assert metadata.tool_details.tool_version == pipeline.__version__
        assert metadata.tool_invocation_id != ""


def test_the_invocation_id_is_stable_within_a_remote_and_differs_between_remotes(
    server: Server,
) -> None:
    # Given two Remotes on the same server, without explicit invocation ids
    url = f"grpc://127.0.0.1:{server.port}"
    with (
        Remote(Endpoint(url), retrier=one_shot()) as first,
        Remote(Endpoint(url), retrier=one_shot()) as second,
    ):
        # When each makes two calls
        ask(first)
        ask(first)
        ask(second)
        ask(second)
    # Then one Remote's calls share an id, which is a UUID, and the other's differs
    ids = [server.servicer.request_metadata(i).tool_invocation_id for i in range(4)]
    assert ids[0] == ids[1]
    assert ids[2] == ids[3]
    assert ids[0] != ids[2]
    uuid.UUID(ids[0])


def test_explicit_invocation_and_correlated_ids_are_sent(server: Server) -> None:
    # Given a Remote with an invocation id and a correlated (build) id
    endpoint = Endpoint(f"grpc://127.0.0.1:{server.port}")
    with Remote(
        endpoint, retrier=one_shot(), invocation_id="inv-1", correlated_id="build-42"
    ) as remote:
        # When it makes a call
        ask(remote)
    # Then both ids are in the RequestMetadata
    metadata = server.servicer.request_metadata(0)
    assert metadata.tool_invocation_id == "inv-1"
    assert metadata.correlated_invocations_id == "build-42"


def test_correlated_id_is_empty_when_not_given(server: Server) -> None:
    # Given a Remote without a correlated id
    with Remote(Endpoint(f"grpc://127.0.0.1:{server.port}"), retrier=one_shot()) as remote:
        # When it makes a call
        ask(remote)
    # Then correlated_invocations_id is empty
    assert server.servicer.request_metadata(0).correlated_invocations_id == ""


def test_action_context_sets_action_id_only_inside_the_block(server: Server) -> None:
    # Given a Remote on a recording server
    with Remote(Endpoint(f"grpc://127.0.0.1:{server.port}"), retrier=one_shot()) as remote:
        # When it calls before, inside (nested too) and after action_context blocks
        ask(remote)
        with action_context("abc"):
            ask(remote)
            with action_context("def"):
                ask(remote)
            ask(remote)
        ask(remote)
    # Then action_id is set exactly inside the blocks, innermost winning
    action_ids = [server.servicer.request_metadata(i).action_id for i in range(5)]
    assert action_ids == ["", "abc", "def", "abc", ""]


def test_action_context_is_reset_when_the_block_raises(server: Server) -> None:
    # Given a Remote, and an action_context block left by an exception
    with Remote(Endpoint(f"grpc://127.0.0.1:{server.port}"), retrier=one_shot()) as remote:
        with pytest.raises(RuntimeError), action_context("doomed"):
            raise RuntimeError("stage failed")
        # When a call is made afterwards
        ask(remote)
    # Then it carries no action id
    assert server.servicer.request_metadata(0).action_id == ""


def test_no_authorization_header_without_a_token_file(server: Server) -> None:
    # Given a Remote without a token file
    with Remote(Endpoint(f"grpc://127.0.0.1:{server.port}"), retrier=one_shot()) as remote:
        # When it makes a call
        ask(remote)
    # Then no authorization header is sent
    assert "authorization" not in server.servicer.calls[0]


def test_instance_name_is_sent_in_the_request(server: Server) -> None:
    # Given an endpoint with an instance name
    endpoint = Endpoint(f"grpc://127.0.0.1:{server.port}", instance_name="main/linux")
    with Remote(endpoint, retrier=one_shot()) as remote:
        # Then the Remote exposes it and the channel works
        assert remote.instance_name == "main/linux"
        assert ask(remote).high_api_version.minor == 3


# ---------------------------------------------------------- bearer tokens


def test_bearer_token_is_sent_and_reread_when_the_file_changes(
    server: Server, tmp_path: Path
) -> None:
    # Given a token file and a Remote reading it
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    endpoint = Endpoint(f"grpc://127.0.0.1:{server.port}", token_file=token_file)
    with Remote(endpoint, retrier=one_shot()) as remote:
        # When a call is made
        ask(remote)
        # And the file is rewritten with a token of the same length, mtime bumped
        token_file.write_text("other-token\n")
        stat = token_file.stat()
        os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        ask(remote)
        ask(remote)
    # Then the first call sent the first token (stripped), the later ones the new one
    auth = [call["authorization"] for call in server.servicer.calls]
    assert auth == ["Bearer first-token", "Bearer other-token", "Bearer other-token"]


def test_missing_token_file_fails_when_the_channel_is_opened(tmp_path: Path) -> None:
    # Given an endpoint whose token file does not exist
    endpoint = Endpoint("grpc://127.0.0.1:1", token_file=tmp_path / "absent")
    # When the channel is opened
    # Then a ConfigError names the file, before any call is made
    with pytest.raises(ConfigError, match="absent"):
        open_channel(endpoint)


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
def test_unreadable_token_file_fails_when_the_channel_is_opened(tmp_path: Path, kind: str) -> None:
    # Given an endpoint whose token file exists but cannot be read as text (a
    # directory: tests may run as root, for whom permissions do not stop reading)
    token_file = tmp_path / "token"
    if kind == "directory":
        token_file.mkdir()
    else:
        token_file.write_bytes(b"\xff\xfe\x00bad")
    endpoint = Endpoint("grpc://127.0.0.1:1", token_file=token_file)
    # When a Remote opens its channel
    # Then a permanent ConfigError names the file
    with pytest.raises(ConfigError, match="cannot read token file") as info:
        Remote(endpoint)
    assert str(token_file) in str(info.value)
    assert info.value.transient is False


def test_token_file_deleted_after_opening_fails_the_call_with_config_error(
    server: Server, tmp_path: Path
) -> None:
    # Given a Remote whose token file is removed after the channel opened
    token_file = tmp_path / "token"
    token_file.write_text("t")
    endpoint = Endpoint(f"grpc://127.0.0.1:{server.port}", token_file=token_file)
    with Remote(endpoint, retrier=one_shot()) as remote:
        token_file.unlink()
        # When a call is made
        # Then it fails with a permanent ConfigError, and nothing reached the server
        with pytest.raises(ConfigError) as info:
            ask(remote)
        assert info.value.transient is False
    assert server.servicer.calls == []


# ------------------------------------------------------------- unix sockets


def test_a_unix_socket_endpoint_works() -> None:
    # Given a server on a unix socket (short path: sun_path is ~108 bytes)
    with tempfile.TemporaryDirectory(prefix="remex-", dir="/tmp") as folder:
        socket_path = os.path.join(folder, "cas.sock")
        grpc_server, servicer, _ = start_server(f"unix:{socket_path}")
        try:
            for url in (f"unix:{socket_path}", f"unix://{socket_path}"):
                # When a Remote on each spelling of its URL makes a call
                with (
                    Remote(Endpoint(url), retrier=one_shot()) as remote,
                    action_context("over-unix"),
                ):
                    answer = ask(remote)
                # Then it is answered, with the RequestMetadata attached
                assert answer.high_api_version.minor == 3
        finally:
            grpc_server.stop(grace=None)
    assert len(servicer.calls) == 2
    assert servicer.request_metadata(1).action_id == "over-unix"


# ---------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    """PEM files of a CA, a server and a client, and of an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    # EC keys are made in microseconds, RSA ones in tenths of seconds.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    is_ca: bool = False,
    san: list[x509.GeneralName] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _certificate("remex test CA", ca_key, None, is_ca=True)
    server_key = _key()
    server_cert = _certificate(
        "localhost",
        server_key,
        (ca, ca_key),
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    client_key = _key()
    client_cert = _certificate(
        "remex client", client_key, (ca, ca_key), usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    other_key = _key()
    other_ca = _certificate("some other CA", other_key, None, is_ca=True)
    return Pki(
        ca=_write(folder / "ca.pem", _pem(ca)),
        server_cert=_write(folder / "server.pem", _pem(server_cert)),
        server_key=_write(folder / "server.key", _key_pem(server_key)),
        client_cert=_write(folder / "client.pem", _pem(client_cert)),
        client_key=_write(folder / "client.key", _key_pem(client_key)),
        other_ca=_write(folder / "other-ca.pem", _pem(other_ca)),
    )


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[Server]:
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    grpc_server, servicer, port = start_server("127.0.0.1:0", credentials)
    try:
        yield Server(servicer, port)
    finally:
        grpc_server.stop(grace=None)


@pytest.mark.parametrize("scheme", ["grpcs", "https"])
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_mutual_tls_works_with_the_right_ca_and_client_certificate(
    tls_server: Server, pki: Pki, scheme: str, host: str
) -> None:
    # Given a TLS endpoint with the server's CA and a client certificate
    endpoint = Endpoint(
        f"{scheme}://{host}:{tls_server.port}",
        server_ca=pki.ca,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
    )
    # When a call is made inside an action context
    with (
        Remote(endpoint, retrier=one_shot(), correlated_id="tls-build") as remote,
        action_context("secure-action"),
    ):
        answer = ask(remote)
    # Then it is answered, and the RequestMetadata went through the TLS channel
    assert answer.high_api_version.minor == 3
    metadata = tls_server.servicer.request_metadata(0)
    assert metadata.action_id == "secure-action"
    assert metadata.correlated_invocations_id == "tls-build"


def test_tls_with_token_sends_the_bearer_token(
    tls_server: Server, pki: Pki, tmp_path: Path
) -> None:
    # Given a TLS endpoint that also has a token file
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    endpoint = Endpoint(
        f"grpcs://localhost:{tls_server.port}",
        server_ca=pki.ca,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
        token_file=token_file,
    )
    # When a call is made
    with Remote(endpoint, retrier=one_shot()) as remote:
        ask(remote)
    # Then the server got the token
    assert tls_server.servicer.calls[0]["authorization"] == "Bearer s3cret"


def test_tls_without_the_client_certificate_is_refused(tls_server: Server, pki: Pki) -> None:
    # Given a TLS endpoint with the right CA but no client certificate
    endpoint = Endpoint(f"grpcs://localhost:{tls_server.port}", server_ca=pki.ca)
    # When a call is made
    with Remote(endpoint, retrier=one_shot()) as remote, pytest.raises(RemoteError) as info:
        ask(remote)
    # Then it fails as gRPC reports a failed handshake: UNAVAILABLE, transient
    assert info.value.code == "UNAVAILABLE"
    assert info.value.transient is True
    assert tls_server.servicer.calls == []


def test_tls_with_the_wrong_ca_is_refused(tls_server: Server, pki: Pki) -> None:
    # Given a TLS endpoint trusting a CA that did not sign the server's certificate
    endpoint = Endpoint(
        f"grpcs://localhost:{tls_server.port}",
        server_ca=pki.other_ca,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
    )
    # When a call is made
    with Remote(endpoint, retrier=one_shot()) as remote, pytest.raises(RemoteError) as info:
        ask(remote)
    # Then the handshake fails and the call never reaches the server
    assert info.value.code == "UNAVAILABLE"
    assert tls_server.servicer.calls == []


def test_plain_text_client_cannot_talk_to_a_tls_server(tls_server: Server) -> None:
    # Given a plain-text endpoint pointing at a TLS server
    endpoint = Endpoint(f"grpc://127.0.0.1:{tls_server.port}")
    # When a call is made
    # Then it fails, translated, without reaching the service
    with Remote(endpoint, retrier=one_shot()) as remote, pytest.raises(RemoteError) as info:
        ask(remote)
    assert info.value.code == "UNAVAILABLE"
    assert tls_server.servicer.calls == []


def test_failed_tls_calls_are_retried_as_transient(tls_server: Server, pki: Pki) -> None:
    # Given a TLS endpoint without the client certificate, and three attempts
    class NoSleep:
        def __init__(self) -> None:
            self.sleeps: list[float] = []

        def monotonic(self) -> float:
            return sum(self.sleeps)

        def sleep(self, seconds: float) -> None:
            self.sleeps.append(seconds)

    clock = NoSleep()
    retrier = Retrier(RetryPolicy(max_attempts=3), clock=clock, rng=random.Random(0))
    endpoint = Endpoint(f"grpcs://localhost:{tls_server.port}", server_ca=pki.ca)
    # When capabilities are asked
    with (
        Remote(endpoint, retrier=retrier) as remote,
        pytest.raises(RemoteError, match="gave up after 3 attempts"),
    ):
        remote.capabilities()
    # Then the retrier waited (in fake time) between the three attempts
    assert len(clock.sleeps) == 2


@pytest.mark.parametrize("scheme", ["grpc", "http", "unix"])
@pytest.mark.parametrize("option", ["server_ca", "client_cert", "client_key"])
def test_tls_files_for_a_plain_text_url_are_a_config_error(
    pki: Pki, scheme: str, option: str
) -> None:
    # Given a plain-text URL with a TLS file configured
    url = "unix:/tmp/remex-none.sock" if scheme == "unix" else f"{scheme}://127.0.0.1:1"
    endpoint = Endpoint(url, **{option: pki.ca})  # type: ignore[arg-type]
    # When the channel is opened
    # Then a ConfigError names the URL and says what to use instead
    with pytest.raises(ConfigError, match="grpcs://") as info:
        open_channel(endpoint)
    assert url in str(info.value)


@pytest.mark.parametrize("given", ["client_cert", "client_key"])
def test_client_cert_and_key_must_come_together(pki: Pki, given: str) -> None:
    # Given a TLS URL with only one half of the client credentials
    endpoint = Endpoint("grpcs://localhost:1", server_ca=pki.ca, **{given: pki.client_cert})  # type: ignore[arg-type]
    # When the channel is opened
    # Then it is a ConfigError
    with pytest.raises(ConfigError, match="client_cert and client_key"):
        open_channel(endpoint)


@pytest.mark.parametrize("option", ["server_ca", "client_cert", "client_key"])
def test_unreadable_tls_file_is_a_config_error(pki: Pki, tmp_path: Path, option: str) -> None:
    # Given a TLS endpoint where one file is missing
    files = {"server_ca": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key}
    files[option] = tmp_path / "missing.pem"
    endpoint = Endpoint("grpcs://localhost:1", **files)  # type: ignore[arg-type]
    # When the channel is opened
    # Then a ConfigError names the missing file
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        open_channel(endpoint)


def test_a_bad_url_fails_when_the_remote_is_made() -> None:
    # Given an endpoint with an unsupported scheme
    # When a Remote is made
    # Then a ConfigError is raised at once
    with pytest.raises(ConfigError, match="ftp://"):
        Remote(Endpoint("ftp://cas.example.com:21"))
