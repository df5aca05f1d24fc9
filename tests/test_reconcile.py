"""The controller's pure decisions, row by row."""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

import pytest

from controller.plane import AccountDoc, parse_account
from controller.reconcile import (
    CLD_DUMPED,
    CLD_EXITED,
    CLD_KILLED,
    WORKER_MAY_SET,
    Action,
    Claim,
    PushSettings,
    SetError,
    Start,
    Stop,
    UnitView,
    Update,
    awaits_new_worker,
    clears_error,
    crash_reason,
    exit_facts,
    exit_kind,
    for_doc,
    for_settings,
    for_unit,
    hit_start_limit,
    missed_requests,
    needs_start_slot,
    predates_start,
    process_fields,
    reconcile,
    replayed_status,
    stale_report,
    status_from_worker,
    worker_environment,
    worker_may_move,
    worker_may_report,
    worker_settings,
)
from controller.unit_manager import UnitState
from wabridge.errors import ExitCode, PolicyError
from wabridge.status import REQUESTS, RUNNING_STATUSES, DocStatus, WorkerState

S = DocStatus
U = "alice"

NONE = None
ACTIVE = UnitView("active", "running")
ACTIVATING = UnitView("activating", "auto-restart")
DEACTIVATING = UnitView("deactivating", "stop-sigterm")
FAILED = UnitView("failed", "failed", result="exit-code", n_restarts=5, exec_main_code=CLD_EXITED,
                  exec_main_status=1)
INACTIVE = UnitView("inactive", "dead")
UNITS = {"none": NONE, "active": ACTIVE, "failed": FAILED, "inactive": INACTIVE}


def doc(status: DocStatus | str | None, **fields: object) -> AccountDoc:
    data: dict[str, object] = dict(fields)
    if status is not None:
        data["status"] = str(status)
    return parse_account(U, data)


def claim(frm: DocStatus, to: DocStatus) -> Claim:
    return Claim(U, frozenset({frm}), to)


def status_update(status: DocStatus) -> Update:
    if status is S.STOPPED:  # nothing of the process that was stays on the document
        return Update(U, {"status": "stopped", "statusDetail": "stopped",
                          "metrics": {"claudeProcesses": 0}})
    return Update(U, {"status": status.value})


# Every DocStatus x unit (none/active/failed/inactive). Requests first.
FOR_DOC: list[tuple[DocStatus, str, list[Any]]] = [
    (S.CREATE_REQUESTED, "none", [claim(S.CREATE_REQUESTED, S.STARTING), Start(U)]),
    (S.CREATE_REQUESTED, "active", [claim(S.CREATE_REQUESTED, S.STARTING), Start(U)]),
    (S.CREATE_REQUESTED, "failed",
     [claim(S.CREATE_REQUESTED, S.STARTING), Start(U, reset_failed=True)]),
    (S.CREATE_REQUESTED, "inactive", [claim(S.CREATE_REQUESTED, S.STARTING), Start(U)]),
    (S.RESTART_REQUESTED, "none",
     [claim(S.RESTART_REQUESTED, S.STARTING), Start(U, reset_failed=True)]),
    (S.RESTART_REQUESTED, "active",
     [claim(S.RESTART_REQUESTED, S.STARTING), Start(U, reset_failed=True, restart=True)]),
    (S.RESTART_REQUESTED, "failed",
     [claim(S.RESTART_REQUESTED, S.STARTING), Start(U, reset_failed=True)]),
    (S.RESTART_REQUESTED, "inactive",
     [claim(S.RESTART_REQUESTED, S.STARTING), Start(U, reset_failed=True)]),
    (S.DESTROY_REQUESTED, "none", [claim(S.DESTROY_REQUESTED, S.STOPPING), Stop(U)]),
    (S.DESTROY_REQUESTED, "active", [claim(S.DESTROY_REQUESTED, S.STOPPING), Stop(U)]),
    (S.DESTROY_REQUESTED, "failed", [claim(S.DESTROY_REQUESTED, S.STOPPING), Stop(U)]),
    (S.DESTROY_REQUESTED, "inactive", [claim(S.DESTROY_REQUESTED, S.STOPPING), Stop(U)]),
    # (PAIRING_REQUESTED has its own table below: it depends on the phone)
    # statuses that expect a running worker
    *[
        row
        for st in (S.STARTING, S.WAITING_QR, S.PAIRING, S.CONNECTED, S.DISCONNECTED)
        for row in [
            (st, "none", [Start(U)]),
            (st, "active", []),
            (st, "failed", []),  # crashed for good: for_unit reports it, no restart loop
            (st, "inactive", [Start(U)]),
        ]
    ],
    # a stop in progress
    (S.STOPPING, "none", [status_update(S.STOPPED)]),
    (S.STOPPING, "active", []),
    (S.STOPPING, "failed", [status_update(S.STOPPED)]),
    (S.STOPPING, "inactive", [status_update(S.STOPPED)]),
    # stopped, crashed or in error: a worker still running is stopped
    *[
        row
        for st in (S.CRASHED, S.STOPPED, S.ERROR)
        for row in [
            (st, "none", []),
            (st, "active", [Stop(U)]),
            (st, "failed", []),
            (st, "inactive", []),
        ]
    ],
    # outcomes the worker reports right before exiting by itself: no Stop racing its exit
    *[
        row
        for st in (S.LOGGED_OUT, S.BANNED, S.REPLACED, S.OUTDATED, S.QR_EXPIRED)
        for row in [
            (st, "none", []),
            (st, "active", []),
            (st, "failed", []),
            (st, "inactive", []),
        ]
    ],
]


