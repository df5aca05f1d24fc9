"""agent.policy: parsing the per-user settings and deciding who gets answered (pure)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import policy
from agent.commands import ChatCommand
from agent.policy import InvalidSetting, MessageDecision, Policy
from agent.whatsapp.events import Image, IncomingMessage
from wabridge.errors import PolicyError

OWNER = "4915100000001"
ALICE = "4915100000002"
BOB = "4915100000003"


def jid(phone: str) -> str:
    return f"{phone}@s.whatsapp.net"


GROUP = "120363000000000001@g.us"


META_AI = "13135550002"


def msg(text: str = "hi", *, sender: str = ALICE, chat: str | None = None, group: bool = False,
        from_me: bool = False, mentioned: bool = False, image: bool = False) -> IncomingMessage:
    return IncomingMessage(
        wa_id="W1", chat_id=chat or (GROUP if group else jid(sender)), sender=jid(sender),
        text=text, timestamp=0.0, is_group=group, from_me=from_me, mentioned=mentioned,
        images=(Image("image/png", b"x"),) if image else (),
    )


# --- parse ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, Policy()),
        ({"backend": "sim", "simUrl": "http://x", "pairingPhone": "1"}, Policy()),  # not ours
        ({"reply_to": None, "groups": None, "allowlist": None}, Policy()),  # null = default
        ({"reply_to": "self"}, Policy(reply_to="self")),
        ({"reply_to": "allowlist", "allowlist": ["+49 151 0000-0002", "4915100000003"]},
         Policy(reply_to="allowlist", allowlist=frozenset({ALICE, BOB}))),
        ({"allowlist": [ALICE]}, Policy(allowlist=frozenset({ALICE}))),  # kept, not used
        ({"groups": "off"}, Policy(groups="off")),
        ({"groups": "all"}, Policy(groups="all")),
        ({"commands_from": "everyone"}, Policy(commands_from="everyone")),
        ({"daily_budget_usd": 2}, Policy(daily_budget_usd=2.0)),
        ({"daily_budget_usd": 0.0}, Policy(daily_budget_usd=0.0)),
        ({"engine": "api"}, Policy(engine="api")),
        ({"engine": "cli"}, Policy(engine="cli")),
        ({"engine": None}, Policy()),
    ],
)
def test_parse_valid(settings: dict[str, Any], expected: Policy) -> None:
    assert policy.parse(settings) == expected


@pytest.mark.parametrize(
    ("settings", "key", "fragment"),
    [
        ({"reply_to": "friends"}, "settings.reply_to", "'friends' is not one of"),
        ({"reply_to": 1}, "settings.reply_to", "1 is not one of"),
        ({"groups": "mentions"}, "settings.groups", "not one of off, mention, all"),
        ({"commands_from": "admins"}, "settings.commands_from", "owner, everyone"),
        ({"allowlist": "4915100000002"}, "settings.allowlist", "expected a list"),
        ({"allowlist": [ALICE, "alice"]}, "settings.allowlist[1]", "'alice' is not a phone"),
        ({"allowlist": [4915100000002]}, "settings.allowlist[0]", "is not a phone number"),
        ({"allowlist": ["12345"]}, "settings.allowlist[0]", "not a phone number"),
        ({"reply_to": "allowlist"}, "settings.allowlist", "empty but reply_to is allowlist"),
        ({"reply_to": "allowlist", "allowlist": []}, "settings.allowlist", "empty"),
        ({"daily_budget_usd": -1}, "settings.daily_budget_usd", ">= 0"),
        ({"daily_budget_usd": "5"}, "settings.daily_budget_usd", "'5' is not a number"),
        ({"daily_budget_usd": True}, "settings.daily_budget_usd", "is not a number"),
        ({"daily_budget_usd": float("nan")}, "settings.daily_budget_usd", "not a number"),
        ({"engine": "claude"}, "settings.engine", "'claude' is not one of cli, api"),
        ({"engine": ""}, "settings.engine", "'' is not one of cli, api"),
    ],
)
def test_parse_invalid_names_the_key(settings: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(InvalidSetting) as info:
        policy.parse(settings)
    assert info.value.key == key
    assert key in str(info.value)
    assert fragment in str(info.value)
    assert isinstance(info.value, PolicyError) and info.value.code == "bad_setting"


@pytest.mark.parametrize(
    ("user", "host", "tools", "expected"),
    [
        (None, "cli", False, "cli"),
        (None, "api", False, "api"),
        ("api", "cli", False, "api"),
        ("cli", "api", False, "cli"),
        ("api", "cli", True, "cli"),  # the api engine has no tools
        (None, "api", True, "cli"),
    ],
)
def test_engine_for(user: policy.EngineName | None, host: policy.EngineName, tools: bool,
                    expected: str) -> None:
    assert policy.engine_for(user, host, tools=tools) == expected


def test_policy_is_frozen() -> None:
    p = policy.parse({"allowlist": [ALICE]})
    with pytest.raises(AttributeError):
        p.reply_to = "self"  # type: ignore[misc]
    assert isinstance(p.allowlist, frozenset)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(jid(OWNER), OWNER), (f"{OWNER}:12@s.whatsapp.net", OWNER), (f"{OWNER}.0:3@s.whatsapp.net",
                                                                  OWNER),
     ("123456@lid", "123456"), (OWNER, OWNER), (GROUP, "120363000000000001")],
)
def test_phone_of(value: str, expected: str) -> None:
    assert policy.phone_of(value) == expected


# --- decide --------------------------------------------------------------------------------

EVERYONE = Policy()
ALLOW = Policy(reply_to="allowlist", allowlist=frozenset({ALICE}))
SELF = Policy(reply_to="self")
D = MessageDecision  # the tables below read better short

RESET = ChatCommand("reset")


@pytest.mark.parametrize(
    ("pol", "message", "expected"),
    [
        # everyone: direct chats answered, own messages ignored
        (EVERYONE, msg(), D("answer", "direct")),
        (EVERYONE, msg(sender=BOB), D("answer", "direct")),
        (EVERYONE, msg(sender=OWNER, chat=jid(ALICE), from_me=True), D("skip", "from_me")),
        (EVERYONE, msg(sender=OWNER, chat=jid(OWNER), from_me=True), D("skip", "from_me")),
        # groups: mention (default), off, all
        (EVERYONE, msg(group=True), D("skip", "not_mentioned")),
        (EVERYONE, msg(group=True, mentioned=True), D("answer", "group")),
        (Policy(groups="off"), msg(group=True, mentioned=True), D("skip", "groups_off")),
        (Policy(groups="all"), msg(group=True), D("answer", "group")),
        # allowlist: listed senders only, in groups too
        (ALLOW, msg(), D("answer", "direct")),
        (ALLOW, msg(sender=BOB), D("skip", "not_allowlisted")),
        (ALLOW, msg(group=True, mentioned=True), D("answer", "group")),
        (ALLOW, msg(sender=BOB, group=True, mentioned=True), D("skip", "not_allowlisted")),
        (ALLOW, msg(group=True), D("skip", "not_mentioned")),
        # self: only the owner's own chat, only the owner's messages
        (SELF, msg(sender=OWNER, chat=jid(OWNER), from_me=True), D("answer", "self_chat")),
        (SELF, msg(sender=OWNER, chat=f"{OWNER}:7@s.whatsapp.net", from_me=True),
         D("answer", "self_chat")),
        (SELF, msg(sender=OWNER, chat=jid(ALICE), from_me=True), D("skip", "from_me")),
        (SELF, msg(), D("skip", "not_self_chat")),
        (SELF, msg(sender=OWNER, chat=GROUP, group=True, from_me=True, mentioned=True),
         D("skip", "from_me")),
        (SELF, msg(group=True, mentioned=True), D("skip", "not_self_chat")),
        # commands: the owner's in the self chat; typed into a contact's chat or a group they
        # are not run there (the contact would see the answer); others' are ordinary
        # messages unless everyone
        (EVERYONE, msg("/reset", sender=OWNER, chat=jid(ALICE), from_me=True),
         D("skip", "command_in_chat")),
        (EVERYONE, msg("/pause 4915100000002", sender=OWNER, chat=GROUP, group=True,
                       from_me=True), D("skip", "command_in_chat")),
        (EVERYONE, msg("/status", sender=OWNER, chat=jid(OWNER), from_me=True),
         D("command", "owner", ChatCommand("status"))),
        (SELF, msg("/reset", sender=OWNER, chat=jid(OWNER), from_me=True),
         D("command", "owner", RESET)),
        (EVERYONE, msg("/reset"), D("answer", "direct")),
        (Policy(commands_from="everyone"), msg("  /Reset now "),
         D("command", "everyone", ChatCommand("reset", "now"))),
        (Policy(commands_from="everyone"), msg("/status", group=True),
         D("skip", "not_mentioned")),
        (Policy(commands_from="everyone", reply_to="allowlist", allowlist=frozenset({ALICE})),
         msg("/help", sender=BOB), D("skip", "not_allowlisted")),
        (Policy(commands_from="everyone"), msg("/xyz"),
         D("command", "everyone", ChatCommand("xyz"))),
        (EVERYONE, msg("/usr/bin is a path", sender=OWNER, from_me=True, chat=jid(OWNER)),
         D("skip", "from_me")),
        (EVERYONE, msg("/reset", sender=OWNER, from_me=True, image=True),
         D("skip", "from_me")),
        # the owner's number writing from another device counts as the owner
        (EVERYONE, msg("/status", sender=OWNER, chat=jid(OWNER)),
         D("command", "owner", ChatCommand("status"))),
        # nothing to answer: whitespace only
        (EVERYONE, msg(" \n\t "), D("skip", "empty")),
        (EVERYONE, msg(""), D("skip", "empty")),
        (EVERYONE, replace(msg(""), unsupported_media="poll"), D("answer", "direct")),
        (EVERYONE, msg("", image=True), D("answer", "direct")),
        # bots are never answered (Meta AI by its @bot JID or its phone numbers), in any mode
        (EVERYONE, replace(msg(), sender="867051314767696@bot", chat_id="867051314767696@bot"),
         D("skip", "bot")),
        (EVERYONE, msg(sender=META_AI), D("skip", "bot")),
        (Policy(groups="all"), msg(sender=META_AI, group=True), D("skip", "bot")),
        (Policy(commands_from="everyone"), msg("/reset", sender=META_AI), D("skip", "bot")),
        (Policy(reply_to="allowlist", allowlist=frozenset({META_AI})), msg(sender=META_AI),
         D("skip", "bot")),
        (EVERYONE, msg(sender="1313555000"), D("answer", "direct")),  # not a bot number
    ],
)
def test_decide(pol: Policy, message: IncomingMessage, expected: MessageDecision) -> None:
    assert policy.decide(message, pol, OWNER) == expected


@pytest.mark.parametrize(
    ("jid_", "bot"),
    [
        ("867051314767696@bot", True),
        ("13135550002@s.whatsapp.net", True),  # Meta AI
        ("13135551234@s.whatsapp.net", True),
        ("13165550012@s.whatsapp.net", True),
        ("13135550002:4@s.whatsapp.net", True),
        ("13135550002", True),
        ("131355500021@s.whatsapp.net", False),
        ("13165550112@s.whatsapp.net", False),
        ("4915100000002@s.whatsapp.net", False),
        ("13135550002@lid", False),
        ("120363000000000001@g.us", False),
    ],
)
def test_is_bot(jid_: str, bot: bool) -> None:
    assert policy.is_bot(jid_) is bot


def guard(times: list[float], max_turns: int = 3, window: float = 60.0) -> list[str]:
    state = policy.LoopState()
    out = []
    for t in times:
        verdict, state = policy.loop_guard(state, t, max_turns=max_turns, window=window)
        out.append(verdict)
    return out


@pytest.mark.parametrize(
    ("times", "max_turns", "window", "expected"),
    [
        # a bot loop: a turn every 5 s; the 4th within 60 s stops the chat, once
        ([0, 5, 10, 15, 20, 25], 3, 60, ["answer"] * 3 + ["stop", "stopped", "stopped"]),
        # a human pace: never more than 3 turns within 60 s
        ([0, 25, 50, 75, 100, 125], 3, 60, ["answer"] * 6),
        # stopped, then quiet for the window: answered again
        ([0, 1, 2, 3, 4, 64], 3, 60, ["answer"] * 3 + ["stop", "stopped", "answer"]),
        # messages that keep arriving keep it stopped (no pause)
        ([0, 1, 2, 3, 50, 100, 150], 3, 60,
         ["answer"] * 3 + ["stop", "stopped", "stopped", "stopped"]),
        # turns older than the window do not count
        ([0, 1, 2, 61, 62], 3, 60, ["answer"] * 5),
        # off
        ([0] * 10, 0, 60, ["answer"] * 10),
        # one turn allowed: the second within the window stops
        ([0, 1], 1, 60, ["answer", "stop"]),
        ([0, 60], 1, 60, ["answer", "answer"]),  # exactly a window apart: the first has aged out
        ([0, 59.5], 1, 60, ["answer", "stop"]),
        # stopped, then exactly a window of quiet: answered again
        ([0, 1, 61], 1, 60, ["answer", "stop", "answer"]),
        ([0, 1, 60.5], 1, 60, ["answer", "stop", "stopped"]),
        # a turn exactly a window old no longer counts, while the chat was not quiet
        ([0, 30, 60], 2, 60, ["answer", "answer", "answer"]),
        ([0, 30, 59], 2, 60, ["answer", "answer", "stop"]),
        # epoch times, as the engine passes them
        ([1_700_000_000, 1_700_000_001, 1_700_000_002, 1_700_000_003], 3, 60,
         ["answer", "answer", "answer", "stop"]),
        # exactly max_turns within the window is still answered
        ([0, 1, 2], 3, 60, ["answer", "answer", "answer"]),
        ([0, 1, 2], -1, 60, ["answer", "answer", "answer"]),  # negative: off
    ],
)
def test_loop_guard(times: list[float], max_turns: int, window: float,
                    expected: list[str]) -> None:
    assert guard(times, max_turns, window) == expected


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (msg(sender=OWNER, chat=jid(ALICE), from_me=True), True),  # the phone, in alice's chat
        (msg(sender=OWNER, chat=GROUP, group=True, from_me=True), True),
        (msg(sender=OWNER, chat=jid(OWNER), from_me=True), False),  # the self chat
        (msg(sender=ALICE, chat=jid(ALICE)), False),  # alice herself
        (msg(sender=OWNER, chat=jid(ALICE)), False),  # not from this account's devices
    ],
)
def test_owner_wrote(message: IncomingMessage, expected: bool) -> None:
    assert policy.owner_wrote(message, OWNER) is expected


def test_unknown_owner_never_matches_self_chat() -> None:
    m = msg(sender=OWNER, chat=jid(OWNER), from_me=True)
    assert policy.decide(m, SELF, "") == D("skip", "from_me")
    assert policy.decide(msg("/status", sender=OWNER, chat=jid(OWNER)), EVERYONE, "") == \
        D("answer", "direct")


messages = st.builds(
    msg,
    text=st.sampled_from(["hi", "/reset", "/status x", "/usr/bin", "", "/x"]),
    sender=st.sampled_from([OWNER, ALICE, BOB]),
    chat=st.sampled_from([None, jid(OWNER), jid(ALICE), GROUP]),
    group=st.booleans(),
    from_me=st.booleans(),
    mentioned=st.booleans(),
)
policies = st.builds(
    Policy,
    reply_to=st.sampled_from(["everyone", "allowlist", "self"]),
    allowlist=st.sampled_from([frozenset(), frozenset({ALICE}), frozenset({ALICE, BOB})]),
    groups=st.sampled_from(["off", "mention", "all"]),
    commands_from=st.sampled_from(["owner", "everyone"]),
)


@given(messages, policies)
def test_decide_invariants(m: IncomingMessage, pol: Policy) -> None:
    d = policy.decide(m, pol, OWNER)
    if d.action == "answer":
        # own messages are answered only in self mode, in the self chat
        assert not m.from_me or (pol.reply_to == "self" and policy.is_self_chat(m, OWNER))
        if pol.reply_to == "self":
            assert m.from_me
        if m.is_group:
            assert pol.groups == "all" or (pol.groups == "mention" and m.mentioned)
        if pol.reply_to == "allowlist":
            assert policy.phone_of(m.sender) in pol.allowlist
    if d.action == "command":
        assert d.command is not None
        assert policy.is_owner(m, OWNER) or pol.commands_from == "everyone"
    if d.action == "skip":
        assert d.reason
