"""WhatsApp as a linked device through neonize 0.5.2 (whatsmeow in Go, driven over ctypes).

What this module relies on, read from the installed neonize source:

- ``neonize.client.NewClient(name)``: ``name`` is the SQLite store path (Go opens
  ``file:<name>?_foreign_keys=on``) and also the client's uuid. Creating the object does no
  I/O. The store schema is created by whatsmeow's ``sqlstore.New`` (upgrade to the current
  version), which neonize runs on ``connect()`` and also in
  ``ClientFactory.get_all_devices_from_db(path)`` -- we call the latter before connecting, so
  the schema exists (and a broken store fails loudly) before any network traffic.
- ``client.connect()`` blocks until the Go side stops. It runs the Go call on an inner
  **non-daemon** thread named after the uuid, so a Go side that never returns can keep the
  interpreter from exiting: after ``stop()`` reports ``stopped_cleanly == False`` the worker
  should leave with ``os._exit``.
- Events arrive serially on the connect thread: the QR callback (``client.event.qr``, the raw
  ``2@…`` string as bytes), a login-status callback (private, see ``_install_login_status_hook``;
  ``"timeout"`` when every QR code expired) and ``client.event(EventType)`` handlers for the
  protobuf events of ``neonize.proto.Neonize_pb2``. Go queues events before Python sees them
  and has already acknowledged inbound messages, so the message handler hands the translated
  message to the sink first thing.
- After the QR codes run out whatsmeow closes its QR channel and neonize waits forever, so the
  backend reports ``QrExpired`` itself (login status ``"timeout"``, or a timer as fallback).
- ``client.stop()`` (Go ``Stop``: Disconnect, then cancel the context) can block ~55 s during
  a hung dial; ``stop(timeout)`` runs it on a daemon thread and stops waiting.
- Go looks clients up in a map and dereferences them, so every call is refused here unless
  the link is up (or, for pairing by phone, unless a QR code proved the client is registered).

JIDs: ``<digits>@s.whatsapp.net`` (phone number, "PN"), ``<digits>@lid`` (WhatsApp's hidden
"LID" for the same person), ``<digits>-<digits>@g.us`` or ``120363…@g.us`` (groups),
``status@broadcast``, ``<id>@newsletter``; a device suffix ``:12`` is dropped everywhere.
The canonical chat id prefers the PN JID when the event carries both (``SenderAlt`` /
``RecipientAlt``), so one contact keeps one chat id whatever addressing mode WhatsApp picked.

Importing neonize costs ~57 MB (the Go runtime) and calls ``logging.basicConfig`` on the root
logger; it happens lazily in :func:`import_neonize`, which restores the root logger afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import logging
import os
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from unittest import mock

from agent.whatsapp.base import BackendContext, SendError, Sink, WhatsAppBackend
from agent.whatsapp.events import (
    LIBRARY_STOPPED,
    ChatExpiration,
    ClientOutdated,
    Connected,
    ConnectFailure,
    Disconnected,
    Event,
    Image,
    IncomingMessage,
    LoggedOut,
    PairingCode,
    QrCode,
    QrExpired,
    StreamError,
    StreamReplaced,
    TemporaryBan,
    Undecryptable,
)
from wabridge import logs
from wabridge.errors import WabridgeError

log = logs.get("wabridge.whatsapp.neonize")

STORE_FILE = "whatsapp.db"

PN_SERVER = "s.whatsapp.net"
LID_SERVER = "lid"
GROUP_SERVER = "g.us"
BROADCAST_SERVER = "broadcast"
NEWSLETTER_SERVER = "newsletter"

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # larger images are reported as unsupported media
DOWNLOAD_TIMEOUT = 30.0  # seconds an image download may hold the (serial) event thread
QR_TIMEOUT = 65.0  # seconds without a new QR code (or a scan) before QrExpired
SEND_TIMEOUT = 120.0  # a send stuck longer than this is reported as SendError
PRESENCE_TIMEOUT = 10.0
QUOTE_CACHE_SIZE = 512  # raw message events kept for quoting and read receipts
LID_CACHE_SIZE = 4096  # LID -> phone pairs learned from events

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


class NeonizeStoreError(WabridgeError):
    """The WhatsApp session store could not be opened or created."""

    code = "whatsapp_store"
    explanation = ("check the state directory's permissions and free space; a corrupt store "
                   "must be removed (the account then needs a new QR scan)")


# --------------------------------------------------------------------------------------------
# Lazy, logging-neutral import of neonize


@dataclass(frozen=True)
class NeonizeAPI:
    """The parts of neonize this backend (and the test fake) use."""

    client: ModuleType  # neonize.client (NewClient, ClientFactory)
    proto: ModuleType  # neonize.proto.Neonize_pb2 (events, JID, MessageInfo…)
    e2e: ModuleType  # neonize.proto.waE2E.WAWebProtobufsE2E_pb2 (Message, ExtendedTextMessage…)
    enum: ModuleType  # neonize.utils.enum (ChatPresence, ReceiptType, ClientName…)


_api: NeonizeAPI | None = None
_import_lock = threading.Lock()


def import_neonize(go_log_level: int = logging.INFO) -> NeonizeAPI:
    """Import neonize once, leaving the root logger exactly as it was.

    neonize's ``utils/log.py`` calls ``logging.basicConfig(level=INFO, handlers=[…])`` at
    import time; we snapshot the root logger's handlers and level and put them back.
    ``go_log_level`` sets the ``neonize.utils.log`` logger, whose level neonize passes to Go
    on connect as the minimum whatsmeow level forwarded to Python (NOTSET would forward DEBUG).
    """
    global _api  # noqa: PLW0603 - one import per process, like the library itself
    with _import_lock:
        if _api is not None:
            return _api
        with preserved_root_logging(), _closed_popen():
            import neonize.client as client_module  # noqa: PLC0415 - lazy on purpose
            from neonize.proto import Neonize_pb2  # noqa: PLC0415
            from neonize.proto.waE2E import WAWebProtobufsE2E_pb2  # noqa: PLC0415
            from neonize.utils import enum as enum_module  # noqa: PLC0415
        logging.getLogger("neonize.utils.log").setLevel(go_log_level)
        _api = NeonizeAPI(
            client=client_module, proto=Neonize_pb2, e2e=WAWebProtobufsE2E_pb2, enum=enum_module
        )
        return _api


@contextlib.contextmanager
def preserved_root_logging() -> Iterator[None]:
    """Undo whatever the body does to the root logger's handlers and level."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    level = root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def _closed_popen() -> Iterator[None]:
    """Serve neonize's import-time ``os.popen("uname -a").read()`` without a dangling pipe.

    neonize never closes that pipe nor waits for the child, which leaves a zombie and an
    unclosed file behind (ResourceWarnings that surface at some later, random point). While
    neonize is imported, read-mode ``os.popen`` runs the command to completion instead.
    """
    original = os.popen

    def popen(cmd: str, mode: str = "r", buffering: int = -1) -> Any:
        if mode != "r":
            return original(cmd, mode, buffering)
        done = subprocess.run(  # noqa: S602 - the very command neonize asked a shell for
            cmd, shell=True, capture_output=True, text=True, check=False
        )
        return io.StringIO(done.stdout)

    with mock.patch.object(os, "popen", popen):
        yield


