"""The bot host's local CAS: a buildbox-casd proxying the server's CAS.

``buildbox-run`` alone (``--disable-localcas``) fetches every input root
whole from the server for every action and writes the files in download
order with the current time. With a casd in front of it, the runner asks
casd to stage the input root (StageTree) and to capture the outputs
(CaptureTree): a blob already on this host is not fetched again, inputs are
staged with one fixed mtime (make and autotools see sources as they were
committed, not in download order), and the outputs reach the server through
the proxy, which uploads them.

casd stages through FUSE (buildbox-fuse) where ``/dev/fuse`` can be opened,
and by hardlinks or copies otherwise (``BUILDBOX_STAGER=copy-or-link``: a
container is given no ``/dev/fuse`` by default, and casd would otherwise
try FUSE and fail every action); a ``BUILDBOX_STAGER`` in the bot's own
environment wins.

The casd runs in proxy mode (``--cas-remote``) on a unix socket in a private
folder (0700, made with :func:`tempfile.mkdtemp`: only this user may
connect), with an LRU quota (``--quota-high``). It is started and stopped by
PID with the bot; one left by a bot that was SIGKILLed (its PID is recorded
in the cache folder) is killed before a new one starts on that folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.reapi.channel import Endpoint
from pipeline.servers.casd import CASD_PID_FILE, CasdServer, kill_leftover_casd

__all__ = ["BotCasd", "buildbox_url", "fuse_usable", "proxy_args"]

log = logging.getLogger("remex.bot")


def buildbox_url(url: str) -> str:
    """The URL as buildbox programs want it: ``http://``/``https://`` (or ``unix:``), not ``grpc://``."""
    if url.startswith("grpc://"):
        return "http://" + url[len("grpc://") :]
    if url.startswith("grpcs://"):
        return "https://" + url[len("grpcs://") :]
    return url


def proxy_args(endpoint: Endpoint) -> list[str]:
    """buildbox-casd options that make it a CAS proxy of ``endpoint`` (with its
    instance, TLS files and token)."""
    args = [f"--cas-remote={buildbox_url(endpoint.url)}"]
    if endpoint.instance_name:
        args.append(f"--cas-instance={endpoint.instance_name}")
    if endpoint.server_ca:
        args.append(f"--cas-server-cert={endpoint.server_ca}")
    if endpoint.client_cert and endpoint.client_key:
        args += [
            f"--cas-client-cert={endpoint.client_cert}",
            f"--cas-client-key={endpoint.client_key}",
        ]
    if endpoint.token_file:
        args.append(f"--cas-access-token={endpoint.token_file}")
    return args


class BotCasd:
    """A buildbox-casd proxying ``endpoint``'s CAS for one bot.

    Args:
        endpoint: the server whose CAS it proxies (BuildGrid).
        cache_dir: its folder (``cas-root`` holds the blobs; kept across
            bot restarts, so a restarted bot still has them).
        quota_bytes: the LRU quota (``--quota-high``); None: casd's own
            limit (the free disk space, less 2 GB).

    Use as a context manager: :attr:`url` (``unix:...``) is set while it runs.
    """

    def __init__(self, endpoint: Endpoint, cache_dir: Path, quota_bytes: int | None) -> None:
        self.endpoint = endpoint
        self.cache_dir = Path(cache_dir).absolute()
        self.quota_bytes = quota_bytes
        self._socket_dir: Path | None = None
        self._server: CasdServer | None = None

    @property
    def url(self) -> str:
        """The casd's address for buildbox-run (``unix:PATH``)."""
        if self._server is None:
            raise RuntimeError("the bot's casd is not running")
        return self._server.url

    @property
    def pid(self) -> int | None:
        return self._server.pid if self._server is not None else None

    def start(self) -> BotCasd:
        """Start casd and wait until it answers.

        Raises:
            ServerError: it did not start (its log's tail is in the message).
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        kill_leftover_casd(self.cache_dir)
        # A short private folder for the socket: the kernel limits a socket
        # path to 107 bytes, and the folder's mode decides who may connect.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="remex-bot-casd-"))
        stager = os.environ.get("BUILDBOX_STAGER") or ("fuse" if fuse_usable() else "copy-or-link")
        server = CasdServer(
            self.cache_dir,
            quota_high=self.quota_bytes,
            socket_path=self._socket_dir / "casd.sock",
            extra_args=proxy_args(self.endpoint),
            execution=False,
            log_level="warning",
            extra_env={"BUILDBOX_STAGER": stager},
        )
        try:
            server.start()
        except BaseException:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            raise
        self._server = server
        (self.cache_dir / CASD_PID_FILE).write_text(f"{server.pid}\n")
        log.info(
            "local CAS: buildbox-casd pid %s on %s, proxying %s (staging: %s; quota %s)",
            server.pid,
            server.url,
            self.endpoint.url,
            stager,
            "casd's own" if self.quota_bytes is None else f"{self.quota_bytes} bytes",
        )
        return self

    def stop(self) -> None:
        """Stop casd (SIGTERM, then SIGKILL), remove its socket folder."""
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(OSError):
                (self.cache_dir / CASD_PID_FILE).unlink()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> BotCasd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fuse_usable() -> bool:
    """Whether this process can open ``/dev/fuse`` (what FUSE staging needs)."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True
