"""neonize (whatsmeow) events -> :mod:`agent.whatsapp.events`: pure functions, no I/O.

Every function here takes the library's protobuf objects (or the test fake's, built from the
same protobufs) and returns frozen typed events; nothing here holds a client, a thread or a
lock. The runtime (:mod:`agent.whatsapp.neonize_backend`) calls them on its event thread.

JIDs: ``<digits>@s.whatsapp.net`` (phone number, "PN"), ``<digits>@lid`` (WhatsApp's hidden
"LID" for the same person), ``<digits>-<digits>@g.us`` or ``120363…@g.us`` (groups),
``status@broadcast``, ``<id>@newsletter``; a device suffix ``:12`` is dropped everywhere.
The canonical chat id prefers the PN JID when the event carries both (``SenderAlt`` /
``RecipientAlt``), so one contact keeps one chat id whatever addressing mode WhatsApp picked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.whatsapp.events import (
    LIBRARY_STOPPED,
    Audio,
    ChatExpiration,
    ClientOutdated,
    Connected,
    ConnectFailure,
    Disconnected,
    Event,
    Image,
    IncomingMessage,
    LoggedOut,
    QrCode,
    QrExpired,
    StreamError,
    StreamReplaced,
    TemporaryBan,
    Undecryptable,
)
from wabridge import logs

log = logs.get("wabridge.whatsapp.neonize")

PN_SERVER = "s.whatsapp.net"
LID_SERVER = "lid"
GROUP_SERVER = "g.us"
BROADCAST_SERVER = "broadcast"
NEWSLETTER_SERVER = "newsletter"

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # larger images are reported as unsupported media
MAX_AUDIO_BYTES = 16 * 1024 * 1024  # WhatsApp's own limit; transcription.max_bytes may be lower

# ConnectFailureReason names (neonize.proto) that void the session: whatsmeow deletes its store
# for exactly these (401, 403, 406: ``ConnectFailureReason.IsLoggedOut``). Every other reason
# keeps the session; :mod:`agent.outcomes` decides by the reason's code (409 BAD_USER_AGENT
# is "upgrade", not "re-scan").
PERMANENT_FAILURES = frozenset({"LOGGED_OUT", "MAIN_DEVICE_GONE", "UNKNOWN_LOGOUT"})

# Message fields that carry nothing to answer: reactions, receipts of all kinds, key
# distribution, edits/revokes (protocolMessage), poll votes, pins, keep-in-chat.
_IGNORED_CONTENT = (
    "reactionMessage",
    "encReactionMessage",
    "protocolMessage",
    "senderKeyDistributionMessage",
    "fastRatchetKeySenderKeyDistributionMessage",
    "pollUpdateMessage",
    "keepInChatMessage",
    "pinInChatMessage",
    "messageContextInfo",
    "encCommentMessage",
    "encEventResponseMessage",
)
# Wrappers whose ``message`` field holds the real content (whatsmeow unwraps most already).
_WRAPPERS = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
    "deviceSentMessage",
)
# Content we cannot answer, by field -> the ``unsupported_media`` kind.
_UNSUPPORTED_KINDS = {
    "stickerMessage": "sticker",
    "lottieStickerMessage": "sticker",
    "ptvMessage": "video",
    "locationMessage": "location",
    "liveLocationMessage": "location",
    "contactMessage": "contact",
    "contactsArrayMessage": "contact",
    "pollCreationMessage": "poll",
    "pollCreationMessageV2": "poll",
    "pollCreationMessageV3": "poll",
    "pollCreationMessageV4": "poll",
    "pollCreationMessageV5": "poll",
    "pollCreationMessageV6": "poll",
    "pollResultSnapshotMessage": "poll",
    "pollResultSnapshotMessageV3": "poll",
    "buttonsResponseMessage": "button reply",
    "templateButtonReplyMessage": "button reply",
    "listResponseMessage": "list reply",
    "interactiveResponseMessage": "interactive reply",
    "eventMessage": "event",
    "eventInviteMessage": "event",
    "groupInviteMessage": "group invite",
    "newsletterAdminInviteMessage": "channel invite",
    "newsletterFollowerInviteMessageV2": "channel invite",
    "productMessage": "product",
    "orderMessage": "order",
}
BOT_SERVER = "bot"


# --------------------------------------------------------------------------------------------
# Translation of library events (pure)


@dataclass(frozen=True)
class LoginStatus:
    """neonize's login-status callback: ``"success"``, ``"timeout"``, ``"err-…"``."""

    status: str


