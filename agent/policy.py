"""Who gets answered: the per-user policy, parsed once at the boundary, decided purely.

The controller sends the ``settings`` map of the user's document. :func:`parse` turns it into
a frozen :class:`Policy` or raises :class:`InvalidSetting` naming the key (the worker then
keeps its previous policy and logs ``policy.invalid``). Keys this module does not know
(``backend``, ``simUrl``...) belong to other parts of the worker and are ignored; ``null``
means "default".

==================  ==============================================  ===========
key                 values                                          default
==================  ==============================================  ===========
``reply_to``        ``everyone`` | ``allowlist`` | ``self``         everyone
``allowlist``       list of phone numbers, digits with country      []
                    code (``+``, spaces and dashes are dropped)
``groups``          ``off`` | ``mention`` | ``all``                 mention
``commands_from``   ``owner`` | ``everyone``                        owner
``daily_budget_usd``number >= 0 (0: no cap)                         [limits]
``tools``           ``none`` | ``wabridge`` (Claude's tools,          none
                    :mod:`agent.tools`)
``timezone``        an IANA time zone name (``Europe/Berlin``),       UTC
                    for the times of scheduled messages
``engine``          ``cli`` | ``api`` (how chats talk to Claude)    [claude]
==================  ==============================================  ===========

:func:`decide` (pure) says what to do with one message, in this order:

0. a message with nothing in it (whitespace-only text, no media) -> skipped (``empty``);
   bot accounts (``…@bot``, Meta AI's phone numbers, see :func:`is_bot`) are never
   answered, not even their commands (``bot``);
1. a command (``/word``) from the owner (a message the account itself sent, or whose sender
   is the account's number; one the owner typed into another chat than the self chat is
   skipped, ``command_in_chat``: its answer would be seen there) or, with
   ``commands_from = everyone``, from anyone the reply rules below would answer ->
   ``command``; anyone else's ``/word`` is an ordinary message;
2. messages the account sent itself (``from_me``) -> skipped, except in ``self`` mode in the
   owner's own "message yourself" chat;
3. ``self`` mode: everything else is skipped;
4. groups: ``off`` skips, ``mention`` answers only when the account is @-mentioned or
   replied to, ``all`` answers all; with ``allowlist`` the group sender must be listed too;
5. ``allowlist``: only listed senders; ``everyone``: everybody.

:func:`loop_guard` (pure) is the general guard against bot-to-bot loops: a chat that has
more than ``max_turns`` turns within ``window`` seconds is stopped, and answered again once it
has been quiet for ``window`` seconds (a human pause).
"""

from __future__ import annotations

import math
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from agent import commands
from agent.commands import ChatCommand
from agent.whatsapp.events import IncomingMessage
from wabridge.errors import PolicyError
from wabridge.phone import PHONE_RULE, normalize_phone

ReplyTo = Literal["everyone", "allowlist", "self"]
Groups = Literal["off", "mention", "all"]
CommandsFrom = Literal["owner", "everyone"]
Tools = Literal["none", "wabridge"]
EngineName = Literal["cli", "api"]
Action = Literal["answer", "command", "skip"]

_REPLY_TO: tuple[ReplyTo, ...] = ("everyone", "allowlist", "self")
_GROUPS: tuple[Groups, ...] = ("off", "mention", "all")
_COMMANDS_FROM: tuple[CommandsFrom, ...] = ("owner", "everyone")
_TOOLS: tuple[Tools, ...] = ("none", "wabridge")
_TZ_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$")
_ENGINES: tuple[EngineName, ...] = ("cli", "api")
# whatsmeow's ``JID.IsBot``: the ``bot`` server, or these phone numbers (Meta AI and its kin)
_BOT_PHONE = re.compile(r"^1313555\d{4}$|^131655500\d{2}$")


class InvalidSetting(PolicyError):
    """A per-user setting that does not validate; ``key`` names it (``settings.reply_to``)."""

    def __init__(self, key: str, problem: str, *, allowed: str = "") -> None:
        super().__init__(f"setting {key!r}: {problem}",
                         explanation=f"allowed: {allowed}" if allowed else "")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Policy:
    reply_to: ReplyTo = "everyone"
    allowlist: frozenset[str] = frozenset()  # phone numbers, digits only
    groups: Groups = "mention"
    commands_from: CommandsFrom = "owner"
    daily_budget_usd: float | None = None  # None: the configured default
    tools: Tools = "none"
    timezone: str = "UTC"
    engine: EngineName | None = None  # None: claude.engine


