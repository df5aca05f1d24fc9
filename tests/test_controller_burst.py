"""Bursts of client requests through ``Controller.run()`` on the real Firestore emulator.

A fleet of 100 running workers (an in-memory unit manager whose units follow StartUnit and
StopUnit as systemd's signals would, and whose accounting changes so the controller writes
``process`` figures as on a real host) is told to stop at once, then to start at once: every
request is acted on (StopUnit / StartUnit called) within 5 s of being written, by the change
feed, with ``controller.resync_interval`` at its default (30 s).

Why this once failed: the emulator answers every commit with a RESET of every listen target
followed by every document of the query again (100 documents per commit here), and the SDK's
``Watch`` decoded each one and sorted the whole result with a comparator that builds protobuf
messages on every call: ~30 ms of one core per commit. The controller's own writes of a burst
(claims, unit facts, ``process``) came faster than that, so the feed fell seconds, then tens
of seconds, behind, and the resync handled the requests instead (see controller/firestore.py,
``_Listener``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from fakes.units import ScriptedSystemd
from google.auth.credentials import AnonymousCredentials
from google.cloud import firestore

from controller.firestore import FirestorePlane, _by_path
from controller.main import Controller
from controller.unit_manager import UnitState
from wabridge import config, protocol
from wabridge.config import FirebaseConfig
from wabridge.status import DocStatus

N = 100
ACT_WITHIN = 5.0
USERS = [f"user{i:03d}" for i in range(N)]



@pytest.fixture(autouse=True)
def _no_gce_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # nothing may probe the GCE metadata server


def unit_state(user_id: str, active: str, sub: str, pid: int) -> UnitState:
    return UnitState(unit=f"wabridge-worker@{user_id}.service", user_id=user_id,
                     active_state=active, sub_state=sub, main_pid=pid, n_restarts=0,
                     result="success", exec_main_code=0, exec_main_status=0, status_text="",
                     memory_bytes=50_000_000, cpu_nsec=1_000_000, tasks=10, since_usec=0,
                     invocation_id="a", job_pending=False, start_limit_burst=5)


def user_of(unit: str) -> str:
    return unit.removeprefix("wabridge-worker@").removesuffix(".service")


class Fleet(ScriptedSystemd):
    """Units that stop and start when told, as their PropertiesChanged signals would say, and
    whose memory grows, so ``refresh_metrics`` writes each ``process`` every interval."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: dict[str, float] = {}  # user -> monotonic time of the first StopUnit
        self.started: dict[str, float] = {}
        self.grown = 0

    def _follow(self, user_id: str, *states: tuple[str, str, int]) -> None:
        loop = asyncio.get_running_loop()
        for delay, (active, sub, pid) in zip((0.05, 0.3), states, strict=True):
            loop.call_later(delay, self.deliver, unit_state(user_id, active, sub, pid))

    async def stop(self, unit: str) -> None:
        self.stopped.setdefault(user_of(unit), time.monotonic())
        await super().stop(unit)
        self._follow(user_of(unit), ("deactivating", "stop-sigterm", 100), ("inactive", "dead", 0))

    async def start(self, unit: str) -> None:
        self.started.setdefault(user_of(unit), time.monotonic())
        await super().start(unit)
        self._follow(user_of(unit), ("activating", "start", 200), ("active", "running", 200))

    async def loaded_state(self, unit: str) -> UnitState | None:
        await super().loaded_state(unit)
        self.grown += 4096
        state = unit_state(user_of(unit), "active", "running", 200)
        return dataclasses.replace(state, memory_bytes=50_000_000 + self.grown)


@dataclasses.dataclass
class Burst:
    controller: Controller
    fleet: Fleet
    client: FirestorePlane  # the app's side: writes requests
    task: asyncio.Task[int]


async def report_metrics(controller: Controller) -> None:
    """Each running worker's metrics frame every ``controller.metrics_interval``, spread
    evenly, as the worker link hands them to the controller (which writes each one)."""
    seq = 0
    while True:
        for uid in USERS:
            if uid in controller.server.connections or controller.units[uid].active_state == (
                    "active"):
                seq += 1
                frame = protocol.Metrics(seq=seq, chats=2, claude_processes=1, turns=seq,
                                         messages_in=seq, messages_out=seq, input_tokens=seq,
                                         output_tokens=seq, cost_today_usd=0.01)
                controller.spawn(controller.on_frame(uid, frame))
            await asyncio.sleep(controller.cfg.controller.metrics_interval / N)


