"""``controller.assignment.assign``: which host runs which account, as a table."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from controller.assignment import Host, assign

A, B, C = Host("a", alive=True), Host("b", alive=True), Host("c", alive=True)
DEAD_B = Host("b", alive=False)
DRAINING_A = Host("a", alive=True, draining=True)


def small(host_id: str, room: int) -> Host:
    return Host(host_id, alive=True, max_workers=room)


CASES = [
    # (what, accounts, hosts, holders, pins, expected)
    ("no hosts: nobody", ["u1"], [], {}, {}, {"u1": None}),
    ("no accounts: empty plan", [], [A, B], {}, {}, {}),
    ("new accounts spread, ties by host id", ["u1", "u2", "u3", "u4"], [B, A], {}, {},
     {"u1": "a", "u2": "b", "u3": "a", "u4": "b"}),
    ("sticky: the holder keeps its account even when unbalanced", ["u1", "u2", "u3"],
     [A, B], {"u1": "a", "u2": "a", "u3": "a"}, {}, {"u1": "a", "u2": "a", "u3": "a"}),
    ("a new account goes to the least loaded", ["u1", "u2", "u3"], [A, B],
     {"u1": "a", "u2": "a"}, {}, {"u1": "a", "u2": "a", "u3": "b"}),
    ("a dead holder's accounts go elsewhere", ["u1", "u2"], [A, DEAD_B],
     {"u1": "b", "u2": "b"}, {}, {"u1": "a", "u2": "a"}),
    ("a dead holder's accounts spread over the living", ["u1", "u2", "u3", "u4"],
     [A, DEAD_B, C], {"u1": "b", "u2": "b", "u3": "b", "u4": "b"}, {},
     {"u1": "a", "u2": "c", "u3": "a", "u4": "c"}),
    ("a holder unknown to the hosts table is not alive", ["u1"], [A], {"u1": "gone"}, {},
     {"u1": "a"}),
    ("draining: its accounts go elsewhere", ["u1", "u2"], [DRAINING_A, B],
     {"u1": "a", "u2": "b"}, {}, {"u1": "b", "u2": "b"}),
    ("draining and alone: nowhere to go", ["u1"], [DRAINING_A], {"u1": "a"}, {},
     {"u1": None}),
    ("a draining host takes no new account", ["u1", "u2"], [DRAINING_A, B], {}, {},
     {"u1": "b", "u2": "b"}),
    ("undrained: stays empty, the others keep theirs", ["u1", "u2", "u3"], [A, B],
     {"u1": "b", "u2": "b"}, {}, {"u1": "b", "u2": "b", "u3": "a"}),
    ("a pin moves a sticky account", ["u1"], [A, B], {"u1": "a"}, {"u1": "b"}, {"u1": "b"}),
    ("a pin to a dead host is not followed", ["u1"], [A, DEAD_B], {"u1": "a"},
     {"u1": "b"}, {"u1": "a"}),
    ("a pin to a draining host is not followed", ["u1"], [DRAINING_A, B], {"u1": "b"},
     {"u1": "a"}, {"u1": "b"}),
    ("a pin to an unknown host is not followed", ["u1"], [A], {}, {"u1": "zz"},
     {"u1": "a"}),
    ("a pin to a full host is not followed", ["u1", "u2"], [small("a", 1), B],
     {"u1": "a", "u2": "b"}, {"u2": "a"}, {"u1": "a", "u2": "b"}),
    ("pins take room before new accounts", ["u1", "u2"], [small("a", 1), B],
     {}, {"u2": "a"}, {"u1": "b", "u2": "a"}),
    ("a pin to the holder is stickiness", ["u1", "u2"], [small("a", 1), B],
     {"u1": "a"}, {"u1": "a"}, {"u1": "a", "u2": "b"}),
    ("an account pinned away frees its room for another pin", ["u1", "u2"],
     [small("a", 1), small("b", 1)], {"u1": "a", "u2": "b"}, {"u1": "b", "u2": "a"},
     {"u1": "b", "u2": "a"}),
    ("no room anywhere: nobody", ["u1", "u2", "u3"], [small("a", 1), small("b", 1)], {}, {},
     {"u1": "a", "u2": "b", "u3": None}),
    ("a full host gets no new account though least loaded", ["u1", "u2", "u3"],
     [small("a", 1), B], {"u2": "b", "u3": "b"}, {}, {"u1": "a", "u2": "b", "u3": "b"}),
    ("room is counted with sticky accounts", ["u1", "u2", "u3"], [small("a", 2), B],
     {"u1": "a", "u2": "a"}, {}, {"u1": "a", "u2": "a", "u3": "b"}),
    ("duplicate accounts count once", ["u1", "u1", "u2"], [A, B], {}, {},
     {"u1": "a", "u2": "b"}),
]


@pytest.mark.parametrize(("accounts", "hosts", "holders", "pins", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_assign(accounts: list[str], hosts: list[Host], holders: dict[str, str],
                pins: dict[str, str], expected: dict[str, str | None]) -> None:
    assert assign(accounts, hosts, holders, pins) == expected


def test_same_plan_whatever_the_order_of_the_snapshot() -> None:
    """Every controller reads the same rows in its own order: they must agree."""
    accounts = [f"u{i:02d}" for i in range(7)]
    hosts = [A, Host("b", alive=True, max_workers=2), C, Host("d", alive=False)]
    holders = {"u01": "c", "u03": "d", "u05": "b"}
    plans = {tuple(sorted(assign(list(a), list(h), holders, {"u06": "a"}).items()))
             for a in itertools.permutations(accounts[:4])
             for h in itertools.permutations(hosts)}
    assert len(plans) == 1


@pytest.mark.parametrize(("hosts", "accounts"), [(3, 12), (3, 13), (4, 10), (2, 1), (5, 99)])
def test_a_burst_spreads_within_one(hosts: int, accounts: int) -> None:
    fleet = [Host(f"h{i}", alive=True) for i in range(hosts)]
    plan = assign([f"u{i:03d}" for i in range(accounts)], fleet, {}, {})
    loads = Counter(plan.values())
    counts = [loads.get(h.host_id, 0) for h in fleet]
    assert max(counts) - min(counts) <= 1
    assert sum(counts) == accounts
