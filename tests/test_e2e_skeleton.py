"""The walking skeleton, end to end through a real systemd, on two control planes: Firestore
(the emulator) and PostgreSQL (the session's cluster, which the controller inside the
namespace reaches on 127.0.0.1 with its ``postgres-password`` credential).

A document becomes a worker unit; the sim phone scans its QR; a contact's message is
answered by the real Claude Code CLI through the fake Anthropic API, quoting the original.
One fleet per plane serves the whole module; the tests run in order, each building on the
last.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fleet import Fleet, wait_until
from harness.systemd_ns import available
from plane_pg import PlaneFleet, postgres_plane

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.claude,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

ALICE_PHONE = "5511999990001"
CONTACT = "5511988887777"


@pytest.fixture(scope="module",
                params=[pytest.param("firestore", marks=pytest.mark.firestore), "postgres"])
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    if request.param == "firestore":
        emulator: str = request.getfixturevalue("firestore_emulator")
        with Fleet(plane="firestore", emulator_host=emulator) as f:
            yield f
        return
    with postgres_plane(request.getfixturevalue("postgres")) as plane, PlaneFleet(plane) as f:
        yield f


def test_request_to_answer(fleet: Fleet) -> None:
    doc = fleet.link("alice", ALICE_PHONE)
    assert doc["phone"] == ALICE_PHONE
    assert doc["host"]
    unit = fleet.unit("alice")
    assert fleet.prop(unit, "ActiveState") == "active"

    reply = fleet.ask(CONTACT, ALICE_PHONE, "hello")
    assert "echo: hello" in reply["text"]
    turns = fleet.api.message_requests()
    assert any("hello" in " ".join(fleet.api.all_texts(r)) for r in turns)

    # the STATUS= line is refreshed once a second
    status = wait_until(
        lambda: (out := fleet.ns.systemctl("status", "--no-pager", unit).stdout)
        and "1 chat " in out and out, 5, "the status line to count the chat")
    assert f"Status: \"connected as +{ALICE_PHONE} - 1 chat - " in status
    journal = fleet.ns.journalctl("--no-pager", "-o", "cat", "USER_ID=alice")
    for event in (
        "whatsapp.qr_generated",
        "whatsapp.ready",
        "whatsapp.message_received",
        "outbox.delivered",
    ):
        assert event in journal, f"{event} missing from journalctl USER_ID=alice"
    # the controller mirrored the exchange into the seed's `messages` collection
    msgs = fleet.wait_doc("alice", lambda d: True, 1, "doc") and wait_until(
        lambda: len(fleet.messages("alice")) >= 2, 15, "messages mirrored"
    )
    assert msgs


def test_restart_keeps_link_and_context(fleet: Fleet) -> None:
    unit = fleet.unit("alice")
    qr_at = fleet.doc("alice").get("qrAt")
    pid = int(fleet.prop(unit, "MainPID"))
    fleet.systemctl("restart", unit)
    wait_until(lambda: int(fleet.prop(unit, "MainPID")) not in (0, pid), 30, "a new MainPID")
    fleet.wait_doc("alice", lambda d: d.get("status") == "connected", 30, "connected again")
    assert fleet.doc("alice").get("qrAt") == qr_at, "a restart must not ask for a new QR"

    fleet.api.clear()
    reply = fleet.ask(CONTACT, ALICE_PHONE, "second message")
    assert "echo: second message" in reply["text"]
    texts = " ".join(" ".join(fleet.api.all_texts(r)) for r in fleet.api.message_requests())
    assert "hello" in texts and "echo: hello" in texts, "the resumed session lost its context"


def test_controller_down_worker_keeps_answering(fleet: Fleet) -> None:
    ctl = "wabridge-controller.service"
    fleet.systemctl("stop", ctl)
    reply = fleet.ask(CONTACT, ALICE_PHONE, "while the controller is away")
    assert "echo: while the controller is away" in reply["text"]
    fleet.systemctl("start", ctl)
    wait_until(
        lambda: any(
            "while the controller is away" in str(m.get("text")) for m in fleet.messages("alice")
        ),
        30,
        "the queued report to reach the plane after the controller came back",
    )


def test_controller_sigkill_is_restarted_and_catches_up(fleet: Fleet) -> None:
    ctl = "wabridge-controller.service"
    restarts = int(fleet.prop(ctl, "NRestarts"))
    fleet.systemctl("kill", "-s", "SIGKILL", ctl)
    reply = fleet.ask(CONTACT, ALICE_PHONE, "during the controller crash")
    assert "echo: during the controller crash" in reply["text"]
    wait_until(
        lambda: (
            int(fleet.prop(ctl, "NRestarts")) > restarts
            and fleet.prop(ctl, "ActiveState") == "active"
        ),
        30,
        "systemd to restart it",
    )
    assert fleet.prop(fleet.unit("alice"), "ActiveState") == "active"
    # the restarted controller catches up: a restart of the worker is mirrored again
    fleet.systemctl("restart", fleet.unit("alice"))
    fleet.wait_doc("alice", lambda d: d.get("status") == "connected", 30, "connected")
    wait_until(
        lambda: any(
            "during the controller crash" in str(m.get("text")) for m in fleet.messages("alice")
        ),
        30,
        "messages caught up",
    )


def test_bad_documents_get_an_error_and_others_are_served(fleet: Fleet) -> None:
    fleet.request("has space", "create_requested")
    fleet.request("carol", "banana")
    bad = fleet.wait_doc("has space", lambda d: d.get("error"), 20, "an error field")
    assert bad["error"]["code"] == "bad_user_id"
    odd = fleet.wait_doc("carol", lambda d: d.get("error"), 20, "an error field")
    assert odd["error"]["code"] == "unknown_status"
    assert "banana" in odd["error"]["message"]
    # the controller still serves others
    fleet.link("bob", "5511999990002")


def test_destroy_stops_unit_and_leaves_no_process(fleet: Fleet) -> None:
    unit = fleet.unit("alice")
    assert fleet.unit_pids(unit), "the worker should be running before destroy"
    fleet.request("alice", "destroy_requested")
    fleet.wait_doc("alice", lambda d: d.get("status") == "stopped", 30, "status stopped")
    fleet.wait_unit(unit, "inactive", 15)
    time.sleep(0.2)
    assert fleet.unit_pids(unit) == []
    # bob never got a message, so no claude process may exist anywhere now
    assert fleet.ns.run(["pgrep", "-af", "_bundled/claude"]).stdout == ""
    assert fleet.ns.run(["pgrep", "-f", "agent.main alice"]).returncode == 1
