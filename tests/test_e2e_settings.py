"""Per-user settings end to end: real systemd, the Firestore emulator, the real worker.

The host's default backend is neonize (``worker.backend``), and the worker's Python path
starts with a guard package named ``neonize`` that fails loudly on import: a worker that
builds a neonize backend the user did not ask for crashes with "TEST GUARD" in the journal
instead of dialling WhatsApp's servers (test traffic stays on 127.0.0.1).

One fleet serves the module; tests run in order, each building on the last.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fleet import SRC, VENV, Fleet, wait_until
from harness.systemd_ns import available

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

ALICE = "5511999990301"
CONTACT, OTHER = "5511988880301", "5511988880302"
GUARD = "/usr/lib/wabridge/test-guard"
GUARD_TEXT = "TEST GUARD: a neonize client was about to be built"


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str) -> Iterator[Fleet]:
    files = {
        f"{GUARD}/neonize/__init__.py": f"raise ImportError({GUARD_TEXT!r})\n",
        "/usr/bin/wabridge-worker": (f"#!/bin/sh\nexport PYTHONPATH={GUARD}:{SRC}\n"
                                     f'exec {VENV}/bin/python -m agent.main "$@"\n'),
    }
    with Fleet(plane="firestore", emulator_host=firestore_emulator,
               config={"worker": {"backend": "neonize"}}, extra_files=files) as f:
        yield f


def sim_settings(fleet: Fleet, **more: Any) -> dict[str, Any]:
    return {"backend": "sim", "simUrl": fleet.sim.url, **more}


def set_settings(fleet: Fleet, settings: dict[str, Any]) -> float:
    """What a client does: replace the document's settings map. Returns when it wrote."""
    ref = fleet.db.collection("user_sessions").document("alice")
    ref.update({"settings": settings})
    return time.monotonic()


def test_a_first_start_uses_the_documents_backend_and_never_builds_neonize(
        fleet: Fleet) -> None:
    fleet.request("alice", "create_requested", settings=sim_settings(fleet))
    doc = fleet.wait_doc("alice", lambda d: d.get("qrRaw"), 60, "a QR code from the sim")
    fleet.sim.scan(ALICE, doc["qrRaw"])
    fleet.wait_doc("alice", lambda d: d.get("status") == "connected", 60, "connected")
    journal = fleet.journal(fleet.unit("alice"))
    assert GUARD_TEXT not in journal
    assert "backend=sim" in journal  # worker.started
    assert fleet.prop(fleet.unit("alice"), "NRestarts") == "0"
    assert "echo: hi" in fleet.ask(CONTACT, ALICE, "hi")["text"]


def test_a_settings_change_takes_effect_on_the_next_message(fleet: Fleet) -> None:
    pid = fleet.prop(fleet.unit("alice"), "MainPID")
    applied = fleet.journal(fleet.unit("alice")).count("policy.updated")
    set_settings(fleet, sim_settings(fleet, reply_to="allowlist", allowlist=[OTHER]))
    wait_until(lambda: fleet.journal(fleet.unit("alice")).count("policy.updated") > applied,
               5, "the worker to apply the settings")
    before = len(fleet.sim.inbox(CONTACT))
    fleet.sim.send(CONTACT, ALICE, "am I still answered?")
    assert "echo: allowed" in fleet.ask(OTHER, ALICE, "allowed")["text"]
    wait_until(lambda: "reason=not_allowlisted" in fleet.journal(fleet.unit("alice")), 10,
               "the excluded contact's message skipped")
    assert fleet.sim.inbox(CONTACT)[before:] == []
    assert fleet.prop(fleet.unit("alice"), "MainPID") == pid  # no restart was needed


def test_engine_api_answers_from_the_worker_itself(fleet: Fleet) -> None:
    """``engine: api``: the worker calls the Messages API through the SDK, with the key and
    base URL of worker.env, and the chat keeps its memory across the switch."""
    unit = fleet.unit("alice")
    pid = fleet.prop(unit, "MainPID")
    set_settings(fleet, sim_settings(fleet, reply_to="allowlist", allowlist=[OTHER],
                                     engine="api"))
    wait_until(lambda: "engine=api" in fleet.journal(unit), 5, "the worker to switch engines")
    text = fleet.ask(OTHER, ALICE, "tea please")["text"]
    # the CLI's conversation is continued from the stored messages (the recovery seed)
    assert text.startswith("echo: ") and "User: allowed" in text and "tea please" in text
    req = fleet.api.message_requests()[-1]
    assert "claude-cli" not in req.headers.get("user-agent", "")  # the SDK, not the CLI
    # worker.env's key, as the CLI gets it (SDK 2.x sends an API key as a bearer token)
    key = (req.headers.get("x-api-key")
           or req.headers.get("authorization", "").removeprefix("Bearer "))
    assert key == "test-key"
    assert fleet.prop(unit, "MainPID") == pid


def test_a_bad_setting_is_reported_within_2s_and_a_corrected_one_clears_it(
        fleet: Fleet) -> None:
    written = set_settings(fleet, sim_settings(fleet, reply_to=7))
    doc = fleet.wait_doc("alice", lambda d: (d.get("error") or {}).get("code")
                         == "bad_setting", 5, "bad_setting")
    took = time.monotonic() - written
    assert took < 2.0, f"bad_setting reported after {took:.2f} s"
    assert "reply_to" in doc["error"]["message"]
    assert doc["status"] == "connected"  # the previous settings stay: still answering OTHER
    assert "echo: still" in fleet.ask(OTHER, ALICE, "still")["text"]
    status = json.loads(fleet.ns.run(["wabridgectl", "status", "--json"]).stdout)
    assert status["users"][0]["error"]["code"] == "bad_setting"

    set_settings(fleet, sim_settings(fleet, reply_to="everyone"))
    fleet.wait_doc("alice", lambda d: d.get("error") is None, 5, "the error cleared")
    status = json.loads(fleet.ns.run(["wabridgectl", "status", "--json"]).stdout)
    assert status["users"][0]["error"] is None
    assert "echo: back" in fleet.ask(CONTACT, ALICE, "back")["text"]


def test_after_a_controller_restart_status_shows_the_phone(fleet: Fleet) -> None:
    pid = fleet.prop(fleet.unit("alice"), "MainPID")
    fleet.systemctl("restart", "wabridge-controller.service")
    fleet.wait_unit("wabridge-controller.service", "active")

    def row() -> dict[str, Any] | None:
        out = fleet.ns.run(["wabridgectl", "status", "--json"]).stdout
        users = json.loads(out).get("users") if out.startswith("{") else None
        return users[0] if users else None

    got = wait_until(row, 10, "wabridgectl status")
    assert (got["status"], got["phone"]) == ("connected", ALICE)
    assert fleet.prop(fleet.unit("alice"), "MainPID") == pid  # the worker kept running


def test_after_destroy_the_document_says_stopped_and_nothing_else(fleet: Fleet) -> None:
    fleet.request("alice", "destroy_requested")
    doc = fleet.wait_doc("alice", lambda d: d.get("status") == "stopped"
                         and (d.get("process") or {}).get("state") == "inactive", 30, "stopped")
    assert doc["statusDetail"] == "stopped"
    assert doc["process"]["status"] is None
    assert doc["metrics"]["claudeProcesses"] == 0
    row = json.loads(fleet.ns.run(["wabridgectl", "status", "--json"]).stdout)["users"][0]
    assert (row["status"], row["detail"], row["claude_processes"]) == ("stopped", "stopped", 0)
