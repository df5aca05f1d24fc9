"""The account's owner, played by the simulator's owner's phone, end to end through real
systemd: ``reply_to: self`` answers the self chat and nothing else, owner commands
answer the owner only, and the owner writing in a contact's chat is seen as the owner."""

from __future__ import annotations

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

CONTACT = "5511977770001"
STATUS_LINE = "Context used:"  # the first figure of /status (agent.commands.status_text)


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str) -> Iterator[Fleet]:
    with Fleet(plane="firestore", emulator_host=firestore_emulator) as f:
        yield f


def _self_reply(fleet: Fleet, account: str, wa_id: str) -> dict[str, Any]:
    def reply() -> Any:
        got = [m for m in fleet.sim.self_chat(account)
               if m.get("by") == "device" and m.get("quoted_id") == wa_id]
        return got[0] if got else None

    return dict(wait_until(reply, 60, f"the self-chat reply to {wa_id}",
                           lambda: fleet.journal(None, "-n", "80")))


def _skipped(fleet: Fleet, user: str, wa_id: str, reason: str) -> None:
    wait_until(lambda: "message.skipped" in (j := fleet.journal(fleet.unit(user)))
               and any(wa_id in line and f"reason={reason}" in line
                       for line in j.splitlines()),
               30, f"{wa_id} skipped ({reason})", lambda: fleet.journal(fleet.unit(user))[-3000:])


def _owner_wrote(fleet: Fleet, user: str, wa_id: str) -> None:
    wait_until(lambda: any("message.owner_wrote" in line and wa_id in line
                           for line in fleet.journal(fleet.unit(user)).splitlines()),
               30, f"{wa_id} seen as the owner writing",
               lambda: fleet.journal(fleet.unit(user))[-3000:])


def test_reply_to_self_answers_the_self_chat_and_nothing_else(fleet: Fleet) -> None:
    phone = "5511900001801"
    fleet.request("self1", "create_requested", settings={"reply_to": "self"})
    fleet.link("self1", phone)
    # a contact writes first: never answered in this mode, not even a command
    hello = fleet.sim.send(CONTACT, phone, "hello, anyone?")
    status = fleet.sim.send(CONTACT, phone, "/status")
    # the owner writes to themselves: answered in the self chat, quoting it
    note = fleet.sim.owner_send(phone, "remind me to call mom")
    reply = _self_reply(fleet, phone, note)
    assert "echo: remind me to call mom" in reply["text"]
    assert reply["chat"] == f"{phone}@s.whatsapp.net"
    # the owner's phone writes in the contact's chat: the owner, not a contact to answer
    personal = fleet.sim.owner_send(phone, "I will call you later", to=CONTACT)
    _skipped(fleet, "self1", hello, "not_self_chat")
    _skipped(fleet, "self1", status, "not_self_chat")
    _skipped(fleet, "self1", personal, "from_me")
    _owner_wrote(fleet, "self1", personal)
    # one more self-chat turn proves the queue drained; the contact got only the owner's line
    later = fleet.sim.owner_send(phone, "and buy milk")
    assert "echo: and buy milk" in _self_reply(fleet, phone, later)["text"]
    assert [(m["text"], m["by"]) for m in fleet.sim.inbox(CONTACT) if m["from"] == phone] == [
        ("I will call you later", "phone")]
    asked = " ".join(" ".join(fleet.api.all_texts(r)) for r in fleet.api.message_requests())
    assert "hello, anyone?" not in asked and "I will call you later" not in asked


def test_status_answers_the_owner_not_a_contact(fleet: Fleet) -> None:
    phone = "5511900001802"
    contact = "5511977770002"
    fleet.link("cmd1", phone)  # default settings: reply_to everyone, commands_from owner
    asked = fleet.sim.owner_send(phone, "/status")
    reply = _self_reply(fleet, phone, asked)
    assert reply["text"].startswith("Status") and STATUS_LINE in reply["text"]
    # a contact's /status is an ordinary message: Claude answers it, no figures leak
    answer = fleet.ask(contact, phone, "/status")
    assert STATUS_LINE not in answer["text"] and "echo:" in answer["text"]
    # a command the owner types into the contact's chat is not answered there
    typed = fleet.sim.owner_send(phone, "/status", to=contact)
    _skipped(fleet, "cmd1", typed, "command_in_chat")


