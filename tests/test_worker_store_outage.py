"""The worker's sink when the store refuses a message WhatsApp already acknowledged
(PostgreSQL down): the message is held, committed by the supervision's retry once the store
is back and then handled like any other; at shutdown what is still held is named."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from agent import main
from agent.main import Worker
from agent.store import Store
from agent.whatsapp import events as ev
from wabridge import config
from wabridge.config import with_overrides


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


async def test_at_shutdown_what_is_still_held_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker, store = await _worker(tmp_path)
    store.down = True
    _sink_from_another_thread(worker, _msg(7))
    await asyncio.sleep(0.05)
    said = Said()
    monkeypatch.setattr(main, "log", said)  # (the module's logger may be bound already)
    worker.retry_held_inbound(final=True)
    assert ("error", "store.inbound_lost", {"count": 1, "wa_ids": ["3A7"],
                                            "error": "server closed the connection "
                                                     "unexpectedly"}) in said.lines
    assert [m.wa_id for m in worker.inbound_hold.held] == ["3A7"]
    _close(worker, store)


async def test_a_healthy_store_passes_messages_straight_through(tmp_path: Path) -> None:
    worker, store = await _worker(tmp_path)
    _sink_from_another_thread(worker, _msg(3))
    await asyncio.sleep(0.05)
    assert worker.events.get_nowait().wa_id == "3A3"  # type: ignore[attr-defined]
    assert worker.inbound_hold.held == []
    _close(worker, store)
