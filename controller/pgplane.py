"""The PostgreSQL control plane (``controller.control_plane = "postgres"``): a fleet with
nothing but PostgreSQL.

Every controller of the fleet (and ``wabridgectl doctor``) opens ``storage.postgres_url`` as the
controller's role (password: the ``postgres-password`` credential, as for the accounts'
roles, ``controller.pg_roles.controller_password``) and works in the schema ``wabridge_plane``,
which the first one creates. The accounts' own roles get nothing there.

- Documents: ``accounts`` and ``link_records`` hold one JSON object per user id (the Firestore
  documents' field names, as text: PostgreSQL's ``jsonb`` refuses ``\\u0000``, which a
  WhatsApp name may hold), with the status derived into an indexed column (a generated one:
  whoever writes the JSON keeps it right) for ``pending_requests``; ``messages``,
  ``summaries`` and ``usage`` are keyed by the user and the record's own key, as in the local
  plane, so a write only ever reaches its user's rows.
- Semantics identical to the other planes: ``update``/``put_link_record`` are Firestore's
  ``set(..., merge=True)`` (:func:`controller.plane.merge_fields`), read and written in one
  transaction holding the row (``SELECT ... FOR UPDATE`` after an ``INSERT ... ON CONFLICT DO
  NOTHING`` that makes sure there is one to hold), so two hosts' merges never lose each
  other's fields; ``claim`` reads the status under the same row lock, so of two hosts exactly
  one wins. ``updatedAt``/``claimedAt`` are Unix times read from the database's clock (one
  clock for the whole fleet, where Firestore stores server timestamps).
- Change feed: a trigger on ``accounts`` sends ``NOTIFY <schema>, '<user id>'`` in the
  writing transaction, whoever the writer is (PostgreSQL delivers it at commit, once per
  user and transaction). The watcher's own connection ``LISTEN``\\ s first, then reads every
  document (the first deliveries), then reads each notified document after the fact and
  delivers it, or ``Removed``. The connection is pinged when idle; when it is lost,
  ``feed_alive`` is False until it is re-opened (backoff 0.5 s .. 5 s), and the re-opened feed
  reads every document again (documents deleted meanwhile arrive as ``Removed``), as
  ``rewatch`` does at once. NOTIFY is not durable: one sent while nobody listened is gone,
  which that re-read and the controller's resync (``pending_requests``) cover.
- Schema: numbered steps through :func:`wabridge.database.migrate` under
  :func:`wabridge.postgres.immediate` (an advisory lock: two controllers starting at once
  never run a step twice); a schema newer than this code is refused with ``SchemaTooNew``
  (exit 16, not restarted), never modified.

Errors: a call that cannot reach the server is retried on a new connection for up to
``deadline`` seconds (a claim only when it cannot have reached the server: it is not
idempotent, so its connection is checked first), then raises :class:`PlaneUnavailable`; a
refused login or a missing privilege raises :class:`PlaneDenied`; any other server error
:class:`PlaneError`. Nothing connects before the first call, so a controller started while
the server is down waits like one on Firestore instead of exhausting systemd's start limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from controller.plane import (
    AccountDoc,
    Change,
    ChangeCallback,
    ControlPlane,
    PlaneDenied,
    PlaneError,
    PlaneUnavailable,
    Removed,
    check_doc_id,
    merge_fields,
    message_fields,
    parse_account,
    summary_fields,
    usage_fields,
)
from wabridge import database, logs, postgres
from wabridge.protocol import MessageEvent, Usage
from wabridge.status import REQUESTS, DocStatus, parse_doc_status

log = logs.get("controller.pgplane")

SCHEMA = "wabridge_plane"
DEFAULT_DEADLINE = 30.0
BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0
PING_INTERVAL = 5.0  # an idle feed asks the server this often whether it is still there
PING_TIMEOUT = 5.0
BATCH_WINDOW = 0.01  # notifications arriving this close together are read in one query
# a silent peer (a partition, a paused server) is noticed by the kernel within ~20 s
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 5,
              "keepalives_count": 3}

T = TypeVar("T")
Db = postgres.Connection

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::float8"


def _initial_schema(db: Db) -> None:
    # text columns sort bytewise ("C"), as the local plane's SQLite does
    for statement in (
        # the status is derived, so a client (or an operator in psql) writes fields only
        'CREATE TABLE accounts (user_id TEXT COLLATE "C" PRIMARY KEY, fields TEXT NOT NULL, '
        "status TEXT GENERATED ALWAYS AS (fields::json ->> 'status') STORED)",
        "CREATE INDEX accounts_by_status ON accounts (status) WHERE status IS NOT NULL",
        'CREATE TABLE link_records (user_id TEXT COLLATE "C" PRIMARY KEY, fields TEXT NOT NULL)',
        'CREATE TABLE messages (user_id TEXT COLLATE "C" NOT NULL, event_id TEXT COLLATE "C" '
        "NOT NULL, ts DOUBLE PRECISION NOT NULL, fields TEXT NOT NULL, "
        "PRIMARY KEY (user_id, event_id))",
        "CREATE INDEX messages_by_user_ts ON messages (user_id, ts)",
        'CREATE TABLE summaries (user_id TEXT COLLATE "C" NOT NULL, chat_id TEXT COLLATE "C" '
        "NOT NULL, number BIGINT NOT NULL, fields TEXT NOT NULL, "
        "PRIMARY KEY (user_id, chat_id, number))",
        'CREATE TABLE usage (user_id TEXT COLLATE "C" NOT NULL, day TEXT COLLATE "C" NOT NULL, '
        "fields TEXT NOT NULL, PRIMARY KEY (user_id, day))",
        # the channel is the schema's name: planes in other schemas hear nothing of ours
        "CREATE FUNCTION notify_account() RETURNS trigger LANGUAGE plpgsql AS $body$ BEGIN "
        "IF TG_OP = 'DELETE' THEN PERFORM pg_notify(TG_TABLE_SCHEMA, OLD.user_id); "
        "ELSE PERFORM pg_notify(TG_TABLE_SCHEMA, NEW.user_id); END IF; "
        "RETURN NULL; END $body$",
        "CREATE TRIGGER accounts_notify AFTER INSERT OR UPDATE OR DELETE ON accounts "
        "FOR EACH ROW EXECUTE FUNCTION notify_account()",
    ):
        db.execute(statement)


#: Released steps never change; a new one is appended.
STEPS: list[Callable[[Db], None]] = [_initial_schema]
SCHEMA_VERSION = len(STEPS)


def _dumps(data: Mapping[str, Any]) -> str:
    # ASCII: a lone surrogate or a NUL in a name is escaped, never refused by the server
    return json.dumps(data, separators=(",", ":"))


def _loads(text: str) -> dict[str, Any]:
    data = json.loads(text)
    return data if isinstance(data, dict) else {}


def map_error(exc: psycopg.Error) -> PlaneError:
    """The one place where psycopg's errors become the plane's."""
    state = getattr(exc, "sqlstate", None) or ""
    text = str(exc).strip()
    if state.startswith("28") or state == "42501" or "authentication failed" in text or (
            "pg_hba.conf" in text):
        return PlaneDenied(f"PostgreSQL denied the controller: {text}",
                           explanation="check the 'postgres-password' credential and the "
                           "controller role's rights on storage.postgres_url's database")
    if isinstance(exc, psycopg.OperationalError):
        return PlaneUnavailable(f"PostgreSQL unavailable: {text}",
                                explanation="check the server and the network path to it; "
                                "the call is retried later")
    return PlaneError(f"PostgreSQL error: {text}")


def health(conn: psycopg.Connection[Any], schema: str = SCHEMA) -> tuple[int | None, int]:
    """What ``wabridgectl doctor`` reports: the plane schema's version (None: not created
    yet) and how many account documents it holds."""
    ident = sql.Identifier(schema)
    found = conn.execute("SELECT to_regclass(%s), to_regclass(%s)",
                         (f"{ident.as_string(conn)}.schema_version",
                          f"{ident.as_string(conn)}.accounts")).fetchone()
    if found is None or found[0] is None:
        return None, 0
    row = conn.execute(sql.SQL("SELECT MAX(version) FROM {}.schema_version").format(ident)
                       ).fetchone()
    version = int(row[0]) if row and row[0] is not None else 0
    if found[1] is None:
        return version, 0
    count = conn.execute(sql.SQL("SELECT count(*) FROM {}.accounts").format(ident)).fetchone()
    return version, int(count[0]) if count else 0


class PostgresPlane(ControlPlane):
    name = "postgres"

    def __init__(self, conninfo: str, *, password: str | None = None, schema: str = SCHEMA,
                 deadline: float = DEFAULT_DEADLINE) -> None:
        self._conninfo = psycopg.conninfo.make_conninfo(conninfo, **KEEPALIVES)
        self._password = password
        self._schema = schema
        self._deadline = deadline
        self._lock = threading.Lock()  # the command connection: one call at a time
        self._db: Db | None = None
        self._closed = False
        self._wake = threading.Event()  # cuts a retry's sleep short at close
        self._on_change: ChangeCallback | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._listening = False
        self._feed: psycopg.AsyncConnection[Any] | None = None
        self._known: set[str] = set()

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def target(self) -> str:
        """Server, database and role, never a password (for messages)."""
        return f"{postgres.describe(self._conninfo)} schema {self._schema}"

    # -- connecting and migrating ---------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"password": self._password} if self._password else {}
        return {"connect_timeout": postgres.CONNECT_TIMEOUT, **extra}

    def _open(self) -> Db:
        try:
            db = postgres.connect(self._conninfo, self._schema, password=self._password)
        except postgres.SchemaMissing:
            self._create_schema()
            db = postgres.connect(self._conninfo, self._schema, password=self._password)
        try:
            database.migrate(db, STEPS, name=self.target, transaction=postgres.immediate)
        except BaseException:
            db.close()
            raise
        return db

    def _create_schema(self) -> None:
        with psycopg.connect(self._conninfo, autocommit=True, **self._connect_kwargs()) as conn:
            # UniqueViolation: another controller created it at the same moment
            with contextlib.suppress(psycopg.errors.UniqueViolation,
                                     psycopg.errors.DuplicateSchema):
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                    sql.Identifier(self._schema)))
            log.info("plane.postgres_schema_created", target=self.target)

    # -- plumbing ----------------------------------------------------------------------------

    def _locked(self, fn: Callable[..., T], args: tuple[Any, ...], idempotent: bool) -> T:
        deadline = time.monotonic() + self._deadline
        delay = 0.2
        with self._lock:
            while True:
                if self._closed:
                    raise RuntimeError("PostgresPlane is closed")
                sent = False  # whether fn may have reached the server
                try:
                    if self._db is None or not self._db.usable:
                        if self._db is not None:
                            self._db.close()
                        self._db = None
                        self._db = self._open()
                    elif not idempotent:
                        # an idle connection may be dead (a restarted server): find out
                        # before a claim is sent, which must not be sent twice
                        self._db.execute("SELECT 1")
                    sent = True
                    return fn(self._db, *args)
                except psycopg.Error as exc:
                    error = map_error(exc)
                    broken = self._db is None or not self._db.usable
                    retry = (isinstance(error, PlaneUnavailable) and broken
                             and (idempotent or not sent)
                             and time.monotonic() + delay < deadline)
                    if not retry:
                        raise error from None
                    log.warning("plane.postgres_retry", error=str(exc).strip(),
                                retry_in=round(delay, 2))
                self._wake.wait(delay)
                delay = min(delay * 2, 2.0)

    async def _run(self, fn: Callable[..., T], *args: Any, idempotent: bool = True) -> T:
        """``fn(db, *args)`` in a thread, on the command connection (re-opened when lost)."""
        if self._closed:
            raise RuntimeError("PostgresPlane is closed")
        return await asyncio.to_thread(self._locked, fn, args, idempotent)

    @staticmethod
    def _read_doc(db: Db, table: str, user_id: str) -> dict[str, Any] | None:
        row = db.execute(f"SELECT fields FROM {table} WHERE user_id = ?",  # noqa: S608 - fixed names
                         (user_id,)).fetchone()
        return _loads(row[0]) if row else None

    @staticmethod
    def _held(db: Db, table: str, user_id: str) -> tuple[dict[str, Any], float] | None:
        """The row's fields, locked until the transaction ends, and the database's time."""
        row = db.execute(f"SELECT fields, {_NOW} FROM {table} WHERE user_id = ? "  # noqa: S608
                         "FOR UPDATE", (user_id,)).fetchone()
        return (_loads(row[0]), float(row[1])) if row else None

    @staticmethod
    def _write(db: Db, table: str, user_id: str, data: Mapping[str, Any]) -> None:
        db.execute(f"UPDATE {table} SET fields = ? WHERE user_id = ?",  # noqa: S608
                   (_dumps(data), user_id))

    def _merge(self, db: Db, table: str, user_id: str, fields: Mapping[str, Any],
               stamp: bool) -> None:
        with db.raw.transaction():
            held = None
            while held is None:  # None: deleted by another client between the two
                # a row to lock first: two creators of one document then merge in turn
                db.execute(f"INSERT INTO {table} (user_id, fields) VALUES (?, ?) "  # noqa: S608
                           "ON CONFLICT (user_id) DO NOTHING", (user_id, "{}"))
                held = self._held(db, table, user_id)
            data, now = held
            merge_fields(data, {**fields, "updatedAt": now} if stamp else fields)
            self._write(db, table, user_id, data)

    @staticmethod
    def _accounts(db: Db, where: str = "", params: tuple[Any, ...] = ()) -> list[AccountDoc]:
        rows = db.execute(f"SELECT user_id, fields FROM accounts {where} "  # noqa: S608
                          "ORDER BY user_id", params).fetchall()
        return [parse_account(uid, _loads(text)) for uid, text in rows]

    # -- watching ----------------------------------------------------------------------------

    async def watch(self, on_change: ChangeCallback) -> None:
        if self._on_change is not None:
            raise RuntimeError("watch() was already called on this plane")
        self._on_change = on_change
        try:
            self._feed = await self._open_feed()
        except BaseException:
            self._on_change = None
            raise
        self._watcher = asyncio.create_task(self._follow(), name="postgres-plane-watch")

    async def rewatch(self) -> None:
        """Close the listening connection and open a new one, which reads every document
        again (the controller's resync found a request the feed did not deliver)."""
        if self._watcher is None or self._closed:
            return
        log.warning("plane.watch_reopened", backend=self.name,
                    reason="a pending request was not delivered")
        await self._stop_feed()
        try:
            self._feed = await self._open_feed()
        except (psycopg.Error, OSError, PlaneError) as exc:
            log.warning("plane.watch_subscribe_failed", backend=self.name, error=str(exc))
            # the new task keeps trying
        self._watcher = asyncio.create_task(self._follow(), name="postgres-plane-watch")

    def feed_alive(self) -> bool:
        """False from the moment the listening connection is found lost until it is open
        again (and when its task ended)."""
        if self._watcher is None:
            return not self._closed
        return self._listening and not self._watcher.done()

    async def _stop_feed(self) -> None:
        """End the feed's task and close its connection (a task cancelled before it ever ran
        has not closed it)."""
        task, self._watcher = self._watcher, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._feed = self._feed, None
        self._listening = False
        if conn is not None:
            await conn.close()

    async def _open_feed(self) -> psycopg.AsyncConnection[Any]:
        """Connect, LISTEN, then read and deliver every document: a change committed after
        the LISTEN is heard, one before it is in the read."""
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True,
            application_name=f"wabridge feed {self._schema}"[:63], **self._connect_kwargs())
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._schema)))
            docs = await self._run(self._accounts)
        except BaseException:
            await conn.close()
            raise
        present = {doc.user_id for doc in docs}
        self._deliver([*docs, *(Removed(uid) for uid in sorted(self._known - present))])
        self._listening = True
        return conn

    async def _follow(self) -> None:
        """The feed's task: deliver what its connection hears; re-open it when lost, with
        backoff."""
        delay = BACKOFF_MIN
        while True:
            conn = self._feed
            if conn is None:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311
                delay = min(delay * 2, BACKOFF_MAX)
                try:
                    self._feed = conn = await self._open_feed()
                except (psycopg.Error, OSError, PlaneError) as exc:
                    log.warning("plane.watch_subscribe_failed", backend=self.name,
                                error=str(exc).strip(), retry_in=round(delay, 2))
                    continue
                log.info("plane.watch_resubscribed", backend=self.name)
                delay = BACKOFF_MIN
            try:
                await self._hear(conn)
            except (psycopg.Error, OSError, TimeoutError, PlaneError) as exc:
                self._listening = False
                log.warning("plane.watch_lost", backend=self.name, error=str(exc).strip(),
                            retry_in=round(delay, 2))
            self._feed = None
            await conn.close()

    async def _hear(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Until the connection fails: wait for notifications (pinging when idle), read the
        documents they name, deliver them."""
        while True:
            users: dict[str, None] = {}  # ordered, each user once
            async for note in conn.notifies(timeout=PING_INTERVAL, stop_after=1):
                users[note.payload] = None
            if not users:
                await asyncio.wait_for(conn.execute("SELECT 1"), PING_TIMEOUT)
                continue
            async for note in conn.notifies(timeout=BATCH_WINDOW):
                users[note.payload] = None
            found = {doc.user_id: doc for doc in await self._run(
                self._accounts, "WHERE user_id = ANY(?)", (list(users),))}
            self._deliver([found.get(uid) or Removed(uid) for uid in users])

    def _deliver(self, items: list[Change]) -> None:
        """On the loop: track known ids (a ``Removed`` only for a document delivered
        before), call back."""
        on_change = self._on_change
        if on_change is None or self._closed:
            return
        for item in items:
            if isinstance(item, Removed):
                if item.user_id not in self._known:
                    continue
                self._known.discard(item.user_id)
            else:
                self._known.add(item.user_id)
            try:
                on_change(item)
            except Exception as exc:
                log.exception("plane.watch_consumer_failed", backend=self.name, error=str(exc))

    # -- reads -------------------------------------------------------------------------------

    async def list_accounts(self) -> list[AccountDoc]:
        return await self._run(self._accounts)

    async def pending_requests(self) -> list[AccountDoc]:
        """The documents holding a request, by the indexed status column."""
        values = sorted(status.value for status in REQUESTS)
        return await self._run(self._accounts, "WHERE status = ANY(?)", (values,))

    async def get(self, user_id: str) -> AccountDoc | None:
        data = await self._run(self._read_doc, "accounts", check_doc_id(user_id))
        return parse_account(user_id, data) if data is not None else None

    async def link_record(self, user_id: str) -> dict[str, Any] | None:
        """The link record ``sessions/{userId}`` as stored, or None (tests)."""
        return await self._run(self._read_doc, "link_records", check_doc_id(user_id))

    async def messages(self, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
        def read(db: Db) -> list[dict[str, Any]]:
            rows = db.execute("SELECT fields FROM messages WHERE user_id = ? "
                              "ORDER BY ts DESC, event_id DESC LIMIT ?",
                              (user_id, limit)).fetchall()
            return [_loads(text) for (text,) in reversed(rows)]

        return await self._run(read)

    async def summaries(self, user_id: str, chat_id: str) -> list[dict[str, Any]]:
        def read(db: Db) -> list[dict[str, Any]]:
            rows = db.execute("SELECT fields FROM summaries WHERE user_id = ? AND chat_id = ? "
                              "ORDER BY number", (user_id, chat_id)).fetchall()
            return [_loads(text) for (text,) in rows]

        return await self._run(read)

    async def usage(self, user_id: str | None, since_day: str) -> list[dict[str, Any]]:
        def read(db: Db) -> list[dict[str, Any]]:
            rows = db.execute("SELECT fields FROM usage WHERE day >= ? AND "
                              "(?::text IS NULL OR user_id = ?) ORDER BY user_id, day",
                              (since_day, user_id, user_id)).fetchall()
            return [_loads(text) for (text,) in rows]

        return await self._run(read)

    # -- writes ------------------------------------------------------------------------------

    async def claim(
        self, user_id: str, expect: frozenset[DocStatus], new: DocStatus, host: str
    ) -> bool:
        def attempt(db: Db) -> bool:
            with db.raw.transaction():
                held = self._held(db, "accounts", user_id)
                if held is None or parse_doc_status(held[0].get("status")) not in expect:
                    return False
                data, now = held
                merge_fields(data, {"status": new.value, "host": host, "claimedAt": now,
                                    "updatedAt": now})
                self._write(db, "accounts", user_id, data)
                return True

        check_doc_id(user_id)
        return await self._run(attempt, idempotent=False)

    async def update(self, user_id: str, fields: Mapping[str, Any]) -> None:
        await self._run(self._merge, "accounts", check_doc_id(user_id), dict(fields), True)

    async def request(self, user_id: str, status: DocStatus, **fields: Any) -> None:
        await self.update(user_id, {**fields, "status": status.value})

    async def delete(self, user_id: str) -> None:
        def remove(db: Db) -> None:
            db.execute("DELETE FROM accounts WHERE user_id = ?", (user_id,))

        check_doc_id(user_id)
        await self._run(remove)

    async def put_link_record(self, user_id: str, fields: Mapping[str, Any]) -> None:
        await self._run(self._merge, "link_records", check_doc_id(user_id), dict(fields), False)

    async def add_message(self, user_id: str, event: MessageEvent) -> None:
        fields = message_fields(check_doc_id(user_id), event)

        def put(db: Db) -> None:
            db.execute("INSERT INTO messages (user_id, event_id, ts, fields) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (user_id, event_id) DO UPDATE SET ts = excluded.ts, "
                       "fields = excluded.fields",
                       (user_id, event.event_id, float(event.ts), _dumps(fields)))

        await self._run(put)

    async def add_summary(self, user_id: str, chat_id: str, number: int, text: str) -> None:
        fields = summary_fields(check_doc_id(user_id), chat_id, number, text)

        def put(db: Db) -> None:
            db.execute("INSERT INTO summaries (user_id, chat_id, number, fields) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT (user_id, chat_id, number) "
                       "DO UPDATE SET fields = excluded.fields",
                       (user_id, chat_id, number, _dumps(fields)))

        await self._run(put)

    async def put_usage(self, user_id: str, usage: Usage) -> None:
        fields = usage_fields(check_doc_id(user_id), usage)

        def put(db: Db) -> None:
            db.execute("INSERT INTO usage (user_id, day, fields) VALUES (?, ?, ?) "
                       "ON CONFLICT (user_id, day) DO UPDATE SET fields = excluded.fields",
                       (user_id, usage.day, _dumps(fields)))

        await self._run(put)

    # -- shutdown ----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        await self._stop_feed()

        def shut() -> None:
            with self._lock:  # after a call in flight (a retry sees _closed and ends)
                db, self._db = self._db, None
                if db is not None:
                    db.close()

        await asyncio.to_thread(shut)
