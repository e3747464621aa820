"""``remex bot`` as a managed process, for stacks, tests and benchmarks.

:class:`BotProcess` runs ``remex bot`` (the console script next to the running
interpreter) in a session of its own, its output in ``workdir/bot.log``;
``start()`` returns once the bot has a session with the server (it logs
``session``). ``stop()`` is SIGTERM (the bot gives back or finishes its
leases within ``--grace``, then tells the server it is terminating), then
SIGKILL; ``kill()`` is SIGKILL at once, of the bot and every process it
started, like a host that died. Both go by PID, through :class:`pipeline.servers.base.Server`.
It only runs the ``remex bot`` program: nothing of ``bot/`` is imported.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping, Sequence

from pipeline.servers.base import Server, remex_program
from pipeline.servers.casd import kill_leftover_casd

__all__ = ["BotProcess"]

_READY_MARK = ": session "


class BotProcess(Server):
    """One ``remex bot`` process.

    Args:
        workdir: its folder (``bot.log``, ``work/`` as ``--workdir``).
        remote: the Bots server URL.
        bot_id: ``--name``.
        capacity: ``--capacity``.
        runner: ``--runner``.
        grace: ``--grace``.
        platform: ``--platform`` items (``KEY=VALUE``).
        env: the environment (default: this process's).
        ready_timeout: seconds ``start()`` waits for the session.
    """

    name = "bot"
    scheme = "bot"
    listens = False
    stop_grace = 30.0

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        remote: str,
        bot_id: str,
        capacity: int = 1,
        runner: str = "buildbox-run",
        grace: float = 10.0,
        platform: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.remote = remote
        self.bot_id = bot_id
        self.capacity = capacity
        self.runner = runner
        self.grace = grace
        self.platform = list(platform)
        self.env = dict(env) if env is not None else dict(os.environ)
        self.start_timeout = ready_timeout
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        return f"bot://{self.bot_id}"

    @property
    def address(self) -> str:
        return self.bot_id

    def command_line(self) -> list[str]:
        args = [
            remex_program(),
            "bot",
            "--remote",
            self.remote,
            "--name",
            self.bot_id,
            "--capacity",
            str(self.capacity),
            "--runner",
            self.runner,
            "--grace",
            f"{self.grace:g}",
            "--workdir",
            str(self.workdir / "work"),
        ]
        for item in self.platform:
            args += ["--platform", item]
        return args + self.extra_args

    def _launch(self) -> None:
        self._popen(self.command_line(), {**self.env, "PYTHONUNBUFFERED": "1"})

    def _probe(self, timeout: float) -> bool:
        """Ready once it logged that it has a session."""
        return _READY_MARK in self.log_text()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to the bot process alone (not its runs)."""
        if self._pid is not None and self._alive():
            os.kill(self._pid, signum)

    def _after_stop(self) -> None:
        # The bot's own casd runs in a session of its own, so a bot that was
        # killed leaves it (and its FUSE mounts) behind: a dead host leaves nothing.
        super()._after_stop()
        kill_leftover_casd(self.workdir / "work" / "casd")

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the bot to exit; its exit code, or None."""
        deadline = time.monotonic() + timeout
        while self._alive():
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return self._proc.returncode if self._proc is not None else None

    def __repr__(self) -> str:
        return f"<BotProcess {self.bot_id} pid={self._pid} workdir={self.workdir}>"
