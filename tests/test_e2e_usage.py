"""Usage for billing and voice notes end to end through real systemd, the Firestore
emulator, the simulator and the real Claude Code CLI against the fake Messages API: the
``usage/{user}__{day}`` document holds exactly the tokens the fake API reported, also when
the worker is SIGKILLed in the middle of a turn (the interrupted turn is taken again and
counted once); a contact's voice note is transcribed by a fake OpenAI-compatible endpoint."""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.anthropic_api import Reply, last_user_text
from fakes.transcription_api import TRANSCRIPT, FakeTranscriptionAPI
from fleet import Fleet, wait_until
from harness.systemd_ns import available
from test_transcription import make_voice_note

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

ACCOUNT = "5511900001901"
CONTACT = "5511977770901"
IN_TOKENS, OUT_TOKENS = 1234, 56  # what the fake API reports for every turn


def responder(body: Any) -> Reply:
    said = last_user_text(body)
    if "HANG" in said:
        return Reply(hang=True)
    return Reply(text=f"echo: {said[-40:]}", input_tokens=IN_TOKENS, output_tokens=OUT_TOKENS)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[FakeTranscriptionAPI]:
    with FakeTranscriptionAPI() as fake:
        yield fake


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str, endpoint: FakeTranscriptionAPI) -> Iterator[Fleet]:
    with Fleet(plane="firestore", emulator_host=firestore_emulator,
               config={"transcription": {"url": endpoint.url}}) as f:
        yield f


def usage_doc(fleet: Fleet, user: str) -> dict[str, Any]:
    day = time.strftime("%Y-%m-%d", time.gmtime())
    snap = fleet.db.collection("usage").document(f"{user}__{day}").get()
    return dict(snap.to_dict() or {})


def test_usage_matches_the_apis_token_counts_across_a_sigkill_mid_turn(fleet: Fleet) -> None:
    fleet.api.responder = responder
    fleet.link("payer", ACCOUNT)
    unit = fleet.unit("payer")
    for n in range(3):
        fleet.ask(CONTACT, ACCOUNT, f"question {n}")
    doc = wait_until(lambda: (d := usage_doc(fleet, "payer")).get("turns") == 3 and d, 20,
                     "the usage document for 3 turns")
    assert (doc["inputTokens"], doc["outputTokens"]) == (3 * IN_TOKENS, 3 * OUT_TOKENS)
    assert doc["userId"] == "payer" and doc["costUsd"] > 0

    # a turn in flight when the worker is SIGKILLed: never answered by the API, so never
    # counted; the restarted worker takes the message again and counts that turn once
    before = len(fleet.api.message_requests())
    pid = fleet.prop(unit, "MainPID")
    wa_id = fleet.sim.send(CONTACT, ACCOUNT, "HANG on a second")
    wait_until(lambda: any("HANG" in last_user_text(r.json)
                           for r in fleet.api.message_requests()[before:]), 30,
               "the turn to reach the API")
    fleet.api.responder = lambda body: Reply(text="echo: after the crash",
                                             input_tokens=IN_TOKENS, output_tokens=OUT_TOKENS)
    fleet.ns.systemctl("kill", "-s", "SIGKILL", unit)
    wait_until(lambda: fleet.prop(unit, "MainPID") not in ("0", pid)
               and fleet.prop(unit, "ActiveState") == "active", 60, "the worker restarted")
    wait_until(lambda: any(m.get("quoted_id") == wa_id for m in fleet.sim.inbox(CONTACT)), 60,
               "the interrupted message answered after the restart",
               lambda: fleet.journal(unit)[-3000:])
    fleet.api.responder = responder
    fleet.ask(CONTACT, ACCOUNT, "one more")
    doc = wait_until(lambda: (d := usage_doc(fleet, "payer")).get("turns") == 5 and d, 20,
                     "the usage document for 5 turns")
    time.sleep(2)  # a double count, if any, would arrive now
    doc = usage_doc(fleet, "payer")
    assert (doc["turns"], doc["inputTokens"], doc["outputTokens"]) == (
        5, 5 * IN_TOKENS, 5 * OUT_TOKENS)
    assert doc["messagesIn"] == 5 and doc["messagesOut"] == 5

    out = json.loads(fleet.ns.run(["wabridgectl", "usage", "payer", "--json"]).stdout)
    assert [(u["userId"], u["turns"], u["inputTokens"]) for u in out["usage"]] == [
        ("payer", 5, 5 * IN_TOKENS)]
    table = fleet.ns.run(["wabridgectl", "usage"]).stdout
    assert "payer" in table and str(5 * IN_TOKENS) in table


def test_a_voice_note_from_a_contact_is_answered_from_its_transcript(
        fleet: Fleet, endpoint: FakeTranscriptionAPI, tmp_path: Path) -> None:
    """The sim sends a real OGG/Opus voice note as WhatsApp does; the worker uploads it to the
    transcription endpoint and Claude's request carries the transcript."""
    if not (shutil.which("espeak-ng") and shutil.which("ffmpeg")):
        pytest.skip("espeak-ng and ffmpeg make the voice note")
    data = make_voice_note(tmp_path)
    before_doc = usage_doc(fleet, "payer")
    before = len(fleet.sim.inbox(CONTACT))
    wa_id = fleet.sim.send(CONTACT, ACCOUNT, "", audio={
        "mime_type": "audio/ogg; codecs=opus", "data_b64": base64.b64encode(data).decode(),
        "seconds": 2.5, "voice": True})
    wait_until(lambda: any(m.get("quoted_id") == wa_id
                           for m in fleet.sim.inbox(CONTACT)[before:]), 60,
               "the voice note answered", lambda: fleet.journal(fleet.unit("payer"))[-3000:])
    said = last_user_text(fleet.api.message_requests()[-1].json)
    assert f"[voice note, transcribed] {TRANSCRIPT}" in said
    assert [u.data for u in endpoint.uploads] == [data]
    doc = wait_until(lambda: (d := usage_doc(fleet, "payer")).get("transcriptionSeconds")
                     and d, 20, "the transcribed seconds in the usage document")
    assert doc["transcriptionSeconds"] == 2.5
    assert doc["turns"] == before_doc["turns"] + 1
