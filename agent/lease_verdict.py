"""Whether a fleet worker may still act as its account's owner (pure).

The lease lives in PostgreSQL and expires on the database's clock; the worker cannot read
that clock without the database, which is exactly what it may have lost. So it counts on its
own monotonic clock from the moment it *sent* its last successful renewal (the renewal took
effect no earlier than that, so the lease runs at least ``lease_seconds`` from then) and
gives up ``margin_seconds`` before that point: by then WhatsApp must be disconnected, well
before another host may take the account (expiry plus ``fleet.grace_seconds``).

A frozen host (a paused VM, SIGSTOP) sees the whole pause pass at once when it thaws: the
first check after it says ``stop``, whichever task runs first.
"""

from __future__ import annotations

from enum import StrEnum


class Verdict(StrEnum):
    KEEP = "keep"  # the lease is surely ours: go on
    STOP = "stop"  # it may be gone: disconnect WhatsApp, exit "lease lost"


def lease_verdict(now_mono: float, last_ok_mono: float, lease_seconds: float,
                  margin_seconds: float) -> Verdict:
    """``keep`` while less than ``lease_seconds - margin_seconds`` passed since the last
    successful renewal was sent (``last_ok_mono``, same monotonic clock as ``now_mono``)."""
    if now_mono - last_ok_mono >= lease_seconds - margin_seconds:
        return Verdict.STOP
    return Verdict.KEEP
