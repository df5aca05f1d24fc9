"""Contract driver for the ``neonize`` backend, played by the fake neonize client.

The real :class:`NeonizeBackend` runs against :mod:`fakes.fake_neonize` (neonize's Python API
with neonize's real protobuf events; no Go client, no network). The driver is "WhatsApp":

- ``scan_latest_qr`` makes the newest client that showed a QR code pair (login status
  ``success``, ``PairStatus``, ``Connected``) and marks its store as holding a session, so a
  restarted backend with the same state dir connects without a QR;
- ``contact_sends`` emits a ``Message`` event the way current WhatsApp addresses it: LID
  addressing with the phone-number JID in ``SenderAlt`` (1:1 chats and groups alike), mentions
  as LIDs, images downloadable through the fake's ``download_any``;
- ``contact_inbox`` reads what the backend handed to ``send_message``/``reply_message``;
- ``trigger`` emits ``LoggedOut``/``StreamReplaced``/``TemporaryBan``/``ClientOutdated``/
  ``Disconnected`` (followed by whatsmeow's automatic reconnect, ``Connected``).

Rule violations the fake noticed (two clients at once, ``connect()`` retried) fail the test at
exit.
"""

from __future__ import annotations

import asyncio
import hashlib
from types import TracebackType
from typing import Any, Self

from fakes import fake_neonize as fn

from agent.whatsapp.base import BackendContext, WhatsAppBackend
from agent.whatsapp.events import Image
from agent.whatsapp.neonize_backend import NeonizeBackend

from . import OUTCOMES


def lid_for(phone: str) -> str:
    """A stable 15-digit LID for a contact's phone (WhatsApp's hidden user id)."""
    digest = int(hashlib.sha256(phone.encode()).hexdigest(), 16)
    return "2" + str(digest)[:14]


def group_jid(name: str) -> str:
    """A group JID like WhatsApp's (``120363…@g.us``) for a driver group name."""
    digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
    return f"120363{str(digest)[:12]}@g.us"


class NeonizeDriver:
    name = "neonize"
    account_phone = fn.ACCOUNT_PHONE
    event_timeout = 5.0

    def __init__(self) -> None:
        self.world = fn.FakeWorld(account_phone=self.account_phone)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.world.close()
        if exc_type is None and self.world.violations:
            raise AssertionError(f"neonize rules broken: {self.world.violations}")

    def make_backend(self, ctx: BackendContext) -> WhatsAppBackend:
        return NeonizeBackend(ctx, client_factory=self.world.factory)

    def _client(self) -> fn.FakeNewClient:
        return self.world.latest

    async def scan_latest_qr(self) -> None:
        showing = [c for c in self.world.clients if c.qr_codes]
        if not showing:
            raise AssertionError("no client is showing a QR code")
        await asyncio.to_thread(showing[-1].scan)

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
        client = self._client()
        sender_lid = lid_for(sender_phone)
        mentions = [f"{self.world.account_lid}@lid"] if mentioned else []
        if image is not None:
            content = fn.image(
                image.caption or text, data=image.data, mimetype=image.mime_type, world=self.world
            )
        elif mentions:
            content = fn.extended_text(text, mentions=mentions)
        else:
            content = fn.text(text)
        if group is not None:
            chat = fn.parse_jid(group_jid(group))
            is_group = True
        else:
            chat = fn.jid(sender_lid, fn.LID)
            is_group = False
        event = fn.message_event(
            content,
            chat=chat,
            sender=fn.jid(sender_lid, fn.LID),
            sender_alt=fn.jid(sender_phone, fn.PN),
            msg_id=msg_id or fn.phone_message_id(),
            group=is_group,
            addressing="LID",
        )
        await asyncio.to_thread(client.emit_message, event)
        return str(event.Info.ID)

    async def owner_sends(self, text: str, *, to: str | None = None) -> str:
        # as whatsmeow reports a message sent from the primary phone in a LID-addressed chat:
        # from us, our own LID as the sender, the other party's phone number in RecipientAlt
        me_lid = fn.jid(self.world.account_lid, fn.LID)
        peer = to or self.world.account_phone
        event = fn.message_event(
            fn.text(text),
            chat=fn.jid(lid_for(to), fn.LID) if to else me_lid,
            sender=me_lid,
            sender_alt=fn.jid(self.world.account_phone, fn.PN),
            recipient_alt=fn.jid(peer, fn.PN),
            msg_id=fn.phone_message_id(),
            from_me=True,
            addressing="LID",
        )
        await asyncio.to_thread(self._client().emit_message, event)
        return str(event.Info.ID)

    async def contact_inbox(self, sender_phone: str) -> list[dict[str, Any]]:
        addresses = {f"{sender_phone}@{fn.PN}", f"{lid_for(sender_phone)}@{fn.LID}"}
        return [
            {"id": sent.id, "text": sent.text, "quoted_id": sent.quoted_id}
            for sent in self.world.sent
            if sent.to in addresses
        ]

    async def trigger(self, outcome: str, **kw: Any) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        client = self._client()
        if outcome == "logout":
            await asyncio.to_thread(client.emit_logged_out)
        elif outcome == "replace":
            await asyncio.to_thread(client.emit_stream_replaced)
        elif outcome == "ban":
            expire = int(kw.get("expires_in", 3600))
            await asyncio.to_thread(client.emit_temporary_ban, "SENT_TOO_MANY_SAME_MESSAGE", expire)
        elif outcome == "outdated":
            await asyncio.to_thread(client.emit_client_outdated)
        else:  # disconnect: whatsmeow reconnects by itself with the same credentials
            await asyncio.to_thread(client.emit_disconnected)
            await asyncio.to_thread(client.emit_connected)


DRIVER = NeonizeDriver
