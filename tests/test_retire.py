"""Retiring the host on the package's removal (controller/retire.py): which documents, and
the whole step against the real local control plane with a recording systemd."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from controller import retire
from controller.local import LocalPlane
from controller.plane import AccountDoc
from controller.unit_manager import UnitState
from wabridge import config
from wabridge.status import DocStatus

HOST = "host-a"


def doc(user: str, status: DocStatus | None, host: str | None = HOST) -> AccountDoc:
    return AccountDoc(user_id=user, status=status, raw_status=status.value if status else None,
                      host=host)


@pytest.mark.parametrize(
    ("document", "units", "retired"),
    [
        (doc("a", DocStatus.CONNECTED), [], True),
        (doc("a", DocStatus.DISCONNECTED), [], True),
        (doc("a", DocStatus.WAITING_QR), [], True),
        (doc("a", DocStatus.STARTING), [], True),
        (doc("a", DocStatus.STOPPING), [], True),
        (doc("a", DocStatus.CONNECTED, host="host-b"), [], False),  # another host's
        (doc("a", DocStatus.CONNECTED, host=None), ["a"], True),  # its unit is here
        (doc("a", DocStatus.CONNECTED, host="host-b"), ["a"], True),
        (doc("a", DocStatus.LOGGED_OUT), ["a"], False),  # an outcome stays true
        (doc("a", DocStatus.STOPPED), [], False),
        (doc("a", DocStatus.CREATE_REQUESTED), ["a"], False),  # a client's request is kept
        (doc("a", None), ["a"], False),
    ],
)
def test_plan(document: AccountDoc, units: list[str], retired: bool) -> None:
    todo = retire.plan([document], HOST, units, "removed")
    assert [t.user_id for t in todo] == (["a"] if retired else [])
    if retired:
        assert todo[0].fields["statusDetail"] == f"removed ({HOST})"
        assert todo[0].fields["process"]["pid"] == 0


def test_take_request(tmp_path: Path) -> None:
    path = tmp_path / "retire"
    assert retire.take_request(path) is None
    path.write_text("wabridge was removed\n  from this host\n")
    assert retire.take_request(path) == "wabridge was removed from this host"
    assert not path.exists(), "a request is consumed"
    path.write_text("\n")
    assert retire.take_request(path) == "wabridge was removed from this host"


def unit(user: str, state: str) -> UnitState:
    return UnitState(unit=f"wabridge-worker@{user}.service", user_id=user, active_state=state,
                     sub_state="", main_pid=0, n_restarts=0, result="success",
                     exec_main_code=0, exec_main_status=0, status_text="", memory_bytes=None,
                     cpu_nsec=None, tasks=None, since_usec=0)


class RecordingSystemd:
    """systemd as far as retiring uses it: units stop one listing after StopUnit."""

    def __init__(self, units: list[UnitState]) -> None:
        self.units = {u.unit: u for u in units}
        self.stopping: set[str] = set()
        self.calls: list[str] = []

    async def open(self) -> None:
        self.calls.append("open")

    async def close(self) -> None:
        self.calls.append("close")

    async def stop(self, name: str) -> None:
        self.calls.append(f"stop {name}")
        self.stopping.add(name)

    async def list_workers(self) -> list[UnitState]:
        listed = list(self.units.values())
        for name in self.stopping:
            self.units[name] = dataclasses.replace(self.units[name], active_state="inactive")
        return listed


async def test_retire_stops_workers_then_marks_their_documents(tmp_path: Path) -> None:
    db = tmp_path / "control.db"
    plane = LocalPlane(db)
    for user, status, host in [("alice", DocStatus.CONNECTED, HOST),
                               ("bob", DocStatus.DISCONNECTED, HOST),
                               ("carol", DocStatus.CONNECTED, "host-b"),
                               ("dave", DocStatus.BANNED, HOST)]:
        await plane.update(user, {"status": status.value, "host": host,
                                  "process": {"pid": 42, "state": "active",
                                              "memoryBytes": 1000, "restarts": 2}})
    await plane.close()
    systemd = RecordingSystemd([unit("alice", "active"), unit("bob", "active"),
                                unit("dave", "inactive")])
    request = tmp_path / "retire"
    request.write_text("wabridge was removed from this host\n")
    cfg = dataclasses.replace(config.Config(), controller=dataclasses.replace(
        config.Config().controller, host_id=HOST))

    done = await retire.retire_if_requested(cfg, lambda: LocalPlane(db),
                                            lambda: systemd,  # type: ignore[arg-type,return-value] - a fake
                                            request=request)

    assert done and not request.exists()
    assert systemd.calls[0] == "open" and systemd.calls[-1] == "close"
    assert sorted(c for c in systemd.calls if c.startswith("stop")) == [
        "stop wabridge-worker@alice.service", "stop wabridge-worker@bob.service"]
    with contextlib.closing(sqlite3.connect(db)) as con:
        docs: dict[str, Any] = {user: json.loads(fields) for user, fields
                                in con.execute("SELECT user_id, fields FROM user_sessions")}
    for user in ("alice", "bob"):
        assert docs[user]["status"] == "stopped"
        assert docs[user]["statusDetail"] == f"wabridge was removed from this host ({HOST})"
        assert docs[user]["process"]["pid"] == 0 and docs[user]["process"]["state"] == "inactive"
        assert docs[user]["process"]["restarts"] == 2  # merged, not replaced
    assert docs["carol"]["status"] == "connected"  # another host's account
    assert docs["dave"]["status"] == "banned"


async def test_no_request_no_retirement(tmp_path: Path) -> None:
    def never() -> Any:
        raise AssertionError("nothing may be opened without a request")

    assert not await retire.retire_if_requested(config.Config(), never, never,
                                                request=tmp_path / "retire")
