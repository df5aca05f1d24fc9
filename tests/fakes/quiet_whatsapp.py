"""The parts of a WhatsApp backend that engine tests do not look at: starting, typing,
pairing and stopping do nothing. Subclasses supply ``send_text`` (and
``is_connected``)."""

from __future__ import annotations

from agent.whatsapp.base import Sink, WhatsAppBackend


class QuietWhatsApp(WhatsAppBackend):
    name = "quiet"

    def start(self, sink: Sink) -> None:
        pass

    async def set_typing(self, chat_id: str, typing: bool) -> None:
        pass

    async def pair_phone(self, phone: str) -> None:
        pass

    async def stop(self, timeout: float = 3.0) -> None:
        pass
