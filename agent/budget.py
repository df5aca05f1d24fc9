"""Budgets and rate limits as pure functions (clocks are passed in, never read here).

- ``take``: a per-sender inbound token bucket (``rate_per_minute`` refill, ``burst`` capacity)
  so one contact cannot burn the user's budget.
- ``send_delay``: outbound pacing per account: a minimum gap plus random jitter between two
  sends (reduces the risk that WhatsApp flags the account as a bot).
- ``over_budget`` / ``effective_budget`` / ``utc_day``: the daily cost cap per user, summed
  per UTC day from each turn's ``turn_cost_usd``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    """A sender's token bucket: ``tokens`` left at time ``at`` (seconds, any clock)."""

    tokens: float
    at: float


def take(bucket: Bucket | None, now: float, rate_per_minute: float, burst: int
         ) -> tuple[bool, Bucket]:
    """Try to take one token at ``now``: ``(allowed, new bucket)``.

    A new sender starts full (``burst`` tokens). Tokens refill continuously at
    ``rate_per_minute / 60`` per second up to ``burst``. A clock that goes backwards refills
    nothing. ``rate_per_minute <= 0`` disables the limit.
    """
    if rate_per_minute <= 0:
        return True, Bucket(float(burst), now)
    if bucket is None:
        bucket = Bucket(float(burst), now)
    elapsed = max(0.0, now - bucket.at)
    tokens = min(float(burst), bucket.tokens + elapsed * rate_per_minute / 60.0)
    at = max(now, bucket.at)
    if tokens >= 1.0:
        return True, Bucket(tokens - 1.0, at)
    return False, Bucket(tokens, at)


def send_delay(last_sent: float | None, now: float, gap: float, jitter: float) -> float:
    """Seconds to wait before the next send: ``gap + jitter`` after the last one, or 0.

    ``jitter`` is the already drawn random part (0 <= jitter <= the configured maximum), so
    this stays pure and table-testable.
    """
    if last_sent is None:
        return 0.0
    return max(0.0, last_sent + gap + jitter - now)


def effective_budget(override: float | None, default: float) -> float:
    """The user's daily cap: the per-user setting when given, else the configured default."""
    return default if override is None else override


def over_budget(spent: float, budget: float) -> bool:
    """Whether no more Claude turns may run today. ``budget <= 0`` means no cap."""
    return budget > 0 and spent >= budget


def utc_day(ts: float) -> str:
    """``YYYY-MM-DD`` of an epoch timestamp in UTC (the budget day)."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))
