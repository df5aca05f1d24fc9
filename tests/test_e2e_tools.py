"""Claude's wabridge tools end to end (issue 16): real systemd, the hardened worker unit, the
real CLI starting the real MCP server (``python -m agent.mcp_server`` under the unit's UID and
restrictions), the simulator and the fake API, which calls a tool when the contact's text
carries ``[[tool NAME {args}]]`` (tests/fakes/anthropic_api.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fleet import Fleet, wait_until
from harness.systemd_ns import available

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

TOOLS_ON = {"tools": "wabridge", "commands_from": "everyone", "timezone": "America/Sao_Paulo"}


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str) -> Iterator[Fleet]:
    # one contact asks many things in a row here: no per-sender rate limit
    with Fleet(plane="firestore", emulator_host=firestore_emulator,
               config={"limits": {"inbound_per_minute": 0.0}}) as f:
        yield f


def _link(fleet: Fleet, user: str, phone: str, settings: dict[str, Any]) -> None:
    fleet.request(user, "create_requested", settings=settings)
    fleet.link(user, phone)


def _diag(fleet: Fleet, user: str) -> Any:
    return lambda: fleet.journal(fleet.unit(user))[-4000:]


def test_a_reminder_arrives_once_at_its_time_even_across_a_sigkill(fleet: Fleet) -> None:
    phone, contact, user = "5511900001601", "5511977771601", "tools1"
    _link(fleet, user, phone, TOOLS_ON)
    asked_at = time.time()
    said = fleet.ask(contact, phone, 'remind me in 5 seconds [[tool schedule_message '
                                     '{"when": "in 5 seconds", "text": "Time to call mom!"}]]')
    assert said["text"].startswith("tool schedule_message said: scheduled #1 for"), said
    assert "(America/Sao_Paulo)" in said["text"]
    # the worker dies (SIGKILL, its Claude and MCP server with it) before the reminder is due
    unit = fleet.unit(user)
    pid_before = fleet.prop(unit, "MainPID")
    fleet.systemctl("kill", "-s", "SIGKILL", unit)

    def reminders() -> list[dict[str, Any]]:
        return [m for m in fleet.sim.inbox(contact) if m["text"] == "Time to call mom!"]

    wait_until(reminders, 60, "the reminder", _diag(fleet, user))
    assert fleet.prop(unit, "MainPID") != pid_before  # delivered by the restarted worker
    [reminder] = reminders()
    assert reminder["by"] == "device" and reminder["quoted_id"] is None
    assert reminder["ts"] >= asked_at + 5
    time.sleep(3)  # a few more outbox rounds: still once
    assert len(reminders()) == 1
    # the owner sees what is scheduled from the self chat (nothing left)
    listed = fleet.sim.owner_send(phone, "/scheduled")
    reply = wait_until(lambda: [m for m in fleet.sim.self_chat(phone)
                                if m.get("quoted_id") == listed], 30, "/scheduled",
                       _diag(fleet, user))
    assert reply[0]["text"] == "No scheduled messages."
    journal = fleet.journal(unit)
    assert "tool.call" in journal and f"chat_id={contact}@s.whatsapp.net" in journal


def test_react_files_and_notes(fleet: Fleet) -> None:
    phone, contact, user = "5511900001602", "5511977771602", "tools2"
    _link(fleet, user, phone, TOOLS_ON)
    # a reaction on the contact's message
    before = len(fleet.sim.inbox(contact))
    wa_id = fleet.sim.send(contact, phone, 'great news! [[tool react {"emoji": "🎉"}]]')
    reaction = wait_until(lambda: [m for m in fleet.sim.inbox(contact)[before:]
                                   if m.get("reaction")], 60, "a reaction", _diag(fleet, user))
    assert reaction[0]["reaction"] == {"target_id": wa_id, "emoji": "🎉"}
    # a file written into the chat's workspace reaches the contact as a document
    workspace = (f"/var/lib/private/wabridge/{user}/chats/"
                 f"{contact}_s_whatsapp_net")
    fleet.ns.run(["sh", "-c", f"printf 'line one\\n' > {workspace}/notes.txt"], check=True)
    said = fleet.ask(contact, phone, '[[tool send_file {"path": "notes.txt", '
                                     '"caption": "your notes"}]]')
    assert said["text"] == "tool send_file said: sent notes.txt"
    [doc] = [m for m in fleet.sim.inbox(contact) if m.get("media")]
    assert doc["media"]["kind"] == "document" and doc["media"]["filename"] == "notes.txt"
    assert doc["media"]["size"] == len(b"line one\n") and doc["text"] == "your notes"
    said = fleet.ask(contact, phone, '[[tool send_file {"path": "../../etc/passwd"}]]')
    assert said["text"].startswith("tool send_file failed:") and "'..'" in said["text"]
    assert len([m for m in fleet.sim.inbox(contact) if m.get("media")]) == 1
    # a note remembered before /reset is in the first request after it
    said = fleet.ask(contact, phone, '[[tool remember {"note": "prefers Portuguese"}]]')
    assert said["text"] == "tool remember said: remembered as note #1"
    fleet.ask(contact, phone, "/reset")
    n = len(fleet.api.message_requests())
    fleet.ask(contact, phone, "hello after the reset")
    first = fleet.api.message_requests()[n]
    texts = " ".join(fleet.api.all_texts(first))
    assert "hello after the reset" in texts and "prefers Portuguese" in texts
    assert "tool remember" not in texts  # the old conversation is gone; the note is not
    listed = fleet.sim.owner_send(phone, "/memory")
    reply = wait_until(lambda: [m for m in fleet.sim.self_chat(phone)
                                if m.get("quoted_id") == listed], 30, "/memory",
                       _diag(fleet, user))
    assert "prefers Portuguese" in reply[0]["text"]


def test_tools_none_sends_no_tools_at_all(fleet: Fleet) -> None:
    phone, contact, user = "5511900001603", "5511977771603", "tools3"
    _link(fleet, user, phone, {})  # the default: tools none
    n = len(fleet.api.message_requests())
    said = fleet.ask(contact, phone, '[[tool schedule_message {"when": "in 5 seconds", '
                                     '"text": "never"}]]')
    assert said["text"] == "no tool schedule_message"
    requests = fleet.api.message_requests()[n:]
    assert requests and all(r.json["tools"] == [] for r in requests)
    # a bad value is named on the document; a good one turns the tools on, live
    doc = fleet.db.collection("user_sessions").document(user)
    doc.set({"settings": {"timezone": "Mars/Olympus"}}, merge=True)
    bad = fleet.wait_doc(user, lambda d: (d.get("error") or {}).get("code") == "bad_setting",
                         10, "bad_setting")
    assert "settings.timezone" in bad["error"]["message"]
    doc.set({"settings": {"timezone": "Asia/Tokyo", "tools": "wabridge"}}, merge=True)
    fleet.wait_doc(user, lambda d: d.get("error") is None, 10, "the error cleared")
    said = wait_until(
        lambda: (r := fleet.ask(contact, phone, '[[tool list_scheduled]]'))["text"]
        != "no tool list_scheduled" and r, 30, "the tools on", _diag(fleet, user))
    assert said["text"] == "tool list_scheduled said: nothing scheduled"
