"""The host's Claude budget: the pure rule (``controller.slots.decide``) in tables, the ledger,
and the whole path over real worker links: a real WorkerServer with the ledger, one real
ControllerLink + ClaudePool + HostSlots per account, on a unix socket. Only systemd's PID ->
unit lookup is faked (every link comes from this test process), and the Claude processes are
stand-ins counted host-wide (tests/test_engine.py runs the real CLI through the same pool)."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.claude import ClaudeError, ClaudeSession, ClaudeSettings
from agent.host_slots import HostSlots
from agent.link import ControllerLink
from agent.pool import ClaudePool
from agent.store import Store
from controller.server import WorkerServer
from controller.slots import (
    PER_CHAT_BYTES,
    PER_WORKER_BYTES,
    RESERVE_SHARE,
    Decision,
    Held,
    SlotLedger,
    Wanted,
    decide,
    default_budget,
    fleet_memory,
    on_api_engine,
)
from wabridge import protocol

MB = 2**20


def held(user: str, chat: str, *, busy: bool = False, used: float = 0.0,
         reclaiming: bool = False) -> Held:
    return Held(user, chat, busy=busy, used=used, reclaiming=reclaiming)


DECIDE_TABLE: list[tuple[str, int, list[Held], list[Wanted], Decision]] = [
    ("free slots go to the waiting chats", 2, [], [Wanted("a", "1", 1), Wanted("b", "1", 2)],
     Decision(grant=(("a", "1"), ("b", "1")))),
    ("the account holding fewest slots first, even if it asked later", 2,
     [held("a", "1", busy=True)], [Wanted("a", "2", 1), Wanted("b", "1", 5)],
     Decision(grant=(("b", "1"),), reclaim=())),
    ("then the longest waiting", 1, [], [Wanted("b", "1", 5), Wanted("a", "1", 1)],
     Decision(grant=(("a", "1"),), reclaim=(("b", "1"),)[:0])),
    ("full: the host's least recently used idle process is reclaimed for a waiter", 2,
     [held("a", "1", used=9), held("b", "1", used=3)], [Wanted("c", "1", 10)],
     Decision(reclaim=(("b", "1"),))),
    ("a busy process is never reclaimed", 2,
     [held("a", "1", busy=True, used=1), held("b", "1", used=3)], [Wanted("c", "1", 10)],
     Decision(reclaim=(("b", "1"),))),
    ("all busy: the waiter waits", 1, [held("a", "1", busy=True)], [Wanted("b", "1", 1)],
     Decision()),
    ("a reclaim already under way covers a waiter", 1, [held("a", "1", reclaiming=True)],
     [Wanted("b", "1", 1)], Decision()),
    ("two waiters, one reclaim under way: one more", 2,
     [held("a", "1", reclaiming=True, used=1), held("a", "2", used=2)],
     [Wanted("b", "1", 1), Wanted("c", "1", 1)], Decision(reclaim=(("a", "2"),))),
    ("over budget after an outage: idle ones go back, oldest first", 2,
     [held("a", "1", used=5), held("b", "1", used=1), held("c", "1", used=3),
      held("d", "1", busy=True, used=0)], [],
     Decision(reclaim=(("b", "1"), ("c", "1")))),
    ("within budget and nobody waits: nothing", 3, [held("a", "1"), held("b", "1")], [],
     Decision()),
]


@pytest.mark.parametrize(("budget", "holders", "wanted", "expected"),
                         [row[1:] for row in DECIDE_TABLE], ids=[row[0] for row in DECIDE_TABLE])
def test_decide(budget: int, holders: list[Held], wanted: list[Wanted],
                expected: Decision) -> None:
    assert decide(budget, holders, wanted) == expected


GB24 = 24 * 1024 * MB * 0.9  # a 24 GB host's fleet slice (MemoryMax=90%)


@pytest.mark.parametrize(("memory", "workers", "api_workers", "budget"), [
    (GB24, 0, 0, 170),  # an empty host: 85 % of 21.6 GB at 110 MB per CLI
    (GB24, 100, 0, 125),
    (GB24, 300, 0, 34),  # 300 accounts take 15 GB of it
    (GB24, 300, 100, 7),  # 100 of them on the api engine: the SDK in each
    (GB24, 300, 120, 1),
    (GB24, 300, 300, 0),
    (GB24, 376, 0, 0),  # the workers alone fill the slice: no CLI is promised
    (GB24, 1000, 0, 0),
    (512 * MB, 0, 0, 3),
    (512 * MB, 8, 0, 0),
])
def test_default_budget_pays_for_the_running_workers_first(
        memory: float, workers: int, api_workers: int, budget: int) -> None:
    assert default_budget(int(memory), workers, api_workers) == budget


@pytest.mark.parametrize(("settings", "host", "on_api"), [
    ({}, "cli", False),
    ({}, "api", True),
    ({"engine": "api"}, "cli", True),
    ({"engine": "cli"}, "api", False),
    ({"engine": "api", "tools": "wabridge"}, "api", False),  # tools run on the CLI only
    ({"tools": "none"}, "api", True),
    ({"engine": "gpt"}, "cli", False),  # refused by the worker: it keeps the host's
    ({"engine": None}, "api", True),
])
def test_a_worker_is_on_the_api_engine_by_its_settings_else_the_hosts(
        settings: dict[str, Any], host: str, on_api: bool) -> None:
    assert on_api_engine(settings, host) is on_api


@pytest.mark.parametrize("workers", [0, 1, 50, 150, 300, 350, 400])
def test_the_default_budget_and_the_workers_fit_in_the_slice(workers: int) -> None:
    # what the budget promises, at the measured costs, is never more than the slice holds
    # (less its reserve), however many accounts run
    budget, room = default_budget(int(GB24), workers), GB24 * (1 - RESERVE_SHARE)
    used = budget * PER_CHAT_BYTES + workers * PER_WORKER_BYTES
    if budget:
        assert used <= room < used + PER_CHAT_BYTES  # as many as fit, no more
    else:
        assert used + PER_CHAT_BYTES > room  # not even one fits


def test_the_derived_budget_follows_the_running_workers(tmp_path: Path) -> None:
    # as accounts start, their share comes out of Claude's: slots granted under the old
    # budget are reclaimed (idle ones) at the next decision, no new one is granted
    running = [0]
    ledger = SlotLedger(lambda: default_budget(int(GB24), running[0]))
    assert ledger.budget == 170
    for chat in range(3):
        ledger.report("a", str(chat), "idle")
    running[0] = 370  # 2 CLIs fit beside them
    assert ledger.budget == 2
    assert ledger.report("b", "1", "want") == Decision(reclaim=(("a", "0"), ("a", "1")))
    running[0] = 376
    assert ledger.report("a", "2", "busy") == Decision()  # a busy one is never reclaimed
    assert ledger.report("a", "0", "gone") == Decision()
    assert ledger.report("a", "1", "gone") == Decision()  # over budget: b still waits
    assert ledger.report("a", "2", "idle") == Decision(reclaim=(("a", "2"),))


def test_a_configured_budget_ignores_the_workers() -> None:
    assert SlotLedger.for_host(7, lambda: (10_000, 0)).budget == 7


def test_fleet_memory_reads_the_slice_else_the_host(tmp_path: Path) -> None:
    limit, meminfo = tmp_path / "memory.max", tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree: 5 kB\n")
    limit.write_text("max\n")
    assert fleet_memory(limit, meminfo) == 921_600  # 90 % of 1000 kB
    limit.write_text("5000\n")
    assert fleet_memory(limit, meminfo) == 5000
    assert fleet_memory(tmp_path / "absent", meminfo) == 921_600


def test_ledger_grants_reclaims_and_forgets_a_worker() -> None:
    clock = itertools.count()
    ledger = SlotLedger(1, clock=lambda: float(next(clock)))
    assert ledger.report("a", "1", "want") == Decision(grant=(("a", "1"),))
    assert ledger.report("b", "1", "want") == Decision()  # a's process is in its turn
    assert ledger.report("a", "1", "idle") == Decision(reclaim=(("a", "1"),))
    assert ledger.report("a", "1", "idle") == Decision()  # asked back once, not again
    assert ledger.report("a", "1", "gone") == Decision(grant=(("b", "1"),))
    assert ledger.report("a", "2", "want") == Decision()
    # b's link drops: its slot is free (it keeps to its local limit meanwhile)
    assert ledger.drop("b") == Decision(grant=(("a", "2"),))
    # ...and it reports its process on reconnect: over budget, the idle one goes back
    assert ledger.report("b", "1", "idle") == Decision(reclaim=(("b", "1"),))
    assert ledger.peak == 2


def test_a_reclaim_answered_busy_is_asked_again_once_idle() -> None:
    ledger = SlotLedger(1)
    ledger.report("a", "1", "idle")
    assert ledger.report("b", "1", "want") == Decision(reclaim=(("a", "1"),))
    assert ledger.report("a", "1", "busy") == Decision()  # the worker refused: in a turn
    assert ledger.report("a", "1", "idle") == Decision(reclaim=(("a", "1"),))


def test_slot_frames_round_trip_and_bad_ones_are_named() -> None:
    for frame in (protocol.Slot(chat_id="c", state="want"),
                  protocol.SlotOrder(chat_id="c", order="reclaim")):
        assert protocol.decode(protocol.encode(frame)) == frame
    with pytest.raises(protocol.ProtocolError, match="unknown state 'lots'"):
        protocol.decode(b'{"v":1,"type":"slot","chat_id":"c","state":"lots"}')
    with pytest.raises(protocol.ProtocolError, match="unknown order"):
        protocol.decode(b'{"v":1,"type":"slot_order","chat_id":"c","order":"take"}')


# --- over real links ------------------------------------------------------------------------

class Host:
    """Counts the stand-in Claude processes alive on the 'host' at once."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.pids = itertools.count(1000)