DEFAULT = Policy()


def _choice(settings: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = settings.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise InvalidSetting(f"settings.{key}", f"{value!r} is not one of {', '.join(choices)}",
                             allowed=", ".join(choices))
    return value


def parse(settings: Mapping[str, Any]) -> Policy:
    """Validate the document's settings map into a Policy; raises ``InvalidSetting``."""
    reply_to = _choice(settings, "reply_to", _REPLY_TO, "everyone")
    groups = _choice(settings, "groups", _GROUPS, "mention")
    commands_from = _choice(settings, "commands_from", _COMMANDS_FROM, "owner")
    engine = _choice(settings, "engine", _ENGINES, "") or None

    raw_list = settings.get("allowlist")
    allow: set[str] = set()
    if raw_list is not None:
        if not isinstance(raw_list, list | tuple):
            raise InvalidSetting("settings.allowlist",
                                 f"expected a list of phone numbers, got {type(raw_list).__name__}",
                                 allowed="list of phone numbers, digits with country code")
        for idx, item in enumerate(raw_list):
            phone = normalize_phone(item) if isinstance(item, str) else None
            if phone is None:
                raise InvalidSetting(f"settings.allowlist[{idx}]",
                                     f"{item!r} is not a phone number",
                                     allowed=f"{PHONE_RULE}, e.g. 4915112345678")
            allow.add(phone)
    if reply_to == "allowlist" and not allow:
        raise InvalidSetting("settings.allowlist", "is empty but reply_to is allowlist",
                             allowed="at least one phone number")

    budget = settings.get("daily_budget_usd")
    if budget is not None:
        if (isinstance(budget, bool) or not isinstance(budget, int | float)
                or not math.isfinite(budget) or budget < 0):
            raise InvalidSetting("settings.daily_budget_usd",
                                 f"{budget!r} is not a number >= 0",
                                 allowed="a number of US dollars, 0 for no cap")
        budget = float(budget)

    tools = _choice(settings, "tools", _TOOLS, "none")
    timezone = settings.get("timezone")
    if timezone is None:
        timezone = "UTC"
    elif not _is_timezone(timezone):
        raise InvalidSetting("settings.timezone", f"{timezone!r} is not a time zone",
                             allowed="an IANA time zone name like Europe/Berlin or UTC")

    if tools == "wabridge" and engine == "api":
        raise InvalidSetting("settings.tools", "wabridge's tools run on the cli engine only, "
                             "and engine is api", allowed="none (or engine cli)")

    return Policy(
        tools=tools,  # type: ignore[arg-type]  # checked by _choice
        timezone=timezone,
        reply_to=reply_to,  # type: ignore[arg-type]  # checked by _choice
        allowlist=frozenset(allow),
        groups=groups,  # type: ignore[arg-type]
        commands_from=commands_from,  # type: ignore[arg-type]
        daily_budget_usd=budget,
        engine=engine,  # type: ignore[arg-type]
    )


def _is_timezone(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 64 or not _TZ_NAME.match(value):
        return False
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True
def engine_for(user: EngineName | None, host: EngineName, *, tools: bool) -> EngineName:
    """The engine a user's chats run on: the user's ``engine`` setting, else the host's
    ``claude.engine``; always ``cli`` when tools are on (the ``api`` engine has none)."""
    if tools:
        return "cli"
    return user or host


def phone_of(jid: str) -> str:
    """The user part of a JID without device/agent suffix: ``49151…:3@s.whatsapp.net`` ->
    ``49151…``."""
    user = jid.partition("@")[0]
    return user.partition(":")[0].partition(".")[0]


def is_bot(jid: str) -> bool:
    """A bot account (Meta AI and business bots): ``…@bot`` or one of Meta AI's phone-number
    JIDs (the rule whatsmeow's ``JID.IsBot`` applies)."""
    user, _, server = jid.partition("@")
    if server == "bot":
        return True
    return server in ("s.whatsapp.net", "") and bool(_BOT_PHONE.match(phone_of(user)))


def is_empty(msg: IncomingMessage) -> bool:
    """Nothing to answer: no text but whitespace, no image, no other media."""
    return not msg.text.strip() and not msg.images and not msg.unsupported_media


def is_owner(msg: IncomingMessage, owner_phone: str) -> bool:
    """Sent by the account itself (from any of its devices) or from the account's number."""
    return msg.from_me or (bool(owner_phone) and phone_of(msg.sender) == owner_phone)


def is_self_chat(msg: IncomingMessage, owner_phone: str) -> bool:
    """The owner's own "message yourself" chat."""
    return not msg.is_group and is_self_chat_id(msg.chat_id, owner_phone)


def is_self_chat_id(chat_id: str, owner_phone: str) -> bool:
    """``chat_id`` is the owner's own "message yourself" chat."""
    return (bool(owner_phone) and not chat_id.endswith("@g.us")
            and phone_of(chat_id) == owner_phone)


def owner_wrote(msg: IncomingMessage, owner_phone: str) -> bool:
    """The owner wrote in one of the account's chats (from the phone or another device of
    theirs), not in the self chat: the owner is talking to that contact personally. The
    message is never answered as the contact's (it is ``from_me``); human takeover (issue 15)
    hooks here. The bot's own replies are told apart earlier, by the outbox's ids."""
    return msg.from_me and not is_self_chat(msg, owner_phone)


@dataclass(frozen=True)
class MessageDecision:
    action: Action
    reason: str = ""  # why skipped (stored with the message), or what was decided
    command: ChatCommand | None = None


def _reply_rules(msg: IncomingMessage, policy: Policy, owner_phone: str) -> MessageDecision:
    if msg.from_me:
        if policy.reply_to == "self" and is_self_chat(msg, owner_phone):
            return MessageDecision("answer", "self_chat")
        return MessageDecision("skip", "from_me")
    if policy.reply_to == "self":
        return MessageDecision("skip", "not_self_chat")
    if msg.is_group:
        if policy.groups == "off":
            return MessageDecision("skip", "groups_off")
        if policy.groups == "mention" and not msg.mentioned:
            return MessageDecision("skip", "not_mentioned")
    if policy.reply_to == "allowlist" and phone_of(msg.sender) not in policy.allowlist:
        return MessageDecision("skip", "not_allowlisted")
    return MessageDecision("answer", "group" if msg.is_group else "direct")


def decide(msg: IncomingMessage, policy: Policy, owner_phone: str) -> MessageDecision:
    """What to do with one message (pure). ``owner_phone``: the account's digits, or ""."""
    if is_empty(msg):
        return MessageDecision("skip", "empty")
    if not msg.from_me and (is_bot(msg.sender) or (not msg.is_group and is_bot(msg.chat_id))):
        return MessageDecision("skip", "bot")
    command = commands.parse(msg.text) if not msg.images else None
    rules = _reply_rules(msg, policy, owner_phone)
    if command is not None:
        if is_owner(msg, owner_phone):
            if msg.from_me and not is_self_chat(msg, owner_phone):
                # typed on the phone into a contact's chat or a group: the answer would be
                # seen there; owner commands work in the self chat
                return MessageDecision("skip", "command_in_chat")
            return MessageDecision("command", "owner", command)
        if policy.commands_from == "everyone" and rules.action == "answer":
            return MessageDecision("command", "everyone", command)
    return rules


# --- the loop guard ------------------------------------------------------------------------

LoopVerdict = Literal["answer", "stop", "stopped"]


@dataclass(frozen=True)
class LoopState:
    """One chat's recent turns (epoch seconds) and whether the guard stopped it."""

    turns: tuple[float, ...] = ()
    stopped: bool = False
    last: float | None = None  # the last message the guard saw


def loop_guard(state: LoopState, now: float, *, max_turns: int, window: float
               ) -> tuple[LoopVerdict, LoopState]:
    """Whether a chat's next turn may run at ``now`` (the time of its newest message).

    ``answer``: run it; ``stop``: the chat just passed ``max_turns`` turns within ``window``
    seconds (report it once); ``stopped``: still stopped. Quiet for ``window`` seconds (no
    message at all: a human pause, or the other bot gave up) ends it. ``max_turns <= 0``: off.
    """
    if max_turns <= 0:
        return "answer", state
    if state.last is not None and now - state.last >= window:
        state = LoopState()
    if state.stopped:
        return "stopped", replace(state, last=now)
    turns = (*(t for t in state.turns if now - t < window), now)
    if len(turns) > max_turns:
        return "stop", LoopState(turns, stopped=True, last=now)
    return "answer", LoopState(turns, stopped=False, last=now)
