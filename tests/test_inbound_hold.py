"""agent.inbound_hold: acknowledged messages the store refused are kept and committed later,
in order, with backoff; nothing is dropped while the store is down."""

from __future__ import annotations

import pytest

from agent.inbound_hold import InboundHold, next_delay
from agent.whatsapp.events import IncomingMessage


def _msg(n: int) -> IncomingMessage:
    return IncomingMessage(wa_id=f"W{n}", chat_id="c", sender="c", text=str(n), timestamp=1.0)


@pytest.mark.parametrize(("previous", "delay"), [(0.0, 1.0), (1.0, 2.0), (16.0, 30.0),
                                                 (30.0, 30.0)])
def test_backoff(previous: float, delay: float) -> None:
    assert next_delay(previous) == delay


class FlakyStore:
    def __init__(self) -> None:
        self.up = False
        self.rows: list[str] = []

    def persist(self, message: IncomingMessage) -> bool:
        if not self.up:
            raise ConnectionError("server closed the connection")
        if message.wa_id in self.rows:
            return False
        self.rows.append(message.wa_id)
        return True


def test_held_messages_are_committed_in_order_once_the_store_is_back() -> None:
    store, hold = FlakyStore(), InboundHold()
    hold.hold(_msg(1), now=100.0)
    hold.hold(_msg(2), now=100.5)
    assert hold.retry(store.persist, now=100.5) == ([], None)  # not before the backoff
    committed, error = hold.retry(store.persist, now=101.0)
    assert committed == [] and isinstance(error, ConnectionError)
    assert hold.next_try == 103.0  # 2 s after the second failure
    assert [m.wa_id for m in hold.held] == ["W1", "W2"]  # nothing dropped
    store.up = True
    store.rows.append("W2")  # (already committed by an earlier, half-seen attempt)
    committed, error = hold.retry(store.persist, now=103.0)
    assert [m.wa_id for m in committed] == ["W1"] and error is None  # a duplicate is no turn
    assert store.rows == ["W2", "W1"] and hold.held == [] and hold.next_try == 0.0


def test_a_forced_retry_at_shutdown_ignores_the_backoff() -> None:
    store, hold = FlakyStore(), InboundHold()
    hold.hold(_msg(1), now=100.0)
    store.up = True
    committed, _ = hold.retry(store.persist, now=100.1, force=True)
    assert [m.wa_id for m in committed] == ["W1"]


def test_a_store_failing_midway_keeps_the_rest() -> None:
    calls: list[str] = []

    def persist(message: IncomingMessage) -> bool:
        calls.append(message.wa_id)
        if message.wa_id == "W2":
            raise OSError("gone again")
        return True

    hold = InboundHold()
    for n in (1, 2, 3):
        hold.hold(_msg(n), now=0.0)
    committed, error = hold.retry(persist, now=5.0)
    assert [m.wa_id for m in committed] == ["W1"] and isinstance(error, OSError)
    assert [m.wa_id for m in hold.held] == ["W2", "W3"] and calls == ["W1", "W2"]
