"""What a stage works with: the local CAS and the remote servers.

The execution server (Execution; by default also the CAS and ActionCache
that go with it) and the artifact server (CAS, Remote Asset) may be one server
or two. As in BuildStream's remote-execution settings, the execution side's
CAS ("storage") and ActionCache may be separate endpoints. The stages never
assume the execution and artifact CAS are one: blobs move from one to the
other through the local CAS.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from pipeline.cas import LocalCas
from pipeline.reapi.action_cache import ActionCacheClient
from pipeline.reapi.asset import AssetClient
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.execution import ExecutionClient
from pipeline.reapi.remote import Remote

__all__ = ["StageContext"]

T = TypeVar("T")


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
    ) -> None:
        self.local_cas = local_cas
        self.execution = execution
        self.artifacts = artifacts
        self.storage = storage or execution
        self.action_cache_remote = action_cache_remote or execution
        self.owns_remotes = owns_remotes
        self._lock = threading.Lock()
        self._clients: dict[str, object] = {}

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
