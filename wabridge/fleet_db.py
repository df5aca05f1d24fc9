"""The fleet's shared state in PostgreSQL (schema ``wabridge_fleet``): which host owns which
account (leases), which hosts are alive (hosts), where an operator pinned an account
(placements). Owned by the controllers' role; a worker's role sees only its own lease row.

Invariants this module keeps (FLEET.md):
- **One owner**: :func:`acquire` takes a lease only when it is free (no row, released, or
  expired for longer than the grace period) or already this host's, in one transaction with
  the row locked (``FOR UPDATE``); two controllers racing get one winner. Every take bumps
  the ``epoch``, the fencing token.
- **Fencing**: a worker runs :func:`fence` inside each of its write transactions: the row is
  key-share-locked (a take waits for the write to end) and must still carry this host and epoch,
  unreleased; otherwise :class:`~wabridge.errors.LeaseLost` and the write rolls back. A stale
  owner can neither send nor acknowledge.
- **One clock**: every time is the database's ``now()``; no host's wall clock is compared with
  another's. Durations come back as seconds (``expires_in``, ``heartbeat_age``).

Who may do what (granted by ``controller.pg_roles.provision``): an account role has ``USAGE``
on the schema, ``SELECT`` and ``UPDATE (expires_at, released)`` on ``leases`` and a row
policy ``role = current_user`` (and a renewal of at most an hour: a misbehaving worker cannot
keep its account from failing over for ever); nothing on ``hosts`` or ``placements``.

Every function takes a psycopg connection in autocommit mode (the controller's) or a
:class:`wabridge.postgres.Connection` (a worker's store connection); :func:`fence` runs in the
caller's transaction, the others in their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from wabridge import database, postgres
from wabridge.errors import LeaseLost

SCHEMA = "wabridge_fleet"
#: How long :func:`acquire` waits for a lease row a worker's write holds (:func:`fence`)
#: before it calls the lease held: a frozen worker must not stall a controller's loop.
ACQUIRE_LOCK_TIMEOUT = "2s"
#: A fenced transaction left open longer than this (the worker's host froze mid-write) is
#: ended by the server, releasing its share lock so the lease can move on.
FENCED_IDLE_TIMEOUT_MS = 5000

Conn = psycopg.Connection[Any] | postgres.Connection


@dataclass(frozen=True)
class Lease:
    user_id: str
    host_id: str
    epoch: int
    expires_in: float  # seconds from now (database time); negative once expired
    released: bool


@dataclass(frozen=True)
class Holder:
    """Whom a worker's writes are fenced as: its account, its host and the lease epoch it
    was started under (``wabridge.units.lease_from_environment``)."""

    user_id: str
    host_id: str
    epoch: int


@dataclass(frozen=True)
class HostRow:
    host_id: str
    max_workers: int
    memory_mb: int
    draining: bool
    heartbeat_age: float | None  # seconds since its last heartbeat (database time)
    started_at: datetime | None


def _raw(conn: Conn) -> psycopg.Connection[Any]:
    return conn.raw if isinstance(conn, postgres.Connection) else conn


# --- migrations ------------------------------------------------------------------------------
FleetMigration = Callable[[postgres.Connection], None]
MIGRATIONS: list[FleetMigration] = []


def _migration(fn: FleetMigration) -> FleetMigration:
    MIGRATIONS.append(fn)
    return fn


@_migration
def _v1(db: postgres.Connection) -> None:
    database.run_script(db, f"""
        CREATE TABLE {SCHEMA}.hosts (
            host_id TEXT PRIMARY KEY, max_workers INT NOT NULL DEFAULT 0,
            memory_mb INT NOT NULL DEFAULT 0, draining BOOL NOT NULL DEFAULT false,
            heartbeat_at TIMESTAMPTZ, started_at TIMESTAMPTZ);
        CREATE TABLE {SCHEMA}.leases (
            user_id TEXT PRIMARY KEY, role TEXT NOT NULL, host_id TEXT NOT NULL,
            epoch BIGINT NOT NULL, expires_at TIMESTAMPTZ NOT NULL,
            released BOOL NOT NULL DEFAULT false);
        ALTER TABLE {SCHEMA}.leases ENABLE ROW LEVEL SECURITY;
        CREATE POLICY own_lease ON {SCHEMA}.leases USING (role = current_user)
            WITH CHECK (role = current_user AND expires_at <= now() + interval '1 hour');
        CREATE TABLE {SCHEMA}.placements (
            user_id TEXT PRIMARY KEY, host_id TEXT NOT NULL, set_at TIMESTAMPTZ)
    """)


@contextmanager
def _migrating(db: postgres.Connection) -> Iterator[postgres.Connection]:
    """A migration step's transaction: every controller serialized on one advisory lock, the
    schema made if missing, and found first on the path (``schema_version`` is its own)."""
    with db.raw.transaction():
        db.raw.execute("SELECT pg_advisory_xact_lock(hashtext('wabridge_fleet'))")
        db.raw.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        db.raw.execute(f"SET LOCAL search_path TO {SCHEMA}")
        yield db


def migrate(conn: Conn) -> None:
    """Make or upgrade the ``wabridge_fleet`` schema (idempotent; any number of controllers
    at once). A schema newer than this code raises :class:`~wabridge.errors.SchemaTooNew`."""
    raw = _raw(conn)
    database.migrate(postgres.Connection(raw, SCHEMA), MIGRATIONS, name=f"schema {SCHEMA}",
                     transaction=_migrating)


def grant_account(conn: Conn, role: str) -> None:
    """What an account's role may do here: read and renew its own lease row (the policy
    limits it to rows naming it), nothing else. Run by the schema's owner."""
    raw, ident = _raw(conn), sql.Identifier(role)
    raw.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(SCHEMA), ident))
    raw.execute(sql.SQL("GRANT SELECT, UPDATE (expires_at, released) ON {}.leases TO {}").format(
        sql.Identifier(SCHEMA), ident))


