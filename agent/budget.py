"""Budgets and rate limits as pure functions (clocks are passed in, never read here).

- ``take``: a per-sender inbound token bucket (``rate_per_minute`` refill, ``burst`` capacity)
  so one contact cannot burn the user's budget.
- ``admit``: the bucket plus the "slow down" notice: one notice per episode, where an episode
  ends only when the sender paused long enough for the bucket to refill completely (a token
  that refills in the middle of a burst lets one message through, but is no new episode).
- ``send_delay``: outbound pacing per account: a minimum gap plus random jitter between two
  sends (reduces the risk that WhatsApp flags the account as a bot).
- ``over_budget`` / ``effective_budget`` / ``utc_day``: the daily cost cap per user, summed
  per UTC day from each turn's ``turn_cost_usd``.
- ``usage_cost``: a turn's cost from its token usage and the model's price (the ``api``
  engine; the CLI reports its own).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from wabridge.prices import Price


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


@dataclass(frozen=True)
class Admission:
    allowed: bool
    notify: bool  # send the "slow down" notice with this refusal
    bucket: Bucket
    slowed: bool  # the sender is in a rate-limit episode (was told to slow down)


def admit(bucket: Bucket | None, slowed: bool, now: float, rate_per_minute: float,
          burst: int) -> Admission:
    """One inbound message of a sender against their bucket, and whether to tell them.

    ``slowed``: the sender was told to slow down in the current episode. The episode ends
    when the bucket, refilled to ``now``, is full again: only a real pause starts a new one.
    """
    # refilled to now, before this message's token: full again (no bucket kept is a full one;
    # no rate always is)
    if slowed and take(bucket, now, rate_per_minute, burst)[1].tokens + 1.0 >= burst:
        slowed = False
    ok, after = take(bucket, now, rate_per_minute, burst)
    if ok:
        return Admission(True, False, after, slowed)
    return Admission(False, not slowed, after, True)


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


def usage_cost(usage: Mapping[str, int], price: Price) -> float:
    """USD for one request's ``usage`` at ``price`` (per million tokens)."""
    return (usage.get("input_tokens", 0) * price.input
            + usage.get("output_tokens", 0) * price.output
            + usage.get("cache_creation_input_tokens", 0) * price.cache_write
            + usage.get("cache_read_input_tokens", 0) * price.cache_read) / 1_000_000
