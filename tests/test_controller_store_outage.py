"""The controller with ``storage.backend = "postgresql"`` while PostgreSQL is down, through
``Controller.run()`` (an in-memory unit manager, a real ``LocalPlane``, the session's real
cluster stopped and started): it does not crash, starts no worker that could not open its
store, says ``store_unavailable`` on the document with the cause, and starts the worker
once the database answers again (retried with backoff), clearing the error."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fakes.units import ScriptedSystemd
from postgres_cluster import Cluster

from controller import pg_roles
from controller import reconcile as rc
from controller.local import LocalPlane
from controller.main import Controller
from controller.plane import AccountDoc, parse_account
from controller.unit_manager import UnitState
from wabridge import config, credentials
from wabridge.postgres import account_role
from wabridge.status import DocStatus


class Units(ScriptedSystemd):
    """Starting a unit makes it active, as systemd would say right after (``settles``)."""

    settles = True

    async def start(self, unit: str) -> None:
        await super().start(unit)
        if not self.settles:
            return
        user = unit.removeprefix("wabridge-worker@").removesuffix(".service")
        self.deliver(UnitState(
            unit=unit, user_id=user, active_state="active", sub_state="running",
            main_pid=4242, n_restarts=0, result="success", exec_main_code=0,
            exec_main_status=0, status_text="", memory_bytes=None, cpu_nsec=None, tasks=None,
            since_usec=0, invocation_id=user, job_pending=False, start_limit_burst=5))


@pytest.fixture
async def controller(tmp_path: Path, postgres: Cluster, monkeypatch: pytest.MonkeyPatch
                     ) -> AsyncIterator[tuple[Controller, LocalPlane, ScriptedSystemd]]:
    role, password, database = postgres.controller_role()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / credentials.POSTGRES_PASSWORD).write_text(password)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setattr(pg_roles, "PASSWORD_DIR", tmp_path / "passwords")
    monkeypatch.setattr(pg_roles, "RETRY_FIRST", 0.2)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    cfg = config.load(None, {
        "WABRIDGE__CONTROLLER__SOCKET": str(tmp_path / "w.sock"),
        "WABRIDGE__CONTROLLER__ADMIN_SOCKET": str(tmp_path / "a.sock"),
        "WABRIDGE__CONTROLLER__METRICS_LISTEN": "",
        "WABRIDGE__STORAGE__BACKEND": "postgresql",
        "WABRIDGE__STORAGE__POSTGRES_URL": postgres.url(role, database)})
    plane = LocalPlane(tmp_path / "plane.sqlite")
    systemd = Units()
    ctl = Controller(cfg, plane, systemd)
    try:
        yield ctl, plane, systemd
    finally:
        ctl.notifier.socket.close()
        notify.close()


async def until(cond: Callable[[], Any], timeout: float, what: str,
                task: asyncio.Task[int]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert not task.done(), f"the controller ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_postgres_down_at_start_then_later_starts_nothing_until_it_is_back(
        controller: tuple[Controller, LocalPlane, ScriptedSystemd], postgres: Cluster,
        tmp_path: Path) -> None:
    ctl, plane, systemd = controller
    # alice was connected before the host rebooted: her worker must start again
    await plane.update("alice", {"status": "connected", "phone": "5511999990101"})
    postgres.stop()
    try:
        task = asyncio.create_task(ctl.run())

        def doc(user: str) -> AccountDoc | None:
            return ctl.docs.get(user)

        await until(lambda: (d := doc("alice")) is not None
                    and d.error_code == "store_unavailable", 15, "store_unavailable", task)
        alice = doc("alice")
        assert alice is not None
        assert "Connection refused" in alice.error_message, alice.error_message
        assert str(postgres.port) in alice.error_message  # which server
        assert alice.status is DocStatus.STARTING  # no worker runs: not "connected"
        await asyncio.sleep(1.0)  # several retries (0.2 s, 0.4 s, 0.8 s)
        assert "start" not in systemd.calls and not systemd.dropins, "started a worker " \
            "that cannot open its store"
        assert not task.done()
    finally:
        postgres.start()
    await until(lambda: "start" in systemd.calls, 15, "the worker started", task)
    await until(lambda: (d := doc("alice")) is not None and d.error_code is None, 5,
                "the error cleared", task)
    assert (tmp_path / "passwords" / "alice").exists()
    assert "LoadCredential=postgres-password:" in systemd.dropins[
        "wabridge-worker@alice.service"]

    # later: down again while running; a new account waits for it, alice is left alone
    postgres.stop()
    try:
        await plane.request("bob", DocStatus.CREATE_REQUESTED)
        await until(lambda: (d := doc("bob")) is not None
                    and d.error_code == "store_unavailable", 15, "bob store_unavailable", task)
        bob = doc("bob")
        assert bob is not None and bob.status is DocStatus.STARTING
        assert systemd.calls.count("start") == 1
    finally:
        postgres.start()
    await until(lambda: systemd.calls.count("start") == 2, 30, "bob's worker started", task)
    await until(lambda: (d := doc("bob")) is not None and d.error_code is None, 5,
                "bob's error cleared", task)
    ctl.stop.set()
    assert await asyncio.wait_for(task, 10) == 0


async def test_a_second_start_while_ours_is_under_way_keeps_the_workers_password(
        controller: tuple[Controller, LocalPlane, ScriptedSystemd], postgres: Cluster,
        tmp_path: Path) -> None:
    """The document's echo of our own claim asks for a second Start while the unit is still
    activating (a no-op for systemd): a new password then would lock out the worker that
    already loaded the first one (seen end to end: "password authentication failed")."""
    ctl, plane, systemd = controller
    assert isinstance(systemd, Units)
    systemd.settles = False  # the unit stays "activating" as far as the controller knows
    loaded: list[str] = []

    async def worker_loads_its_credential() -> None:
        loaded.append((tmp_path / "passwords" / "carol").read_text())

    systemd.on_call["start"] = worker_loads_its_credential
    task = asyncio.create_task(ctl.run())
    await plane.request("carol", DocStatus.CREATE_REQUESTED)
    await until(lambda: systemd.calls.count("start") >= 2, 15, "the echo's Start", task)
    await asyncio.sleep(0.5)
    role = account_role("carol")
    with psycopg.connect(postgres.url(role, ctl.cfg.storage.postgres_url.rsplit("/", 1)[1]),
                         password=loaded[0]) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    ctl.stop.set()
    assert await asyncio.wait_for(task, 10) == 0


@pytest.mark.parametrize(("previous", "delay"), [(0.0, 2.0), (2.0, 4.0), (32.0, 60.0),
                                                 (60.0, 60.0)])
def test_retry_backoff(previous: float, delay: float) -> None:
    assert pg_roles.retry_delay(previous) == delay


def _doc(status: str | None) -> AccountDoc:
    return parse_account("alice", {"status": status} if status else {})


ACTIVE = rc.UnitView(active_state="active")
START, RESTART = rc.Start("alice"), rc.Start("alice", reset_failed=True, restart=True)


@pytest.mark.parametrize(("doc", "unit", "start", "planned"), [
    (_doc("starting"), None, START, [START]),  # still wanted: tried again
    (_doc("connected"), rc.UnitView(active_state="failed"), START, [START]),
    (_doc("stopped"), None, START, []),  # stopped meanwhile
    (_doc("destroy_requested"), None, START, []),
    (None, None, START, []),  # document gone
    (_doc("starting"), ACTIVE, START, []),  # started meanwhile
    (_doc("starting"), ACTIVE, RESTART, [RESTART]),  # a restart restarts it
])
def test_a_start_postgres_refused_is_tried_again_only_while_wanted(
        doc: AccountDoc | None, unit: rc.UnitView | None, start: rc.Start,
        planned: list[rc.Action]) -> None:
    assert rc.retried_start(doc, unit, start) == planned
