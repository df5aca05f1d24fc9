"""Voice notes to text: an OpenAI-compatible ``POST /v1/audio/transcriptions`` endpoint (local
whisper servers speak it, as do hosted ones), called with aiohttp.

The request is ``multipart/form-data``: ``file`` (the OGG/Opus file as WhatsApp sends it),
``model`` and ``response_format=json``; the answer is ``{"text": "..."}``. A key, if the
endpoint needs one, goes as ``Authorization: Bearer`` (``TRANSCRIPTION_API_KEY`` in
worker.env). Whatever goes wrong raises :class:`TranscriptionError` with the reason; the
engine then answers the voice note as not supported and logs the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.whatsapp.events import Audio
from wabridge.config import TranscriptionConfig
from wabridge.errors import TranscriptionError

__all__ = ["TranscriptionError", "TranscriptionSettings", "file_name", "refusal", "transcribe",
           "transcriber"]

_EXTENSIONS = {"audio/ogg": "ogg", "audio/mpeg": "mp3", "audio/mp4": "m4a", "audio/aac": "aac",
               "audio/wav": "wav", "audio/webm": "webm", "audio/amr": "amr"}


@dataclass(frozen=True)
class TranscriptionSettings:
    url: str  # the endpoint; "" -> not configured
    model: str = "whisper-1"
    api_key: str | None = None
    max_seconds: float = 600.0
    max_bytes: int = 16_000_000
    timeout: float = 60.0


def refusal(audio: Audio, settings: TranscriptionSettings) -> str | None:
    """Why ``audio`` is not sent at all (pure), or None."""
    if not settings.url:
        return "transcription is not configured (transcription.url is empty)"
    if len(audio.data) > settings.max_bytes:
        return (f"the audio is {len(audio.data)} bytes, more than transcription.max_bytes = "
                f"{settings.max_bytes}")
    if audio.seconds > settings.max_seconds:
        return (f"the audio is {audio.seconds:g} s long, more than transcription.max_seconds "
                f"= {settings.max_seconds:g}")
    return None


def file_name(mime_type: str) -> str:
    """The upload's file name: endpoints tell the format by its extension."""
    base = mime_type.partition(";")[0].strip().lower()
    return f"voice.{_EXTENSIONS.get(base, 'ogg')}"


async def transcribe(audio: Audio, settings: TranscriptionSettings) -> str:
    """The words of ``audio``; raises :class:`TranscriptionError`."""
    reason = refusal(audio, settings)
    if reason is not None:
        raise TranscriptionError(reason)
    import aiohttp  # noqa: PLC0415 - off the worker's start-up path (tests/test_startup_imports.py)

    form = aiohttp.FormData()
    form.add_field("file", audio.data, filename=file_name(audio.mime_type),
                   content_type=audio.mime_type.partition(";")[0].strip() or "audio/ogg")
    form.add_field("model", settings.model)
    form.add_field("response_format", "json")
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http, \
                http.post(settings.url, data=form, headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                raise TranscriptionError(f"the endpoint answered HTTP {resp.status}: {body}")
            answer = await resp.json(content_type=None)
    except TimeoutError:
        raise TranscriptionError(f"no answer within transcription.timeout = "
                                 f"{settings.timeout:g} s") from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise TranscriptionError(f"the endpoint could not be used: {exc}") from None
    text = answer.get("text") if isinstance(answer, dict) else None
    if not isinstance(text, str):
        raise TranscriptionError("the endpoint's answer has no \"text\"")
    return text.strip()


def transcriber(cfg: TranscriptionConfig, api_key: str | None
                ) -> Callable[[Audio], Awaitable[str]]:
    """What the engine calls for a voice note: :func:`transcribe` with the configured
    endpoint, and its key (``TRANSCRIPTION_API_KEY`` from worker.env)."""
    settings = TranscriptionSettings(
        url=cfg.url, model=cfg.model, api_key=api_key or None, max_seconds=cfg.max_seconds,
        max_bytes=cfg.max_bytes, timeout=cfg.timeout)
    return functools.partial(transcribe, settings=settings)
