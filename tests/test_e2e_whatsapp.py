"""WhatsApp outcomes end to end through real systemd.

Each account is linked through the simulator, then the sim plays what WhatsApp does: logouts,
another client taking over, bans, an outdated client, dropped connections, duplicate delivery,
images and pairing codes. The document, the unit and `systemctl status` must say the right thing.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator

import pytest
from fleet import Fleet, wait_until
from harness.systemd_ns import available

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

CONTACT = "5511977776666"


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str) -> Iterator[Fleet]:
    with Fleet(plane="firestore", emulator_host=firestore_emulator) as f:
        yield f


def _ended(fleet: Fleet, user: str, status: str) -> dict[str, object]:
    doc = fleet.wait_doc(user, lambda d: d.get("status") == status, 30, f"status {status}")
    unit = fleet.unit(user)
    fleet.wait_unit(unit, "inactive", 15)
    # a do-not-restart outcome: systemd leaves it stopped, no automatic restart pending
    assert fleet.prop(unit, "Result") == "success"
    assert fleet.unit_pids(unit) == []
    return doc


@pytest.mark.parametrize(
    ("user", "phone", "outcome", "status", "words"),
    [
        ("out1", "5511900000011", "logout", "logged_out", "logged out"),
        ("rep1", "5511900000012", "replace", "replaced", "another client"),
        ("ban1", "5511900000013", "ban", "banned", "banned"),
        ("old1", "5511900000014", "outdated", "outdated", "upgrade"),
    ],
)
def test_terminal_outcomes(fleet: Fleet, user: str, phone: str, outcome: str, status: str,
                           words: str) -> None:
    fleet.link(user, phone)
    body = {"expires_in": 3600} if outcome == "ban" else {}
    fleet.sim.trigger(phone, outcome, **body)
    _ended(fleet, user, status)
    # the worker's own words reach the document too (its last report before exiting)
    fleet.wait_doc(user, lambda d: words in str(d.get("statusDetail")), 10, f"{words!r} shown")
    # the worker exited with its do-not-restart code (the journal says which); systemd
    # must not bring it back (RestartSec=2 would have by now)
    code = {"logged_out": 10, "banned": 11, "replaced": 12, "outdated": 13}[status]
    assert f"worker.exit_outcome exit_code={code}" in fleet.journal(fleet.unit(user))
    time.sleep(2.5)
    assert fleet.prop(fleet.unit(user), "ActiveState") == "inactive"
    assert fleet.doc(user)["status"] == status


def test_logout_then_link_again_needs_a_new_qr(fleet: Fleet) -> None:
    # out1 was logged out above: its WhatsApp session was wiped, so a new request shows a QR
    doc = fleet.link("out1", "5511900000011")
    assert doc["status"] == "connected"


def test_dropped_connection_reconnects_without_qr(fleet: Fleet) -> None:
    phone = "5511900000021"
    fleet.link("drop1", phone)
    qr_at = fleet.doc("drop1").get("qrAt")
    pid = fleet.prop(fleet.unit("drop1"), "MainPID")
    fleet.sim.trigger(phone, "disconnect")
    wait_until(lambda: fleet.sim.account(phone).get("connected"), 20, "the device to reconnect")
    fleet.wait_doc("drop1", lambda d: d.get("status") == "connected", 20, "connected")
    assert fleet.doc("drop1").get("qrAt") == qr_at
    assert fleet.prop(fleet.unit("drop1"), "MainPID") == pid, "no process restart was needed"
    reply = fleet.ask(CONTACT, phone, "still there?")
    assert "echo: still there?" in reply["text"]


def test_duplicate_delivery_yields_one_turn(fleet: Fleet) -> None:
    phone = "5511900000031"
    contact = "5511955554444"
    fleet.link("dup1", phone)
    fleet.ask(contact, phone, "first")  # the contact is known now
    before = len(fleet.api.message_requests())
    fleet.sim.send(contact, phone, "twice", id="3EB0DUPLICATE0001")
    fleet.sim.send(contact, phone, "twice", id="3EB0DUPLICATE0001")
    wait_until(lambda: any(m.get("quoted_id") == "3EB0DUPLICATE0001"
                           for m in fleet.sim.inbox(contact)), 30, "the reply")
    fleet.ask(contact, phone, "after")  # a later turn proves the queue drained
    replies = [m for m in fleet.sim.inbox(contact) if m.get("quoted_id") == "3EB0DUPLICATE0001"]
    assert len(replies) == 1
    turns = [r for r in fleet.api.message_requests()[before:]
             if "twice" in (fleet.api.all_texts(r) or [""])[-1]]
    assert len(turns) == 1
    assert "message.duplicate" in fleet.journal(fleet.unit("dup1"))


def _png() -> str:
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_image_reaches_claude_as_an_image_block(fleet: Fleet) -> None:
    phone = "5511900000041"
    fleet.link("img1", phone)
    before = len(fleet.sim.inbox(CONTACT))
    wa_id = fleet.sim.send(CONTACT, phone, "",
                           image={"mime_type": "image/png", "data_b64": _png(),
                                  "caption": "what colour is this?"})
    reply = wait_until(lambda: [m for m in fleet.sim.inbox(CONTACT)[before:]
                                if m.get("quoted_id") == wa_id], 30, "the reply")[0]
    assert "[image image/png]" in reply["text"]
    assert "what colour is this?" in reply["text"]
    # no path of the worker's host reaches the model (the CLI's image copies)
    bodies = [json.dumps(r.json) for r in fleet.api.message_requests()]
    assert any("what colour is this?" in b for b in bodies)
    assert not [b for b in bodies if "/var/lib" in b or "[Image: source" in b]


def test_pairing_code_links_without_qr(fleet: Fleet) -> None:
    phone = "5511900000051"
    fleet.request("pair1", "pairing_requested", pairingPhone=phone)
    doc = fleet.wait_doc("pair1", lambda d: d.get("pairingCode") and d.get("status") == "pairing",
                         30, "a pairing code and status pairing")
    code = doc["pairingCode"]
    from fleet import http  # noqa: PLC0415

    http("POST", f"{fleet.sim.url}/api/phones/{phone}/pairing-code", {"code": code})
    fleet.wait_doc("pair1", lambda d: d.get("status") == "connected", 30, "connected")


def test_bad_pairing_phone_is_named(fleet: Fleet) -> None:
    fleet.request("pair2", "pairing_requested", pairingPhone="+55 11 9")
    doc = fleet.wait_doc("pair2", lambda d: d.get("error"), 20, "an error")
    assert doc["error"]["code"] == "bad_pairing_phone"
    assert "+55 11 9" in doc["error"]["message"]
