"""Two controllers of one fleet through ``Controller.run()``: hosts ``host-a`` and ``host-b``,
each with its own in-memory unit manager whose "workers" behave as the worker's side of the
lease does (check the lease of the drop-in's epoch before running, renew it, stop themselves
when they cannot renew in time, release it on a clean stop), one real PostgreSQL (the fleet's
tables, ``wabridge.fleet_db``) and one local control plane file both controllers watch.

What these hold: accounts spread over the hosts; a host that dies loses its accounts to the
other only after their leases expired plus the grace; ``move`` and ``drain`` hand accounts
over one at a time through the release; ``undrain`` pulls nothing back; and at no moment does
an account run on both hosts (checked at every start).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fakes.units import ScriptedSystemd
from harness.net import free_port
from postgres_cluster import Cluster

from controller import ctl, pg_roles
from controller.local import LocalPlane
from controller.main import Controller
from controller.unit_manager import UnitState
from wabridge import config, fleet_db
from wabridge.errors import ExitCode
from wabridge.status import DocStatus

LEASE, GRACE, MARGIN, RENEW = 3.0, 0.5, 0.5, 0.5
FLEET = {"ENABLED": "true", "LEASE_SECONDS": str(LEASE), "GRACE_SECONDS": str(GRACE),
         "MARGIN_SECONDS": str(MARGIN), "RENEW_SECONDS": str(RENEW),
         "HEARTBEAT_SECONDS": "0.2", "HOST_DEAD_SECONDS": "1.2", "TICK_SECONDS": "0.2",
         "MAX_WORKERS": "10"}


def user_of(unit: str) -> str:
    return unit.removeprefix("wabridge-worker@").removesuffix(".service")


def state(user: str, active: str, sub: str, pid: int, *, code: int = 0,
          status: int = 0) -> UnitState:
    return UnitState(unit=f"wabridge-worker@{user}.service", user_id=user, active_state=active,
                     sub_state=sub, main_pid=pid, n_restarts=0,
                     result="exit-code" if status else "success", exec_main_code=code,
                     exec_main_status=status, status_text="", memory_bytes=None,
                     cpu_nsec=None, tasks=None, since_usec=0, invocation_id=uuid.uuid4().hex,
                     start_limit_burst=5)


@dataclass
class World:
    """What is true across the hosts: where each account's worker runs right now."""

    conninfo: str
    running: dict[str, set[str]] = field(default_factory=dict)  # user -> hosts
    overlaps: list[str] = field(default_factory=list)
    log: list[tuple[float, str, str, str]] = field(default_factory=list)  # (t, host, what, user)

    def where(self, user: str) -> set[str]:
        return self.running.get(user, set())

    def times(self, host: str, what: str, user: str) -> list[float]:
        return [t for t, h, w, u in self.log if (h, w, u) == (host, what, user)]


