"""agent.policy: whole messages and boundaries mutation testing found open (issue 20).

A bad setting's message is what the owner reads on the document's ``error``: each row writes
it out in full, the key, the problem and what is allowed.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent import policy
from agent.commands import ChatCommand
from agent.policy import InvalidSetting, MessageDecision, Policy
from agent.whatsapp.events import IncomingMessage

OWNER = "4915100000001"
ALICE = "4915100000002"


@pytest.mark.parametrize(("settings", "message"), [
    ({"reply_to": "friends"},
     "setting 'settings.reply_to': 'friends' is not one of everyone, allowlist, self "
     "(allowed: everyone, allowlist, self)"),
    ({"groups": 1},
     "setting 'settings.groups': 1 is not one of off, mention, all (allowed: off, mention, all)"),
    ({"commands_from": "admins"},
     "setting 'settings.commands_from': 'admins' is not one of owner, everyone "
     "(allowed: owner, everyone)"),
    ({"allowlist": {"a": 1}},
     "setting 'settings.allowlist': expected a list of phone numbers, got dict "
     "(allowed: list of phone numbers, digits with country code)"),
    ({"allowlist": (ALICE, 5)},
     "setting 'settings.allowlist[1]': 5 is not a phone number "
     "(allowed: digits with country code, 7-15 digits, no '+', e.g. 4915112345678)"),
    ({"reply_to": "allowlist", "allowlist": []},
     "setting 'settings.allowlist': is empty but reply_to is allowlist "
     "(allowed: at least one phone number)"),
    ({"daily_budget_usd": -0.01},
     "setting 'settings.daily_budget_usd': -0.01 is not a number >= 0 "
     "(allowed: a number of US dollars, 0 for no cap)"),
    ({"daily_budget_usd": float("inf")},
     "setting 'settings.daily_budget_usd': inf is not a number >= 0 "
     "(allowed: a number of US dollars, 0 for no cap)"),
    ({"daily_budget_usd": False},
     "setting 'settings.daily_budget_usd': False is not a number >= 0 "
     "(allowed: a number of US dollars, 0 for no cap)"),
])
def test_invalid_settings_in_full(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSetting) as info:
        policy.parse(settings)
    assert str(info.value) == message


def test_the_problem_and_key_are_kept_apart() -> None:
    with pytest.raises(InvalidSetting) as info:
        policy.parse({"groups": "x"})
    assert (info.value.key, info.value.problem) == (
        "settings.groups", "'x' is not one of off, mention, all")


@pytest.mark.parametrize(("settings", "expected"), [
    ({"allowlist": (ALICE,)}, Policy(allowlist=frozenset({ALICE}))),  # a tuple is a list
    ({"daily_budget_usd": 0}, Policy(daily_budget_usd=0.0)),
    ({"daily_budget_usd": 0.5}, Policy(daily_budget_usd=0.5)),
    ({"reply_to": "everyone", "groups": "mention", "commands_from": "owner"}, Policy()),
])
def test_valid_settings(settings: dict[str, Any], expected: Policy) -> None:
    parsed = policy.parse(settings)
    assert parsed == expected
    assert type(parsed.daily_budget_usd) is type(expected.daily_budget_usd)


def test_the_defaults() -> None:
    assert Policy() == Policy(reply_to="everyone", allowlist=frozenset(), groups="mention",
                              commands_from="owner", daily_budget_usd=None)
    assert Policy() == policy.DEFAULT


@pytest.mark.parametrize(("raw", "expected"), [
    ("1234567", "1234567"), ("123456", None),  # 7 to 15 digits (wabridge.phone)
    ("123456789012345", "123456789012345"), ("1234567890123456", None),
    ("+(49) 151\t1234-5678", "4915112345678"),
    ("49+15112345678", None),  # a "+" only in front
    ("++4915112345678", None),
    ("4915112345678\n", "4915112345678"),
    ("491511234567x", None),
    ("x491511234567", None),
])
def test_normalize_phone_bounds(raw: str, expected: str | None) -> None:
    assert policy.normalize_phone(raw) == expected


def _msg(*, sender: str = ALICE, chat: str | None = None, from_me: bool = False,
         group: bool = False, text: str = "hi") -> IncomingMessage:
    return IncomingMessage(wa_id="W", chat_id=chat or f"{sender}@s.whatsapp.net",
                           sender=f"{sender}@s.whatsapp.net", text=text, timestamp=0.0,
                           is_group=group, from_me=from_me)


@pytest.mark.parametrize(("message", "owner", "expected"), [
    (_msg(sender=OWNER), OWNER, True),
    (_msg(sender=ALICE), OWNER, False),
    (_msg(sender=ALICE, from_me=True), OWNER, True),
    (_msg(sender=ALICE, from_me=True), "", True),
    # an unknown owner number ("") never matches a sender, not even an empty one
    (IncomingMessage(wa_id="W", chat_id="c", sender="", text="", timestamp=0.0), "", False),
])
def test_is_owner(message: IncomingMessage, owner: str, expected: bool) -> None:
    assert policy.is_owner(message, owner) is expected


@pytest.mark.parametrize(("message", "owner", "expected"), [
    (_msg(sender=OWNER, chat=f"{OWNER}@s.whatsapp.net"), OWNER, True),
    (_msg(sender=OWNER, chat=f"{ALICE}@s.whatsapp.net"), OWNER, False),
    (_msg(sender=OWNER, chat=f"{OWNER}@s.whatsapp.net", group=True), OWNER, False),
    (IncomingMessage(wa_id="W", chat_id="@s.whatsapp.net", sender="", text="",
                     timestamp=0.0), "", False),
])
def test_is_self_chat(message: IncomingMessage, owner: str, expected: bool) -> None:
    assert policy.is_self_chat(message, owner) is expected


def test_decisions_carry_their_reason_and_command() -> None:
    reset = _msg(sender=OWNER, text="/reset")
    assert policy.decide(reset, Policy(), OWNER) == MessageDecision(
        "command", "owner", ChatCommand("reset"))
    assert MessageDecision("skip") == MessageDecision("skip", "", None)
    everyone = Policy(commands_from="everyone")
    assert policy.decide(_msg(text="/help"), everyone, OWNER) == MessageDecision(
        "command", "everyone", ChatCommand("help"))
    # commands from others are ordinary messages unless the rules would answer them
    allow = Policy(reply_to="allowlist", allowlist=frozenset({OWNER}), commands_from="everyone")
    assert policy.decide(_msg(text="/help"), allow, OWNER) == MessageDecision(
        "skip", "not_allowlisted")


def test_a_setting_error_without_allowed_values_has_the_general_explanation() -> None:
    error = InvalidSetting("settings.x", "bad")
    assert (str(error), error.explanation) == (
        "setting 'settings.x': bad",
        "fix the setting on the user's document; the previous settings stay in force")


# --- tools, timezone, engine ------------------------------------------------------------------

TZ_ALLOWED = "(allowed: an IANA time zone name like Europe/Berlin or UTC)"


@pytest.mark.parametrize(("settings", "expected"), [
    ({"tools": "wabridge"}, Policy(tools="wabridge")),
    ({"tools": "none"}, Policy(tools="none")),
    ({"tools": "wabridge", "engine": "cli"}, Policy(tools="wabridge", engine="cli")),
    ({"engine": "api"}, Policy(engine="api")),
    ({"engine": None, "tools": None, "timezone": None}, Policy()),
    ({"timezone": "Europe/Berlin"}, Policy(timezone="Europe/Berlin")),
    ({"timezone": "UTC"}, Policy(timezone="UTC")),
    ({"timezone": "America/Argentina/Buenos_Aires"},
     Policy(timezone="America/Argentina/Buenos_Aires")),
    ({"timezone": "Etc/GMT-14"}, Policy(timezone="Etc/GMT-14")),
    ({"timezone": "EST5EDT"}, Policy(timezone="EST5EDT")),
])
def test_tools_timezone_and_engine(settings: dict[str, Any], expected: Policy) -> None:
    assert policy.parse(settings) == expected


@pytest.mark.parametrize(("settings", "message"), [
    ({"tools": "all"},
     "setting 'settings.tools': 'all' is not one of none, wabridge (allowed: none, wabridge)"),
    ({"engine": "gpt"},
     "setting 'settings.engine': 'gpt' is not one of cli, api (allowed: cli, api)"),
    ({"tools": "wabridge", "engine": "api"},
     "setting 'settings.tools': wabridge's tools run on the cli engine only, and engine is api "
     "(allowed: none (or engine cli))"),
    ({"timezone": 5}, f"setting 'settings.timezone': 5 is not a time zone {TZ_ALLOWED}"),
    ({"timezone": "Mars/Olympus_Mons"},  # well formed, but no such zone
     f"setting 'settings.timezone': 'Mars/Olympus_Mons' is not a time zone {TZ_ALLOWED}"),
    ({"timezone": "Europe/"},
     f"setting 'settings.timezone': 'Europe/' is not a time zone {TZ_ALLOWED}"),
    # a file of the zone database that is no zone: zoneinfo's ValueError, not "not found"
    ({"timezone": "leapseconds"},
     f"setting 'settings.timezone': 'leapseconds' is not a time zone {TZ_ALLOWED}"),
    ({"timezone": "../etc/passwd"},
     f"setting 'settings.timezone': '../etc/passwd' is not a time zone {TZ_ALLOWED}"),
    ({"timezone": ""}, f"setting 'settings.timezone': '' is not a time zone {TZ_ALLOWED}"),
])
def test_tools_timezone_and_engine_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSetting) as info:
        policy.parse(settings)
    assert str(info.value) == message


def test_a_timezone_of_64_characters_is_looked_up() -> None:
    # 64 characters is the longest name tried; zoneinfo then says whether it exists
    name = "Etc/" + "U" * 60
    assert len(name) == 64
    with pytest.raises(InvalidSetting) as info:
        policy.parse({"timezone": name})
    assert info.value.problem == f"{name!r} is not a time zone"
    assert policy._is_timezone("Etc/UTC") is True


# --- bots --------------------------------------------------------------------------------------

META_AI = "13135550002"


@pytest.mark.parametrize(("jid", "bot"), [
    ("1313555000x@s.whatsapp.net", False),  # digits only
    ("13135550002x@s.whatsapp.net", False),
    ("1316555001x@s.whatsapp.net", False),
    ("131655500123@s.whatsapp.net", False),  # one digit too many
    ("1316555001@s.whatsapp.net", False),  # one too few
    ("131355500021", False),
    ("13165550012", True),
])
def test_bot_numbers_are_exact(jid: str, bot: bool) -> None:
    assert policy.is_bot(jid) is bot


def test_the_owners_command_in_a_chat_with_a_bot_is_not_answered_there() -> None:
    """The owner's own message in their chat with Meta AI is theirs, not the bot's; a command
    typed there is not answered there (commands are for the self chat)."""
    mine = _msg(sender=OWNER, chat=f"{META_AI}@s.whatsapp.net", from_me=True, text="/status")
    assert policy.decide(mine, Policy(), OWNER) == MessageDecision("skip", "command_in_chat")
    # the bot writing in that chat under another id (a LID) is still the bot's chat
    theirs = IncomingMessage(wa_id="W", chat_id=f"{META_AI}@s.whatsapp.net",
                             sender="123456789@lid", text="hi", timestamp=0.0)
    assert policy.decide(theirs, Policy(), OWNER) == MessageDecision("skip", "bot")


# --- the loop guard ----------------------------------------------------------------------------


def test_loop_guard_states_in_full() -> None:
    verdict, state = policy.loop_guard(policy.LoopState(), 10.0, max_turns=1, window=60)
    assert (verdict, state) == ("answer", policy.LoopState((10.0,), stopped=False, last=10.0))
    verdict, state = policy.loop_guard(state, 20.0, max_turns=1, window=60)
    assert (verdict, state) == ("stop", policy.LoopState((10.0, 20.0), stopped=True, last=20.0))
    verdict, state = policy.loop_guard(state, 30.0, max_turns=1, window=60)
    assert (verdict, state) == ("stopped", policy.LoopState((10.0, 20.0), stopped=True,
                                                            last=30.0))
    off = policy.LoopState((1.0,), stopped=True, last=1.0)
    assert policy.loop_guard(off, 2.0, max_turns=0, window=60) == ("answer", off)
    assert policy.LoopState() == policy.LoopState((), stopped=False, last=None)