@dataclass(frozen=True)
class Me:
    """The linked account, from neonize's ``Device`` (``client.me`` / ``client.get_me()``)."""

    jid: str  # "<phone>@s.whatsapp.net"
    phone: str
    lid: str = ""  # "<lid>@lid" when known
    push_name: str = ""


def me_from_device(device: Any) -> Me | None:
    """``neonize.proto.Neonize_pb2.Device`` -> :class:`Me` (None before pairing)."""
    if device is None or not device.HasField("JID") or not device.JID.User:
        return None
    lid = jid_to_str(device.LID) if device.HasField("LID") and device.LID.User else ""
    return Me(jid=jid_to_str(device.JID), phone=device.JID.User, lid=lid, push_name=device.PushName)


def jid_to_str(jid: Any) -> str:
    """A neonize ``JID`` as ``user@server`` without agent/device parts."""
    if not jid.User:
        return text_of(jid.Server)
    return f"{text_of(jid.User)}@{text_of(jid.Server)}"


def split_jid(value: str) -> tuple[str, str]:
    """``"4917…:12@s.whatsapp.net"`` -> ``("4917…", "s.whatsapp.net")``; bare digits are PN."""
    user, sep, server = value.partition("@")
    if not sep:
        server = PN_SERVER
    user = user.split(":", 1)[0].split(".", 1)[0]
    return user, server


Downloader = Callable[[Any], bytes | None]
LidResolver = Callable[[str], str | None]  # LID user part -> phone digits, or None


