"""Contract driver for the ``sim`` backend: a real wabridge-sim served in-process.

The sim's aiohttp server runs on the test's event loop, bound to a free 127.0.0.1 port, with
a fast QR rotation (1 s). The driver talks to it over its loopback HTTP API, exactly as a
user's browser or a test would.
"""

from __future__ import annotations

import asyncio
import base64
from types import TracebackType
from typing import Any, Self

import aiohttp

from agent.whatsapp.base import BackendContext, WhatsAppBackend
from agent.whatsapp.events import Image
from agent.whatsapp.sim import SimBackend
from sim.server import SimServer

from . import OUTCOMES


class SimDriver:
    name = "sim"
    account_phone = "5511999990001"
    event_timeout = 5.0

    def __init__(self, *, qr_rotate: float = 1.0, qr_max: int = 6) -> None:
        self.server = SimServer(port=0, qr_rotate=qr_rotate, qr_max=qr_max, tick=0.05)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        await self.server.start()
        self._http = aiohttp.ClientSession(base_url=self.server.base_url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.close()
        await self.server.stop()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def make_backend(self, ctx: BackendContext) -> WhatsAppBackend:
        return SimBackend(ctx, self.server.base_url, backoff_max=0.5)

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One call to the sim's HTTP API: (status, decoded JSON)."""
        assert self._http is not None, "use the driver as an async context manager"
        async with self._http.request(method, path, json=body) as response:
            return response.status, await response.json()

    async def _ok(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.api(method, path, body)
        if status != 200:
            raise AssertionError(f"{method} {path} -> {status} {data}")
        return data

    async def scan_latest_qr(self) -> None:
        for _ in range(3):  # the code may rotate between reading and scanning it
            pending = await self._ok("GET", "/api/qr")
            if not pending:
                raise AssertionError("no device is showing a QR code")
            code = pending[-1]["code"]
            status, data = await self.api(
                "POST", f"/api/phones/{self.account_phone}/scan", {"code": code}
            )
            if status == 200:
                return
            if status != 410:
                raise AssertionError(f"scan failed: {status} {data}")
            await asyncio.sleep(0.05)
        raise AssertionError("every QR code expired before it could be scanned")

    async def contact_sends(
        self,
        sender_phone: str,
        text: str,
        *,
        msg_id: str | None = None,
        image: Image | None = None,
        group: str | None = None,
        mentioned: bool = False,
    ) -> str:
        body: dict[str, Any] = {"from": sender_phone, "to": self.account_phone, "text": text}
        if msg_id is not None:
            body["id"] = msg_id
        if image is not None:
            body["image"] = {
                "mime_type": image.mime_type,
                "data_b64": base64.b64encode(image.data).decode("ascii"),
                "caption": image.caption or text,
            }
        if group is not None:
            body["group"] = group
        if mentioned:
            body["mentions"] = [self.account_phone]
        data = await self._ok("POST", "/api/messages", body)
        return str(data["id"])

    async def owner_sends(self, text: str, *, to: str | None = None) -> str:
        body: dict[str, Any] = {"text": text} if to is None else {"text": text, "to": to}
        data = await self._ok("POST", f"/api/accounts/{self.account_phone}/messages", body)
        return str(data["id"])

    async def contact_inbox(self, sender_phone: str) -> list[dict[str, Any]]:
        return list(await self._ok("GET", f"/api/contacts/{sender_phone}/inbox"))

    async def trigger(self, outcome: str, **kw: Any) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        await self._ok("POST", f"/api/accounts/{self.account_phone}/{outcome}", kw)


DRIVER = SimDriver
