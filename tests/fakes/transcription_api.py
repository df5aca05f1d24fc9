"""A fake OpenAI-compatible transcription endpoint (``POST /v1/audio/transcriptions``) on
127.0.0.1, in its own thread, speaking the real multipart protocol: aiohttp parses the upload
the way a whisper server does, and each request is recorded (fields, file name, content type,
bytes, headers). ``answer(upload) -> str | (status, body) | None`` decides the reply
(None: never answer, for timeouts); the default answers a fixed transcript.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web

PATH = "/v1/audio/transcriptions"
TRANSCRIPT = "please deliver the blue cake on Friday"


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    file_field: str = ""
    filename: str = ""
    content_type: str = ""
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


Answer = Callable[[Upload], "str | tuple[int, str] | None"]


class FakeTranscriptionAPI:
    def __init__(self, answer: Answer | None = None) -> None:
        self.answer: Answer = answer or (lambda upload: TRANSCRIPT)
        self.uploads: list[Upload] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fake-transcription",
                                        daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def __enter__(self) -> FakeTranscriptionAPI:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake transcription endpoint did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(PATH, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._ready.set()
        await self._stop.wait()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        upload = Upload(headers=dict(request.headers))
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue  # nested multipart: not part of this protocol
            if part.filename:
                upload.file_field = part.name or ""
                upload.filename = part.filename
                upload.content_type = part.headers.get("Content-Type", "")
                upload.data = bytes(await part.read())
            else:
                upload.fields[part.name or ""] = await part.text()
        self.uploads.append(upload)
        if upload.file_field != "file" or not upload.data:
            return web.json_response({"error": {"message": "no file"}}, status=400)
        answer = self.answer(upload)
        if answer is None:
            await asyncio.sleep(3600)
        if isinstance(answer, tuple):
            status, body = answer
            return web.Response(status=status, text=body)
        return web.Response(text=json.dumps({"text": answer}), content_type="application/json")
