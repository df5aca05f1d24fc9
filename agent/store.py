"""The worker's durable state: one SQLite file in the user's state directory.

Over 600 lines because it is the one owner of the schema: every method is a transaction on
tables whose invariants (below) span each other; split, a reader would lose them.

Invariants the conversation engine relies on:
- An inbound message is committed (unique per chat, sender and WhatsApp id) before anything
  else happens with it; a second delivery of the same id is ignored (``add_inbound`` -> False).
- A turn is done only when its reply is committed to the outbox in the same transaction that
  marks its inbound messages done; so after a crash a message is either pending (answered
  again) or answered (its reply waits in the outbox), never both or neither.
- Every outbox entry has a message id chosen before the first send attempt; a backend that
  sends with it (the simulator) sees a resend after a crash as the same message: exactly once.
  neonize cannot (the library picks the id), so a reply is marked ``sending`` (committed)
  before the library call and ``sent`` with the id WhatsApp returned after it; a reply found
  ``sending`` after a crash may or may not have gone out, and ``conversation.uncertain_replies``
  decides: resend it (at least once) or drop it (at most once). A reply WhatsApp keeps
  refusing is retried with backoff, then marked ``failed`` with the reason.
- Frames for the controller are queued here first (``link_outbox``) and deleted only when the
  controller acks them, so a controller outage or a worker restart loses no report.

- Messages the policy does not answer are kept, marked ``skipped`` with a ``reason``.
- Command replies and notices (budget, slow down) go through the same outbox, committed with
  marking their message done/skipped, so they are delivered like replies (see above). A
  notice keyed ``(chat, kind, day)`` is queued at most once (``notices``).
- Each Claude turn's cost is logged per UTC day (``usage_log``) for the daily budget.
- Conversation summaries are numbered per chat (``summaries.number``, the ``number`` of the
  controller's summary frame); a rotation stores one and
  forgets the session id in the same transaction.

Opening, transactions and migrations are :mod:`wabridge.database`'s (WAL, ``BEGIN
IMMEDIATE`` for read-then-write, numbered steps each in its own transaction, a newer schema
refused with the do-not-restart exit code); here: no automatic checkpoint (see ``_conn``).
"""

from __future__ import annotations

import calendar
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.whatsapp.events import Audio, Image, IncomingMessage
from wabridge import database
from wabridge.database import Migration

if TYPE_CHECKING:
    from wabridge.errors import LeaseLost
    from wabridge.fleet_db import Holder

MIGRATIONS: list[Migration] = []  # step n (1-based) makes schema version n


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def _v1(db: sqlite3.Connection) -> None:
    database.run_script(
        db,
        """
        CREATE TABLE inbox (
            id INTEGER PRIMARY KEY,
            chat_id TEXT NOT NULL,
            sender TEXT NOT NULL,
            wa_id TEXT NOT NULL,
            payload TEXT NOT NULL,
            received_at REAL NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',   -- pending | done | skipped
            UNIQUE (chat_id, sender, wa_id)
        );
        CREATE INDEX inbox_pending ON inbox (state, chat_id, id);
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            chat_id TEXT NOT NULL,
            wa_id TEXT NOT NULL UNIQUE,
            text TEXT NOT NULL,
            quote TEXT,                               -- JSON of the quoted inbound, or NULL
            state TEXT NOT NULL DEFAULT 'pending',    -- pending | sent
            created_at REAL NOT NULL,
            sent_at REAL
        );
        CREATE INDEX outbox_pending ON outbox (state, id);
        CREATE TABLE chats (
            chat_id TEXT PRIMARY KEY,
            session_id TEXT,
            turns INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            last_activity REAL
        );
        CREATE TABLE link_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            frame TEXT NOT NULL
        );
        CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """
    )


@migration
def _v2(db: sqlite3.Connection) -> None:
    """Policy, commands, budgets and context rotation."""
    database.run_script(
        db,
        """
        ALTER TABLE inbox ADD COLUMN reason TEXT;          -- why skipped, or 'command'
        ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'reply';  -- reply|command|notice
        ALTER TABLE chats ADD COLUMN session_turns INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE chats ADD COLUMN context_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE chats ADD COLUMN seed TEXT;            -- NULL | 'summary' | 'recovery'
        ALTER TABLE chats ADD COLUMN reset_at REAL NOT NULL DEFAULT 0;
        CREATE TABLE summaries (
            chat_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            text TEXT NOT NULL,
            created_at REAL NOT NULL,
            archived INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (chat_id, version)
        );
        CREATE TABLE usage_log (
            id INTEGER PRIMARY KEY,
            chat_id TEXT NOT NULL,
            day TEXT NOT NULL,                        -- UTC YYYY-MM-DD
            at REAL NOT NULL,
            kind TEXT NOT NULL,                       -- turn | summary
            cost_usd REAL NOT NULL
        );
        CREATE INDEX usage_log_day ON usage_log (day);
        CREATE TABLE notices (
            chat_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            day TEXT NOT NULL,
            PRIMARY KEY (chat_id, kind, day)
        );
        CREATE INDEX inbox_chat_done ON inbox (chat_id, state, received_at);
        CREATE INDEX outbox_chat ON outbox (chat_id, created_at)
        """
    )


@migration
def _v3(db: sqlite3.Connection) -> None:
    """Outbox attempts and failures, the send mark, disappearing timers, counters."""
    database.run_script(
        db,
        """
        -- outbox.state: pending | sending (handed to the library, outcome unknown) | sent |
        -- failed (gave up, see error) | dropped (uncertain after a crash, not resent)
        ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE outbox ADD COLUMN next_try REAL NOT NULL DEFAULT 0;
        ALTER TABLE outbox ADD COLUMN error TEXT;
        ALTER TABLE chats ADD COLUMN expiration INTEGER;  -- disappearing timer (s), NULL: unknown
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE INDEX inbox_wa_id ON inbox (wa_id)
        """
    )


