"""Chat commands (``/reset``, ``/status``, ``/help``): parsing and reply texts, all pure.

A message is a command when its text, stripped, is ``/word`` optionally followed by
whitespace and arguments (``/usr/bin is a path`` is not: the token must end at whitespace).
An unknown ``/word`` is still a command: it gets the help text, never a Claude turn.
Whether a sender may run commands is decided in :mod:`agent.policy`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMMAND = re.compile(r"^/([A-Za-z][A-Za-z0-9_-]{0,31})(?:\s+(.*))?$", re.DOTALL)

KNOWN = ("reset", "status", "help", "scheduled", "memory", "persona", "pause", "resume",
         "paused")
# the owner's, from the self chat only (a contact never runs them, even with
# ``commands_from = everyone``; typed into a contact's chat they are not answered there)
OWNER_ONLY = ("persona", "pause", "resume", "paused")
_CHAT_SUFFIXES = ("@s.whatsapp.net", "@g.us", "@lid")

HELP_TEXT = (
    "Commands:\n"
    "/reset - start a new conversation (I forget what we talked about)\n"
    "/status - context used, turns, cost today and model\n"
    "/scheduled - messages Claude scheduled (/scheduled cancel N cancels one)\n"
    "/memory - what Claude remembers about your contacts\n"
    "/help - this text"
)
# /help in the owner's self chat: the commands only the owner has too
OWNER_HELP_TEXT = (
    "\n\nIn your own chat (message yourself) only:\n"
    "/persona <chat> <text> - that chat's own system prompt (/persona <chat> reset: back to "
    "the account's)\n"
    "/pause <chat> [minutes] - stop answering that chat (no minutes: until /resume)\n"
    "/resume <chat> - answer that chat again\n"
    "/paused - the chats not answered now"
)
OWNER_ONLY_TEXT = "/{name} works only in your own chat (message yourself)."

RESET_TEXT = "New conversation started. I have forgotten our earlier messages."


@dataclass(frozen=True)
class ChatCommand:
    name: str  # lower case, without the slash
    args: str = ""

    @property
    def known(self) -> bool:
        return self.name in KNOWN


def parse(text: str) -> ChatCommand | None:
    """The command in ``text``, or None when it is an ordinary message."""
    m = _COMMAND.match(text.strip())
    if m is None:
        return None
    return ChatCommand(m.group(1).lower(), (m.group(2) or "").strip())


@dataclass(frozen=True)
class StatusInfo:
    context_tokens: int  # of the last turn: input + cache tokens
    context_window: int
    session_turns: int  # turns in the current conversation (since the last rotation/reset)
    total_turns: int  # all turns of this chat
    cost_today_usd: float  # the user's spend today (UTC), all chats
    daily_budget_usd: float  # <= 0: no cap
    model: str  # empty: the CLI's default
    summaries: int  # conversation summaries kept for this chat (rotations)
    personas: tuple[tuple[str, str], ...] = ()  # (chat, its own prompt); shown to the owner


def status_text(info: StatusInfo) -> str:
    if info.context_window > 0:
        pct = round(100 * info.context_tokens / info.context_window)
        context = f"{info.context_tokens:,} of {info.context_window:,} tokens ({pct}%)"
    else:  # a window not known: no share of it
        context = f"{info.context_tokens:,} tokens"
    budget = (f" of ${info.daily_budget_usd:.2f} daily budget" if info.daily_budget_usd > 0
              else " (no daily budget)")
    return "\n".join([
        "Status",
        f"Context used: {context}",
        f"Turns: {info.session_turns} in this conversation, {info.total_turns} in this chat",
        f"Cost today: ${info.cost_today_usd:.4f}{budget}",
        f"Model: {info.model or 'default'}",
        f"Summaries of earlier conversation: {info.summaries}",
        *(f"Own persona of {chat}: {_short(text)}" for chat, text in info.personas),
    ])


def _short(text: str, limit: int = 80) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[:limit - 1] + "\u2026"


def chat_arg(args: str) -> tuple[str, str]:
    """The chat an owner command names (a phone number as people type it, or a JID) and the
    rest of its arguments. Raises ``ValueError`` naming what is wrong."""
    token, _, rest = args.strip().partition(" ")
    if not token:
        raise ValueError("name the chat: a phone number with country code, or a chat JID")
    if token.endswith(_CHAT_SUFFIXES):
        return token, rest.strip()
    digits = token.removeprefix("+").replace("-", "")
    if digits.isascii() and digits.isdigit() and 7 <= len(digits) <= 15:
        return f"{digits}@s.whatsapp.net", rest.strip()
    raise ValueError(f"{token!r} is not a phone number (digits with country code) or a chat JID")


def paused_text(paused: list[tuple[str, float]], now: float) -> str:
    """``/paused``: (chat, until epoch or inf) of the chats paused now."""
    if not paused:
        return "No chat is paused."
    lines = ["Paused chats:"]
    for chat, until in sorted(paused):
        left = ("until /resume" if until == float("inf")
                else f"{max(1, round((until - now) / 60))} min left")
        lines.append(f"{chat}: {left}")
    return "\n".join(lines)


def unknown_text(command: ChatCommand) -> str:
    return f"Unknown command /{command.name}.\n\n{HELP_TEXT}"


def scheduled_text(items: list[tuple[int, str, str, str]]) -> str:
    """``/scheduled``: (id, chat, local time, text) of every pending scheduled message."""
    if not items:
        return "No scheduled messages."
    lines = [f"#{n} {when} to {chat}: {text}" for n, chat, when, text in items]
    return "Scheduled messages:\n" + "\n".join(lines) + "\n\n/scheduled cancel N cancels one."


def memory_text(notes: list[tuple[int, str, str]]) -> str:
    """``/memory``: (id, chat, note) of every note Claude keeps."""
    if not notes:
        return "No notes."
    return "Notes about your contacts:\n" + "\n".join(
        f"#{n} {chat}: {text}" for n, chat, text in notes)
