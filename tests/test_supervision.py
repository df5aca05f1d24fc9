"""systemd as the fleet's supervisor, end to end.

Real systemd 252 in a private namespace, the real worker (Python, the sim backend, the Claude
Code CLI against the fake API), the controller as a unit, the Firestore emulator. Faults come
from the worker's test hooks (``WABRIDGE_TEST_HOOKS=1`` + ``WABRIDGE_TEST_FAULT``, see
``agent/main.py``), set per instance by a drop-in that wins over the controller's own
``/run/systemd/system/wabridge-worker@<user>.service.d/50-wabridge.conf``.

One fleet serves the module; tests run in order. alice and bob are linked by the first test;
each fault test puts alice back to "connected" and removes its drop-in before it ends.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from fakes.anthropic_api import Reply, default_responder, last_user_text
from fleet import Fleet, free_port, wait_until
from harness.systemd_ns import available

from wabridge.units import system_user_name

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

ALICE, BOB = "5511999990101", "5511999990102"
CONTACT = "5511988880001"
METRICS_PORT = free_port()
CTL = "wabridge-controller.service"


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str) -> Iterator[Fleet]:
    config = {"controller": {"metrics_listen": f"127.0.0.1:{METRICS_PORT}"},
              "worker": {"memory_max": "700M", "tasks_max": "200", "cpu_quota": "150%"}}
    with Fleet(plane="firestore", emulator_host=firestore_emulator, config=config) as f:
        yield f


def inject(fleet: Fleet, user: str, dropin: str) -> None:
    """Forget the last exit on the document, set the fault's drop-in, restart the worker."""
    fleet.db.collection("user_sessions").document(user).set({"lastExit": None}, merge=True)
    fleet.set_dropin(user, dropin)
    fleet.ns.systemctl("restart", fleet.unit(user))  # a crash at start fails the job


def hooks(fault: str, **service: str) -> str:
    lines = ["[Service]", f"Environment=WABRIDGE_TEST_HOOKS=1 WABRIDGE_TEST_FAULT={fault}"]
    lines += [f"{k}={v}" for k, v in service.items()]
    return "\n".join(lines) + "\n"


def back_to_connected(fleet: Fleet, user: str = "alice", restarts: int = 1) -> None:
    """After one automatic restart (RestartSec=2): the unit runs again and is connected."""
    fleet.clear_dropin(user)
    unit = fleet.unit(user)
    wait_until(lambda: fleet.props(unit, "ActiveState", "NRestarts") == {
        "ActiveState": "active", "NRestarts": str(restarts)}, 30, f"{unit} restarted",
        lambda: fleet.journal(unit)[-3000:])
    pid = int(fleet.prop(unit, "MainPID"))
    fleet.wait_doc(user, lambda d: d.get("status") == "connected"
                   and (d.get("process") or {}).get("pid") == pid, 40, "connected again")


def restarted_for(fleet: Fleet, user: str, reason: str, timeout: float = 30) -> dict[str, Any]:
    doc = fleet.wait_doc(
        user, lambda d: (d.get("lastExit") or {}).get("reason") == reason, timeout,
        f"lastExit.reason {reason}")
    return dict(doc["lastExit"])


# --- identity and limits ---------------------------------------------------------------


