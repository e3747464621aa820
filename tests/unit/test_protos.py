"""The committed protobuf/gRPC modules under protos/ match their .proto sources.

* drift: regenerating into a temporary folder yields byte-identical files;
* wire: the generated messages round-trip and carry the field numbers of the
  public REAPI / ByteStream / Remote Asset / Remote Workers specifications.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2, descriptor, timestamp_pb2

from protos.build.bazel.remote.asset.v1 import remote_asset_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.semver import semver_pb2
from protos.google.bytestream import bytestream_pb2
from protos.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOS = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

PROTO_MODULES = [
    "protos.build.bazel.semver.semver_pb2",
    "protos.build.bazel.remote.execution.v2.remote_execution_pb2",
    "protos.build.bazel.remote.execution.v2.remote_execution_pb2_grpc",
    "protos.build.bazel.remote.asset.v1.remote_asset_pb2",
    "protos.build.bazel.remote.asset.v1.remote_asset_pb2_grpc",
    "protos.google.bytestream.bytestream_pb2",
    "protos.google.bytestream.bytestream_pb2_grpc",
    "protos.google.devtools.remoteworkers.v1test2.worker_pb2",
    "protos.google.devtools.remoteworkers.v1test2.bots_pb2",
    "protos.google.devtools.remoteworkers.v1test2.bots_pb2_grpc",
]


def _generated_files(root: Path) -> dict[str, Path]:
    """Generated files under root/protos, keyed by their path relative to root."""
    return {
        p.relative_to(root).as_posix(): p
        for p in sorted((root / "protos").rglob("*"))
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


# ------------------------------------------------------------------- drift


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"protos.generate failed:\n{proc.stdout}\n{proc.stderr}"

    fresh = _generated_files(tmp_path)
    committed = _generated_files(REPO_ROOT)
    assert fresh, "the generator produced no files"

    missing = sorted(set(fresh) - set(committed))
    orphaned = sorted(set(committed) - set(fresh))
    differing = sorted(
        name
        for name in set(fresh) & set(committed)
        if fresh[name].read_bytes() != committed[name].read_bytes()
    )
    missing_inits = sorted(
        p.relative_to(tmp_path).as_posix()
        for p in (tmp_path / "protos").rglob("__init__.py")
        if not (REPO_ROOT / p.relative_to(tmp_path)).is_file()
    )

    problems = []
    if missing:
        problems.append("not committed: " + ", ".join(missing))
    if differing:
        problems.append("out of date: " + ", ".join(differing))
    if orphaned:
        problems.append("no .proto source: " + ", ".join(orphaned))
    if missing_inits:
        problems.append("missing package __init__.py: " + ", ".join(missing_inits))
    assert not problems, (
        "generated protobuf code does not match protos/**/*.proto; "
        "run `python -m protos.generate` from the repo root and commit the result.\n"
        + "\n".join(problems)
    )


# -------------------------------------------------------------------- wire


@pytest.mark.parametrize("name", PROTO_MODULES)
def test_generated_module_imports(name: str) -> None:
    importlib.import_module(name)


def _field_number(message: type, dotted: str) -> int:
    desc: descriptor.Descriptor = message.DESCRIPTOR
    *nested, field = dotted.split(".")
    for part in nested:
        desc = desc.nested_types_by_name[part]
    return desc.fields_by_name[field].number


# (message class, field, number in the public specification)
SPEC_FIELD_NUMBERS = [
    (re_pb2.Digest, "hash", 1),
    (re_pb2.Digest, "size_bytes", 2),
    (re_pb2.Action, "command_digest", 1),
    (re_pb2.Action, "input_root_digest", 2),
    (re_pb2.Action, "timeout", 6),
    (re_pb2.Action, "do_not_cache", 7),
    (re_pb2.Action, "salt", 9),
    (re_pb2.Action, "platform", 10),
    (re_pb2.Command, "arguments", 1),
    (re_pb2.Command, "environment_variables", 2),
    (re_pb2.Command, "platform", 5),
    (re_pb2.Command, "working_directory", 6),
    (re_pb2.Command, "output_paths", 7),
    (re_pb2.Command, "output_node_properties", 8),
    (re_pb2.Command, "output_directory_format", 9),
    (re_pb2.FileNode, "is_executable", 4),
    (re_pb2.FileNode, "node_properties", 6),
    (re_pb2.Directory, "node_properties", 5),
    (re_pb2.NodeProperties, "unix_mode", 3),
    (re_pb2.ActionResult, "output_files", 2),
    (re_pb2.ActionResult, "output_directories", 3),
    (re_pb2.ActionResult, "exit_code", 4),
    (re_pb2.ActionResult, "stdout_digest", 6),
    (re_pb2.ActionResult, "execution_metadata", 9),
    (re_pb2.ActionResult, "output_symlinks", 12),
    (re_pb2.OutputFile, "contents", 5),
    (re_pb2.OutputFile, "node_properties", 7),
    (re_pb2.OutputDirectory, "tree_digest", 3),
    (re_pb2.OutputDirectory, "root_directory_digest", 5),
    (re_pb2.ExecutedActionMetadata, "auxiliary_metadata", 11),
    (re_pb2.ExecutedActionMetadata, "virtual_execution_duration", 12),
    (re_pb2.ExecuteRequest, "skip_cache_lookup", 3),
    (re_pb2.ExecuteRequest, "action_digest", 6),
    (re_pb2.ExecuteRequest, "digest_function", 9),
    (re_pb2.ExecuteResponse, "server_logs", 4),
    (re_pb2.ExecuteOperationMetadata, "partial_execution_metadata", 5),
    (re_pb2.GetActionResultRequest, "digest_function", 6),
    (re_pb2.UpdateActionResultRequest, "digest_function", 5),
    (re_pb2.FindMissingBlobsRequest, "digest_function", 3),
    (re_pb2.FindMissingBlobsResponse, "missing_blob_digests", 2),
    (re_pb2.BatchUpdateBlobsRequest, "Request.compressor", 3),
    (re_pb2.BatchUpdateBlobsRequest, "digest_function", 5),
    (re_pb2.BatchReadBlobsRequest, "acceptable_compressors", 3),
    (re_pb2.BatchReadBlobsRequest, "digest_function", 4),
    (re_pb2.BatchReadBlobsResponse, "Response.status", 3),
    (re_pb2.BatchReadBlobsResponse, "Response.compressor", 4),
    (re_pb2.GetTreeRequest, "digest_function", 5),
    (re_pb2.CacheCapabilities, "supported_batch_update_compressors", 7),
    (re_pb2.CacheCapabilities, "max_cas_blob_size_bytes", 8),
    (re_pb2.ExecutionCapabilities, "digest_functions", 5),
    (re_pb2.ServerCapabilities, "high_api_version", 5),
    (re_pb2.RequestMetadata, "configuration_id", 7),
    (semver_pb2.SemVer, "prerelease", 4),
    (bytestream_pb2.ReadResponse, "data", 10),
    (bytestream_pb2.WriteRequest, "finish_write", 3),
    (bytestream_pb2.WriteRequest, "data", 10),
    (bytestream_pb2.QueryWriteStatusResponse, "complete", 2),
    (remote_asset_pb2.FetchBlobRequest, "qualifiers", 5),
    (remote_asset_pb2.FetchBlobRequest, "digest_function", 6),
    (remote_asset_pb2.FetchBlobResponse, "blob_digest", 5),
    (remote_asset_pb2.PushBlobRequest, "references_directories", 7),
    (remote_asset_pb2.PushDirectoryRequest, "digest_function", 8),
    (bots_pb2.BotSession, "leases", 5),
    (bots_pb2.BotSession, "version", 7),
    (bots_pb2.Lease, "state", 2),
    (bots_pb2.Lease, "id", 7),
    (bots_pb2.Lease, "payload", 8),
    (bots_pb2.Lease, "result", 9),
    (bots_pb2.UpdateBotSessionRequest, "update_mask", 3),
    (worker_pb2.Worker, "configs", 3),
    (worker_pb2.Device, "handle", 1),
]


@pytest.mark.parametrize(
    ("message", "field", "number"),
    SPEC_FIELD_NUMBERS,
    ids=[f"{m.DESCRIPTOR.name}.{f}" for m, f, _ in SPEC_FIELD_NUMBERS],
)
def test_field_numbers_match_spec(message: type, field: str, number: int) -> None:
    assert _field_number(message, field) == number


def test_enum_values_match_spec() -> None:
    assert re_pb2.DigestFunction.SHA256 == 1
    assert re_pb2.DigestFunction.BLAKE3 == 9
    assert re_pb2.Compressor.IDENTITY == 0
    assert re_pb2.Compressor.ZSTD == 1
    assert re_pb2.ExecutionStage.COMPLETED == 4
    assert re_pb2.SymlinkAbsolutePathStrategy.ALLOWED == 2
    assert bots_pb2.LeaseState.Value("COMPLETED") == 4
    assert bots_pb2.LeaseState.Value("CANCELLED") == 5
    assert bots_pb2.BotStatus.Value("OK") == 1


def test_service_method_paths_and_streaming() -> None:
    def method(pb2: object, service: str, name: str) -> descriptor.MethodDescriptor:
        return pb2.DESCRIPTOR.services_by_name[service].methods_by_name[name]  # type: ignore[attr-defined]

    execute = method(re_pb2, "Execution", "Execute")
    assert execute.full_name == "build.bazel.remote.execution.v2.Execution.Execute"
    assert execute.output_type.full_name == "google.longrunning.Operation"
    assert execute.server_streaming and not execute.client_streaming
    assert method(re_pb2, "ContentAddressableStorage", "GetTree").server_streaming
    assert method(re_pb2, "Capabilities", "GetCapabilities").input_type.name == (
        "GetCapabilitiesRequest"
    )
    write = method(bytestream_pb2, "ByteStream", "Write")
    assert write.full_name == "google.bytestream.ByteStream.Write"
    assert write.client_streaming and not write.server_streaming
    assert method(bytestream_pb2, "ByteStream", "Read").server_streaming
    assert method(remote_asset_pb2, "Fetch", "FetchBlob").full_name == (
        "build.bazel.remote.asset.v1.Fetch.FetchBlob"
    )
    assert method(bots_pb2, "Bots", "UpdateBotSession").full_name == (
        "google.devtools.remoteworkers.v1test2.Bots.UpdateBotSession"
    )


def test_digest_wire_bytes() -> None:
    digest = re_pb2.Digest(hash="ab", size_bytes=3)
    # field 1, length-delimited "ab"; field 2, varint 3
    assert digest.SerializeToString() == b"\x0a\x02ab\x10\x03"
    assert re_pb2.Digest.FromString(b"\x0a\x02ab\x10\x03") == digest


def test_action_result_round_trip() -> None:
    stdout = re_pb2.Digest(hash="0" * 64, size_bytes=12)
    aux = any_pb2.Any()
    aux.Pack(re_pb2.ToolDetails(tool_name="remex", tool_version="0.1.0"))
    result = re_pb2.ActionResult(
        output_files=[
            re_pb2.OutputFile(
                path="out/bin/hello",
                digest=re_pb2.Digest(hash="1" * 64, size_bytes=4096),
                is_executable=True,
            )
        ],
        output_directories=[
            re_pb2.OutputDirectory(
                path="out/lib",
                tree_digest=re_pb2.Digest(hash="2" * 64, size_bytes=77),
                is_topologically_sorted=True,
            )
        ],
        output_symlinks=[re_pb2.OutputSymlink(path="out/link", target="bin/hello")],
        exit_code=2,
        stdout_digest=stdout,
        stderr_raw=b"warning\n",
        execution_metadata=re_pb2.ExecutedActionMetadata(
            worker="bot-1",
            worker_start_timestamp=timestamp_pb2.Timestamp(seconds=1_700_000_000),
            worker_completed_timestamp=timestamp_pb2.Timestamp(seconds=1_700_000_042),
            auxiliary_metadata=[aux],
        ),
    )

    decoded = re_pb2.ActionResult.FromString(result.SerializeToString())

    assert decoded == result
    assert decoded.output_files[0].is_executable
    assert decoded.output_directories[0].tree_digest.size_bytes == 77
    assert decoded.stdout_digest == stdout
    meta = decoded.execution_metadata
    assert meta.worker_completed_timestamp.seconds - meta.worker_start_timestamp.seconds == 42
    details = re_pb2.ToolDetails()
    assert meta.auxiliary_metadata[0].Unpack(details)
    assert details.tool_name == "remex"


def test_command_and_batch_requests_round_trip() -> None:
    command = re_pb2.Command(
        arguments=["sh", "-c", "make install"],
        environment_variables=[re_pb2.Command.EnvironmentVariable(name="PATH", value="/bin")],
        output_paths=["install"],
        working_directory="src",
    )
    assert re_pb2.Command.FromString(command.SerializeToString()) == command

    request = re_pb2.BatchUpdateBlobsRequest(
        instance_name="main",
        requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(
                digest=re_pb2.Digest(hash="3" * 64, size_bytes=5),
                data=b"(zstd)",
                compressor=re_pb2.Compressor.ZSTD,
            )
        ],
        digest_function=re_pb2.DigestFunction.SHA256,
    )
    decoded = re_pb2.BatchUpdateBlobsRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.requests[0].compressor == re_pb2.Compressor.ZSTD


def test_lease_with_any_payload_round_trip() -> None:
    action_digest = re_pb2.Digest(hash="4" * 64, size_bytes=140)
    payload = any_pb2.Any()
    payload.Pack(action_digest)
    assert payload.type_url == "type.googleapis.com/build.bazel.remote.execution.v2.Digest"

    session = bots_pb2.BotSession(
        bot_id="bot-1",
        status=bots_pb2.BotStatus.Value("OK"),
        worker=worker_pb2.Worker(
            devices=[
                worker_pb2.Device(
                    handle="host-1",
                    properties=[worker_pb2.Device.Property(key="os", value="linux")],
                )
            ]
        ),
        leases=[
            bots_pb2.Lease(
                id="lease-1",
                state=bots_pb2.LeaseState.Value("PENDING"),
                payload=payload,
            )
        ],
    )

    decoded = bots_pb2.BotSession.FromString(session.SerializeToString())

    assert decoded == session
    lease = decoded.leases[0]
    assert lease.state == bots_pb2.LeaseState.Value("PENDING")
    assert lease.payload.Is(re_pb2.Digest.DESCRIPTOR)
    unpacked = re_pb2.Digest()
    assert lease.payload.Unpack(unpacked)
    assert unpacked == action_digest
    assert decoded.worker.devices[0].properties[0].value == "linux"
