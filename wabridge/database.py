"""SQLite as every wabridge process uses it: one way to open, to write, and to migrate.

- :func:`connect`: autocommit (transactions are explicit), WAL, ``synchronous=NORMAL`` (a
  commit survives a process crash; a power loss may take the last ones back, never corrupt),
  a ``busy_timeout`` so a second writer waits instead of failing.
- :func:`immediate`: a write transaction that takes the write lock before its first read, so
  a read-then-write never fails half-way with "database is locked"; :func:`deferred`: a read
  transaction (several statements, one snapshot).
- :func:`migrate`: numbered schema steps, step ``n`` turning version ``n - 1`` into ``n``,
  each in its own immediate transaction that re-reads the version (two processes opening a
  fresh file at once never run a step twice); a file newer than the code is refused with
  :class:`~wabridge.errors.SchemaTooNew` (exit code 16, do not restart: a newer wabridge
  wrote it, and an older one must not guess at it).

The version lives in a one-row table ``schema_version (version)``. The worker's store
(:mod:`agent.store`) uses this module; the controller's local plane keeps the same table and
can move onto it unchanged.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from wabridge.errors import SchemaTooNew

Migration = Callable[[sqlite3.Connection], None]

#: The schema version of the worker's store this release writes (``len(agent.store.
#: MIGRATIONS)``; ``tests/test_pg_roles.py`` keeps them equal): the controller's side cannot
#: import the worker's code, and ``wabridgectl doctor`` compares each account's schema with it.
STORE_SCHEMA_VERSION = 7


class Db(Protocol):
    """What :func:`migrate` needs of a connection: SQLite's, or
    :class:`wabridge.postgres.Connection` (which speaks SQLite's placeholders)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Any, /) -> Any: ...


DbT = TypeVar("DbT", bound=Db)

BUSY_TIMEOUT_MS = 10_000


def connect(path: Path, *, check_same_thread: bool = True,
            auto_checkpoint: bool = True) -> sqlite3.Connection:
    """Open ``path`` with wabridge's pragmas. ``auto_checkpoint=False`` leaves copying the
    write-ahead log back to an explicit ``PRAGMA wal_checkpoint`` (for a process whose
    commits must stay short: the worker checkpoints from a thread)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread,
                         timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _wal(db)
        db.execute("PRAGMA synchronous = NORMAL")
        if not auto_checkpoint:
            db.execute("PRAGMA wal_autocheckpoint = 0")
    except BaseException:
        db.close()
        raise
    return db


def _wal(db: sqlite3.Connection) -> None:
    """Switch to WAL. On a fresh file that another connection is switching at the same
    moment, SQLite can answer "database is locked" without waiting for ``busy_timeout``
    (changing the journal mode takes the lock outside the busy handler): try again until
    the timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        else:
            return


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction holding the write lock from its first statement; rolled back when
    the block raises (anything, a cancellation too)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@contextmanager
def deferred(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A read transaction: the statements in the block see one snapshot."""
    db.execute("BEGIN")
    try:
        yield db
    finally:
        db.execute("COMMIT")


def run_script(db: Db, script: str) -> None:
    """Run ``;``-separated DDL inside the caller's transaction.

    Not ``executescript``: it COMMITs a pending transaction first, so a migration would not be
    atomic and :func:`immediate` would then fail with "cannot commit - no transaction is
    active".
    """
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def schema_version(db: Db) -> int:
    """The file's schema version (0: fresh, or written before any step)."""
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def migrate(db: DbT, steps: Sequence[Callable[[DbT], None]], *, name: str,
            transaction: Callable[[DbT], AbstractContextManager[Any]] | None = None) -> int:
    """Bring ``db`` to version ``len(steps)``; returns the version it had. ``name`` (the
    file, or the database and schema) is what :class:`SchemaTooNew` names; ``transaction``
    is the write transaction that excludes other writers (:func:`immediate` for SQLite,
    :func:`wabridge.postgres.immediate` for PostgreSQL)."""
    begin: Callable[[Any], AbstractContextManager[Any]] = transaction or immediate
    found: int | None = None
    while True:
        # The version is read inside the write transaction, so two processes opening a
        # fresh file at once cannot both run the same step.
        with begin(db):
            # created inside the transaction: on PostgreSQL two concurrent CREATE TABLE IF
            # NOT EXISTS can collide; under the write lock only the first one creates it
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = schema_version(db)
            found = current if found is None else found
            if current > len(steps):
                raise SchemaTooNew(
                    f"{name} has schema version {current}, this wabridge knows {len(steps)}",
                    explanation="a newer wabridge wrote this state; upgrade instead of "
                    "downgrading",
                )
            if current == len(steps):
                return found
            steps[current](db)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (current + 1,))
