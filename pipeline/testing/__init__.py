"""Projects and sysroots made for the tests and the benchmarks (not used by
remex itself): ``dag`` generates element DAG projects with known outputs,
``sysroot`` makes a busybox sysroot that actions can run in.

The servers they build on are in :mod:`pipeline.servers` (and
:mod:`pipeline.servers.testing` for PostgreSQL and BuildGrid).
"""
