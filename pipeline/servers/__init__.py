"""Real servers and remex processes on this machine, started and stopped by PID.

``remex up`` starts its embedded stack with these classes; the tests and
benchmarks start theirs with them too.

=================  ============================================================
``process``        PIDs, process trees, ``kill_process_tree``, mounts, log tails
                   (also used by ``remex down`` and ``remex bot``'s runners)
``base``           :class:`Server`: ports, start/health/stop machinery, programs
``redis``          :class:`RedisServer` (broker and result backend)
``casd``           :class:`CasdServer` (buildbox-casd: the embedded REAPI server)
``flower``         :class:`FlowerServer` (the Celery task monitor)
``worker``         :class:`RemexWorker` (``remex worker``)
``bot``            :class:`BotProcess` (``remex bot``)
``stack``          :class:`RemexStack`: the one place a whole stack is assembled
``testing``        PostgreSQL and BuildGrid, for tests, benchmarks and compose
                   checks only (``remex up`` needs neither)
=================  ============================================================

Health checks of gRPC servers go through :mod:`pipeline.reapi` (the only
package that imports grpc); this package imports no generated protos itself.
"""

from __future__ import annotations

from pipeline.servers.base import HOST, Server, free_port, remex_program
from pipeline.servers.bot import BotProcess
from pipeline.servers.casd import CasdServer, buildbox_dir
from pipeline.servers.errors import ServerError
from pipeline.servers.flower import FlowerServer
from pipeline.servers.process import kill_process_tree, mounts_under, pid_alive, unmount_under
from pipeline.servers.redis import RedisServer
from pipeline.servers.stack import RemexStack
from pipeline.servers.worker import RemexWorker

__all__ = [
    "HOST",
    "BotProcess",
    "CasdServer",
    "FlowerServer",
    "RedisServer",
    "RemexStack",
    "RemexWorker",
    "Server",
    "ServerError",
    "buildbox_dir",
    "free_port",
    "kill_process_tree",
    "mounts_under",
    "pid_alive",
    "remex_program",
    "unmount_under",
]
