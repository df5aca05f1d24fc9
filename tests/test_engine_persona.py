"""Per-user persona and human takeover through agent.engine.Engine: a real Store, the real
Claude Code CLI (or the api engine) against the fake Messages API (rigs of test_engine.py)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time

import pytest
from fakes.anthropic_api import FakeAnthropicAPI, RecordedRequest, last_user_text
from fakes.transcription_api import TRANSCRIPT, FakeTranscriptionAPI
from structlog.testing import capture_logs
from test_engine import (
    ALICE,
    BOB,
    CLI,
    OWNER,
    MakeRig,
    Rig,
    api,
    jid,
    make_rig,
    session_of,
    texts,
)
from test_transcription import make_voice_note

from agent import takeover
from agent.store import decode_message
from agent.transcription import TranscriptionSettings
from agent.whatsapp.events import Audio, IncomingMessage

__all__ = ["api", "make_rig"]  # fixtures shared with test_engine.py

pytestmark = [
    pytest.mark.claude,
    pytest.mark.timeout(90),
    pytest.mark.skipif(CLI is None, reason="claude-agent-sdk's bundled CLI missing"),
]

HOST_PROMPT = "You answer WhatsApp messages."


@pytest.fixture(params=["cli", "api"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def system_of(req: RecordedRequest) -> str:
    system = req.json.get("system")
    if isinstance(system, str):
        return system
    return "\n".join(b.get("text", "") for b in system or [] if isinstance(b, dict))


async def ask(rig: Rig, api: FakeAnthropicAPI, text: str, sender: str = ALICE
              ) -> RecordedRequest:
    before = len(api.message_requests())
    n = len(rig.wa.to(jid(sender)))
    rig.incoming(text, sender=sender)
    await rig.wait_sent(n + 1, jid(sender))
    assert len(api.message_requests()) == before + 1
    return api.message_requests()[-1]


async def owner_says(rig: Rig, text: str) -> str:
    """The owner in the self chat; returns the answer."""
    n = len(rig.wa.to(jid(OWNER)))
    rig.incoming(text, sender=OWNER, chat=jid(OWNER), from_me=True)
    return (await rig.wait_sent(n + 1, jid(OWNER)))[-1]


async def test_persona_applies_to_the_next_turn_and_chats_can_have_their_own(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    rig = await make_rig()
    first = await ask(rig, api, "remember PELICAN")
    assert HOST_PROMPT in system_of(first)

    assert rig.engine.update_settings({"systemPrompt": "You are PIRATE-BOT."}) is None
    req = await ask(rig, api, "hello")
    assert "PIRATE-BOT" in system_of(req) and HOST_PROMPT not in system_of(req)
    assert "PELICAN" in texts(req)  # the same conversation, only the prompt changed
    assert session_of(req) == session_of(first)

    rig.engine.update_settings({"systemPrompt": "You are BUTLER-BOT.", "language": "German"})
    req = await ask(rig, api, "hello again")
    assert "BUTLER-BOT" in system_of(req) and "PIRATE-BOT" not in system_of(req)
    assert "Reply in German" in system_of(req)

    # the owner gives Alice's chat its own persona from the self chat; Bob keeps the account's
    answer = await owner_says(rig, f"/persona +{ALICE} You are CHEF-BOT.")
    assert "own persona" in answer
    req = await ask(rig, api, "what's for dinner?")
    assert "CHEF-BOT" in system_of(req) and "BUTLER-BOT" not in system_of(req)
    req = await ask(rig, api, "hi", sender=BOB)
    assert "BUTLER-BOT" in system_of(req) and "CHEF-BOT" not in system_of(req)
    status = await owner_says(rig, "/status")
    assert f"Own persona of {jid(ALICE)}: You are CHEF-BOT." in status
    await owner_says(rig, f"/persona {ALICE} reset")
    req = await ask(rig, api, "and now?")
    assert "BUTLER-BOT" in system_of(req) and "CHEF-BOT" not in system_of(req)


async def test_the_model_setting_and_bad_values(make_rig: MakeRig,
                                                api: FakeAnthropicAPI, engine: str) -> None:
    rig = await make_rig(models_allowed=("claude-haiku-4-5",))
    bad = rig.engine.update_settings({"model": "claude-opus-4-1"})
    assert bad is not None and bad.key == "settings.model"
    bad = rig.engine.update_settings({"systemPrompt": "x" * 20_001})
    assert bad is not None and bad.key == "settings.systemPrompt"
    if engine == "api":
        return  # the api rig prices only its own model (claude.api_prices)
    assert rig.engine.update_settings({"model": "claude-haiku-4-5",
                                       "apology": "PERDON"}) is None
    req = await ask(rig, api, "hi")
    assert req.json["model"] == "claude-haiku-4-5"


async def test_the_owner_writing_pauses_the_chat_and_resume_hands_over_what_was_said(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    rig = await make_rig()
    chat = jid(ALICE)
    await ask(rig, api, "how much is the cake?")
    # the owner answers personally from the phone: the bot steps back in this chat
    rig.incoming("It is 40 EUR, I will bring it myself", sender=OWNER, chat=chat,
                 from_me=True)
    held = rig.incoming("great, and when?")
    await rig.idle()
    assert rig.store.inbound_state(chat, held) == ("skipped", "paused")
    assert len(rig.wa.to(chat)) == 1  # not answered
    assert f"{chat}:" in await owner_says(rig, "/paused")
    # a contact cannot resume it, even with commands_from = everyone
    rig.engine.update_settings({"commands_from": "everyone"})
    rig.incoming(f"/resume {ALICE}")
    await rig.wait_sent(2, chat)
    assert rig.wa.to(chat)[-1].startswith("/resume works only in your own chat")
    rig.engine.update_settings({})

    assert "Resumed" in await owner_says(rig, f"/resume {ALICE}")
    req = await ask(rig, api, "thanks!")
    said = last_user_text(req.json)
    assert said.index("[owner] It is 40 EUR") < said.index("great, and when?") \
        < said.index("thanks!")
    req = await ask(rig, api, "bye")  # handed over once
    assert takeover.CONTEXT_HEADER not in last_user_text(req.json)
    assert "No chat is paused." in await owner_says(rig, "/paused")

    # /pause with minutes, and the pause ending by itself
    await owner_says(rig, f"/pause {ALICE} 0.01")
    held = rig.incoming("anyone?")
    await rig.idle()
    assert rig.store.inbound_state(chat, held) == ("skipped", "paused")
    await asyncio.sleep(0.7)
    req = await ask(rig, api, "hello?")
    assert "anyone?" in last_user_text(req.json)


async def test_takeover_minutes_zero_never_pauses(make_rig: MakeRig,
                                                  api: FakeAnthropicAPI) -> None:
    rig = await make_rig()
    rig.engine.update_settings({"takeover_minutes": 0})
    rig.incoming("I'm on it", sender=OWNER, chat=jid(ALICE), from_me=True)
    req = await ask(rig, api, "ok")
    assert "[owner] I'm on it" in last_user_text(req.json)  # still told, not paused


# --- voice notes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voice_note(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if not (shutil.which("espeak-ng") and shutil.which("ffmpeg")):
        pytest.skip("espeak-ng and ffmpeg make the voice note")
    return make_voice_note(tmp_path_factory.mktemp("voice"))


def send_voice(rig: Rig, data: bytes, seconds: float = 3.0) -> str:
    msg = IncomingMessage(
        wa_id=f"VOICE{len(rig.wa.sent)}-{time.monotonic_ns()}", chat_id=jid(ALICE),
        sender=jid(ALICE), text="", timestamp=time.time(), unsupported_media="voice",
        audio=Audio("audio/ogg; codecs=opus", data, seconds, voice=True))
    assert rig.engine.persist(msg)
    rig.engine.wake_chat(msg.chat_id)
    return msg.wa_id


def stored(rig: Rig, wa_id: str) -> IncomingMessage:
    with sqlite3.connect(rig.root / "agent.db") as db:
        row = db.execute("SELECT payload FROM inbox WHERE wa_id = ?", (wa_id,)).fetchone()
    return decode_message(row[0])


async def test_a_voice_note_reaches_claude_as_its_transcript_once(
        make_rig: MakeRig, api: FakeAnthropicAPI, voice_note: bytes) -> None:
    with FakeTranscriptionAPI() as endpoint:
        rig = await make_rig(transcription=TranscriptionSettings(url=endpoint.url))
        wa_id = send_voice(rig, voice_note)
        await rig.wait_sent(1, jid(ALICE))
        said = last_user_text(api.message_requests()[-1].json)
        assert f"[voice note, transcribed] {TRANSCRIPT}" in said
        assert "cannot be shown" not in said
        assert len(endpoint.uploads) == 1 and endpoint.uploads[0].data == voice_note
        kept = stored(rig, wa_id)  # the transcript in the inbox, the audio dropped
        assert (kept.transcript, kept.audio) == (TRANSCRIPT, None)
        assert rig.store.usage_on(time.strftime("%Y-%m-%d", time.gmtime()))[
            "transcription_seconds"] == 3.0

        # the endpoint failing: today's "not supported" note, the reason in the log
        endpoint.answer = lambda upload: (503, "busy")
        with capture_logs() as logs:
            wa_id = send_voice(rig, voice_note)
            await rig.wait_sent(2, jid(ALICE))
        said = last_user_text(api.message_requests()[-1].json)
        assert "[sent a voice message, which cannot be shown to you]" in said
        assert any(e["event"] == "voice.not_transcribed" and "HTTP 503: busy" in e["reason"]
                   for e in logs)
        assert stored(rig, wa_id).audio is None  # never tried again


async def test_without_an_endpoint_a_voice_note_is_not_supported(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    rig = await make_rig()
    with capture_logs() as logs:
        send_voice(rig, b"OggS-not-sent")
        await rig.wait_sent(1, jid(ALICE))
    assert "cannot be shown" in last_user_text(api.message_requests()[-1].json)
    assert any(e["event"] == "voice.not_transcribed" and "not configured" in e["reason"]
               for e in logs)
