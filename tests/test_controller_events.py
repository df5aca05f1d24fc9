"""The controller's decisions under interleaved events, with a scripted systemd.

These drive ``controller.main.Controller`` directly (no D-Bus): a real ``LocalPlane`` on a
temporary SQLite file holds the document, and ``ScriptedSystemd`` delivers unit states at
the moments a real systemd's signals can arrive. The end-to-end tests cover the same paths
with a real systemd, where these interleavings only happen now and then.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from fakes.units import ScriptedSystemd

from controller.local import LocalPlane
from controller.main import Controller
from controller.plane import AccountDoc
from controller.slots import default_budget, fleet_memory
from controller.unit_manager import UnitState
from wabridge import config, protocol
from wabridge.status import DocStatus, WorkerState

UNIT = "wabridge-worker@alice.service"


def state(active: str, sub: str, *, result: str = "success", invocation: str = "a",
          restarts: int = 0, job: bool = False, code: int = 0, status: int = 0) -> UnitState:
    return UnitState(unit=UNIT, user_id="alice", active_state=active, sub_state=sub,
                     main_pid=0, n_restarts=restarts, result=result, exec_main_code=code,
                     exec_main_status=status, status_text="", memory_bytes=None, cpu_nsec=None,
                     tasks=None, since_usec=0, invocation_id=invocation, job_pending=job,
                     start_limit_burst=3)


FAILED_AT_LIMIT = state("failed", "failed", result="exit-code", restarts=3, code=1, status=1)


async def settle(controller: Controller) -> None:
    """Until every task the controller spawned is done, except the start slots' timers."""
    def busy() -> list[asyncio.Task[None]]:
        return [t for t in controller.tasks
                if "give_back" not in getattr(t.get_coro(), "__qualname__", "")]
    for _ in range(100):
        pending = busy()
        if not pending:
            return
        await asyncio.wait(pending, timeout=5)
    raise AssertionError(f"controller tasks still running: {busy()}")