def test_each_user_gets_own_uid_private_state_and_limits(fleet: Fleet) -> None:
    fleet.link("alice", ALICE)
    fleet.link("bob", BOB)
    a, b = fleet.unit("alice"), fleet.unit("bob")
    pa = fleet.props(a, "User", "MemoryMax", "TasksMax", "CPUQuotaPerSecUSec", "Slice",
                     "DropInPaths")
    assert pa["User"] == system_user_name("alice")
    assert fleet.prop(b, "User") == system_user_name("bob")
    assert f"/run/systemd/system/{a}.d/50-wabridge.conf" in pa["DropInPaths"]
    # limits from wabridge.toml (worker.*) through the controller's drop-in
    assert (pa["MemoryMax"], pa["TasksMax"], pa["CPUQuotaPerSecUSec"], pa["Slice"]) == (
        str(700 << 20), "200", "1.500000s", "wabridge.slice")
    uid_a, uid_b = fleet.uid_of("alice"), fleet.uid_of("bob")
    assert uid_a != uid_b
    for user, uid in (("alice", uid_a), ("bob", uid_b)):
        st = fleet.ns.run(["stat", "-c", "%a %u", f"/var/lib/private/wabridge/{user}",
                           f"/var/lib/private/wabridge/{user}/agent.db"]).stdout.split("\n")
        assert st[0] == f"700 {uid}"
        assert st[1].split()[1] == str(uid)
    pid = int(fleet.prop(a, "MainPID"))
    assert fleet.ns.run(["stat", "-c", "%u", f"/proc/{pid}"]).stdout.strip() == str(uid_a)

    # alice's UID reads her own database and not bob's, even with /var/lib/private opened up
    # (in her own sandbox bob's directory is not even mounted)
    read = (f"chmod 0711 /var/lib/private; setpriv --reuid={uid_a} --regid={uid_a} "
            "--clear-groups sh -c 'head -c 15 /var/lib/private/wabridge/alice/agent.db; echo; "
            "head -c 15 /var/lib/private/wabridge/bob/agent.db'; rc=$?; "
            "chmod 0700 /var/lib/private; exit $rc")
    r = fleet.ns.run(["sh", "-c", read])
    assert r.stdout.startswith("SQLite format 3")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    inside = fleet.ns.run(["nsenter", "-t", str(pid), "-a", "-S", str(uid_a), "-G", str(uid_a),
                           "cat", "/var/lib/wabridge/bob/agent.db"])
    assert inside.returncode != 0, inside.stdout


def test_firebase_credentials_reach_the_controller_only(fleet: Fleet) -> None:
    fleet.ns.write_file("/etc/wabridge/firebase.json", '{"type": "service_account"}', 0o600)
    dropin = "/etc/systemd/system/wabridge-controller.service.d/credentials.conf"
    fleet.ns.write_file(dropin, "[Service]\nLoadCredential=firebase:/etc/wabridge/firebase.json\n")
    fleet.ns.daemon_reload()
    # systemd makes / shared at boot, except in a container (the harness): its credential
    # ramfs is mounted in a child namespace and must propagate back
    fleet.ns.run(["mount", "--make-rshared", "/"], check=True)
    try:
        fleet.ns.systemctl("restart", CTL, check=True)
        cpid = fleet.prop(CTL, "MainPID")
        mine = fleet.ns.run(["nsenter", "-t", cpid, "-m", "cat",
                             "/run/credentials/wabridge-controller.service/firebase"])
        assert mine.stdout == '{"type": "service_account"}', mine.stderr
        apid = fleet.prop(fleet.unit("alice"), "MainPID")
        uid = str(fleet.uid_of("alice"))
        for where in (["nsenter", "-t", apid, "-a", "-S", uid, "-G", uid],
                      ["nsenter", "-t", cpid, "-m", "setpriv", f"--reuid={uid}",
                       f"--regid={uid}", "--clear-groups"]):
            r = fleet.ns.run([*where, "cat",
                              "/run/credentials/wabridge-controller.service/firebase"])
            assert r.returncode != 0 and r.stdout == "", (where, r.stdout)
    finally:
        (fleet.ns.root / dropin.lstrip("/")).unlink()
        fleet.ns.daemon_reload()
        fleet.ns.systemctl("restart", CTL, check=True)


def test_controller_restart_leaves_workers_running(fleet: Fleet) -> None:
    units = [fleet.unit("alice"), fleet.unit("bob")]
    pids = [fleet.prop(u, "MainPID") for u in units]
    assert all(p != "0" for p in pids)
    fleet.ns.systemctl("restart", CTL, check=True)
    fleet.wait_unit(CTL, "active")
    time.sleep(1.0)
    assert [fleet.prop(u, "MainPID") for u in units] == pids
    assert [fleet.prop(u, "NRestarts") for u in units] == ["0", "0"]
    fleet.wait_doc("alice", lambda d: d.get("status") == "connected", 10, "still connected")
    assert "echo: after the controller restart" in fleet.ask(
        CONTACT, ALICE, "after the controller restart")["text"]


# --- process metrics -------------------------------------------------------------------


