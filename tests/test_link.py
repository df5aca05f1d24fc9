"""The worker <-> controller link end to end: a real WorkerServer, a real ControllerLink, a
real Store, on a unix socket. Only systemd's PID -> unit lookup is faked.

Delivery is at-least-once: a frame is deleted from the worker's queue only after the
controller acked it, and the controller acks only after ``on_frame`` returned. A frame whose
``on_frame`` raised is re-sent after the reconnect; a frame whose ack was lost in a connection
drop is delivered twice (the controller's writes are idempotent for that reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.link import ControllerLink
from agent.store import Store
from controller import server
from controller.server import WorkerServer
from wabridge import protocol
from wabridge.status import WorkerState

ALICE_UNIT = "wabridge-worker@alice.service"


@pytest.fixture
def sock_path() -> Iterator[str]:
    # short: unix socket paths are limited to 107 bytes, pytest's tmp_path can be longer
    directory = tempfile.mkdtemp(prefix="wl-")
    yield os.path.join(directory, "c.sock")
    shutil.rmtree(directory, ignore_errors=True)


class Controller:
    """A WorkerServer with recording collaborators."""

    def __init__(self, path: str) -> None:
        self.frames: list[tuple[str, protocol.SequencedFrame]] = []
        self.attempts: list[protocol.SequencedFrame] = []
        self.lookups: list[int] = []
        self.fail_on: Callable[[protocol.SequencedFrame], bool] = lambda f: False
        self.delay = 0.0
        self.server = WorkerServer(path, self.unit_for_pid, self.on_frame, self.settings_for)

    async def unit_for_pid(self, pid: int) -> str | None:
        self.lookups.append(pid)
        return ALICE_UNIT if pid == os.getpid() else None

    async def on_frame(self, user_id: str, frame: protocol.SequencedFrame) -> None:
        self.attempts.append(frame)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_on(frame):
            raise RuntimeError("firestore write failed")
        self.frames.append((user_id, frame))

    async def settings_for(self, user_id: str) -> dict[str, Any]:
        return {"x": 1}

    def texts(self) -> list[str]:
        return [f.text for _, f in self.frames if isinstance(f, protocol.MessageEvent)]


@pytest.fixture
async def controller(sock_path: str) -> AsyncIterator[Controller]:
    c = Controller(sock_path)
    yield c
    await c.server.close()
    await asyncio.sleep(0.05)  # let connection handlers finish


class Worker:
    def __init__(self, path: str, user_id: str, store: Store) -> None:
        self.settings: list[dict[str, Any]] = []
        self.commands: list[protocol.Command] = []
        self.store = store
        self.link = ControllerLink(path, user_id, store, "test", self.settings.append,
                                   self.commands.append)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.link.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 5)

    def message(self, text: str) -> None:
        self.link.report(lambda seq: protocol.MessageEvent(
            seq=seq, event_id=f"in:{text}", chat_id="c", direction="in", sender="s",
            text=text, ts=1.0))

    def state(self, state: WorkerState, detail: str = "") -> None:
        self.link.report(lambda seq: protocol.State(seq=seq, state=state, detail=detail))


@pytest.fixture
async def worker(sock_path: str, tmp_path: Path) -> AsyncIterator[Worker]:
    store = Store(tmp_path / "state.db")
    w = Worker(sock_path, "alice", store)
    yield w
    await w.close()
    store.close()


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_frames_are_delivered_in_order_and_acked(
    controller: Controller, worker: Worker
) -> None:
    await controller.server.start()
    worker.start()
    await wait_until(lambda: worker.link.connected)
    assert worker.settings == [{"x": 1}]  # the welcome carried the document's settings
    worker.state(WorkerState.CONNECTED, "connected as +1")
    for text in ["one", "two", "three"]:
        worker.message(text)
    await wait_until(lambda: len(controller.frames) == 4)
    await wait_until(lambda: worker.store.unacked_frames() == [])
    assert [u for u, _ in controller.frames] == ["alice"] * 4
    assert controller.texts() == ["one", "two", "three"]
    first = controller.frames[0][1]
    assert isinstance(first, protocol.State)
    assert first.state is WorkerState.CONNECTED
    seqs = [f.seq for _, f in controller.frames]
    assert seqs == sorted(seqs)
    assert "alice" in controller.server.connections


async def test_a_link_for_another_user_is_refused(
    controller: Controller, sock_path: str, tmp_path: Path
) -> None:
    await controller.server.start()
    store = Store(tmp_path / "bob.db")
    bob = Worker(sock_path, "bob", store)
    bob.message("from bob")
    bob.start()
    await wait_until(lambda: "not_your_unit" in bob.link.last_error)
    await wait_until(lambda: len(controller.lookups) >= 2)  # it keeps retrying
    assert not bob.link.connected
    assert bob.task is not None and not bob.task.done()
    assert controller.frames == []
    assert bob.settings == []
    assert len(store.unacked_frames()) == 1  # kept for when it may speak
    assert "bob" not in controller.server.connections
    await bob.close()
    assert bob.task.done() and bob.task.exception() is None
    store.close()


async def test_an_unknown_process_is_refused(controller: Controller, sock_path: str,
                                             tmp_path: Path) -> None:
    async def no_unit(pid: int) -> str | None:
        return None

    controller.server._unit_for_pid = no_unit
    await controller.server.start()
    store = Store(tmp_path / "a.db")
    alice = Worker(sock_path, "alice", store)
    alice.start()
    await wait_until(lambda: "not_your_unit" in alice.link.last_error)
    await alice.close()
    store.close()


async def test_frames_queued_while_the_controller_is_down_are_delivered(
    controller: Controller, worker: Worker
) -> None:
    worker.message("early 1")
    worker.start()
    worker.message("early 2")
    await wait_until(lambda: worker.link.last_error != "")  # connection refused / no socket
    worker.message("early 3")
    assert not worker.link.connected
    await controller.server.start()
    await wait_until(lambda: len(controller.frames) == 3)
    await wait_until(lambda: worker.store.unacked_frames() == [])
    assert controller.texts() == ["early 1", "early 2", "early 3"]


async def test_controller_restart_loses_nothing(
    controller: Controller, worker: Worker, sock_path: str
) -> None:
    await controller.server.start()
    worker.start()
    worker.message("before")
    await wait_until(lambda: controller.texts() == ["before"])
    await controller.server.close()
    await wait_until(lambda: not worker.link.connected)
    worker.message("during")
    second = Controller(sock_path)
    await second.server.start()
    try:
        worker.message("after")
        await wait_until(lambda: second.texts() == ["during", "after"])
        await wait_until(lambda: worker.store.unacked_frames() == [])
    finally:
        await second.server.close()


async def test_a_failed_on_frame_is_resent_after_reconnect(
    controller: Controller, worker: Worker
) -> None:
    failed: list[int] = []

    def fail_once(frame: protocol.SequencedFrame) -> bool:
        if isinstance(frame, protocol.MessageEvent) and frame.text == "two" and not failed:
            failed.append(frame.seq)
            return True
        return False

    controller.fail_on = fail_once
    for text in ["one", "two", "three"]:
        worker.message(text)
    await controller.server.start()
    started = time.monotonic()
    worker.start()
    # nothing lost, in order; re-sent right after the reconnect, not after an ack timeout
    await wait_until(lambda: controller.texts() == ["one", "two", "three"], timeout=5)
    await wait_until(lambda: worker.store.unacked_frames() == [])
    assert time.monotonic() - started < 5
    assert failed
    attempted = [f.text for f in controller.attempts if isinstance(f, protocol.MessageEvent)]
    assert attempted == ["one", "two", "two", "three"]  # "two" twice: at least once delivery


async def test_a_report_made_during_a_flush_is_sent_promptly(
    controller: Controller, worker: Worker
) -> None:
    await controller.server.start()
    worker.start()
    await wait_until(lambda: worker.link.connected)
    controller.delay = 0.3  # the controller is slow to write the first frame
    worker.message("first")
    await wait_until(lambda: len(controller.attempts) == 1)
    worker.message("second")  # queued while the link waits for the first ack
    await wait_until(lambda: controller.texts() == ["first", "second"], timeout=3)


async def test_malformed_lines_get_error_frames_and_the_connection_stays_up(
    controller: Controller, sock_path: str
) -> None:
    await controller.server.start()
    reader, writer = await asyncio.open_unix_connection(sock_path)
    try:
        writer.write(protocol.encode(protocol.Hello(user_id="alice", pid=os.getpid(),
                                                    version="raw")))
        welcome = protocol.decode(await reader.readuntil(b"\n"))
        assert welcome == protocol.Welcome(settings={"x": 1})

        async def exchange(line: bytes) -> protocol.Frame:
            writer.write(line)
            await writer.drain()
            return protocol.decode(await asyncio.wait_for(reader.readuntil(b"\n"), 5))

        bad_lines = [
            (b"garbage\n", "not JSON", None),
            (b"[1,2]\n", "must be a JSON object", None),
            (b'{"v":1,"type":"teleport","seq":7}\n', "unknown frame type", 7),
            (b'{"v":1,"type":"state","seq":8,"state":"asleep"}\n', "unknown state", 8),
            (b'{"v":1,"type":"message","seq":"x"}\n', "'seq' must be int", None),
            (b'{"v":1,"type":"message","seq":9}\n', "lacks field", 9),
            (protocol.encode(protocol.Ack(seq=1)), "workers may not send ack", None),
            (protocol.encode(protocol.Hello(user_id="alice", pid=1, version="v")),
             "workers may not send hello", None),
        ]
        for line, problem, seq in bad_lines:
            answer = await exchange(line)
            assert isinstance(answer, protocol.Error), line
            assert answer.code == "bad_frame"
            assert problem in answer.message
            assert answer.seq == seq
        good = protocol.State(seq=42, state=WorkerState.CONNECTED)
        assert await exchange(protocol.encode(good)) == protocol.Ack(seq=42)
        assert controller.frames == [("alice", good)]
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_a_first_frame_other_than_hello_is_refused(
    controller: Controller, sock_path: str
) -> None:
    await controller.server.start()
    reader, writer = await asyncio.open_unix_connection(sock_path)
    try:
        writer.write(protocol.encode(protocol.Ack(seq=1)))
        answer = protocol.decode(await asyncio.wait_for(reader.readuntil(b"\n"), 5))
        assert isinstance(answer, protocol.Error)
        assert "expected hello" in answer.message
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and closed
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_latest_wins_compaction(controller: Controller, worker: Worker) -> None:
    worker.state(WorkerState.STARTING, "1")
    worker.message("m1")
    worker.state(WorkerState.WAITING_QR, "2")
    worker.message("m2")
    worker.state(WorkerState.CONNECTED, "3")
    assert len(worker.store.unacked_frames()) == 5
    await controller.server.start()
    worker.start()
    await wait_until(lambda: worker.store.unacked_frames() == [])
    await asyncio.sleep(0.1)
    states = [f for _, f in controller.frames if isinstance(f, protocol.State)]
    assert [s.detail for s in states] == ["3"]
    assert states[0].state is WorkerState.CONNECTED
    assert controller.texts() == ["m1", "m2"]  # messages are never compacted


async def test_a_frame_the_controller_cannot_read_does_not_block_the_queue(
    controller: Controller, worker: Worker
) -> None:
    # e.g. a newer worker's frame type during an upgrade: rejected with its seq, dropped
    worker.store.queue_frame(
        lambda seq: json.dumps({"v": 1, "type": "future", "seq": seq}).encode() + b"\n")
    worker.message("after")
    await controller.server.start()
    worker.start()
    await wait_until(lambda: controller.texts() == ["after"])
    await wait_until(lambda: worker.store.unacked_frames() == [], timeout=3)


async def test_controller_to_worker_frames(controller: Controller, worker: Worker) -> None:
    await controller.server.start()
    worker.start()
    await wait_until(lambda: "alice" in controller.server.connections)
    assert await controller.server.send("alice", protocol.Settings(settings={"model": "m"}))
    command = protocol.Command(name="pair_phone", args={"phone": "4915123456"})
    assert await controller.server.send("alice", command)
    await wait_until(lambda: worker.commands == [command])
    assert worker.settings == [{"x": 1}, {"model": "m"}]
    assert not await controller.server.send("nobody", command)


async def test_why_the_link_is_down_is_said_in_an_operators_words(
    controller: Controller, worker: Worker, sock_path: str
) -> None:
    worker.start()
    await wait_until(lambda: worker.link.last_error != "")
    assert worker.link.last_error == (f"the controller is not listening on {sock_path} "
                                      "(is wabridge-controller running?)")
    await controller.server.start()
    await wait_until(lambda: worker.link.connected)
    await controller.server.close()  # the controller stops: the worker sees EOF
    await wait_until(lambda: worker.link.last_error != "")
    assert worker.link.last_error == ("the controller closed the connection "
                                      "(restarting or stopped?)")
    assert "bytes read" not in worker.link.last_error


# --- accept-time authentication ----------------------------------------------------

@pytest.mark.parametrize(("uid", "pending", "refused"), [
    (0, {}, None),  # root: admitted, then identified by its unit
    (61184, {}, None),  # the first DynamicUser= UID (workers)
    (65519, {}, None),  # the last one
    (65534, {}, "not_a_worker_uid"),  # nobody
    (1000, {}, "not_a_worker_uid"),  # a login user
    (61183, {}, "not_a_worker_uid"),
    (65520, {}, "not_a_worker_uid"),
    (61200, {61200: server.MAX_PENDING_PER_UID}, "too_many_pending_for_uid"),
    (61200, {61200: server.MAX_PENDING_PER_UID - 1}, None),
    (61200, {u: 1 for u in range(61300, 61300 + server.MAX_PENDING)}, "too_many_pending"),
])
def test_admit(uid: int, pending: dict[int, int], refused: str | None) -> None:
    assert server.admit(uid, pending) == refused


FLOOD = r"""
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(sys.argv[1])
    except OSError:
        pass
    held.append(s)
