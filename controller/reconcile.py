"""Pure decisions of the controller: what to do about a document or a unit.

``for_doc`` answers a document change, ``for_unit`` a unit state change, and ``reconcile``
the whole picture at start-up (documents that expect a worker but have no active unit are
started; units whose documents are gone are stopped). No I/O here: the controller executes the
returned actions in order. Every row is table-tested in ``tests/test_reconcile.py``.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.plane import SessionDoc
from wabridge.errors import NO_RESTART_EXIT_CODES, ExitCode, UserIdError
from wabridge.status import REQUESTS, RUNNING_STATUSES, DocStatus, WorkerState, doc_status_for
from wabridge.units import validate_user_id

CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


@dataclass(frozen=True)
class UnitView:
    """What the decisions need of a unit's state (built from ``controller.systemd.UnitState``)."""

    active_state: str  # active, activating, deactivating, inactive, failed, reloading
    sub_state: str = ""
    result: str = "success"
    n_restarts: int = 0
    exec_main_code: int = 0
    exec_main_status: int = 0
    oom: bool = False  # the memory cgroup recorded an OOM kill (cgroup v1 says Result=signal)

    @property
    def running(self) -> bool:
        return self.active_state in ("active", "activating", "reloading")


@dataclass(frozen=True)
class Claim:
    user_id: str
    expect: frozenset[DocStatus]
    new: DocStatus


@dataclass(frozen=True)
class Start:
    user_id: str
    reset_failed: bool = False
    restart: bool = False


@dataclass(frozen=True)
class Stop:
    user_id: str


@dataclass(frozen=True)
class Update:
    user_id: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SetError:
    user_id: str
    code: str
    message: str


Action = Claim | Start | Stop | Update | SetError

KNOWN = ", ".join(s.value for s in DocStatus)
# Outcomes a worker reports just before it exits by itself with a do-not-restart code:
# stopping it as well would race its exit and hide the exit code.
_WORKER_EXITS_ITSELF = frozenset({DocStatus.LOGGED_OUT, DocStatus.BANNED, DocStatus.REPLACED,
                                  DocStatus.OUTDATED, DocStatus.QR_EXPIRED})
_TERMINAL_FROM_EXIT = {
    ExitCode.LOGGED_OUT: DocStatus.LOGGED_OUT,
    ExitCode.BANNED: DocStatus.BANNED,
    ExitCode.REPLACED: DocStatus.REPLACED,
    ExitCode.OUTDATED: DocStatus.OUTDATED,
    ExitCode.QR_EXPIRED: DocStatus.QR_EXPIRED,
}


def for_doc(doc: SessionDoc, unit: UnitView | None) -> list[Action]:
    """What a document asks for, given its unit's state (None: no such unit loaded)."""
    uid = doc.user_id
    try:
        validate_user_id(uid)
    except UserIdError as exc:
        if doc.error_code == exc.code:
            return []
        return [SetError(uid, exc.code, f"{exc}; this user id cannot name a worker unit")]
    running = unit is not None and unit.running
    status = doc.status
    if status is None:
        if doc.raw_status is None or doc.error_code == "unknown_status":
            return []
        return [SetError(uid, "unknown_status",
                         f"status {doc.raw_status!r} is not one of: {KNOWN}")]
    if status is DocStatus.CREATE_REQUESTED:
        return [Claim(uid, frozenset({status}), DocStatus.STARTING),
                Start(uid, reset_failed=unit is not None and unit.active_state == "failed")]
    if status is DocStatus.RESTART_REQUESTED:
        return [Claim(uid, frozenset({status}), DocStatus.STARTING),
                Start(uid, reset_failed=True, restart=running)]
    if status is DocStatus.PAIRING_REQUESTED:
        phone = doc.pairing_phone or ""
        if not (phone.isascii() and phone.isdigit() and 8 <= len(phone) <= 15):
            return [SetError(uid, "bad_pairing_phone",
                             f"pairingPhone {phone!r} must be digits with country code "
                             "(8-15 digits, no '+')"),
                    Update(uid, {"status": DocStatus.STOPPED.value if not running
                                 else DocStatus.STARTING.value})]
        return [Claim(uid, frozenset({status}), DocStatus.PAIRING),
                Start(uid, reset_failed=unit is not None and unit.active_state == "failed")]
    if status is DocStatus.DESTROY_REQUESTED:
        return [Claim(uid, frozenset({status}), DocStatus.STOPPING), Stop(uid)]
    if status is DocStatus.STOPPING and not running:
        return [Update(uid, {"status": DocStatus.STOPPED.value})]
    if status in RUNNING_STATUSES:
        if unit is None or unit.active_state == "inactive":
            return [Start(uid)]
        return []
    if status in REQUESTS:  # pragma: no cover - every request is handled above
        return []
    if running and status not in _WORKER_EXITS_ITSELF and status is not DocStatus.STOPPING:
        return [Stop(uid)]
    return []