def test_process_metrics_on_the_document_and_prometheus(fleet: Fleet) -> None:
    pid = int(fleet.prop(fleet.unit("alice"), "MainPID"))
    first = fleet.wait_doc("alice", lambda d: (d.get("process") or {}).get("memoryBytes"),
                           10, "process.memoryBytes")["process"]
    assert first["pid"] == pid and first["state"] == "active" and first["restarts"] == 0
    assert first["memoryBytes"] > 10 << 20 and first["cpuSeconds"] > 0
    # refreshed every controller.metrics_interval (1 s here) while the unit is active
    fleet.wait_doc("alice", lambda d: d["process"] != first, 10, "a refreshed process field")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(r.read().decode())

    def parse(text: str) -> dict[str, float]:
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    values = wait_until(
        lambda: (v := parse(scrape())).get('wabridge_claude_turns_total{user="alice"}', 0) >= 1
        and v, 15, "alice's turns in /metrics")
    assert values['wabridge_units{state="active"}'] >= 2
    assert values['wabridge_worker_memory_bytes{user="alice"}'] > 10 << 20
    assert values['wabridge_messages_total{user="alice",direction="in"}'] >= 1
    assert values['wabridge_claude_turns_total{user="alice"}'] >= 1
    assert values["wabridge_fleet_claude_turns_total"] >= 1
    assert values["wabridge_controller_memory_bytes"] > 10 << 20


# --- graceful stop ---------------------------------------------------------------------


def test_stop_with_a_turn_in_flight_loses_nothing(fleet: Fleet) -> None:
    unit = fleet.unit("alice")

    def slow(body: Any) -> Any:
        if "slow question" in last_user_text(body):
            return Reply(text=default_responder(body), delay=1.5)
        return default_responder(body)

    fleet.api.responder = slow
    try:
        before = len(fleet.api.message_requests())
        wa_id = fleet.sim.send(CONTACT, ALICE, "slow question")
        wait_until(lambda: len(fleet.api.message_requests()) > before, 20, "the turn to start")
        t0 = time.monotonic()
        fleet.ns.systemctl("restart", unit, check=True)  # returns once it runs again
        stop_seconds = time.monotonic() - t0

        def replies() -> list[dict[str, Any]]:
            return [m for m in fleet.sim.inbox(CONTACT) if m.get("quoted_id") == wa_id]

        wait_until(replies, 30, "the reply to the slow question")
        time.sleep(3.0)  # a second reply (after the restart) would come by now
        got = replies()
        assert len(got) == 1, got
        assert "echo: slow question" in got[0]["text"]
    finally:
        fleet.api.responder = default_responder
    assert stop_seconds < 5.0 + 3.0  # stop within TimeoutStopSec, plus the start
    journal = fleet.journal(unit)
    assert "timed out. Killing" not in journal
    stopped = re.findall(r"worker\.stopped.*", journal)
    assert stopped, journal[-2000:]
    fleet.wait_doc("alice", lambda d: d.get("status") == "connected", 30, "connected again")


def test_worker_ignoring_sigterm_is_killed_at_5s_with_its_claude(fleet: Fleet) -> None:
    fleet.link("carol", "5511999990103")
    fleet.set_dropin("carol", hooks("ignore-sigterm"))
    unit = fleet.unit("carol")
    fleet.ns.systemctl("restart", unit, check=True)
    fleet.wait_doc("carol", lambda d: d.get("status") == "connected", 30, "connected")
    assert "echo: spawn claude" in fleet.ask(CONTACT, "5511999990103", "spawn claude")["text"]
    uid = str(fleet.uid_of("carol"))
    claude = fleet.ns.run(["pgrep", "-u", uid, "-f", "_bundled/claude"]).stdout.split()
    assert claude, "a live Claude process of carol's"
    t0 = time.monotonic()
    fleet.request("carol", "destroy_requested")
    fleet.wait_doc("carol", lambda d: d.get("status") == "stopped", 20, "status stopped")
    seconds = time.monotonic() - t0
    assert 4.5 < seconds < 9, seconds
    p = fleet.props(unit, "ActiveState", "Result")
    assert p == {"ActiveState": "failed", "Result": "timeout"} or p["ActiveState"] == "inactive"
    assert "State 'stop-sigterm' timed out. Killing." in fleet.journal(unit)
    assert fleet.unit_pids(unit) == []
    assert fleet.ns.run(["pgrep", "-u", uid]).stdout == ""
    fleet.clear_dropin("carol")