def ensure_store(db_path: Path) -> int:
    """Create (or upgrade) the whatsmeow schema in ``db_path``; returns the stored sessions.

    Uses ``ClientFactory.get_all_devices_from_db``: Go opens the store with ``sqlstore.New``,
    which runs the schema upgrades, then lists the devices. Purely local; no network.
    """
    api = import_neonize()
    db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with preserved_root_logging():
            devices = api.client.ClientFactory.get_all_devices_from_db(str(db_path))
    except Exception as exc:  # Go reports "error: …", which neonize fails to parse
        raise NeonizeStoreError(
            f"cannot open the WhatsApp store {db_path}: {exc}",
            explanation=NeonizeStoreError.explanation,
        ) from exc
    if not db_path.exists():
        raise NeonizeStoreError(f"the WhatsApp store {db_path} was not created")
    return len(devices)


def default_client_factory(db_path: Path) -> Any:
    """A real ``neonize.client.NewClient`` whose session store is ``db_path`` (schema ready)."""
    api = import_neonize()
    ensure_store(db_path)
    with preserved_root_logging():
        return api.client.NewClient(str(db_path))


ClientFactory = Callable[[Path], Any]


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
            return QrCode(event.Codes[0]) if event.Codes else None
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
    documents, stickers, locations, contacts, polls, button/list replies, events, invites…)
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
        context = _context(content.audioMessage)
        unsupported = "voice" if content.audioMessage.PTT else "audio"
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
    )


