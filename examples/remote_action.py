"""Run one real action remotely, end to end, on a throwaway buildbox-casd.

What it shows, with the same code remex's stages use:

1. a busybox sysroot is imported into a local CAS as a Merkle tree;
2. a Command and an Action are stored; what buildbox-casd lacks is uploaded;
3. the action executes remotely (chrooted into the sysroot, sandboxed by
   bubblewrap) and writes files under ``out/``;
4. the output tree is downloaded, every blob verified, and checked out.

Run: ``.venv/bin/python -m examples.remote_action [DEST]`` (default ``out/remote-action``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline.cas import LocalCas, checkout, import_directory, store_tree_message
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.execution import ExecutionClient
from pipeline.reapi.remote import Remote
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.servers import CasdServer
from tests.sysroot import make_busybox_sysroot

SCRIPT = """
mkdir -p out/etc
echo "hello from $(uname -s), built remotely by remex" > out/hello.txt
busybox --list | wc -l > out/etc/applet-count
"""


def main() -> int:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "out/remote-action").resolve()
    work = Path(tempfile.mkdtemp(prefix="remex-demo-"))
    try:
        sysroot = make_busybox_sysroot(work / "sysroot")
        cas = LocalCas(work / "local-cas")
        root = import_directory(cas, sysroot)
        command = cas.put_message(
            re_pb2.Command(
                arguments=["sh", "-c", "-e", SCRIPT],
                environment_variables=[
                    re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")
                ],
                output_paths=["out"],
            )
        )
        action = cas.put_message(
            re_pb2.Action(command_digest=command, input_root_digest=root, do_not_cache=True)
        )
        with CasdServer(work / "casd") as casd:
            casd.start()
            print(f"buildbox-casd serving on {casd.url}")
            with Remote(Endpoint(casd.url)) as remote:
                client = CasClient(remote)
                started = time.monotonic()
                stats = client.upload_tree(cas, root) + client.upload_missing(
                    cas, [action, command]
                )
                print(f"uploaded {stats.blobs_sent} blobs ({stats.bytes_sent} bytes)")
                response = ExecutionClient(remote).execute(action)
                result = response.result
                print(f"executed: exit code {result.exit_code}")
                if result.exit_code != 0:
                    print(client.read_blob(result.stderr_digest).decode(errors="replace"))
                    return 1
                tree = client.read_message(result.output_directories[0].tree_digest, re_pb2.Tree)
                out_root = store_tree_message(cas, tree)
                client.fetch_tree(cas, out_root)
                if dest.exists():
                    shutil.rmtree(dest)
                checkout(cas, out_root, dest)
                print(f"done in {time.monotonic() - started:.2f} s; output checked out in {dest}")
                print((dest / "hello.txt").read_text().strip())
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