@migration
def _v4(db: sqlite3.Connection) -> None:
    """A summary's number is ``number`` everywhere (the protocol's summary frame calls it so)."""
    db.execute("ALTER TABLE summaries RENAME COLUMN version TO number")


@migration
def _v5(db: sqlite3.Connection) -> None:
    """The ``api`` engine's conversations: one row per message of a session, in order (the
    CLI engine keeps its own transcripts)."""
    database.run_script(
        db,
        """
        CREATE TABLE api_messages (
            session_id TEXT NOT NULL,
            n INTEGER NOT NULL,
            chat_id TEXT NOT NULL,
            role TEXT NOT NULL,                       -- user | assistant
            content TEXT NOT NULL,                    -- JSON list of content blocks
            PRIMARY KEY (session_id, n)
        );
        CREATE INDEX api_messages_chat ON api_messages (chat_id)
        """
    )


@migration
def _v6(db: sqlite3.Connection) -> None:
    """Claude's tools: scheduled messages and per-contact notes (issue 16)."""
    database.run_script(
        db,
        """
        CREATE TABLE scheduled (
            id INTEGER PRIMARY KEY,
            chat_id TEXT NOT NULL,
            due_at REAL NOT NULL,
            text TEXT NOT NULL,
            created_at REAL NOT NULL,
            day TEXT NOT NULL,                        -- UTC day it was made (daily limit)
            state TEXT NOT NULL DEFAULT 'pending',    -- pending | queued | cancelled
            outbox_id INTEGER                         -- the outbox row once queued
        );
        CREATE INDEX scheduled_due ON scheduled (state, due_at);
        CREATE TABLE notes (
            id INTEGER PRIMARY KEY,
            chat_id TEXT NOT NULL,
            text TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX notes_chat ON notes (chat_id, id)
        """
    )


@migration
def _usage_tokens(db: sqlite3.Connection) -> None:
    """Usage for billing: each logged turn's tokens next to its cost, so a day's
    figures come from the same rows as the daily budget, committed with the turn itself."""
    for column in ("input_tokens", "output_tokens", "cache_creation_tokens",
                   "cache_read_tokens"):
        db.execute(f"ALTER TABLE usage_log ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE usage_log ADD COLUMN audio_seconds REAL NOT NULL DEFAULT 0")


#: the token kinds a turn's usage is logged by (the Messages API's ``usage`` keys)
USAGE_TOKENS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                "cache_read_input_tokens")

Seed = Literal["summary", "recovery"]


def encode_message(message: IncomingMessage) -> str:
    """The JSON the inbox keeps of a message (image bytes as hex). Only the store reads and
    writes it: everything outside gets :class:`IncomingMessage` back."""
    data = asdict(message)
    data["images"] = [
        {"mime_type": i.mime_type, "data": i.data.hex(), "caption": i.caption}
        for i in message.images
    ]
    if message.audio is not None:
        data["audio"] = {"mime_type": message.audio.mime_type, "data": message.audio.data.hex(),
                         "seconds": message.audio.seconds, "voice": message.audio.voice}
    return json.dumps(data)


def decode_message(text: str) -> IncomingMessage:
    """The message :func:`encode_message` stored (fields added later take their defaults)."""
    data: dict[str, Any] = json.loads(text)
    data["images"] = tuple(
        Image(i["mime_type"], bytes.fromhex(i["data"]), i.get("caption", ""))
        for i in data.get("images", [])
    )
    audio = data.get("audio")
    if audio is not None:
        data["audio"] = Audio(audio["mime_type"], bytes.fromhex(audio["data"]),
                              float(audio.get("seconds", 0.0)), bool(audio.get("voice", True)))
    return IncomingMessage(**data)


@dataclass(frozen=True)
class PendingInbound:
    id: int
    message: IncomingMessage
    received_at: float = 0.0

    @property
    def chat_id(self) -> str:
        return self.message.chat_id

    @property
    def sender(self) -> str:
        return self.message.sender

    @property
    def wa_id(self) -> str:
        return self.message.wa_id


@dataclass(frozen=True)
class PendingReply:
    id: int
    chat_id: str
    wa_id: str
    text: str
    quote: IncomingMessage | None  # the inbound message the reply quotes (first part only)
    attempts: int = 0  # sends tried so far
    next_try: float = 0.0  # epoch seconds: not before (backoff after a failure)


@dataclass(frozen=True)
class ChatRow:
    chat_id: str
    session_id: str | None
    turns: int
    cost_usd: float
    input_tokens: int
    output_tokens: int
    session_turns: int = 0  # turns of the current session (since the last rotation/reset)
    context_tokens: int = 0  # input + cache tokens of the last turn
    seed: Seed | None = None  # what a fresh session must be seeded with
    reset_at: float = 0.0  # last /reset (epoch): recovery never reaches back before it


@dataclass(frozen=True)
class Summary:
    chat_id: str
    number: int  # 1, 2, ... per chat, in order of rotation
    text: str
    created_at: float
    archived: bool


@dataclass(frozen=True)
class Scheduled:
    id: int
    chat_id: str
    due_at: float
    text: str


@dataclass(frozen=True)
class Note:
    id: int
    chat_id: str
    text: str


@dataclass(frozen=True)
class HistoryItem:
    role: Literal["user", "assistant"]
    message: IncomingMessage | None  # the inbound message (user)
    text: str  # reply text (assistant) or the inbound text
    at: float


