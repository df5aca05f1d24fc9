"""Pure decisions of the controller: what to do about a document or a unit.

``for_doc`` answers a document change, ``for_unit`` a unit state change, and ``reconcile``
the whole picture at start-up (documents that expect a worker but have no active unit are
started; units whose documents are gone are stopped). No I/O here: the controller executes the
returned actions in order. Every row is table-tested in ``tests/test_reconcile.py``.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.plane import SessionDoc
from wabridge.errors import NO_RESTART_EXIT_CODES, ExitCode, UserIdError
from wabridge.phone import PHONE_RULE, is_phone
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
    start_limit_burst: int = 0  # the unit's StartLimitBurst= (0: unknown)

    @property
    def running(self) -> bool:
        return self.active_state in ("active", "activating", "reloading")

    @property
    def restarting(self) -> bool:
        """Between a failure and systemd's automatic restart (``RestartSec=``)."""
        return self.sub_state == "auto-restart"


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
    reason: str = ""  # a machine-readable kind (see ``exit_kind``), written as error.reason


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


def _shown(value: object, limit: int = 120) -> str:
    """A value as it may appear in an error message: its repr, cut to ``limit`` characters
    (a huge field must not make the error too large to write onto the document)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
                         f"status {_shown(doc.raw_status)} is not one of: {KNOWN}")]
    if status is DocStatus.CREATE_REQUESTED:
        return [Claim(uid, frozenset({status}), DocStatus.STARTING),
                Start(uid, reset_failed=unit is not None and unit.active_state == "failed")]
    if status is DocStatus.RESTART_REQUESTED:
        return [Claim(uid, frozenset({status}), DocStatus.STARTING),
                Start(uid, reset_failed=True, restart=running)]
    if status is DocStatus.PAIRING_REQUESTED:
        phone = doc.pairing_phone or ""
        if not is_phone(phone):
            return [SetError(uid, "bad_pairing_phone",
                             f"pairingPhone {phone!r} must be {PHONE_RULE}"),
                    Update(uid, {"status": DocStatus.STOPPED.value if not running
                                 else DocStatus.STARTING.value})]
        return [Claim(uid, frozenset({status}), DocStatus.PAIRING),
                Start(uid, reset_failed=unit is not None and unit.active_state == "failed")]
    if status is DocStatus.DESTROY_REQUESTED:
        return [Claim(uid, frozenset({status}), DocStatus.STOPPING), Stop(uid)]
    if status is DocStatus.STOPPING and (unit is None or unit.active_state in ("inactive",
                                                                          "failed")):
        # not while "deactivating": its processes still run (TimeoutStopSec=, SIGKILL)
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


def exit_kind(unit: UnitView) -> str:
    """How the unit's last process ended, as a stable word for documents and metrics.

    ``out_of_memory``: the kernel killed it at ``MemoryMax=`` (on cgroup v1 systemd 252 says
    ``Result=signal``; the exit report of ``ExecStopPost=`` has the memory cgroup's
    ``oom_kill`` counter, see ``controller.systemd``); ``watchdog``: it stopped sending
    ``WATCHDOG=1``; ``timeout``: a start or stop took too long; ``signal``: killed by a signal;
    ``exit_code``: it exited with a non-zero code.
    """
    if unit.oom or unit.result == "oom-kill":
        return "out_of_memory"
    if unit.result == "watchdog":
        return "watchdog"
    if unit.result == "timeout":
        return "timeout"
    if unit.exec_main_code in (CLD_KILLED, CLD_DUMPED):
        return "signal"
    if unit.exec_main_code == CLD_EXITED:
        return "exit_code"
    return unit.result or "unknown"


def hit_start_limit(unit: UnitView) -> bool:
    """Whether systemd gave up restarting the unit (``StartLimitBurst=`` in the interval).

    systemd 252 keeps the last failure's result (``exit-code``, ``signal``...) instead of
    ``start-limit-hit`` when an *automatic* restart is refused, so the reliable sign is a
    failed unit whose restart counter reached the burst. A failure that restarting cannot fix
    (``RestartPreventExitStatus=``) is not one.
    """
    if unit.active_state != "failed":
        return False
    if unit.result == "start-limit-hit":
        return True
    if unit.exec_main_code == CLD_EXITED and unit.exec_main_status in NO_RESTART_EXIT_CODES:
        return False
    return 0 < unit.start_limit_burst <= unit.n_restarts


def crash_reason(unit: UnitView) -> str:
    if unit.oom or unit.result == "oom-kill":
        what = "ran out of memory (killed by the kernel at the unit's MemoryMax=)"
    elif unit.result == "watchdog":
        what = "stopped answering the watchdog"
    elif unit.result == "timeout":
        what = "did not stop in time"
    elif unit.exec_main_code in (CLD_KILLED, CLD_DUMPED):
        what = f"killed by {signal_name(unit.exec_main_status)}"
    else:
        what = f"exited with code {unit.exec_main_status}"
    if unit.restarting:
        return f"{what}; systemd restarts it (automatic restart {unit.n_restarts + 1})"
    why = f"{what} after {unit.n_restarts} automatic restarts"
    if hit_start_limit(unit):
        burst = f" (StartLimitBurst={unit.start_limit_burst})" if unit.start_limit_burst else ""
        why += f"; systemd gave up: start limit hit{burst}"
    elif (unit.active_state == "failed" and unit.exec_main_code == CLD_EXITED
          and unit.exec_main_status in NO_RESTART_EXIT_CODES):
        why += f"; not restarted: {ExitCode(unit.exec_main_status).name.lower()}"
    return why


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_facts(unit: UnitView) -> dict[str, Any]:
    """The document's ``lastExit``: why the worker's last process ended."""
    killed = unit.exec_main_code in (CLD_KILLED, CLD_DUMPED)
    return {
        "reason": exit_kind(unit),
        "message": f"worker {crash_reason(unit)}",
        "result": unit.result,
        "exitCode": unit.exec_main_status if unit.exec_main_code == CLD_EXITED else None,
        "signal": signal_name(unit.exec_main_status) if killed else None,
        "restarts": unit.n_restarts,
        "oom": unit.oom or unit.result == "oom-kill",
        "startLimitHit": hit_start_limit(unit),
        "restarting": unit.restarting,
    }


def for_unit(doc: SessionDoc | None, user_id: str, unit: UnitView) -> list[Action]:
    """Mirror a unit's state into its document, and name crashes."""
    if doc is None:
        return [Stop(user_id)] if unit.running else []
    fields: dict[str, Any] = {"unit": {
        "activeState": unit.active_state, "subState": unit.sub_state, "result": unit.result,
        "nRestarts": unit.n_restarts, "exitCode": unit.exec_main_status,
    }}
    if unit.restarting or unit.active_state == "failed":
        # why systemd is restarting it (or gave up): written once per failure
        fields["lastExit"] = exit_facts(unit)
    actions: list[Action] = [Update(user_id, fields)]
    status = doc.status
    if unit.active_state == "failed" and status in RUNNING_STATUSES:
        actions.append(Update(user_id, {"status": DocStatus.CRASHED.value}))
        actions.append(SetError(user_id, "crashed", f"worker {crash_reason(unit)}",
                                reason="start_limit" if hit_start_limit(unit)
                                else exit_kind(unit)))
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


