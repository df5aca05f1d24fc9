"""The Prometheus rendering (pure) and the supervision helpers of the systemd adapter."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from agent.main import test_fault as fault_of
from controller.metrics import (
    FleetSnapshot,
    HostsFigures,
    WorkerFigures,
    escape_label,
    render,
    tcp_peer_uid,
    worker_uid,
)
from controller.systemd import (
    api_key_file,
    proc_cpu_nsec,
    read_exit_report,
    with_exit_report,
    worker_dropin,
)
from controller.unit_manager import UnitState
from wabridge.errors import PolicyError

ALICE = WorkerFigures(
    user_id="alice", unit_state="active", restarts=2, memory_bytes=50_000_000,
    cpu_seconds=1.5, tasks=7, status="connected", linked=True,
    reported={"messages_in": 3, "messages_out": 2, "turns": 2, "input_tokens": 100,
              "output_tokens": 20, "cost_today_usd": 0.25, "chats": 1, "claude_processes": 1},
)
BOB = WorkerFigures(user_id='b"o\\b', unit_state="failed", restarts=5, status="crashed")
CAROL = WorkerFigures(user_id="carol", status="stopped")  # a document without a unit


def samples(text: str) -> dict[str, str]:
    return {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        (FleetSnapshot(plane="local"), {
            'wabridge_units{state="active"}': "0",
            'wabridge_units{state="failed"}': "0",
            "wabridge_workers_linked": "0",
            "wabridge_fleet_restarts": "0",
            'wabridge_controller_info{plane="local"}': "1",
        }),
        (FleetSnapshot(workers=(ALICE, BOB, CAROL), controller_memory_bytes=30_000_000,
                       plane="firestore"), {
            'wabridge_units{state="active"}': "1",
            'wabridge_units{state="failed"}': "1",
            'wabridge_units{state="inactive"}': "0",
            'wabridge_sessions{status="connected"}': "1",
            'wabridge_sessions{status="crashed"}': "1",
            'wabridge_sessions{status="stopped"}': "1",
            "wabridge_workers_linked": "1",
            'wabridge_worker_restarts{user="alice"}': "2",
            'wabridge_worker_restarts{user="b\\"o\\\\b"}': "5",
            'wabridge_worker_memory_bytes{user="alice"}': "50000000",
            'wabridge_worker_cpu_seconds_total{user="alice"}': "1.5",
            'wabridge_worker_tasks{user="alice"}': "7",
            'wabridge_messages_total{user="alice",direction="in"}': "3",
            'wabridge_messages_total{user="alice",direction="out"}': "2",
            'wabridge_claude_turns_total{user="alice"}': "2",
            'wabridge_claude_tokens_total{user="alice",kind="input"}': "100",
            'wabridge_claude_tokens_total{user="alice",kind="output"}': "20",
            'wabridge_claude_cost_today_usd{user="alice"}': "0.25",
            'wabridge_claude_processes{user="alice"}': "1",
            'wabridge_chats{user="alice"}': "1",
            "wabridge_fleet_memory_bytes": "50000000",
            "wabridge_fleet_cpu_seconds_total": "1.5",
            "wabridge_fleet_restarts": "7",
            'wabridge_fleet_messages_total{direction="in"}': "3",
            "wabridge_fleet_claude_turns_total": "2",
            'wabridge_fleet_claude_tokens_total{kind="output"}': "20",
            "wabridge_fleet_claude_cost_today_usd": "0.25",
            "wabridge_controller_memory_bytes": "30000000",
            'wabridge_controller_info{plane="firestore"}': "1",
        }),
    ],
    ids=["empty", "fleet"],
)
def test_render(snapshot: FleetSnapshot, expected: dict[str, str]) -> None:
    text = render(snapshot)
    got = samples(text)
    for key, value in expected.items():
        assert got.get(key) == value, (key, got.get(key))
    assert 'user="carol"' not in text  # no unit, no frame: no per-user series
    # every series is declared once, before its samples
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    for key in got:
        assert key.split("{")[0] in names
    assert render(snapshot) == text  # deterministic
    assert text.endswith("\n")


def test_escape_label() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


# --- systemd adapter helpers ---------------------------------------------------------------

STATE = UnitState(unit="wabridge-worker@alice.service", user_id="alice", active_state="failed",
                  sub_state="failed", main_pid=0, n_restarts=5, result="signal",
                  exec_main_code=2, exec_main_status=9, status_text="", memory_bytes=None,
                  cpu_nsec=None, tasks=None, since_usec=0, invocation_id="ab12")


def test_exit_report_is_matched_by_invocation(tmp_path: Path) -> None:
    report = tmp_path / STATE.unit
    report.write_text("invocation=ab12\nresult=signal\nexit_code=killed\nexit_status=KILL\n"
                      "oom_kill=1\n")
    assert read_exit_report(tmp_path, STATE.unit)["exit_status"] == "KILL"
    assert with_exit_report(STATE, tmp_path).oom_kills == 1
    # another invocation's report, a running unit, no directory: nothing
    assert with_exit_report(dataclasses.replace(STATE, invocation_id="cd34"),
                            tmp_path).oom_kills is None
    running = dataclasses.replace(STATE, active_state="active", sub_state="running")
    assert with_exit_report(running, tmp_path).oom_kills is None
    restarting = dataclasses.replace(STATE, active_state="activating", sub_state="auto-restart")
    assert with_exit_report(restarting, tmp_path).oom_kills == 1
    assert with_exit_report(STATE, None).oom_kills is None
    assert read_exit_report(tmp_path, "nosuch.service") == {}
    report.write_text("invocation=ab12\noom_kill=\n")
    assert with_exit_report(STATE, tmp_path).oom_kills is None


def test_worker_dropin() -> None:
    text = worker_dropin("wab-alice-2bd806c97f", {"MemoryMax": "1G", "MemoryHigh": "",
                                                  "TasksMax": "256", "CPUQuota": "100%"})
    assert text.splitlines()[1:] == ["[Service]", "User=wab-alice-2bd806c97f", "MemoryMax=1G",
                                     "TasksMax=256", "CPUQuota=100%"]
    env = {"WABRIDGE__WORKER__BACKEND": "sim", "WABRIDGE__WORKER__SIM_URL": "http://h/a%20b"}
    text = worker_dropin("wab-alice-2bd806c97f", {}, env)
    assert text.splitlines()[3:] == ['Environment="WABRIDGE__WORKER__BACKEND=sim"',
                                     'Environment="WABRIDGE__WORKER__SIM_URL=http://h/a%%20b"']
    with pytest.raises(ValueError, match="cannot be written into a unit file"):
        worker_dropin("u", {}, {"K": 'x"\nUser=root'})


def test_worker_dropin_hands_the_users_own_key_as_a_credential() -> None:
    text = worker_dropin("wab-alice-2bd806c97f", {}, api_key=Path("/etc/wabridge/keys/alice"))
    assert text.splitlines()[-1] == (
        "LoadCredential=anthropic-api-key:/etc/wabridge/keys/alice")


@pytest.mark.parametrize(("ref", "problem"), [
    (None, None), ("", None), ("alice", None), ("team.a-1_b", None),
    ("../worker.env", "is not a key name"), ("a/b", "is not a key name"),
    (".hidden", "is not a key name"), (7, "is not a key name"), ("x" * 65, "is not a key name"),
    ("missing", "no key file"),
])
def test_api_key_file(tmp_path: Path, ref: object, problem: str | None) -> None:
    for name in ("alice", "team.a-1_b"):
        (tmp_path / name).write_text("sk-ant-x\n")
    settings = {} if ref is None else {"apiKeyRef": ref}
    if problem is None:
        got = api_key_file(settings, tmp_path)
        assert got == (tmp_path / str(ref) if ref else None)
    else:
        with pytest.raises(PolicyError) as info:
            api_key_file(settings, tmp_path)
        assert info.value.code == "bad_setting" and problem in str(info.value)
        assert "apiKeyRef" in str(info.value)


def test_proc_cpu_nsec(tmp_path: Path) -> None:
    cg = tmp_path / "cg" / "wabridge.slice" / "w.service"
    cg.mkdir(parents=True)
    (cg / "cgroup.procs").write_text("10\n11\n99\n")
    for pid, times in (("10", "100 50 7 3"), ("11", "1 1 0 0")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(
            f"{pid} (py thon) S 1 1 1 0 -1 4194560 1 0 0 0 {times} 20 0 1 0 5 1 1\n")
    import os  # noqa: PLC0415

    ticks = os.sysconf("SC_CLK_TCK")
    got = proc_cpu_nsec("/wabridge.slice/w.service", proc=tmp_path, roots=(tmp_path / "cg",))
    assert got == 162 * 1_000_000_000 // ticks
    assert proc_cpu_nsec("", proc=tmp_path, roots=(tmp_path / "cg",)) is None
    assert proc_cpu_nsec("/nosuch", proc=tmp_path, roots=(tmp_path / "cg",)) is None


def test_fault_hooks_need_the_switch() -> None:
    assert fault_of({"WABRIDGE_TEST_FAULT": "crash"}) == ""
    assert fault_of({"WABRIDGE_TEST_HOOKS": "1", "WABRIDGE_TEST_FAULT": "crash"}) == "crash"
    assert fault_of({"WABRIDGE_TEST_HOOKS": "1", "WABRIDGE_TEST_FAULT": "rm -rf"}) == ""


def test_view_of_a_unit_with_a_queued_start_is_activating() -> None:
    from controller.reconcile import view_of  # noqa: PLC0415

    queued = dataclasses.replace(STATE, active_state="inactive", sub_state="dead",
                                 job_pending=True)
    assert view_of(queued).active_state == "activating"
    assert view_of(dataclasses.replace(queued, job_pending=False)).active_state == "inactive"
    # an OOM kill: SIGKILL plus the exit report's oom_kill counter
    assert view_of(dataclasses.replace(STATE, oom_kills=1)).oom is True
    assert view_of(dataclasses.replace(STATE, oom_kills=0)).oom is False
    assert view_of(dataclasses.replace(STATE, oom_kills=1, exec_main_status=6)).oom is False


@pytest.mark.parametrize(
    ("active", "sub", "job", "settled"),
    [
        ("inactive", "dead", True, False),  # StartUnit queued the job; it has not run
        ("activating", "start", False, False),  # waiting for READY=1
        ("active", "running", False, True),
        ("failed", "failed", False, True),
        ("activating", "auto-restart", False, True),  # failed; systemd restarts it later
        ("inactive", "dead", False, True),  # exited with an outcome before READY
        ("deactivating", "stop-sigterm", False, True),
    ],
)
def test_start_slot_is_given_back_when_the_start_is_over(
        active: str, sub: str, job: bool, settled: bool) -> None:
    from controller.reconcile import start_settled  # noqa: PLC0415

    state = dataclasses.replace(STATE, active_state=active, sub_state=sub, job_pending=job)
    assert start_settled(state) is settled


# /proc/net/tcp and tcp6 as the kernel prints them (columns after the uid cut short)
_ROW = " {sl}: {local} {remote} 01 00000000:00000000 00:00000000 00000000 {uid} 0 {sl} 1"
TCP = "\n".join([
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid",
    _ROW.format(sl=0, local="0100007F:24F8", remote="00000000:0000", uid=0),
    _ROW.format(sl=1, local="0100007F:A0C2", remote="0100007F:24F8", uid=61234),
    _ROW.format(sl=2, local="0100007F:24F8", remote="0100007F:A0C2", uid=0),
    _ROW.format(sl=3, local="0100007F:A0C4", remote="0100007F:24F8", uid=107),
])
TCP6 = "\n".join([
    "  sl  local_address                         remote_address                        st",
    _ROW.format(sl=0, local="0000000000000000FFFF00000100007F:A0C6",
                remote="0000000000000000FFFF00000100007F:24F8", uid=61300),
    _ROW.format(sl=1, local="00000000000000000000000001000000:A0C8",
                remote="00000000000000000000000001000000:24F8", uid=61301),
])


@pytest.mark.parametrize(("peer", "uid"), [
    (("127.0.0.1", 0xA0C2), 61234),  # a worker's connection to :9464
    (("127.0.0.1", 0xA0C4), 107),  # a scraper's
    (("127.0.0.1", 0xA0C6), 61300),  # an IPv4-mapped socket in tcp6
    (("::1", 0xA0C8), 61301),
    (("127.0.0.1", 0x9999), None),  # not a local socket
])
def test_tcp_peer_uid(peer: tuple[str, int], uid: int | None) -> None:
    ours_ip = "::1" if ":" in peer[0] else "127.0.0.1"
    got = tcp_peer_uid([TCP, TCP6], (ipaddress.ip_address(peer[0]), peer[1]),
                       (ipaddress.ip_address(ours_ip), 0x24F8))
    assert got == uid


def test_worker_uid() -> None:
    assert not worker_uid(0) and not worker_uid(107) and not worker_uid(65534)
    assert worker_uid(65519)  # a dynamic UID nobody holds: refused (fail closed)


def test_usage_of_the_day_is_exported_per_user() -> None:
    """Usage for billing: the worker's usage frame of the current UTC day (kept by the
    controller next to the metrics frame's figures)."""
    dana = WorkerFigures(user_id="dana", reported={
        "turns": 4, "usage_turns": 3, "usage_input_tokens": 1200, "usage_output_tokens": 80,
        "usage_cache_creation_tokens": 7, "usage_cache_read_tokens": 9,
        "usage_transcription_seconds": 12.5})
    got = samples(render(FleetSnapshot(workers=(dana,), plane="local")))
    assert got['wabridge_usage_today_turns{user="dana"}'] == "3"
    assert got['wabridge_usage_today_tokens{user="dana",kind="input"}'] == "1200"
    assert got['wabridge_usage_today_tokens{user="dana",kind="output"}'] == "80"
    assert got['wabridge_usage_today_tokens{user="dana",kind="cache_creation"}'] == "7"
    assert got['wabridge_usage_today_tokens{user="dana",kind="cache_read"}'] == "9"
    assert got['wabridge_usage_today_transcription_seconds{user="dana"}'] == "12.5"


def test_render_hosts_of_a_fleet() -> None:
    """fleet.enabled: accounts held per host (a live host holding none shows 0), the live
    hosts, and this host's lease counters; without a fleet, none of these series."""
    hosts = HostsFigures(me="host-a", held={"host-a": 3, "host-c": 1},
                         alive=("host-a", "host-b"), acquired=5, lost=1)
    got = samples(render(FleetSnapshot(plane="local", hosts=hosts)))
    assert {k: v for k, v in got.items() if "host" in k} == {
        'wabridge_host_accounts{host="host-a"}': "3",
        'wabridge_host_accounts{host="host-b"}': "0",
        'wabridge_host_accounts{host="host-c"}': "1",
        "wabridge_hosts_alive": "2",
        'wabridge_lease_acquisitions_total{host="host-a"}': "5",
        'wabridge_lease_losses_total{host="host-a"}': "1",
    }
    assert "host" not in render(FleetSnapshot(plane="local")).replace("wabridge_controller", "")
