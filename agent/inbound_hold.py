"""Inbound messages WhatsApp already acknowledged but the store could not commit (PostgreSQL
down or restarting): kept in memory, in arrival order, and committed as soon as the store
takes them again, so an acknowledged message is never dropped silently.

neonize acks a message before Python sees it: the sink's commit is the only copy. The sink
(on neonize's thread) hands a refused message here through the event loop; the worker's
once-a-second supervision calls :meth:`InboundHold.retry`; at shutdown a last retry, then
whatever is left is named in the log (``store.inbound_lost``): giving up loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.whatsapp.events import IncomingMessage

FIRST_DELAY = 1.0
MAX_DELAY = 30.0


def next_delay(previous: float) -> float:
    """Backoff between retries: 1 s, doubling, at most 30 s."""
    return min(MAX_DELAY, previous * 2) if previous else FIRST_DELAY


@dataclass
class InboundHold:
    """Only the event loop's thread touches it."""

    held: list[IncomingMessage] = field(default_factory=list)
    delay: float = 0.0
    next_try: float = 0.0

    def hold(self, message: IncomingMessage, now: float) -> None:
        self.held.append(message)
        if self.next_try == 0.0:
            self.delay = next_delay(0.0)
            self.next_try = now + self.delay

    def retry(self, persist: Callable[[IncomingMessage], bool], now: float, *,
              force: bool = False) -> tuple[list[IncomingMessage], Exception | None]:
        """Commit the held messages in order while the store takes them (not before the
        backoff allows, unless ``force``). Returns the newly committed ones (duplicates left
        out) and the error that stopped the run, if any."""
        if not self.held or (now < self.next_try and not force):
            return [], None
        committed: list[IncomingMessage] = []
        while self.held:
            try:
                fresh = persist(self.held[0])
            except Exception as exc:  # noqa: BLE001 (any store failure: keep, try later)
                self.delay = next_delay(self.delay)
                self.next_try = now + self.delay
                return committed, exc
            message = self.held.pop(0)
            if fresh:
                committed.append(message)
        self.delay, self.next_try = 0.0, 0.0
        return committed, None
