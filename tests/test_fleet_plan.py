"""``controller.fleet``: ``Fleet.plan`` (the pure placement, ``controller.assignment``, fed
with what this host knows beyond its last snapshot) and ``FleetDb``'s own thread. Each
controller places a burst from its own view (its documents, its snapshot of the leases); its
own starts under way must count as its own, or a host whose snapshot predates its
acquisitions plans more than its share; and its heartbeat must not wait behind other work,
or a live host looks dead to the others."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from controller.fleet import Fleet, FleetDb, FleetUnavailable, Snapshot
from wabridge import config, fleet_db

HOSTS = ("host-a", "host-b")


def unreachable() -> Any:
    raise AssertionError("the plan reads no database")


def fleet_at(host: str, leases: dict[str, str], *, starting: set[str] = frozenset(),  # type: ignore[assignment]
             fresh: set[str] = frozenset()) -> Fleet:  # type: ignore[assignment]
    cfg = config.load(None, {}).fleet  # the timings are not read by the plan
    fleet = Fleet(cfg, host, FleetDb(unreachable), FleetDb(unreachable))
    fleet.snapshot = Snapshot(
        hosts=tuple(fleet_db.HostRow(h, 0, 0, False, 0.5, None) for h in HOSTS),
        leases={u: fleet_db.Lease(u, h, 1, 20.0, False) for u, h in leases.items()},
        pins={})
    fleet.starting = set(starting)
    fleet.fresh = dict.fromkeys(fresh, 0.0)
    return fleet


ACCOUNTS = [f"acct{n}" for n in range(6)]


def mine(plan: dict[str, str | None], host: str) -> list[str]:
    return sorted(u for u, h in plan.items() if h == host)


@pytest.mark.parametrize(("why", "starting", "fresh"), [
    ("its starts under way", {"acct4", "acct5"}, set()),
    ("leases it took after the snapshot was read", set(), {"acct4", "acct5"}),
])
def test_a_host_counts_what_it_is_taking_beyond_its_snapshot(
        why: str, starting: set[str], fresh: set[str]) -> None:
    # host-a began acct4 and acct5 on an earlier view of the burst (the feed brought those
    # two first); its snapshot shows no lease yet. Its share of six accounts is three.
    a = fleet_at("host-a", {}, starting=starting, fresh=fresh)
    plan = a.plan(ACCOUNTS)
    assert len(mine(plan, "host-a")) == 3, (why, plan)
    assert {"acct4", "acct5"} <= set(mine(plan, "host-a"))
    # what host-b's plan (same snapshot, no starts of its own) gives it does not overlap
    # what host-a takes: together they place all six, three each
    b = fleet_at("host-b", {"acct4": "host-a", "acct5": "host-a"}).plan(ACCOUNTS)
    assert mine(b, "host-b") == mine(plan, "host-b")


def test_without_starts_under_way_the_snapshot_alone_decides() -> None:
    plan = fleet_at("host-a", {"acct1": "host-b"}).plan(ACCOUNTS)
    assert plan == {"acct0": "host-a", "acct1": "host-b", "acct2": "host-a",
                    "acct3": "host-b", "acct4": "host-a", "acct5": "host-b"}


async def test_a_refresh_forgets_only_the_leases_it_can_show() -> None:
    async def snapshot_after(*_args: Any) -> Snapshot:
        return Snapshot(hosts=(), leases={}, pins={})

    f = fleet_at("host-a", {}, fresh={"acct0"})  # taken before the read below began
    f.fresh["acct1"] = float("inf")  # taken while it ran (a later monotonic time)
    f.db.run = snapshot_after  # type: ignore[method-assign]
    await f.refresh()
    assert set(f.fresh) == {"acct1"}


class Connection:
    """What FleetDb asks of a connection, when the call given to it reads none."""

    closed = False

    def close(self) -> None:
        self.closed = True


async def test_fleet_calls_do_not_wait_for_the_loops_shared_threads() -> None:
    """Every thread of the loop's shared pool is blocked (a burst's control-plane, systemd
    and provisioning calls); a fleet call, the heartbeat, still runs: it has its own thread.
    Were it queued behind them it would wait for the pool, which waits for it here."""
    release = threading.Event()
    blocked = [asyncio.create_task(asyncio.to_thread(release.wait, 30)) for _ in range(40)]
    await asyncio.sleep(0.2)  # every pool thread is taken now, the rest queued
    db = FleetDb(Connection)  # type: ignore[arg-type]
    try:
        assert await asyncio.wait_for(db.run(lambda _conn: "beat"), 10) == "beat"
    finally:
        release.set()
        await asyncio.gather(*blocked)
        db.close()
    with pytest.raises(FleetUnavailable):  # closed: a named error, not the pool's
        await db.run(lambda _conn: "late")


async def test_a_take_plans_on_the_hosts_as_they_are_now() -> None:
    """host-a's last snapshot predates host-b joining; a request the feed brings now is
    placed on a fresh read, which shows host-b, so host-a does not take host-b's share."""
    from controller.fleet import read_snapshot  # noqa: PLC0415
    from controller.plane import parse_account  # noqa: PLC0415

    a = fleet_at("host-a", {})
    a.snapshot = Snapshot(hosts=(fleet_db.HostRow("host-a", 0, 0, False, 0.5, None),),
                          leases={}, pins={})
    now = fleet_at("host-a", {}).snapshot
    called: list[str] = []

    async def db(call: Any, *_args: Any) -> Any:
        called.append(call.__name__)
        if call is read_snapshot:
            return now
        return fleet_db.Lease("acct1", "host-a", 1, 20.0, False)  # acquire

    a.db.run = db  # type: ignore[method-assign]
    docs = {u: parse_account(u, {"status": "create_requested"}) for u in ("acct0", "acct1")}
    assert await a.take("acct1", "role", docs) is None  # host-b's, now that it is seen
    assert called == ["read_snapshot"]
    assert await a.take("acct0", "role", docs) == 1
    assert called[-1] == "acquire"
