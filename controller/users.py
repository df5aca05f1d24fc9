"""The controller's record of each user: one ``UserState`` per user, owned by the
``Controller`` (``controller.main``), changed only by its event handlers.

The pure decisions (``controller.reconcile``) read what a record holds; the record holds no
decision of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from controller import reconcile as rc
from controller.plane import AccountDoc
from controller.unit_manager import UnitState
from wabridge.status import DocStatus

T = TypeVar("T")


@dataclass(eq=False)
class UserState:
    """Everything the controller knows and keeps about one user, in one place.

    ``doc`` and ``unit`` are the facts (the account document, the unit's last state); the rest
    is the bookkeeping that orders events: which unit states predate our last start
    (``unit_events``/``start_mark``, see ``reconcile.predates_start``), which worker reports
    come from a process older than a claimed (re)start (``requested_at``, see
    ``reconcile.stale_report``). Only the controller's event handlers change it."""

    user_id: str
    doc: AccountDoc | None = None
    unit: UnitState | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one plan carried out at a time
    unit_events: int = 0  # unit states delivered
    start_mark: int | None = None  # unit_events when our last start was queued
    starting: asyncio.Event | None = None  # set when the start holding a slot settled
    gone: asyncio.Event | None = None  # fleet: set when no process of its unit is left
    requested_at: float = 0.0  # monotonic time of a claimed (re)start
    last_report: DocStatus | None = None  # what its worker last reported
    reported: dict[str, float] = field(default_factory=dict)  # its latest metrics frame
    process_written_at: float = 0.0  # monotonic time of the last ``process`` write
    process_key: tuple[int, str, int] | None = None  # (pid, state, restarts) then

    @property
    def view(self) -> rc.UnitView | None:
        """The unit as the decisions see it (None: no unit state known)."""
        return rc.view_of(self.unit) if self.unit is not None else None

    @property
    def known(self) -> bool:
        """Whether there is anything to show of this user (a document or a unit)."""
        return self.doc is not None or self.unit is not None


class Column(Mapping[str, T]):
    """A read-only view of one fact of every user (``Controller.docs``/``units``)."""

    def __init__(self, users: dict[str, UserState], get: Callable[[UserState], T | None]) -> None:
        self._users = users
        self._get = get

    def __getitem__(self, user_id: str) -> T:
        state = self._users.get(user_id)
        value = self._get(state) if state is not None else None
        if value is None:
            raise KeyError(user_id)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter([u for u, s in self._users.items() if self._get(s) is not None])

    def __len__(self) -> int:
        return sum(1 for s in self._users.values() if self._get(s) is not None)