# --- leases ----------------------------------------------------------------------------------
#: The columns :func:`_lease` reads, in its order (expiry as seconds from now, database time).
_LEASE_COLUMNS = "user_id, host_id, epoch, EXTRACT(EPOCH FROM expires_at - now())::float8, released"


def _lease(row: Any) -> Lease:
    """A row of (user_id, host_id, epoch, seconds to expiry by database time, released)."""
    return Lease(str(row[0]), str(row[1]), int(row[2]), float(row[3]), bool(row[4]))


def acquire(conn: Conn, user_id: str, role: str, host_id: str, grace_seconds: float,
            lease_seconds: float) -> Lease | None:
    """Take the account's lease for ``host_id`` (a new epoch, ``lease_seconds`` from now), or
    None when another host holds it (unexpired, or expired less than ``grace_seconds`` ago).

    A lease this host already holds is taken again with a new epoch: the caller checked that
    its worker is not running, and the new epoch fences out any leftover of the old one."""
    raw = _raw(conn)
    try:
        with raw.transaction():
            raw.execute("SELECT set_config('lock_timeout', %s, true)", (ACQUIRE_LOCK_TIMEOUT,))
            row = raw.execute(
                "SELECT host_id, released, expires_at + make_interval(secs => %s) < now() "
                "FROM wabridge_fleet.leases WHERE user_id = %s FOR UPDATE",
                (grace_seconds, user_id)).fetchone()
            if row is None:
                got = raw.execute(
                    "INSERT INTO wabridge_fleet.leases (user_id, role, host_id, epoch, expires_at) "
                    "VALUES (%s, %s, %s, 1, now() + make_interval(secs => %s)) "
                    "ON CONFLICT (user_id) DO NOTHING RETURNING " + _LEASE_COLUMNS,
                    (user_id, role, host_id, lease_seconds)).fetchone()
                return _lease(got) if got is not None else None  # None: another won the race
            holder, released, expired = row
            if not (released or expired or holder == host_id):
                return None
            got = raw.execute(
                "UPDATE wabridge_fleet.leases SET epoch = epoch + 1, host_id = %s, role = %s, "  # noqa: S608 (a constant)
                "expires_at = now() + make_interval(secs => %s), released = false "
                "WHERE user_id = %s RETURNING " + _LEASE_COLUMNS,
                (host_id, role, lease_seconds, user_id)).fetchone()
            return _lease(got)
    except psycopg.errors.LockNotAvailable:
        return None  # a worker's write holds the row: its owner is alive enough


def renew(conn: Conn, user_id: str, host_id: str, epoch: int, lease_seconds: float) -> bool:
    """Extend this owner's lease to ``lease_seconds`` from now; False when it is not this
    host's and epoch any more, or was released (lost: stop). Renewing a lease that expired
    but was not taken is fine: any take bumps the epoch."""
    row = _raw(conn).execute(
        "UPDATE wabridge_fleet.leases SET expires_at = now() + make_interval(secs => %s) "
        "WHERE user_id = %s AND host_id = %s AND epoch = %s AND NOT released RETURNING 1",
        (lease_seconds, user_id, host_id, epoch)).fetchone()
    return row is not None