# --- watchdog --------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "problem"), [
    ("wedge-loop", None),  # a loop that does not turn cannot even say why
    ("stuck-turn", "turn stuck"),
])
def test_watchdog_restarts_a_wedged_worker(fleet: Fleet, fault: str, problem: str | None) -> None:
    unit = fleet.unit("alice")
    inject(fleet, "alice", hooks(fault, WatchdogSec="3"))
    last = restarted_for(fleet, "alice", "watchdog")
    assert last["result"] == "watchdog" and last["signal"] == "SIGABRT"
    assert "stopped answering the watchdog" in last["message"]
    journal = fleet.journal(unit)
    assert "Watchdog timeout" in journal
    if problem:
        assert problem in journal  # watchdog.unhealthy, and the STATUS= line said it
    else:
        assert "Current thread" in journal and "_inject_fault" in journal  # faulthandler
    back_to_connected(fleet)


# --- supervised tasks ------------------------------------------------------------------


@pytest.mark.parametrize("task", ["link", "pump", "outbox", "supervise"])
def test_a_dead_task_stops_the_worker_and_systemd_restarts_it(fleet: Fleet, task: str) -> None:
    """A long-running task of the worker that dies (here: raises) must not leave a worker that
    takes messages in and never answers: it exits 1 and systemd restarts it."""
    unit = fleet.unit("alice")
    inject(fleet, "alice", "[Service]\nEnvironment=WABRIDGE_TEST_HOOKS=1 "
           f"WABRIDGE_TEST_FAULT=task-crash WABRIDGE_TEST_FAULT_TASK={task}\n")
    last = restarted_for(fleet, "alice", "exit_code")
    assert (last["exitCode"], last["restarting"]) == (1, True)
    journal = fleet.journal(unit)
    assert "worker.task_died" in journal and f"test fault: task {task} crashed" in journal
    back_to_connected(fleet)
    assert "echo: after" in fleet.ask(CONTACT, ALICE, f"after {task}")["text"]


# --- memory ----------------------------------------------------------------------------


def test_over_its_memory_limit_the_worker_is_killed_restarted_and_named(fleet: Fleet) -> None:
    unit = fleet.unit("alice")
    inject(fleet, "alice", hooks("alloc", MemoryMax="250M"))
    last = restarted_for(fleet, "alice", "out_of_memory")
    assert last["oom"] is True and last["signal"] == "SIGKILL" and last["result"] == "signal"
    assert "ran out of memory" in last["message"]
    # the exit report of ExecStopPost= read the memory cgroup's oom_kill counter
    report = fleet.ns.run(["cat", f"/run/wabridge/exits/{unit}"]).stdout
    assert re.search(r"^oom_kill=[1-9]", report, re.M), report
    back_to_connected(fleet)


# --- restart limits --------------------------------------------------------------------


def test_start_limit_gives_up_then_restart_requested_recovers(fleet: Fleet) -> None:
    unit = fleet.unit("alice")
    inject(fleet, "alice", "[Unit]\nStartLimitBurst=3\nStartLimitIntervalSec=120\n"
           + hooks("crash", RestartSec="300ms"))
    doc = fleet.wait_doc("alice", lambda d: d.get("status") == "crashed", 30, "status crashed")
    assert doc["error"]["code"] == "crashed" and doc["error"]["reason"] == "start_limit"
    assert doc["error"]["message"] == (
        "worker exited with code 1 after 3 automatic restarts; "
        "systemd gave up: start limit hit (StartLimitBurst=3)")
    last = doc["lastExit"]
    assert (last["exitCode"], last["startLimitHit"], last["reason"]) == (1, True, "exit_code")
    assert fleet.prop(unit, "ActiveState") == "failed"
    assert "Start request repeated too quickly" in fleet.journal(unit)

    fleet.clear_dropin("alice")
    fleet.request("alice", "restart_requested")
    fleet.wait_doc("alice", lambda d: d.get("status") == "connected", 30, "connected")
    assert fleet.props(unit, "ActiveState", "NRestarts") == {"ActiveState": "active",
                                                             "NRestarts": "0"}
    assert "echo: back" in fleet.ask(CONTACT, ALICE, "back")["text"]