print(len(held), flush=True)
sys.stdin.readline()
"""


async def test_an_unprivileged_flood_is_closed_at_accept(controller: Controller,
                                                         worker: Worker,
                                                         sock_path: str) -> None:
    """Connections from a UID no worker runs as are closed before anything is read and cost
    no unit lookup, so they hold no descriptor of the controller; a worker still links."""
    await controller.server.start()
    os.chmod(os.path.dirname(sock_path), 0o755)  # noqa: S103 - nobody must reach the socket
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-c", FLOOD, sock_path, "300",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert int(await asyncio.wait_for(proc.stdout.readline(), 60)) == 300
        await asyncio.sleep(0.2)
        assert controller.lookups == []
        assert not controller.server.pending
        open_sockets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    open_sockets.append(fd)
        assert len(open_sockets) < 50, len(open_sockets)
        worker.start()
        await wait_until(lambda: worker.link.connected)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        await proc.wait()


async def test_a_connection_that_never_says_hello_is_closed(
        controller: Controller, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "HELLO_TIMEOUT", 0.2)
    await controller.server.start()
    reader, writer = await asyncio.open_unix_connection(sock_path)
    await wait_until(lambda: controller.server.pending == {0: 1})
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing said
    assert not controller.server.pending
    writer.close()
