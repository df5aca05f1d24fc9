"""The outbox and the engine's guards against real WhatsApp traffic, without Claude.

- :mod:`agent.delivery` (pure): backoff, what a refused send means, uncertain replies;
- ``Engine.deliver_pending`` over a real Store and a scripted backend: WhatsApp's id is kept,
  a refused reply is retried with backoff then failed and reported while the other chats (and
  the later replies of its own chat, after it) go on, a link that is down costs no attempt;
- a reply a crash left ``sending``: resent (at least once) or dropped (at most once) on a
  backend that picks its own ids; always resent on one that keeps ours (exactly once);
- the chat's disappearing timer reaches every reply and follows the chat's changes;
- the loop guard and bot senders, end to end through the chat loop (turns fail fast with the
  apology: no API key is configured, so no Claude process starts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from fakes.quiet_whatsapp import QuietWhatsApp
from structlog.testing import capture_logs

from agent import delivery
from agent.claude import ClaudeSettings
from agent.engine import Engine
from agent.pool import ClaudePool
from agent.store import Store
from agent.whatsapp.base import SendError
from agent.whatsapp.events import ChatExpiration, IncomingMessage, StreamError, Undecryptable
from wabridge.config import ConversationConfig, LimitsConfig

ALICE = "4915100000002@s.whatsapp.net"
BOB = "4915100000003@s.whatsapp.net"
CONV = ConversationConfig(debounce=0.0, apology="SORRY", send_attempts=3, send_retry_base=5.0)
LIMITS = LimitsConfig(daily_budget_usd=0.0, inbound_per_minute=0.0, send_gap=0.0,
                      send_jitter=0.0)

# --- pure decisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "base", "expected"),
    [(0, 5.0, 0.0), (1, 5.0, 5.0), (2, 5.0, 10.0), (3, 5.0, 20.0), (7, 5.0, 300.0),
     (1000, 5.0, 300.0), (3, 0.0, 0.0)],
)
def test_backoff(attempts: int, base: float, expected: float) -> None:
    assert delivery.backoff(attempts, base) == expected


@pytest.mark.parametrize(
    ("attempts", "connected", "max_attempts", "expected"),
    [
        (0, True, 3, delivery.AfterError("retry", 1, 105.0)),
        (1, True, 3, delivery.AfterError("retry", 2, 110.0)),
        (2, True, 3, delivery.AfterError("fail", 3, 100.0)),
        (0, True, 1, delivery.AfterError("fail", 1, 100.0)),
        # the link went down: no attempt counted, the pass waits for the link
        (2, False, 3, delivery.AfterError("wait", 2, 100.0)),
    ],
)
def test_after_send_error(attempts: int, connected: bool, max_attempts: int,
                          expected: delivery.AfterError) -> None:
    assert delivery.after_send_error(attempts, connected, 100.0, max_attempts=max_attempts,
                                     base=5.0) == expected


@pytest.mark.parametrize(
    ("honours", "setting", "expected"),
    [(True, "resend", "resend"), (True, "drop", "resend"), (False, "resend", "resend"),
     (False, "drop", "drop")],
)
def test_uncertain(honours: bool, setting: delivery.Uncertain, expected: str) -> None:
    assert delivery.uncertain(honours, setting) == expected


# --- the engine's outbox -------------------------------------------------------------------


@dataclass
class Sent:
    chat_id: str
    text: str
    msg_id: str | None
    expiration: int


@dataclass
class ScriptedWhatsApp(QuietWhatsApp):
    """Returns ids of its own (like neonize) unless ``keeps_ids``; refuses texts in
    ``refuse``; ``connected`` can drop."""

    name: str = "scripted"
    keeps_ids: bool = False
    connected: bool = True
    refuse: set[str] = field(default_factory=set)
    drop_link_on: set[str] = field(default_factory=set)
    sent: list[Sent] = field(default_factory=list)
    tries: list[str] = field(default_factory=list)

    @property
    def honours_message_id(self) -> bool:  # type: ignore[override]
        return self.keeps_ids

    async def send_text(self, chat_id: str, text: str, *, quote: IncomingMessage | None,
                        msg_id: str | None = None, expiration: int = 0) -> str:
        self.tries.append(text)
        if text in self.drop_link_on:
            self.connected = False
            raise SendError("WhatsApp is not connected")
        if text in self.refuse:
            raise SendError(f"server returned error 479 for {text}")
        self.sent.append(Sent(chat_id, text, msg_id, expiration))
        return (msg_id or "") if self.keeps_ids else f"3EB0WA{len(self.sent):04d}"

    def is_connected(self) -> bool:
        return self.connected


class Rig:
    def __init__(self, root: Path, wa: ScriptedWhatsApp | None = None,
                 conv: ConversationConfig = CONV) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.now = [1_000_000.0]
        self.store = Store(root / "agent.db")
        self.wa = wa or ScriptedWhatsApp()
        self.problems: list[tuple[str, str]] = []
        self.reports: list[tuple[str, ...]] = []
        settings = ClaudeSettings(cli_path=root / "no-claude", model=None, system_prompt=None)
        self.pool = ClaudePool(1, 60.0, settings, root, self.store)
        self.engine = Engine(self.store, self.wa, self.pool, conv,
                             lambda *a: self.reports.append(a), limits=LIMITS,
                             on_problem=lambda code, text: self.problems.append((code, text)),
                             clock=lambda: self.now[0])

    def queue(self, chat: str, *texts: str) -> list[int]:
        return [r.id for r in self.store.complete_turn(chat, [], list(texts), None)]

    def sent(self, chat: str | None = None) -> list[str]:
        return [s.text for s in self.wa.sent if chat is None or s.chat_id == chat]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig(tmp_path / "user")
    yield made
    await made.engine.drain(0.5)
    made.store.close()


async def test_the_id_whatsapp_returned_is_stored_logged_and_reported(rig: Rig) -> None:
    (reply_id,) = rig.queue(ALICE, "hello")
    chosen = rig.store.reply_state(reply_id)[2]
    with capture_logs() as logs:
        await rig.engine.deliver_pending()
    state, error, wa_id, _ = rig.store.reply_state(reply_id)
    assert (state, error, wa_id) == ("sent", None, "3EB0WA0001")
    assert wa_id != chosen  # the library picked it; ours never reached WhatsApp
    delivered = [e for e in logs if e["event"] == "outbox.delivered"]
    assert [e["wa_id"] for e in delivered] == ["3EB0WA0001"]
    assert rig.reports == [("out", ALICE, "me", "hello", "3EB0WA0001")]
    assert rig.store.is_own_reply("3EB0WA0001")  # its echo is recognised


async def test_a_refused_reply_is_retried_then_failed_and_the_rest_goes_on(rig: Rig) -> None:
    rig.wa.refuse = {"a1"}
    a1, a2 = rig.queue(ALICE, "a1", "a2")
    rig.queue(BOB, "b1")
    with capture_logs() as logs:
        await rig.engine.deliver_pending()
        # a1 waits for its retry; a2 may not overtake it; bob's chat is not held up
        assert rig.sent() == ["b1"]
        assert rig.store.reply_state(a1)[0] == "pending"
        await rig.engine.deliver_pending()  # not due yet: no new try
        assert rig.wa.tries.count("a1") == 1
        rig.now[0] += 5.0
        await rig.engine.deliver_pending()
        assert rig.wa.tries.count("a1") == 2
        rig.now[0] += 9.0  # the second wait is 10 s
        await rig.engine.deliver_pending()
        assert rig.wa.tries.count("a1") == 2
        rig.now[0] += 1.0
        await rig.engine.deliver_pending()  # third and last try: failed, then a2 goes
    assert rig.wa.tries.count("a1") == 3
    state, error, _, attempts = rig.store.reply_state(a1)
    assert (state, attempts) == ("failed", 3)
    assert error is not None and "479" in error
    assert rig.sent() == ["b1", "a2"]
    assert rig.store.reply_state(a2)[0] == "sent"
    assert [c for c, _ in rig.problems] == ["reply_failed"]
    assert ALICE in rig.problems[0][1] and "479" in rig.problems[0][1]
    assert [e["event"] for e in logs if e["event"].startswith("outbox.f")] == ["outbox.failed"]
    assert rig.store.totals()["replies_failed"] == 1


async def test_a_link_that_goes_down_costs_no_attempt(rig: Rig) -> None:
    rig.wa.drop_link_on = {"first"}
    (reply_id,) = rig.queue(ALICE, "first")
    await rig.engine.deliver_pending()
    assert rig.store.reply_state(reply_id)[0::3] == ("pending", 0)
    rig.wa.drop_link_on.clear()
    rig.wa.connected = True
    await rig.engine.deliver_pending()
    assert rig.sent() == ["first"]


@pytest.mark.parametrize(
    ("keeps_ids", "setting", "resent", "counted"),
    [
        (False, "resend", True, 1),  # neonize default: at least once
        (False, "drop", False, 1),  # neonize with drop: at most once
        (True, "drop", True, 0),  # the simulator: same id again, exactly once
    ],
)
async def test_a_reply_a_crash_left_sending(tmp_path: Path, keeps_ids: bool, setting: str,
                                            resent: bool, counted: int) -> None:
    first = Rig(tmp_path / "u")
    (reply_id,) = first.queue(ALICE, "maybe sent")
    first.store.mark_sending(reply_id)  # the library call was under way: then the crash
    first.store.close()
    with capture_logs() as logs:
        second = Rig(tmp_path / "u", ScriptedWhatsApp(keeps_ids=keeps_ids),
                     conv=replace(CONV, uncertain_replies=setting))
    try:
        assert [(e["event"], e["action"]) for e in logs if e["event"] == "outbox.uncertain"] \
            == [("outbox.uncertain", "resend" if resent else "drop")]
        await second.engine.deliver_pending()
        assert second.sent() == (["maybe sent"] if resent else [])
        assert second.store.reply_state(reply_id)[0] == ("sent" if resent else "dropped")
        assert second.store.counters().get("uncertain_replies", 0) == counted
        if keeps_ids:
            assert second.wa.sent[0].msg_id == second.store.reply_state(reply_id)[2]
    finally:
        second.store.close()


def message(text: str, *, sender: str = ALICE, chat: str | None = None, wa_id: str = "",
            expiration: int | None = None) -> IncomingMessage:
    return IncomingMessage(wa_id=wa_id or f"IN{time.monotonic_ns()}", chat_id=chat or sender,
                           sender=sender, text=text, timestamp=time.time(),
                           expiration=expiration)


async def test_replies_carry_the_chats_disappearing_timer(rig: Rig) -> None:
    rig.engine.persist(message("hi", expiration=604800))
    rig.queue(ALICE, "reply one")
    rig.queue(BOB, "bob's chat never disappears")
    await rig.engine.deliver_pending()
    rig.engine.persist(message("no context: says nothing about the timer"))
    rig.queue(ALICE, "reply two")
    await rig.engine.deliver_pending()
    rig.engine.observe(ChatExpiration(chat_id=ALICE, seconds=0))  # the user turned it off
    rig.queue(ALICE, "reply three")
    await rig.engine.deliver_pending()
    assert [(s.text, s.expiration) for s in rig.wa.sent] == [
        ("reply one", 604800), ("bob's chat never disappears", 0), ("reply two", 604800),
        ("reply three", 0)]


async def test_undecryptable_messages_are_counted_and_reported(rig: Rig) -> None:
    rig.engine.observe(Undecryptable(chat_id=ALICE, sender=ALICE, wa_id="X1"))
    rig.engine.observe(StreamError(code="515"))
    assert rig.store.counters() == {"undecryptable": 1, "stream_errors": 1}
    assert [c for c, _ in rig.problems] == ["undecryptable"]
    assert "send it again" in rig.problems[0][1]


# --- the chat loop: bots and the loop guard ------------------------------------------------


async def until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)  # every turn: the apology, fast
    made = Rig(tmp_path / "live", conv=replace(CONV, loop_max_turns=3, loop_window=600.0))
    made.engine.set_owner("4915100000001")
    stop = asyncio.Event()
    sender = asyncio.create_task(made.engine.deliver_forever(stop))
    yield made
    await made.engine.drain(0.5)
    stop.set()
    await asyncio.gather(sender, return_exceptions=True)
    made.store.close()


def say(rig: Rig, msg: IncomingMessage) -> IncomingMessage:
    assert rig.engine.persist(msg)
    rig.engine.wake_chat(msg.chat_id)
    return msg


async def test_a_chat_looping_faster_than_a_human_is_stopped_and_reported(live: Rig) -> None:
    bot_like = "4915100000009@s.whatsapp.net"
    with capture_logs() as logs:
        for n in range(3):
            say(live, message(f"turn {n}", sender=bot_like))
            await until(lambda n=n: len(live.sent(bot_like)) == n + 1, f"reply {n}")
        fourth = say(live, message("turn 3", sender=bot_like))
        await until(lambda: live.store.inbound_state(bot_like, fourth.wa_id) is not None
                    and live.store.inbound_state(bot_like, fourth.wa_id)[0] != "pending",
                    "the fourth message decided")
        fifth = say(live, message("turn 4", sender=bot_like))
        await until(lambda: live.store.inbound_state(bot_like, fifth.wa_id)[0] != "pending",
                    "the fifth message decided")
    assert live.store.inbound_state(bot_like, fourth.wa_id) == ("skipped", "bot_loop")
    assert live.store.inbound_state(bot_like, fifth.wa_id) == ("skipped", "bot_loop")
    assert live.sent(bot_like) == ["SORRY"] * 3
    assert [c for c, _ in live.problems] == ["bot_loop"]  # reported once, not per message
    assert [e["event"] for e in logs if e["event"] == "chat.loop_stopped"] == \
        ["chat.loop_stopped"]
    # another chat is not affected
    say(live, message("hello", sender=BOB))
    await until(lambda: live.sent(BOB) == ["SORRY"], "bob answered")


async def test_meta_ai_is_never_answered(live: Rig) -> None:
    meta_ai = "13135550002@s.whatsapp.net"
    first = say(live, message("Hi! I'm Meta AI. How can I help?", sender=meta_ai))
    bot = say(live, message("beep", sender="867051314767696@bot"))
    await until(lambda: live.store.inbound_state(meta_ai, first.wa_id)[0] != "pending"
                and live.store.inbound_state(bot.chat_id, bot.wa_id)[0] != "pending",
                "bot messages decided")
    assert live.store.inbound_state(meta_ai, first.wa_id) == ("skipped", "bot")
    assert live.store.inbound_state(bot.chat_id, bot.wa_id) == ("skipped", "bot")
    await asyncio.sleep(0.1)
    assert live.wa.sent == []


async def test_whitespace_only_runs_no_turn(live: Rig) -> None:
    blank = say(live, message(" \n "))
    await until(lambda: live.store.inbound_state(ALICE, blank.wa_id)[0] != "pending", "decided")
    assert live.store.inbound_state(ALICE, blank.wa_id) == ("skipped", "empty")
    await asyncio.sleep(0.1)
    assert live.wa.sent == []