def _unreadable(event: Any) -> IncomingMessage | None:
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
    if download is None:
        return None
    if content.imageMessage.fileLength > MAX_IMAGE_BYTES:
        return None
    try:
        data = download(content)
    except Exception as exc:  # noqa: BLE001 - any library failure means "no image"
        log.warning("whatsapp.image_download_failed", error=str(exc))
        return None
    return data or None


# --------------------------------------------------------------------------------------------
# The backend

T = TypeVar("T")


class NeonizeBackend(WhatsAppBackend):
    """One linked device, one neonize client, one process.

    ``client_factory(db_path)`` builds the client (default: :func:`default_client_factory`,
    a real ``NewClient`` with its schema created); tests pass a fake with the same Python API.
    """

    name = "neonize"

    def __init__(
        self,
        ctx: BackendContext,
        client_factory: ClientFactory | None = None,
        *,
        qr_timeout: float = QR_TIMEOUT,
        download_timeout: float = DOWNLOAD_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.ctx = ctx
        self.db_path = ctx.state_dir / STORE_FILE
        self._factory: ClientFactory = client_factory or default_client_factory
        self._qr_timeout = qr_timeout
        self._download_timeout = download_timeout
        self._send_timeout = send_timeout
        self._client: Any = None
        self._sink: Sink | None = None
        self._lock = threading.Lock()
        self._connected = False
        self._stopping = False
        self._qr_seen = threading.Event()
        self._qr_done = False  # scanned, expired or connected: no more QrExpired
        self._qr_timer: threading.Timer | None = None
        self._me: Me | None = None
        self._raw: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lids: OrderedDict[str, str] = OrderedDict()  # LID user -> phone, from events
        self._connect_thread: threading.Thread | None = None
        self.stopped_cleanly: bool | None = None  # set by stop(): did Go let go in time?

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, sink: Sink) -> None:
        if self._client is not None:
            raise RuntimeError("NeonizeBackend.start() called twice (neonize connects once)")
        self._sink = sink
        self.ctx.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        client = self._factory(self.db_path)
        for event_type in _subscribed_events(import_neonize()):
            client.event(event_type)(self._on_library_event)
        client.event.qr(self._on_qr)
        _install_login_status_hook(client, self._on_login_status)
        self._client = client
        log.info("whatsapp.neonize_connecting", store=str(self.db_path))
        thread = threading.Thread(target=self._run_connect, name="neonize-connect", daemon=True)
        self._connect_thread = thread
        thread.start()

    def _run_connect(self) -> None:
        """The connect thread. ``connect()`` returns only when the Go side stopped: after our
        ``stop()``, or by itself (see :func:`connect_ended`). Either way the link is down from
        here on, and never comes back in this process."""
        error: str | None = None
        try:
            self._client.connect()
        except Exception as exc:  # noqa: BLE001 - reported as an event, never raised
            error = str(exc) or type(exc).__name__
        self._connected = False
        if self._stopping:
            return
        event = connect_ended(error)
        log.error("whatsapp.library_stopped", error=error or "", code=event.code)
        self._emit(event)

    async def stop(self, timeout: float = 3.0) -> None:
        self._stopping = True
        self._connected = False
        self._cancel_qr_timer()
        client = self._client
        if client is None:
            self.stopped_cleanly = True
            return
        try:
            await _await_thread(client.stop, max(timeout, 0.0), "neonize-stop")
        except TimeoutError:
            self.stopped_cleanly = False
            log.warning("whatsapp.stop_timed_out", seconds=timeout)
            return
        except Exception as exc:  # noqa: BLE001 - stopping is best effort
            log.warning("whatsapp.stop_failed", error=str(exc))
        self.stopped_cleanly = True

    def is_connected(self) -> bool:
        return self._connected

    @property
    def me(self) -> Me | None:
        return self._me

    # -- library callbacks (connect thread; serial) -----------------------------------------

    def _on_library_event(self, client: Any, event: Any) -> None:
        try:
            name = event.DESCRIPTOR.full_name
            if name == "neonize.Message":
                self._on_message(event)
                return
            if name in ("neonize.Connected", "neonize.KeepAliveRestored"):
                self._refresh_me(client)
            typed = translate(event, me=self._me, resolve=self._pn_for_lid)
            if isinstance(typed, StreamError | Undecryptable):
                log.warning("whatsapp.stream_error" if isinstance(typed, StreamError)
                            else "whatsapp.undecryptable", **asdict(typed))
            if typed is None:
                if name == "neonize.PairStatus":
                    self._qr_finished()
                return
            self._note_link_state(typed)
            self._emit(typed)
        except Exception:
            log.exception("whatsapp.event_failed")

    def _on_message(self, event: Any) -> None:
        self._learn_lids(event.Info.MessageSource)
        try:
            message = translate_message(event, me=self._me, download=self._download,
                                        resolve=self._pn_for_lid)
        except Exception:
            # The library acknowledged it: keep what can be read rather than lose it.
            log.exception("whatsapp.message_unreadable")
            message = _unreadable(event)
        if message is None:
            return
        sink = self._sink
        if sink is not None:
            try:
                sink(message)  # first: the library already acknowledged it to WhatsApp
            except Exception:
                # Nothing can bring it back: WhatsApp will not deliver it again.
                log.exception("whatsapp.message_lost", chat_id=message.chat_id)
        if isinstance(message, IncomingMessage):
            with self._lock:
                self._raw[(message.chat_id, message.wa_id)] = event
                while len(self._raw) > QUOTE_CACHE_SIZE:
                    self._raw.popitem(last=False)

    def _learn_lids(self, source: Any) -> None:
        """Remember LID -> phone pairs events carry (``SenderAlt``/``RecipientAlt``), so a later
        LID-only message of the same person (even the same message id again) is named by the
        same phone JID before the library's LID store has it."""
        pairs = [(source.Sender, source.SenderAlt)]
        if not source.IsGroup:  # the other party of a 1:1 chat
            pairs.append((source.Chat,
                          source.RecipientAlt if source.IsFromMe else source.SenderAlt))
        for lid, alt in pairs:
            if lid.Server == LID_SERVER and alt.Server == PN_SERVER and lid.User and alt.User:
                with self._lock:
                    self._lids[text_of(lid.User)] = text_of(alt.User)
                    while len(self._lids) > LID_CACHE_SIZE:
                        self._lids.popitem(last=False)

    def _pn_for_lid(self, user: str) -> str | None:
        """A LID user's phone number: learned from events, else whatsmeow's LID store
        (``GetPNFromLID``, exposed by neonize as ``client.get_pn_from_lid``)."""
        with self._lock:
            known = self._lids.get(user)
        if known:
            return known
        client = self._client
        if client is None:
            return None
        api = self._api(client)
        found = client.get_pn_from_lid(
            api.proto.JID(User=user, Server=LID_SERVER, Device=0, RawAgent=0, Integrator=0,
                          IsEmpty=False))
        pn = text_of(found.User) if found is not None and found.User else None
        if pn:
            with self._lock:
                self._lids[user] = pn
        return pn

    def _on_qr(self, client: Any, data: bytes) -> None:
        try:
            typed = translate(data)
            if typed is None or self._qr_done:
                return
            self._qr_seen.set()
            self._arm_qr_timer()
            self._emit(typed)
        except Exception:
            log.exception("whatsapp.qr_failed")

    def _on_login_status(self, status: str) -> None:
        try:
            typed = translate(LoginStatus(status))
            if status == "success":
                self._qr_finished()
            if typed is None:
                return
            if isinstance(typed, QrExpired):
                self._qr_expired()
                return
            self._emit(typed)
        except Exception:
            log.exception("whatsapp.login_status_failed")

    def _refresh_me(self, client: Any) -> None:
        device = getattr(client, "me", None)
        if device is None or not device.HasField("JID"):
            with contextlib.suppress(Exception):
                device = client.get_me()
        me = me_from_device(device)
        if me is not None:
            self._me = me

    def _note_link_state(self, typed: Event) -> None:
        if isinstance(typed, Connected):
            self._connected = True
            self._qr_finished()
        elif isinstance(
            typed,
            Disconnected
            | LoggedOut
            | StreamReplaced
            | TemporaryBan
            | ClientOutdated
            | ConnectFailure,
        ):
            self._connected = False

    def _emit(self, event: Event) -> None:
        sink = self._sink
        if sink is None or (self._stopping and not isinstance(event, IncomingMessage)):
            return
        try:
            sink(event)
        except Exception:
            log.exception("whatsapp.sink_failed", kind=type(event).__name__)

    def _download(self, content: Any) -> bytes | None:
        client = self._client
        data, ok = _call_with_timeout(lambda: client.download_any(content), self._download_timeout)
        if not ok:
            log.warning("whatsapp.image_download_timed_out", seconds=self._download_timeout)
            return None
        return data if isinstance(data, bytes) else None

    # -- QR expiry ---------------------------------------------------------------------------

    def _arm_qr_timer(self) -> None:
        with self._lock:
            if self._qr_timer is not None:
                self._qr_timer.cancel()
            timer = threading.Timer(self._qr_timeout, self._qr_expired)
            timer.daemon = True
            timer.name = "neonize-qr-timeout"
            self._qr_timer = timer
        timer.start()

    def _cancel_qr_timer(self) -> None:
        with self._lock:
            if self._qr_timer is not None:
                self._qr_timer.cancel()
                self._qr_timer = None

    def _qr_finished(self) -> None:
        self._qr_done = True
        self._cancel_qr_timer()

    def _qr_expired(self) -> None:
        with self._lock:
            if self._qr_done:
                return
            self._qr_done = True
        self._cancel_qr_timer()
        self._emit(QrExpired())

    # -- sending -----------------------------------------------------------------------------

    async def send_text(
        self, chat_id: str, text: str, *, quote: IncomingMessage | None, msg_id: str | None = None,
        expiration: int = 0,
    ) -> str:
        """Send through ``send_message`` (plain) or ``reply_message`` (quoting).

        ``msg_id`` cannot be honoured (``honours_message_id`` is False): neonize 0.5.2's Go
        ``SendMessage`` builds its own ``SendRequestExtra`` without an ``ID``, so whatsmeow
        always picks a fresh ``3EB0…`` id and a resend after a crash is a second message. The
        id WhatsApp got is returned. With ``expiration`` the text goes out as an
        ``extendedTextMessage`` whose ``contextInfo.expiration`` is the chat's timer (what
        WhatsApp's own clients send in a disappearing chat).
        """
        client = self._client
        if client is None or not self._connected:
            raise SendError("WhatsApp is not connected")
        api = self._api(client)
        to = self._jid(api, chat_id)
        context = api.e2e.ContextInfo(expiration=expiration) if expiration > 0 else None
        if quote is None:
            if context is None:
                message = api.e2e.Message(conversation=text)
            else:
                message = api.e2e.Message(extendedTextMessage=api.e2e.ExtendedTextMessage(
                    text=text, contextInfo=context))

            def _send() -> Any:
                return client.send_message(to, message)
        else:
            quoted = self._raw_or_synthetic(api, quote)
            body = api.e2e.ExtendedTextMessage(text=text)
            if context is not None:
                body.contextInfo.CopyFrom(context)  # reply_message merges the quote into it

            def _send() -> Any:
                return client.reply_message(body, quoted=quoted, to=to)

        try:
            response = await _await_thread(_send, self._send_timeout, "neonize-send")
        except TimeoutError as exc:
            raise SendError(f"sending to {chat_id} timed out") from exc
        except Exception as exc:
            raise SendError(f"WhatsApp refused the message to {chat_id}: {exc}") from exc
        return text_of(response.ID)

    async def set_typing(self, chat_id: str, typing: bool) -> None:
        client = self._client
        if client is None or not self._connected:
            return
        try:
            api = self._api(client)
            presence = api.enum.ChatPresence
            state = presence.CHAT_PRESENCE_COMPOSING if typing else presence.CHAT_PRESENCE_PAUSED
            media = api.enum.ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT
            jid = self._jid(api, chat_id)
            await _await_thread(
                lambda: client.send_chat_presence(jid, state, media),
                PRESENCE_TIMEOUT,
                "neonize-presence",
            )
        except Exception as exc:  # noqa: BLE001 - best effort by contract
            log.debug("whatsapp.typing_failed", chat_id=chat_id, error=str(exc))

    async def pair_phone(self, phone: str) -> None:
        """Ask WhatsApp for a pairing code (shown while a QR code is pending).

        The client must be registered and connected, which the first QR code proves; Go
        dereferences the client without a nil check otherwise. Failures are reported as a
        non-permanent ConnectFailure.
        """
        if not phone.isdigit():
            raise ValueError("phone must be digits with country code, no '+'")
        client = self._client
        if client is None:
            raise RuntimeError("pair_phone() before start()")
        loop_deadline = time.monotonic() + self._qr_timeout
        while not self._qr_seen.is_set():
            if time.monotonic() > loop_deadline or self._stopping:
                failure = ConnectFailure(
                    reason="pairing by phone: no login session", permanent=False
                )
                self._emit(failure)
                return
            await asyncio.sleep(0.05)
        api = self._api(client)
        client_name = api.enum.ClientName.LINUX
        try:
            code = await _await_thread(
                lambda: client.PairPhone(phone, True, client_name),
                self._send_timeout,
                "neonize-pair",
            )
        except Exception as exc:  # noqa: BLE001 - reported as an event
            self._emit(ConnectFailure(reason=f"pairing by phone failed: {exc}", permanent=False))
            return
        self._emit(PairingCode(str(code)))

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _api(_client: Any) -> NeonizeAPI:
        return import_neonize()

    @staticmethod
    def _jid(api: NeonizeAPI, value: str) -> Any:
        user, server = split_jid(value)
        return api.proto.JID(
            User=user, Server=server, Device=0, RawAgent=0, Integrator=0, IsEmpty=False
        )

    def _raw_or_synthetic(self, api: NeonizeAPI, quote: IncomingMessage) -> Any:
        """The event to quote: the one we received, or one rebuilt from the typed message."""
        with self._lock:
            raw = self._raw.get((quote.chat_id, quote.wa_id))
        if raw is not None:
            return raw
        source = api.proto.MessageSource(
            Chat=self._jid(api, quote.chat_id),
            Sender=self._jid(api, quote.sender),
            IsFromMe=quote.from_me,
            IsGroup=quote.is_group,
        )
        return api.proto.Message(
            Info=api.proto.MessageInfo(MessageSource=source, ID=quote.wa_id),
            Message=api.e2e.Message(conversation=quote.text),
        )