@pytest.mark.parametrize(("status", "unit", "actions"), FOR_DOC,
                         ids=[f"{r[0].value}-{r[1]}" for r in FOR_DOC])
def test_for_doc(status: DocStatus, unit: str, actions: list[Action]) -> None:
    assert for_doc(doc(status), UNITS[unit]) == actions


def test_for_doc_covers_every_status_and_unit() -> None:
    covered = {(r[0], r[1]) for r in FOR_DOC} | {
        (S.PAIRING_REQUESTED, u) for u in UNITS
    }
    assert covered == {(s, u) for s in DocStatus for u in UNITS}


@pytest.mark.parametrize("unit", [ACTIVATING, DEACTIVATING])
def test_for_doc_leaves_transitions_alone(unit: UnitView) -> None:
    assert for_doc(doc(S.CONNECTED), unit) == []


def test_a_stop_is_done_only_once_the_unit_has_stopped() -> None:
    assert for_doc(doc(S.STOPPING), DEACTIVATING) == []


def test_activating_counts_as_running() -> None:
    assert for_doc(doc(S.RESTART_REQUESTED), ACTIVATING)[1] == Start(
        U, reset_failed=True, restart=True
    )
    assert for_doc(doc(S.STOPPED), ACTIVATING) == [Stop(U)]


# --- pairing ------------------------------------------------------------------------------


@pytest.mark.parametrize("phone", ["4915123456789", "12345678", "123456789012345"])
@pytest.mark.parametrize("unit", ["none", "failed"])
def test_pairing_with_a_valid_phone(phone: str, unit: str) -> None:
    assert for_doc(doc(S.PAIRING_REQUESTED, pairingPhone=phone), UNITS[unit]) == [
        claim(S.PAIRING_REQUESTED, S.PAIRING),
        Start(U, reset_failed=unit == "failed"),
    ]


@pytest.mark.parametrize(
    "phone",
    [None, "", "+4915123456789", "123456", "1234567890123456", "49 151 234567",
     "4915-123456", "49151234567a", "\u0664\u0669\u0661\u0665\u0661\u0662\u0663\u0664",
     "\u00b2\u00b3\u00b2\u00b3\u00b2\u00b3\u00b2\u00b3", 4915123456789],
)
@pytest.mark.parametrize(("unit", "back_to"), [("none", S.STOPPED), ("inactive", S.STOPPED),
                                               ("active", S.STARTING)])
def test_pairing_with_a_bad_phone(phone: object, unit: str, back_to: DocStatus) -> None:
    fields = {} if phone is None else {"pairingPhone": phone}
    actions = for_doc(doc(S.PAIRING_REQUESTED, **fields), UNITS[unit])
    assert len(actions) == 2
    error, update = actions
    assert isinstance(error, SetError)
    assert error.code == "bad_pairing_phone"
    assert "7-15 digits" in error.message
    assert update == status_update(back_to)


# --- odd documents ------------------------------------------------------------------------


def test_unknown_status_is_reported_once() -> None:
    first = for_doc(doc("hibernate"), None)
    assert len(first) == 1
    assert isinstance(first[0], SetError)
    assert first[0].code == "unknown_status"
    assert "'hibernate'" in first[0].message
    assert "create_requested" in first[0].message
    # the controller wrote error.code; the next change of the document does not repeat it
    again = doc("hibernate", error={"code": "unknown_status", "message": "..."})
    assert for_doc(again, ACTIVE) == []


