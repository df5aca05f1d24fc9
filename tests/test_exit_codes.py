"""One exit code for one cause: a database written by a newer wabridge (a downgrade) stops
the worker and the controller with ``ExitCode.SCHEMA_TOO_NEW``, which both units list in
``RestartPreventExitStatus=`` (restarting cannot help), and the worker's document says why."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from agent import main as worker_main
from agent.store import MIGRATIONS, Store
from controller import main as controller_main
from controller.local import SCHEMA_VERSION, LocalPlane
from controller.plane import parse_account
from controller.reconcile import CLD_EXITED, UnitView, for_unit
from wabridge.errors import NO_RESTART_EXIT_CODES, ExitCode
from wabridge.status import EXIT_OUTCOMES

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def newer(path: Path, version: int) -> None:
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE schema_version SET version = ?", (version,))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("WABRIDGE_CONFIG", "/dev/null")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.delenv("INVOCATION_ID", raising=False)  # not under systemd: return, no _exit
    return tmp_path


def test_the_worker_refuses_a_newer_state_database_with_the_do_not_restart_code(
        env: Path) -> None:
    (env / "state").mkdir()
    Store(env / "state" / "agent.db").close()
    newer(env / "state" / "agent.db", len(MIGRATIONS) + 1)
    assert worker_main.main(["alice"]) == ExitCode.SCHEMA_TOO_NEW == 16


def test_a_fleet_worker_started_without_a_lease_stops_with_lease_lost(
        env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started by hand (``systemctl start``) instead of by its host's controller after it won
    the lease: nothing is opened, no WhatsApp connection, exit 17, not restarted."""
    monkeypatch.setenv("WABRIDGE__STORAGE__BACKEND", "postgresql")
    monkeypatch.setenv("WABRIDGE__STORAGE__POSTGRES_URL", "postgresql://ctl@127.0.0.1:1/wabridge")
    monkeypatch.setenv("WABRIDGE__FLEET__ENABLED", "true")
    monkeypatch.delenv("WABRIDGE_HOST_ID", raising=False)
    monkeypatch.delenv("WABRIDGE_LEASE_EPOCH", raising=False)
    assert worker_main.main(["alice"]) == ExitCode.LEASE_LOST == 17


async def make_plane(db: Path) -> None:
    await LocalPlane(db).close()


def test_the_controller_refuses_a_newer_control_plane_with_the_same_code(
        env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = env / "control.db"
    asyncio.run(make_plane(db))
    newer(db, SCHEMA_VERSION + 1)
    monkeypatch.setenv("WABRIDGE__CONTROLLER__CONTROL_PLANE", "local")
    monkeypatch.setenv("WABRIDGE__CONTROLLER__LOCAL_DB", str(db))
    assert controller_main.main([]) == ExitCode.SCHEMA_TOO_NEW


@pytest.mark.parametrize(("unit", "codes"), [
    ("wabridge-worker@.service", set(NO_RESTART_EXIT_CODES)),
    ("wabridge-controller.service", {ExitCode.CONFIG, ExitCode.SCHEMA_TOO_NEW}),
])
def test_both_units_leave_it_stopped(unit: str, codes: set[int]) -> None:
    text = (UNITS / unit).read_text()
    listed = re.search(r"^RestartPreventExitStatus=(.*)$", text, re.M)
    assert listed is not None
    assert {int(c) for c in listed.group(1).split()} == {int(c) for c in codes}


def test_the_worker_unit_counts_each_account_outcome_a_success() -> None:
    """``SuccessExitStatus=`` of the worker unit is the outcome table's codes and the fleet's
    lease loss: a logout is a normal end (the unit is "inactive", not "failed"), so is a
    handover to another host (not a crash on the document), and every such code also
    prevents a restart."""
    text = (UNITS / "wabridge-worker@.service").read_text()
    listed = re.search(r"^SuccessExitStatus=(.*)$", text, re.M)
    assert listed is not None
    assert {int(c) for c in listed.group(1).split()} == (
        {int(c) for c in EXIT_OUTCOMES} | {int(ExitCode.LEASE_LOST)})
    assert {int(c) for c in listed.group(1).split()} <= {int(c) for c in NO_RESTART_EXIT_CODES}
    assert set(EXIT_OUTCOMES) <= set(NO_RESTART_EXIT_CODES)


def test_the_document_says_what_to_do() -> None:
    unit = UnitView("failed", "failed", "exit-code", 0, exec_main_code=CLD_EXITED,
                    exec_main_status=ExitCode.SCHEMA_TOO_NEW)
    actions = for_unit(parse_account("alice", {"status": "connected"}), "alice", unit)
    errors = [a for a in actions if type(a).__name__ == "SetError"]
    assert len(errors) == 1
    message = errors[0].message  # type: ignore[union-attr]
    assert "exited with code 16" in message and "not restarted: schema_too_new" in message
    assert "written by a newer wabridge" in message


@pytest.mark.parametrize(("code", "spilled", "releases"), [
    (ExitCode.OK, False, True),  # a stop: the next owner need not wait for expiry + grace
    (ExitCode.LOGGED_OUT, False, True),  # an outcome: nobody runs it until asked again
    (ExitCode.QR_EXPIRED, False, True),
    (ExitCode.FAILURE, False, False),  # systemd starts it again under the same epoch
    (ExitCode.RECONNECT, False, False),
    (ExitCode.LEASE_LOST, False, False),  # not ours to give back
    (ExitCode.OK, True, False),  # messages spilled here: this host must run it next
    (ExitCode.LOGGED_OUT, True, False),
])
def test_which_ends_of_a_fleet_worker_give_its_lease_back(
        code: ExitCode, spilled: bool, releases: bool) -> None:
    assert worker_main.releases_lease(code, spilled=spilled) is releases
