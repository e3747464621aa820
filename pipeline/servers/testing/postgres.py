"""A private PostgreSQL cluster, for BuildGrid's scheduler.

Used by the tests, the benchmarks and the compose checks, not by ``remex up``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.servers.base import HOST, PORT_IN_USE, PortInUse, Server, ServerError
from pipeline.servers.process import proc_stat

__all__ = ["PostgresServer"]


_PG_TOOLS = ("initdb", "pg_ctl", "createdb", "dropdb", "psql")


def _postgres_bindir() -> Path:
    """Folder holding initdb, pg_ctl, createdb, dropdb and psql together:
    $REMEX_PG_BINDIR, else the real folder of ``pg_ctl`` on PATH (symlinks
    resolved), else Debian's newest /usr/lib/postgresql/<version>/bin."""
    candidates: list[Path] = []
    env = os.environ.get("REMEX_PG_BINDIR")
    if env:
        candidates.append(Path(env))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    debian = [
        entry
        for entry in Path("/usr/lib/postgresql").glob("*/bin")
        if entry.parent.name.split(".")[0].isdigit()
    ]
    candidates += sorted(debian, key=lambda p: int(p.parent.name.split(".")[0]), reverse=True)
    for candidate in candidates:
        if all((candidate / tool).is_file() for tool in _PG_TOOLS):
            return candidate
    raise ServerError(
        f"PostgreSQL programs ({', '.join(_PG_TOOLS)}) not found together in any of "
        f"{[str(c) for c in candidates]}: install the Debian package 'postgresql' "
        "(or set REMEX_PG_BINDIR)"
    )