def text_of(value: Any) -> str:
    """A protobuf string field as ``str``. Go does not validate proto2 strings, so one that is
    not UTF-8 reaches Python as ``bytes``: decoded with U+FFFD for the bad bytes, never
    dropped (the message has already been acknowledged to WhatsApp)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def translate(
    event: Any,
    *,
    me: Me | None = None,
    download: Downloader | None = None,
    now: float | None = None,
    resolve: LidResolver | None = None,
) -> Event | None:
    """Turn one neonize event into a typed event, or None when it means nothing to the agent.

    ``event`` is a protobuf event of ``neonize.proto.Neonize_pb2``, the QR callback's payload
    (``bytes``/``str``) or a :class:`LoginStatus`. ``me`` is the linked account (for Connected
    and mentions), ``download`` fetches an image message's bytes (None: images are reported as
    unsupported), ``now`` is the clock for ban expiry, ``resolve`` maps a LID user to its
    phone number (the library's LID store; None when unknown).

    Table:
      QR bytes / QR event      -> QrCode(raw "2@…" string)
      LoginStatus "timeout"    -> QrExpired;  "err-client-outdated" -> ClientOutdated;
      other "err-…"            -> ConnectFailure(permanent=False);  "success" -> None
      PairStatus SUCCESS       -> None (Connected follows);  ERROR -> ConnectFailure
      Connected                -> Connected(me)
      KeepAliveTimeout         -> Disconnected("keepalive timeout …")
      KeepAliveRestored        -> Connected(me)
      Disconnected             -> Disconnected("disconnected")
      LoggedOut                -> LoggedOut(reason)
      StreamReplaced           -> StreamReplaced
      TemporaryBan             -> TemporaryBan(reason, now + Expire seconds)
      ConnectFailure           -> ConnectFailure(reason, permanent by PERMANENT_FAILURES,
                                  code = the reason's name in lower case)
      ClientOutdated           -> ClientOutdated
      StreamError              -> StreamError(code)
      UndecryptableMessage     -> Undecryptable(chat, sender, id)  (a message that is lost)
      Message                  -> IncomingMessage, ChatExpiration (the chat's disappearing
                                  timer changed), or None (see :func:`translate_message`)
      anything else            -> None
    """
    if isinstance(event, bytes | str):
        code = event.decode("utf-8", "replace") if isinstance(event, bytes) else event
        return QrCode(code) if code else None
    if isinstance(event, LoginStatus):
        return _translate_login_status(event.status)
    descriptor = getattr(event, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "")
    clock = time.time() if now is None else now
    match name:
        case "neonize.QR":
            # the first non-empty code: an empty one is nothing to show
            return next((QrCode(c) for c in event.Codes if c), None)
        case "neonize.PairStatus":
            if _enum_name(event, "Status") == "SUCCESS":
                return None
            return ConnectFailure(
                reason=f"pairing failed: {event.Error or 'unknown'}", permanent=False
            )
        case "neonize.Connected" | "neonize.KeepAliveRestored":
            if me is None:
                return Connected(jid="", phone="")
            return Connected(jid=me.jid, phone=me.phone, push_name=me.push_name)
        case "neonize.KeepAliveTimeout":
            return Disconnected(reason=f"keepalive timeout ({event.ErrorCount} errors)")
        case "neonize.Disconnected":
            return Disconnected(reason="disconnected")
        case "neonize.LoggedOut":
            reason = _enum_name(event, "Reason").lower() if event.HasField("Reason") else ""
            if event.OnConnect:
                reason = f"{reason} (on connect)".strip()
            return LoggedOut(reason=reason)
        case "neonize.StreamReplaced":
            return StreamReplaced()
        case "neonize.TemporaryBan":
            reason = _enum_name(event, "Code").lower() if event.HasField("Code") else "unknown"
            expires_at = clock + event.Expire if event.Expire > 0 else None
            return TemporaryBan(reason=reason, expires_at=expires_at)
        case "neonize.ConnectFailure":
            code_name = _enum_name(event, "Reason") if event.HasField("Reason") else "GENERIC"
            reason = code_name.lower() + (f": {event.Message}" if event.Message else "")
            return ConnectFailure(reason=reason, permanent=code_name in PERMANENT_FAILURES,
                                  code=code_name.lower())
        case "neonize.ClientOutdated":
            return ClientOutdated()
        case "neonize.StreamError":
            return StreamError(code=text_of(event.Code))
        case "neonize.UndecryptableMessage":
            source = event.Info.MessageSource
            return Undecryptable(
                chat_id=canonical_chat_id(source, me=me, resolve=resolve),
                sender=canonical_sender(source, me=me, resolve=resolve),
                wa_id=text_of(event.Info.ID),
                unavailable=bool(event.IsUnavailable),
            )
        case "neonize.Message":
            return translate_message(event, me=me, download=download, resolve=resolve)
    return None


def connect_ended(error: str | None) -> ConnectFailure:
    """What it means that neonize's ``connect()`` returned without our ``stop()`` (pure).

    ``error`` is the text ``connect()`` raised (None: it returned). When Go cannot serialize
    an event it received (protobuf: "required field … not set", e.g. a TemporaryBan code or a
    ConnectFailure reason neonize's encoder does not map), neonize's event loop ends and
    ``connect()`` raises: that event was WhatsApp refusing us, and a new process would be
    refused the same way, so it is ``LIBRARY_STOPPED`` (the worker stops; the raw text goes on
    the document). Anything else is an ordinary, non-permanent failure (a fresh process may
    connect).
    """
    if error is None:
        return ConnectFailure(reason="the WhatsApp client stopped", permanent=False)
    if "required field" in error:
        return ConnectFailure(reason=error, permanent=False, code=LIBRARY_STOPPED)
    return ConnectFailure(reason=f"connect failed: {error}", permanent=False)


def _translate_login_status(status: str) -> Event | None:
    if status == "timeout":
        return QrExpired()
    if status == "err-client-outdated":
        return ClientOutdated()
    if status.startswith("err"):
        return ConnectFailure(reason=f"login failed: {status}", permanent=False)
    return None


def _enum_name(message: Any, field: str) -> str:
    enum_type = message.DESCRIPTOR.fields_by_name[field].enum_type
    value = getattr(message, field)
    found = enum_type.values_by_number.get(value)
    return str(found.name) if found is not None else str(value)


def translate_message(
    event: Any,
    *,
    me: Me | None = None,
    download: Downloader | None = None,
    resolve: LidResolver | None = None,
) -> IncomingMessage | ChatExpiration | None:
    """A neonize ``Message`` event -> IncomingMessage, or None for what must not be answered.

    Ignored (None): ``status@broadcast`` and other broadcasts, newsletters, edits and revokes,
    reactions, protocol messages (key distribution, history sync, deletes…), poll votes, and
    messages with no content we know. A protocol message that changes the chat's disappearing
    timer becomes :class:`ChatExpiration`. Text comes from ``conversation``,
    ``extendedTextMessage.text`` or a caption; ``contextInfo`` gives the quoted text, the
    mentions and the chat's disappearing timer (``expiration``). Images are downloaded with
    ``download``; other kinds set ``unsupported_media`` (``_UNSUPPORTED_KINDS``: audio, video,
    documents, stickers, locations, contacts, polls, button/list replies, events, invites…);
    an audio message is downloaded too (``audio``) for transcription
    and keep their caption as text. Strings Go sent as invalid UTF-8 are decoded with
    replacement characters (:func:`text_of`).
    """
    info = event.Info
    source = info.MessageSource
    chat = source.Chat
    if chat.Server in (BROADCAST_SERVER, NEWSLETTER_SERVER):
        return None
    if event.IsEdit or info.Edit:
        return None
    content = _unwrap(event.Message)
    if any(_has(content, name) for name in ("reactionMessage", "encReactionMessage")):
        return None
    if _has(content, "protocolMessage"):
        proto = content.protocolMessage
        if proto.type == proto.EPHEMERAL_SETTING:
            return ChatExpiration(chat_id=canonical_chat_id(source, me=me, resolve=resolve),
                                  seconds=int(proto.ephemeralExpiration))
        return None

    text = ""
    images: tuple[Image, ...] = ()
    audio: Audio | None = None
    unsupported = ""
    context: Any = None
    if content.conversation:
        text = text_of(content.conversation)
    elif _has(content, "extendedTextMessage"):
        text = text_of(content.extendedTextMessage.text)
        context = _context(content.extendedTextMessage)
    elif _has(content, "imageMessage"):
        image = content.imageMessage
        text = text_of(image.caption)
        context = _context(image)
        data = _download_image(content, download)
        if data is None:
            unsupported = "image"
        else:
            images = (Image(mime_type=text_of(image.mimetype) or "image/jpeg", data=data,
                            caption=text),)
    elif _has(content, "videoMessage"):
        text = text_of(content.videoMessage.caption)
        context = _context(content.videoMessage)
        unsupported = "video"
    elif _has(content, "documentMessage"):
        text = text_of(content.documentMessage.caption)
        context = _context(content.documentMessage)
        unsupported = "document"
    elif _has(content, "audioMessage"):
        voice = content.audioMessage
        context = _context(voice)
        unsupported = "voice" if voice.PTT else "audio"  # until transcribed (agent.engine)
        data = _download(content, download, voice.fileLength, MAX_AUDIO_BYTES, "audio")
        if data is not None:
            audio = Audio(mime_type=text_of(voice.mimetype) or "audio/ogg; codecs=opus",
                          data=data, seconds=float(voice.seconds), voice=bool(voice.PTT))
    else:
        for name, kind in _UNSUPPORTED_KINDS.items():
            if _has(content, name):
                unsupported = kind
                context = _context(getattr(content, name))
                break
        else:
            return None  # nothing we know (key distribution, placeholders, bot internals…)

    quoted_text = ""
    mentioned = False
    expiration: int | None = None
    own_users = {split_jid(j)[0] for j in (me.jid, me.lid) if j} if me else set()
    if context is not None:
        if context.HasField("quotedMessage"):
            quoted_text = _plain_text(_unwrap(context.quotedMessage))
        mentioned_users = {split_jid(text_of(j))[0] for j in context.mentionedJID}
        replied_to_me = (bool(context.stanzaID)
                         and split_jid(text_of(context.participant))[0] in own_users)
        mentioned = bool(own_users & mentioned_users) or replied_to_me
        # a message in a chat without disappearing messages carries 0 (or nothing)
        expiration = int(context.expiration)

    is_group = source.IsGroup or chat.Server == GROUP_SERVER
    return IncomingMessage(
        wa_id=text_of(info.ID),
        chat_id=canonical_chat_id(source, me=me, resolve=resolve),
        sender=canonical_sender(source, me=me, resolve=resolve),
        text=text,
        timestamp=_seconds(info.Timestamp),
        sender_name=text_of(info.Pushname),
        is_group=is_group,
        from_me=source.IsFromMe,
        mentioned=mentioned,
        quoted_text=quoted_text,
        images=images,
        unsupported_media=unsupported,
        expiration=expiration,
        audio=audio,
    )


def unreadable(event: Any) -> IncomingMessage | None:
    """What is left of a message whose translation failed: who sent it, when, and a note
    that it could not be read (answered like any unsupported kind)."""
    try:
        info = event.Info
        source = info.MessageSource
        return IncomingMessage(
            wa_id=text_of(info.ID), chat_id=canonical_chat_id(source),
            sender=canonical_sender(source), text="", timestamp=_seconds(info.Timestamp),
            is_group=bool(source.IsGroup), from_me=bool(source.IsFromMe),
            unsupported_media="garbled",
        )
    except Exception:  # nothing readable at all
        log.exception("whatsapp.message_lost")
        return None


def _pn_of_lid(user: str, me: Me | None, resolve: LidResolver | None) -> str | None:
    """The phone number behind a LID user: the account's own LID is the account's number;
    others are looked up in the library's LID store (``resolve``)."""
    if me is not None and me.lid and split_jid(me.lid)[0] == user:
        return me.phone
    if resolve is None:
        return None
    try:
        return resolve(user) or None
    except Exception as exc:  # noqa: BLE001 - an unknown LID stays a LID
        log.debug("whatsapp.lid_lookup_failed", lid=user, error=str(exc))
        return None


def _canonical(jid: Any, alt: Any, me: Me | None, resolve: LidResolver | None) -> str:
    """``jid`` without device, PN preferred: its PN alt when the event has one, else the
    LID store's answer, else the JID as it is."""
    if jid.Server != LID_SERVER:
        return jid_to_str(jid)
    if alt.Server == PN_SERVER and alt.User:
        return jid_to_str(alt)
    pn = _pn_of_lid(text_of(jid.User), me, resolve)
    return f"{pn}@{PN_SERVER}" if pn else jid_to_str(jid)


def canonical_chat_id(source: Any, *, me: Me | None = None,
                      resolve: LidResolver | None = None) -> str:
    """The chat's JID, PN preferred, so one person is one chat whatever addressing WhatsApp
    picked: a 1:1 chat addressed by LID is named by the PN JID the event carries for the other
    party (``SenderAlt`` for inbound, ``RecipientAlt`` for our own messages), else by the LID
    store's answer; the account's own LID (the "message yourself" chat, which comes without
    ``RecipientAlt``) is the account's own number. Groups are their ``@g.us`` JID."""
    chat = source.Chat
    if source.IsGroup:
        return jid_to_str(chat)
    alt = source.RecipientAlt if source.IsFromMe else source.SenderAlt
    return _canonical(chat, alt, me, resolve)


def canonical_sender(source: Any, *, me: Me | None = None,
                     resolve: LidResolver | None = None) -> str:
    """The sender's JID without device, PN preferred (``SenderAlt``, the LID store)."""
    sender = source.Sender
    if sender.Server != PN_SERVER and source.SenderAlt.Server == PN_SERVER:
        return jid_to_str(source.SenderAlt)
    return _canonical(sender, source.SenderAlt, me, resolve)


def _has(message: Any, field: str) -> bool:
    try:
        return bool(message.HasField(field))
    except ValueError:  # not a message field of this type
        return False


def _unwrap(content: Any) -> Any:
    for _ in range(5):
        for wrapper in _WRAPPERS:
            if _has(content, wrapper) and _has(getattr(content, wrapper), "message"):
                content = getattr(content, wrapper).message
                break
        else:
            return content
    return content


def _context(part: Any) -> Any:
    return part.contextInfo if _has(part, "contextInfo") else None


def _plain_text(content: Any) -> str:
    if content.conversation:
        return text_of(content.conversation)
    if _has(content, "extendedTextMessage"):
        return text_of(content.extendedTextMessage.text)
    for name in ("imageMessage", "videoMessage", "documentMessage"):
        if _has(content, name):
            return text_of(getattr(content, name).caption)
    return ""


def _seconds(timestamp: int) -> float:
    """neonize sends ``MessageInfo.Timestamp`` in milliseconds (``UnixMilli``); accept seconds."""
    if timestamp <= 0:
        return time.time()
    if timestamp > 100_000_000_000:
        return timestamp / 1000.0
    return float(timestamp)


def _download_image(content: Any, download: Downloader | None) -> bytes | None:
    return _download(content, download, content.imageMessage.fileLength, MAX_IMAGE_BYTES,
                     "image")


def _download(content: Any, download: Downloader | None, length: int, limit: int, kind: str
              ) -> bytes | None:
    """A media message's bytes, or None (no downloader, larger than ``limit``, failed)."""
    if download is None or length > limit:
        return None
    try:
        data = download(content)
    except Exception as exc:  # noqa: BLE001 - any library failure means "no media"
        log.warning(f"whatsapp.{kind}_download_failed", error=str(exc))
        return None
    return data or None
