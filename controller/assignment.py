"""Which host runs which account: one pure, deterministic decision (``assign``).

Every controller of a fleet computes the plan from the same snapshot of the database (hosts,
leases, pins) and must reach the same answer, or two of them would each think an account is
theirs and race for its lease for ever (the lease keeps them from both running it, but the
account would bounce). So: no clock, no randomness, no dict order; accounts and hosts are
walked in sorted order, ties broken by host id.

The rules, in order, for each account:
1. a pin (``wabridgectl move``) wins if its host is alive, not draining and has room beside
   the accounts it keeps;
2. else the host that holds or last held its lease (stickiness), if alive and not draining:
   a running account is never moved for balance, and ``undrain`` pulls nothing back;
3. else the alive, non-draining host with the fewest accounts so far that has room (ties by
   host id), counting each account as it is placed, so a burst of new accounts spreads
   within one of each other;
4. else nobody (None): no host can take it now; it stays where it is, or waits.

An account whose host died falls to rule 3 (its lease holder is not alive); the loop that
carries the plan out starts it there only once the old lease has expired plus the grace
(``wabridge.fleet_db.acquire`` decides that, in the database's own time).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    """A host as the plan sees it (built from ``wabridge.fleet_db.HostRow``)."""

    host_id: str
    alive: bool  # heartbeat younger than ``fleet.host_dead_seconds``, in database time
    draining: bool = False
    max_workers: int = 0  # how many accounts it may run; 0 or less: no limit known


def assign(accounts: Iterable[str], hosts: Iterable[Host], holders: Mapping[str, str],
           pins: Mapping[str, str]) -> dict[str, str | None]:
    """Place every account of ``accounts`` (those whose documents want a worker).

    ``holders`` maps an account to the host that holds or last held its lease (released or
    expired included: that is the stickiness), ``pins`` an account to the host an operator
    moved it to. Returns account -> host id, or None when no host can take it.
    """
    usable = {h.host_id: h for h in hosts if h.alive and not h.draining}
    load = dict.fromkeys(usable, 0)

    def has_room(host_id: str) -> bool:
        limit = usable[host_id].max_workers
        return limit <= 0 or load[host_id] < limit

    def place(user: str, host_id: str | None) -> None:
        plan[user] = host_id
        if host_id is not None:
            load[host_id] += 1

    ordered = sorted(set(accounts))
    plan: dict[str, str | None] = {}
    # pins first, into the room their host has beside the accounts it runs and keeps (a
    # full host is not overfilled by a move: the pin waits until there is room)
    staying = Counter(holders[u] for u in ordered
                      if holders.get(u) in usable and pins.get(u, holders[u]) == holders[u])
    for user in ordered:
        pin = pins.get(user)
        if pin is None or pin not in usable or pin == holders.get(user):
            continue
        limit = usable[pin].max_workers
        if limit <= 0 or load[pin] + staying[pin] < limit:
            place(user, pin)
    # then the accounts that stay where they are: they take room whether or not it is there
    # (a host that shrank keeps what it runs; new accounts go elsewhere)
    for user in ordered:
        holder = holders.get(user)
        if user not in plan and holder is not None and holder in usable:
            place(user, holder)
    for user in ordered:
        if user in plan:
            continue
        candidates = [h for h in sorted(usable) if has_room(h)]
        place(user, min(candidates, key=lambda h: (load[h], h)) if candidates else None)
    return plan
