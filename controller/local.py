"""The local control plane (``controller.control_plane = "local"``): one SQLite file.

For hosts without Firebase. The controller and ``wabridgectl`` (other processes) open the same
file (``controller.local_db``), so everything that Firestore gives for free is built here:

- Durability and concurrency: WAL journal, ``synchronous=NORMAL`` (a commit survives a crash
  of the process; the last commits may be lost on power failure), ``busy_timeout`` so writers
  queue instead of failing, and ``BEGIN IMMEDIATE`` for every read-then-write (merge, claim),
  which takes the write lock before reading, so two processes can never both win a claim.
- Documents: ``user_sessions`` and ``sessions`` hold one JSON object per user id (the same
  field names as the Firestore documents); ``messages`` and ``summaries`` are keyed by the
  pair ``(user_id, event_id)`` / the triple ``(user_id, chat_id, number)``, so a write can
  only ever reach the speaking user's own row (schema 3; before it they were keyed by a
  ``{userId}__{eventId}`` string, which two users could share: see ``message_doc_id``).
- Semantics identical to ``FirestorePlane``: ``update``/``put_link_record`` behave like
  Firestore's ``set(..., merge=True)`` (nested maps merge key by key, an empty map or any
  other value replaces, a top-level ``None`` deletes the field, a nested ``None`` is stored as
  null); ``updatedAt``/``claimedAt`` are Unix times (float seconds) where Firestore stores
  server timestamps. Values must be JSON-serializable (``TypeError`` otherwise).
- Change feed for ``watch``: triggers on ``user_sessions`` append the user id to ``changes``
  (``INTEGER PRIMARY KEY AUTOINCREMENT``, so ids only grow) on every insert, update and delete,
  whoever the writer is. A watcher polls ``MAX(id)`` every 100 ms (one indexed read when idle)
  and re-reads the documents named by new rows; a missing document is delivered as
  ``Removed``. The table prunes itself (keeps the last ~4096 rows); a watcher that fell
  further behind notices the gap and re-reads everything, like a Firestore listener reset.
- Schema: versioned migrations registered with ``@_migration(n)``, each applied in its own
  ``BEGIN IMMEDIATE`` transaction that re-checks ``schema_version`` (so concurrent openers do
  not race). A file whose schema is newer than this code is refused with ``SchemaTooNew``
  (exit 16, which the unit does not restart), never modified.

Opening happens in the constructor (blocking, milliseconds; it creates the parent directory,
the file and the schema). Afterwards every call runs in ``asyncio.to_thread`` on one
connection guarded by a lock. sqlite3 errors after opening propagate unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from controller.plane import (
    AccountDoc,
    Change,
    ChangeCallback,
    ControlPlane,
    Removed,
    check_doc_id,
    merge_fields,
    message_fields,
    parse_account,
    summary_fields,
    usage_fields,
)
from wabridge import logs
from wabridge.errors import ConfigError, SchemaTooNew
from wabridge.protocol import MessageEvent, Usage
from wabridge.status import REQUESTS, DocStatus, parse_doc_status

log = logs.get("controller.local")

BUSY_TIMEOUT_MS = 10_000
POLL_INTERVAL = 0.1
POLL_BACKOFF_MAX = 5.0

T = TypeVar("T")
Migration = Callable[[sqlite3.Connection], None]
_MIGRATIONS: dict[int, Migration] = {}


def _migration(version: int) -> Callable[[Migration], Migration]:
    """Register a schema step. Steps are numbered 1, 2, ... and never edited once released."""

    def register(step: Migration) -> Migration:
        if version in _MIGRATIONS:
            raise RuntimeError(f"migration {version} registered twice")
        _MIGRATIONS[version] = step
        return step

    return register


@_migration(1)
def _initial_schema(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE user_sessions (user_id TEXT PRIMARY KEY, fields TEXT NOT NULL)")
    db.execute("CREATE TABLE sessions (user_id TEXT PRIMARY KEY, fields TEXT NOT NULL)")
    db.execute(
        "CREATE TABLE messages (doc_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
        "ts REAL NOT NULL, fields TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX messages_by_user_ts ON messages (user_id, ts)")
    db.execute("CREATE TABLE changes (id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL)")
    # Migrations are literal SQL: a released step never changes.
    db.execute(
        "CREATE TRIGGER user_sessions_insert AFTER INSERT ON user_sessions "
        "BEGIN INSERT INTO changes (user_id) VALUES (NEW.user_id); END"
    )
    db.execute(
        "CREATE TRIGGER user_sessions_update AFTER UPDATE ON user_sessions "
        "BEGIN INSERT INTO changes (user_id) VALUES (NEW.user_id); END"
    )
    db.execute(
        "CREATE TRIGGER user_sessions_delete AFTER DELETE ON user_sessions "
        "BEGIN INSERT INTO changes (user_id) VALUES (OLD.user_id); END"
    )
    # Keep the last 4096 change rows (pruned every 256 writes).
    db.execute(
        "CREATE TRIGGER changes_prune AFTER INSERT ON changes WHEN NEW.id % 256 = 0 "
        "BEGIN DELETE FROM changes WHERE id <= NEW.id - 4096; END"
    )


@_migration(2)
def _summaries(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE summaries (doc_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
        "chat_id TEXT NOT NULL, number INTEGER NOT NULL, fields TEXT NOT NULL)"
    )


@_migration(3)
def _keyed_by_user(db: sqlite3.Connection) -> None:
    # Schema 1-2 keyed messages and summaries by "{user}__{event}" strings, which collide
    # when user ids contain "_" (user "alice" + event "_in:X" was user "alice_" + "in:X").
    # Key them by the pair instead. Rows already overwritten by such a collision carry the
    # last writer in both user_id and fields, so copying keeps every row as it stands.
    db.execute(
        "CREATE TABLE messages_v3 (user_id TEXT NOT NULL, event_id TEXT NOT NULL, "
        "ts REAL NOT NULL, fields TEXT NOT NULL, PRIMARY KEY (user_id, event_id))"
    )
    db.execute(
        "INSERT OR IGNORE INTO messages_v3 (user_id, event_id, ts, fields) "
        "SELECT user_id, COALESCE(json_extract(fields, '$.eventId'), doc_id), ts, fields "
        "FROM messages"
    )
    db.execute("DROP TABLE messages")
    db.execute("ALTER TABLE messages_v3 RENAME TO messages")
    db.execute("CREATE INDEX messages_by_user_ts ON messages (user_id, ts)")
    db.execute(
        "CREATE TABLE summaries_v3 (user_id TEXT NOT NULL, chat_id TEXT NOT NULL, "
        "number INTEGER NOT NULL, fields TEXT NOT NULL, PRIMARY KEY (user_id, chat_id, number))"
    )
    db.execute(
        "INSERT OR IGNORE INTO summaries_v3 (user_id, chat_id, number, fields) "
        "SELECT user_id, chat_id, number, fields FROM summaries"
    )
    db.execute("DROP TABLE summaries")
    db.execute("ALTER TABLE summaries_v3 RENAME TO summaries")


@_migration(4)
def _usage(db: sqlite3.Connection) -> None:
    # usage for billing: one row per user and UTC day, replaced by every report
    db.execute("CREATE TABLE usage (user_id TEXT NOT NULL, day TEXT NOT NULL, "
               "fields TEXT NOT NULL, PRIMARY KEY (user_id, day))")


SCHEMA_VERSION = max(_MIGRATIONS)


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _loads(text: str) -> dict[str, Any]:
    data = json.loads(text)
    return data if isinstance(data, dict) else {}


class LocalPlane(ControlPlane):
    name = "local"

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._db = self._open()
        self._watcher: asyncio.Task[None] | None = None
        self._on_change: ChangeCallback | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    # -- opening and migrating -------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        key = "controller.local_db"
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(key, f"cannot create {self._path.parent}: {exc.strerror}") from None
        try:
            db = sqlite3.connect(
                self._path,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,  # used from worker threads, under self._lock
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as exc:
            raise ConfigError(key, f"cannot open {self._path}: {exc}") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            self._migrate(db)
        except (ConfigError, SchemaTooNew):
            db.close()
            raise
        except sqlite3.DatabaseError as exc:
            db.close()
            raise ConfigError(key, f"{self._path} is not a usable SQLite database: {exc}") from None
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        with _immediate(db):
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
        for version in sorted(_MIGRATIONS):
            with _immediate(db):
                current = self._version(db)
                if current >= version:
                    continue
                _MIGRATIONS[version](db)
                db.execute("UPDATE schema_version SET version = ?", (version,))
                log.info("plane.local_migrated", path=str(self._path), version=version)
        self._version(db)

    def _version(self, db: sqlite3.Connection) -> int:
        current = int(db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self._path} has schema version {current}, newer than this wabridge "
                f"understands ({SCHEMA_VERSION})",
                explanation="upgrade wabridge or point controller.local_db at another file")
        return current

    # -- plumbing --------------------------------------------------------------------------

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._closed:
                raise RuntimeError("LocalPlane is closed")
            return fn(*args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("LocalPlane is closed")
        return await asyncio.to_thread(self._locked, fn, *args)

    def _read_doc(self, table: str, user_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            f"SELECT fields FROM {table} WHERE user_id = ?",  # noqa: S608 - fixed table names
            (user_id,),
        ).fetchone()
        return _loads(row[0]) if row else None

    def _write_doc(self, table: str, user_id: str, data: Mapping[str, Any]) -> None:
        self._db.execute(
            f"INSERT INTO {table} (user_id, fields) VALUES (?, ?) "  # noqa: S608
            "ON CONFLICT (user_id) DO UPDATE SET fields = excluded.fields",
            (user_id, _dumps(data)),
        )

    def _merge_doc(self, table: str, user_id: str, fields: Mapping[str, Any]) -> None:
        with _immediate(self._db):
            data = self._read_doc(table, user_id) or {}
            merge_fields(data, fields)
            self._write_doc(table, user_id, data)

    # -- watching --------------------------------------------------------------------------

    async def watch(self, on_change: ChangeCallback) -> None:
        if self._watcher is not None:
            raise RuntimeError("watch() was already called on this plane")
        self._on_change = on_change
        last, docs = await self._run(self._snapshot)
        self._watcher = asyncio.create_task(
            self._poll(on_change, last, docs), name="local-plane-watch"
        )

    async def rewatch(self) -> None:
        """A poller does not go quiet the way a listener can, but a request the controller
        found undelivered is reason enough: restart it from a fresh snapshot, which delivers
        every document again, as ``watch`` does first."""
        old, on_change = self._watcher, self._on_change
        if old is None or on_change is None or self._closed:
            return
        log.warning("plane.watch_reopened", backend=self.name,
                    reason="a pending request was not delivered")
        old.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await old
        last, docs = await self._run(self._snapshot)
        self._watcher = asyncio.create_task(
            self._poll(on_change, last, docs), name="local-plane-watch"
        )

    def feed_alive(self) -> bool:
        return self._watcher is None or not self._watcher.done()

    def _snapshot(self) -> tuple[int, list[AccountDoc]]:
        with _deferred(self._db):
            last = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM changes").fetchone()[0]
            rows = self._db.execute(
                "SELECT user_id, fields FROM user_sessions ORDER BY user_id"
            ).fetchall()
        return int(last), [parse_account(uid, _loads(text)) for uid, text in rows]

    def _latest(self) -> int:
        row = self._db.execute("SELECT MAX(id) FROM changes").fetchone()
        return int(row[0] or 0)

    def _changes_since(self, last: int) -> tuple[int, bool, list[tuple[str, str | None]]]:
        """(new last id, whether this is a full resync, [(user_id, fields or None)])."""
        with _deferred(self._db):
            low, high = self._db.execute("SELECT MIN(id), MAX(id) FROM changes").fetchone()
            if high is None or high <= last:
                return last, False, []
            if low > last + 1:  # rows we never saw were pruned: re-read everything
                rows = self._db.execute("SELECT user_id, fields FROM user_sessions").fetchall()
                return int(high), True, [(uid, text) for uid, text in rows]
            rows = self._db.execute(
                "SELECT c.user_id, s.fields FROM "
                "(SELECT user_id, MAX(id) AS id FROM changes WHERE id > ? GROUP BY user_id) c "
                "LEFT JOIN user_sessions s ON s.user_id = c.user_id ORDER BY c.id",
                (last,),
            ).fetchall()
            return int(high), False, [(uid, text) for uid, text in rows]

    async def _poll(self, on_change: ChangeCallback, last: int, docs: list[AccountDoc]) -> None:
        known: set[str] = set()

        def deliver(item: Change) -> None:
            if isinstance(item, Removed):
                if item.user_id not in known:
                    return
                known.discard(item.user_id)
            else:
                known.add(item.user_id)
            try:
                on_change(item)
            except Exception as exc:
                log.exception("plane.watch_consumer_failed", backend=self.name, error=str(exc))

        for doc in docs:
            deliver(doc)
        delay = POLL_INTERVAL
        while True:
            await asyncio.sleep(delay)
            try:
                if await self._run(self._latest) <= last:
                    delay = POLL_INTERVAL
                    continue
                last, full, rows = await self._run(self._changes_since, last)
            except (sqlite3.Error, OSError) as exc:
                delay = min(max(delay * 2, 0.5), POLL_BACKOFF_MAX)
                log.warning(
                    "plane.watch_poll_failed", backend=self.name, error=str(exc), retry_in=delay
                )
                continue
            delay = POLL_INTERVAL
            present = {uid for uid, text in rows if text is not None}
            for uid, text in rows:
                deliver(parse_account(uid, _loads(text)) if text is not None else Removed(uid))
            if full:
                for uid in sorted(known - present):
                    deliver(Removed(uid))

    # -- reads -----------------------------------------------------------------------------

    async def list_accounts(self) -> list[AccountDoc]:
        return (await self._run(self._snapshot))[1]

    async def pending_requests(self) -> list[AccountDoc]:
        """The documents holding a request, by an indexed-free scan of one JSON field (the
        local plane holds one host's users: a few hundred rows at most)."""
        values = sorted(status.value for status in REQUESTS)
        # placeholders only: the text is fixed, the values are bound
        query = ("SELECT user_id, fields FROM user_sessions WHERE json_extract(fields, "  # noqa: S608
                 f"'$.status') IN ({', '.join('?' * len(values))}) ORDER BY user_id")

        def read() -> list[AccountDoc]:
            with _deferred(self._db):
                rows = self._db.execute(query, values).fetchall()
            return [parse_account(uid, _loads(text)) for uid, text in rows]

        return await self._run(read)

    async def get(self, user_id: str) -> AccountDoc | None:
        data = await self._run(self._read_doc, "user_sessions", check_doc_id(user_id))
        return parse_account(user_id, data) if data is not None else None

    async def link_record(self, user_id: str) -> dict[str, Any] | None:
        """The link record ``sessions/{userId}`` as stored, or None (tests)."""
        return await self._run(self._read_doc, "sessions", check_doc_id(user_id))

    async def messages(self, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            rows = self._db.execute(
                "SELECT fields FROM messages WHERE user_id = ? "
                "ORDER BY ts DESC, event_id DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
            return [_loads(text) for (text,) in reversed(rows)]

        return await self._run(read)

    # -- writes ----------------------------------------------------------------------------

    async def claim(
        self, user_id: str, expect: frozenset[DocStatus], new: DocStatus, host: str
    ) -> bool:
        def attempt() -> bool:
            with _immediate(self._db):
                data = self._read_doc("user_sessions", user_id)
                if data is None or parse_doc_status(data.get("status")) not in expect:
                    return False
                now = time.time()
                merge_fields(
                    data,
                    {"status": new.value, "host": host, "claimedAt": now, "updatedAt": now},
                )
                self._write_doc("user_sessions", user_id, data)
                return True

        check_doc_id(user_id)
        return await self._run(attempt)

    async def update(self, user_id: str, fields: Mapping[str, Any]) -> None:
        data = {**fields, "updatedAt": time.time()}
        await self._run(self._merge_doc, "user_sessions", check_doc_id(user_id), data)

    async def request(self, user_id: str, status: DocStatus, **fields: Any) -> None:
        await self.update(user_id, {**fields, "status": status.value})

    async def delete(self, user_id: str) -> None:
        def remove() -> None:
            self._db.execute("DELETE FROM user_sessions WHERE user_id = ?", (user_id,))

        check_doc_id(user_id)
        await self._run(remove)

    async def add_message(self, user_id: str, event: MessageEvent) -> None:
        fields = message_fields(check_doc_id(user_id), event)

        def put() -> None:
            # keyed by (user_id, event_id): a re-sent frame rewrites the user's own row and
            # can reach no other user's
            self._db.execute(
                "INSERT INTO messages (user_id, event_id, ts, fields) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user_id, event_id) DO UPDATE SET "
                "ts = excluded.ts, fields = excluded.fields",
                (user_id, event.event_id, float(event.ts), _dumps(fields)),
            )

        await self._run(put)

    async def put_link_record(self, user_id: str, fields: Mapping[str, Any]) -> None:
        await self._run(self._merge_doc, "sessions", check_doc_id(user_id), dict(fields))

    async def add_summary(self, user_id: str, chat_id: str, number: int, text: str) -> None:
        fields = summary_fields(check_doc_id(user_id), chat_id, number, text)

        def put() -> None:
            self._db.execute(
                "INSERT INTO summaries (user_id, chat_id, number, fields) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user_id, chat_id, number) DO UPDATE SET fields = excluded.fields",
                (user_id, chat_id, number, _dumps(fields)),
            )

        await self._run(put)

    async def summaries(self, user_id: str, chat_id: str) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            rows = self._db.execute(
                "SELECT fields FROM summaries WHERE user_id = ? AND chat_id = ? ORDER BY number",
                (user_id, chat_id),
            ).fetchall()
            return [json.loads(r[0]) for r in rows]

        return await self._run(read)

    async def put_usage(self, user_id: str, usage: Usage) -> None:
        fields = usage_fields(check_doc_id(user_id), usage)

        def put() -> None:
            self._db.execute(
                "INSERT INTO usage (user_id, day, fields) VALUES (?, ?, ?) "
                "ON CONFLICT (user_id, day) DO UPDATE SET fields = excluded.fields",
                (user_id, usage.day, _dumps(fields)),
            )

        await self._run(put)

    async def usage(self, user_id: str | None, since_day: str) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            rows = self._db.execute(
                "SELECT fields FROM usage WHERE day >= ? AND (? IS NULL OR user_id = ?) "
                "ORDER BY user_id, day", (since_day, user_id, user_id),
            ).fetchall()
            return [json.loads(r[0]) for r in rows]

        return await self._run(read)

    # -- shutdown --------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        with self._lock:
            self._closed = True
            self._db.close()


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock before its first read."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@contextlib.contextmanager
def _deferred(db: sqlite3.Connection) -> Iterator[None]:
    """A read transaction: several statements see one snapshot."""
    db.execute("BEGIN")
    try:
        yield
    finally:
        db.execute("COMMIT")
