"""Context rotation and recovery seeds, as pure functions.

A chat's Claude conversation grows with every turn. Before it reaches the model's window
(where the CLI would auto-compact on its own terms), the engine rotates it: it asks the
session for a summary (a special turn whose text never reaches WhatsApp), stores it numbered,
closes the process and starts a fresh session whose first turn carries the summary.

The same seed format serves recovery: when a stored session cannot be resumed (transcript
missing or too large) the fresh session is seeded with the latest summary and the last stored
messages of the chat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

SUMMARY_PROMPT = (
    "[wabridge] This conversation is about to continue in a new session that will not see "
    "it. Write a summary of 3 to 4 paragraphs of everything that must be remembered to carry "
    "it on: who the user is, what was asked and answered, facts, names, preferences, open "
    "questions and promises made. Reply with the summary only, no preamble."
)

SUMMARY_HEADER = "Summary of the earlier conversation:"
RECENT_HEADER = "Most recent messages of the earlier conversation (oldest first):"
NEW_HEADER = "New message:"

Reason = Literal["context", "turns"]


def context_tokens(usage: Mapping[str, int]) -> int:
    """Context a turn used: its input plus cache tokens (what the next turn starts from)."""
    return (int(usage.get("input_tokens", 0)) + int(usage.get("cache_creation_input_tokens", 0))
            + int(usage.get("cache_read_input_tokens", 0)))


def should_rotate(context_used: int, session_turns: int, *, window: int, threshold: float,
                  max_turns: int) -> Reason | None:
    """Why the conversation must be rotated now, or None.

    ``threshold`` is a fraction of ``window``; ``max_turns`` counts turns of this session.
    """
    if window > 0 and context_used >= threshold * window:
        return "context"
    if max_turns > 0 and session_turns >= max_turns:
        return "turns"
    return None


@dataclass(frozen=True)
class HistoryLine:
    role: Literal["user", "assistant"]
    text: str


def seed_text(summary: str | None, recent: Sequence[HistoryLine]) -> str:
    """What a fresh session must know first; "" when there is nothing."""
    parts: list[str] = []
    if summary and summary.strip():
        parts.append(f"{SUMMARY_HEADER}\n{summary.strip()}")
    if recent:
        lines = [f"{'User' if h.role == 'user' else 'You'}: {h.text}" for h in recent]
        parts.append(RECENT_HEADER + "\n" + "\n".join(lines))
    return "\n\n".join(parts)


def with_seed(content: str | list[dict[str, Any]], seed: str
              ) -> str | list[dict[str, Any]]:
    """The first turn of a fresh session: the seed, then the new message(s)."""
    if not seed:
        return content
    if isinstance(content, str):
        return f"{seed}\n\n{NEW_HEADER}\n{content}"
    return [{"type": "text", "text": f"{seed}\n\n{NEW_HEADER}"}, *content]