def test_status_of_the_wrong_type_is_unknown() -> None:
    actions = for_doc(parse_account(U, {"status": 42}), None)
    assert [type(a) for a in actions] == [SetError]


def test_absent_status_is_ignored() -> None:
    assert for_doc(doc(None), None) == []
    assert for_doc(doc(None), ACTIVE) == []


@pytest.mark.parametrize("bad", ["", "has space", "caf\u00e9", "x" * 129, "a/b"])
def test_invalid_user_id_is_reported_once(bad: str) -> None:
    d = parse_account(bad, {"status": "create_requested"})
    actions = for_doc(d, None)
    assert len(actions) == 1
    assert isinstance(actions[0], SetError)
    assert actions[0].user_id == bad
    assert actions[0].code == "bad_user_id"
    assert "cannot name a worker unit" in actions[0].message
    reported = parse_account(bad, {"status": "create_requested",
                                   "error": {"code": "bad_user_id"}})
    assert for_doc(reported, None) == []


# --- for_unit -------------------------------------------------------------------------------


def _mirror(unit: UnitView) -> Update:
    fields: dict[str, Any] = {"unit": {
        "activeState": unit.active_state, "subState": unit.sub_state, "result": unit.result,
        "nRestarts": unit.n_restarts, "exitCode": unit.exec_main_status,
    }}
    if unit.sub_state == "auto-restart" or unit.active_state == "failed":
        fields["lastExit"] = exit_facts(unit)
    return Update(U, fields)


def test_for_unit_mirrors_the_unit() -> None:
    assert for_unit(doc(S.CONNECTED), U, ACTIVE) == [_mirror(ACTIVE)]


@pytest.mark.parametrize("status", sorted(RUNNING_STATUSES))
def test_failed_while_running_is_a_crash(status: DocStatus) -> None:
    actions = for_unit(doc(status), U, FAILED)
    assert actions[0] == _mirror(FAILED)
    # the error before the status: whoever sees "crashed" also sees why
    assert actions[1] == SetError(U, "crashed",
                                  "worker exited with code 1 after 5 automatic restarts",
                                  reason="exit_code")
    assert actions[2] == status_update(S.CRASHED)
    assert len(actions) == 3


@pytest.mark.parametrize(
    ("unit", "words"),
    [
        (UnitView("failed", result="signal", exec_main_code=CLD_KILLED,
                  exec_main_status=signal.SIGKILL), "killed by SIGKILL"),
        (UnitView("failed", result="core-dump", exec_main_code=CLD_DUMPED,
                  exec_main_status=signal.SIGSEGV), "killed by SIGSEGV"),
        (UnitView("failed", result="signal", exec_main_code=CLD_KILLED, exec_main_status=99),
         "killed by signal 99"),
        (UnitView("failed", result="oom-kill", exec_main_code=CLD_KILLED,
                  exec_main_status=signal.SIGKILL), "ran out of memory"),
        (UnitView("failed", result="signal", exec_main_code=CLD_KILLED,
                  exec_main_status=signal.SIGKILL, oom=True), "ran out of memory"),
        (UnitView("failed", result="watchdog", exec_main_code=CLD_KILLED,
                  exec_main_status=signal.SIGABRT), "watchdog"),
        (UnitView("failed", result="timeout"), "did not stop in time"),
        (UnitView("failed", result="exit-code", n_restarts=2, exec_main_code=CLD_EXITED,
                  exec_main_status=ExitCode.CONFIG), "exited with code 78 after 2 automatic"),
    ],
)
def test_crash_reason(unit: UnitView, words: str) -> None:
    assert words in crash_reason(unit)
    actions = for_unit(doc(S.CONNECTED), U, unit)
    assert isinstance(actions[1], SetError)
    assert words in actions[1].message


# --- restart limits, OOM, watchdog ------------------------------------------------

KILLED9 = {"exec_main_code": CLD_KILLED, "exec_main_status": signal.SIGKILL}
EXIT1 = {"exec_main_code": CLD_EXITED, "exec_main_status": 1}


