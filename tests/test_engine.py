"""agent.engine.Engine end to end: a real Store, the real Claude Code CLI against the fake
Messages API, and an in-memory WhatsApp backend.

Each test builds one or more :class:`Rig` (engine + pool + store + fake WhatsApp in its own
state directory) and feeds messages the way the worker's sink and pump do
(``Engine.persist`` then ``Engine.wake_chat``).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fakes.anthropic_api import (  # tests/ is on sys.path (no tests/__init__.py)
    FakeAnthropicAPI,
    RecordedRequest,
    Reply,
    default_responder,
    last_user_text,
)
from fakes.quiet_whatsapp import QuietWhatsApp
from structlog.testing import capture_logs

from agent import commands, rotation
from agent.claude import ClaudeSettings
from agent.claude_api import ApiConversations, ApiSettings
from agent.engine import BUDGET_NOTICE, SLOW_DOWN_NOTICE, Engine
from agent.policy import EngineName
from agent.pool import ClaudePool, transcript_path
from agent.store import Store
from agent.transcription import TranscriptionSettings, transcribe
from agent.whatsapp.base import SendError
from agent.whatsapp.events import IncomingMessage
from wabridge.claude_cli import bundled_cli
from wabridge.config import ConversationConfig, LimitsConfig
from wabridge.prices import Price

CLI = bundled_cli()
if CLI is not None and not CLI.is_file():
    CLI = None
pytestmark = [
    pytest.mark.claude,
    pytest.mark.timeout(60),
    pytest.mark.skipif(CLI is None, reason="claude-agent-sdk's bundled CLI missing"),
]

OWNER = "4915100000001"
ALICE = "4915100000002"
BOB = "4915100000003"
GROUP = "120363000000000001@g.us"

CONV = ConversationConfig(debounce=0.05, max_batch=20, reply_limit=4000,
                          apology="SORRY-APOLOGY", rotate_at=0.7, rotate_after_turns=50,
                          recovery_messages=10, resume_max_bytes=10_000_000)
API_PRICE = Price(3.0, 15.0)  # the api engine's model in these tests, USD per million tokens
LIMITS = LimitsConfig(daily_budget_usd=0.0, inbound_per_minute=0.0, inbound_burst=5,
                      send_gap=0.0, send_jitter=0.0)


def jid(phone: str) -> str:
    return f"{phone}@s.whatsapp.net"


# --- the in-memory WhatsApp backend --------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    chat_id: str
    text: str
    quote: IncomingMessage | None
    msg_id: str | None
    at: float


@dataclass
class FakeWhatsApp(QuietWhatsApp):
    name: str = "fake"
    connected: bool = True
    sent: list[Sent] = field(default_factory=list)

    async def send_text(self, chat_id: str, text: str, *, quote: IncomingMessage | None,
                        msg_id: str | None = None, expiration: int = 0) -> str:
        if not self.connected:
            raise SendError("not connected")
        self.sent.append(Sent(chat_id, text, quote, msg_id, time.monotonic()))
        return msg_id or f"OUT{len(self.sent)}"

    def is_connected(self) -> bool:
        return self.connected

    def to(self, chat_id: str) -> list[str]:
        return [s.text for s in self.sent if s.chat_id == chat_id]


# --- the rig -------------------------------------------------------------------------------

_ids = itertools.count(1)


class Rig:
    def __init__(self, root: Path, api: FakeAnthropicAPI, *, pool_size: int = 4,
                 idle_timeout: float = 600.0, turn_timeout: float = 20.0,
                 resume_max_bytes: int = 10_000_000, conv: ConversationConfig = CONV,
                 limits: LimitsConfig = LIMITS, clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = lambda: 0.0, engine: EngineName = "cli",
                 api_key: str | None = "sk-ant-test", models_allowed: tuple[str, ...] = (),
                 transcription: TranscriptionSettings | None = None) -> None:
        assert CLI is not None
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.store = Store(root / "agent.db")
        self.wa = FakeWhatsApp()
        settings = ClaudeSettings(
            cli_path=CLI, model=None, system_prompt="You answer WhatsApp messages.",
            turn_timeout=turn_timeout,
            extra_env={"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "sk-ant-test"},
        )
        self.pool = ClaudePool(pool_size, idle_timeout, settings, root, self.store,
                               resume_max_bytes=resume_max_bytes)
        self.api = ApiConversations(
            ApiSettings(model="claude-test", price=API_PRICE,
                        system_prompt="You answer WhatsApp messages.", max_tokens=1024,
                        turn_timeout=turn_timeout, api_key=api_key,
                        base_url=api.base_url), self.store)
        self.summaries: list[tuple[str, int, str]] = []
        self.reports: list[tuple[str, str, str, str, str]] = []
        self.engine = Engine(
            self.store, self.wa, self.pool, conv,
            lambda *a: self.reports.append(a), limits=limits, context_window=200_000,
            model="test-model", on_summary=lambda *a: self.summaries.append(a), clock=clock,
            rng=rng, api=self.api, engine=engine,
            system_prompt="You answer WhatsApp messages.", models_allowed=models_allowed,
            transcribe=(None if transcription is None
                        else functools.partial(transcribe, settings=transcription)),
        )
        self._stop = asyncio.Event()
        self._deliver: asyncio.Task[None] | None = None
        self.closed = False

    async def start(self, owner: str = OWNER) -> Rig:
        self.engine.set_owner(owner)
        self._deliver = asyncio.create_task(self.engine.deliver_forever(self._stop))
        self.engine.resume_pending()
        return self

    def incoming(self, text: str, *, sender: str = ALICE, chat: str | None = None,
                 group: bool = False, from_me: bool = False, mentioned: bool = False) -> str:
        wa_id = f"IN{next(_ids):06d}"
        msg = IncomingMessage(
            wa_id=wa_id, chat_id=chat or (GROUP if group else jid(sender)), sender=jid(sender),
            text=text, timestamp=time.time(), sender_name=f"name-{sender[-1]}", is_group=group,
            from_me=from_me, mentioned=mentioned,
        )
        assert self.engine.persist(msg)
        self.engine.wake_chat(msg.chat_id)
        return wa_id

    async def wait_sent(self, n: int, chat: str | None = None, timeout: float = 20.0
                        ) -> list[str]:
        def got() -> list[str]:
            return [s.text for s in self.wa.sent if chat is None or s.chat_id == chat]

        await until(lambda: len(got()) >= n, timeout, f"{n} messages sent to {chat}: {got()}")
        return got()

    async def idle(self, timeout: float = 20.0) -> None:
        """Until no message is pending and the outbox is empty."""
        await until(lambda: not self.store.pending_chats() and not self.store.pending_replies()
                    and not self.engine.turns_in_flight, timeout, "engine idle")

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.engine.drain(1.0)
        await self.engine.close_conversations()
        self._stop.set()
        if self._deliver is not None:
            self._deliver.cancel()
            await asyncio.gather(self._deliver, return_exceptions=True)
        self.store.close()


async def until(pred: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def api() -> Any:
    with FakeAnthropicAPI() as fake:
        yield fake


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
def engine() -> str:
    """The Claude engine rigs use (tests/test_claude_engines.py runs both)."""
    return "cli"


@pytest_asyncio.fixture
async def make_rig(tmp_path: Path, api: FakeAnthropicAPI, engine: EngineName
                   ) -> AsyncIterator[MakeRig]:
    made: list[Rig] = []

    async def make(name: str = "user1", **kwargs: Any) -> Rig:
        owner = kwargs.pop("owner", OWNER)
        kwargs.setdefault("engine", engine)
        rig = Rig(tmp_path / name, api, **kwargs)
        made.append(rig)
        return await rig.start(owner)

    yield make
    for rig in made:
        await rig.close()
    assert _cli_processes(tmp_path) == []


def _cli_processes(root: Path) -> list[int]:
    """Live CLI processes working under ``root`` (their cwd is a chat's directory)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if str(CLI).encode() not in (entry / "cmdline").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if state != "Z" and cwd.startswith(str(root)):
            out.append(int(entry.name))
    return out


def texts(req: RecordedRequest) -> str:
    return "\n".join(FakeAnthropicAPI.all_texts(req))


def turn_requests(api: FakeAnthropicAPI) -> list[RecordedRequest]:
    """Conversation turns, without our rotation summary turns."""
    return [r for r in api.message_requests()
            if "[wabridge]" not in last_user_text(r.json)]


def session_of(req: RecordedRequest) -> str:
    return req.headers.get("x-claude-code-session-id", "")


# --- burst debounce ------------------------------------------------------------------------


async def test_burst_is_one_turn_and_messages_during_a_turn_go_to_the_next(
    make_rig: MakeRig, api: FakeAnthropicAPI
) -> None:
    rig = await make_rig(conv=replace(CONV, debounce=0.4))
    for word in ("one-ALPHA", "two-BRAVO", "three-CHARLIE"):
        rig.incoming(word)
    sent = await rig.wait_sent(1)
    await asyncio.sleep(0.3)
    assert len(api.message_requests()) == 1
    last = last_user_text(api.message_requests()[0].json)
    assert all(w in last for w in ("one-ALPHA", "two-BRAVO", "three-CHARLIE"))
    assert len(sent) == 1 and "three-CHARLIE" in sent[0]

    # a slow turn: what arrives meanwhile is answered by the next turn, together
    api.responder = lambda body: (Reply(text="slow answer", delay=1.5)
                                  if "SLOW" in last_user_text(body) else default_responder(body))
    rig.incoming("SLOW four")
    await until(lambda: len(api.message_requests()) == 2, 10, "the slow request")
    rig.incoming("five-ECHO")
    rig.incoming("six-FOXTROT")
    sent = await rig.wait_sent(3)
    assert sent[1] == "slow answer"
    reqs = api.message_requests()
    assert len(reqs) == 3
    assert "SLOW four" in last_user_text(reqs[1].json)
    assert "five-ECHO" not in texts(reqs[1])
    third = last_user_text(reqs[2].json)
    assert "five-ECHO" in third and "six-FOXTROT" in third and "SLOW" not in third


async def test_a_lone_message_starts_its_turn_without_the_whole_debounce(
    make_rig: MakeRig, api: FakeAnthropicAPI
) -> None:
    # a long debounce: before conversation.settle every reply waited all of it
    rig = await make_rig(conv=replace(CONV, debounce=6.0, settle=0.2))
    started = time.monotonic()
    rig.incoming("hello-LONE")
    await until(lambda: len(api.message_requests()) == 1, 5.5, "the turn's request")
    assert time.monotonic() - started < 5.0
    # a burst (messages milliseconds apart, as pasted or delivered together) is one turn
    await rig.wait_sent(1)
    for word in ("one-GOLF", "two-HOTEL"):
        rig.incoming(word)
    await rig.wait_sent(2)
    assert len(api.message_requests()) == 2
    assert all(w in last_user_text(api.message_requests()[1].json) for w in ("GOLF", "HOTEL"))


# --- who gets answered ---------------------------------------------------------------------


async def test_policy_decides_and_skipped_messages_are_kept(
    make_rig: MakeRig, api: FakeAnthropicAPI
) -> None:
    rig = await make_rig()
    assert rig.engine.update_settings({"reply_to": "allowlist", "allowlist": [f"+{ALICE}"],
                                       "backend": "sim"}) is None
    bob = rig.incoming("hello from bob", sender=BOB)
    own = rig.incoming("I typed this myself", sender=OWNER, chat=jid(BOB), from_me=True)
    quiet = rig.incoming("group chatter", sender=ALICE, group=True)
    rig.incoming("hello from alice")
    rig.incoming("@bot question", sender=ALICE, group=True, mentioned=True)
    await rig.wait_sent(1, jid(ALICE))
    await rig.wait_sent(1, GROUP)
    await rig.idle()
    assert rig.store.inbound_state(jid(BOB), bob) == ("skipped", "not_allowlisted")
    assert rig.store.inbound_state(jid(BOB), own) == ("skipped", "from_me")
    assert rig.store.inbound_state(GROUP, quiet) == ("skipped", "not_mentioned")
    asked = "\n".join(texts(r) for r in api.message_requests())
    assert "hello from alice" in asked and "@bot question" in asked
    assert "bob" not in asked and "myself" not in asked and "chatter" not in asked
    assert rig.wa.to(jid(BOB)) == []
    assert len(api.message_requests()) == 2

    # a bad value keeps the previous policy and says which key
    with capture_logs() as logs:
        error = rig.engine.update_settings({"reply_to": "allowlist", "groups": "sometimes"})
    assert error is not None and error.key == "settings.groups"
    assert any(e["event"] == "policy.invalid" and e["key"] == "settings.groups" for e in logs)
    assert rig.engine.policy.allowlist == frozenset({ALICE})
    rig.incoming("bob again", sender=BOB)
    await rig.idle()
    assert rig.wa.to(jid(BOB)) == []


async def test_self_mode_answers_only_the_owners_own_chat(
    make_rig: MakeRig, api: FakeAnthropicAPI
) -> None:
    rig = await make_rig()
    rig.engine.update_settings({"reply_to": "self"})
    alice = rig.incoming("hi from alice")
    rig.incoming("note to self: buy milk", sender=OWNER, chat=jid(OWNER), from_me=True)
    sent = await rig.wait_sent(1, jid(OWNER))
    await rig.idle()
    assert "buy milk" in sent[0]
    assert rig.store.inbound_state(jid(ALICE), alice) == ("skipped", "not_self_chat")
    assert len(api.message_requests()) == 1
    # our own reply echoed back into the self chat is not a question
    (out,) = [s for s in rig.wa.sent if s.chat_id == jid(OWNER)]
    assert out.msg_id is not None
    echo = IncomingMessage(wa_id=out.msg_id, chat_id=jid(OWNER), sender=jid(OWNER),
                           text=out.text, timestamp=time.time(), from_me=True)
    assert rig.engine.persist(echo)
    rig.engine.wake_chat(jid(OWNER))
    await rig.idle()
    assert rig.store.inbound_state(jid(OWNER), out.msg_id) == ("skipped", "own_reply")
    assert len(api.message_requests()) == 1


async def test_turns_wait_until_the_owner_is_known(tmp_path: Path, api: FakeAnthropicAPI
                                                   ) -> None:
    rig = Rig(tmp_path / "u", api)
    try:
        rig._deliver = asyncio.create_task(rig.engine.deliver_forever(rig._stop))
        rig.engine.update_settings({"reply_to": "self"})
        rig.incoming("note to self", sender=OWNER, chat=jid(OWNER), from_me=True)
        await asyncio.sleep(0.5)
        assert rig.wa.sent == [] and api.message_requests() == []
        assert rig.store.pending_chats() == [jid(OWNER)]  # not skipped for want of an owner
        rig.engine.set_owner(OWNER)
        await rig.wait_sent(1, jid(OWNER))
    finally:
        await rig.close()


# --- commands ------------------------------------------------------------------------------


async def test_commands_are_answered_without_claude(make_rig: MakeRig,
                                                    api: FakeAnthropicAPI) -> None:
    rig = await make_rig()
    chat = jid(ALICE)
    rig.incoming("remember PELICAN")
    await rig.wait_sent(1, chat)
    pid = rig.pool.pid(chat)
    assert pid is not None
    before = len(api.message_requests())
    # the owner typing a command into the contact's chat: not answered there (the contact
    # would see it), no turn either
    typed = rig.incoming("/status", sender=OWNER, chat=chat, from_me=True)
    await rig.idle()
    assert rig.store.inbound_state(chat, typed) == ("skipped", "command_in_chat")
    assert len(rig.wa.to(chat)) == 1
    rig.engine.update_settings({"commands_from": "everyone"})
    rig.incoming("/status")
    rig.incoming("/help")
    rig.incoming("/frobnicate")
    sent = await rig.wait_sent(4, chat)
    status, help_, unknown = sent[1:4]
    assert "Turns: 1 in this conversation, 1 in this chat" in status
    assert "Model: test-model" in status
    assert re.search(r"Context used: [\d,]+ of 200,000 tokens", status)
    assert "Cost today: $0.0" in status and "no daily budget" in status
    assert help_ == commands.HELP_TEXT
    assert unknown.startswith("Unknown command /frobnicate.") and commands.HELP_TEXT in unknown
    assert len(api.message_requests()) == before  # no Claude turn for any of them

    # a contact's "/reset" is an ordinary message (commands_from = owner)
    rig.engine.update_settings({})
    rig.incoming("/reset")
    sent = await rig.wait_sent(5, chat)
    assert len(api.message_requests()) == before + 1
    assert "PELICAN" in texts(api.message_requests()[-1])  # same conversation

    # /reset: process closed, session forgotten, next turn starts afresh
    rig.engine.update_settings({"commands_from": "everyone"})
    rig.incoming("/reset")
    sent = await rig.wait_sent(6, chat)
    assert sent[5] == commands.RESET_TEXT
    assert not Path(f"/proc/{pid}").exists()
    row = rig.store.chat(chat)
    assert row is not None and row.session_id is None and row.session_turns == 0
    rig.incoming("what did I ask you to remember?")
    await rig.wait_sent(7, chat)
    last = api.message_requests()[-1]
    assert "PELICAN" not in texts(last)
    assert session_of(last) != session_of(api.message_requests()[0])


async def test_commands_from_everyone_and_command_order(make_rig: MakeRig,
                                                        api: FakeAnthropicAPI) -> None:
    rig = await make_rig(conv=replace(CONV, debounce=0.3))
    rig.engine.update_settings({"commands_from": "everyone"})
    chat = jid(BOB)
    rig.incoming("first-question", sender=BOB)
    rig.incoming("/help", sender=BOB)
    rig.incoming("second-question", sender=BOB)
    sent = await rig.wait_sent(3, chat)
    # in order: the turn before the command, the command, the turn after it
    assert "first-question" in sent[0] and "second-question" not in sent[0]
    assert sent[1] == commands.HELP_TEXT
    assert "second-question" in sent[2]
    assert len(api.message_requests()) == 2


# --- context rotation ----------------------------------------------------------------------

SUMMARY = "SUMMARY-V1: the user's code word is PELICAN and they like tea."


def rotating_responder(body: Any) -> str | Reply:
    said = last_user_text(body)
    if "[wabridge]" in said:
        return SUMMARY
    if "BIG" in said:
        return Reply(text=f"echo: {said}", input_tokens=150_000)  # 75% of the window
    return default_responder(body)


async def test_rotation_at_the_context_threshold(make_rig: MakeRig,
                                                 api: FakeAnthropicAPI) -> None:
    api.responder = rotating_responder
    rig = await make_rig()
    chat = jid(ALICE)
    rig.incoming("the code word is PELICAN")
    await rig.wait_sent(1, chat)
    old_pid = rig.pool.pid(chat)
    rig.incoming("BIG question about tea")
    await rig.wait_sent(2, chat)
    await until(lambda: bool(rig.summaries), 15, "the summary")
    assert rig.summaries == [(chat, 1, SUMMARY)]
    (summary,) = rig.store.summaries(chat)
    assert (summary.number, summary.text, summary.archived) == (1, SUMMARY, False)
    row = rig.store.chat(chat)
    assert row is not None and row.session_id is None and row.seed == "summary"
    assert old_pid is not None and not Path(f"/proc/{old_pid}").exists()
    old_session = session_of(api.message_requests()[0])
    await asyncio.sleep(0.2)
    assert all("SUMMARY" not in t for t in rig.wa.to(chat))  # the summary is not sent

    rig.incoming("what was the code word?")
    await rig.wait_sent(3, chat)
    new = turn_requests(api)[-1]
    assert session_of(new) != old_session
    body = texts(new)
    assert SUMMARY in body and rotation.SUMMARY_HEADER in body
    assert "what was the code word?" in body
    assert "the code word is PELICAN" not in body and "BIG question" not in body
    row = rig.store.chat(chat)
    assert row is not None and row.seed is None and row.session_turns == 1

    # the next turn of the new session carries the seed once, as history
    rig.incoming("thanks")
    await rig.wait_sent(4, chat)
    after = turn_requests(api)[-1]
    assert session_of(after) == session_of(new)
    assert texts(after).count("SUMMARY-V1") == 2  # in the first user turn and its echo

    # /reset archives the summary: a later fresh session is not seeded with it
    rig.engine.update_settings({"commands_from": "everyone"})  # the contact's /reset
    rig.incoming("/reset")
    rig.incoming("hello again")
    await rig.wait_sent(6, chat)
    assert "SUMMARY-V1" not in texts(turn_requests(api)[-1])
    assert [s.archived for s in rig.store.summaries(chat)] == [True]


async def test_rotation_at_the_turn_cap(make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    api.responder = rotating_responder
    rig = await make_rig(conv=replace(CONV, rotate_after_turns=2))
    chat = jid(ALICE)
    for i, word in enumerate(["turn-one", "turn-two", "turn-three", "turn-four"], start=1):
        rig.incoming(word)
        await rig.wait_sent(i, chat)
    await until(lambda: len(rig.summaries) == 2, 15, "two summaries")
    assert [v for _, v, _ in rig.summaries] == [1, 2]
    third = next(r for r in turn_requests(api) if "turn-three" in last_user_text(r.json))
    assert "SUMMARY-V1" in texts(third)
    assert "turn-one" not in texts(third) and "turn-two" not in texts(third)
    assert len(api.message_requests()) == 6  # 4 turns + 2 summary turns


# --- recovery ------------------------------------------------------------------------------


async def _history_then_restart(make_rig: MakeRig, api: FakeAnthropicAPI, **restart: Any
                                ) -> tuple[Rig, str]:
    api.responder = rotating_responder
    rig = await make_rig("u", conv=replace(CONV, recovery_messages=4))
    chat = jid(ALICE)
    for i, word in enumerate(["BIG alpha", "bravo-2", "charlie-3", "delta-4"], start=1):
        rig.incoming(word)
        await rig.wait_sent(i, chat)
    await rig.idle()
    row = rig.store.chat(chat)
    assert row is not None and row.session_id is not None
    await rig.close()
    return await make_rig("u", conv=replace(CONV, recovery_messages=4), **restart), row.session_id


async def test_restart_resumes_the_stored_session(make_rig: MakeRig,
                                                  api: FakeAnthropicAPI) -> None:
    rig, session = await _history_then_restart(make_rig, api)
    rig.incoming("echo-5")
    await rig.wait_sent(1, jid(ALICE))
    last = turn_requests(api)[-1]
    assert session_of(last) == session
    assert "charlie-3" in texts(last) and "bravo-2" in texts(last)
    assert rotation.RECENT_HEADER not in texts(last)


async def test_resume_failed_starts_fresh_with_summary_and_recent_messages(
    make_rig: MakeRig, api: FakeAnthropicAPI, tmp_path: Path
) -> None:
    async def lose_transcript() -> tuple[Rig, str]:
        rig, session = await _history_then_restart(make_rig, api)
        path = transcript_path(rig.pool.config_dir, session)
        assert path is not None and path.parent.parent.name == "projects"
        path.unlink()
        return rig, session

    rig, session = await lose_transcript()
    with capture_logs() as logs:
        rig.incoming("echo-5")
        await rig.wait_sent(1, jid(ALICE))
    assert any(e["event"] == "claude.resume_failed" for e in logs)
    last = turn_requests(api)[-1]
    assert session_of(last) != session
    body = texts(last)
    assert "SUMMARY-V1" in body  # the latest summary
    # and the last 4 stored messages: charlie and its reply, delta and its reply
    assert rotation.RECENT_HEADER in body
    assert "User: charlie-3" in body and "User: delta-4" in body
    assert "User: bravo-2" not in body and "alpha" not in body
    assert "You: echo: delta-4" in body
    assert body.index("User: charlie-3") < body.index("User: delta-4") < body.index("echo-5")
    row = rig.store.chat(jid(ALICE))
    assert row is not None and row.session_id == session_of(last) and row.seed is None


async def test_transcript_too_large_is_not_resumed(make_rig: MakeRig,
                                                   api: FakeAnthropicAPI) -> None:
    rig, session = await _history_then_restart(make_rig, api, resume_max_bytes=1000)
    with capture_logs() as logs:
        rig.incoming("echo-5")
        await rig.wait_sent(1, jid(ALICE))
    assert any(e["event"] == "claude.transcript_too_large" for e in logs)
    last = turn_requests(api)[-1]
    assert session_of(last) != session
    assert "SUMMARY-V1" in texts(last) and "User: delta-4" in texts(last)


# --- the pool ------------------------------------------------------------------------------


async def test_pool_never_exceeds_its_size_and_resumes_evicted_chats(
    make_rig: MakeRig, api: FakeAnthropicAPI, tmp_path: Path
) -> None:
    rig = await make_rig(pool_size=2)
    seen: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            seen.append(len(_cli_processes(tmp_path)))
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    a, b, c = jid(ALICE), jid(BOB), jid("4915100000004")
    # three chats at once: one must wait for a slot
    for phone in (ALICE, BOB, "4915100000004"):
        rig.incoming(f"first from {phone}", sender=phone)
    for chat in (a, b, c):
        await rig.wait_sent(1, chat)
    await rig.idle()
    # now in sequence: the least recently used idle one is closed
    rig.incoming("second from a", sender=ALICE)
    await rig.wait_sent(2, a)
    await rig.idle()
    live = {chat for chat in (a, b, c) if rig.pool.pid(chat) is not None}
    assert len(live) == 2 and a in live
    evicted = ({b, c} - live).pop()
    evicted_phone = BOB if evicted == b else "4915100000004"
    rig.incoming("second from evicted", sender=evicted_phone)
    await rig.wait_sent(2, evicted)
    done.set()
    await sampler
    assert max(seen) <= 2 and rig.pool.peak == 2
    # resumed, not restarted: the evicted chat's request carries its first turn
    last = api.message_requests()[-1]
    assert f"first from {evicted_phone}" in texts(last)
    assert sum(1 for r in api.message_requests() if session_of(r) == session_of(last)) == 2


async def test_closing_an_evicted_process_holds_up_no_other_chat(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    """Eviction closes the victim outside the pool's lock: a chat with a live process gets
    it at once while a slow close is under way; the victim's own chat waits for its close
    (never two processes on one session), and the pool never exceeds its size."""
    rig = await make_rig(pool_size=2)
    a, b, c = jid(ALICE), jid(BOB), jid("4915100000004")
    rig.incoming("hi from a", sender=ALICE)
    await rig.wait_sent(1, a)
    await rig.idle()
    rig.incoming("hi from b", sender=BOB)
    await rig.wait_sent(1, b)
    await rig.idle()
    victim = rig.pool._live[a][0]  # the least recently used
    real_close = victim.close
    closed = asyncio.Event()

    async def slow_close(timeout: float = 3.0) -> None:
        await asyncio.sleep(1.5)
        await real_close(timeout)
        closed.set()

    victim.close = slow_close  # type: ignore[method-assign]
    opening_c = asyncio.create_task(rig.pool.acquire(c))  # evicts a, slowly
    await asyncio.sleep(0.1)
    assert not closed.is_set()
    started = time.monotonic()
    session_b = await rig.pool.acquire(b)
    await rig.pool.release(b)
    assert time.monotonic() - started < 0.5, "b waited for a's close"
    assert session_b.alive and not closed.is_set()
    reopening_a = asyncio.create_task(rig.pool.acquire(a))
    await asyncio.sleep(0.2)
    assert not reopening_a.done(), "a got a new process while its old one was closing"
    await opening_c
    assert closed.is_set()
    await rig.pool.release(c)
    await reopening_a
    await rig.pool.release(a)
    assert rig.pool.peak <= 2 and len(_cli_processes(tmp_path)) <= 2


async def test_idle_timeout_and_close_all(make_rig: MakeRig, tmp_path: Path) -> None:
    # seconds with room for a loaded machine: the two first turns may end a second apart
    rig = await make_rig(idle_timeout=3.0)
    rig.incoming("hello", sender=ALICE)
    rig.incoming("hello", sender=BOB)
    await rig.wait_sent(2)
    assert len(_cli_processes(tmp_path)) == 2
    await rig.pool.reap_idle()
    assert rig.pool.live == 2  # not idle long enough yet
    await asyncio.sleep(2.0)
    rig.incoming("again", sender=BOB)
    await rig.wait_sent(3)
    await asyncio.sleep(1.2)  # alice idle > 3 s, bob ~1.2 s
    await rig.pool.reap_idle()
    assert rig.pool.pid(jid(ALICE)) is None and rig.pool.pid(jid(BOB)) is not None
    assert len(_cli_processes(tmp_path)) == 1
    await rig.pool.close_all()  # unit stop
    assert rig.pool.live == 0 and _cli_processes(tmp_path) == []


# --- the turn watchdog ---------------------------------------------------------------------


async def test_turn_timeout_kills_and_apologises(make_rig: MakeRig,
                                                 api: FakeAnthropicAPI) -> None:
    def responder(body: Any) -> str | Reply:
        said = last_user_text(body)
        if "HANG" in said and "are you back" not in said:
            return Reply(hang=True)
        return default_responder(body)

    api.responder = responder
    rig = await make_rig(turn_timeout=2.0)
    chat = jid(ALICE)
    rig.incoming("hello")
    await rig.wait_sent(1, chat)
    pid = rig.pool.pid(chat)
    started = time.monotonic()
    rig.incoming("HANG please")
    sent = await rig.wait_sent(2, chat, timeout=10)
    assert sent[1] == "SORRY-APOLOGY"
    assert 1.9 < time.monotonic() - started < 6  # one timeout, no retry
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert sum(1 for r in api.message_requests() if "HANG" in last_user_text(r.json)) == 1
    api.release()
    rig.incoming("are you back?")
    sent = await rig.wait_sent(3, chat)
    assert "are you back?" in sent[2]
    assert "hello" in texts(api.message_requests()[-1])  # the session was resumed


def slow_when_asked(delay: float) -> Callable[[dict[str, Any]], Reply]:
    """The fake API's answer: after ``delay`` seconds to a message saying SLOW, else at once."""
    return lambda body: (Reply(text=f"slow: {last_user_text(body)}", delay=delay)
                         if "SLOW" in last_user_text(body) else default_responder(body))


async def test_claude_exit_mid_turn_is_retried_once(make_rig: MakeRig,
                                                    api: FakeAnthropicAPI) -> None:
    api.responder = slow_when_asked(1.0)
    rig = await make_rig()
    chat = jid(ALICE)
    rig.incoming("the code word is PELICAN")
    await rig.wait_sent(1, chat)

    async def kill_when_asked(n: int) -> None:
        await until(lambda: sum(1 for r in api.message_requests()
                                if "SLOW" in last_user_text(r.json)) >= n, 10, "slow request")
        pid = rig.pool.pid(chat)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

    rig.incoming("SLOW second")
    await kill_when_asked(1)
    sent = await rig.wait_sent(2, chat)
    assert sent[1].startswith("slow:") and "SLOW second" in sent[1]
    retry = api.message_requests()[-1]
    assert "PELICAN" in texts(retry)  # the retry ran on the resumed session

    rig.incoming("SLOW third")
    await kill_when_asked(3)
    await kill_when_asked(4)
    sent = await rig.wait_sent(3, chat)
    assert sent[2] == "SORRY-APOLOGY"
    assert sum(1 for r in api.message_requests() if "SLOW third" in texts(r)) >= 2


async def test_a_claude_process_ended_while_stopping_leaves_the_turn_pending(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    """The stop ends the worker's Claude process under a turn in flight (as systemd's SIGKILL
    at TimeoutStopSec does): no apology goes out; the message stays pending and is answered
    by the next start."""
    api.responder = slow_when_asked(2.0)
    rig = await make_rig()
    chat = jid(ALICE)
    rig.incoming("hello")
    await rig.wait_sent(1, chat)
    rig.incoming("SLOW question")
    await until(lambda: any("SLOW" in last_user_text(r.json) for r in api.message_requests()),
                10, "the slow request")
    rig.engine.accepting = False  # the stop has begun (``drain``'s first step)
    pid = rig.pool.pid(chat)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: not rig.engine.turns_in_flight, 10, "the turn to end")
    await asyncio.sleep(0.3)
    assert rig.wa.to(chat) == ["echo: hello"]  # no apology
    assert [p.message.text for p in rig.store.pending_inbound(chat, 10)] == ["SLOW question"]


# --- budgets and rate limits ---------------------------------------------------------------


async def test_daily_budget(make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    now = [1_700_000_000.0]
    rig = await make_rig(limits=replace(LIMITS, daily_budget_usd=100.0), clock=lambda: now[0])
    rig.engine.update_settings({"daily_budget_usd": 0.000001})  # the per-user override
    a, b = jid(ALICE), jid(BOB)
    rig.incoming("first", sender=ALICE)
    await rig.wait_sent(1, a)
    assert rig.store.cost_on("2023-11-14") > 0.000001
    rig.incoming("second", sender=ALICE)
    sent = await rig.wait_sent(2, a)
    assert sent[1] == BUDGET_NOTICE
    w3 = rig.incoming("third", sender=ALICE)
    rig.incoming("from bob", sender=BOB)
    await rig.wait_sent(1, b)
    await rig.idle()
    assert rig.wa.to(a) == sent  # one notice per chat per day
    assert rig.wa.to(b) == [BUDGET_NOTICE]
    assert rig.store.inbound_state(a, w3) == ("skipped", "budget")
    assert len(api.message_requests()) == 1
    rig.incoming("/status", sender=OWNER, chat=jid(OWNER), from_me=True)  # commands work
    status = (await rig.wait_sent(1, jid(OWNER)))[0]
    assert "of $0.00 daily budget" in status

    now[0] += 86_400  # the next UTC day
    rig.incoming("new day", sender=ALICE)
    sent = await rig.wait_sent(3, a)
    assert "new day" in sent[2]
    assert len(api.message_requests()) == 2
    rig.engine.update_settings({})  # back to the configured 100 USD
    rig.incoming("more", sender=ALICE)
    assert "more" in (await rig.wait_sent(4, a))[3]


async def test_rate_limit_per_sender_with_one_notice(make_rig: MakeRig,
                                                     api: FakeAnthropicAPI) -> None:
    rig = await make_rig(conv=replace(CONV, debounce=0.3),
                         limits=replace(LIMITS, inbound_per_minute=10.0, inbound_burst=3))
    ids = [rig.incoming(f"msg-{i}", sender=ALICE) for i in range(6)]
    rig.incoming("bob is calm", sender=BOB)
    await rig.wait_sent(2, jid(ALICE))
    await rig.wait_sent(1, jid(BOB))
    await rig.idle()
    sent = rig.wa.to(jid(ALICE))
    assert sent.count(SLOW_DOWN_NOTICE) == 1 and len(sent) == 2
    asked = last_user_text(next(r for r in api.message_requests() if "msg-0" in texts(r)).json)
    assert all(f"msg-{i}" in asked for i in range(3))
    assert all(f"msg-{i}" not in asked for i in range(3, 6))
    assert [rig.store.inbound_state(jid(ALICE), w) for w in ids[3:]] == [
        ("skipped", "rate_limited")] * 3
    # the owner is never rate limited
    for _ in range(5):
        rig.incoming("/help", sender=OWNER, chat=jid(OWNER), from_me=True)
    await rig.wait_sent(5, jid(OWNER))


async def test_one_slow_down_notice_for_a_30_message_burst(make_rig: MakeRig) -> None:
    # the burst lasts 3 s at 60/minute: tokens refill in the middle of it and let a few
    # messages through, which is still one episode (README: "asked once to slow down")
    rig = await make_rig(limits=replace(LIMITS, inbound_per_minute=60.0, inbound_burst=3))
    for i in range(30):
        rig.incoming(f"burst-{i}", sender=ALICE)
        await asyncio.sleep(0.1)
    await rig.idle(timeout=40)
    sent = rig.wa.to(jid(ALICE))
    assert sent.count(SLOW_DOWN_NOTICE) == 1
    assert len(sent) > 2  # answers went out around the notice: tokens did refill


async def test_outbound_pacing(make_rig: MakeRig) -> None:
    rig = await make_rig(limits=replace(LIMITS, send_gap=0.3, send_jitter=0.2),
                         rng=lambda: 0.5)
    rig.engine.update_settings({"commands_from": "everyone"})
    for phone in (ALICE, BOB, "4915100000004", "4915100000005"):
        rig.incoming("/help", sender=phone)
    await rig.wait_sent(4)
    times = [s.at for s in rig.wa.sent]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.4 - 0.01 for g in gaps), gaps  # gap 0.3 + jitter 0.2 * 0.5
    assert all(g < 1.0 for g in gaps), gaps


# --- isolation -----------------------------------------------------------------------------

TOKEN = re.compile(r"U(\d)C(\d)T(\d+)")


@pytest.mark.parametrize("turns", [5])
async def test_chats_never_share_a_session(make_rig: MakeRig, api: FakeAnthropicAPI,
                                           turns: int) -> None:
    users = [await make_rig(f"user{u}", pool_size=2) for u in range(2)]
    phones = ["4915100000011", "4915100000012", "4915100000013"]

    async def converse(u: int, c: int) -> None:
        rig = users[u]
        for t in range(turns):
            rig.incoming(f"U{u}C{c}T{t} hello", sender=phones[c])
            await rig.wait_sent(t + 1, jid(phones[c]), timeout=40)

    await asyncio.gather(*(converse(u, c) for u in range(2) for c in range(3)))
    reqs = api.message_requests()
    assert len(reqs) == 2 * 3 * turns
    sessions: dict[tuple[str, str], str] = {}
    for req in reqs:
        found = {(m[0], m[1]) for m in TOKEN.findall(texts(req))}
        assert len(found) == 1, f"a request mixes chats: {found}"
        (owner,) = found
        # one Claude session per chat, and no chat's session is another's
        sid = session_of(req)
        assert sessions.setdefault(owner, sid) == sid
    assert len(set(sessions.values())) == 6
    for u in range(2):
        for c in range(3):
            last = next(r for r in reqs if f"U{u}C{c}T{turns - 1}" in texts(r))
            assert all(f"U{u}C{c}T{t} hello" in texts(last) for t in range(turns))
