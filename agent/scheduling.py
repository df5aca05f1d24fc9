"""When a scheduled message is due, and whether a chat may schedule one more: pure decisions.

``when`` is what the model passes to the ``schedule_message`` tool: an ISO 8601 time (one
without an offset is the user's local time, per the ``timezone`` setting) or a delay
(``in 5 seconds``, ``in 10 minutes``, ``in 2 hours``, ``in 1 day``). Anything else, a time in
the past or further ahead than :data:`MAX_AHEAD`, is refused with a sentence the model can
act on (:class:`BadWhen`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

#: The furthest ahead a message may be scheduled.
MAX_AHEAD: Final = timedelta(days=366)

_DELAY = re.compile(
    r"^\s*in\s+(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?|d|days?)"
    r"\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class BadWhen(ValueError):
    """``when`` could not be understood or is out of range; the text says which."""


def due_at(when: str, now: float, timezone: str) -> float:
    """The epoch time ``when`` means, seen at ``now`` by a user in ``timezone`` (IANA name)."""
    m = _DELAY.match(when)
    if m:
        amount = float(m.group(1))
        unit = m.group(2).lower()[0]
        at = now + amount * _UNIT_SECONDS[unit]
    else:
        try:
            parsed = datetime.fromisoformat(when.strip())
        except ValueError:
            raise BadWhen(
                f"{when!r} is not a time: use ISO 8601 like 2026-05-01T09:00 (local time, "
                f"{timezone}) or a delay like 'in 10 minutes'") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=ZoneInfo(timezone))
        at = parsed.timestamp()
    if at < now - 1:
        shown = datetime.fromtimestamp(at, ZoneInfo(timezone)).isoformat(timespec="seconds")
        raise BadWhen(f"{shown} is in the past")
    if at > now + MAX_AHEAD.total_seconds():
        raise BadWhen(f"at most {MAX_AHEAD.days} days ahead")
    return max(at, now)


def local_time(at: float, timezone: str) -> str:
    """``at`` as the user reads it: ``2026-05-01 09:00:00 (Europe/Berlin)``."""
    shown = datetime.fromtimestamp(at, ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M:%S")
    return f"{shown} ({timezone})"


def utc_day_of(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def refusal(pending_in_chat: int, made_today: int, *, per_chat: int, per_day: int) -> str | None:
    """Why one more scheduled message is refused (None: allowed)."""
    if pending_in_chat >= per_chat:
        return (f"this chat already has {pending_in_chat} scheduled messages (at most "
                f"{per_chat}); cancel one first")
    if made_today >= per_day:
        return f"{made_today} messages were scheduled today (at most {per_day} a day)"
    return None