@pytest.mark.parametrize(
    ("unit", "kind", "gave_up"),
    [
        # systemd 252 keeps the last failure's result when it refuses an automatic restart
        (UnitView("failed", "failed", "exit-code", 5, start_limit_burst=5, **EXIT1),
         "exit_code", True),
        (UnitView("failed", "failed", "signal", 3, start_limit_burst=3, **KILLED9), "signal", True),
        (UnitView("failed", "failed", "start-limit-hit", 0), "start-limit-hit", True),
        (UnitView("failed", "failed", "exit-code", 2, start_limit_burst=5, **EXIT1),
         "exit_code", False),
        (UnitView("failed", "failed", "signal", 5, start_limit_burst=5, oom=True, **KILLED9),
         "out_of_memory", True),
        (UnitView("failed", "failed", "watchdog", 5, start_limit_burst=5,
                  exec_main_code=CLD_KILLED, exec_main_status=signal.SIGABRT), "watchdog", True),
        # restarting cannot fix it: failed at once, not a start limit
        (UnitView("failed", "failed", "exit-code", 5, start_limit_burst=5,
                  exec_main_code=CLD_EXITED, exec_main_status=ExitCode.CONFIG), "exit_code", False),
        (UnitView("activating", "auto-restart", "signal", 4, start_limit_burst=5, **KILLED9),
         "signal", False),
        (UnitView("activating", "auto-restart", "signal", 1, oom=True, **KILLED9),
         "out_of_memory", False),
        (UnitView("failed", "failed", "timeout", 0, start_limit_burst=5), "timeout", False),
    ],
)
def test_exit_kind_and_start_limit(unit: UnitView, kind: str, gave_up: bool) -> None:
    assert exit_kind(unit) == kind
    assert hit_start_limit(unit) is gave_up
    assert ("start limit hit" in crash_reason(unit)) is gave_up


def test_crash_reason_names_the_start_limit_and_the_last_exit() -> None:
    unit = UnitView("failed", "failed", "exit-code", 5, start_limit_burst=5, **EXIT1)
    assert crash_reason(unit) == ("exited with code 1 after 5 automatic restarts; "
                                  "systemd gave up: start limit hit (StartLimitBurst=5)")
    config = UnitView("failed", "failed", "exit-code", 0, start_limit_burst=5,
                      exec_main_code=CLD_EXITED, exec_main_status=ExitCode.CONFIG)
    assert crash_reason(config).endswith(
        "; not restarted: config (a configuration value is invalid; the journal names the key)")
    newer = dataclasses.replace(config, exec_main_status=ExitCode.SCHEMA_TOO_NEW)
    assert crash_reason(newer).endswith(  # the one cause, with what the operator does
        "; not restarted: schema_too_new (its state database was written by a newer "
        "wabridge; install that version (or a newer one) again; the data is left untouched)")


def test_gave_up_is_crashed_with_reason_start_limit() -> None:
    unit = UnitView("failed", "failed", "signal", 5, start_limit_burst=5, oom=True, **KILLED9)
    actions = for_unit(doc(S.CONNECTED), U, unit)
    assert actions[2] == status_update(S.CRASHED)
    error = actions[1]
    assert isinstance(error, SetError)
    assert (error.code, error.reason) == ("crashed", "start_limit")
    assert "ran out of memory" in error.message and "start limit hit" in error.message
    assert isinstance(actions[0], Update)
    last = actions[0].fields["lastExit"]
    assert last == {
        "reason": "out_of_memory", "message": f"worker {crash_reason(unit)}",
        "result": "signal", "exitCode": None, "signal": "SIGKILL", "restarts": 5, "oom": True,
        "startLimitHit": True, "restarting": False,
    }


def test_an_automatic_restart_says_why_and_keeps_the_status() -> None:
    unit = UnitView("activating", "auto-restart", "watchdog", 1,
                    exec_main_code=CLD_KILLED, exec_main_status=signal.SIGABRT)
    actions = for_unit(doc(S.CONNECTED), U, unit)
    assert len(actions) == 1
    assert isinstance(actions[0], Update)
    last = actions[0].fields["lastExit"]
    assert last["reason"] == "watchdog" and last["restarting"] is True
    assert last["signal"] == "SIGABRT" and last["exitCode"] is None
    assert last["message"] == ("worker stopped answering the watchdog; systemd restarts it "
                               "(automatic restart 2)")
    # running again: no lastExit rewrite
    assert "lastExit" not in for_unit(doc(S.CONNECTED), U, ACTIVE)[0].fields  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ExitCode.LOGGED_OUT, S.LOGGED_OUT),
        (ExitCode.BANNED, S.BANNED),
        (ExitCode.REPLACED, S.REPLACED),
        (ExitCode.OUTDATED, S.OUTDATED),
        (ExitCode.QR_EXPIRED, S.QR_EXPIRED),
    ],
)
def test_inactive_after_an_outcome_exit(code: ExitCode, status: DocStatus) -> None:
    unit = UnitView("inactive", "dead", exec_main_code=CLD_EXITED, exec_main_status=code)
    assert for_unit(doc(S.CONNECTED), U, unit)[1:] == [status_update(status)]


