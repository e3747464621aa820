"""Servers that only the tests, the benchmarks and the compose checks start:
PostgreSQL and BuildGrid 0.4.4 (``remex up`` needs neither).

``BuildGridServer`` needs the ``test`` extra (``buildgrid[database]==0.4.4``)
and ``PostgresServer`` the Debian package ``postgresql``.
"""

from __future__ import annotations

from pipeline.servers.testing.buildgrid import MIGRATED_TEMPLATE, BuildGridServer
from pipeline.servers.testing.postgres import PostgresServer

__all__ = ["MIGRATED_TEMPLATE", "BuildGridServer", "PostgresServer"]
