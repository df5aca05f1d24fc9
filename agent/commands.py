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

KNOWN = ("reset", "status", "help", "scheduled", "memory")

HELP_TEXT = (
    "Commands:\n"
    "/reset - start a new conversation (I forget what we talked about)\n"
    "/status - context used, turns, cost today and model\n"
    "/scheduled - messages Claude scheduled (/scheduled cancel N cancels one)\n"
    "/memory - what Claude remembers about your contacts\n"
    "/help - this text"
)

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
    ])


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