def test_inactive_after_exit_10_while_stopping_is_just_stopped() -> None:
    unit = UnitView("inactive", exec_main_code=CLD_EXITED, exec_main_status=ExitCode.LOGGED_OUT)
    assert for_unit(doc(S.STOPPING), U, unit)[1:] == [status_update(S.STOPPED)]


def test_exit_status_10_from_a_signal_is_not_an_outcome() -> None:
    unit = UnitView("inactive", exec_main_code=CLD_KILLED, exec_main_status=10)  # SIGUSR1
    assert for_unit(doc(S.CONNECTED), U, unit)[1:] == [status_update(S.STOPPED)]


@pytest.mark.parametrize(
    ("status", "unit", "then"),
    [
        (S.CONNECTED, INACTIVE, [status_update(S.STOPPED)]),
        (S.STOPPING, INACTIVE, [status_update(S.STOPPED)]),
        # a stop that ended in SIGKILL after TimeoutStopSec= leaves the unit failed
        (S.STOPPING, UnitView("failed", result="timeout"), [status_update(S.STOPPED)]),
        (S.STOPPED, INACTIVE, []),
        (S.LOGGED_OUT, INACTIVE, []),
        (S.LOGGED_OUT, FAILED, []),
        (S.CRASHED, FAILED, []),
        (S.CREATE_REQUESTED, INACTIVE, []),
        (S.DESTROY_REQUESTED, FAILED, []),
        (S.CONNECTED, ACTIVATING, []),
        (S.STOPPING, DEACTIVATING, []),
        (None, INACTIVE, []),
    ],
)
def test_for_unit_rows(status: DocStatus | None, unit: UnitView, then: list[Action]) -> None:
    assert for_unit(doc(status), U, unit) == [_mirror(unit), *then]


def test_for_unit_without_a_document() -> None:
    assert for_unit(None, U, ACTIVE) == [Stop(U)]
    assert for_unit(None, U, ACTIVATING) == [Stop(U)]
    assert for_unit(None, U, INACTIVE) == []
    assert for_unit(None, U, FAILED) == []


# --- status_from_worker ---------------------------------------------------------------------


@pytest.mark.parametrize("current", [None, S.DESTROY_REQUESTED, S.STOPPING, S.STOPPED,
                                     S.CREATE_REQUESTED, S.RESTART_REQUESTED, S.CRASHED,
                                     S.LOGGED_OUT, S.ERROR])
def test_worker_never_overrides_requests_or_stops(current: DocStatus | None) -> None:
    assert current not in WORKER_MAY_SET


@pytest.mark.parametrize("current", [*sorted(RUNNING_STATUSES), S.PAIRING_REQUESTED])
def test_worker_moves_running_documents(current: DocStatus) -> None:
    assert current in WORKER_MAY_SET


@pytest.mark.parametrize(
    ("current", "new", "moves"),
    [
        (S.CONNECTED, S.STARTING, False),  # a restarted worker: still linked, no flap
        (S.DISCONNECTED, S.STARTING, False),
        (S.WAITING_QR, S.STARTING, True),
        (S.STARTING, S.STARTING, True),
        (S.PAIRING_REQUESTED, S.STARTING, True),
        (S.CONNECTED, S.DISCONNECTED, True),
        (S.STARTING, S.CONNECTED, True),
        (S.CONNECTED, S.LOGGED_OUT, True),
        (S.STOPPING, S.CONNECTED, False),
    ],
)
def test_worker_may_move(current: DocStatus, new: DocStatus, moves: bool) -> None:
    assert (current in worker_may_move(new)) is moves


@pytest.mark.parametrize("state", [s for s in WorkerState if s is not WorkerState.STOPPING])
def test_worker_report_asks_for_its_status(state: WorkerState) -> None:
    assert status_from_worker(state) == S(state.value)


