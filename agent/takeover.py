"""Human takeover: the owner answers a chat personally and the bot steps back (all pure).

When the owner writes in a chat from the phone (an own message that is not one of the bot's
replies: the outbox knows every id it sent), the bot pauses in that chat for the user's
``takeover_minutes``. What is said meanwhile -- the owner's lines and the contact's -- is
kept as the chat's :class:`Pause` context and handed to Claude in front of the first turn
after the pause ends (by time, or ``/resume`` from the self chat), so Claude does not
contradict what the owner said. The contact's messages themselves stay in the inbox, skipped
with reason ``paused``.

Times are the messages' own (``received_at``, epoch seconds), so a restart decides the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

CONTEXT_HEADER = ("[While you were paused, the account's owner answered this chat personally. "
                  "What was said meanwhile, oldest first; do not contradict the owner:]")
NEW_HEADER = "[New message(s):]"
MAX_CONTEXT_LINES = 50  # a long pause keeps its newest lines


@dataclass(frozen=True)
class Pause:
    """One chat's takeover: paused until ``until`` (epoch; ``inf``: until ``/resume``), and the
    lines to give Claude at its next turn."""

    until: float = 0.0
    context: tuple[str, ...] = ()

    def active(self, now: float) -> bool:
        return now < self.until


def _add(pause: Pause, line: str) -> tuple[str, ...]:
    return (*pause.context, line)[-MAX_CONTEXT_LINES:]


def owner_wrote(pause: Pause, at: float, minutes: float, text: str) -> Pause:
    """The owner wrote ``text`` at ``at``: paused for ``minutes`` from then (never shortened;
    0 minutes: no pause, but Claude still learns what the owner said)."""
    until = max(pause.until, at + minutes * 60) if minutes > 0 else pause.until
    return Pause(until, _add(pause, f"[owner] {text}"))


def held(pause: Pause, line: str) -> Pause:
    """A contact's message that arrived during the pause (not answered, kept as context)."""
    return replace(pause, context=_add(pause, line))


def pause_for(pause: Pause, now: float, minutes: float | None) -> Pause:
    """``/pause <chat> [minutes]``: paused from ``now``; no minutes: until ``/resume``."""
    return replace(pause, until=math.inf if minutes is None else now + minutes * 60)


def resumed(pause: Pause) -> Pause:
    """``/resume <chat>``: answered again from the next message; the context stays for it."""
    return replace(pause, until=0.0)


def with_context(content: str | list[dict[str, Any]], pause: Pause
                 ) -> str | list[dict[str, Any]]:
    """The first turn after a pause: what was said meanwhile, then the new message(s)."""
    if not pause.context:
        return content
    block = "\n".join((CONTEXT_HEADER, *pause.context, "", NEW_HEADER))
    if isinstance(content, str):
        return f"{block}\n{content}"
    return [{"type": "text", "text": block}, *content]


def parse_minutes(text: str) -> float | None:
    """``/pause``'s optional minutes: a positive number, or None when not given. Raises
    ``ValueError`` naming the problem."""
    if not text:
        return None
    try:
        minutes = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of minutes") from None
    if not math.isfinite(minutes) or minutes <= 0:
        raise ValueError(f"{text!r} is not a positive number of minutes")
    return minutes


# --- storage: one JSON map per worker (the store's key-value table) --------------------------

def dump(pauses: dict[str, Pause]) -> str:
    return json.dumps({chat: {"until": None if math.isinf(p.until) else p.until,
                              "context": list(p.context)}
                       for chat, p in pauses.items() if p.until > 0 or p.context})


def load(raw: str | None) -> dict[str, Pause]:
    if not raw:
        return {}
    out: dict[str, Pause] = {}
    for chat, item in dict(json.loads(raw)).items():
        until = item.get("until")
        out[str(chat)] = Pause(math.inf if until is None else float(until),
                               tuple(str(x) for x in item.get("context", ())))
    return out
