"""This host in a fleet (``fleet.enabled``): its heartbeat, and the loop that carries out the
placement every controller computes alike (``controller.assignment.assign``).

What holds, and where:
- an account runs on one host at a time: a start on this host is preceded by winning the
  account's lease in PostgreSQL (``wabridge.fleet_db.acquire``, database time, one
  transaction), and the worker itself renews it and stops when it cannot (the worker's side);
  the lease's epoch goes to the worker in its unit's drop-in (``lease_environment``);
- an account whose host died runs elsewhere once its lease expired plus the grace: every
  controller's loop re-plans each ``fleet.tick_seconds`` and the host the plan names takes the
  lease as soon as ``acquire`` lets it;
- an account moved away (``wabridgectl move``, ``drain``) is stopped here, one at a time: the
  worker finishes its turn, commits and releases the lease; the next move starts only once the
  previous account holds a lease on its new host (or after ``MOVE_TIMEOUT``).

The controller (``controller.main``) asks this module before every start (``take``) and lets
it say which unit states no longer describe the account (``away``): a unit this host stopped
because the account went elsewhere must not mark the document ``stopped``.

All PostgreSQL calls run in one worker thread at a time on one connection (``FleetDb``),
reopened after a failure; a failure is logged and the next tick tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg

from controller import assignment, metrics
from controller.plane import AccountDoc
from controller.unit_manager import RUNNING_UNIT_STATES, UnitState
from wabridge import config, fleet_db, logs, postgres, units
from wabridge.errors import ExitCode, WabridgeError
from wabridge.status import RUNNING_STATUSES, DocStatus

log = logs.get("controller.fleet")
T = TypeVar("T")

#: Document statuses that want a worker somewhere: the accounts the plan places.
WANTS_WORKER = RUNNING_STATUSES | {DocStatus.CREATE_REQUESTED, DocStatus.RESTART_REQUESTED,
                                   DocStatus.PAIRING_REQUESTED}
#: requests the account's host acts on (a stop is the business of the host running it)
PLACED_REQUESTS = WANTS_WORKER - RUNNING_STATUSES
#: ~ memory of one idle linked worker, to derive ``fleet.max_workers`` when it is 0
WORKER_MB = 60
#: a move whose account holds no lease elsewhere by then no longer holds up the next one
MOVE_GRACE = 30.0
#: the worker slice's memory limit (cgroup v2), when it has one
SLICE_MEMORY_MAX = Path("/sys/fs/cgroup/wabridge.slice/memory.max")


class FleetUnavailable(WabridgeError):
    code = "fleet_unavailable"
    explanation = ("the controller could not reach the fleet's tables in PostgreSQL "
                   "(storage.postgres_url): accounts keep running where they are; placement "
                   "resumes when it is back")


class FleetDb:
    """A controller's connection for the fleet tables, with its own thread: calls run off the
    event loop, one at a time (a psycopg connection is not for concurrent use), and never
    wait for a thread of the loop's shared pool (busy with the control plane, systemd and
    provisioning during a burst: a heartbeat waiting there made a live host look dead). A
    broken connection is reopened."""

    def __init__(self, connect: Callable[[], psycopg.Connection[tuple[Any, ...]]],
                 where: str = "") -> None:
        self._connect = connect
        self._where = where
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        # held by the thread for the whole call: a cancelled caller's call still ends
        # before ``close`` closes the connection under it
        self._lock = threading.Lock()
        self._closed = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-db")

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        try:
            done = asyncio.get_running_loop().run_in_executor(
                self._thread, functools.partial(self._call, call, *args))
        except RuntimeError:  # its thread is shut down: closed
            raise FleetUnavailable(f"{self._where}: the controller is stopping") from None
        return await done

    def _call(self, call: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._closed:
                raise FleetUnavailable(f"{self._where}: the controller is stopping")
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                return call(self._conn, *args)
            except psycopg.Error as exc:
                if self._conn is not None and (self._conn.broken or isinstance(
                        exc, psycopg.OperationalError | psycopg.InterfaceError)):
                    self._conn.close()
                    self._conn = None
                raise FleetUnavailable(f"{self._where}: {str(exc).strip()}") from None

    def close(self) -> None:
        """Blocking (waits for a call under way): run it off the event loop."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self._thread.shutdown(wait=False)  # (calls queued after this fail: closed)


@dataclass(frozen=True)
class Snapshot:
    """One read of the fleet tables (the plan's input)."""

    hosts: tuple[fleet_db.HostRow, ...]
    leases: Mapping[str, fleet_db.Lease]
    pins: Mapping[str, str]