@pytest.mark.parametrize(("status", "reported"), [
    (S.STARTING, True), (S.WAITING_QR, True), (S.PAIRING, True), (S.CONNECTED, True),
    (S.DISCONNECTED, True), (S.PAIRING_REQUESTED, True),
    (S.STOPPING, True),  # the worker's own "stopping: closing Claude processes"
    (S.STOPPED, False), (S.CRASHED, False), (S.ERROR, False), (S.LOGGED_OUT, False),
    (S.BANNED, False), (S.REPLACED, False), (S.OUTDATED, False), (S.QR_EXPIRED, False),
    (S.CREATE_REQUESTED, False), (S.DESTROY_REQUESTED, False), (S.RESTART_REQUESTED, False),
    (None, False),
])
def test_worker_may_report(status: DocStatus | None, reported: bool) -> None:
    assert worker_may_report(status) is reported


def test_worker_stopping_is_never_written() -> None:
    assert status_from_worker(WorkerState.STOPPING) is None


def test_requests_are_never_worker_outputs() -> None:
    for state in WorkerState:
        assert S(state.value) not in REQUESTS


# --- reconcile -------------------------------------------------------------------------------


def test_reconcile_starts_missing_workers_and_stops_orphans() -> None:
    docs = {
        "a": parse_account("a", {"status": "connected"}),  # no unit: start
        "b": parse_account("b", {"status": "connected"}),  # running: fine
        "c": parse_account("c", {"status": "stopped"}),  # stopped, unit running: stop
        "d": parse_account("d", {"status": "waiting_qr"}),  # unit inactive: start
        "e": parse_account("e", {"status": "logged_out"}),  # nothing
    }
    units = {
        "b": ACTIVE,
        "c": ACTIVE,
        "d": INACTIVE,
        "orphan": ACTIVE,  # no document: stop
        "gone": INACTIVE,  # no document, not running: leave
        "dying": FAILED,
    }
    assert reconcile(docs, units) == [Start("a"), Stop("c"), Start("d"), Stop("orphan")]


def test_reconcile_of_nothing() -> None:
    assert reconcile({}, {}) == []


# --- missed_requests (the resync under the change feed) --------------------------------------


C, D = S.CREATE_REQUESTED, S.DESTROY_REQUESTED


@pytest.mark.parametrize(("previous", "pending", "known", "handled", "missed"), [
    # first sight: perhaps written a moment ago, the feed's to deliver
    ({}, [C], None, False, False),
    # pending twice, never delivered: handled, and the feed missed it
    ({U: C}, [C], None, True, True),
    # pending twice, delivered (a claim that failed): handled again, the feed is fine
    ({U: C}, [C], C, True, False),
    # delivered with an older status: the feed missed the new request
    ({U: C}, [C], S.CONNECTED, True, True),
    # a different request since the last check: a new one, first sight
    ({U: C}, [D], None, False, False),
    # handled since the last check: nothing pending, nothing to do
    ({U: C}, [], None, False, False),
])
def test_missed_requests(previous: dict[str, DocStatus], pending: list[DocStatus],
                         known: DocStatus | None, handled: bool, missed: bool) -> None:
    check = missed_requests(previous, [doc(st) for st in pending],
                            {U: doc(known)} if known else {})
    assert [d.user_id for d in check.handle] == ([U] if handled else [])
    assert check.missed == ([U] if missed else [])
    assert check.seen == ({U: pending[0]} if pending else {})


# --- per-user settings -----------------------------------------------------------------------

RUNNING_DOC = {"status": "connected", "settings": {"reply_to": "everyone"}}


def with_settings(settings: dict[str, Any], **fields: Any) -> AccountDoc:
    return parse_account(U, {**RUNNING_DOC, **fields, "settings": settings})


@pytest.mark.parametrize(("old", "new", "unit", "expected"), [
    # the first delivery: the worker's Welcome carries the settings
    (None, with_settings({"reply_to": "self"}), ACTIVE, []),
    # no worker: its next start reads them
    (with_settings({}), with_settings({"reply_to": "self"}), NONE, []),
    (with_settings({}), with_settings({"reply_to": "self"}), INACTIVE, []),
    # nothing the worker is told changed (a status, a metric)
    (with_settings({"reply_to": "self"}), with_settings({"reply_to": "self"}, phone="1"),
     ACTIVE, []),
    # a change, valid or not (the worker checks and reports), is pushed
    (with_settings({}), with_settings({"reply_to": "allowlist", "allowlist": ["1"]}), ACTIVE,
     [PushSettings(U)]),
    (with_settings({}), with_settings({"reply_to": 7}), ACTIVE, [PushSettings(U)]),
    (with_settings({"reply_to": 7}), with_settings({"reply_to": "self"}), ACTIVE,
     [PushSettings(U)]),
    # a pairing phone while pairing is asked for
    (with_settings({}), with_settings({}, status="pairing_requested", pairingPhone="4915123456"),
     ACTIVE, [PushSettings(U)]),
    # the backend is chosen once per process: a running worker restarts with the new one
    (with_settings({}), with_settings({"backend": "sim"}), ACTIVE, [Start(U, restart=True)]),
    (with_settings({"backend": "sim", "simUrl": "http://127.0.0.1:1"}),
     with_settings({"backend": "sim", "simUrl": "http://127.0.0.1:2"}), ACTIVE,
     [Start(U, restart=True)]),
    # ... unless a request is pending: the request decides
    (with_settings({}), with_settings({"backend": "sim"}, status="restart_requested"), ACTIVE,
     [PushSettings(U)]),
])
def test_for_settings(old: AccountDoc | None, new: AccountDoc, unit: UnitView | None,
                      expected: list[Action]) -> None:
    assert for_settings(old, new, unit) == expected


