"""controller.reconcile: the rows mutation testing found missing (issue 20).

Every expected value here is written out, never computed by the code under test: the
``lastExit`` a document gets, the statuses a worker's exit at start-up turns into, which
statuses the controller may overwrite, and the messages operators read.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from controller import reconcile as rc
from controller.plane import AccountDoc, parse_account
from controller.reconcile import (
    CLD_DUMPED,
    CLD_EXITED,
    CLD_KILLED,
    CONTROLLER_OWNED,
    SetError,
    Start,
    Stop,
    UnitView,
    Update,
    crash_reason,
    exit_facts,
    exit_kind,
    for_doc,
    for_unit,
    reconcile,
)
from controller.unit_manager import UnitState
from wabridge.errors import ExitCode
from wabridge.status import DocStatus as S

U = "alice"
#: what a stopped document says besides its status, written out (reconcile.stopped_fields)
STOPPED = {"status": "stopped", "statusDetail": "stopped", "metrics": {"claudeProcesses": 0}}


def doc(status: str | None, **fields: object) -> AccountDoc:
    data: dict[str, object] = dict(fields)
    if status is not None:
        data["status"] = status
    return parse_account(U, data)


# --- the worker ended while the controller was down ------------------------------------------

INACTIVE = UnitView("inactive", "dead")
FAILED = UnitView("failed", "failed", result="exit-code", exec_main_code=CLD_EXITED,
                  exec_main_status=10)
ACTIVE = UnitView("active", "running")


def _ended(status: str, code: int) -> Update:
    return Update(U, {"status": status,
                      "statusDetail": f"the worker ended ({status}, exit code {code}) while "
                                      "the controller was down"})


@pytest.mark.parametrize(("status", "unit", "last_exit", "actions"), [
    # a do-not-restart outcome: the document takes it; no Start (that would ask for a QR)
    ("connected", None, 10, [_ended("logged_out", 10)]),
    ("connected", INACTIVE, 10, [_ended("logged_out", 10)]),
    ("connected", FAILED, 10, [_ended("logged_out", 10)]),
    ("waiting_qr", INACTIVE, 14, [_ended("qr_expired", 14)]),
    ("starting", None, 11, [_ended("banned", 11)]),
    ("disconnected", None, 12, [_ended("replaced", 12)]),
    ("pairing", None, 13, [_ended("outdated", 13)]),
    # codes that are not an outcome: the ordinary start
    ("connected", None, 1, [Start(U)]),
    ("connected", None, 0, [Start(U)]),
    ("connected", None, 78, [Start(U)]),  # CONFIG: no outcome status to take
    ("connected", None, 15, [Start(U)]),
    ("connected", None, None, [Start(U)]),
    # the worker runs again (systemd or someone started it): nothing to take over
    ("connected", ACTIVE, 10, []),
    # not a running status: the exit changes nothing
    ("stopped", None, 10, []),
    ("stopping", None, 10, [Update(U, STOPPED)]),
    ("logged_out", None, 10, []),
])
def test_reconcile_takes_the_outcome_of_a_worker_that_ended(
        status: str, unit: UnitView | None, last_exit: int | None, actions: list[Any]) -> None:
    units = {U: unit} if unit is not None else {}
    exits = {U: last_exit} if last_exit is not None else {}
    assert reconcile({U: doc(status)}, units, exits) == actions


def test_reconcile_applies_each_exit_to_its_own_user() -> None:
    docs = {"a": parse_account("a", {"status": "connected"}),
            "b": parse_account("b", {"status": "connected"})}
    assert reconcile(docs, {}, {"b": 10}) == [
        Start("a"),
        Update("b", {"status": "logged_out",
                     "statusDetail": "the worker ended (logged_out, exit code 10) while the "
                                     "controller was down"}),
    ]


def test_reconcile_keeps_going_after_an_ended_worker() -> None:
    # the ``continue`` after the outcome: the next documents and the orphans still count
    docs = {"a": parse_account("a", {"status": "connected"}),
            "b": parse_account("b", {"status": "stopped"})}
    units = {"b": ACTIVE, "orphan": ACTIVE}
    assert reconcile(docs, units, {"a": 10}) == [
        Update("a", {"status": "logged_out",
                     "statusDetail": "the worker ended (logged_out, exit code 10) while the "
                                     "controller was down"}),
        Stop("b"), Stop("orphan"),
    ]


# --- lastExit, written out -------------------------------------------------------------------


@pytest.mark.parametrize(("unit", "facts"), [
    (UnitView("failed", "failed", "exit-code", 5, CLD_EXITED, 1, start_limit_burst=5),
     {"reason": "exit_code",
      "message": "worker exited with code 1 after 5 automatic restarts; systemd gave up: "
                 "start limit hit (StartLimitBurst=5)",
      "result": "exit-code", "exitCode": 1, "signal": None, "restarts": 5, "oom": False,
      "startLimitHit": True, "restarting": False}),
    (UnitView("activating", "auto-restart", "signal", 2, CLD_KILLED, signal.SIGKILL),
     {"reason": "signal",
      "message": "worker killed by SIGKILL; systemd restarts it (automatic restart 3)",
      "result": "signal", "exitCode": None, "signal": "SIGKILL", "restarts": 2, "oom": False,
      "startLimitHit": False, "restarting": True}),
    (UnitView("activating", "auto-restart", "core-dump", 0, CLD_DUMPED, signal.SIGSEGV),
     {"reason": "signal",
      "message": "worker killed by SIGSEGV; systemd restarts it (automatic restart 1)",
      "result": "core-dump", "exitCode": None, "signal": "SIGSEGV", "restarts": 0,
      "oom": False, "startLimitHit": False, "restarting": True}),
    (UnitView("failed", "failed", "oom-kill", 1, CLD_KILLED, signal.SIGKILL),
     {"reason": "out_of_memory",
      "message": "worker ran out of memory (killed by the kernel at the unit's MemoryMax=) "
                 "after 1 automatic restarts",
      "result": "oom-kill", "exitCode": None, "signal": "SIGKILL", "restarts": 1, "oom": True,
      "startLimitHit": False, "restarting": False}),
    (UnitView("failed", "failed", "exit-code", 0, CLD_EXITED, ExitCode.LOGGED_OUT),
     {"reason": "exit_code",
      "message": "worker exited with code 10 after 0 automatic restarts; not restarted: "
                 "logged_out",
      "result": "exit-code", "exitCode": 10, "signal": None, "restarts": 0, "oom": False,
      "startLimitHit": False, "restarting": False}),
    (UnitView("failed", "failed", "timeout", 0),
     {"reason": "timeout", "message": "worker did not stop in time after 0 automatic restarts",
      "result": "timeout", "exitCode": None, "signal": None, "restarts": 0, "oom": False,
      "startLimitHit": False, "restarting": False}),
    (UnitView("failed", "failed", "start-limit-hit", 3),
     {"reason": "start-limit-hit",
      "message": "worker exited with code 0 after 3 automatic restarts; systemd gave up: "
                 "start limit hit",
      "result": "start-limit-hit", "exitCode": None, "signal": None, "restarts": 3,
      "oom": False, "startLimitHit": True, "restarting": False}),
    (UnitView("failed", "failed", "", 0),
     {"reason": "unknown", "message": "worker exited with code 0 after 0 automatic restarts",
      "result": "", "exitCode": None, "signal": None, "restarts": 0, "oom": False,
      "startLimitHit": False, "restarting": False}),
])
def test_exit_facts_written_out(unit: UnitView, facts: dict[str, Any]) -> None:
    assert exit_facts(unit) == facts


def test_for_unit_writes_the_whole_mirror_and_crash() -> None:
    unit = UnitView("failed", "failed", "signal", 4, CLD_KILLED, signal.SIGTERM,
                    start_limit_burst=4)
    message = ("worker killed by SIGTERM after 4 automatic restarts; systemd gave up: "
               "start limit hit (StartLimitBurst=4)")
    assert for_unit(doc("connected"), U, unit) == [
        Update(U, {
            "unit": {"activeState": "failed", "subState": "failed", "result": "signal",
                     "nRestarts": 4, "exitCode": 15},
            "lastExit": {"reason": "signal", "message": message, "result": "signal",
                         "exitCode": None, "signal": "SIGTERM", "restarts": 4, "oom": False,
                         "startLimitHit": True, "restarting": False}}),
        SetError(U, "crashed", message, reason="start_limit"),
        Update(U, {"status": "crashed"}),
    ]


def test_for_unit_of_a_running_unit_mirrors_only() -> None:
    unit = UnitView("active", "running", "success", 2, CLD_EXITED, 0)
    assert for_unit(doc("connected"), U, unit) == [
        Update(U, {"unit": {"activeState": "active", "subState": "running",
                            "result": "success", "nRestarts": 2, "exitCode": 0}})]


@pytest.mark.parametrize(("unit", "kind"), [
    (UnitView("failed", result="exit-code", exec_main_code=CLD_EXITED, exec_main_status=0),
     "exit_code"),
    (UnitView("failed", result="signal", exec_main_code=CLD_DUMPED, exec_main_status=6),
     "signal"),
    (UnitView("failed", result="resources"), "resources"),
])
def test_exit_kind_rows(unit: UnitView, kind: str) -> None:
    assert exit_kind(unit) == kind


@pytest.mark.parametrize(("unit", "reason"), [
    # one restart short of the burst: not yet given up
    (UnitView("failed", "failed", "exit-code", 4, CLD_EXITED, 1, start_limit_burst=5),
     "exited with code 1 after 4 automatic restarts"),
    # a burst unknown (0) is never reached
    (UnitView("failed", "failed", "exit-code", 9, CLD_EXITED, 1),
     "exited with code 1 after 9 automatic restarts"),
    # an outcome exit while failed: named, not a start limit even at the burst
    (UnitView("failed", "failed", "exit-code", 5, CLD_EXITED, 11, start_limit_burst=5),
     "exited with code 11 after 5 automatic restarts; not restarted: banned"),
    # the same code from a signal is a signal
    (UnitView("failed", "failed", "signal", 0, CLD_KILLED, 11),
     "killed by SIGSEGV after 0 automatic restarts"),
    # inactive, not failed: no "not restarted" note
    (UnitView("inactive", "dead", "success", 0, CLD_EXITED, 10),
     "exited with code 10 after 0 automatic restarts"),
])
def test_crash_reason_in_full(unit: UnitView, reason: str) -> None:
    assert crash_reason(unit) == reason


# --- which statuses the controller may overwrite ---------------------------------------------


@pytest.mark.parametrize(("status", "owned"), [
    (S.CREATE_REQUESTED, False), (S.DESTROY_REQUESTED, False), (S.RESTART_REQUESTED, False),
    (S.PAIRING_REQUESTED, False),
    (S.STARTING, True), (S.WAITING_QR, True), (S.PAIRING, True), (S.CONNECTED, True),
    (S.DISCONNECTED, True), (S.LOGGED_OUT, True), (S.BANNED, True), (S.REPLACED, True),
    (S.OUTDATED, True), (S.QR_EXPIRED, True), (S.CRASHED, True), (S.STOPPING, True),
    (S.STOPPED, True), (S.ERROR, True),
])
def test_controller_never_overwrites_a_request(status: S, owned: bool) -> None:
    # a client's request written between the controller's read and its write must survive
    assert (status in CONTROLLER_OWNED) is owned


# --- messages operators read -----------------------------------------------------------------


def test_unknown_status_message_lists_every_status() -> None:
    assert for_doc(doc("hibernate"), None) == [SetError(
        U, "unknown_status",
        "status 'hibernate' is not one of: create_requested, destroy_requested, "
        "restart_requested, pairing_requested, starting, waiting_qr, pairing, connected, "
        "disconnected, logged_out, banned, replaced, outdated, qr_expired, crashed, stopping, "
        "stopped, error")]


def test_a_huge_unknown_status_is_cut_in_the_message() -> None:
    raw = "x" * 200
    (error,) = for_doc(doc(raw), None)
    assert isinstance(error, SetError)
    shown = repr(raw)
    assert error.message.startswith(f"status {shown[:120]}... (202 characters) is not one of:")
    # exactly 120 characters of repr are shown whole
    (fits,) = for_doc(doc("y" * 118), None)
    assert isinstance(fits, SetError)
    assert fits.message.startswith(f"status '{'y' * 118}' is not one of:")


def test_bad_pairing_phone_message_in_full() -> None:
    assert for_doc(doc("pairing_requested", pairingPhone="+49"), None) == [
        SetError(U, "bad_pairing_phone",
                 "pairingPhone '+49' must be digits with country code, 7-15 digits, no '+'"),
        Update(U, STOPPED),
    ]


def test_bad_user_id_message_in_full() -> None:
    d = parse_account("a b", {"status": "create_requested"})
    assert for_doc(d, None) == [SetError(
        "a b", "bad_user_id", "user id 'a b' contains ' ' (use printable ASCII without spaces); "
        "this user id cannot name a worker unit")]


# --- the facts systemd gives, and what they mean --------------------------------------------


def test_cld_codes_are_the_kernels() -> None:
    # systemd's ExecMainCode= is siginfo's si_code: CLD_EXITED 1, CLD_KILLED 2, CLD_DUMPED 3
    assert (CLD_EXITED, CLD_KILLED, CLD_DUMPED) == (1, 2, 3)


def test_a_unit_view_defaults_to_a_clean_unknown_unit() -> None:
    assert UnitView("active") == UnitView("active", "", "success", 0, 0, 0, False, 0)
    assert SetError(U, "code", "message") == SetError(U, "code", "message", "")


@pytest.mark.parametrize(("unit", "kind"), [
    # a stop that timed out ends in SIGKILL: still a timeout
    (UnitView("failed", result="timeout", exec_main_code=CLD_KILLED, exec_main_status=9),
     "timeout"),
    # stopped with SIGTERM: systemd says "success", the process died of a signal
    (UnitView("inactive", "dead", "success", 0, CLD_KILLED, 15), "signal"),
    (UnitView("inactive", "dead", "success", 0, CLD_DUMPED, 6), "signal"),
])
def test_exit_kind_of_signals(unit: UnitView, kind: str) -> None:
    assert exit_kind(unit) == kind


def test_a_burst_of_one_is_reached_by_one_restart() -> None:
    unit = UnitView("failed", "failed", "exit-code", 1, CLD_EXITED, 1, start_limit_burst=1)
    assert crash_reason(unit) == ("exited with code 1 after 1 automatic restarts; systemd gave "
                                  "up: start limit hit (StartLimitBurst=1)")


def test_a_reloading_unit_is_running() -> None:
    assert for_doc(doc("stopped"), UnitView("reloading")) == [Stop(U)]
    assert for_doc(doc("connected"), UnitView("reloading")) == []


def test_a_pairing_request_without_a_phone_says_so() -> None:
    assert for_doc(doc("pairing_requested"), None)[0] == SetError(
        U, "bad_pairing_phone",
        "pairingPhone '' must be digits with country code, 7-15 digits, no '+'")


@pytest.mark.parametrize("code", [3, 2, 99])
def test_an_exit_code_wabridge_does_not_define_is_just_stopped(code: int) -> None:
    unit = UnitView("inactive", "dead", "exit-code", 0, CLD_EXITED, code)
    assert for_unit(doc("connected"), U, unit)[1:] == [Update(U, STOPPED)]


@pytest.mark.parametrize(("unit", "reset_failed"), [
    (None, False), (INACTIVE, False), (ACTIVE, False), (FAILED, True)])
def test_a_pairing_request_resets_only_a_failed_unit(unit: UnitView | None,
                                                    reset_failed: bool) -> None:
    actions = for_doc(doc("pairing_requested", pairingPhone="4915123456789"), unit)
    assert actions[1] == Start(U, reset_failed=reset_failed)


# --- view_of: the unit state the decisions see --------------------------------------------------

def _state(**changes: Any) -> UnitState:
    """An OOM-killed worker on cgroup v1 (SIGKILL, Result=signal, oom_kill counted)."""
    facts: dict[str, Any] = {
        "unit": "wabridge-worker@alice.service", "user_id": U, "active_state": "failed",
        "sub_state": "failed", "main_pid": 0, "n_restarts": 4, "result": "signal",
        "exec_main_code": 2, "exec_main_status": 9, "status_text": "", "memory_bytes": None,
        "cpu_nsec": None, "tasks": None, "since_usec": 0, "start_limit_burst": 5,
        "oom_kills": 1}
    facts.update(changes)
    return UnitState(**facts)


@pytest.mark.parametrize(("changes", "oom"), [
    ({}, True),
    ({"oom_kills": 3}, True),
    ({"result": "oom-kill"}, True),
    ({"oom_kills": 0}, False),
    ({"oom_kills": None}, False),  # no exit report
    ({"exec_main_code": 3}, False),  # dumped core: not the OOM killer
    ({"exec_main_code": 1}, False),  # exited with code 9
    ({"exec_main_status": 15}, False),  # SIGTERM
    ({"result": "exit-code"}, False),
    ({"result": "timeout"}, False),  # SIGKILL after TimeoutStopSec=
])
def test_view_of_an_oom_kill(changes: dict[str, Any], oom: bool) -> None:
    assert rc.view_of(_state(**changes)).oom is oom


@pytest.mark.parametrize(("active", "job_pending", "seen"), [
    ("inactive", True, "activating"),  # StartUnit queued, not yet run
    ("failed", True, "activating"),
    ("inactive", False, "inactive"),
    ("failed", False, "failed"),
    ("active", True, "active"),
    ("deactivating", True, "deactivating"),  # a stop job: still stopping
])
def test_view_of_a_queued_start(active: str, job_pending: bool, seen: str) -> None:
    assert rc.view_of(_state(active_state=active, job_pending=job_pending)).active_state == seen


def test_view_of_in_full() -> None:
    assert rc.view_of(_state(sub_state="auto-restart")) == UnitView(
        active_state="failed", sub_state="auto-restart", result="signal", n_restarts=4,
        exec_main_code=2, exec_main_status=9, oom=True, start_limit_burst=5)


# --- settings, errors, start slots ----------------------------------------------------------


@pytest.mark.parametrize(("active", "sub", "job_pending", "settled"), [
    ("active", "running", False, True),  # READY=1 sent
    ("failed", "failed", False, True),
    ("deactivating", "stop-sigterm", False, True),
    ("activating", "auto-restart", False, True),  # waiting for systemd's restart
    ("inactive", "dead", False, True),
    ("inactive", "dead", True, False),  # StartUnit queued, not run yet
    ("activating", "start", False, False),
    ("activating", "start", True, False),
    ("reloading", "reload", False, False),
])
def test_start_settled(active: str, sub: str, job_pending: bool, settled: bool) -> None:
    state = _state(active_state=active, sub_state=sub, job_pending=job_pending)
    assert rc.start_settled(state) is settled


def test_no_error_is_cleared_by_anyone() -> None:
    clean = doc("connected")
    assert (rc.clears_error(clean, "controller"), rc.clears_error(clean, "worker")) == (
        False, False)


def test_a_pairing_without_a_phone_adds_none() -> None:
    asked = doc("pairing_requested", settings={"groups": "off"})
    assert rc.worker_settings(asked) == {"groups": "off"}


@pytest.mark.parametrize(("settings", "message"), [
    ({"backend": "simm"}, "settings.backend 'simm' is not one of: neonize, sim"),
    ({"backend": 7}, "settings.backend 7 is not one of: neonize, sim"),
    ({"simUrl": "http://"},
     "settings.simUrl 'http://' is not an http(s) URL (e.g. http://127.0.0.1:8081)"),
    ({"simUrl": "https://"},
     "settings.simUrl 'https://' is not an http(s) URL (e.g. http://127.0.0.1:8081)"),
    ({"simUrl": 8081}, "settings.simUrl 8081 is not an http(s) URL (e.g. http://127.0.0.1:8081)"),
])
def test_a_bad_backend_setting_in_full(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(rc.PolicyError) as info:
        rc.worker_environment(settings)
    assert str(info.value) == message


@pytest.mark.parametrize("cpu", [None, 0])
def test_process_fields_without_cpu_time(cpu: int | None) -> None:
    state = _state(active_state="active", sub_state="running", main_pid=42, cpu_nsec=cpu,
                   memory_bytes=None, since_usec=1_500_000, status_text="connected")
    assert rc.process_fields(state) == {
        "pid": 42, "state": "active", "restarts": 4, "memoryBytes": None,
        "status": "connected", "cpuSeconds": 0.0, "since": 1.5}
