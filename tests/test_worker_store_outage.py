"""The worker's sink when the store refuses a message WhatsApp already acknowledged
(PostgreSQL down): the message is held, committed by the supervision's retry once the store
is back and then handled like any other; at shutdown what is still held is spilled to the
state directory and committed at the next start (``agent.inbound_spill``)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres_cluster import Cluster

from agent import inbound_spill, main
from agent.main import Worker
from agent.placement import open_store
from agent.store import PostgresTarget, Store
from agent.whatsapp import events as ev
from controller import pg_roles
from wabridge import config
from wabridge.config import with_overrides
from wabridge.postgres import account_role


@pytest.fixture(autouse=True)
def _no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main.sdnotify, "SystemdNotifier", Notifier)


class Said:
    """A logger that keeps what it is told."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))


class OutageStore(Store):
    """A real store whose inbox is unreachable while ``down``."""

    down = False

    def add_inbound(self, message: ev.IncomingMessage) -> bool:
        if self.down:
            raise ConnectionError("server closed the connection unexpectedly")
        return super().add_inbound(message)


def _msg(n: int) -> ev.IncomingMessage:
    return ev.IncomingMessage(wa_id=f"3A{n}", chat_id="4915@s.whatsapp.net",
                              sender="4915@s.whatsapp.net", text=f"m{n}", timestamp=1.0)


class Notifier:
    """sdnotify's notifier stand-in: there is no systemd to tell here."""

    def notify(self, _state: str) -> None:
        pass


async def _worker(tmp_path: Path) -> tuple[Worker, OutageStore]:
    cfg = with_overrides(config.Config(), "worker", backend="sim")
    store = OutageStore(tmp_path / "agent.db")
    return Worker("alice", cfg, tmp_path, store), store


def _close(worker: Worker, store: Store) -> None:
    del worker
    store.close()


def _sink_from_another_thread(worker: Worker, event: ev.Event) -> None:
    thread = threading.Thread(target=worker.sink, args=(event,))  # as neonize's thread does
    thread.start()
    thread.join()


async def test_a_refused_message_is_held_then_committed_in_order(tmp_path: Path) -> None:
    worker, store = await _worker(tmp_path)
    store.down = True
    _sink_from_another_thread(worker, _msg(1))
    _sink_from_another_thread(worker, _msg(2))
    await asyncio.sleep(0.05)  # the hand-over to the loop
    assert [m.wa_id for m in worker.inbound_hold.held] == ["3A1", "3A2"]
    assert worker.events.empty() and store.pending_chats() == []
    store.down = False
    worker.inbound_hold.next_try = 0.0  # the backoff has passed
    worker.retry_held_inbound()
    assert [p.wa_id for p in store.pending_inbound("4915@s.whatsapp.net")] == ["3A1", "3A2"]
    queued: list[Any] = [worker.events.get_nowait(), worker.events.get_nowait()]
    assert [e.wa_id for e in queued] == ["3A1", "3A2"]  # handled like fresh arrivals
    assert worker.inbound_hold.held == []
    _close(worker, store)


async def _held(worker: Worker, store: OutageStore, *ns: int) -> None:
    store.down = True
    for n in ns:
        _sink_from_another_thread(worker, _msg(n))
    await asyncio.sleep(0.05)  # the hand-over to the loop


def _spilled(state_dir: Path) -> list[str]:
    return [m.wa_id for m in inbound_spill.read(state_dir / inbound_spill.SPILL_FILE)]


async def test_at_shutdown_what_is_still_held_is_spilled_to_the_state_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker, store = await _worker(tmp_path)
    await _held(worker, store, 7, 8)
    said = Said()
    monkeypatch.setattr(inbound_spill, "log", said)  # (its logger may be bound already)
    worker.retry_held_inbound(final=True)
    assert ("warning", "store.inbound_spilled", {
        "count": 2, "wa_ids": ["3A7", "3A8"], "path": str(tmp_path / "inbound-spill.jsonl"),
        "error": "server closed the connection unexpectedly"}) in said.lines
    assert not [line for line in said.lines if line[1] == "store.inbound_lost"]
    assert _spilled(tmp_path) == ["3A7", "3A8"]
    _close(worker, store)


