"""Regenerate the protobuf/gRPC Python modules from the ``.proto`` files under ``protos/``.

Run from anywhere (the repository root is found from this file's location)::

    python -m protos.generate              # write next to the .proto files
    python -m protos.generate --out DIR    # write the same relative layout under DIR

Every ``protos/**/*.proto`` is compiled in-process with ``grpc_tools.protoc``
into ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py``. Import paths in the
``.proto`` files are relative to the repository root (``protos/...``), so the
generated modules import each other as ``protos.<package path>``.

Include paths, in lookup order:

1. the repository root (our own ``protos/...`` files);
2. grpc_tools' bundled ``_proto`` folder (``google/protobuf/*.proto``);
3. a temporary shim folder holding ``google/longrunning/operations.proto``
   (see below);
4. the site-packages root of googleapis-common-protos (``google/rpc``,
   ``google/api``, ``google/longrunning``).

googleapis-common-protos ships the long-running-operations schema as
``google/longrunning/operations_proto.proto`` although its generated module
registers it as ``google/longrunning/operations.proto`` (and the runtime
module is ``google.longrunning.operations_pb2``). When the canonical name is
missing, the installed file is copied under that name into a temporary
folder for the duration of the protoc run; nothing is written to the repo.

Stale generated files (whose ``.proto`` no longer exists) under the output
``protos/`` folder are removed, and an empty ``__init__.py`` is created in
every folder that holds generated code, up to ``protos/`` itself. Existing
``__init__.py`` files are left untouched. Output depends only on the
``.proto`` sources and the installed grpcio-tools version.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOS_DIR = REPO_ROOT / "protos"

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_LONGRUNNING = Path("google", "longrunning", "operations.proto")
_LONGRUNNING_SHIPPED = Path("google", "longrunning", "operations_proto.proto")


def proto_sources() -> list[str]:
    """Repo-root-relative POSIX paths of every ``.proto`` under ``protos/``, sorted."""
    return sorted(p.relative_to(REPO_ROOT).as_posix() for p in PROTOS_DIR.rglob("*.proto"))


def generated_names(source: str) -> list[str]:
    """Relative paths of the files protoc emits for one ``.proto`` source."""
    stem = source[: -len(".proto")]
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def googleapis_root() -> Path:
    """The folder that contains ``google/rpc/status.proto`` (googleapis-common-protos)."""
    import google.rpc.status_pb2 as status_pb2

    root = Path(status_pb2.__file__).resolve().parents[2]
    if not (root / "google" / "rpc" / "status.proto").is_file():
        raise SystemExit(f"googleapis-common-protos at {root} ships no google/rpc/status.proto")
    return root


def grpc_tools_proto_root() -> Path:
    """grpc_tools' bundled well-known types (``google/protobuf/*.proto``)."""
    root = Path(str(resources.files("grpc_tools") / "_proto"))
    if not (root / "google" / "protobuf" / "any.proto").is_file():
        raise SystemExit(f"grpc_tools has no bundled google/protobuf protos at {root}")
    return root


def _stage_longrunning(googleapis: Path, shim: Path) -> None:
    if (googleapis / _LONGRUNNING).is_file():
        return
    shipped = googleapis / _LONGRUNNING_SHIPPED
    if not shipped.is_file():
        raise SystemExit(f"cannot find {_LONGRUNNING} or {_LONGRUNNING_SHIPPED} in {googleapis}")
    (shim / _LONGRUNNING).parent.mkdir(parents=True)
    shutil.copyfile(shipped, shim / _LONGRUNNING)


def _remove_stale(out: Path, sources: Sequence[str]) -> None:
    expected = {name for src in sources for name in generated_names(src)}
    out_protos = out / "protos"
    if not out_protos.is_dir():
        return
    for path in sorted(out_protos.rglob("*")):
        if path.is_file() and is_generated(path):
            rel = path.relative_to(out).as_posix()
            if rel not in expected:
                path.unlink()


def _ensure_init_files(out: Path, sources: Sequence[str]) -> None:
    out_protos = out / "protos"
    folders: set[Path] = set()
    for src in sources:
        folder = (out / src).parent
        while True:
            folders.add(folder)
            if folder == out_protos:
                break
            folder = folder.parent
    for folder in sorted(folders):
        init = folder / "__init__.py"
        if not init.exists():
            init.write_bytes(b"")


def generate(out: Path | None = None) -> list[str]:
    """Compile every proto source into ``out`` (default: the repo root).

    Returns the repo-root-relative paths of the generated files.
    """
    from grpc_tools import protoc

    out = (out or REPO_ROOT).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sources = proto_sources()
    if not sources:
        raise SystemExit(f"no .proto files under {PROTOS_DIR}")

    googleapis = googleapis_root()
    with tempfile.TemporaryDirectory(prefix="remex-protos-") as tmp:
        shim = Path(tmp)
        _stage_longrunning(googleapis, shim)
        args = [
            "grpc_tools.protoc",
            f"--proto_path={REPO_ROOT}",
            f"--proto_path={grpc_tools_proto_root()}",
            f"--proto_path={shim}",
            f"--proto_path={googleapis}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
        # protoc resolves the relative source names against the proto paths;
        # the repo root is first, so they are always our own files.
        rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"grpc_tools.protoc failed with exit code {rc}")

    _remove_stale(out, sources)
    _ensure_init_files(out, sources)
    return [name for src in sources for name in generated_names(src)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protos.generate",
        description="Regenerate protos/**/*_pb2*.py from protos/**/*.proto.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write into this folder (same relative layout) instead of the repo root",
    )
    opts = parser.parse_args(argv)
    for name in generate(opts.out):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