class StandIn(ClaudeSession):
    def __init__(self, host: Host) -> None:  # no process: counted on the host instead
        self.host = host
        self.running = True
        self.number = next(host.pids)
        host.live += 1
        host.peak = max(host.peak, host.live)

    @property
    def alive(self) -> bool:
        return self.running

    @property
    def pid(self) -> int | None:
        return self.number

    @property
    def session_id(self) -> str | None:
        return f"s{self.number}"

    async def close(self) -> None:
        await asyncio.sleep(0.01)  # a process takes a moment to exit
        if self.running:
            self.running = False
            self.host.live -= 1


class CountedPool(ClaudePool):
    def __init__(self, host: Host, root: Path, store: Store, size: int) -> None:
        settings = ClaudeSettings(cli_path="/bin/false", model=None, system_prompt="",
                                  turn_timeout=5)
        super().__init__(size, 600.0, settings, root, store)
        self.host = host

    async def _open(self, chat_id: str, settings: ClaudeSettings) -> ClaudeSession:
        await asyncio.sleep(0.02)  # starting a process takes a moment
        return StandIn(self.host)


class Account:
    def __init__(self, user: str, path: str, root: Path, host: Host, *, local_max: int,
                 wait: float) -> None:
        root.mkdir(parents=True)
        self.store = Store(root / "agent.db")
        self.pool = CountedPool(host, root, self.store, local_max)
        slots = HostSlots(lambda f: self.link.send_now(f), lambda: self.link.connected, wait,  # noqa: PLW0108 -- the link comes next
                          self.pool.reclaim)
        self.link = ControllerLink(path, user, self.store, "test", lambda s: None,
                                   lambda c: None, slots=slots)
        self.pool.slots = slots
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.link.run(self.stop))
        self.answered: list[str] = []
        self.apologies: list[str] = []

    async def turn(self, chat_id: str, seconds: float) -> None:
        """What the engine does for one turn: acquire, talk, release (apology on no slot)."""
        try:
            await self.pool.acquire(chat_id)
        except ClaudeError as exc:
            assert exc.code == "no_slot"
            self.apologies.append(chat_id)
            return
        await asyncio.sleep(seconds)
        self.answered.append(chat_id)
        await self.pool.release(chat_id)

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 5)
        await self.pool.close_all()
        self.store.close()