async def test_a_spill_that_fails_too_is_named_as_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker, store = await _worker(tmp_path)
    await _held(worker, store, 7)

    def full(_path: Path, _data: bytes, _mode: int = 0) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inbound_spill, "write_atomically", full)
    said = Said()
    monkeypatch.setattr(inbound_spill, "log", said)
    worker.retry_held_inbound(final=True)
    assert ("critical", "store.inbound_lost", {
        "count": 1, "wa_ids": ["3A7"], "error": "server closed the connection unexpectedly",
        "spill_error": "[Errno 28] No space left on device",
        "path": str(tmp_path / "inbound-spill.jsonl")}) in said.lines
    _close(worker, store)


async def test_at_start_spilled_messages_are_committed_in_order_and_woken(
        tmp_path: Path) -> None:
    worker, store = await _worker(tmp_path)
    await _held(worker, store, 1, 2)
    worker.retry_held_inbound(final=True)  # stopped during the outage
    _close(worker, store)

    worker, store = await _worker(tmp_path)  # the next start: the database answers
    store.add_inbound(_msg(1))  # (one was committed after all: a duplicate, no second turn)
    worker.replay_spilled_inbound()
    assert [p.wa_id for p in store.pending_inbound("4915@s.whatsapp.net")] == ["3A1", "3A2"]
    assert worker.events.get_nowait().wa_id == "3A2"  # type: ignore[attr-defined]
    assert worker.events.empty() and worker.inbound_hold.held == []
    assert not (tmp_path / "inbound-spill.jsonl").exists()
    _close(worker, store)


async def test_spilled_messages_the_store_still_refuses_are_held_ahead_of_new_ones(
        tmp_path: Path) -> None:
    """The file stays until every spilled message is committed (a crash meanwhile loses
    nothing); a second stop adds only what came after, behind them."""
    worker, store = await _worker(tmp_path)
    await _held(worker, store, 1, 2)
    worker.retry_held_inbound(final=True)
    _close(worker, store)

    worker, store = await _worker(tmp_path)
    store.down = True  # refused again at the next start
    worker.replay_spilled_inbound()
    _sink_from_another_thread(worker, _msg(3))  # WhatsApp started after the replay
    assert [m.wa_id for m in worker.inbound_hold.held] == ["3A1", "3A2", "3A3"]
    assert _spilled(tmp_path) == ["3A1", "3A2"]
    worker.retry_held_inbound(final=True)  # stopped again, the store still down
    assert _spilled(tmp_path) == ["3A1", "3A2", "3A3"]  # no copy of the first two
    _close(worker, store)

    worker, store = await _worker(tmp_path)
    store.down = True
    worker.replay_spilled_inbound()
    store.down = False
    worker.retry_held_inbound(force=True)  # the supervision's retry, the store back
    assert [p.wa_id for p in store.pending_inbound("4915@s.whatsapp.net")] == [
        "3A1", "3A2", "3A3"]
    assert not (tmp_path / "inbound-spill.jsonl").exists()
    _close(worker, store)


async def test_an_unreadable_spill_is_set_aside_and_named_and_the_worker_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "inbound-spill.jsonl").write_text('{"wa_id": "3A1", "chat_id": \n')
    worker, store = await _worker(tmp_path)
    said = Said()
    monkeypatch.setattr(inbound_spill, "log", said)
    worker.replay_spilled_inbound()
    (level, event, fields), = [line for line in said.lines if line[1].startswith("store.")]
    assert (level, event) == ("error", "store.spill_unreadable")
    assert fields["path"] == str(tmp_path / "inbound-spill.jsonl")
    assert fields["moved_to"] == str(tmp_path / "inbound-spill.jsonl.bad")
    assert "line 1: not JSON" in fields["error"]
    assert (tmp_path / "inbound-spill.jsonl.bad").exists()
    assert not (tmp_path / "inbound-spill.jsonl").exists()
    assert worker.inbound_hold.held == []
    _sink_from_another_thread(worker, _msg(3))  # and it takes messages as usual
    assert [p.wa_id for p in store.pending_inbound("4915@s.whatsapp.net")] == ["3A3"]
    _close(worker, store)


