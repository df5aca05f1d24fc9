"""Inbound messages WhatsApp already acknowledged but the store could not commit (PostgreSQL
down or restarting): kept in memory, in arrival order, and committed as soon as the store
takes them again, so an acknowledged message is never dropped silently.

neonize acks a message before Python sees it: the sink's commit is the only copy. The sink
(on neonize's thread) hands a refused message here, and so is every later one while any is
held (:meth:`InboundHold.holding`): a message never overtakes an older one of its chat; the
worker's once-a-second supervision calls :meth:`InboundHold.retry` on the event loop; at
shutdown a last retry, then whatever is left is written to the state directory
(``agent.inbound_spill``, ``store.inbound_spilled``) and committed at the next start; only a
spill that fails too (a full disk) gives up, loudly (``store.inbound_lost``).
"""

from __future__ import annotations

import threading
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
    """:meth:`hold` and :meth:`holding` from any thread (the sink's), :meth:`retry` from one
    (the event loop's)."""

    held: list[IncomingMessage] = field(default_factory=list)
    delay: float = 0.0
    next_try: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def holding(self) -> bool:
        """Something is held: a new message must queue behind it, not be committed first."""
        with self.lock:
            return bool(self.held)

    def snapshot(self) -> list[IncomingMessage]:
        with self.lock:
            return list(self.held)

    def hold(self, message: IncomingMessage, now: float) -> None:
        with self.lock:
            self.held.append(message)
            if self.next_try == 0.0:
                self.delay = next_delay(0.0)
                self.next_try = now + self.delay

    def retry(self, persist: Callable[[IncomingMessage], bool], now: float, *,
              force: bool = False) -> tuple[list[IncomingMessage], Exception | None]:
        """Commit the held messages in order while the store takes them (not before the
        backoff allows, unless ``force``). Returns the newly committed ones (duplicates left
        out) and the error that stopped the run, if any."""
        if not self.holding() or (now < self.next_try and not force):
            return [], None
        committed: list[IncomingMessage] = []
        while True:
            with self.lock:
                if not self.held:
                    self.delay, self.next_try = 0.0, 0.0
                    return committed, None
                message = self.held[0]  # left in place while committed: later ones queue
            try:
                fresh = persist(message)
            except Exception as exc:  # noqa: BLE001 (any store failure: keep, try later)
                with self.lock:
                    self.delay = next_delay(self.delay)
                    self.next_try = now + self.delay
                return committed, exc
            with self.lock:
                self.held.pop(0)
            if fresh:
                committed.append(message)