class PostgresServer(Server):
    """A private PostgreSQL cluster (``initdb -U bgd --auth=trust``) on
    127.0.0.1:``port`` with a database ``bgd``.

    As root, the cluster runs as the ``postgres`` user (PostgreSQL refuses
    root).  If that user cannot reach ``workdir`` (pytest's base temp folder is
    mode 0700), the cluster lives in a private folder under the system temp
    folder instead, linked from ``workdir/pgdata``; :meth:`close` removes it.

    ``dsn`` is ``postgresql+psycopg2://bgd@127.0.0.1:PORT/bgd`` (SQLAlchemy),
    ``dsn_for(db)`` the same for another database.  ``restart()`` keeps port
    and data.  stop() is ``pg_ctl stop -m immediate`` (SIGKILL by PID as
    fallback); ``pid`` is the postmaster's.
    """

    name = "postgres"
    scheme = "postgresql"
    start_timeout = 60.0
    stop_grace = 10.0
    user = "bgd"
    database = "bgd"

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        super().__init__(workdir)
        self._run_as: str | None = None
        self._base: Path = self.workdir
        self._private_base: Path | None = None
        self._bindir: Path | None = None

    # --- public

    @property
    def data_dir(self) -> Path:
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base / "sock"

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.database)

    def dsn_for(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}@{self.address}/{database}"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.address}/{self.database}"

    def create_database(
        self, database: str, *, recreate: bool = False, template: str | None = None
    ) -> None:
        """Create ``database`` (owned by ``bgd``, copied from ``template`` if
        given) unless it exists; with ``recreate``, drop it first."""
        port = str(self._require_port())
        common = ["-h", HOST, "-p", port, "-U", self.user]
        if recreate:
            self.drop_database(database)
        elif self.database_exists(database):
            return
        extra = ["-T", template] if template else []
        self._run([str(self._bin / "createdb"), *common, *extra, database])

    def drop_database(self, database: str) -> None:
        """Drop ``database`` if it exists (closing its connections)."""
        port = str(self._require_port())
        common = ["-h", HOST, "-p", port, "-U", self.user]
        self._run([str(self._bin / "dropdb"), *common, "--if-exists", "--force", database])

    def database_exists(self, database: str) -> bool:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
            raise ValueError(f"unsupported database name {database!r}")
        result = subprocess.run(
            [
                str(self._bin / "psql"), "-h", HOST, "-p", str(self._require_port()),
                "-U", self.user, "-d", "postgres", "-tA",
                "-c", f"SELECT 1 FROM pg_database WHERE datname = '{database}'",
            ],
            capture_output=True, text=True, env=self._env(), check=False,
        )  # fmt: skip
        return result.returncode == 0 and result.stdout.strip() == "1"

    def close(self) -> None:
        super().close()
        if self._private_base is not None:
            shutil.rmtree(self._private_base, ignore_errors=True)
            link = self.workdir / "pgdata"
            if link.is_symlink():
                link.unlink()
            self._private_base = None
            self._base = self.workdir
            self._prepared = False

    # --- internals

    @property
    def _bin(self) -> Path:
        if self._bindir is None:
            self._bindir = _postgres_bindir()
        return self._bindir

    def _run(self, args: Sequence[str], *, as_owner: bool = False, check: bool = True) -> int:
        """Run a command with output appended to the log (as the cluster owner if asked)."""
        owner = self._run_as if as_owner else None
        with self.log_path.open("ab") as log:
            log.write(("$ " + " ".join(args) + "\n").encode())
            log.flush()
            result = subprocess.run(
                as_user(owner, args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base,
                env=self._env(),
                check=False,
            )
        if check and result.returncode != 0:
            raise ServerError(
                f"{args[0]} failed (exit code {result.returncode}); "
                f"log {self.log_path}:\n{self._log_tail()}"
            )
        return result.returncode

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env.pop("LANG", None)
        return env

    def _owner_can_write(self, folder: Path) -> bool:
        assert self._run_as is not None
        result = subprocess.run(
            as_user(self._run_as, ["test", "-w", str(folder), "-a", "-x", str(folder)]),
            cwd="/", check=False,
        )  # fmt: skip
        return result.returncode == 0

    def _prepare(self) -> None:
        bindir = self._bin
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError(
                    "running as root but there is no 'postgres' user to run the "
                    "cluster as: install the Debian package 'postgresql'"
                ) from None
            self._run_as = "postgres"
        if (self.data_dir / "PG_VERSION").is_file():
            return  # cluster from an earlier start of this object
        self._base = self.workdir
        if self._run_as is not None:
            shutil.chown(self.workdir, self._run_as, self._run_as)
            if not self._owner_can_write(self.workdir):
                self._private_base = Path(
                    tempfile.mkdtemp(prefix="remex-postgres-", dir=_traversable_tmp())
                )
                shutil.chown(self._private_base, self._run_as, self._run_as)
                self._base = self._private_base
                link = self.workdir / "pgdata"
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(self._private_base)
        self.socket_dir.mkdir(exist_ok=True)
        if self._run_as is not None:
            shutil.chown(self.socket_dir, self._run_as, self._run_as)
        if len(str(self.socket_dir)) > 90:
            raise ServerError(f"socket folder path too long for a unix socket: {self.socket_dir}")
        self._mark_log("initdb")
        self._run(
            [
                str(bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ],
            as_owner=True,
        )  # fmt: skip

    def _launch(self) -> None:
        self._mark_log(f"pg_ctl start on port {self.port}")
        options = f"-c listen_addresses={HOST} -p {self.port} -k {self.socket_dir} -c fsync=off"
        # No -l: the postmaster inherits pg_ctl's stdout, our log file (opened by
        # us, so the postgres user needs no write access to it).
        code = self._run(
            [str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "-o", options,
             "-t", str(int(self.start_timeout)), "-w", "start"],
            as_owner=True, check=False,
        )  # fmt: skip
        self._proc = None
        self._pid = self._read_postmaster_pid()
        self._pgid = None
        if self._pid is not None:
            stat = proc_stat(self._pid)
            self._pgid = stat.pgrp if stat else None
        if code != 0:
            if PORT_IN_USE.search(self._log_tail()):
                raise PortInUse(f"pg_ctl exit code {code}")
            raise ServerError(
                f"pg_ctl start failed (exit code {code}); log {self.log_path}:\n{self._log_tail()}"
            )

    def _read_postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def _probe(self, timeout: float) -> bool:
        psql = [str(self._bin / "psql"), "-h", HOST, "-p", str(self._require_port())]
        result = subprocess.run(
            [*psql, "-U", self.user, "-d", "postgres", "-tA", "-c", "SELECT 1"],
            capture_output=True,
            env=self._env(),
            timeout=timeout,
            check=False,
        )
        ok = result.returncode == 0
        if ok:
            self.create_database(self.database)
        return ok

    def _terminate(self, grace: float) -> None:
        if grace > 0 and self._alive():
            self._run(
                [str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                 "-t", str(int(grace)), "-w", "stop"],
                as_owner=True, check=False,
            )  # fmt: skip
        # Fallback (and kill()): SIGKILL by PID, then the backends.
        super()._terminate(grace=0)


def _traversable_tmp() -> str:
    for candidate in (tempfile.gettempdir(), "/tmp"):
        mode = os.stat(candidate).st_mode
        if mode & 0o001:  # others may traverse it
            return candidate
    raise ServerError("no temp folder the postgres user can reach (tried $TMPDIR and /tmp)")


def as_user(user: str | None, args: Sequence[str]) -> list[str]:
    """``args`` run as ``user`` (its group, no other groups) through
    ``setpriv``, or as they are when ``user`` is None.

    Not ``subprocess``'s ``user=``: a process that asks for it is made by
    ``fork`` (not ``vfork``), which runs gRPC's fork handlers in the child;
    with gRPC channels open in this process, the child crashed (SIGSEGV)
    now and then before it could exec.
    """
    if user is None:
        return list(args)
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *args]
