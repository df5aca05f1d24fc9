"""agent.transcription against a fake OpenAI-compatible endpoint speaking the real multipart
protocol, fed a real OGG/Opus voice note made here (espeak-ng + ffmpeg, as WhatsApp sends
voice notes: Opus in Ogg, mono)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.transcription_api import TRANSCRIPT, FakeTranscriptionAPI

from agent.transcription import (
    TranscriptionError,
    TranscriptionSettings,
    file_name,
    refusal,
    transcribe,
)
from agent.whatsapp.events import Audio

pytestmark = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("ffmpeg")),
                                reason="espeak-ng and ffmpeg make the voice note")


def make_voice_note(directory: Path, words: str = "please deliver the blue cake") -> bytes:
    """A real OGG/Opus voice note of ``words``."""
    wav, ogg = directory / "words.wav", directory / "voice.ogg"
    subprocess.run(["espeak-ng", "-w", str(wav), words], check=True, capture_output=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), "-ac", "1", "-ar",
                    "16000", "-c:a", "libopus", "-b:a", "16k", str(ogg)], check=True,
                   capture_output=True)
    return ogg.read_bytes()


@pytest.fixture(scope="module")
def voice_note(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_voice_note(tmp_path_factory.mktemp("voice"))


@pytest.fixture
def endpoint() -> Iterator[FakeTranscriptionAPI]:
    with FakeTranscriptionAPI() as fake:
        yield fake


def note(data: bytes, seconds: float = 2.0) -> Audio:
    return Audio("audio/ogg; codecs=opus", data, seconds, voice=True)


async def test_a_voice_note_is_uploaded_as_multipart_and_transcribed(
        voice_note: bytes, endpoint: FakeTranscriptionAPI) -> None:
    settings = TranscriptionSettings(url=endpoint.url, model="whisper-large-v3",
                                     api_key="tr-key")
    assert await transcribe(note(voice_note), settings) == TRANSCRIPT
    (upload,) = endpoint.uploads
    assert upload.data == voice_note  # the file as WhatsApp sent it, not re-encoded
    assert upload.data[:4] == b"OggS" and b"OpusHead" in upload.data[:100]
    assert (upload.file_field, upload.filename, upload.content_type) == (
        "file", "voice.ogg", "audio/ogg")
    assert upload.fields == {"model": "whisper-large-v3", "response_format": "json"}
    assert upload.headers["Authorization"] == "Bearer tr-key"
    assert upload.headers["Content-Type"].startswith("multipart/form-data; boundary=")


async def test_no_key_sends_no_authorization(voice_note: bytes,
                                             endpoint: FakeTranscriptionAPI) -> None:
    await transcribe(note(voice_note), TranscriptionSettings(url=endpoint.url))
    assert "Authorization" not in endpoint.uploads[0].headers


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ((500, "model not loaded"), "HTTP 500: model not loaded"),
        ((200, "not json"), "could not be used"),
        ((200, '{"error": "x"}'), 'has no "text"'),
    ],
)
async def test_endpoint_failures_name_the_reason(voice_note: bytes,
                                                 endpoint: FakeTranscriptionAPI,
                                                 answer: tuple[int, str], reason: str) -> None:
    endpoint.answer = lambda upload: answer
    with pytest.raises(TranscriptionError, match=reason):
        await transcribe(note(voice_note), TranscriptionSettings(url=endpoint.url))


async def test_a_slow_endpoint_times_out(voice_note: bytes,
                                         endpoint: FakeTranscriptionAPI) -> None:
    endpoint.answer = lambda upload: None
    with pytest.raises(TranscriptionError, match=r"transcription\.timeout = 1 s"):
        await transcribe(note(voice_note), TranscriptionSettings(url=endpoint.url, timeout=1.0))


async def test_unreachable_endpoint() -> None:
    with pytest.raises(TranscriptionError, match="could not be used"):
        await transcribe(note(b"OggS"), TranscriptionSettings(url="http://127.0.0.1:9/v1/x"))


@pytest.mark.parametrize(
    ("audio", "settings", "reason"),
    [
        (note(b"x" * 10), TranscriptionSettings(url=""), "not configured"),
        (note(b"x" * 2001), TranscriptionSettings(url="u", max_bytes=2000),
         "2001 bytes, more than transcription.max_bytes = 2000"),
        (note(b"x", seconds=601), TranscriptionSettings(url="u"),
         "601 s long, more than transcription.max_seconds = 600"),
        (note(b"x" * 2000, seconds=600), TranscriptionSettings(url="u", max_bytes=2000), None),
    ],
)
def test_refusal(audio: Audio, settings: TranscriptionSettings, reason: str | None) -> None:
    got = refusal(audio, settings)
    assert got == reason if reason is None else reason in (got or "")


async def test_a_refused_note_is_never_uploaded(endpoint: FakeTranscriptionAPI) -> None:
    with pytest.raises(TranscriptionError, match="max_seconds"):
        await transcribe(note(b"OggS", seconds=4000), TranscriptionSettings(url=endpoint.url))
    assert endpoint.uploads == []


@pytest.mark.parametrize(("mime", "name"), [
    ("audio/ogg; codecs=opus", "voice.ogg"), ("audio/mpeg", "voice.mp3"),
    ("audio/mp4", "voice.m4a"), ("audio/x-unknown", "voice.ogg")])
def test_file_name(mime: str, name: str) -> None:
    assert file_name(mime) == name
