"""What a stage works with: the local CAS and the two remote servers.

The execution server (CAS, ActionCache, Execution) and the artifact server
(CAS, Remote Asset) may be one server or two. The stages never assume they
share a CAS: blobs move from one to the other through the local CAS.
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
        owns_remotes: :meth:`close` closes the two remotes (as :meth:`connect` sets).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        local_cas: LocalCas,
        execution: Remote,
        artifacts: Remote,
        *,
        owns_remotes: bool = False,
    ) -> None:
        self.local_cas = local_cas
        self.execution = execution
        self.artifacts = artifacts
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
        correlated_id: str = "",
    ) -> StageContext:
        """Open both remotes (two channels even when the endpoints are equal)."""
        execution_remote = Remote(execution, correlated_id=correlated_id)
        try:
            artifact_remote = Remote(artifacts, correlated_id=correlated_id)
        except BaseException:
            execution_remote.close()
            raise
        return cls(local_cas, execution_remote, artifact_remote, owns_remotes=True)

    def __enter__(self) -> StageContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StageContext({self.local_cas!r}, {self.execution!r}, {self.artifacts!r})"

    def close(self) -> None:
        """Close the remotes if this context opened them."""
        if self.owns_remotes:
            self.execution.close()
            if self.artifacts is not self.execution:
                self.artifacts.close()

    # --- clients, built on first use ------------------------------------------

    @property
    def execution_cas(self) -> CasClient:
        """The execution server's CAS: action inputs go up, outputs come down."""
        return self._client("execution_cas", lambda: CasClient(self.execution))

    @property
    def artifact_cas(self) -> CasClient:
        """The artifact server's CAS: artifacts, sources and failure logs."""
        return self._client("artifact_cas", lambda: CasClient(self.artifacts))

    @property
    def executor(self) -> ExecutionClient:
        return self._client("executor", lambda: ExecutionClient(self.execution))

    @property
    def action_cache(self) -> ActionCacheClient:
        return self._client("action_cache", lambda: ActionCacheClient(self.execution))

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
