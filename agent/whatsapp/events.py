"""What a WhatsApp backend reports, as frozen typed objects.

Backends translate their library's events (neonize protobuf events, sim JSON frames) into
these in their own module; the agent core never sees a raw library object.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QrCode:
    """A QR code to show the owner; rotates until scanned or expired."""

    code: str


@dataclass(frozen=True)
class PairingCode:
    """An 8-character code to type on the phone (pairing by phone number)."""

    code: str


@dataclass(frozen=True)
class Connected:
    """The link is up. ``phone`` is digits with country code, no ``+``."""

    jid: str
    phone: str
    push_name: str = ""


@dataclass(frozen=True)
class Disconnected:
    """A transient loss of the link; the library reconnects by itself."""

    reason: str


@dataclass(frozen=True)
class LoggedOut:
    """The phone removed this linked device. The store is void; a new QR scan is needed."""

    reason: str = ""


@dataclass(frozen=True)
class StreamReplaced:
    """Another client took over this session."""


@dataclass(frozen=True)
class TemporaryBan:
    reason: str
    expires_at: float | None  # epoch seconds, or None when unknown


@dataclass(frozen=True)
class ClientOutdated:
    """WhatsApp refuses this client version (HTTP 405): wabridge must be upgraded."""


@dataclass(frozen=True)
class ConnectFailure:
    reason: str
    permanent: bool


@dataclass(frozen=True)
class QrExpired:
    """Every QR code ran out without a scan."""


@dataclass(frozen=True)
class Image:
    mime_type: str
    data: bytes
    caption: str = ""


@dataclass(frozen=True)
class IncomingMessage:
    """A message in one of the linked account's chats: from someone else, or (``from_me``)
    written by the account itself on another of its devices, such as the owner's phone, in
    the self chat or in any chat.

    ``wa_id`` is WhatsApp's message id (unique per chat and sender); ``chat_id`` is the
    canonical chat JID (phone-number JID preferred over LID for the same contact).
    """

    wa_id: str
    chat_id: str
    sender: str
    text: str
    timestamp: float
    sender_name: str = ""
    is_group: bool = False
    from_me: bool = False
    mentioned: bool = False  # the account was @-mentioned or replied to (groups)
    quoted_text: str = ""
    images: tuple[Image, ...] = field(default=())
    unsupported_media: str = ""  # e.g. "audio", "sticker": answered with a polite note


Event = (
    QrCode
    | PairingCode
    | Connected
    | Disconnected
    | LoggedOut
    | StreamReplaced
    | TemporaryBan
    | ClientOutdated
    | ConnectFailure
    | QrExpired
    | IncomingMessage
)
