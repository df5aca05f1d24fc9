"""wabridgectl against a real controller in a real systemd (local control plane).

``wabridgectl link`` runs inside the fleet's namespace, as an operator would run it, while
the sim's phone scans the QR code it prints; then ``status``, ``chats``, ``reset``,
``restart``, ``doctor`` and ``unlink`` go through the admin socket of the real controller.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, http, wait_until
from harness.systemd_ns import available

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.claude,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

PHONE = "5511999990042"
TMPFILES = Path(__file__).resolve().parent.parent / "packaging/tmpfiles.d/wabridge.conf"
CONTACT = "5511988880042"


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with Fleet(plane="local") as f:
        yield f


def ctl(fleet: Fleet, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = fleet.ns.run(["wabridgectl", *args], timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def ctl_json(fleet: Fleet, *args: str) -> Any:
    code, out, err = ctl(fleet, *args, "--json")
    assert code == 0, f"wabridgectl {' '.join(args)} -> {code}: {err}{out}"
    return json.loads(out)


def test_admin_socket_is_root_and_admin_group_only(fleet: Fleet) -> None:
    out = fleet.ns.run(["stat", "-c", "%a %U", "/run/wabridge/admin.sock"], check=True).stdout
    assert out.split() == ["660", "root"]


def test_link_prints_the_qr_and_returns_when_connected(fleet: Fleet) -> None:
    result: dict[str, Any] = {}

    def run_link() -> None:
        result["proc"] = fleet.ns.run(["wabridgectl", "link", "alice", "--timeout", "90"],
                                      timeout=120)

    thread = threading.Thread(target=run_link)
    thread.start()
    try:
        pending = wait_until(lambda: http("GET", f"{fleet.sim.url}/api/qr"), 60,
                             "the worker to show a QR code",
                             lambda: fleet.journal("wabridge-controller.service")[-3000:])
        fleet.sim.scan(PHONE, pending[-1]["code"])
    finally:
        thread.join(120)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "Scan with WhatsApp" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"connected as +{PHONE}")

    again = ctl(fleet, "link", "alice")
    assert again[:2] == (0, f"already connected as +{PHONE}\n")


def test_status_reports_the_unit_and_the_link(fleet: Fleet) -> None:
    rows = ctl_json(fleet, "status")["users"]
    alice = next(r for r in rows if r["user"] == "alice")
    assert alice["status"] == "connected" and alice["phone"] == PHONE
    assert alice["unit"] == "active" and alice["pid"] and alice["linked"] is True
    code, out, _ = ctl(fleet, "status", "alice")
    assert code == 0 and "alice" in out and f"+{PHONE}" in out


def test_chats_and_reset(fleet: Fleet) -> None:
    reply = fleet.ask(CONTACT, PHONE, "hello ctl")
    assert "hello ctl" in reply["text"]
    chats = wait_until(lambda: ctl_json(fleet, "chats", "alice")["chats"], 20,
                       "the exchange in the message log")
    assert chats[0]["chat"] == f"{CONTACT}@s.whatsapp.net" and chats[0]["messages"] >= 2
    assert ctl_json(fleet, "reset", "alice", CONTACT)["sent"] is True
    wait_until(lambda: "chat.reset" in fleet.journal(fleet.unit("alice")), 20,
               "the worker to reset the chat")
    fleet.api.clear()
    reply = fleet.ask(CONTACT, PHONE, "after the reset")
    assert "after the reset" in reply["text"]
    texts = " ".join(" ".join(fleet.api.all_texts(r)) for r in fleet.api.message_requests())
    assert "hello ctl" not in texts, "a reset chat must start a new conversation"
    wait_until(lambda: ctl_json(fleet, "status", "alice")["users"][0]["chats"] is not None, 20,
               "metrics")


def test_doctor_in_the_fleet(fleet: Fleet) -> None:
    code, out, _ = ctl(fleet, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    for name in ("systemd", "controller", "config", "control_plane", "claude", "api_key",
                 "admin_socket"):
        assert checks[name]["status"] == "ok", checks[name]
    assert code == 0


def test_an_admin_reads_a_users_logs(fleet: Fleet) -> None:
    """A member of wabridge-admin who is not root: ``wabridgectl logs`` shows the user's
    lines once the package's tmpfiles.d ACLs are applied (as postinst and every boot do)."""
    fleet.ns.write_file("/usr/lib/tmpfiles.d/wabridge.conf", TMPFILES.read_text())
    for argv in (["groupadd", "--system", "wabridge-admin"],
                 ["useradd", "--no-create-home", "--groups", "wabridge-admin", "ops"],
                 ["systemd-tmpfiles", "--create", "wabridge.conf"]):
        fleet.ns.run(argv, check=True)
    proc = fleet.ns.run(["setpriv", "--reuid=ops", "--regid=ops", "--init-groups",
                         "wabridgectl", "logs", "alice", "--lines", "200"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "insufficient permissions" not in proc.stderr, proc.stderr
    assert "worker.state" in proc.stdout or "link.worker_connected" in proc.stdout, (
        proc.stdout[-2000:])


def test_restart_and_unlink(fleet: Fleet) -> None:
    unit = fleet.unit("alice")
    pid = int(fleet.prop(unit, "MainPID"))
    assert ctl(fleet, "restart", "alice")[0] == 0
    wait_until(lambda: int(fleet.prop(unit, "MainPID")) not in (0, pid), 30, "a new MainPID")
    wait_until(lambda: ctl_json(fleet, "status", "alice")["users"][0]["status"] == "connected",
               30, "connected again")
    assert ctl(fleet, "unlink", "alice")[0] == 0
    fleet.wait_unit(unit, "inactive", 30)
    wait_until(lambda: ctl_json(fleet, "status", "alice")["users"][0]["status"] == "stopped",
               30, "status stopped")


def test_the_controller_logged_no_admin_failures(fleet: Fleet) -> None:
    journal = fleet.journal("wabridge-controller.service")
    assert "admin.listening" in journal
    for bad in ("admin.connection_failed", "admin.op_failed", "admin.watcher_failed",
                "controller.task_failed"):
        assert bad not in journal, journal[-3000:]