class HostUnits(ScriptedSystemd):
    """One host's systemd and its workers, as far as leases go."""

    def __init__(self, world: World, host: str) -> None:
        super().__init__()
        self.world = world
        self.host = host
        self.epochs: dict[str, int] = {}
        self.renewed: dict[str, float] = {}  # user -> monotonic time the last renew was sent
        self.cut_off = False  # the host lost the database (it died, or is partitioned)
        self.conn = psycopg.connect(world.conninfo, autocommit=True)
        self.conn_lock = threading.Lock()
        self.pid = 100

    async def db(self, call: Callable[..., Any], *args: Any) -> Any:
        def run() -> Any:
            with self.conn_lock:
                return call(self.conn, *args)
        return await asyncio.to_thread(run)

    def _leave(self, user: str) -> None:
        self.world.running.get(user, set()).discard(self.host)
        self.epochs.pop(user, None)
        self.world.log.append((time.monotonic(), self.host, "stop", user))

    async def start(self, unit: str) -> None:
        await super().start(unit)
        user = user_of(unit)
        text = self.dropins[unit]
        epoch = int(re.search(r'WABRIDGE_LEASE_EPOCH=(\d+)"', text).group(1))  # type: ignore[union-attr]
        assert f'"WABRIDGE_HOST_ID={self.host}"' in text
        lease = await self.db(fleet_db.lease, user)
        self.pid += 1
        self.deliver(state(user, "activating", "start", self.pid))
        if lease is None or (lease.host_id, lease.epoch, lease.released) != (self.host, epoch,
                                                                            False):
            # the worker's check before it connects: not its lease, it exits at once
            self.deliver(state(user, "failed", "failed", 0, code=1,
                               status=ExitCode.LEASE_LOST))
            return
        others = self.world.where(user) - {self.host}
        if others:
            self.world.overlaps.append(f"{user} started on {self.host} while on {others}")
        self.world.running.setdefault(user, set()).add(self.host)
        self.world.log.append((time.monotonic(), self.host, "start", user))
        self.epochs[user] = epoch
        self.renewed[user] = time.monotonic()
        asyncio.get_running_loop().call_later(0.05, self.deliver,
                                              state(user, "active", "running", self.pid))

    async def stop(self, unit: str) -> None:
        await super().stop(unit)
        user = user_of(unit)
        epoch = self.epochs.get(user)
        self.deliver(state(user, "deactivating", "stop-sigterm", self.pid))
        await asyncio.sleep(0.5)  # the turn in flight ends, WhatsApp is disconnected
        if epoch is not None:
            self._leave(user)
            if not self.cut_off:
                await self.db(fleet_db.release, user, self.host, epoch)
        self.deliver(state(user, "inactive", "dead", 0))

    async def lease_keeping(self) -> None:
        """Every worker renews its lease, and stops itself when it could not in time."""
        while True:
            await asyncio.sleep(RENEW)
            for user, epoch in list(self.epochs.items()):
                if self.cut_off:
                    if time.monotonic() - self.renewed[user] >= LEASE - MARGIN:
                        self._leave(user)  # WhatsApp disconnected, exit "lease lost"
                    continue
                sent = time.monotonic()
                if await self.db(fleet_db.renew, user, self.host, epoch, LEASE):
                    self.renewed[user] = sent
                elif self.epochs.get(user) == epoch:
                    self._leave(user)
                    self.deliver(state(user, "failed", "failed", 0, code=1,
                                       status=ExitCode.LEASE_LOST))


@dataclass
class Host:
    name: str
    controller: Controller
    units: HostUnits
    admin_socket: str
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """What ``wabridgectl`` asks over this host's admin socket."""
        client = ctl.AdminClient(self.admin_socket, timeout=10)
        return await asyncio.to_thread(client.call, op, **args)


@dataclass
class Fleet:
    world: World
    plane: LocalPlane  # the app's side: writes requests
    make: Callable[[str], Host]
    hosts: dict[str, Host] = field(default_factory=dict)

    async def up(self, name: str) -> Host:
        host = self.make(name)
        self.hosts[name] = host
        host.tasks = [asyncio.create_task(host.controller.run()),
                      asyncio.create_task(host.units.lease_keeping())]
        names = set(self.hosts)

        def seen() -> bool:  # every controller's last snapshot has every host alive
            fleets = [h.controller.fleet for h in self.hosts.values()]
            return host.controller.loaded and all(
                f is not None and {r["host"] for r in f.host_rows() if r["alive"]} == names
                for f in fleets)

        await until(seen, 10, f"{name} up and seen")
        return host

    async def down(self, name: str) -> None:
        """The host dies: its controller ends, its workers lose the database."""
        host = self.hosts[name]
        host.units.cut_off = True
        host.controller.stop.set()
        await asyncio.wait_for(host.tasks[0], 10)

    async def create(self, *users: str) -> None:
        for user in users:
            await self.plane.request(user, DocStatus.CREATE_REQUESTED)

    def placed(self) -> dict[str, set[str]]:
        return {u: set(h) for u, h in self.world.running.items()}


