"""The outbox's decisions (pure): what a refused send means, and what a reply left uncertain
by a crash becomes.

What holds per backend (``WhatsAppBackend.honours_message_id``):

- the simulator sends with the id the outbox chose before the first attempt, so a resend after
  a crash is the same message: **exactly once**;
- neonize 0.5.2 cannot (whatsmeow picks the id inside the library call). The outbox commits a
  ``sending`` mark before the call and ``sent`` (with WhatsApp's id) after it; a crash in
  between leaves the reply ``sending``: it may or may not have gone out. With
  ``conversation.uncertain_replies = resend`` (default) it is sent again: **at least once**;
  with ``drop`` it is not: **at most once**. Receipts cannot settle it: the id WhatsApp would
  acknowledge is the one the library had not yet returned when the process died.

A send the library refuses is certain (nothing went out): it is tried again after
:func:`backoff`, at most ``send_attempts`` times, then marked failed; a refusal because the
link is down is no attempt at all (it waits for the link).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_BACKOFF = 300.0  # seconds: the longest wait between two tries of one reply

Uncertain = Literal["resend", "drop"]


def backoff(attempts: int, base: float, cap: float = MAX_BACKOFF) -> float:
    """Seconds to wait after the ``attempts``-th failed try (1, 2, ...): ``base`` doubling."""
    if attempts <= 0 or base <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(attempts - 1, 30)))


@dataclass(frozen=True)
class AfterError:
    action: Literal["retry", "fail", "wait"]  # wait: the link is down, not an attempt
    attempts: int  # tries counted so far
    next_try: float  # epoch seconds (retry/wait)


def after_send_error(attempts: int, connected: bool, now: float, *, max_attempts: int,
                     base: float) -> AfterError:
    """What to do with a reply whose send just raised ``SendError`` (nothing went out).

    ``attempts``: failed tries before this one; ``connected``: whether the link is still up
    (a refusal while it is down is not the reply's fault).
    """
    if not connected:
        return AfterError("wait", attempts, now)
    tried = attempts + 1
    if tried >= max_attempts:
        return AfterError("fail", tried, now)
    return AfterError("retry", tried, now + backoff(tried, base))


def uncertain(honours_message_id: bool, setting: Uncertain) -> Uncertain:
    """A reply found ``sending`` after a restart: with the backend keeping our id, sending
    it again is the same message (so always ``resend``); otherwise the operator's choice."""
    return "resend" if honours_message_id else setting