class Fleet:
    def __init__(self, path: str, root: Path, budget: int) -> None:
        self.path = path
        self.root = root
        self.host = Host()
        self.ledger = SlotLedger(budget)
        self.next_unit = ""
        self.server = WorkerServer(path, self.unit_for_pid, self.on_frame, self.settings_for,
                                   self.ledger)
        self.accounts: dict[str, Account] = {}

    async def unit_for_pid(self, pid: int) -> str | None:
        # every link comes from this process: the account being connected is the unit
        return f"wabridge-worker@{self.next_unit}.service" if pid == os.getpid() else None

    async def on_frame(self, user_id: str, frame: protocol.SequencedFrame) -> None:
        pass

    async def settings_for(self, user_id: str) -> dict[str, Any]:
        return {}

    async def add(self, user: str, *, local_max: int = 2, wait: float = 30.0) -> Account:
        self.next_unit = user
        account = Account(user, self.path, self.root / user, self.host, local_max=local_max,
                          wait=wait)
        self.accounts[user] = account
        await wait_until(lambda: account.link.connected)
        return account


@pytest.fixture
def sock_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="ws-")  # short: unix socket paths are limited
    yield os.path.join(directory, "c.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def fleet(sock_path: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(sock_path, tmp_path, budget=4)
    await f.server.start()
    yield f
    for account in f.accounts.values():
        await account.close()
    await f.server.close()
    await asyncio.sleep(0.05)


async def wait_until(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_a_flood_of_30_accounts_x_2_chats_keeps_to_the_host_budget(fleet: Fleet) -> None:
    accounts = [await fleet.add(f"u{i:02d}") for i in range(30)]
    sampled = 0

    async def sample() -> None:
        nonlocal sampled
        while True:
            sampled = max(sampled, fleet.host.live)
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    # every chat of every account at once, twice (the second turn after the first is answered)
    for _ in range(2):
        await asyncio.gather(*(a.turn(chat, 0.02) for a in accounts for chat in ("c1", "c2")))
    sampler.cancel()
    assert fleet.host.peak <= 4, fleet.host.peak  # never more live processes than the budget
    assert sampled <= 4
    assert fleet.ledger.peak <= 4
    # every message answered: each account's two chats, twice
    assert [sorted(a.answered) for a in accounts] == [["c1", "c1", "c2", "c2"]] * 30
    assert not any(a.apologies for a in accounts)
    # without the host budget the same flood runs up to 30 x 2 processes
    assert fleet.host.peak >= 4


async def test_the_least_recently_used_idle_process_on_the_host_is_closed(
        fleet: Fleet) -> None:
    fleet.ledger.budget = 2
    a, b, c = [await fleet.add(u) for u in ("a", "b", "c")]
    await a.turn("1", 0)
    await b.turn("1", 0)
    assert fleet.host.live == 2
    await b.turn("1", 0)  # b's is now the more recently used one
    await c.turn("1", 0)
    assert a.pool.live == 0 and b.pool.live == 1 and c.pool.live == 1
    assert fleet.host.peak == 2


async def test_a_chat_waits_for_a_busy_host_then_gets_the_apology(fleet: Fleet) -> None:
    fleet.ledger.budget = 1
    a = await fleet.add("a")
    b = await fleet.add("b", wait=1.0)
    a_turn = asyncio.create_task(a.turn("1", 0.5))  # holds the only slot for 0.5 s
    await wait_until(lambda: fleet.host.live == 1)
    await b.turn("1", 0)  # waits the 0.5 s, then gets the slot
    assert b.answered == ["1"]
    await a_turn
    long_turn = asyncio.create_task(a.turn("2", 3.0))
    await wait_until(lambda: ("a", "2") in fleet.ledger.held and fleet.ledger.held[("a", "2")].busy)
    await b.turn("2", 0)  # every slot busy past slot_wait: the apology
    assert b.apologies == ["2"]
    await wait_until(lambda: ("b", "2") not in fleet.ledger.wanted)  # the wait is given back
    await long_turn
    assert fleet.host.peak == 1


async def test_without_the_controller_workers_keep_to_their_local_limit(
        fleet: Fleet) -> None:
    a = await fleet.add("a", local_max=2)
    await fleet.server.close()
    await wait_until(lambda: not a.link.connected)
    await asyncio.gather(*(a.turn(chat, 0.05) for chat in ("1", "2", "3")))
    assert sorted(a.answered) == ["1", "2", "3"]
    assert a.pool.peak == 2  # the local claude.max_processes
    # the controller comes back with budget 1: the worker reports its processes, one goes
    fleet.ledger.budget = 1
    fleet.next_unit = "a"
    await fleet.server.start()
    await wait_until(lambda: a.link.connected)
    await wait_until(lambda: fleet.host.live == 1)
    await wait_until(lambda: len(fleet.ledger.held) == 1)  # its "gone" reached the controller
