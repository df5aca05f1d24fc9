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
==================  ==============================================  ===========

:func:`decide` (pure) says what to do with one message, in this order:

1. a command (``/word``) from the owner (a message the account itself sent, or whose sender
   is the account's number) or, with ``commands_from = everyone``, from anyone the reply
   rules below would answer -> ``command``; anyone else's ``/word`` is an ordinary message;
2. messages the account sent itself (``from_me``) -> skipped, except in ``self`` mode in the
   owner's own "message yourself" chat;
3. ``self`` mode: everything else is skipped;
4. groups: ``off`` skips, ``mention`` answers only when the account is @-mentioned or
   replied to, ``all`` answers all; with ``allowlist`` the group sender must be listed too;
5. ``allowlist``: only listed senders; ``everyone``: everybody.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent import commands
from agent.commands import Command
from agent.whatsapp.events import IncomingMessage
from wabridge.errors import PolicyError

ReplyTo = Literal["everyone", "allowlist", "self"]
Groups = Literal["off", "mention", "all"]
CommandsFrom = Literal["owner", "everyone"]
Action = Literal["answer", "command", "skip"]

_REPLY_TO: tuple[ReplyTo, ...] = ("everyone", "allowlist", "self")
_GROUPS: tuple[Groups, ...] = ("off", "mention", "all")
_COMMANDS_FROM: tuple[CommandsFrom, ...] = ("owner", "everyone")
_PHONE = re.compile(r"^\d{6,15}$")


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


DEFAULT = Policy()


def normalize_phone(value: str) -> str | None:
    """Digits with country code, or None when ``value`` is not a phone number."""
    digits = re.sub(r"[\s\-()]", "", value)
    digits = digits.removeprefix("+")
    return digits if _PHONE.match(digits) else None


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
                                     allowed="digits with country code, e.g. 4915112345678")
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

    return Policy(
        reply_to=reply_to,  # type: ignore[arg-type]  # checked by _choice
        allowlist=frozenset(allow),
        groups=groups,  # type: ignore[arg-type]
        commands_from=commands_from,  # type: ignore[arg-type]
        daily_budget_usd=budget,
    )


def phone_of(jid: str) -> str:
    """The user part of a JID without device/agent suffix: ``49151…:3@s.whatsapp.net`` ->
    ``49151…``."""
    user = jid.partition("@")[0]
    return user.partition(":")[0].partition(".")[0]


def is_owner(msg: IncomingMessage, owner_phone: str) -> bool:
    """Sent by the account itself (from any of its devices) or from the account's number."""
    return msg.from_me or (bool(owner_phone) and phone_of(msg.sender) == owner_phone)


def is_self_chat(msg: IncomingMessage, owner_phone: str) -> bool:
    """The owner's own "message yourself" chat."""
    return (not msg.is_group and bool(owner_phone) and phone_of(msg.chat_id) == owner_phone)


def owner_wrote(msg: IncomingMessage, owner_phone: str) -> bool:
    """The owner wrote in one of the account's chats (from the phone or another device of
    theirs), not in the self chat: the owner is talking to that contact personally. The
    message is never answered as the contact's (it is ``from_me``); human takeover (issue 15)
    hooks here. The bot's own replies are told apart earlier, by the outbox's ids."""
    return msg.from_me and not is_self_chat(msg, owner_phone)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""  # why skipped (stored with the message), or what was decided
    command: Command | None = None


def _reply_rules(msg: IncomingMessage, policy: Policy, owner_phone: str) -> Decision:
    if msg.from_me:
        if policy.reply_to == "self" and is_self_chat(msg, owner_phone):
            return Decision("answer", "self_chat")
        return Decision("skip", "from_me")
    if policy.reply_to == "self":
        return Decision("skip", "not_self_chat")
    if msg.is_group:
        if policy.groups == "off":
            return Decision("skip", "groups_off")
        if policy.groups == "mention" and not msg.mentioned:
            return Decision("skip", "not_mentioned")
    if policy.reply_to == "allowlist" and phone_of(msg.sender) not in policy.allowlist:
        return Decision("skip", "not_allowlisted")
    return Decision("answer", "group" if msg.is_group else "direct")


def decide(msg: IncomingMessage, policy: Policy, owner_phone: str) -> Decision:
    """What to do with one message (pure). ``owner_phone``: the account's digits, or ""."""
    command = commands.parse(msg.text) if not msg.images else None
    rules = _reply_rules(msg, policy, owner_phone)
    if command is not None:
        if is_owner(msg, owner_phone):
            return Decision("command", "owner", command)
        if policy.commands_from == "everyone" and rules.action == "answer":
            return Decision("command", "everyone", command)
    return rules
