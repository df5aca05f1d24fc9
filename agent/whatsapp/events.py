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


#: ``ConnectFailure.code`` when the library's event loop ended by itself (see agent.outcomes).
LIBRARY_STOPPED = "library_stopped"


@dataclass(frozen=True)
class ConnectFailure:
    """WhatsApp (or the library) refused or ended the connection.

    ``code`` names the cause for :mod:`agent.outcomes` (lower-case whatsmeow
    ``ConnectFailureReason`` names such as ``bad_user_agent``, or ``library_stopped`` when the
    library's event loop ended by itself); ``permanent`` says the session is void (logged
    out), so retrying cannot help and the store must go.
    """

    reason: str
    permanent: bool
    code: str = ""


@dataclass(frozen=True)
class QrExpired:
    """Every QR code ran out without a scan."""


@dataclass(frozen=True)
class Image:
    mime_type: str
    data: bytes
    caption: str = ""


@dataclass(frozen=True)
class Audio:
    """A voice note (``voice``, recorded in the chat) or an audio file, as WhatsApp sends it
    (OGG/Opus for voice notes). ``seconds``: the length the message states (0: unknown)."""

    mime_type: str
    data: bytes
    seconds: float = 0.0
    voice: bool = True


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
    # the chat's disappearing-messages timer in seconds as this message states it (0: off),
    # or None when the message says nothing about it; replies carry the chat's timer
    expiration: int | None = None
    # a voice note or audio file to transcribe (``unsupported_media`` says "voice"/"audio" too,
    # for when it cannot be); dropped from the stored message once transcribed
    audio: Audio | None = None
    transcript: str | None = None  # the audio's words (None: not transcribed)


@dataclass(frozen=True)
class ChatExpiration:
    """The chat's disappearing-messages timer changed (seconds; 0: messages stay)."""

    chat_id: str
    seconds: int


@dataclass(frozen=True)
class Undecryptable:
    """A message arrived that the library could not decrypt: for the user it is lost."""

    chat_id: str
    sender: str
    wa_id: str
    unavailable: bool = False  # WhatsApp says the phone has to resend it (view-once, etc.)


@dataclass(frozen=True)
class StreamError:
    """WhatsApp's server sent a stream error (whatsmeow reconnects by itself)."""

    code: str


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
    | ChatExpiration
    | Undecryptable
    | StreamError
)
