"""Pure decisions of the controller: what to do about a document or a unit.

``for_doc`` answers a document change, ``for_unit`` a unit state change, and ``reconcile``
the whole picture at start-up (documents that expect a worker but have no active unit are
started; units whose documents are gone are stopped). No I/O here: the controller executes the
returned actions in order. Every row is table-tested in ``tests/test_reconcile.py``.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.plane import CONTROLLER, AccountDoc
from controller.unit_manager import PROCESS_UNIT_STATES, RUNNING_UNIT_STATES, UnitState
from wabridge.errors import (
    EXIT_EXPLANATIONS,
    NO_RESTART_EXIT_CODES,
    ExitCode,
    PolicyError,
    UserIdError,
)
from wabridge.phone import PHONE_RULE, is_phone
from wabridge.status import (
    EXIT_OUTCOMES,
    OUTCOME_STATUSES,
    REQUESTS,
    RUNNING_STATUSES,
    DocStatus,
    WorkerState,
    doc_status_for,
)
from wabridge.units import validate_user_id

CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


@dataclass(frozen=True)
class UnitView:
    """What the decisions need of a unit's state (``view_of`` a ``UnitState``)."""

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
        return self.active_state in RUNNING_UNIT_STATES

    @property
    def restarting(self) -> bool:
        """Between a failure and systemd's automatic restart (``RestartSec=``)."""
        return self.sub_state == "auto-restart"


def view_of(state: UnitState) -> UnitView:
    # cgroup v1: an OOM kill is a SIGKILL (Result=signal) plus the memory cgroup's oom_kill
    # counter in the invocation's exit report (see controller/systemd.py "Exit reports")
    oom = (bool(state.oom_kills) and state.exec_main_code == CLD_KILLED
           and state.exec_main_status == signal.SIGKILL and state.result in ("signal", "oom-kill"))
    active = state.active_state
    if state.job_pending and active in ("inactive", "failed"):
        # StartUnit loaded the unit and queued its job, which has not run yet (a busy
        # systemd): it is starting, not stopped
        active = "activating"
    return UnitView(
        active_state=active, sub_state=state.sub_state, result=state.result,
        n_restarts=state.n_restarts, exec_main_code=state.exec_main_code,
        exec_main_status=state.exec_main_status, oom=oom,
        start_limit_burst=state.start_limit_burst,
    )


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


@dataclass(frozen=True)
class PushSettings:
    """Send the user's current settings to its running worker (``worker_settings``)."""

    user_id: str


Action = Claim | Start | Stop | Update | SetError | PushSettings

KNOWN = ", ".join(s.value for s in DocStatus)