def test_worker_settings_carry_the_pairing_phone_only_while_pairing() -> None:
    assert worker_settings(None) == {}
    pairing = with_settings({"groups": "off"}, status="pairing", pairingPhone="4915123456")
    assert worker_settings(pairing) == {"groups": "off", "pairingPhone": "4915123456"}
    # a phone left on the document after the pairing is not asked for again
    assert worker_settings(with_settings({}, pairingPhone="4915123456")) == {}


@pytest.mark.parametrize(("settings", "env"), [
    ({}, {}),
    ({"reply_to": "self"}, {}),  # not the unit's business
    ({"backend": "sim"}, {"WABRIDGE__WORKER__BACKEND": "sim"}),
    ({"backend": "neonize"}, {"WABRIDGE__WORKER__BACKEND": "neonize"}),
    ({"backend": "sim", "simUrl": "http://127.0.0.1:8081/x?a=1&b=%20"},
     {"WABRIDGE__WORKER__BACKEND": "sim",
      "WABRIDGE__WORKER__SIM_URL": "http://127.0.0.1:8081/x?a=1&b=%20"}),
])
def test_worker_environment(settings: dict[str, Any], env: dict[str, str]) -> None:
    assert worker_environment(settings) == env


@pytest.mark.parametrize(("settings", "named"), [
    ({"backend": "simm"}, "settings.backend 'simm' is not one of: neonize, sim"),
    ({"backend": 7}, "settings.backend 7"),
    ({"backend": "sim", "simUrl": "ftp://x"}, "settings.simUrl 'ftp://x' is not an http(s) URL"),
    ({"simUrl": 'http://x/"\nExecStartPre=/bin/sh'}, "settings.simUrl"),
    ({"simUrl": "http://x/ y"}, "settings.simUrl"),
    ({"simUrl": "http://x\\y"}, "settings.simUrl"),
    ({"simUrl": ["http://x"]}, "settings.simUrl"),
])
def test_a_bad_backend_setting_is_named(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(PolicyError) as info:
        worker_environment(settings)
    assert named in str(info.value) and info.value.code == "bad_setting"


def err(code: str, source: str | None = None) -> AccountDoc:
    error: dict[str, Any] = {"code": code, "message": "m"}
    if source is not None:
        error["source"] = source
    return parse_account(U, {"status": "connected", "error": error})


@pytest.mark.parametrize(("doc", "source", "code", "clears"), [
    (None, "worker", "bad_setting", False),
    (parse_account(U, {"status": "connected"}), "worker", "bad_setting", False),
    # a worker clears its own problem, of that code only
    (err("bad_setting", "worker"), "worker", "bad_setting", True),
    (err("bot_loop", "worker"), "worker", "bad_setting", False),
    # ... never the controller's (a start failure, a crash)
    (err("start_failed", "controller"), "worker", "start_failed", False),
    (err("crashed"), "worker", "crashed", False),  # no source: written before sources
    # a successful start clears the controller's own errors, never a worker's
    (err("start_failed", "controller"), "controller", None, True),
    (err("crashed"), "controller", None, True),
    (err("bad_setting", "controller"), "controller", None, True),  # a bad backend at start
    (err("bad_setting", "worker"), "controller", None, False),
    (err("undecryptable", "worker"), "controller", None, False),
])
def test_clears_error(doc: AccountDoc | None, source: str, code: str | None,
                      clears: bool) -> None:
    assert clears_error(doc, source, code) is clears


# --- ordering: the decisions the controller once made while carrying actions out -----------

_CREATE = frozenset({DocStatus.CREATE_REQUESTED})
_RESTART = frozenset({DocStatus.RESTART_REQUESTED})


@pytest.mark.parametrize(("new", "expect", "active", "report", "awaits", "replay"), [
    # no unit, or a stopped one: a new process answers; the old one's words are stale
    (DocStatus.STARTING, _CREATE, None, None, True, None),
    (DocStatus.STARTING, _CREATE, "inactive", DocStatus.CONNECTED, True, None),
    (DocStatus.STARTING, _CREATE, "failed", DocStatus.LOGGED_OUT, True, None),
    (DocStatus.STARTING, _CREATE, "deactivating", DocStatus.REPLACED, True, None),
    # a restart always gets a new process, running or not
    (DocStatus.STARTING, _RESTART, "active", DocStatus.CONNECTED, True, None),
    # a create request while the worker runs: it keeps running; say what it last said
    (DocStatus.STARTING, _CREATE, "active", DocStatus.CONNECTED, False, DocStatus.CONNECTED),
    (DocStatus.STARTING, _CREATE, "activating", DocStatus.WAITING_QR, False,
     DocStatus.WAITING_QR),
    (DocStatus.STARTING, _CREATE, "active", None, False, None),  # it has said nothing yet
    # other claims: neither
    (DocStatus.PAIRING, frozenset({DocStatus.PAIRING_REQUESTED}), None, None, False, None),
    (DocStatus.PAIRING, frozenset({DocStatus.PAIRING_REQUESTED}), "active",
     DocStatus.CONNECTED, False, None),
    (DocStatus.STOPPING, frozenset({DocStatus.DESTROY_REQUESTED}), "active",
     DocStatus.CONNECTED, False, None),
])
def test_after_a_claim(new: DocStatus, expect: frozenset[DocStatus], active: str | None,
                       report: DocStatus | None, awaits: bool, replay: DocStatus | None) -> None:
    assert awaits_new_worker(new, expect, active) is awaits
    assert replayed_status(new, expect, active, report) is replay


@pytest.mark.parametrize(("restart", "under_way", "unit", "slot"), [
    (False, False, None, True),  # a first start
    (False, False, UnitView("inactive"), True),
    (False, False, UnitView("failed"), True),
    (False, True, None, False),  # the echo's second Start while one is under way
    (False, False, UnitView("active"), False),  # already running: StartUnit is a no-op
    (False, False, UnitView("activating"), False),
    (True, True, UnitView("active"), True),  # a restart always takes one
    (True, False, None, True),
])
def test_needs_start_slot(restart: bool, under_way: bool, unit: UnitView | None,
                          slot: bool) -> None:
    assert needs_start_slot(restart, under_way, unit) is slot


@pytest.mark.parametrize(("mark", "delivered", "stale"), [
    (None, 0, False),  # never started by this controller
    (None, 5, False),
    (3, 3, True),  # nothing read since the start returned (a ResetFailedUnit's "inactive")
    (3, 4, False),  # the first state read after the start
])
def test_predates_start(mark: int | None, delivered: int, stale: bool) -> None:
    assert predates_start(mark, delivered) is stale


@pytest.mark.parametrize(("connected", "requested", "stale"), [
    (0.0, 0.0, False),  # never requested
    (10.0, 5.0, False),  # connected after the request: the new process
    (5.0, 10.0, True),  # the old process, still stopping
    (0.0, 10.0, True),  # not connected at all (a frame racing its disconnect)
])
def test_stale_report(connected: float, requested: float, stale: bool) -> None:
    assert stale_report(connected, requested) is stale


def _unit_state(active: str, status_text: str = "serving") -> UnitState:
    return UnitState(unit="wabridge-worker@u.service", user_id="u", active_state=active,
                     sub_state="", main_pid=7, n_restarts=2, result="success",
                     exec_main_code=0, exec_main_status=0, status_text=status_text,
                     memory_bytes=1024, cpu_nsec=2_500_000_000, tasks=3,
                     since_usec=1_700_000_000_000_000)


@pytest.mark.parametrize(("active", "status"), [
    ("active", "serving"), ("activating", "serving"), ("deactivating", "serving"),
    ("inactive", None), ("failed", None),  # systemd keeps a gone process's STATUS= line
])
def test_process_fields(active: str, status: str | None) -> None:
    assert process_fields(_unit_state(active)) == {
        "pid": 7, "state": active, "restarts": 2, "memoryBytes": 1024, "status": status,
        "cpuSeconds": 2.5, "since": 1_700_000_000.0}