async def test_a_healthy_store_passes_messages_straight_through(tmp_path: Path) -> None:
    worker, store = await _worker(tmp_path)
    _sink_from_another_thread(worker, _msg(3))
    await asyncio.sleep(0.05)
    assert worker.events.get_nowait().wa_id == "3A3"  # type: ignore[attr-defined]
    assert worker.inbound_hold.held == []
    _close(worker, store)


async def test_a_message_arriving_while_older_ones_are_held_waits_behind_them(
        tmp_path: Path) -> None:
    """The store answers again before the hold's retry: a new message must not be committed
    ahead of the older, held ones of its chat (turns follow the inbox's order)."""
    worker, store = await _worker(tmp_path)
    store.down = True
    _sink_from_another_thread(worker, _msg(1))
    store.down = False
    _sink_from_another_thread(worker, _msg(2))
    assert [m.wa_id for m in worker.inbound_hold.held] == ["3A1", "3A2"]
    assert store.pending_chats() == []
    worker.inbound_hold.next_try = 0.0
    worker.retry_held_inbound()
    assert [p.wa_id for p in store.pending_inbound("4915@s.whatsapp.net")] == ["3A1", "3A2"]
    _close(worker, store)


async def test_a_task_that_meets_a_store_outage_starts_again_and_the_worker_runs_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker, store = await _worker(tmp_path)
    monkeypatch.setattr(store, "is_outage", lambda exc: isinstance(exc, ConnectionError))
    runs: list[float] = []

    async def pump() -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) == 1:
            raise ConnectionError("server closed the connection unexpectedly")
        await worker.stop.wait()

    worker.task_factories = {"pump": pump}
    first = asyncio.create_task(pump(), name="pump")
    first.add_done_callback(worker._task_done)
    worker.tasks.append(first)
    for _ in range(60):
        if len(runs) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(runs) == 2, "the task was not started again"
    assert runs[1] - runs[0] >= 0.9  # after the backoff (1 s), not in a tight loop
    assert not worker.stop.is_set() and worker.exit_code == main.ExitCode.OK
    again = worker.tasks[0]
    assert again is not first and not again.done()
    worker.stop.set()
    await again
    _close(worker, store)


async def test_any_other_task_failure_still_stops_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker, store = await _worker(tmp_path)
    monkeypatch.setattr(store, "is_outage", lambda exc: isinstance(exc, ConnectionError))

    async def pump() -> None:
        raise RuntimeError("a bug")

    worker.task_factories = {"pump": pump}
    task = asyncio.create_task(pump(), name="pump")
    task.add_done_callback(worker._task_done)
    worker.tasks.append(task)
    await asyncio.wait_for(worker.stop.wait(), 2)
    assert worker.exit_code == main.ExitCode.FAILURE
    _close(worker, store)


def test_a_worker_started_while_postgres_is_down_waits_for_it(
        postgres: Cluster, tmp_path: Path) -> None:
    """systemd restarted the worker while the server is down: it waits (the unit
    "activating", its start timeout extended, saying why) instead of exiting into the unit's
    start limit; the store opens once the server is back."""
    with psycopg.connect(postgres.conninfo(), autocommit=True) as admin:
        password = pg_roles.provision(admin, "waiter")
    role = account_role("waiter")
    target = PostgresTarget(postgres.url(role), role, password)
    told: list[str] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            postgres.start()

    postgres.stop()
    try:
        store = open_store(target, told.append, sleep)
    finally:
        if len(waits) < 3:
            postgres.start()
    assert waits == [1.0, 2.0, 4.0]  # backoff
    assert store.pending_chats() == []
    store.close()
    assert any(t.startswith("STATUS=waiting for the database (postgresql wa_waiter_")
               and "Connection refused" in t for t in told), told
    assert "EXTEND_TIMEOUT_USEC=31000000" in told
    assert password not in " ".join(told)


def test_a_store_that_cannot_open_for_another_reason_fails_at_once(tmp_path: Path) -> None:
    (tmp_path / "agent.db").mkdir()  # not a database file
    with pytest.raises(Exception, match=r"unable to open|not a database|directory"):
        open_store(tmp_path / "agent.db", lambda _t: None, lambda _s: pytest.fail("waited"))