@dataclass(frozen=True)
class PostgresTarget:
    """Where an account's store lives on PostgreSQL: a server (``conninfo``, a
    ``postgresql://`` URL without the password), the account's ``schema``, and the password
    (from a systemd credential; kept out of ``repr`` and so out of every log line)."""

    conninfo: str
    schema: str
    password: str | None = field(default=None, repr=False)
    #: fleet mode: every write transaction is fenced with this lease (None: no fleet)
    holder: Holder | None = None


class _SqliteFile:
    """The store in one SQLite file (the default)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def connect(self) -> database.Db:
        # no checkpoint on commit: commits happen on the event loop (and on neonize's
        # thread, which must only persist and enqueue); ``checkpoint`` runs in a thread
        conn = database.connect(self.path, auto_checkpoint=False)
        conn.row_factory = sqlite3.Row
        return conn

    fenced = False  # one host owns the file: no lease to check

    def transaction(self, conn: Any, *, fenced: bool = True
                    ) -> AbstractContextManager[database.Db]:
        del fenced
        return database.immediate(conn)

    def migrate(self, conn: Any) -> None:
        database.migrate(conn, MIGRATIONS, name=self.name)

    def checkpoint(self, conn: Callable[[], Any]) -> tuple[int, int]:
        row = conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[1]), int(row[2])

    closes_from_any_thread = False  # an SQLite connection may only be closed by its thread

    def usable(self, conn: Any) -> bool:
        return True  # a file does not go away under an open connection

    def close(self, conn: Any) -> None:
        with suppress(sqlite3.Error):  # leave a short log for the next start
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def is_outage(self, exc: BaseException) -> bool:
        return False  # a local file has no server to wait for: an error is an error


class Store:
    """Thread-safe: one connection per thread (neonize calls the sink on its own thread).

    In an SQLite file (a path) or in an account's schema on PostgreSQL
    (:class:`PostgresTarget`, :mod:`agent.store_postgres`): the same SQL, the same
    migrations step for step (``MIGRATIONS`` here, their mirror there)."""

    def __init__(self, where: Path | PostgresTarget) -> None:
        if isinstance(where, PostgresTarget):
            from agent.store_postgres import PostgresSchema  # noqa: PLC0415 (psycopg only when used)

            self._backend: _SqliteFile | PostgresSchema = PostgresSchema(where)
        else:
            self._backend = _SqliteFile(where)
        self.path = where
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, Any]] = []
        self._conns_lock = threading.Lock()
        self._owner = threading.current_thread()
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        """The file, or the database and schema (for logs and errors; no password)."""
        return self._backend.name

    def is_outage(self, exc: BaseException) -> bool:
        """``exc`` (raised by a store call) means the database is unreachable for now
        (PostgreSQL down or restarting): the caller keeps what it has and retries later, with
        backoff, instead of failing the work (see ``agent.main``, "Store outages")."""
        return self._backend.is_outage(exc)

    def _conn(self) -> Any:
        conn: Any = getattr(self._local, "conn", None)
        if conn is not None and not self._backend.usable(conn):
            # PostgreSQL restarted (or our server process was ended): a new connection; the
            # call that saw the old one fail raised, and its caller retries or exits
            with self._conns_lock:
                self._conns = [(t, c) for t, c in self._conns if c is not conn]
            with suppress(Exception):
                self._backend.close(conn)
            conn = None
        if conn is None:
            conn = self._backend.connect()
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append((threading.current_thread(), conn))
        return conn

    def _tx(self, *, fenced: bool = True) -> AbstractContextManager[Any]:
        """A write transaction; in fleet mode it first checks this worker's lease
        (``fenced=False``: the link's own frames, which only report to the controller)."""
        return self._backend.transaction(self._conn(), fenced=fenced)

    def _write(self) -> AbstractContextManager[Any]:
        """A one-statement write: as it stands (autocommit), or in fleet mode inside a
        fenced transaction (a stale owner writes nothing)."""
        return self._tx() if self._backend.fenced else nullcontext(self._conn())

    @property
    def on_lease_lost(self) -> Callable[[LeaseLost], None] | None:
        """Called (then the error raised) when a fenced write finds the lease gone, on the
        thread that wrote."""
        return getattr(self._backend, "on_lease_lost", None)

    @on_lease_lost.setter
    def on_lease_lost(self, hook: Callable[[LeaseLost], None] | None) -> None:
        if self._backend.fenced:
            self._backend.on_lease_lost = hook  # type: ignore[union-attr]

    def _migrate(self) -> None:
        self._backend.migrate(self._conn())

    def checkpoint(self) -> tuple[int, int]:
        """Copy the write-ahead log back into the database without waiting for writers
        (PASSIVE); returns (pages in the log, pages copied). Call it off the event loop, e.g.
        ``asyncio.to_thread(store.checkpoint)``: no commit here checkpoints by itself.
        (PostgreSQL checkpoints by itself: (0, 0).)"""
        return self._backend.checkpoint(self._conn)

    def close(self) -> None:
        """Close this thread's connection; from the thread that opened the store, on
        PostgreSQL, the other threads' too (call it when they are done)."""
        me = threading.current_thread()
        everyone = me is self._owner and self._backend.closes_from_any_thread
        with self._conns_lock:
            conns, self._conns = self._conns, []
            for thread, conn in conns:
                if thread is me or everyone:
                    self._backend.close(conn)
                else:
                    self._conns.append((thread, conn))
        self._local.conn = None

    # --- inbox -------------------------------------------------------------------------
    def add_inbound(self, message: IncomingMessage) -> bool:
        """Commit an inbound message; False when this id was seen before (duplicate).

        A sender named by its LID (``…@lid``: its phone number was not known then) and one
        named by its phone number are the same person when the WhatsApp id is the same:
        WhatsApp delivered the message again under the other addressing, and it must not run
        a second turn.

        Not fenced in fleet mode: WhatsApp already acknowledged the message to this worker
        and will not deliver it again, so even a worker that just lost its lease stores it
        (the id makes a second copy a duplicate) and the next owner answers it: nothing
        acknowledged is lost. Answering it is what the fence guards (the turn's commit)."""
        chat_id, sender, wa_id = message.chat_id, message.sender, message.wa_id
        if self._conn().execute(
            "SELECT 1 FROM inbox WHERE wa_id = ?1 AND (?2 LIKE '%@lid' OR sender LIKE '%@lid') "
            "LIMIT 1", (wa_id, sender),
        ).fetchone() is not None:
            return False
        cur = self._conn().execute(
            "INSERT INTO inbox (chat_id, sender, wa_id, payload, received_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (chat_id, sender, wa_id, encode_message(message), time.time()),
        )
        return bool(cur.rowcount == 1)

    def pending_chats(self) -> list[str]:
        rows = self._conn().execute(
            "SELECT chat_id FROM inbox WHERE state = 'pending' GROUP BY chat_id ORDER BY MIN(id)"
        ).fetchall()
        return [r[0] for r in rows]

    def pending_inbound(self, chat_id: str, limit: int = 20) -> list[PendingInbound]:
        rows = self._conn().execute(
            "SELECT id, payload, received_at FROM inbox "
            "WHERE state = 'pending' AND chat_id = ? ORDER BY id LIMIT ?",
            (chat_id, limit),
        ).fetchall()
        return [
            PendingInbound(r["id"], decode_message(r["payload"]), r["received_at"]) for r in rows
        ]

    def skip_inbound(self, ids: list[int], reason: str = "") -> None:
        """Mark messages that are not answered; they stay in the store (never lost)."""
        with self._tx() as tx:
            tx.executemany("UPDATE inbox SET state = 'skipped', reason = ? WHERE id = ?",
                           [(reason or None, i) for i in ids])

    def inbound_state(self, chat_id: str, wa_id: str) -> tuple[str, str | None] | None:
        """``(state, reason)`` of a stored inbound message (diagnostics and tests)."""
        r = self._conn().execute(
            "SELECT state, reason FROM inbox WHERE chat_id = ? AND wa_id = ? ORDER BY id LIMIT 1",
            (chat_id, wa_id),
        ).fetchone()
        return None if r is None else (str(r[0]), r[1])

    def is_own_reply(self, wa_id: str) -> bool:
        """Whether ``wa_id`` is a message this worker sent (an echo of it is not a question)."""
        return self._conn().execute(
            "SELECT 1 FROM outbox WHERE wa_id = ?", (wa_id,)
        ).fetchone() is not None

    def complete_turn(
        self,
        chat_id: str,
        inbound_ids: list[int],
        replies: Iterable[str],
        quote: IncomingMessage | None,
        *,
        session_id: str | None = None,
        cost_delta: float = 0.0,
        input_tokens: int = 0,
        output_tokens: int = 0,
        context_tokens: int | None = None,
        day: str | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> list[PendingReply]:
        """Atomically: mark the turn's inbound messages done and queue its replies.

        With ``session_id`` the chat's session becomes that one: its turn count goes up by one
        (or starts at 1 for a new session) and a pending seed is cleared (the session now holds
        it). ``context_tokens`` (when given) is the context the turn used; ``day`` (UTC) logs
        ``cost_delta`` for the daily budget.
        """
        now = time.time()
        with self._tx() as tx:
            tx.executemany(
                "UPDATE inbox SET state = 'done' WHERE id = ?", [(i,) for i in inbound_ids]
            )
            out = self._queue(tx, chat_id, replies, quote, "reply", now)
            tx.execute("INSERT INTO chats (chat_id) VALUES (?) ON CONFLICT DO NOTHING",
                       (chat_id,))
            tx.execute(
                "UPDATE chats SET "
                "session_turns = CASE WHEN ?1 IS NULL THEN session_turns "
                "  WHEN session_id IS NOT DISTINCT FROM ?1 THEN session_turns + 1 ELSE 1 END, "
                "seed = CASE WHEN ?1 IS NULL THEN seed ELSE NULL END, "
                "session_id = COALESCE(?1, session_id), "
                "turns = turns + 1, cost_usd = cost_usd + ?2, "
                "input_tokens = input_tokens + ?3, output_tokens = output_tokens + ?4, "
                "context_tokens = COALESCE(?5, context_tokens), last_activity = ?6 "
                "WHERE chat_id = ?7",
                (session_id, cost_delta, input_tokens, output_tokens, context_tokens, now,
                 chat_id),
            )
            if day is not None:
                self._log_usage(tx, chat_id, day, now, "turn", cost_delta, usage)
        return out

    @staticmethod
    def _log_usage(tx: database.Db, chat_id: str, day: str, now: float, kind: str,
                   cost: float, usage: Mapping[str, int] | None) -> None:
        tokens = [int((usage or {}).get(k, 0)) for k in USAGE_TOKENS]
        tx.execute(
            "INSERT INTO usage_log (chat_id, day, at, kind, cost_usd, input_tokens, "
            "output_tokens, cache_creation_tokens, cache_read_tokens) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (chat_id, day, now, kind, cost, *tokens),
        )

    @staticmethod
    def _queue(tx: database.Db, chat_id: str, replies: Iterable[str],
               quote: IncomingMessage | None, kind: str, now: float) -> list[PendingReply]:
        out: list[PendingReply] = []
        for idx, text in enumerate(replies):
            wa_id = "3EB0" + secrets.token_hex(8).upper()
            q = quote if idx == 0 else None
            row = tx.execute(
                "INSERT INTO outbox (chat_id, wa_id, text, quote, created_at, kind) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (chat_id, wa_id, text, encode_message(q) if q else None, now, kind),
            ).fetchone()
            out.append(PendingReply(int(row[0]), chat_id, wa_id, text, q))
        return out

    def answer_locally(self, chat_id: str, inbound_ids: list[int], replies: list[str],
                       quote: IncomingMessage | None, *, reason: str = "command"
                       ) -> list[PendingReply]:
        """Atomically mark messages done (``reason``, e.g. ``command``) and queue the replies
        the worker itself wrote (no Claude turn, no turn counted)."""
        now = time.time()
        with self._tx() as tx:
            tx.executemany("UPDATE inbox SET state = 'done', reason = ? WHERE id = ?",
                           [(reason, i) for i in inbound_ids])
            return self._queue(tx, chat_id, replies, quote, "command", now)

    def skip_with_notice(self, chat_id: str, inbound_ids: list[int], reason: str,
                         notice: str | None, *, quote: IncomingMessage | None = None,
                         once_key: tuple[str, str] | None = None) -> list[PendingReply]:
        """Atomically mark messages skipped and queue ``notice`` (if any).

        With ``once_key = (kind, day)`` the notice is queued only the first time that key is
        seen for this chat (e.g. one "daily budget reached" per chat per day).
        """
        now = time.time()
        with self._tx() as tx:
            tx.executemany("UPDATE inbox SET state = 'skipped', reason = ? WHERE id = ?",
                           [(reason, i) for i in inbound_ids])
            if notice is None:
                return []
            if once_key is not None:
                cur = tx.execute("INSERT INTO notices VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                                 (chat_id, once_key[0], once_key[1]))
                if cur.rowcount != 1:
                    return []
            return self._queue(tx, chat_id, [notice], quote, "notice", now)

    # --- outbox ------------------------------------------------------------------------
    def pending_replies(self) -> list[PendingReply]:
        """Replies not sent yet (``pending``), oldest first, due or not."""
        rows = self._conn().execute(
            "SELECT id, chat_id, wa_id, text, quote, attempts, next_try FROM outbox "
            "WHERE state = 'pending' ORDER BY id"
        ).fetchall()
        return [
            PendingReply(
                r["id"], r["chat_id"], r["wa_id"], r["text"],
                decode_message(r["quote"]) if r["quote"] else None, r["attempts"], r["next_try"],
            )
            for r in rows
        ]

    def mark_sending(self, reply_id: int) -> None:
        """Committed before the library is asked to send: a crash from here on leaves the
        reply ``sending`` (uncertain), never silently ``pending``."""
        with self._write() as tx:
            tx.execute("UPDATE outbox SET state = 'sending' WHERE id = ?", (reply_id,))

    def mark_sent(self, reply_id: int, wa_id: str | None = None) -> None:
        """Sent; ``wa_id`` is the id WhatsApp got (when the backend chose its own).

        Not fenced in fleet mode: the message went out (the fenced ``sending`` mark and the
        lease check came before the send), and recording that truth keeps the next owner
        from sending it again; refusing it would only turn a sent reply into an uncertain
        one."""
        self._conn().execute(
            "UPDATE outbox SET state = 'sent', sent_at = ?, error = NULL, "
            "wa_id = COALESCE(?, wa_id) WHERE id = ?", (time.time(), wa_id, reply_id),
        )

    def mark_retry(self, reply_id: int, error: str, next_try: float, *, attempts: int
                   ) -> None:
        """The send failed for sure (the library said so): pending again, not before
        ``next_try``, with ``attempts`` failed tries counted."""
        with self._write() as tx:
            tx.execute(
                "UPDATE outbox SET state = 'pending', error = ?, next_try = ?, attempts = ? "
                "WHERE id = ?", (error, next_try, attempts, reply_id),
            )

    def mark_failed(self, reply_id: int, error: str, *, attempts: int) -> None:
        with self._write() as tx:
            tx.execute(
                "UPDATE outbox SET state = 'failed', error = ?, attempts = ? WHERE id = ?",
                (error, attempts, reply_id),
            )

    def reply_state(self, reply_id: int) -> tuple[str, str | None, str, int]:
        """``(state, error, wa_id, attempts)`` of an outbox entry (diagnostics and tests)."""
        r = self._conn().execute(
            "SELECT state, error, wa_id, attempts FROM outbox WHERE id = ?", (reply_id,)
        ).fetchone()
        return str(r[0]), r[1], str(r[2]), int(r[3])

    def settle_uncertain(self, resend: bool) -> list[PendingReply]:
        """Replies left ``sending`` by a crash: pending again (``resend``) or ``dropped``.
        Returns them (to be logged and counted)."""
        with self._tx() as tx:
            rows = tx.execute(
                "SELECT id, chat_id, wa_id, text, quote, attempts, next_try FROM outbox "
                "WHERE state = 'sending' ORDER BY id"
            ).fetchall()
            tx.execute(
                "UPDATE outbox SET state = ?, error = 'uncertain after a restart' "
                "WHERE state = 'sending'", ("pending" if resend else "dropped",),
            )
        return [
            PendingReply(r[0], r[1], r[2], r[3], decode_message(r[4]) if r[4] else None, r[5], r[6])
            for r in rows
        ]

    # --- counters (metrics) -------------------------------------------------------------
    def bump(self, name: str, by: int = 1) -> None:
        """Add to a named counter (undecryptable messages, stream errors, uncertain replies)."""
        with self._write() as tx:
            tx.execute(
                "INSERT INTO counters VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
                (name, by),
            )

    def counters(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT name, value FROM counters").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    # --- disappearing messages ---------------------------------------------------------
    def set_expiration(self, chat_id: str, seconds: int) -> bool:
        """Keep the chat's disappearing timer; True when it changed."""
        with self._tx() as tx:
            r = tx.execute("SELECT expiration FROM chats WHERE chat_id = ?", (chat_id,)).fetchone()
            if r is not None and r[0] == seconds:
                return False
            tx.execute(
                "INSERT INTO chats (chat_id, expiration) VALUES (?, ?) ON CONFLICT (chat_id) "
                "DO UPDATE SET expiration = excluded.expiration", (chat_id, seconds),
            )
        return True

    def expiration(self, chat_id: str) -> int:
        """The chat's disappearing timer in seconds (0: off or never stated)."""
        r = self._conn().execute(
            "SELECT expiration FROM chats WHERE chat_id = ?", (chat_id,)
        ).fetchone()
        return int(r[0]) if r is not None and r[0] is not None else 0

    # --- chats -------------------------------------------------------------------------
    def chat(self, chat_id: str) -> ChatRow | None:
        r = self._conn().execute("SELECT * FROM chats WHERE chat_id = ?", (chat_id,)).fetchone()
        if r is None:
            return None
        return ChatRow(
            r["chat_id"], r["session_id"], r["turns"], r["cost_usd"], r["input_tokens"],
            r["output_tokens"], r["session_turns"], r["context_tokens"], r["seed"],
            r["reset_at"],
        )

    def set_session(self, chat_id: str, session_id: str | None, *,
                    seed: Seed | None = None) -> None:
        """Set (or forget, with None) the chat's session; forgetting it with ``seed`` says what
        the next fresh session must be seeded with."""
        with self._write() as tx:
            tx.execute(
                "INSERT INTO chats (chat_id, session_id, seed) VALUES (?, ?, ?) "
                "ON CONFLICT (chat_id) DO UPDATE SET session_id = excluded.session_id, "
                "seed = COALESCE(excluded.seed, chats.seed)",
                (chat_id, session_id, seed),
            )

    def reset_chat(self, chat_id: str) -> None:
        """``/reset``: forget the session, archive the summaries, start counting afresh."""
        now = time.time()
        with self._tx() as tx:
            tx.execute(
                "INSERT INTO chats (chat_id, reset_at) VALUES (?, ?) ON CONFLICT (chat_id) DO "
                "UPDATE SET session_id = NULL, seed = NULL, session_turns = 0, "
                "context_tokens = 0, reset_at = excluded.reset_at",
                (chat_id, now),
            )
            tx.execute("UPDATE summaries SET archived = 1 WHERE chat_id = ?", (chat_id,))

    # --- scheduled messages (the schedule_message tool) --------------------------------
    def schedule(self, chat_id: str, due_at: float, text: str, day: str) -> int:
        with self._write() as tx:
            row = tx.execute(
                "INSERT INTO scheduled (chat_id, due_at, text, created_at, day) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (chat_id, due_at, text, time.time(), day)).fetchone()
        return int(row[0])

    def scheduled(self, chat_id: str | None = None) -> list[Scheduled]:
        """Pending scheduled messages (of one chat, or all), soonest first."""
        rows = self._conn().execute(
            "SELECT id, chat_id, due_at, text FROM scheduled WHERE state = 'pending' "
            "AND (?1 IS NULL OR chat_id = ?1) ORDER BY due_at, id", (chat_id,)).fetchall()
        return [Scheduled(r["id"], r["chat_id"], r["due_at"], r["text"]) for r in rows]

    def scheduled_on(self, day: str) -> int:
        """How many messages were scheduled on UTC ``day`` (any state, all chats)."""
        row = self._conn().execute("SELECT COUNT(*) FROM scheduled WHERE day = ?",
                                   (day,)).fetchone()
        return int(row[0])

    def cancel_scheduled(self, scheduled_id: int, chat_id: str | None = None) -> bool:
        """Cancel a pending scheduled message (only of ``chat_id`` when given)."""
        with self._write() as tx:
            cur = tx.execute(
                "UPDATE scheduled SET state = 'cancelled' WHERE id = ?1 AND state = 'pending' "
                "AND (?2 IS NULL OR chat_id = ?2)", (scheduled_id, chat_id))
        return bool(cur.rowcount == 1)

    def release_due(self, now: float) -> list[PendingReply]:
        """Atomically move every scheduled message due at ``now`` into the outbox (kind
        ``scheduled``): from there on it has the outbox's guarantees, and it is queued once."""
        with self._tx() as tx:
            rows = tx.execute("SELECT id, chat_id, text FROM scheduled WHERE state = 'pending' "
                              "AND due_at <= ? ORDER BY due_at, id", (now,)).fetchall()
            out: list[PendingReply] = []
            for r in rows:
                queued = self._queue(tx, r["chat_id"], [r["text"]], None, "scheduled", now)
                tx.execute("UPDATE scheduled SET state = 'queued', outbox_id = ? WHERE id = ?",
                           (queued[0].id, r["id"]))
                out += queued
        return out

    # --- notes (the remember/forget/recall tools) ----------------------------------------
    def add_note(self, chat_id: str, text: str) -> int:
        with self._write() as tx:
            row = tx.execute(
                "INSERT INTO notes (chat_id, text, created_at) VALUES (?, ?, ?) RETURNING id",
                (chat_id, text, time.time())).fetchone()
        return int(row[0])

    def notes(self, chat_id: str | None = None) -> list[Note]:
        rows = self._conn().execute(
            "SELECT id, chat_id, text FROM notes WHERE (?1 IS NULL OR chat_id = ?1) "
            "ORDER BY id", (chat_id,)).fetchall()
        return [Note(r["id"], r["chat_id"], r["text"]) for r in rows]

    def forget_note(self, note_id: int, chat_id: str) -> bool:
        with self._write() as tx:
            cur = tx.execute("DELETE FROM notes WHERE id = ? AND chat_id = ?",
                             (note_id, chat_id))
        return bool(cur.rowcount == 1)

    # --- summaries (context rotation) ---------------------------------------------------
    def rotate(self, chat_id: str, summary: str | None, *, cost_delta: float = 0.0,
               day: str | None = None, usage: Mapping[str, int] | None = None) -> int | None:
        """Atomically end the chat's session: store ``summary`` under its next number (seed
        ``summary``), or without one seed ``recovery``; forget the session id; log the
        summary turn's cost. Returns the new number, or None without a summary."""
        now = time.time()
        number: int | None = None
        with self._tx() as tx:
            if summary is not None:
                row = tx.execute("SELECT COALESCE(MAX(number), 0) FROM summaries "
                                 "WHERE chat_id = ?", (chat_id,)).fetchone()
                number = int(row[0]) + 1
                tx.execute("INSERT INTO summaries (chat_id, number, text, created_at) "
                           "VALUES (?, ?, ?, ?)", (chat_id, number, summary, now))
            tx.execute(
                "INSERT INTO chats (chat_id) VALUES (?) ON CONFLICT (chat_id) DO NOTHING",
                (chat_id,),
            )
            tx.execute(
                "UPDATE chats SET session_id = NULL, session_turns = 0, context_tokens = 0, "
                "seed = ?, cost_usd = cost_usd + ? WHERE chat_id = ?",
                ("summary" if summary is not None else "recovery", cost_delta, chat_id),
            )
            if day is not None and (cost_delta or usage):
                self._log_usage(tx, chat_id, day, now, "summary", cost_delta, usage)
        return number

    def summaries(self, chat_id: str) -> list[Summary]:
        rows = self._conn().execute(
            "SELECT chat_id, number, text, created_at, archived FROM summaries "
            "WHERE chat_id = ? ORDER BY number", (chat_id,),
        ).fetchall()
        return [Summary(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def latest_summary(self, chat_id: str) -> Summary | None:
        """The newest summary not archived by ``/reset``."""
        live = [s for s in self.summaries(chat_id) if not s.archived]
        return live[-1] if live else None

    def history(self, chat_id: str, limit: int, since: float = 0.0) -> list[HistoryItem]:
        """The last ``limit`` answered inbound messages and Claude replies of the chat after
        ``since`` (epoch), oldest first. Skipped messages, commands and notices are left out."""
        if limit <= 0:
            return []
        rows = self._conn().execute(
            "SELECT role, payload, text, at FROM ("
            " SELECT 'user' AS role, payload, NULL AS text, received_at AS at, id AS n, 0 AS o"
            " FROM inbox WHERE chat_id = ?1 AND state = 'done' AND reason IS NULL"
            " AND received_at > ?2"
            " UNION ALL"
            " SELECT 'assistant', NULL, text, created_at, id, 1 FROM outbox"
            " WHERE chat_id = ?1 AND kind = 'reply' AND created_at > ?2"
            ") AS h ORDER BY at DESC, o DESC, n DESC LIMIT ?3",
            (chat_id, since, limit),
        ).fetchall()
        out = []
        for r in reversed(rows):
            message = decode_message(r[1]) if r[1] is not None else None
            text = message.text if message is not None else str(r[2])
            out.append(HistoryItem(r[0], message, text, float(r[3])))
        return out

    # --- the api engine's conversations -----------------------------------------------
    def api_messages(self, session_id: str) -> list[tuple[str, list[dict[str, Any]]]]:
        """A session's messages (role, content blocks), oldest first."""
        rows = self._conn().execute(
            "SELECT role, content FROM api_messages WHERE session_id = ? ORDER BY n",
            (session_id,),
        ).fetchall()
        return [(str(r[0]), json.loads(r[1])) for r in rows]

    def has_api_session(self, session_id: str) -> bool:
        return self._conn().execute(
            "SELECT 1 FROM api_messages WHERE session_id = ? LIMIT 1", (session_id,)
        ).fetchone() is not None

    def add_api_message(self, chat_id: str, session_id: str, role: str,
                        content: list[dict[str, Any]]) -> None:
        with self._write() as tx:
            tx.execute(
                "INSERT INTO api_messages (session_id, n, chat_id, role, content) VALUES "
                "(?1, (SELECT COALESCE(MAX(n), 0) + 1 FROM api_messages WHERE session_id = ?1), "
                "?2, ?3, ?4)", (session_id, chat_id, role, json.dumps(content)),
            )

    def drop_api_sessions(self, chat_id: str, keep: str | None) -> int:
        """Forget the chat's api conversations except ``keep`` (ended by a rotation or a
        reset: their summary, if any, is stored). Returns the messages removed."""
        with self._write() as tx:
            cur = tx.execute(
                "DELETE FROM api_messages WHERE chat_id = ? AND session_id IS DISTINCT FROM ?",
                (chat_id, keep),
            )
        return int(cur.rowcount)

    # --- daily budget -------------------------------------------------------------------
    def cost_on(self, day: str) -> float:
        """The user's Claude spend on a UTC day (all chats, summaries included)."""
        r = self._conn().execute(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM usage_log WHERE day = ?", (day,)
        ).fetchone()
        return float(r[0])

    def set_transcript(self, inbound_id: int, message: IncomingMessage, *, day: str,
                       seconds: float) -> None:
        """Keep a voice note's transcript (``message.transcript``; "" when it failed) in place
        of its audio, and log the transcribed seconds (usage), in one transaction: a crash
        never transcribes it twice nor loses what was transcribed."""
        now = time.time()
        with self._tx() as tx:
            tx.execute("UPDATE inbox SET payload = ? WHERE id = ?",
                       (encode_message(message), inbound_id))
            if seconds > 0:
                tx.execute("INSERT INTO usage_log (chat_id, day, at, kind, cost_usd, "
                           "audio_seconds) VALUES (?, ?, ?, 'transcription', 0, ?)",
                           (message.chat_id, day, now, seconds))

    def usage_on(self, day: str) -> dict[str, float]:
        """The user's usage on a UTC day, for billing: Claude turns (summaries included in the
        tokens and cost, not in ``turns``), tokens by kind, cost, messages received and
        replies sent, transcribed audio seconds. Figures of committed turns only: a turn a
        crash interrupted is not in them (it is taken again, and counted once)."""
        conn = self._conn()
        r = conn.execute(
            "SELECT COALESCE(SUM(CASE WHEN kind = 'turn' THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(input_tokens), 0), "
            "COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cache_creation_tokens), 0), "
            "COALESCE(SUM(cache_read_tokens), 0), COALESCE(SUM(cost_usd), 0), "
            "COALESCE(SUM(audio_seconds), 0) FROM usage_log WHERE day = ?", (day,)).fetchone()
        start = calendar.timegm(time.strptime(day, "%Y-%m-%d"))
        ins = conn.execute("SELECT COUNT(*) FROM inbox WHERE received_at >= ? AND "
                           "received_at < ? AND COALESCE(reason, '') != 'own_reply'",
                           (start, start + 86_400)).fetchone()[0]
        outs = conn.execute("SELECT COUNT(*) FROM outbox WHERE state = 'sent' AND "
                            "sent_at >= ? AND sent_at < ?", (start, start + 86_400)).fetchone()[0]
        return {"turns": int(r[0]), "input_tokens": int(r[1]), "output_tokens": int(r[2]),
                "cache_creation_tokens": int(r[3]), "cache_read_tokens": int(r[4]),
                "cost_usd": float(r[5]), "transcription_seconds": float(r[6]),
                "messages_in": int(ins), "messages_out": int(outs)}

    def chat_count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM chats").fetchone()[0])

    def totals(self) -> dict[str, float]:
        r = self._conn().execute(
            "SELECT COALESCE(SUM(turns),0), COALESCE(SUM(cost_usd),0), "
            "COALESCE(SUM(input_tokens),0), COALESCE(SUM(output_tokens),0) FROM chats"
        ).fetchone()
        ins = self._conn().execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
        outs = self._conn().execute("SELECT COUNT(*) FROM outbox WHERE state='sent'").fetchone()[0]
        failed = self._conn().execute(
            "SELECT COUNT(*) FROM outbox WHERE state='failed'").fetchone()[0]
        # int()/float(): PostgreSQL sums BIGINT columns as NUMERIC (Decimal)
        return {"turns": int(r[0]), "cost_usd": float(r[1]), "input_tokens": int(r[2]),
                "output_tokens": int(r[3]), "messages_in": int(ins), "messages_out": int(outs),
                "replies_failed": int(failed),
                **{name: float(value) for name, value in self.counters().items()}}

    # --- controller link outbox --------------------------------------------------------
    def queue_frame(self, build: Callable[[int], bytes]) -> int:
        """Reserve a sequence number, build the frame with it, and store it."""
        with self._tx(fenced=False) as tx:
            seq = int(tx.execute("INSERT INTO link_outbox (frame) VALUES ('') RETURNING seq"
                                 ).fetchone()[0])
            tx.execute("UPDATE link_outbox SET frame = ? WHERE seq = ?", (build(seq).decode(), seq))
        return seq

    def unacked_frames(self) -> list[tuple[int, bytes]]:
        rows = self._conn().execute("SELECT seq, frame FROM link_outbox ORDER BY seq").fetchall()
        return [(r[0], r[1].encode()) for r in rows]

    def ack_frame(self, seq: int) -> None:
        self._conn().execute("DELETE FROM link_outbox WHERE seq = ?", (seq,))

    def drop_frames(self, seqs: list[int]) -> None:
        with self._tx(fenced=False) as tx:
            tx.executemany("DELETE FROM link_outbox WHERE seq = ?", [(s,) for s in seqs])

    # --- Claude transcripts (so a chat resumes on another host) -----------------------
    @property
    def portable(self) -> bool:
        """Whether this store outlives the host (PostgreSQL): then the CLI's transcripts are
        mirrored into it (:meth:`save_transcript`), else they already sit beside it."""
        return not isinstance(self._backend, _SqliteFile)

    def save_transcript(self, chat_id: str, session_id: str, body: bytes) -> None:
        """Keep the chat's current transcript; one per chat, the previous session's is
        replaced. In ``kv`` (no schema step: a transcript is opaque text to the store)."""
        self.set_kv(f"transcript:{chat_id}", json.dumps(
            {"session_id": session_id, "body": body.decode("utf-8", "replace")}))

    def transcript(self, chat_id: str, session_id: str) -> bytes | None:
        """The chat's mirrored transcript of ``session_id``, or None."""
        raw = self.get_kv(f"transcript:{chat_id}")
        if raw is None:
            return None
        saved = json.loads(raw)
        if saved.get("session_id") != session_id:
            return None
        return str(saved["body"]).encode()

    # --- the WhatsApp session (PostgreSQL: whatsmeow's tables share the schema) -------
    def forget_whatsapp_device(self) -> int:
        """After a logout: forget the linked device whatsmeow kept beside this store (its
        other tables follow by their foreign keys). SQLite: nothing here (whatsmeow has its
        own file, which the worker deletes). Returns the devices removed."""
        if isinstance(self._backend, _SqliteFile):
            return 0
        conn = self._conn()
        if conn.execute("SELECT to_regclass('whatsmeow_device')").fetchone()[0] is None:
            return 0
        return int(conn.execute("DELETE FROM whatsmeow_device").rowcount)

    # --- key/value ---------------------------------------------------------------------
    def get_kv(self, key: str) -> str | None:
        r = self._conn().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if r is None else str(r[0])

    def set_kv(self, key: str, value: str) -> None:
        with self._write() as tx:
            tx.execute(
                "INSERT INTO kv VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value),
            )
