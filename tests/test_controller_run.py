"""``Controller.run()`` as systemd runs it: an in-memory unit manager (``fakes.units``), a real
``LocalPlane`` (or one whose change feed is quiet or dead), the real worker socket with the
worker's own link (``agent.link.ControllerLink``), the real admin socket, and the notify
socket systemd would read (READY=1, WATCHDOG=1, STATUS=).

What these hold: the safety net under the change feed works through ``run()``; every
long-running task is supervised and the watchdog is fed only from real liveness; settings
reach a running worker at once and its errors clear when their cause is gone; the documents
and ``wabridgectl status`` say what is true.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fakes.units import ScriptedSystemd

from agent import policy
from agent.link import ControllerLink
from agent.store import Store
from controller.local import LocalPlane
from controller.main import Controller
from controller.plane import AccountDoc
from controller.unit_manager import UnitState
from wabridge import config, protocol
from wabridge.status import DocStatus, WorkerState

UNIT = "wabridge-worker@alice.service"


def unit_state(active: str, sub: str, *, pid: int = 0, status_text: str = "",
               invocation: str = "a") -> UnitState:
    return UnitState(unit=UNIT, user_id="alice", active_state=active, sub_state=sub,
                     main_pid=pid, n_restarts=0, result="success", exec_main_code=0,
                     exec_main_status=0, status_text=status_text, memory_bytes=None,
                     cpu_nsec=None, tasks=None, since_usec=0, invocation_id=invocation,
                     job_pending=False, start_limit_burst=5)


class QuietPlane(LocalPlane):
    """A change feed that went quiet without an error: ``watch`` delivers nothing."""

    rewatched = 0

    async def watch(self, on_change: Callable[..., None]) -> None:
        return None

    async def rewatch(self) -> None:
        self.rewatched += 1


class DeadFeedPlane(LocalPlane):
    """A change feed whose machinery ended (its task died): nothing restores it."""

    def feed_alive(self) -> bool:
        return False


class FailingResyncPlane(LocalPlane):
    """The resync's read fails with a bug, not a plane error: the resync task dies."""

    async def pending_requests(self) -> list[AccountDoc]:
        raise RuntimeError("a bug in the resync")