def read_snapshot(conn: psycopg.Connection[tuple[Any, ...]]) -> Snapshot:
    return Snapshot(tuple(fleet_db.hosts(conn)),
                    {lease.user_id: lease for lease in fleet_db.leases(conn)},
                    fleet_db.pins(conn))


def alive(row: fleet_db.HostRow, dead_after: float) -> bool:
    return row.heartbeat_age is not None and row.heartbeat_age < dead_after


def held(lease: fleet_db.Lease | None) -> bool:
    """Whether a lease is in force now (not released, not expired)."""
    return lease is not None and not lease.released and lease.expires_in > 0


def lease_environment(host_id: str, epoch: int) -> dict[str, str]:
    """What a worker of a fleet is told in its drop-in: whose lease it runs under."""
    return {units.HOST_ID_ENV: host_id, units.LEASE_EPOCH_ENV: str(epoch)}


def host_capacity(cfg: config.FleetConfig) -> tuple[int, int]:
    """(max_workers, memory_mb) this host announces: ``fleet.max_workers``, or the host's
    memory for workers (the worker slice's ``MemoryMax=`` if set, else the machine's) divided
    by ``WORKER_MB``."""
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    with contextlib.suppress(OSError):
        limit = SLICE_MEMORY_MAX.read_text(encoding="ascii").strip()
        if limit.isdigit():
            memory_mb = min(memory_mb, int(limit) // (1 << 20))
    return (cfg.max_workers or max(1, memory_mb // WORKER_MB)), memory_mb


class Runner(Protocol):
    """What the fleet loop needs of the controller (``controller.main.Controller``)."""

    @property
    def docs(self) -> Mapping[str, AccountDoc]: ...
    @property
    def units(self) -> Mapping[str, UnitState]: ...

    def start_here(self, user_id: str) -> None:
        """Start the account's worker here (through ``take``); returns at once."""

    def handle_request(self, user_id: str) -> None:
        """Act on the client's request on the document (a claim: once only, whoever
        tries); returns at once."""

    def stop_here(self, user_id: str) -> None:
        """Stop the account's worker here (returns at once): it moves to another host."""


@dataclass
class Counters:
    acquired: int = 0  # leases this host won
    lost: int = 0  # workers of this host that stopped because their lease was gone
    refused: int = 0  # acquisitions another host's lease refused


@dataclass
class Fleet:
    cfg: config.FleetConfig
    host_id: str
    db: FleetDb
    #: the heartbeat's own connection: a host's liveness never waits behind its placement's
    #: calls (an acquisition may wait seconds for a row lock; meanwhile the others would see
    #: no heartbeat and place accounts elsewhere)
    beat_db: FleetDb
    max_workers: int = 0
    memory_mb: int = 0
    snapshot: Snapshot | None = None
    away: set[str] = field(default_factory=set)
    moving: tuple[str, float] | None = None  # the account being moved off this host, since
    starting: set[str] = field(default_factory=set)  # starts the loop has asked for
    #: leases this host took that the snapshot may not show yet: user -> monotonic time
    fresh: dict[str, float] = field(default_factory=dict)
    seen_alive: tuple[str, ...] = ()  # the hosts the last snapshot showed alive (logged)
    counters: Counters = field(default_factory=Counters)
    beat_at: float = 0.0  # monotonic time of the last heartbeat written
    migrated: bool = False  # the schema is this code's (``open``)

    # --- what every controller computes alike ---------------------------------------------
    def plan(self, accounts: Iterable[str]) -> dict[str, str | None]:
        snap = self.snapshot
        if snap is None:
            return {}
        hosts = [assignment.Host(h.host_id, alive(h, self.cfg.host_dead_seconds), h.draining,
                                 h.max_workers) for h in snap.hosts]
        holders = {u: lease.host_id for u, lease in snap.leases.items()}
        # this host's own starts under way count as its own: a snapshot read before their
        # leases were taken would otherwise show this host emptier than it is, and a burst
        # would give it more than its share while the others' plans give them theirs
        holders.update(dict.fromkeys(self.starting | self.fresh.keys(), self.host_id))
        return assignment.assign(accounts, hosts, holders, snap.pins)

    def owner(self, user_id: str, docs: Mapping[str, AccountDoc]) -> str | None:
        """The host the plan gives ``user_id`` now (None: none, or not read yet)."""
        return self.plan({*wanting(docs), user_id}).get(user_id)

    def me_alive(self) -> bool:
        snap = self.snapshot
        return snap is not None and any(
            h.host_id == self.host_id and alive(h, self.cfg.host_dead_seconds)
            for h in snap.hosts)

    # --- database -----------------------------------------------------------------------
    async def open(self) -> bool:
        """The schema, this host's first heartbeat and a first snapshot. False: PostgreSQL
        cannot be reached now (logged; the placement loop tries again, and until then this
        host starts nothing: the workers that run keep their leases themselves). A schema
        newer than this code raises ``SchemaTooNew``."""
        self.max_workers, self.memory_mb = host_capacity(self.cfg)
        try:
            if not self.migrated:
                await self.db.run(fleet_db.migrate)
                self.migrated = True
            await self.beat()
            await self.refresh()
        except FleetUnavailable as exc:
            log.warning("fleet.unavailable", error=str(exc))
            return False
        return True

    async def beat(self) -> None:
        await self.beat_db.run(fleet_db.heartbeat, self.host_id, self.max_workers,
                               self.memory_mb)
        self.beat_at = time.monotonic()

    async def refresh(self) -> Snapshot:
        began = time.monotonic()
        self.snapshot = snap = await self.db.run(read_snapshot)
        self.fresh = {u: at for u, at in self.fresh.items() if at >= began}
        self._tell_hosts(snap)
        return snap

    def _tell_hosts(self, snap: Snapshot) -> None:
        """Log each change of which hosts this controller sees alive (what its plan places
        on): a host gone silent, or back."""
        now_alive = tuple(h.host_id for h in snap.hosts if alive(h, self.cfg.host_dead_seconds))
        if now_alive == self.seen_alive:
            return
        gone = sorted(set(self.seen_alive) - set(now_alive))
        ages = {h.host_id: None if h.heartbeat_age is None else round(h.heartbeat_age, 1)
                for h in snap.hosts if h.host_id in gone}
        (log.warning if gone else log.info)(
            "fleet.hosts_alive", alive=list(now_alive), dead=gone, heartbeat_age=ages)
        self.seen_alive = now_alive

    async def take(self, user_id: str, role: str, docs: Mapping[str, AccountDoc]
                   ) -> int | None:
        """Before a start here: the account's lease for this host, if the plan gives it this
        host and no other host holds it. Returns the epoch, or None: do not start.

        The plan is made on a snapshot read now, not the placement loop's last one: a burst
        acted on from the change feed within a tick of a host joining (or of another host's
        takes) would otherwise be placed as if that host were not there."""
        await self.refresh()
        if self.owner(user_id, docs) != self.host_id:
            log.debug("fleet.not_here", user_id=user_id)  # every tick, every account elsewhere
            return None
        lease = await self.db.run(fleet_db.acquire, user_id, role, self.host_id,
                                  self.cfg.grace_seconds, self.cfg.lease_seconds)
        if lease is None:
            self.counters.refused += 1
            log.info("fleet.lease_held_elsewhere", user_id=user_id)
            return None
        self.counters.acquired += 1
        self.fresh[user_id] = time.monotonic()
        self.away.discard(user_id)
        log.info("fleet.lease_acquired", user_id=user_id, epoch=lease.epoch)
        if self.snapshot is not None and self.snapshot.pins.get(user_id) == self.host_id:
            # the move is done: from now on stickiness keeps it here (a pin left behind
            # would pull it back here after a later failover)
            with contextlib.suppress(FleetUnavailable):  # left: it names where it runs
                await self.db.run(fleet_db.unpin, user_id)
        return lease.epoch

    async def taken_elsewhere(self, user_id: str) -> bool:
        """Whether another host holds the account's lease now (read afresh: the snapshot may
        predate a freeze of this host). Then a unit of it that ended here says nothing about
        the document: it describes the account's new host. Unreadable: also True (nothing is
        written for it; the next reconcile or resync makes the document true)."""
        try:
            lease = await self.db.run(fleet_db.lease, user_id)
        except FleetUnavailable as exc:
            log.warning("fleet.read_failed", user_id=user_id, error=str(exc))
            return True
        if lease is not None and lease.host_id != self.host_id:
            self._gone_away(user_id, holder=lease.host_id)
            return True
        return False

    def _gone_away(self, user_id: str, **why: Any) -> None:
        """The account's lease is another host's now: counted and logged once."""
        if user_id not in self.away:
            self.counters.lost += 1
            log.warning("fleet.lease_lost", user_id=user_id, **why)
        self.away.add(user_id)

    def lost(self, state: UnitState) -> bool:
        """Whether the unit's worker exited because its lease was gone (it is not restarted;
        the account runs elsewhere): its state says nothing about the document."""
        if (state.active_state in ("inactive", "failed") and state.exec_main_code == 1
                and state.exec_main_status == ExitCode.LEASE_LOST):
            self._gone_away(state.user_id)
            return True
        return state.user_id in self.away

    # --- the loops ------------------------------------------------------------------------
    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_seconds)
            if not self.migrated:
                continue  # the placement loop opens the schema first
            try:
                await self.beat()
            except FleetUnavailable as exc:
                log.warning("fleet.heartbeat_failed", error=str(exc))

    async def placement_loop(self, runner: Runner) -> None:
        while True:
            if not self.migrated:
                if await self.open():
                    self.tick(runner)
            else:
                try:
                    await self.refresh()
                except FleetUnavailable as exc:
                    log.warning("fleet.read_failed", error=str(exc))
                else:
                    self.tick(runner)
            await asyncio.sleep(self.cfg.tick_seconds)

    def tick(self, runner: Runner) -> None:
        """Carry the plan out on this host: start what is ours and not running (the start
        takes the lease first), stop one account at a time that is somebody else's."""
        snap = self.snapshot
        if snap is None or not self.me_alive():
            return  # the others see this host dead too: its leases decide, not its plan
        plan = self.plan(wanting(runner.docs))
        running = {u for u, s in runner.units.items() if s.active_state in RUNNING_UNIT_STATES}
        for user, host in sorted(plan.items()):
            doc = runner.docs.get(user)
            if host == self.host_id and doc is not None and doc.status in PLACED_REQUESTS:
                # the feed's delivery was judged on an older plan (a burst arriving in
                # pieces): the plan of every host now names this one
                runner.handle_request(user)
            elif (host == self.host_id and user not in running and user not in self.starting
                    and doc is not None and doc.status in RUNNING_STATUSES
                    and not held_by_other(snap.leases.get(user), self.host_id)):
                self.starting.add(user)
                runner.start_here(user)
        if self.moving is not None:
            user, since = self.moving
            lease = snap.leases.get(user)
            arrived = held(lease) and lease is not None and lease.host_id != self.host_id
            if not arrived and time.monotonic() - since < self.move_timeout():
                return
            self.moving = None
        for user in sorted(running - self.away):
            host = plan.get(user)
            if host is not None and host != self.host_id:
                log.info("fleet.move", user_id=user, to=host)
                self.moving = (user, time.monotonic())
                self.away.add(user)
                runner.stop_here(user)
                return

    def close(self) -> None:
        """Blocking (waits for calls under way): run it off the event loop."""
        self.db.close()
        self.beat_db.close()

    def move_timeout(self) -> float:
        return self.cfg.lease_seconds + self.cfg.grace_seconds + MOVE_GRACE

    def started(self, user_id: str) -> None:
        """A start the loop asked for is over (done or refused)."""
        self.starting.discard(user_id)

    # --- operator ---------------------------------------------------------------------
    def host_rows(self) -> list[dict[str, Any]]:
        """``wabridgectl hosts``: each host, whether alive, draining, the accounts whose
        lease it holds, its memory and heartbeat age."""
        snap = self.snapshot
        if snap is None:
            return []
        counts = self.figures().held
        return [{"host": h.host_id, "alive": alive(h, self.cfg.host_dead_seconds),
                 "draining": h.draining, "accounts": counts.get(h.host_id, 0),
                 "max_workers": h.max_workers, "memory_mb": h.memory_mb,
                 "heartbeat_age": h.heartbeat_age,
                 "started_at": h.started_at.isoformat() if h.started_at else None}
                for h in sorted(snap.hosts, key=lambda r: r.host_id)]

    def figures(self) -> metrics.HostsFigures:
        """What ``GET /metrics`` shows of the fleet."""
        snap = self.snapshot
        held_by: dict[str, int] = {}
        for lease in (snap.leases.values() if snap is not None else ()):
            if held(lease):
                held_by[lease.host_id] = held_by.get(lease.host_id, 0) + 1
        return metrics.HostsFigures(
            me=self.host_id, held=held_by,
            alive=tuple(h.host_id for h in (snap.hosts if snap is not None else ())
                        if alive(h, self.cfg.host_dead_seconds)),
            acquired=self.counters.acquired, lost=self.counters.lost)

    def known_host(self, host_id: str) -> bool:
        return self.snapshot is not None and any(h.host_id == host_id
                                                 for h in self.snapshot.hosts)


def held_by_other(lease: fleet_db.Lease | None, me: str) -> bool:
    return held(lease) and lease is not None and lease.host_id != me


def wanting(docs: Mapping[str, AccountDoc]) -> set[str]:
    return {u for u, d in docs.items() if d.status in WANTS_WORKER}


def open_fleet(cfg: config.Config, host_id: str,
               connect: Callable[[], psycopg.Connection[tuple[Any, ...]]]) -> Fleet:
    where = postgres.describe(cfg.storage.postgres_url)
    return Fleet(cfg.fleet, host_id, FleetDb(connect, where), FleetDb(connect, where))
