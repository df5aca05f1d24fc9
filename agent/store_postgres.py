"""The worker's store on PostgreSQL: one schema per account, the same tables as the SQLite
file, built by the same migration steps (:data:`agent.store.MIGRATIONS`).

The steps run here unchanged: their ``CREATE``/``ALTER TABLE`` statements get PostgreSQL's
names for SQLite's column types on the way (:func:`wabridge.postgres.ddl`: the rowid alias
becomes an identity column, ``INTEGER`` ``BIGINT``, ``REAL`` ``DOUBLE PRECISION``), so one
schema version means the same tables on both backends, and a new step needs nothing here.

Adding a migration: append it in :mod:`agent.store` (``@migration``), in SQL both speak (the
contract suite, ``tests/test_store.py``, runs every store test on both). A step that needs
something of SQLite's own (``WITHOUT ROWID``, a table rebuilt by copy...) gets its
PostgreSQL twin here with ``@pg_twin(n)`` (``n``: the schema version it makes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from wabridge import database, fleet_db, postgres
from wabridge.errors import LeaseLost

if TYPE_CHECKING:
    from agent.store import PostgresTarget

PgMigration = Callable[[postgres.Connection], None]
#: schema version -> the step that makes it here instead of the SQLite one
PG_TWINS: dict[int, PgMigration] = {}


def pg_twin(version: int) -> Callable[[PgMigration], PgMigration]:
    def register(fn: PgMigration) -> PgMigration:
        PG_TWINS[version] = fn
        return fn

    return register


def steps() -> list[Callable[[Any], None]]:
    """The migration steps as PostgreSQL runs them: the store's, or their twins."""
    from agent.store import MIGRATIONS  # noqa: PLC0415 (agent.store imports this module)

    return [PG_TWINS.get(n, step) for n, step in enumerate(MIGRATIONS, 1)]


class PostgresSchema:
    """The store in an account's schema (the backend :class:`agent.store.Store` uses).

    Fleet mode (``target.holder`` set): every write transaction checks the lease right after
    taking the schema's write lock (:func:`wabridge.fleet_db.fence`), so a worker whose
    account another host took over can neither acknowledge nor mark a send; the refusal
    (:class:`~wabridge.errors.LeaseLost`) rolls the transaction back and is also handed to
    ``on_lease_lost`` (the worker stops at once, whichever task or thread saw it)."""

    closes_from_any_thread = True  # a psycopg connection is not bound to its thread

    def __init__(self, target: PostgresTarget) -> None:
        self.target = target
        self.name = f"{postgres.describe(target.conninfo)} schema {target.schema}"
        self.fenced = target.holder is not None
        self.on_lease_lost: Callable[[LeaseLost], None] | None = None

    def connect(self) -> postgres.Connection:
        return postgres.connect(self.target.conninfo, self.target.schema,
                                password=self.target.password)

    def transaction(self, conn: postgres.Connection, *, fenced: bool = True
                    ) -> AbstractContextManager[postgres.Connection]:
        if self.target.holder is None or not fenced:
            return postgres.immediate(conn)
        return self._fenced(conn, self.target.holder)

    @contextmanager
    def _fenced(self, conn: postgres.Connection, holder: fleet_db.Holder
                ) -> Iterator[postgres.Connection]:
        try:
            with postgres.immediate(conn) as tx:
                fleet_db.fence(tx, holder.user_id, holder.host_id, holder.epoch)
                yield tx
        except LeaseLost as exc:
            if self.on_lease_lost is not None:
                self.on_lease_lost(exc)
            raise

    def migrate(self, conn: postgres.Connection) -> None:
        database.migrate(conn, steps(), name=self.name, transaction=postgres.immediate)

    def checkpoint(self, conn: Callable[[], postgres.Connection]) -> tuple[int, int]:
        return 0, 0  # the server checkpoints by itself (and no thread opens a connection)

    def usable(self, conn: postgres.Connection) -> bool:
        return conn.usable

    def close(self, conn: postgres.Connection) -> None:
        conn.close()

    def is_outage(self, exc: BaseException) -> bool:
        return postgres.is_outage(exc)