def test_the_owner_taking_over_pauses_the_chat_until_resume(fleet: Fleet) -> None:
    """Human takeover: the owner's phone writes in a contact's chat -> the next contact
    message is not answered; /resume from the self chat -> the next one is, and its request
    carries what the owner wrote and what the contact said meanwhile."""
    phone = "5511900001802"  # cmd1, linked above
    contact = "5511977770003"
    fleet.ask(contact, phone, "how much is the cake?")
    before = len(fleet.sim.inbox(contact))
    personal = fleet.sim.owner_send(phone, "I am taking this one: 40 EUR", to=contact)
    _owner_wrote(fleet, "cmd1", personal)
    held = fleet.sim.send(contact, phone, "deal, when can you deliver?")
    _skipped(fleet, "cmd1", held, "paused")
    paused = _self_reply(fleet, phone, fleet.sim.owner_send(phone, "/paused"))
    assert f"{contact}@s.whatsapp.net" in paused["text"]
    assert [m["by"] for m in fleet.sim.inbox(contact)[before:]] == ["phone"]  # the owner only
    requests = [" ".join(fleet.api.all_texts(r)) for r in fleet.api.message_requests()]
    assert not any("I am taking this one" in r for r in requests)

    resumed = _self_reply(fleet, phone, fleet.sim.owner_send(phone, f"/resume {contact}"))
    assert resumed["text"].startswith("Resumed")
    fleet.ask(contact, phone, "thanks, see you")
    said = " ".join(fleet.api.all_texts(fleet.api.message_requests()[-1]))
    assert said.index("[owner] I am taking this one: 40 EUR") \
        < said.index("deal, when can you deliver?") < said.index("thanks, see you")

    # the operator pauses and resumes the same way (wabridgectl -> a command to the worker)
    out = fleet.ns.run(["wabridgectl", "pause", "cmd1", contact]).stdout
    assert "paused" in out
    wait_until(lambda: "by=operator" in fleet.journal(fleet.unit("cmd1")), 10,
               "the worker to pause the chat")
    held = fleet.sim.send(contact, phone, "hello?")
    _skipped(fleet, "cmd1", held, "paused")
    fleet.ns.run(["wabridgectl", "resume", "cmd1", contact])
    wait_until(lambda: "takeover.resumed" in fleet.journal(fleet.unit("cmd1")), 10,
               "the worker to resume the chat")
    assert "echo:" in fleet.ask(contact, phone, "still there?")["text"]


def _system(req: Any) -> str:
    system = req.json.get("system")
    if isinstance(system, str):
        return system
    return " ".join(b.get("text", "") for b in system or [] if isinstance(b, dict))


def test_each_account_has_its_own_persona_and_a_change_is_in_the_next_request(
        fleet: Fleet) -> None:
    accounts = {"ana": ("5511900001811", "You are ANA-PERSONA."),
                "ben": ("5511900001812", "You are BEN-PERSONA.")}
    for user, (phone, prompt) in accounts.items():
        fleet.request(user, "create_requested", settings={"systemPrompt": prompt})
        fleet.link(user, phone)
    contact = "5511977770004"

    def request_for(user: str, text: str) -> Any:
        fleet.ask(contact, accounts[user][0], text)
        got = [r for r in fleet.api.message_requests()
               if text in " ".join(fleet.api.all_texts(r))]
        assert len(got) == 1
        return got[0]

    for turn in range(2):
        for user, (_, prompt) in accounts.items():
            req = request_for(user, f"hello {user} {turn}")
            other = "BEN-PERSONA" if user == "ana" else "ANA-PERSONA"
            assert prompt in _system(req) and other not in _system(req)
    fleet.db.collection("user_sessions").document("ana").update(
        {"settings": {"systemPrompt": "You are ANA-THE-SECOND."}})
    wait_until(lambda: fleet.journal(fleet.unit("ana")).count("persona.updated") >= 2, 10,
               "ana's worker to apply the new prompt")
    req = request_for("ana", "after the change")
    assert "ANA-THE-SECOND" in _system(req) and "ANA-PERSONA" not in _system(req)
    assert "BEN-PERSONA" not in _system(req)