@pytest.fixture
async def burst(firestore_emulator: str, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Burst]:
    """100 connected documents with running units, and the controller running on them."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd's end: drained
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    asyncio.get_running_loop().add_reader(notify.fileno(), notify.recv, 4096)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    firebase = FirebaseConfig(emulator_host=firestore_emulator,
                              project_id=f"demo-{uuid.uuid4().hex[:12]}")
    cfg = config.load(None, {
        "WABRIDGE__CONTROLLER__SOCKET": str(tmp_path / "w.sock"),
        "WABRIDGE__CONTROLLER__ADMIN_SOCKET": str(tmp_path / "a.sock"),
        "WABRIDGE__CONTROLLER__METRICS_LISTEN": "",
        # what is measured is the feed, not the pacing of starts (controller.max_starting)
        "WABRIDGE__CONTROLLER__MAX_STARTING": str(N),
    })
    assert cfg.controller.resync_interval == 30.0  # the default: the resync cannot help
    client = FirestorePlane(firebase)
    await asyncio.gather(*(client.update(uid, {
        "status": DocStatus.CONNECTED.value, "phone": "15550000000",
        "metrics": {"chats": 2, "turns": 10, "messagesIn": 40, "messagesOut": 20},
    }) for uid in USERS))
    fleet = Fleet()
    fleet.workers = [unit_state(uid, "active", "running", 100) for uid in USERS]
    controller = Controller(cfg, FirestorePlane(firebase), fleet)  # type: ignore[arg-type]
    task = asyncio.create_task(controller.run())
    deadline = time.monotonic() + 30
    while not fleet.callbacks or len(controller.docs) < N or not controller.plane.feed_alive():
        assert not task.done() and time.monotonic() < deadline, "the controller did not start"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # the feed's first snapshot is in
    reports = asyncio.create_task(report_metrics(controller))
    yield Burst(controller, fleet, client, task)
    reports.cancel()
    controller.stop.set()
    await asyncio.wait_for(task, 20)
    controller.notifier.socket.close()
    asyncio.get_running_loop().remove_reader(notify.fileno())
    notify.close()
    await client.close()


async def write_at_once(client: FirestorePlane, status: DocStatus, how: str) -> dict[str, float]:
    """Write ``status`` to every document at once; returns when each write was done."""
    done: dict[str, float] = {}
    if how == "batch":

        def commit() -> None:
            batch = client._client.batch()
            for uid in USERS:
                batch.set(client._col.document(uid), {"status": status.value}, merge=True)
            batch.commit()

        await asyncio.to_thread(commit)
        done = dict.fromkeys(USERS, time.monotonic())
    else:

        async def one(uid: str) -> None:
            await client.request(uid, status)
            done[uid] = time.monotonic()

        await asyncio.gather(*(one(uid) for uid in USERS))
    return done


async def acted_on(written: dict[str, float], acted: dict[str, float],
                   running: asyncio.Task[int], what: str,
                   controller: Controller | None = None) -> None:
    """Wait until every user was acted on (at most 5 s after the last write); then each
    request must have been acted on within 5 s of its own write."""
    deadline = max(written.values()) + ACT_WITHIN
    while len(acted) < N and time.monotonic() < deadline:
        assert not running.done(), "the controller ended"
        await asyncio.sleep(0.05)
    late = sorted(uid for uid in USERS
                  if uid not in acted or acted[uid] - written[uid] > ACT_WITHIN)
    feed = "" if controller is None else (
        f"; feed alive: {controller.plane.feed_alive()}, the controller's view of "
        f"{late[0] if late else '-'}: {controller.docs.get(late[0]) if late else '-'}")
    assert not late, (f"{len(late)} of {N} {what} not acted on within {ACT_WITHIN} s "
                      f"(e.g. {late[:3]}){feed}")


async def feed_caught_up(burst: Burst, timeout: float = 60) -> None:
    """Until the change feed has delivered everything written so far (a marker written now
    reaches the controller's view: the feed is ordered).

    The emulator answers every commit with every document of the query again, so the
    controller's own writes of the first burst (claims, ``stopped``, unit facts: ~300
    commits x 100 documents) leave the feed a backlog whose length depends on the machine;
    the second burst is measured from a feed that has caught up, as the first one is."""
    mark = uuid.uuid4().hex
    await burst.client.update(USERS[0], {"feedMark": mark})

    async def arrived() -> bool:
        doc = burst.controller.docs.get(USERS[0])
        return doc is not None and doc.data.get("feedMark") == mark

    await until(arrived, timeout, "the change feed to catch up")


async def until(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


@pytest.mark.firestore
@pytest.mark.parametrize("how", ["batch", "concurrent"])
async def test_100_stop_then_100_start_requests_at_once_are_acted_on_within_5_s(
        burst: Burst, how: str) -> None:
    written = await write_at_once(burst.client, DocStatus.DESTROY_REQUESTED, how)
    await acted_on(written, burst.fleet.stopped, burst.task, "destroy_requested",
                   burst.controller)

    async def all_stopped() -> bool:
        docs = await burst.client.list_accounts()
        return all(doc.status is DocStatus.STOPPED for doc in docs)

    await until(all_stopped, 30, "every document to say stopped")
    await feed_caught_up(burst)

    written = await write_at_once(burst.client, DocStatus.CREATE_REQUESTED, how)
    await acted_on(written, burst.fleet.started, burst.task, "create_requested",
                   burst.controller)
    for doc in await burst.client.list_accounts():
        assert doc.status is not DocStatus.CREATE_REQUESTED  # claimed: starting, or further


def test_the_listener_orders_documents_as_the_sdk_does() -> None:
    """``_by_path`` replaces the SDK's ``Query._comparator`` for the plane's query (no
    ``order_by``): the same order, or the SDK's document tree would misplace documents."""
    client = firestore.Client(project="demo-order", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
    query = firestore.Query(client.collection("sessions"))
    ids = ["b", "a", "a b", "A", "a0", "\u00e9", "Z", "10", "9", "a_", "user000", "\U0001f600"]
    docs = [firestore.DocumentSnapshot(client.collection("sessions").document(i), {}, True,
                                       None, None, None) for i in ids]
    sdk = sorted(docs, key=functools.cmp_to_key(query._comparator))
    ours = sorted(docs, key=functools.cmp_to_key(_by_path))
    assert [d.id for d in ours] == [d.id for d in sdk]
