"""The worker's durable state."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent import store as store_mod
from agent import store_postgres
from agent.store import MIGRATIONS, PostgresTarget, Store, encode_message
from agent.whatsapp.events import Image, IncomingMessage
from wabridge.errors import ExitCode, SchemaTooNew


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request: pytest.FixtureRequest, db_path: Path) -> Path | PostgresTarget:
    """Where a store lives: every contract test runs on both backends (PostgreSQL: a fresh
    schema in the session's private cluster, skipped with the reason when there is none)."""
    if request.param == "sqlite":
        return db_path
    cluster = request.getfixturevalue("postgres")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return PostgresTarget(cluster.conninfo(), schema)


@pytest.fixture
def store(where: Path | PostgresTarget) -> Iterator[Store]:
    s = Store(where)
    yield s
    s.close()


def _msg(chat_id: str, sender: str, wa_id: str, text: str = "") -> IncomingMessage:
    return IncomingMessage(wa_id=wa_id, chat_id=chat_id, sender=sender, text=text,
                           timestamp=1.0)


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _count(where: Path | PostgresTarget, sql: str) -> int:
    """One number from the store's tables, read behind the store's back."""
    if isinstance(where, PostgresTarget):
        with psycopg.connect(where.conninfo, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {where.schema}")
            row = conn.execute(sql).fetchone()
            assert row is not None
            return int(row[0])
    with closing(_raw(where)) as db:
        return int(db.execute(sql).fetchone()[0])


def _has_table(where: Path | PostgresTarget, name: str) -> bool:
    if isinstance(where, PostgresTarget):
        return _count(where, f"SELECT COUNT(*) FROM pg_tables WHERE schemaname = "  # noqa: S608 (test names)
                             f"'{where.schema}' AND tablename = '{name}'") == 1
    return _count(where, f"SELECT COUNT(*) FROM sqlite_master WHERE name = '{name}'") == 1  # noqa: S608 (test names)


def _add_step(monkeypatch: pytest.MonkeyPatch, step: Callable[[Any], None]) -> None:
    """A migration step a newer wabridge would add: written once, it runs on both backends."""
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, step])


# --- migrations ----------------------------------------------------------------------------


def test_migrates_an_empty_file(db_path: Path) -> None:
    assert not db_path.exists()
    s = Store(db_path)
    s.close()
    conn = _raw(db_path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"inbox", "outbox", "chats", "link_outbox", "kv", "schema_version"} <= tables
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_reopening_keeps_data_and_does_not_migrate_again(where: Path | PostgresTarget) -> None:
    s = Store(where)
    assert s.add_inbound(_msg("c", "s", "w1", "hi"))
    s.close()
    s2 = Store(where)
    assert [p.wa_id for p in s2.pending_inbound("c")] == ["w1"]
    s2.close()
    assert _count(where, "SELECT COUNT(*) FROM schema_version") == 1


def test_refuses_a_newer_schema(where: Path | PostgresTarget) -> None:
    Store(where).close()
    _count(where, f"UPDATE schema_version SET version = {len(MIGRATIONS) + 1} "  # noqa: S608 (an int)
                  "RETURNING 1")
    with pytest.raises(SchemaTooNew) as info:
        Store(where)
    assert f"schema version {len(MIGRATIONS) + 1}" in str(info.value)
    assert f"knows {len(MIGRATIONS)}" in str(info.value)
    assert "upgrade" in str(info.value)
    assert info.value.code == "schema_too_new"
    assert info.value.exit_code == ExitCode.SCHEMA_TOO_NEW  # do not restart: only an upgrade helps
    # and it left the store alone
    assert _count(where, "SELECT version FROM schema_version") == len(MIGRATIONS) + 1