@dataclass
class Running:
    controller: Controller
    plane: LocalPlane
    systemd: ScriptedSystemd
    notify: socket.socket
    task: asyncio.Task[int] | None = None
    notes: list[str] = field(default_factory=list)

    async def start(self) -> None:
        self.task = asyncio.create_task(self.controller.run())
        await self.until(lambda: "READY=1" in self.read_notes(), 10, "READY=1")

    def read_notes(self) -> list[str]:
        while True:
            try:
                self.notes.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return self.notes

    async def until(self, cond: Callable[[], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.task is None or not self.task.done() or what == "exit", (
                f"controller ended while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def doc(self) -> AccountDoc:
        doc = await self.plane.get("alice")
        assert doc is not None
        return doc

    async def exit_code(self, timeout: float = 10) -> int:
        assert self.task is not None
        return await asyncio.wait_for(self.task, timeout)


@pytest.fixture
async def running(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Running]:
    """A controller about to run (``await running.start()``); parametrize indirectly with a
    LocalPlane subclass for another plane. ``controller.resync_interval`` is 1 s."""
    cfg = config.load(None, {"WABRIDGE__CONTROLLER__SOCKET": str(tmp_path / "w.sock"),
                             "WABRIDGE__CONTROLLER__ADMIN_SOCKET": str(tmp_path / "a.sock"),
                             "WABRIDGE__CONTROLLER__RESYNC_INTERVAL": "1",
                             "WABRIDGE__CONTROLLER__METRICS_INTERVAL": "1",
                             "WABRIDGE__CONTROLLER__METRICS_LISTEN": ""})
    plane_class: type[LocalPlane] = getattr(request, "param", LocalPlane)
    plane = plane_class(tmp_path / "plane.sqlite")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    systemd = ScriptedSystemd()
    controller = Controller(cfg, plane, systemd)
    run = Running(controller, plane, systemd, notify)
    yield run
    if run.task is not None and not run.task.done():
        controller.stop.set()
        await asyncio.wait_for(run.task, 10)
    controller.notifier.socket.close()
    notify.close()


# --- the safety net under the change feed --------------------------------------------------


@pytest.mark.parametrize("running", [QuietPlane], indirect=True)
async def test_a_request_the_feed_never_delivered_is_handled_by_the_resync(
        running: Running) -> None:
    """Through ``run()``: the plane the controller runs with is the one whose ``rewatch`` is
    called (a wrapper inheriting the base's no-op made this inert once)."""
    plane = running.plane
    assert isinstance(plane, QuietPlane)
    await running.start()
    written = time.monotonic()
    await plane.request("alice", DocStatus.CREATE_REQUESTED)
    await running.until(lambda: "start" in running.systemd.calls, 15,
                        "the resync handling the request")
    # seen pending at two checks, one interval apart: never on the first sight
    assert time.monotonic() - written >= 1.0
    await running.until(lambda: plane.rewatched == 1, 5, "rewatch")
    assert (await running.doc()).status is DocStatus.STARTING
    await asyncio.sleep(2.5)  # handled: nothing pending, nothing more to do
    assert plane.rewatched == 1 and running.systemd.calls.count("start") == 1


# --- supervision ----------------------------------------------------------------------------


@pytest.mark.parametrize("running", [FailingResyncPlane], indirect=True)
async def test_a_dead_resync_task_stops_the_controller_with_exit_1(running: Running) -> None:
    await running.start()
    assert await running.exit_code() == 1


async def test_a_dead_metrics_task_stops_the_controller_with_exit_1(running: Running) -> None:
    async def bug() -> None:
        raise RuntimeError("a bug in the metrics refresh")

    running.systemd.workers = [unit_state("active", "running", pid=7)]
    running.systemd.on_call["loaded_state"] = bug
    await running.start()
    assert await running.exit_code() == 1


def watchdog_fed(notes: list[str]) -> int:
    return notes.count("WATCHDOG=1")


async def test_the_watchdog_is_fed_while_every_part_is_alive(running: Running) -> None:
    await running.start()
    await running.until(lambda: watchdog_fed(running.read_notes()) >= 2, 6, "WATCHDOG=1")


@pytest.mark.parametrize("running", [DeadFeedPlane], indirect=True)
async def test_no_watchdog_while_the_change_feed_is_dead(running: Running) -> None:
    await running.start()
    await asyncio.sleep(4.5)
    notes = running.read_notes()
    assert watchdog_fed(notes) == 0
    assert any(n.startswith("STATUS=unhealthy: the local change feed ended") for n in notes)


async def test_no_watchdog_while_the_systemd_subscription_is_lost(running: Running) -> None:
    running.systemd.signals_alive = False
    await running.start()
    await asyncio.sleep(4.5)
    notes = running.read_notes()
    assert watchdog_fed(notes) == 0
    assert any("systemd signal subscription lost" in n for n in notes)


# --- settings reach a running worker; errors clear with their cause --------------------------


class FakeWorker:
    """The worker's side as ``agent.main.Worker`` does it: the real link; settings checked
    with the real policy; a bad value reported, a good one reported as cleared."""

    def __init__(self, path: str, store: Store) -> None:
        self.settings: list[dict[str, Any]] = []
        self.store = store
        self.link = ControllerLink(path, "alice", store, "test", self.on_settings,
                                   lambda _c: None)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.link.run(self.stop))

    def on_settings(self, settings: dict[str, Any]) -> None:
        self.settings.append(settings)
        try:
            policy.parse(settings)
        except policy.InvalidSetting as exc:
            message, code = str(exc), exc.code
            self.link.report(lambda seq: protocol.Problem(seq=seq, code=code, message=message))
            return
        self.link.report(lambda seq: protocol.ProblemCleared(seq=seq, code="bad_setting"))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def worker(running: Running, tmp_path: Path) -> AsyncIterator[FakeWorker]:
    running.systemd.pid_units[os.getpid()] = UNIT  # SO_PEERCRED -> GetUnitByPID
    running.systemd.workers = [unit_state("active", "running", pid=os.getpid())]
    await running.plane.update("alice", {"status": "connected", "settings": {}})
    await running.start()
    store = Store(tmp_path / "state.db")
    w = FakeWorker(str(tmp_path / "w.sock"), store)
    await running.until(lambda: w.link.connected and w.settings, 5, "the worker linked")
    yield w
    await w.close()
    store.close()


async def test_a_settings_change_reaches_the_running_worker_at_once(
        running: Running, worker: FakeWorker) -> None:
    allow = {"reply_to": "allowlist", "allowlist": ["5511988880001"]}
    written = time.monotonic()
    await running.plane.update("alice", {"settings": allow})
    await running.until(lambda: worker.settings[-1] == allow, 2, "the new settings")
    assert time.monotonic() - written < 2
    assert "start" not in running.systemd.calls and "restart" not in running.systemd.calls


async def test_a_bad_setting_is_reported_at_once_and_cleared_when_corrected(
        running: Running, worker: FakeWorker) -> None:
    written = time.monotonic()
    await running.plane.update("alice", {"settings": {"reply_to": 7}})

    async def error_code() -> str | None:
        return (await running.doc()).error_code

    while await error_code() != "bad_setting":
        assert time.monotonic() - written < 2, "bad_setting not reported within 2 s"
        await asyncio.sleep(0.05)
    doc = await running.doc()
    assert "reply_to" in doc.error_message and doc.error_source == "worker"
    # wabridgectl status says so too (the admin socket reads the controller's own view)
    row = await admin_status(running)
    assert row["error"]["code"] == "bad_setting"

    await running.plane.update("alice", {"settings": {"reply_to": "self"}})
    deadline = time.monotonic() + 2
    while await error_code() is not None:
        assert time.monotonic() < deadline, "the corrected setting left its error behind"
        await asyncio.sleep(0.05)
    await running.until(lambda: running.controller.docs["alice"].error_code is None, 2,
                        "the view without the error")
    assert (await admin_status(running))["error"] is None


async def test_a_worker_never_clears_the_controllers_error(
        running: Running, worker: FakeWorker) -> None:
    await running.plane.update("alice", {"error": {"code": "start_failed", "message": "x",
                                                   "source": "controller"}})
    await running.plane.update("alice", {"settings": {"groups": "off"}})
    await running.until(lambda: worker.settings[-1] == {"groups": "off"}, 2, "settings")
    await asyncio.sleep(0.5)  # the worker's "cleared" report was handled meanwhile
    assert (await running.doc()).error_code == "start_failed"


async def admin_status(running: Running) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(
        running.controller.cfg.controller.admin_socket)
    try:
        writer.write(b'{"op": "status", "user": "alice"}\n')
        answer = json.loads(await reader.readline())
    finally:
        writer.close()
    assert answer["ok"] is True, answer
    return dict(answer["users"][0])


# --- the backend the document asks for, from the first start --------------------------------


async def test_the_drop_in_carries_the_documents_backend(running: Running) -> None:
    await running.start()
    await running.plane.request("alice", DocStatus.CREATE_REQUESTED,
                                settings={"backend": "sim", "simUrl": "http://127.0.0.1:9"})
    await running.until(lambda: "start" in running.systemd.calls, 5, "StartUnit")
    dropin = running.systemd.dropins[UNIT]
    assert 'Environment="WABRIDGE__WORKER__BACKEND=sim"' in dropin
    assert 'Environment="WABRIDGE__WORKER__SIM_URL=http://127.0.0.1:9"' in dropin


async def test_a_bad_backend_is_named_and_nothing_starts(running: Running) -> None:
    await running.start()
    await running.plane.request("alice", DocStatus.CREATE_REQUESTED,
                                settings={"backend": "whatsapp-web"})

    async def errored() -> AccountDoc:
        while (doc := await running.doc()).error_code is None:
            await asyncio.sleep(0.05)
        return doc

    doc = await asyncio.wait_for(errored(), 5)
    assert (doc.error_code, doc.status) == ("bad_setting", DocStatus.ERROR)
    assert "settings.backend 'whatsapp-web' is not one of: neonize, sim" in doc.error_message
    assert "start" not in running.systemd.calls and UNIT not in running.systemd.dropins
    # corrected and asked again: it starts, and the controller's own error is cleared
    await running.plane.request("alice", DocStatus.CREATE_REQUESTED, settings={"backend": "sim"})
    await running.until(lambda: "start" in running.systemd.calls, 5, "StartUnit")
    await running.until(lambda: running.controller.docs["alice"].error_code is None, 5,
                        "the error cleared")


async def test_a_backend_change_restarts_the_running_worker_with_it(
        running: Running, worker: FakeWorker) -> None:
    await running.plane.update("alice", {"settings": {"backend": "sim"}})
    await running.until(lambda: "restart" in running.systemd.calls, 5, "RestartUnit")
    assert 'WABRIDGE__WORKER__BACKEND=sim"' in running.systemd.dropins[UNIT]


# --- documents say what is true -------------------------------------------------------------


async def test_after_a_controller_restart_status_shows_what_the_documents_hold(
        running: Running) -> None:
    await running.plane.update("alice", {"status": "connected", "phone": "5511999990101",
                                         "statusDetail": "connected as +5511999990101",
                                         "metrics": {"chats": 2, "claudeProcesses": 1}})
    running.systemd.workers = [unit_state("active", "running", pid=4242)]
    await running.start()  # a fresh controller: nothing written by it yet
    row = await admin_status(running)
    assert (row["status"], row["phone"], row["detail"], row["chats"]) == (
        "connected", "5511999990101", "connected as +5511999990101", 2)


async def test_a_stopped_document_keeps_nothing_of_the_process_that_was(
        running: Running) -> None:
    await running.plane.update("alice", {
        "status": "stopping", "statusDetail": "stopping",
        "metrics": {"claudeProcesses": 1, "chats": 3}})
    running.systemd.workers = [unit_state("deactivating", "stop-sigterm", pid=4242,
                                          status_text="stopping: closing Claude processes")]
    await running.start()
    running.systemd.deliver(unit_state("inactive", "dead",
                                       status_text="stopping: closing Claude processes"))

    async def stopped() -> AccountDoc:
        while (doc := await running.doc()).status is not DocStatus.STOPPED:
            await asyncio.sleep(0.05)
        return doc

    doc = await asyncio.wait_for(stopped(), 5)
    await running.until(lambda: running.controller.docs["alice"].process, 5, "process")
    doc = await running.doc()
    assert doc.status_detail == "stopped"
    assert doc.metrics == {"claudeProcesses": 0, "chats": 3}
    assert doc.process["status"] is None and doc.process["state"] == "inactive"
    row = await admin_status(running)
    assert (row["status"], row["detail"], row["claude_processes"]) == ("stopped", "stopped", 0)


async def test_a_late_report_of_a_stopped_worker_does_not_undo_stopped(
        running: Running, worker: FakeWorker) -> None:
    """The worker's last words ("stopping", its Claude processes) can reach the controller
    after the unit went inactive and the document said ``stopped``: they are not written."""
    await running.plane.update("alice", {"status": "stopped", "statusDetail": "stopped",
                                         "metrics": {"claudeProcesses": 0}})
    await running.until(lambda: running.controller.docs["alice"].status is DocStatus.STOPPED,
                        5, "the stopped document")
    worker.link.report(lambda seq: protocol.State(seq=seq, state=WorkerState.STOPPING,
                                                  detail="stopping", phone=""))
    worker.link.report(lambda seq: protocol.Metrics(
        seq=seq, chats=1, claude_processes=1, turns=1, messages_in=1, messages_out=1,
        input_tokens=1, output_tokens=1, cost_today_usd=0.0))
    await running.until(lambda: not worker.store.unacked_frames(), 5, "frames handled")
    doc = await running.doc()
    assert (doc.status, doc.status_detail) == (DocStatus.STOPPED, "stopped")
    assert doc.metrics == {"claudeProcesses": 0}
