"""A private PostgreSQL 15 cluster for tests: ``initdb`` into a temp dir, listening on a unix
socket in that dir and on 127.0.0.1 at a free port, stopped (and removed) at the end.

    reason = available()          # None, or why no cluster can run here
    with running() as pg:         # initdb, start, wait until ready; stop at exit
        pg.conninfo()             # the superuser over the socket (trust)
        pg.url("alice", "pw")     # a role over TCP (password checked: scram-sha-256)
        pg.restart()              # an outage: pg.stop() ... pg.start() (same data, same port)

Run as root, the cluster belongs to the ``postgres`` user (the server refuses to run as root);
the binaries are ``$WABRIDGE_PG_BIN`` or Debian's ``/usr/lib/postgresql/15/bin``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.net import free_port

ENV = "WABRIDGE_PG_BIN"
DEFAULT = Path("/usr/lib/postgresql/15/bin")
HOST = "127.0.0.1"


def bin_dir() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT)


def available() -> str | None:
    """None when a cluster can be started here, else the reason it cannot."""
    if not (bin_dir() / "initdb").exists():
        return f"no PostgreSQL binaries at {bin_dir()} (apt install postgresql, or set {ENV})"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to own the cluster"
    return None


@dataclass(frozen=True)
class Cluster:
    socket_dir: Path
    port: int
    data: Path
    owner: pwd.struct_passwd | None

    def conninfo(self, dbname: str = "postgres") -> str:
        """The superuser ``postgres`` over the unix socket (trusted)."""
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"

    def url(self, user: str, dbname: str = "postgres") -> str:
        """A role over TCP on 127.0.0.1; the password is given apart."""
        return f"postgresql://{user}@{HOST}:{self.port}/{dbname}"

    def controller_role(self) -> tuple[str, str, str]:
        """A new controller role as README "PostgreSQL" makes it (LOGIN CREATEROLE, owning
        a database of its own): returns (role, password, database)."""
        import psycopg  # noqa: PLC0415 (the cluster itself needs no driver)
        from psycopg import sql  # noqa: PLC0415

        tag = secrets.token_hex(3)
        role, password = f"wabridge_{tag}", secrets.token_urlsafe(16)
        with psycopg.connect(self.conninfo(), autocommit=True) as su:
            su.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)))
            su.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(role), sql.Identifier(role)))
        return role, password, role

    def pg_ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(_as_owner([str(bin_dir() / "pg_ctl"), "-D", str(self.data), *args],
                                 self.owner), check=check, capture_output=True, timeout=90)

    def stop(self, mode: str = "fast") -> None:
        """The server goes away: ``fast`` ends every session (clients see their connection
        closed), ``immediate`` is a crash (recovery at the next start)."""
        self.pg_ctl("-m", mode, "-w", "stop")

    def start(self) -> None:
        """Back on the same port and socket, with the same data; returns once it accepts."""
        options = (f"-k {self.socket_dir} -p {self.port} -c listen_addresses={HOST} "
                   "-c fsync=off -c shared_buffers=16MB -c max_connections=60")
        self.pg_ctl("-o", options, "-l", str(self.socket_dir / "log"), "-w", "-t", "60",
                     "start")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()


def _as_owner(cmd: list[str], owner: pwd.struct_passwd | None) -> list[str]:
    return ["runuser", "-u", owner.pw_name, "--", *cmd] if owner is not None else cmd


@contextlib.contextmanager
def running() -> Iterator[Cluster]:
    owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="wabridge-pg-"))
    data = root / "data"
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(root, free_port(), data, owner)
    try:
        subprocess.run(
            _as_owner([str(bin_dir() / "initdb"), "-D", str(data), "-U", "postgres",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                       "--no-sync"], owner),
            check=True, capture_output=True, timeout=120,
        )
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.pg_ctl("-m", "fast", "-w", "stop", check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