def test_a_new_migration_step_is_applied_once(
    where: Path | PostgresTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(where).close()
    calls: list[int] = []

    def v2(db: Any) -> None:
        calls.append(1)
        db.execute("CREATE TABLE extra (x INTEGER)")

    _add_step(monkeypatch, v2)
    Store(where).close()
    Store(where).close()
    assert calls == [1]
    assert _count(where, "SELECT version FROM schema_version") == len(MIGRATIONS) + 1


def test_a_failing_migration_step_leaves_nothing_behind(
    where: Path | PostgresTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(where).close()

    def v2(db: Any) -> None:
        db.execute("CREATE TABLE half (x INTEGER)")
        raise RuntimeError("step failed halfway")

    _add_step(monkeypatch, v2)
    with pytest.raises(RuntimeError, match="halfway"):
        Store(where)
    assert _count(where, "SELECT version FROM schema_version") == len(MIGRATIONS)
    assert not _has_table(where, "half")


def test_a_new_sqlite_step_runs_on_postgresql_as_written_or_by_its_twin(
    where: Path | PostgresTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step written for SQLite (its column types included) makes the same table on
    PostgreSQL; a step that needs a PostgreSQL twin gets it there, and SQLite keeps its own."""
    Store(where).close()
    version = len(MIGRATIONS) + 1

    def step(db: Any) -> None:
        db.execute("CREATE TABLE jottings (id INTEGER PRIMARY KEY, at REAL NOT NULL, body BLOB, "
                   "n INTEGER NOT NULL DEFAULT 0)")
        db.execute("CREATE TABLE only_in_sqlite (x INTEGER)")

    def twin(db: Any) -> None:
        db.execute("CREATE TABLE jottings (id INTEGER PRIMARY KEY, at REAL NOT NULL, body BLOB, "
                   "n INTEGER NOT NULL DEFAULT 0)")

    _add_step(monkeypatch, step)
    monkeypatch.setitem(store_postgres.PG_TWINS, version, twin)
    store = Store(where)
    big = 2**40  # SQLite's integers are 64-bit: so are PostgreSQL's columns made from them
    store._conn().execute("INSERT INTO jottings (at, body, n) VALUES (?, ?, ?)",
                          (1.5, b"\x00\xff", big))
    rows = store._conn().execute("SELECT id, at, body, n FROM jottings").fetchall()
    assert [(r[0], r[1], bytes(r[2]), r[3]) for r in rows] == [(1, 1.5, b"\x00\xff", big)]
    store.close()
    assert _count(where, "SELECT version FROM schema_version") == version
    assert _has_table(where, "only_in_sqlite") is not isinstance(where, PostgresTarget)


def test_two_stores_opening_a_fresh_store_at_once(where: Path | PostgresTarget) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_it() -> None:
        barrier.wait()
        try:
            Store(where).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _count(where, "SELECT COUNT(*) FROM schema_version") == 1


# --- inbox ---------------------------------------------------------------------------------


def test_add_inbound_dedups(store: Store) -> None:
    assert store.add_inbound(_msg("c1", "s1", "w1", "a")) is True
    assert store.add_inbound(_msg("c1", "s1", "w1", "changed")) is False
    # the same WhatsApp id from another sender or chat is another message
    assert store.add_inbound(_msg("c1", "s2", "w1", "b")) is True
    assert store.add_inbound(_msg("c2", "s1", "w1", "c")) is True
    pending = store.pending_inbound("c1")
    assert [(p.sender, p.wa_id, p.message.text) for p in pending] == [
        ("s1", "w1", "a"),  # the first delivery wins
        ("s2", "w1", "b"),
    ]


def test_inbound_messages_come_back_typed_and_whole(store: Store) -> None:
    """The store owns the (de)serialisation: what goes in is what comes out, images too."""
    sent = IncomingMessage(
        wa_id="w1", chat_id="g@g.us", sender="4915@s.whatsapp.net", text="look",
        timestamp=12.5, sender_name="Jo", is_group=True, mentioned=True, quoted_text="q",
        images=(Image("image/jpeg", b"\x00\xffjpeg", "cap"),), unsupported_media="audio",
        expiration=86400)
    assert store.add_inbound(sent)
    (pending,) = store.pending_inbound("g@g.us")
    assert pending.message == sent
    (reply,) = store.complete_turn("g@g.us", [pending.id], ["answer"], pending.message)
    assert reply.quote == sent
    assert store.pending_replies()[0].quote == sent
    (user, _) = store.history("g@g.us", 10)
    assert user.message == sent and user.text == "look"


def test_pending_inbound_order_and_limit(store: Store) -> None:
    for i in range(5):
        store.add_inbound(_msg("c", "s", f"w{i}", str(i)))
    assert [p.message.text for p in store.pending_inbound("c", limit=3)] == ["0", "1", "2"]
    assert store.pending_inbound("other") == []


def test_pending_chats_oldest_waiting_first(store: Store) -> None:
    ids = {}
    for chat, wa in [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("b", "5")]:
        store.add_inbound(_msg(chat, "s", wa))
    for p in store.pending_inbound("a"):
        ids[p.wa_id] = p.id
    assert store.pending_chats() == ["a", "b", "c"]
    store.complete_turn("a", [ids["1"]], [], None)
    # a's oldest pending message is now 3, after b's 2
    assert store.pending_chats() == ["b", "a", "c"]


def test_skip_inbound(store: Store) -> None:
    store.add_inbound(_msg("c", "s", "w1"))
    store.add_inbound(_msg("c", "s", "w2"))
    first = store.pending_inbound("c")[0]
    store.skip_inbound([first.id])
    assert [p.wa_id for p in store.pending_inbound("c")] == ["w2"]
    assert store.add_inbound(_msg("c", "s", "w1")) is False  # skipped still dedups


# --- turns ---------------------------------------------------------------------------------


def test_complete_turn_marks_done_and_queues_replies_in_one_commit(
    store: Store, where: Path | PostgresTarget
) -> None:
    store.add_inbound(_msg("c", "s", "w1", "q1"))
    store.add_inbound(_msg("c", "s", "w2", "q2"))
    store.add_inbound(_msg("c", "s", "w3", "later"))
    p1, p2, _ = store.pending_inbound("c")
    quote = p2.message
    replies = store.complete_turn(
        "c", [p1.id, p2.id], ["part one", "part two"], quote,
        session_id="sess-1", cost_delta=0.5, input_tokens=10, output_tokens=20,
    )
    assert [r.text for r in replies] == ["part one", "part two"]
    assert replies[0].quote == quote
    assert replies[1].quote is None  # only the first part quotes
    assert len({r.wa_id for r in replies}) == 2
    assert all(r.wa_id.startswith("3EB0") and len(r.wa_id) == 20 for r in replies)
    assert [p.wa_id for p in store.pending_inbound("c")] == ["w3"]

    # a brand-new Store on the same file (another process after a restart) sees the same
    other = Store(where)
    assert [p.wa_id for p in other.pending_inbound("c")] == ["w3"]
    assert other.pending_replies() == replies
    row = other.chat("c")
    assert row is not None
    assert (row.session_id, row.turns, row.cost_usd, row.input_tokens, row.output_tokens) == (
        "sess-1", 1, 0.5, 10, 20,
    )
    other.close()


def test_complete_turn_accumulates_per_chat(store: Store) -> None:
    store.complete_turn("c", [], ["a"], None, session_id="s1", cost_delta=0.25,
                        input_tokens=1, output_tokens=2)
    store.complete_turn("c", [], ["b"], None, cost_delta=0.25, input_tokens=3, output_tokens=4)
    row = store.chat("c")
    assert row is not None
    # a turn without a session id keeps the known one
    assert (row.session_id, row.turns, row.cost_usd, row.input_tokens, row.output_tokens) == (
        "s1", 2, 0.5, 4, 6,
    )
    assert store.chat("nope") is None


def test_complete_turn_failing_midway_changes_nothing(store: Store) -> None:
    store.add_inbound(_msg("c", "s", "w1"))
    (p,) = store.pending_inbound("c")
    def replies() -> Iterator[str]:
        yield "first part"
        raise RuntimeError("the second part cannot be made")

    with pytest.raises(RuntimeError):
        store.complete_turn("c", [p.id], replies(), None)
    assert [x.id for x in store.pending_inbound("c")] == [p.id]
    assert store.pending_replies() == []
    assert store.chat("c") is None
    # and the store is still usable (the transaction was rolled back, not left open)
    store.complete_turn("c", [p.id], ["reply"], None)
    assert store.pending_inbound("c") == []


def test_complete_turn_survives_a_process_crash_midway(where: Path | PostgresTarget) -> None:
    s = Store(where)
    s.add_inbound(_msg("c", "s", "w1"))
    (p,) = s.pending_inbound("c")
    s.close()
    # The child dies (os._exit: no cleanup, no rollback) after the inbound row was updated
    # and one reply inserted, inside complete_turn's transaction.
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import PosixPath
        from agent.store import PostgresTarget, Store
        s = Store({where!r})
        def replies():
            yield "first part"
            os._exit(3)
        s.complete_turn("c", [{p.id}], replies(), None)
        sys.exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                          check=False, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    after = Store(where)
    assert [x.id for x in after.pending_inbound("c")] == [p.id]  # answered again
    assert after.pending_replies() == []  # and no half-queued reply
    after.close()


# --- outbox --------------------------------------------------------------------------------


def test_pending_replies_in_order_and_mark_sent(store: Store) -> None:
    a = store.complete_turn("c1", [], ["a1", "a2"], None)
    b = store.complete_turn("c2", [], ["b1"], _msg("c2", "s", "q"))
    pending = store.pending_replies()
    assert [r.text for r in pending] == ["a1", "a2", "b1"]
    assert pending[2].quote == _msg("c2", "s", "q")
    store.mark_sent(a[1].id)
    assert [r.text for r in store.pending_replies()] == ["a1", "b1"]
    store.mark_sent(a[0].id)
    store.mark_sent(b[0].id)
    assert store.pending_replies() == []
    assert store.totals()["messages_out"] == 3


def test_reply_ids_survive_a_restart(store: Store, where: Path | PostgresTarget) -> None:
    (r,) = store.complete_turn("c", [], ["x"], None)
    other = Store(where)
    assert [x.wa_id for x in other.pending_replies()] == [r.wa_id]  # resend reuses the id
    other.close()


# --- controller link outbox ----------------------------------------------------------------


def _frame(kind: str) -> object:
    return lambda seq: json.dumps({"type": kind, "seq": seq}).encode() + b"\n"


def test_link_outbox(store: Store, where: Path | PostgresTarget) -> None:
    s1 = store.queue_frame(_frame("state"))  # type: ignore[arg-type]
    s2 = store.queue_frame(_frame("message"))  # type: ignore[arg-type]
    s3 = store.queue_frame(_frame("state"))  # type: ignore[arg-type]
    assert s1 < s2 < s3
    frames = store.unacked_frames()
    assert [seq for seq, _ in frames] == [s1, s2, s3]
    # the frame was built with its own sequence number
    assert all(json.loads(data)["seq"] == seq for seq, data in frames)
    assert all(isinstance(data, bytes) for _, data in frames)
    store.ack_frame(s2)
    assert [seq for seq, _ in store.unacked_frames()] == [s1, s3]
    store.ack_frame(s2)  # acking twice is harmless
    store.drop_frames([s1])
    other = Store(where)
    assert [seq for seq, _ in other.unacked_frames()] == [s3]
    other.close()
    store.drop_frames([s3])
    assert store.unacked_frames() == []
    # sequence numbers are never reused, even after the table emptied
    assert store.queue_frame(_frame("x")) > s3  # type: ignore[arg-type]


def test_queue_frame_whose_build_fails_queues_nothing(store: Store) -> None:
    def build(seq: int) -> bytes:
        raise ValueError("too big")

    with pytest.raises(ValueError, match="too big"):
        store.queue_frame(build)
    assert store.unacked_frames() == []


# --- concurrency and totals ----------------------------------------------------------------


def test_concurrent_add_inbound_loses_and_duplicates_nothing(store: Store) -> None:
    threads_n, per_thread = 8, 150
    results: list[list[bool]] = [[] for _ in range(threads_n)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads_n)

    def worker(n: int) -> None:
        barrier.wait()
        try:
            for i in range(per_thread):
                # every id is delivered by two threads
                wa = f"w{(n // 2) * per_thread + i}"
                results[n].append(store.add_inbound(_msg(f"chat{i % 5}", "s", wa, str(n))))
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()  # this thread's connection

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    unique = threads_n // 2 * per_thread
    assert sum(sum(r) for r in results) == unique
    rows = [p for c in range(5) for p in store.pending_inbound(f"chat{c}", limit=10_000)]
    assert len(rows) == unique
    assert len({(p.chat_id, p.sender, p.wa_id) for p in rows}) == unique


def test_a_message_again_under_its_lid_is_a_duplicate(store: Store) -> None:
    # first under the phone number (the event had the alt), then LID-only (it had not)
    assert store.add_inbound(_msg("4915@s.whatsapp.net", "4915@s.whatsapp.net", "3A01"))
    assert not store.add_inbound(_msg("2718@lid", "2718@lid", "3A01"))
    assert store.pending_chats() == ["4915@s.whatsapp.net"]
    # a LID-only message with a new id is a message; the same one again under the phone is not
    assert store.add_inbound(_msg("2718@lid", "2718@lid", "3A02"))
    assert not store.add_inbound(_msg("4915@s.whatsapp.net", "4915@s.whatsapp.net", "3A02"))


def test_totals(store: Store) -> None:
    assert store.totals() == {"turns": 0, "cost_usd": 0, "input_tokens": 0,
                              "output_tokens": 0, "messages_in": 0, "messages_out": 0,
                              "replies_failed": 0}
    store.add_inbound(_msg("a", "s", "1"))
    store.add_inbound(_msg("b", "s", "2"))
    store.add_inbound(_msg("b", "s", "2"))  # duplicate: not counted
    (r,) = store.complete_turn("a", [], ["x"], None, cost_delta=0.1, input_tokens=5,
                               output_tokens=7)
    store.complete_turn("b", [], ["y"], None, cost_delta=0.2, input_tokens=1, output_tokens=1)
    store.mark_sent(r.id)
    totals = store.totals()
    assert totals["turns"] == 2
    assert totals["cost_usd"] == pytest.approx(0.3)
    assert totals["input_tokens"] == 6
    assert totals["output_tokens"] == 8
    assert totals["messages_in"] == 2
    assert totals["messages_out"] == 1
    assert store.chat_count() == 2


def test_sessions_and_kv(store: Store) -> None:
    store.set_session("c", "s1")
    assert store.chat("c") is not None
    assert store.chat("c").session_id == "s1"  # type: ignore[union-attr]
    store.set_session("c", None)  # reset_chat
    assert store.chat("c").session_id is None  # type: ignore[union-attr]
    assert store.get_kv("k") is None
    store.set_kv("k", "v1")
    store.set_kv("k", "v2")
    assert store.get_kv("k") == "v2"


# --- policy, commands, budgets, rotation (schema v2) -------------------------------


def test_v1_file_is_upgraded_in_place(db_path: Path) -> None:
    with closing(_raw(db_path)) as conn:
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        MIGRATIONS[0](conn)
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute("INSERT INTO inbox (chat_id, sender, wa_id, payload, received_at) "
                     "VALUES ('c', 's', 'w1', ?, 1.0)",
                     (encode_message(_msg("c", "s", "w1", "old")),))
        conn.execute("INSERT INTO chats (chat_id, session_id, turns) VALUES ('c', 'sid', 3)")
        conn.execute("COMMIT")
    s = Store(db_path)
    assert _count(db_path, "SELECT version FROM schema_version") == len(MIGRATIONS) >= 2
    (p,) = s.pending_inbound("c")
    assert (p.wa_id, p.message.text, p.received_at) == ("w1", "old", 1.0)
    row = s.chat("c")
    assert row is not None
    assert (row.session_id, row.turns, row.session_turns, row.context_tokens, row.seed) == (
        "sid", 3, 0, 0, None)
    assert s.summaries("c") == [] and s.cost_on("2024-01-01") == 0.0
    s.close()


def test_skip_with_reason_and_notice_once_per_key(store: Store) -> None:
    for w in ("w1", "w2", "w3"):
        store.add_inbound(_msg("c", "s", w, w))
    p1, p2, p3 = store.pending_inbound("c")
    store.skip_inbound([p1.id], "not_allowlisted")
    assert store.inbound_state("c", "w1") == ("skipped", "not_allowlisted")
    first = store.skip_with_notice("c", [p2.id], "budget", "no money", quote=p2.message,
                                   once_key=("budget", "2024-01-01"))
    again = store.skip_with_notice("c", [p3.id], "budget", "no money",
                                   once_key=("budget", "2024-01-01"))
    assert [r.text for r in first] == ["no money"] and first[0].quote == p2.message
    assert again == []
    assert store.inbound_state("c", "w3") == ("skipped", "budget")
    other_chat = store.skip_with_notice("d", [], "budget", "no money",
                                        once_key=("budget", "2024-01-01"))
    next_day = store.skip_with_notice("c", [], "budget", "no money",
                                      once_key=("budget", "2024-01-02"))
    assert len(other_chat) == len(next_day) == 1
    assert store.is_own_reply(first[0].wa_id) and not store.is_own_reply("w1")
    assert store.pending_inbound("c") == []


def test_answer_locally_is_not_a_turn_nor_history(store: Store) -> None:
    store.add_inbound(_msg("c", "s", "w1", "/help"))
    (p,) = store.pending_inbound("c")
    (r,) = store.answer_locally("c", [p.id], ["help text"], p.message)
    assert r.quote == p.message
    assert store.inbound_state("c", "w1") == ("done", "command")
    assert store.chat("c") is None  # no turn counted
    assert store.history("c", 10) == []


def test_session_turns_context_and_daily_cost(store: Store) -> None:
    store.complete_turn("c", [], ["a"], None, session_id="s1", cost_delta=0.5,
                        context_tokens=100, day="2024-01-01")
    store.complete_turn("c", [], ["b"], None, session_id="s1", cost_delta=0.25,
                        context_tokens=300, day="2024-01-01")
    store.complete_turn("c", [], ["apology"], None, cost_delta=0.0, day="2024-01-02")
    row = store.chat("c")
    assert row is not None
    assert (row.session_turns, row.context_tokens, row.turns) == (2, 300, 3)
    store.complete_turn("d", [], ["x"], None, session_id="s9", cost_delta=1.0, day="2024-01-02")
    assert store.cost_on("2024-01-01") == pytest.approx(0.75)
    assert store.cost_on("2024-01-02") == pytest.approx(1.0)
    # a different session id (a fresh session) starts counting at 1 and clears the seed
    store.set_session("c", None, seed="recovery")
    assert store.chat("c").seed == "recovery"  # type: ignore[union-attr]
    store.complete_turn("c", [], ["y"], None, session_id="s2", context_tokens=5)
    row = store.chat("c")
    assert row is not None
    assert (row.session_id, row.session_turns, row.seed, row.context_tokens) == ("s2", 1, None, 5)


def test_rotate_numbers_and_reset_archives(store: Store) -> None:
    store.complete_turn("c", [], ["a"], None, session_id="s1", context_tokens=900)
    assert store.rotate("c", "first summary", cost_delta=0.1, day="2024-01-01") == 1
    row = store.chat("c")
    assert row is not None
    assert (row.session_id, row.session_turns, row.context_tokens, row.seed) == (
        None, 0, 0, "summary")
    assert store.cost_on("2024-01-01") == pytest.approx(0.1)
    assert store.rotate("c", "second summary") == 2
    assert store.rotate("c", None) is None  # summary failed: recovery seed, no number
    assert store.chat("c").seed == "recovery"  # type: ignore[union-attr]
    assert store.rotate("other", "x") == 1  # numbers are per chat
    latest = store.latest_summary("c")
    assert latest is not None and (latest.number, latest.text) == (2, "second summary")
    store.reset_chat("c")
    assert store.latest_summary("c") is None
    assert [s.archived for s in store.summaries("c")] == [True, True]
    row = store.chat("c")
    assert row is not None and row.seed is None and row.reset_at > 0
    assert store.rotate("c", "third") == 3  # numbers keep counting after a reset


def test_history_is_ordered_limited_and_starts_after_reset(store: Store) -> None:
    def exchange(q: str, a: str) -> None:
        store.add_inbound(_msg("c", "s", q, q))
        (p,) = store.pending_inbound("c")
        store.complete_turn("c", [p.id], [a], None)

    exchange("q1", "a1")
    store.add_inbound(_msg("c", "s", "skipped", "skipped"))
    store.skip_inbound([store.pending_inbound("c")[0].id], "from_me")
    store.skip_with_notice("c", [], "budget", "a notice")
    exchange("q2", "a2")
    items = store.history("c", 10)
    assert [(h.role, h.text) for h in items] == [
        ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    assert [h.text for h in store.history("c", 3)] == ["a1", "q2", "a2"]
    assert store.history("c", 0) == []
    store.reset_chat("c")
    row = store.chat("c")
    assert row is not None
    assert store.history("c", 10, since=row.reset_at) == []
    exchange("q3", "a3")
    assert [h.text for h in store.history("c", 10, since=row.reset_at)] == ["q3", "a3"]


def test_commits_never_checkpoint_and_checkpoint_runs_from_another_thread(
        db_path: Path) -> None:
    """A commit on the event loop never pays for copying the write-ahead log back (SQLite
    would at 1000 pages); the worker's periodic ``checkpoint`` in a thread does, and closing
    leaves an empty log."""
    store = Store(db_path)
    for i in range(3000):
        assert store.add_inbound(_msg("chat@s.whatsapp.net", "s", f"ID{i:05d}", "x" * 2000))
    wal = db_path.with_name(db_path.name + "-wal")
    page = store._conn().execute("PRAGMA page_size").fetchone()[0]
    assert wal.stat().st_size > 1000 * page * 1.2, "a commit checkpointed the log"
    result: list[tuple[int, int]] = []
    worker = threading.Thread(target=lambda: result.append(store.checkpoint()))
    worker.start()
    worker.join(30)
    log_pages, copied = result[0]
    assert log_pages > 1000 and copied == log_pages
    store.close()
    assert wal.stat().st_size == 0
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT count(*) FROM inbox").fetchone()[0] == 3000


def test_summaries_written_before_the_rename_keep_their_numbers(db_path: Path) -> None:
    """Schema 4 renamed ``summaries.version`` to ``number``; a chat's stored summaries (and
    the next number) survive the upgrade."""
    with closing(_raw(db_path)) as conn:
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for step in MIGRATIONS[:3]:
            step(conn)
        conn.execute("INSERT INTO schema_version VALUES (3)")
        conn.execute("INSERT INTO summaries (chat_id, version, text, created_at) "
                     "VALUES ('c', 1, 'first', 1.0), ('c', 2, 'second', 2.0)")
        conn.execute("COMMIT")
    s = Store(db_path)
    try:
        assert [(x.number, x.text) for x in s.summaries("c")] == [(1, "first"), (2, "second")]
        assert s.rotate("c", "third") == 3
    finally:
        s.close()


def test_usage_on_a_day_counts_committed_turns_and_summaries(store: Store) -> None:
    """Usage for billing comes from the rows the daily budget reads, written in the turn's
    own transaction: a turn is in the figures once it is committed, and only once."""
    day = "2026-12-04"
    assert store.usage_on(day) == {
        "turns": 0, "input_tokens": 0, "output_tokens": 0, "cache_creation_tokens": 0,
        "cache_read_tokens": 0, "cost_usd": 0.0, "transcription_seconds": 0.0,
        "messages_in": 0, "messages_out": 0}
    usage = {"input_tokens": 10, "output_tokens": 20, "cache_creation_input_tokens": 30,
             "cache_read_input_tokens": 40}
    store.complete_turn("c", [], ["a"], None, session_id="s1", cost_delta=0.25, day=day,
                        usage=usage)
    store.complete_turn("c", [], ["b"], None, cost_delta=0.5, day=day, usage=usage)
    store.complete_turn("c", [], ["x"], None, cost_delta=1.0, day="2026-12-05", usage=usage)
    store.rotate("c", "summary", cost_delta=0.125, day=day, usage={"input_tokens": 1,
                                                                   "output_tokens": 2})
    got = store.usage_on(day)
    assert {k: got[k] for k in ("turns", "input_tokens", "output_tokens",
                                "cache_creation_tokens", "cache_read_tokens", "cost_usd")} == {
        "turns": 2, "input_tokens": 21, "output_tokens": 42, "cache_creation_tokens": 60,
        "cache_read_tokens": 80, "cost_usd": 0.875}
    assert store.cost_on(day) == got["cost_usd"]  # the daily budget reads the same rows


def test_a_restarted_server_costs_one_failed_call_not_the_store(
        where: Path | PostgresTarget) -> None:
    """PostgreSQL restarted (here: our server processes ended, as a restart does): the call
    that meets the dead connection fails, and the next one, on every thread, works again
    (psycopg never reconnects by itself; a thread's cached connection would stay dead)."""
    if not isinstance(where, PostgresTarget):
        pytest.skip("PostgreSQL only")
    store = Store(where)
    assert store.add_inbound(_msg("c", "s", "w1"))
    with psycopg.connect(where.conninfo, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                      "AND backend_type = 'client backend'")
    with pytest.raises(psycopg.OperationalError):
        store.add_inbound(_msg("c", "s", "w2"))
    assert store.add_inbound(_msg("c", "s", "w2"))  # committed now
    assert [p.wa_id for p in store.pending_inbound("c")] == ["w1", "w2"]
    store.close()


def test_scheduled_messages_and_notes(store: Store) -> None:
    """The tools' tables (schema 6) on both backends."""
    a = store.schedule("c1", 200.0, "later", "2026-12-05")
    b = store.schedule("c2", 100.0, "sooner", "2026-12-05")
    c = store.schedule("c1", 300.0, "never", "2026-12-05")
    assert a < b < c
    assert [s.id for s in store.scheduled()] == [b, a, c]
    assert [s.id for s in store.scheduled("c1")] == [a, c]
    assert store.scheduled_on("2026-12-05") == 3
    assert store.cancel_scheduled(c, "c2") is False  # not that chat's
    assert store.cancel_scheduled(c) is True
    assert store.cancel_scheduled(c) is False
    due = store.release_due(250.0)
    assert [(r.chat_id, r.text) for r in due] == [("c2", "sooner"), ("c1", "later")]
    assert store.release_due(250.0) == []  # queued once
    assert [r.text for r in store.pending_replies()] == ["sooner", "later"]
    n1 = store.add_note("c1", "likes tea")
    n2 = store.add_note("c1", "lives in Porto")
    assert n1 < n2
    assert [n.text for n in store.notes("c1")] == ["likes tea", "lives in Porto"]
    assert store.forget_note(n1, "c2") is False
    assert store.forget_note(n1, "c1") is True
    assert [n.id for n in store.notes()] == [n2]
