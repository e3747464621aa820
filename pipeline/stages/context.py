"""What a stage works with: the local CAS and the remote servers.

The execution server (Execution; by default also the CAS and ActionCache
that go with it) and the artifact server (CAS, Remote Asset) may be one server
or two. As in BuildStream's remote-execution settings, the execution side's
CAS ("storage") and ActionCache may be separate endpoints. The stages never
assume the execution and artifact CAS are one.

``download`` says what a worker brings home (as Bazel's
``--remote_download_minimal``): with ``"all"`` every dependency tree and
output lands whole in the local CAS and blobs move from one server to the
other through it; with ``"minimal"`` only Directory messages and logs do,
and a blob one server lacks is copied from the other server to server (not
at all when the artifact server is the execution CAS).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import TypeVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.reapi.action_cache import ActionCacheClient
from pipeline.reapi.asset import AssetClient
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.execution import ExecutionClient
from pipeline.reapi.remote import Remote

__all__ = ["DOWNLOAD_MODES", "StageContext"]

T = TypeVar("T")

#: What ``download`` may be (``[cas] download`` in the configuration).
DOWNLOAD_MODES = ("minimal", "all")
# Artifact URI -> its files/ digest, remembered per process: a worker stages
# the same dependencies for many elements (an artifact under a URI does not
# change; a stage that finds its blobs gone forgets the entry, see forget_artifacts).
MAX_KNOWN_ARTIFACTS = 20_000


class StageContext:
    """The local CAS, the execution and artifact servers, and their clients.

    Clients are built on first use and shared by the threads of a process.

    Args:
        local_cas: this host's CAS (a cache; the remote CAS is the truth).
        execution: the server that runs actions (CAS + ActionCache + Execution).
        artifacts: the server that stores artifacts and sources (CAS + Remote Asset).
        storage: the CAS the execution server reads inputs from and writes
            outputs to, when it is not the execution server's own.
        action_cache_remote: the ActionCache, when not the execution server's.
        owns_remotes: :meth:`close` closes the remotes (as :meth:`connect` sets).
        download: ``"all"`` or ``"minimal"`` (see the module docstring).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        local_cas: LocalCas,
        execution: Remote,
        artifacts: Remote,
        *,
        storage: Remote | None = None,
        action_cache_remote: Remote | None = None,
        owns_remotes: bool = False,
        download: str = "all",
    ) -> None:
        if download not in DOWNLOAD_MODES:
            raise ValueError(f"download must be one of {DOWNLOAD_MODES}, not {download!r}")
        self.download = download
        self.local_cas = local_cas
        self.execution = execution
        self.artifacts = artifacts
        self.storage = storage or execution
        self.action_cache_remote = action_cache_remote or execution
        self.owns_remotes = owns_remotes
        self._lock = threading.Lock()
        self._clients: dict[str, object] = {}
        self._artifact_files: collections.OrderedDict[str, Digest] = collections.OrderedDict()

    @classmethod
    def connect(
        cls,
        local_cas: LocalCas,
        execution: Endpoint,
        artifacts: Endpoint,
        *,
        storage: Endpoint | None = None,
        action_cache: Endpoint | None = None,
        correlated_id: str = "",
        download: str = "all",
    ) -> StageContext:
        """Open the remotes (one channel per endpoint given, even when equal)."""
        opened: list[Remote] = []
        try:

            def open_remote(endpoint: Endpoint) -> Remote:
                remote = Remote(endpoint, correlated_id=correlated_id)
                opened.append(remote)
                return remote

            return cls(
                local_cas,
                open_remote(execution),
                open_remote(artifacts),
                storage=open_remote(storage) if storage is not None else None,
                action_cache_remote=open_remote(action_cache) if action_cache is not None else None,
                owns_remotes=True,
                download=download,
            )
        except BaseException:
            for remote in opened:
                remote.close()
            raise

    def __enter__(self) -> StageContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StageContext({self.local_cas!r}, {self.execution!r}, {self.artifacts!r})"

    def close(self) -> None:
        """Close the remotes if this context opened them."""
        if self.owns_remotes:
            remotes = (self.execution, self.artifacts, self.storage, self.action_cache_remote)
            for remote in {id(r): r for r in remotes}.values():
                remote.close()

    @property
    def minimal(self) -> bool:
        """Whether this context builds without the bytes (``download = "minimal"``)."""
        return self.download == "minimal"

    @property
    def artifacts_on_storage(self) -> bool:
        """Whether the artifact server's CAS is the execution side's CAS (one
        endpoint and instance): then a blob on one is on the other."""
        a, b = self.artifacts.endpoint, self.storage.endpoint
        return a.url == b.url and a.instance_name == b.instance_name

    def known_artifact_files(self, uri: str) -> Digest | None:
        """The ``files/`` digest of the artifact at ``uri``, if this process saw it."""
        with self._lock:
            return self._artifact_files.get(uri)

    def remember_artifact_files(self, uri: str, files: Digest) -> None:
        """Remember the ``files/`` digest of the artifact at ``uri``."""
        with self._lock:
            self._artifact_files[uri] = files
            self._artifact_files.move_to_end(uri)
            while len(self._artifact_files) > MAX_KNOWN_ARTIFACTS:
                self._artifact_files.popitem(last=False)

    def forget_artifacts(self) -> None:
        """Forget every remembered artifact (a stage found blobs gone)."""
        with self._lock:
            self._artifact_files.clear()

    def forget_local(self) -> None:
        """Forget everything remembered about the local CAS's contents (blobs
        were found gone: a wiped folder, a cleanup by another process), so
        that the next stage fetches again what it lacks. What the remote
        servers hold (the artifacts' ``files/`` digests) is kept."""
        with self._lock:
            clients = [
                c for name, c in self._clients.items() if name in ("execution_cas", "artifact_cas")
            ]
        for client in clients:
            if isinstance(client, CasClient):
                client.forget_local()

    # --- clients, built on first use ------------------------------------------

    @property
    def execution_cas(self) -> CasClient:
        """The execution side's CAS ("storage"): action inputs go up, outputs come down."""
        return self._client("execution_cas", lambda: CasClient(self.storage))

    @property
    def artifact_cas(self) -> CasClient:
        """The artifact server's CAS: artifacts, sources and failure logs."""
        return self._client("artifact_cas", lambda: CasClient(self.artifacts))

    @property
    def executor(self) -> ExecutionClient:
        return self._client("executor", lambda: ExecutionClient(self.execution))

    @property
    def action_cache(self) -> ActionCacheClient:
        return self._client("action_cache", lambda: ActionCacheClient(self.action_cache_remote))

    @property
    def assets(self) -> AssetClient:
        """Remote Asset on the artifact server."""
        return self._client("assets", lambda: AssetClient(self.artifacts))

    def _client(self, name: str, build: Callable[[], T]) -> T:
        with self._lock:
            client = self._clients.get(name)
            if client is None:
                client = self._clients[name] = build()
            return client  # type: ignore[return-value]