def _subscribed_events(api: NeonizeAPI) -> list[type[Any]]:
    proto = api.proto
    return [
        proto.PairStatus,
        proto.Connected,
        proto.KeepAliveTimeout,
        proto.KeepAliveRestored,
        proto.Disconnected,
        proto.LoggedOut,
        proto.StreamReplaced,
        proto.TemporaryBan,
        proto.ConnectFailure,
        proto.ClientOutdated,
        proto.StreamError,
        proto.UndecryptableMessage,
        proto.Message,
    ]


def _install_login_status_hook(client: Any, callback: Callable[[str], None]) -> None:
    """Route neonize's login-status callback (``"timeout"`` when the QR codes ran out).

    neonize wraps ``self.__onLoginStatus`` (which only prints) in a C callback at connect time;
    the name-mangled instance attribute takes precedence over the method. Absent in other
    versions: the QR timer still reports QrExpired.
    """
    attribute = "_NewClient__onLoginStatus"
    if not hasattr(client, attribute):
        return

    def hook(_uuid: object, status: object) -> None:
        callback(_c_string(status))

    setattr(client, attribute, hook)


def _c_string(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, int) and value:
        return ctypes.string_at(value).decode(errors="replace")
    return ""


def _call_with_timeout(fn: Callable[[], T], timeout: float) -> tuple[T | None, bool]:
    """Run ``fn`` on a daemon thread; (result, True), or (None, False) when it overran."""
    box: list[T] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append(fn())
        except Exception as exc:  # noqa: BLE001 - the caller only needs "no result"
            log.debug("whatsapp.call_failed", error=str(exc))
        finally:
            done.set()

    threading.Thread(target=run, name="neonize-call", daemon=True).start()
    if not done.wait(timeout):
        return None, False
    return (box[0] if box else None), True


async def _await_thread(fn: Callable[[], T], limit: float, name: str) -> T:
    """Await ``fn()`` run on a daemon thread, giving up after ``limit`` seconds (TimeoutError).

    Not ``asyncio.to_thread``: the default executor's threads are joined when ``asyncio.run``
    ends, so one Go call that never returns would hang the worker's exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await asyncio.wait_for(future, limit)
