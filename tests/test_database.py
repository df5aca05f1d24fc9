"""wabridge.database: one way to open, write and migrate SQLite files."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from controller import local
from wabridge import database
from wabridge.errors import ExitCode, SchemaTooNew


def test_connect_sets_the_pragmas(tmp_path: Path) -> None:
    with closing(database.connect(tmp_path / "a.db", auto_checkpoint=False)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == database.BUSY_TIMEOUT_MS
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert db.isolation_level is None


def test_immediate_rolls_back_on_any_exception(tmp_path: Path) -> None:
    with closing(database.connect(tmp_path / "a.db")) as db:
        db.execute("CREATE TABLE t (x INTEGER)")
        with pytest.raises(KeyboardInterrupt), database.immediate(db):
            db.execute("INSERT INTO t VALUES (1)")
            raise KeyboardInterrupt
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
        assert not db.in_transaction


def test_migrate_runs_numbered_steps_once_and_refuses_newer(tmp_path: Path) -> None:
    ran: list[int] = []

    def step(n: int) -> database.Migration:
        def run(db: sqlite3.Connection) -> None:
            ran.append(n)
            db.execute(f"CREATE TABLE t{n} (x INTEGER)")
        return run

    path = tmp_path / "a.db"
    with closing(database.connect(path)) as db:
        assert database.migrate(db, [step(1), step(2)], name="a.db") == 0
        assert database.migrate(db, [step(1), step(2), step(3)], name="a.db") == 2
        assert ran == [1, 2, 3]
        with pytest.raises(SchemaTooNew) as info:
            database.migrate(db, [step(1)], name="a.db")
    assert "a.db has schema version 3, this wabridge knows 1" in str(info.value)
    assert info.value.exit_code == ExitCode.SCHEMA_TOO_NEW


def test_the_local_planes_file_is_already_in_this_format(tmp_path: Path) -> None:
    """The controller's local plane keeps the same ``schema_version`` table, so moving it onto
    :func:`database.migrate` re-runs nothing."""
    path = tmp_path / "plane.db"
    asyncio.run(local.LocalPlane(path).close())
    steps = [local._MIGRATIONS[n] for n in sorted(local._MIGRATIONS)]
    with closing(database.connect(path)) as db:
        assert database.migrate(db, steps, name=str(path)) == local.SCHEMA_VERSION
        assert database.schema_version(db) == local.SCHEMA_VERSION
