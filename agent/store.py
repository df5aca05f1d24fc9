"""The worker's durable state: one SQLite file in the user's state directory.

Invariants the conversation engine relies on:
- An inbound message is committed (unique per chat, sender and WhatsApp id) before anything
  else happens with it; a second delivery of the same id is ignored (``add_inbound`` -> False).
- A turn is done only when its reply is committed to the outbox in the same transaction that
  marks its inbound messages done; so after a crash a message is either pending (answered
  again) or answered (its reply waits in the outbox), never both or neither.
- Every outbox entry has its WhatsApp message id chosen before the first send attempt, so a
  resend after a crash reuses the id and WhatsApp (and the simulator) see one message.
- Frames for the controller are queued here first (``link_outbox``) and deleted only when the
  controller acks them, so a controller outage or a worker restart loses no report.

Pragmas: WAL, ``synchronous=NORMAL``, ``busy_timeout``; read-then-write uses
``BEGIN IMMEDIATE``. Migrations are registered steps, each in its own transaction; a schema
newer than the code is refused.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wabridge.errors import WabridgeError

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def _v1(db: sqlite3.Connection) -> None:
    db.executescript(
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


class SchemaTooNew(WabridgeError):
    code = "schema_too_new"


@dataclass(frozen=True)
class PendingInbound:
    id: int
    chat_id: str
    sender: str
    wa_id: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class PendingReply:
    id: int
    chat_id: str
    wa_id: str
    text: str
    quote: dict[str, Any] | None


@dataclass(frozen=True)
class ChatRow:
    chat_id: str
    session_id: str | None
    turns: int
    cost_usd: float
    input_tokens: int
    output_tokens: int


class Store:
    """Thread-safe: one connection per thread (neonize calls the sink on its own thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._migrate()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _migrate(self) -> None:
        db = self._conn()
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        current = row[0] if row else 0
        if current > len(MIGRATIONS):
            raise SchemaTooNew(
                f"{self.path} has schema version {current}, this wabridge knows {len(MIGRATIONS)}",
                explanation="a newer wabridge wrote this state; upgrade instead of downgrading",
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            with self._tx() as tx:
                MIGRATIONS[version - 1](tx)
                tx.execute("DELETE FROM schema_version")
                tx.execute("INSERT INTO schema_version VALUES (?)", (version,))

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- inbox -------------------------------------------------------------------------
    def add_inbound(self, chat_id: str, sender: str, wa_id: str, payload: dict[str, Any]) -> bool:
        """Commit an inbound message; False when this id was seen before (duplicate)."""
        cur = self._conn().execute(
            "INSERT OR IGNORE INTO inbox (chat_id, sender, wa_id, payload, received_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (chat_id, sender, wa_id, json.dumps(payload), time.time()),
        )
        return cur.rowcount == 1

    def pending_chats(self) -> list[str]:
        rows = self._conn().execute(
            "SELECT DISTINCT chat_id FROM inbox WHERE state = 'pending' ORDER BY id"
        ).fetchall()
        return [r[0] for r in rows]

    def pending_inbound(self, chat_id: str, limit: int = 20) -> list[PendingInbound]:
        rows = self._conn().execute(
            "SELECT id, chat_id, sender, wa_id, payload FROM inbox "
            "WHERE state = 'pending' AND chat_id = ? ORDER BY id LIMIT ?",
            (chat_id, limit),
        ).fetchall()
        return [
            PendingInbound(r["id"], r["chat_id"], r["sender"], r["wa_id"], json.loads(r["payload"]))
            for r in rows
        ]

    def skip_inbound(self, ids: list[int]) -> None:
        with self._tx() as tx:
            tx.executemany("UPDATE inbox SET state = 'skipped' WHERE id = ?", [(i,) for i in ids])

    def complete_turn(
        self,
        chat_id: str,
        inbound_ids: list[int],
        replies: list[str],
        quote: dict[str, Any] | None,
        *,
        session_id: str | None = None,
        cost_delta: float = 0.0,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> list[PendingReply]:
        """Atomically: mark the turn's inbound messages done and queue its replies."""
        out: list[PendingReply] = []
        now = time.time()
        with self._tx() as tx:
            tx.executemany("UPDATE inbox SET state = 'done' WHERE id = ?", [(i,) for i in inbound_ids])
            for idx, text in enumerate(replies):
                wa_id = "3EB0" + secrets.token_hex(8).upper()
                q = quote if idx == 0 else None
                cur = tx.execute(
                    "INSERT INTO outbox (chat_id, wa_id, text, quote, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (chat_id, wa_id, text, json.dumps(q) if q else None, now),
                )
                out.append(PendingReply(int(cur.lastrowid or 0), chat_id, wa_id, text, q))
            tx.execute(
                "INSERT INTO chats (chat_id, session_id, turns, cost_usd, input_tokens, "
                "output_tokens, last_activity) VALUES (?, ?, 1, ?, ?, ?, ?) "
                "ON CONFLICT (chat_id) DO UPDATE SET "
                "session_id = COALESCE(excluded.session_id, chats.session_id), "
                "turns = chats.turns + 1, cost_usd = chats.cost_usd + excluded.cost_usd, "
                "input_tokens = chats.input_tokens + excluded.input_tokens, "
                "output_tokens = chats.output_tokens + excluded.output_tokens, "
                "last_activity = excluded.last_activity",
                (chat_id, session_id, cost_delta, input_tokens, output_tokens, now),
            )
        return out

    # --- outbox ------------------------------------------------------------------------
    def pending_replies(self) -> list[PendingReply]:
        rows = self._conn().execute(
            "SELECT id, chat_id, wa_id, text, quote FROM outbox WHERE state = 'pending' ORDER BY id"
        ).fetchall()
        return [
            PendingReply(
                r["id"], r["chat_id"], r["wa_id"], r["text"],
                json.loads(r["quote"]) if r["quote"] else None,
            )
            for r in rows
        ]

    def mark_sent(self, reply_id: int) -> None:
        self._conn().execute(
            "UPDATE outbox SET state = 'sent', sent_at = ? WHERE id = ?", (time.time(), reply_id)
        )

    # --- chats -------------------------------------------------------------------------
    def chat(self, chat_id: str) -> ChatRow | None:
        r = self._conn().execute("SELECT * FROM chats WHERE chat_id = ?", (chat_id,)).fetchone()
        if r is None:
            return None
        return ChatRow(
            r["chat_id"], r["session_id"], r["turns"], r["cost_usd"], r["input_tokens"],
            r["output_tokens"],
        )

    def set_session(self, chat_id: str, session_id: str | None) -> None:
        self._conn().execute(
            "INSERT INTO chats (chat_id, session_id) VALUES (?, ?) "
            "ON CONFLICT (chat_id) DO UPDATE SET session_id = excluded.session_id",
            (chat_id, session_id),
        )

    def chat_count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM chats").fetchone()[0])

    def totals(self) -> dict[str, float]:
        r = self._conn().execute(
            "SELECT COALESCE(SUM(turns),0), COALESCE(SUM(cost_usd),0), "
            "COALESCE(SUM(input_tokens),0), COALESCE(SUM(output_tokens),0) FROM chats"
        ).fetchone()
        ins = self._conn().execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
        outs = self._conn().execute("SELECT COUNT(*) FROM outbox WHERE state='sent'").fetchone()[0]
        return {"turns": r[0], "cost_usd": r[1], "input_tokens": r[2], "output_tokens": r[3],
                "messages_in": ins, "messages_out": outs}

    # --- controller link outbox --------------------------------------------------------
    def queue_frame(self, build: Callable[[int], bytes]) -> int:
        """Reserve a sequence number, build the frame with it, and store it."""
        with self._tx() as tx:
            cur = tx.execute("INSERT INTO link_outbox (frame) VALUES ('')")
            seq = int(cur.lastrowid or 0)
            tx.execute("UPDATE link_outbox SET frame = ? WHERE seq = ?", (build(seq).decode(), seq))
        return seq

    def unacked_frames(self) -> list[tuple[int, bytes]]:
        rows = self._conn().execute("SELECT seq, frame FROM link_outbox ORDER BY seq").fetchall()
        return [(r[0], r[1].encode()) for r in rows]

    def ack_frame(self, seq: int) -> None:
        self._conn().execute("DELETE FROM link_outbox WHERE seq = ?", (seq,))

    def drop_frames(self, seqs: list[int]) -> None:
        with self._tx() as tx:
            tx.executemany("DELETE FROM link_outbox WHERE seq = ?", [(s,) for s in seqs])

    # --- key/value ---------------------------------------------------------------------
    def get_kv(self, key: str) -> str | None:
        r = self._conn().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if r is None else str(r[0])

    def set_kv(self, key: str, value: str) -> None:
        self._conn().execute(
            "INSERT INTO kv VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