def release(conn: Conn, user_id: str, host_id: str, epoch: int) -> bool:
    """A clean stop's last word (WhatsApp disconnected, everything committed): the next owner
    need not wait for expiry and grace. False when the lease was not this owner's any more."""
    row = _raw(conn).execute(
        "UPDATE wabridge_fleet.leases SET released = true "
        "WHERE user_id = %s AND host_id = %s AND epoch = %s AND NOT released RETURNING 1",
        (user_id, host_id, epoch)).fetchone()
    return row is not None


def fence(conn: Conn, user_id: str, host_id: str, epoch: int) -> None:
    """Inside a worker's write transaction: raise :class:`LeaseLost` unless the lease is still
    this host's, this epoch's and unreleased. The row stays locked (``FOR KEY SHARE``) until
    the caller's transaction ends, so no take (``FOR UPDATE``) can slip in between this check
    and the commit, while the worker's own renewals (which change no key) go on; should the
    worker's host freeze with the transaction open, the server ends it after
    ``FENCED_IDLE_TIMEOUT_MS``."""
    row = _raw(conn).execute(
        "SELECT host_id, epoch, released, "
        "set_config('idle_in_transaction_session_timeout', %s, true) "
        "FROM wabridge_fleet.leases WHERE user_id = %s FOR KEY SHARE",
        (str(FENCED_IDLE_TIMEOUT_MS), user_id)).fetchone()
    if row is None:
        raise LeaseLost(f"no lease for {user_id!r}")
    holder, current, released = str(row[0]), int(row[1]), bool(row[2])
    if holder != host_id or current != epoch or released:
        raise LeaseLost(f"lease of {user_id!r} is {holder} epoch {current}"
                        f"{' (released)' if released else ''}, not {host_id} epoch {epoch}")


def lease(conn: Conn, user_id: str) -> Lease | None:
    """One account's lease (a worker reads its own; the controller any)."""
    row = _raw(conn).execute(f"SELECT {_LEASE_COLUMNS} FROM wabridge_fleet.leases "  # noqa: S608 (a constant)
                             "WHERE user_id = %s", (user_id,)).fetchone()
    return _lease(row) if row is not None else None


def leases(conn: Conn) -> list[Lease]:
    """Every lease, by user id (the controller's view)."""
    return [_lease(r) for r in _raw(conn).execute(
        f"SELECT {_LEASE_COLUMNS} FROM wabridge_fleet.leases ORDER BY user_id")]  # noqa: S608 (a constant)


# --- hosts -----------------------------------------------------------------------------------
def heartbeat(conn: Conn, host_id: str, max_workers: int, memory_mb: int) -> None:
    """This host is alive (``heartbeat_at = now()``), with its capacity; registers it the
    first time (``started_at``). Its draining flag is left as it is."""
    _raw(conn).execute(
        "INSERT INTO wabridge_fleet.hosts (host_id, max_workers, memory_mb, heartbeat_at, "
        "started_at) VALUES (%s, %s, %s, now(), now()) ON CONFLICT (host_id) DO UPDATE SET "
        "max_workers = EXCLUDED.max_workers, memory_mb = EXCLUDED.memory_mb, "
        "heartbeat_at = now()", (host_id, max_workers, memory_mb))


def hosts(conn: Conn) -> list[HostRow]:
    rows = _raw(conn).execute(
        "SELECT host_id, max_workers, memory_mb, draining, "
        "EXTRACT(EPOCH FROM now() - heartbeat_at)::float8, started_at "
        "FROM wabridge_fleet.hosts ORDER BY host_id").fetchall()
    return [HostRow(str(r[0]), int(r[1]), int(r[2]), bool(r[3]),
                    None if r[4] is None else float(r[4]), r[5]) for r in rows]


def set_draining(conn: Conn, host_id: str, draining: bool) -> bool:
    """Mark a host draining (its accounts move away) or not; False when no such host."""
    row = _raw(conn).execute(
        "UPDATE wabridge_fleet.hosts SET draining = %s WHERE host_id = %s RETURNING 1",
        (draining, host_id)).fetchone()
    return row is not None


# --- placements (an operator's pins) ---------------------------------------------------------
def pin(conn: Conn, user_id: str, host_id: str) -> None:
    _raw(conn).execute(
        "INSERT INTO wabridge_fleet.placements (user_id, host_id, set_at) VALUES (%s, %s, now()) "
        "ON CONFLICT (user_id) DO UPDATE SET host_id = EXCLUDED.host_id, set_at = now()",
        (user_id, host_id))


def pins(conn: Conn) -> dict[str, str]:
    return {str(u): str(h) for u, h in _raw(conn).execute(
        "SELECT user_id, host_id FROM wabridge_fleet.placements ORDER BY user_id")}


def unpin(conn: Conn, user_id: str) -> None:
    _raw(conn).execute("DELETE FROM wabridge_fleet.placements WHERE user_id = %s", (user_id,))