async def until(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """``NOTIFY_SOCKET`` for the controllers: READY=1 etc. are read and dropped (a full
    queue would block the sender's event loop)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    loop = asyncio.get_running_loop()
    loop.add_reader(sock.fileno(), sock.recv, 4096)
    yield
    loop.remove_reader(sock.fileno())
    sock.close()


def host_config(name: str, tmp_path: Path, url: str) -> config.Config:
    return config.load(None, {
        "WABRIDGE__CONTROLLER__SOCKET": str(tmp_path / f"{name}-w.sock"),
        "WABRIDGE__CONTROLLER__ADMIN_SOCKET": str(tmp_path / f"{name}-a.sock"),
        "WABRIDGE__CONTROLLER__HOST_ID": name,
        "WABRIDGE__CONTROLLER__RESYNC_INTERVAL": "1",
        "WABRIDGE__CONTROLLER__METRICS_LISTEN": "",
        "WABRIDGE__STORAGE__BACKEND": "postgresql",
        "WABRIDGE__STORAGE__POSTGRES_URL": url,
        **{f"WABRIDGE__FLEET__{k}": v for k, v in FLEET.items()}})


@pytest.fixture
async def fleet(postgres: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                notify: None) -> AsyncIterator[Fleet]:
    dbname = f"fleet_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres.conninfo(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {dbname}")
    url = (f"postgresql://postgres@/{dbname}?host={postgres.socket_dir}&port={postgres.port}")
    world = World(postgres.conninfo(dbname))
    # the accounts' password files go to the test's directory, not /run
    monkeypatch.setattr(pg_roles.prepare, "__defaults__", (tmp_path / "pg-passwords",))
    plane_file = tmp_path / "plane.sqlite"

    def make(name: str) -> Host:
        cfg = host_config(name, tmp_path, url)
        units = HostUnits(world, name)
        controller = Controller(cfg, LocalPlane(plane_file), units)
        return Host(name, controller, units, cfg.controller.admin_socket)

    result = Fleet(world, LocalPlane(plane_file), make)
    yield result
    for host in result.hosts.values():
        host.controller.stop.set()
        await asyncio.wait_for(host.tasks[0], 10)  # the controller's own shutdown
        host.tasks[1].cancel()
        await asyncio.gather(*host.tasks, return_exceptions=True)
        host.units.conn.close()
        host.controller.notifier.socket.close()
    await result.plane.close()
    assert world.overlaps == []


USERS = ("u1", "u2", "u3", "u4")


async def test_accounts_spread_and_a_dead_hosts_accounts_move_after_lease_and_grace(
        fleet: Fleet) -> None:
    a = await fleet.up("host-a")
    b = await fleet.up("host-b")
    await fleet.create(*USERS)
    await until(lambda: all(fleet.world.where(u) for u in USERS), 15, "4 accounts running")
    on = {h: sorted(u for u in USERS if fleet.world.where(u) == {h})
          for h in ("host-a", "host-b")}
    assert len(on["host-a"]) == len(on["host-b"]) == 2, on
    hosts = {r["host"]: r for r in (await b.call("hosts"))["hosts"]}
    assert hosts["host-a"]["alive"] and hosts["host-b"]["alive"]
    assert {h: r["accounts"] for h, r in hosts.items()} == {"host-a": 2, "host-b": 2}
    docs = {u: await fleet.plane.get(u) for u in USERS}
    assert {u: d.host for u, d in docs.items() if d is not None} == {
        u: h for h, us in on.items() for u in us}

    last_renewals = dict(a.units.renewed)
    died = time.monotonic()
    await fleet.down("host-a")
    await until(lambda: all(fleet.world.where(u) == {"host-b"} for u in USERS), 20,
                "every account on host-b")
    for user in on["host-a"]:
        started = fleet.world.times("host-b", "start", user)[-1]
        # never before the old lease (last renewed then) expired plus the grace
        assert started >= last_renewals[user] + LEASE + GRACE - 0.2, (user, started - died)
        assert started - died < LEASE + GRACE + 3.0
        assert fleet.world.times("host-a", "stop", user)[-1] <= started
    assert (await fleet.plane.get(on["host-a"][0])).host == "host-b"  # type: ignore[union-attr]
    hosts = {r["host"]: r for r in (await b.call("hosts"))["hosts"]}
    assert not hosts["host-a"]["alive"] and hosts["host-b"]["accounts"] == 4
    text = b.controller.snapshot()
    assert text.hosts is not None and text.hosts.acquired == 4 and text.hosts.alive == (
        "host-b",)


async def test_move_hands_an_account_over_through_the_release(fleet: Fleet) -> None:
    a = await fleet.up("host-a")
    await fleet.up("host-b")
    await fleet.create("u1", "u2")
    await until(lambda: fleet.world.where("u1") and fleet.world.where("u2"), 15, "running")
    user = next(u for u in ("u1", "u2") if fleet.world.where(u) == {"host-a"})
    answer = await a.call("move", user=user, host="host-b")
    assert answer == {"ok": True, "user": user, "host": "host-b"}
    await until(lambda: fleet.world.where(user) == {"host-b"}, 10, "moved")
    stopped = fleet.world.times("host-a", "stop", user)[-1]
    started = fleet.world.times("host-b", "start", user)[-1]
    # released on a clean stop: no wait for the lease to expire
    assert stopped <= started < stopped + LEASE
    doc = await fleet.plane.get(user)
    assert doc is not None and doc.host == "host-b"
    assert doc.status in (DocStatus.STARTING, DocStatus.CONNECTED)  # not "stopped"
    await until(lambda: not fleet.hosts["host-b"].controller.fleet.snapshot.pins,  # type: ignore[union-attr]
                5, "the pin cleared once the move is done")
    with pytest.raises(ctl.CtlError, match="no host 'host-z'") as err:
        await a.call("move", user=user, host="host-z")
    assert err.value.code == "unknown_host"
    with pytest.raises(ctl.CtlError) as err:
        await a.call("drain", host="host-z")
    assert err.value.code == "unknown_host"


async def test_drain_moves_one_at_a_time_and_undrain_pulls_nothing_back(
        fleet: Fleet) -> None:
    a = await fleet.up("host-a")
    await fleet.create("u1", "u2", "u3")
    await until(lambda: all(fleet.world.where(u) == {"host-a"} for u in ("u1", "u2", "u3")),
                15, "all on host-a")
    b = await fleet.up("host-b")
    await b.call("drain", host="host-a")
    await until(lambda: all(fleet.world.where(u) == {"host-b"} for u in ("u1", "u2", "u3")),
                20, "all on host-b")
    moves = sorted((fleet.world.times("host-a", "stop", u)[-1],
                    fleet.world.times("host-b", "start", u)[-1]) for u in ("u1", "u2", "u3"))
    for (_, started), (next_stop, _) in itertools.pairwise(moves):
        assert next_stop >= started  # the next leaves only once the previous arrived
    hosts = {r["host"]: r for r in (await a.call("hosts"))["hosts"]}
    assert hosts["host-a"]["draining"] and hosts["host-a"]["accounts"] == 0

    await a.call("undrain", host="host-a")
    await asyncio.sleep(1.5)  # several ticks of both hosts
    assert all(fleet.world.where(u) == {"host-b"} for u in ("u1", "u2", "u3"))
    await fleet.create("u4")  # a new account goes to the emptier host
    await until(lambda: fleet.world.where("u4") == {"host-a"}, 10, "u4 on host-a")
    assert all(fleet.world.where(u) == {"host-b"} for u in ("u1", "u2", "u3"))


async def test_restart_takes_a_new_epoch_and_unlink_stops_where_it_runs(fleet: Fleet) -> None:
    """A restart stops the worker, then takes the lease again (a new epoch) and starts it on
    the same host; an unlink is stopped by the host that runs it, and only then does the
    document say ``stopped``."""
    await fleet.up("host-a")
    await fleet.up("host-b")
    await fleet.create("u1", "u2")
    await until(lambda: fleet.world.where("u1") and fleet.world.where("u2"), 15, "running")
    (host,) = fleet.world.where("u1")
    units = fleet.hosts[host].units
    epoch = units.epochs["u1"]
    await fleet.plane.request("u1", DocStatus.RESTART_REQUESTED)
    await until(lambda: units.epochs.get("u1", epoch) > epoch, 10, "restarted")
    assert fleet.world.where("u1") == {host}
    stops, starts = fleet.world.times(host, "stop", "u1"), fleet.world.times(host, "start", "u1")
    assert len(stops) == 1 and len(starts) == 2 and starts[0] < stops[0] < starts[1]
    doc = await fleet.plane.get("u1")
    assert doc is not None and doc.status is DocStatus.STARTING and doc.host == host

    (host2,) = fleet.world.where("u2")
    seen: list[tuple[DocStatus | None, set[str]]] = []
    other = next(h for h in fleet.hosts.values() if h.name != host2)
    other.controller.watchers.watch("u2", lambda d: seen.append(
        (d.status if d else None, set(fleet.world.where("u2")))))
    await fleet.plane.request("u2", DocStatus.DESTROY_REQUESTED)
    await until(lambda: not fleet.world.where("u2"), 10, "u2 stopped")
    await until(lambda: seen and seen[-1][0] is DocStatus.STOPPED, 10, "u2 says stopped")
    assert all(not running for status, running in seen if status is DocStatus.STOPPED)
    assert fleet.world.times(host2, "stop", "u2")


async def test_a_controller_without_its_database_runs_starts_nothing_and_says_why(
        tmp_path: Path, notify: None) -> None:
    """PostgreSQL unreachable at start-up: the controller runs (its watchdog fed), starts no
    worker (no lease can be taken), and ``hosts`` names the database."""
    cfg = host_config("host-a", tmp_path, f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    units = ScriptedSystemd()
    plane = LocalPlane(tmp_path / "plane.sqlite")
    controller = Controller(cfg, plane, units)
    task = asyncio.create_task(controller.run())
    try:
        await until(lambda: controller.loaded and "fleet" in {
            t.get_name() for t in controller.supervised}, 10, "running")
        await plane.request("u1", DocStatus.CREATE_REQUESTED)
        await asyncio.sleep(1.5)  # several ticks and a resync
        assert "start" not in units.calls
        assert controller.health_problem() is None
        client = ctl.AdminClient(cfg.controller.admin_socket, timeout=10)
        with pytest.raises(ctl.CtlError, match=r"127\.0\.0\.1") as err:
            await asyncio.to_thread(client.call, "hosts")
        assert err.value.code == "fleet_unavailable"
    finally:
        controller.stop.set()
        assert await asyncio.wait_for(task, 10) == 0
        controller.notifier.socket.close()


async def test_a_worker_ending_after_another_host_took_its_lease_leaves_the_document_alone(
        fleet: Fleet) -> None:
    """A thawed host (or one cut off): its worker's lease was taken by another host while
    it was frozen, and the unit ends here without saying "lease lost" (stopped before it
    could report, or its exit status unread). The end is no news about the account: the
    document must not say ``stopped`` — the new host's controller would stop the account
    there too, and it would run nowhere (chaos-fleet found exactly this)."""
    a = await fleet.up("host-a")
    await fleet.up("host-b")
    await fleet.create("u1", "u2")
    await until(lambda: fleet.world.where("u1") and fleet.world.where("u2"), 15, "running")
    user = next(u for u in ("u1", "u2") if fleet.world.where(u) == {"host-a"})
    a.units._leave(user)  # frozen: its worker renews no more
    await a.units.db(lambda c, u: c.execute(
        "UPDATE wabridge_fleet.leases SET host_id = 'host-b', epoch = epoch + 1 "
        "WHERE user_id = %s", (u,)), user)  # meanwhile host-b took the account over
    a.units.deliver(state(user, "inactive", "dead", 0))  # thawed: the unit ends, status 0
    await until(lambda: fleet.world.where(user) == {"host-b"}, 10, "the account on host-b")
    await asyncio.sleep(2 * float(FLEET["TICK_SECONDS"]) + 1.0)
    assert fleet.world.where(user) == {"host-b"}
    doc = await fleet.plane.get(user)
    assert doc is not None and doc.status is not DocStatus.STOPPED, doc
    assert doc.host == "host-b"