def crash_reason(unit: UnitView) -> str:
    if unit.oom or unit.result == "oom-kill":
        return "ran out of memory (killed by the kernel at the unit's MemoryMax=)"
    if unit.result == "watchdog":
        return "stopped answering the watchdog"
    if unit.result == "timeout":
        return "did not stop in time"
    if unit.exec_main_code in (CLD_KILLED, CLD_DUMPED):
        try:
            name = signal.Signals(unit.exec_main_status).name
        except ValueError:
            name = f"signal {unit.exec_main_status}"
        what = f"killed by {name}"
    else:
        what = f"exited with code {unit.exec_main_status}"
    return f"{what} after {unit.n_restarts} automatic restarts"


def for_unit(doc: SessionDoc | None, user_id: str, unit: UnitView) -> list[Action]:
    """Mirror a unit's state into its document, and name crashes."""
    if doc is None:
        return [Stop(user_id)] if unit.running else []
    mirror = Update(user_id, {"unit": {
        "activeState": unit.active_state, "subState": unit.sub_state, "result": unit.result,
        "nRestarts": unit.n_restarts, "exitCode": unit.exec_main_status,
    }})
    actions: list[Action] = [mirror]
    status = doc.status
    if unit.active_state == "failed" and status in RUNNING_STATUSES:
        actions.append(Update(user_id, {"status": DocStatus.CRASHED.value}))
        actions.append(SetError(user_id, "crashed", f"worker {crash_reason(unit)}"))
    elif unit.active_state in ("inactive", "failed"):
        # "failed" here: a stop that ended badly (TimeoutStopSec=, SIGKILL); still stopped.
        terminal = None
        if unit.exec_main_code == CLD_EXITED and unit.exec_main_status in NO_RESTART_EXIT_CODES:
            terminal = _TERMINAL_FROM_EXIT.get(ExitCode(unit.exec_main_status))
        if terminal is not None and status in RUNNING_STATUSES:
            actions.append(Update(user_id, {"status": terminal.value}))
        elif status in RUNNING_STATUSES or status is DocStatus.STOPPING:
            actions.append(Update(user_id, {"status": DocStatus.STOPPED.value}))
    return actions


_WORKER_MAY_SET = RUNNING_STATUSES | {DocStatus.PAIRING_REQUESTED}


def status_from_worker(current: DocStatus | None, state: WorkerState) -> DocStatus | None:
    """The document status after a worker reports ``state``; None: leave it.

    A worker may move a document between running statuses and into a terminal outcome
    (logged out, banned...), but never overrides a client's request or a stop in progress.
    """
    new = doc_status_for(state)
    if state is WorkerState.STOPPING:
        return None
    if current is None or current in _WORKER_MAY_SET:
        return new if new != current else None
    return None


def reconcile(docs: Mapping[str, SessionDoc], units: Mapping[str, UnitView]) -> list[Action]:
    """Start-up: bring units in line with documents, and stop units without a document."""
    actions: list[Action] = []
    for uid, doc in docs.items():
        actions.extend(for_doc(doc, units.get(uid)))
    for uid, unit in units.items():
        if uid not in docs and unit.running:
            actions.append(Stop(uid))
    return actions