def _shown(value: object, limit: int = 120) -> str:
    """A value as it may appear in an error message: its repr, cut to ``limit`` characters
    (a huge field must not make the error too large to write onto the document)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def for_doc(doc: AccountDoc, unit: UnitView | None) -> list[Action]:
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
                    Update(uid, stopped_fields() if not running
                           else {"status": DocStatus.STARTING.value})]
        return [Claim(uid, frozenset({status}), DocStatus.PAIRING),
                Start(uid, reset_failed=unit is not None and unit.active_state == "failed")]
    if status is DocStatus.DESTROY_REQUESTED:
        return [Claim(uid, frozenset({status}), DocStatus.STOPPING), Stop(uid)]
    if status is DocStatus.STOPPING and (unit is None or unit.active_state in ("inactive",
                                                                          "failed")):
        # not while "deactivating": its processes still run (TimeoutStopSec=, SIGKILL)
        return [Update(uid, stopped_fields())]
    if status in RUNNING_STATUSES:
        if unit is None or unit.active_state == "inactive":
            return [Start(uid)]
        return []
    if status in REQUESTS:  # pragma: no cover - every request is handled above
        return []
    # an outcome a worker reports just before it exits by itself with its do-not-restart
    # code (wabridge.status.EXIT_OUTCOMES): stopping it as well would race its exit and hide
    # the exit code
    if running and status not in OUTCOME_STATUSES and status is not DocStatus.STOPPING:
        return [Stop(uid)]
    return []


def retried_start(doc: AccountDoc | None, unit: UnitView | None, start: Start) -> list[Action]:
    """A start that could not be prepared (PostgreSQL unavailable), tried again: only while
    the document still wants a worker, and not over a worker started meanwhile (unless the
    start was a restart)."""
    if doc is None or doc.status not in RUNNING_STATUSES:
        return []
    if unit is not None and unit.running and not start.restart:
        return []
    return [start]


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
        code = ExitCode(unit.exec_main_status)
        why += f"; not restarted: {code.name.lower()}"
        if code in EXIT_EXPLANATIONS:
            why += f" ({EXIT_EXPLANATIONS[code]})"
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


def for_unit(doc: AccountDoc | None, user_id: str, unit: UnitView) -> list[Action]:
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
        # the error first: whoever sees "crashed" also sees why (facts before the status that
        # announces them); should a request get there first, the next start clears the error
        actions.append(SetError(user_id, "crashed", f"worker {crash_reason(unit)}",
                                reason="start_limit" if hit_start_limit(unit)
                                else exit_kind(unit)))
        actions.append(Update(user_id, {"status": DocStatus.CRASHED.value}))
    elif unit.active_state in ("inactive", "failed"):
        # "failed" here: a stop that ended badly (TimeoutStopSec=, SIGKILL); still stopped.
        terminal = None
        if unit.exec_main_code == CLD_EXITED and unit.exec_main_status in NO_RESTART_EXIT_CODES:
            terminal = EXIT_OUTCOMES.get(ExitCode(unit.exec_main_status))
        if terminal is not None and status in RUNNING_STATUSES:
            actions.append(Update(user_id, {"status": terminal.value}))
        elif status in RUNNING_STATUSES or status is DocStatus.STOPPING:
            actions.append(Update(user_id, stopped_fields()))
    return actions


# statuses a worker's report may move a document on from
WORKER_MAY_SET = frozenset(RUNNING_STATUSES | {DocStatus.PAIRING_REQUESTED})
CONTROLLER_OWNED = frozenset(DocStatus) - REQUESTS  # statuses only the controller writes


def worker_may_move(new: DocStatus) -> frozenset[DocStatus]:
    """The statuses a worker's report may move the document from, to ``new``. A worker
    process starting again (an upgrade restarts each one; systemd restarts a crashed one)
    does not undo ``connected``/``disconnected``: the account is still linked while the new
    process reconnects, and it reports what it then finds. Otherwise ``WORKER_MAY_SET``."""
    if new is DocStatus.STARTING:
        return WORKER_MAY_SET - {DocStatus.CONNECTED, DocStatus.DISCONNECTED}
    return WORKER_MAY_SET


#: Document statuses during which a worker's reports (its detail, phone and figures) describe
#: the account: the worker runs, or is being stopped. Once the document says ``stopped``,
#: ``crashed``, ``error``, an outcome, or holds a client's request, a report still in flight
#: from the old process (its "stopping", its last Claude process count) is stale: written, it
#: would contradict the status.
WORKER_MAY_REPORT = WORKER_MAY_SET | {DocStatus.STOPPING}


def worker_may_report(status: DocStatus | None) -> bool:
    """Whether a worker's report may be written on a document whose status is ``status``
    (None: the document is gone or has no status)."""
    return status in WORKER_MAY_REPORT


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

    handle: list[AccountDoc]  # requests to handle now
    missed: list[str]  # users among them whose request the feed never delivered: re-open it
    seen: dict[str, DocStatus | None]  # the pending requests, for the next check


def missed_requests(previous: Mapping[str, DocStatus | None], pending: Sequence[AccountDoc],
                    known: Mapping[str, AccountDoc]) -> Resync:
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


def reconcile(docs: Mapping[str, AccountDoc], units: Mapping[str, UnitView],
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
                and code is not None and code in EXIT_OUTCOMES):
            terminal = EXIT_OUTCOMES[ExitCode(code)]
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


# --- per-user settings -------------------------------------------------------------------
#: Settings that choose the worker's WhatsApp backend: they are fixed for a process's life
#: (``worker_environment``), so a change restarts a running worker.
BACKEND_KEYS = ("backend", "simUrl")
BACKENDS = ("neonize", "sim")
_SIM_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#\[\]@!&'()*+,;=%-]+\Z")
_PAIRING = frozenset({DocStatus.PAIRING_REQUESTED, DocStatus.PAIRING})


def worker_settings(doc: AccountDoc | None) -> dict[str, Any]:
    """What the worker is told (``Welcome``/``Settings``): the document's ``settings``, and
    the phone to pair with while a pairing is asked for."""
    if doc is None:
        return {}
    settings = dict(doc.settings)
    if doc.pairing_phone and doc.status in _PAIRING:
        settings["pairingPhone"] = doc.pairing_phone
    return settings


def for_settings(old: AccountDoc | None, new: AccountDoc, unit: UnitView | None) -> list[Action]:
    """A document changed: does its running worker need to hear about it? Any change of what
    ``worker_settings`` says is pushed at once (the worker checks it, reports a bad value and
    keeps its previous settings); a new ``backend``/``simUrl`` restarts a running worker,
    because the backend is chosen once, before the process opens any connection."""
    if old is None or unit is None or not unit.running:
        return []  # the first delivery (Welcome covers it) or no worker: the start reads them
    if worker_settings(old) == worker_settings(new):
        return []
    if (new.status in RUNNING_STATUSES
            and any(old.settings.get(k) != new.settings.get(k) for k in BACKEND_KEYS)):
        return [Start(new.user_id, restart=True)]
    return [PushSettings(new.user_id)]


def worker_environment(settings: Mapping[str, Any]) -> dict[str, str]:
    """The environment a worker starts with for its document's ``backend``/``simUrl``
    (configuration overrides, see ``wabridge.config``), written into its unit's drop-in
    before every start: the worker never builds a backend its user did not ask for. Raises
    ``PolicyError`` naming the key; values go into a unit file, so a URL is checked to be
    one (no quotes, spaces or backslashes)."""
    env: dict[str, str] = {}
    backend = settings.get("backend")
    if backend is not None:
        if backend not in BACKENDS:
            raise PolicyError(f"settings.backend {_shown(backend)} is not one of: "
                              f"{', '.join(BACKENDS)}")
        env["WABRIDGE__WORKER__BACKEND"] = str(backend)
    url = settings.get("simUrl")
    if url is not None:
        if not (isinstance(url, str) and _SIM_URL.match(url)):
            raise PolicyError(f"settings.simUrl {_shown(url)} is not an http(s) URL "
                              "(e.g. http://127.0.0.1:8081)")
        env["WABRIDGE__WORKER__SIM_URL"] = url
    return env


def clears_error(doc: AccountDoc | None, source: str, code: str | None = None) -> bool:
    """Whether ``source`` may clear the document's error now. Each error belongs to the
    source that reported it (``error.source``; none: written before sources, the
    controller's) and only that source clears it: a worker when the cause of ``code`` is
    gone (a corrected setting), the controller when a start succeeds (``code`` None: any of
    its own). A request's clean slate is the client's own write."""
    if doc is None or doc.error_code is None:
        return False
    if (doc.error_source or CONTROLLER) != source:
        return False
    return code is None or doc.error_code == code


def stopped_fields() -> dict[str, Any]:
    """What a document says with ``status: stopped`` besides the status: nothing of the
    process that was (its last detail, STATUS= line or live Claude processes)."""
    return {"status": DocStatus.STOPPED.value, "statusDetail": "stopped",
            "metrics": {"claudeProcesses": 0}}


# --- ordering: which events and reports are stale ----------------------------------------
# The controller carries actions out while other events arrive; these decide, from counters
# and times it keeps per user (``controller.main.UserState``), what an event still means.


def start_settled(state: UnitState) -> bool:
    """Whether a start is over for ``controller.max_starting`` (its start slot is given
    back): running (READY=1 sent), failed, waiting for an automatic restart, or stopped with
    no job queued."""
    if state.active_state in ("active", "failed", "deactivating"):
        return True
    if state.sub_state == "auto-restart":
        return True
    return state.active_state == "inactive" and not state.job_pending


def needs_start_slot(restart: bool, start_under_way: bool, unit: UnitView | None) -> bool:
    """Whether a ``Start`` takes one of the ``controller.max_starting`` slots: a restart
    does; a start does unless it is a no-op, because one is already under way (a second
    Start from the document's echo) or the unit runs."""
    return restart or not (start_under_way or (unit is not None and unit.running))


def predates_start(start_mark: int | None, delivered: int) -> bool:
    """Whether the unit's known state was read before this controller's last
    StartUnit/RestartUnit returned: ``start_mark`` is the count of states delivered then,
    ``delivered`` the count now. Such a state (e.g. the "inactive" of the ResetFailedUnit
    just before the start) must not mark the document stopped or crashed; the start's own
    state change follows. States are read on one FIFO D-Bus thread, so every state
    delivered after the start returned was read after the job was queued."""
    return start_mark == delivered


def awaits_new_worker(new: DocStatus, expect: frozenset[DocStatus],
                      unit_active_state: str | None) -> bool:
    """After a claim to ``new``: will a new worker process answer the request? Then
    whatever the old process still says while it stops is stale (``stale_report``). True
    for a claim to ``starting`` of a unit not running, or of a restart request."""
    running = unit_active_state in RUNNING_UNIT_STATES
    return new is DocStatus.STARTING and (not running or DocStatus.RESTART_REQUESTED in expect)


def replayed_status(new: DocStatus, expect: frozenset[DocStatus], unit_active_state: str | None,
                    last_report: DocStatus | None) -> DocStatus | None:
    """After a claim to ``starting`` of a worker that runs and keeps running (a second
    create request): the status it last reported, to say again (None: nothing to say)."""
    if new is not DocStatus.STARTING or awaits_new_worker(new, expect, unit_active_state):
        return None
    return last_report


def stale_report(connected_since: float, requested_at: float) -> bool:
    """Whether a worker's state report comes from a process that connected before the last
    claimed (re)start (monotonic times): the old process, still stopping, whose last words
    ("replaced", "logged out") must not undo the request."""
    return connected_since < requested_at


def process_fields(state: UnitState) -> dict[str, Any]:
    """The document's ``process``: the unit's main process as systemd accounts it."""
    # systemd keeps a stopped unit's last STATUS= line ("stopping: ..."): it describes a
    # process that is gone
    has_process = state.active_state in PROCESS_UNIT_STATES
    return {
        "pid": state.main_pid, "state": state.active_state, "restarts": state.n_restarts,
        "memoryBytes": state.memory_bytes,
        "status": state.status_text if has_process else None,
        "cpuSeconds": (state.cpu_nsec or 0) / 1e9, "since": state.since_usec / 1e6,
    }