@pytest.fixture
async def world(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[tuple[Controller, LocalPlane, ScriptedSystemd]]:
    """A controller with a scripted systemd and a real LocalPlane (parametrize indirectly
    with a LocalPlane subclass for another plane); ``controller.resync_interval`` is 1 s."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # where READY=1 would go
    notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    cfg = config.load(None, {"WABRIDGE__CONTROLLER__SOCKET": str(tmp_path / "w.sock"),
                             "WABRIDGE__CONTROLLER__ADMIN_SOCKET": str(tmp_path / "a.sock"),
                             "WABRIDGE__CONTROLLER__RESYNC_INTERVAL": "1"})
    plane_class: type[LocalPlane] = getattr(request, "param", LocalPlane)
    plane = plane_class(tmp_path / "plane.sqlite")
    systemd = ScriptedSystemd()
    controller = Controller(cfg, plane, systemd)
    controller.loaded = True
    yield controller, plane, systemd
    await settle(controller)
    controller.notifier.socket.close()
    notify.close()
    await plane.close()


async def doc_of(plane: LocalPlane) -> AccountDoc:
    doc = await plane.get("alice")
    assert doc is not None
    return doc


async def test_a_stale_inactive_state_after_reset_failed_does_not_stop_the_restart(
        world: tuple[Controller, LocalPlane, ScriptedSystemd]) -> None:
    """restart_requested on a unit that hit its start limit: ResetFailedUnit's "inactive"
    arrives while the start is under way, after the document already says "starting". The
    unit must be started, the document must stay "starting", and nothing may stop it."""
    controller, plane, systemd = world
    await plane.request("alice", DocStatus.CRASHED)
    controller.set_doc("alice", await doc_of(plane))
    controller.on_unit(FAILED_AT_LIMIT)
    await settle(controller)

    async def echo_then_inactive() -> None:
        controller.on_change(await doc_of(plane))  # the claim's echo: "starting"
        controller.on_unit(state("inactive", "dead", result="success"))  # ResetFailedUnit's

    systemd.on_call["install_dropin"] = echo_then_inactive
    await plane.request("alice", DocStatus.RESTART_REQUESTED)
    controller.on_change(await doc_of(plane))
    await settle(controller)

    assert "start" in systemd.calls and "stop" not in systemd.calls
    assert (await doc_of(plane)).status is DocStatus.STARTING

    controller.on_unit(state("activating", "start", invocation="b"))
    controller.on_unit(state("active", "running", invocation="b"))
    controller.on_change(await doc_of(plane))
    await settle(controller)
    assert "stop" not in systemd.calls
    assert (await doc_of(plane)).status is DocStatus.STARTING


async def test_a_unit_stopped_from_outside_after_the_start_still_marks_the_document(
        world: tuple[Controller, LocalPlane, ScriptedSystemd]) -> None:
    """The guard against stale states ends with the first state read after the start: a
    unit stopped by an operator (``systemctl stop``) right after it started is "stopped"."""
    controller, plane, systemd = world
    await plane.request("alice", DocStatus.CREATE_REQUESTED)
    controller.on_change(await doc_of(plane))
    await settle(controller)
    assert systemd.calls.count("start") == 1
    controller.on_change(await doc_of(plane))  # the echo of "starting"
    await settle(controller)
    controller.on_unit(state("activating", "start", invocation="b"))
    controller.on_unit(state("inactive", "dead", invocation="b"))
    await settle(controller)
    assert (await doc_of(plane)).status is DocStatus.STOPPED


async def test_worker_reports_are_written_even_when_the_cached_document_lags(
        world: tuple[Controller, LocalPlane, ScriptedSystemd]) -> None:
    """A worker says "disconnected" then "connected" before the echo of "disconnected"
    reached the controller: its cached document still says "connected". Both reports must
    reach the document, which ends "connected" (the chaos run ended with such documents
    stuck at "starting" and "disconnected"). A restarted worker's "starting" leaves a linked
    document as it is (an upgrade restarts every worker: the documents must not flap)."""
    controller, plane, _ = world
    await plane.update("alice", {"status": DocStatus.CONNECTED.value})
    controller.set_doc("alice", await doc_of(plane))  # and no echo is delivered from here on
    for seq, st in enumerate([WorkerState.STARTING, WorkerState.CONNECTED], 1):
        await controller.on_frame("alice", protocol.State(seq=seq, state=st, detail=st.value))
        assert (await doc_of(plane)).status is DocStatus.CONNECTED
    for seq, st in enumerate([WorkerState.DISCONNECTED, WorkerState.CONNECTED], 3):
        await controller.on_frame("alice", protocol.State(seq=seq, state=st, detail=st.value))
        assert (await doc_of(plane)).status is DocStatus(st.value)
    assert (await doc_of(plane)).status is DocStatus.CONNECTED


async def test_the_derived_claude_budget_pays_for_the_workers_running_now(
        world: tuple[Controller, LocalPlane, ScriptedSystemd]) -> None:
    controller, _, _ = world
    ledger = controller.server.slots
    assert ledger is not None and controller.cfg.claude.host_max_processes == 0
    memory = fleet_memory()
    assert ledger.budget == default_budget(memory, 0)
    for user, active in (("u1", "active"), ("u2", "activating"), ("u3", "deactivating"),
                         ("u4", "failed"), ("u5", "inactive")):
        controller.user(user).unit = replace(state(active, "x"), user_id=user,
                                             unit=f"wabridge-worker@{user}.service")
    assert controller.running_workers() == (3, 0)  # starting and stopping ones hold memory
    assert ledger.budget == default_budget(memory, 3) < default_budget(memory, 0)
    # an account on the api engine also holds the SDK
    controller.user("u1").doc = AccountDoc("u1", None, None, settings={"engine": "api"})
    controller.user("u4").doc = AccountDoc("u4", None, None, settings={"engine": "api"})
    assert controller.running_workers() == (3, 1)  # u4's unit failed: it holds nothing
    assert ledger.budget == default_budget(memory, 3, 1)