# statuses a worker's report may move a document on from
WORKER_MAY_SET = frozenset(RUNNING_STATUSES | {DocStatus.PAIRING_REQUESTED})
CONTROLLER_OWNED = frozenset(DocStatus) - REQUESTS  # statuses only the controller writes


def status_from_worker(state: WorkerState) -> DocStatus | None:
    """The document status a worker's report asks for; None: none ("stopping" is the
    controller's to say).

    Whether it may be written depends on the document's status at the time of writing: a
    worker may move a document only from ``WORKER_MAY_SET`` (between running statuses and
    into a terminal outcome), never over a client's request or a stop in progress. The
    controller checks that inside the document transaction (``expect=WORKER_MAY_SET``), not
    against its cached copy, which can lag behind its own last write.
    """
    if state is WorkerState.STOPPING:
        return None
    return doc_status_for(state)


@dataclass(frozen=True)
class Resync:
    """What one resync check decided (``missed_requests``)."""

    handle: list[SessionDoc]  # requests to handle now
    missed: list[str]  # users among them whose request the feed never delivered: re-open it
    seen: dict[str, DocStatus | None]  # the pending requests, for the next check


def missed_requests(previous: Mapping[str, DocStatus | None], pending: Sequence[SessionDoc],
                    known: Mapping[str, SessionDoc]) -> Resync:
    """The controller's check under the change feed (``controller.resync_interval``).

    ``pending`` holds the documents with a ``*_requested`` status now, ``previous`` what the
    last check saw pending, ``known`` what the feed delivered. A request pending with the same
    status at two checks is handled (again: a claim is a transaction, so a request already
    acted on cannot be acted on twice); if the feed never delivered it, the feed missed it.
    A request seen once only may have been written a moment ago: the feed's to deliver.
    """
    handle = [doc for doc in pending
              if doc.user_id in previous and previous[doc.user_id] is doc.status]
    missed = [doc.user_id for doc in handle
              if doc.user_id not in known or known[doc.user_id].status is not doc.status]
    return Resync(handle, missed, {doc.user_id: doc.status for doc in pending})


def reconcile(docs: Mapping[str, SessionDoc], units: Mapping[str, UnitView],
              last_exit: Mapping[str, int] | None = None) -> list[Action]:
    """Start-up: bring units in line with documents, and stop units without a document.

    ``last_exit`` holds the exit status of workers that ended while the controller was away
    (from their exit reports): a document still saying ``connected`` whose worker exited
    with a do-not-restart code takes that outcome instead of a new start, which would show
    an unrequested QR code after a logout."""
    actions: list[Action] = []
    for uid, doc in docs.items():
        unit = units.get(uid)
        code = (last_exit or {}).get(uid)
        if (doc.status in RUNNING_STATUSES and (unit is None or not unit.running)
                and code is not None and code in _TERMINAL_FROM_EXIT):
            terminal = _TERMINAL_FROM_EXIT[ExitCode(code)]
            actions.append(Update(uid, {
                "status": terminal.value,
                "statusDetail": f"the worker ended ({terminal.value}, exit code {code}) "
                                "while the controller was down"}))
            continue
        actions.extend(for_doc(doc, unit))
    for uid, unit in units.items():
        if uid not in docs and unit.running:
            actions.append(Stop(uid))
    return actions
