"""A fake of neonize's Python API (``neonize.client.NewClient``) for backend tests.

It has the method names and signatures :mod:`agent.whatsapp.neonize_backend` uses, and it
speaks in neonize's REAL protobuf classes (``neonize.proto.Neonize_pb2`` for events and JIDs,
``neonize.proto.waE2E.WAWebProtobufsE2E_pb2`` for message content), imported through the
backend's logging-neutral :func:`import_neonize`. No Go client is ever created and nothing
touches the network.

Behaviour copied from neonize 0.5.2 / whatsmeow:

- ``connect()`` blocks until ``stop()``; every callback (QR, login status, events) runs on the
  thread that called ``connect()``, one at a time. ``emit_*`` helpers queue work for that
  thread and (by default) wait until it was handled.
- A store that holds a session connects without QR: ``Connected`` right away (after ``me`` is
  set, like neonize's ``Device`` event 0). An empty store shows a QR code.
- ``client.event`` is neonize's own ``neonize.events.Event``: handlers are registered with
  ``client.event(EventType)(fn)`` and ``client.event.qr(fn)``, and every event reaches them
  the way Go hands it over: serialized protobuf bytes passed to ``Event.execute(uuid, ptr,
  size, code)``, which parses them (``FromString``) and dispatches. So what Go may send and
  Python parses differently (a proto2 string that is not UTF-8 arrives as ``bytes``) reaches
  the backend as it would in production. The login-status callback is the name-mangled
  ``_NewClient__onLoginStatus(uuid, status)``.
- When Go cannot serialize an event (a required field neonize's encoder leaves empty), its
  event loop ends and ``connect()`` raises ``NeonizeError`` with Go's text:
  ``emit_unserializable``.
- ``get_pn_from_lid`` answers from ``world.lid_to_pn`` (whatsmeow's LID store), an empty JID
  for a LID it does not know.
- ``stop()`` can be told to hang (``world.stop_hangs``), like neonize during a hung dial.

Rule checks: a second client connecting while one runs, or ``connect()`` called twice on one
client, is recorded in ``world.violations`` (the real library crashes or leaks).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.whatsapp.neonize_import import import_neonize

API = import_neonize()
P = API.proto  # neonize.proto.Neonize_pb2
E2E = API.e2e  # neonize.proto.waE2E.WAWebProtobufsE2E_pb2
ENUM = API.enum  # neonize.utils.enum

from neonize import exc as neonize_exc  # noqa: E402 - after the contained import
from neonize.events import EVENT_TO_INT  # noqa: E402
from neonize.events import Event as NeonizeEvent  # noqa: E402
from neonize.proto.waCommon.WACommon_pb2 import MessageKey  # noqa: E402

PN = "s.whatsapp.net"
LID = "lid"
GROUP = "g.us"

ACCOUNT_PHONE = "5511999990001"
ACCOUNT_LID = "203981562134678"
ACCOUNT_NAME = "Wabridge Bot"

# --------------------------------------------------------------------------------------------
# Builders of realistic payloads


def jid(user: str, server: str = PN, device: int = 0) -> Any:
    """A ``neonize.proto.Neonize_pb2.JID`` as whatsmeow encodes it."""
    return P.JID(User=user, Server=server, Device=device, RawAgent=0, Integrator=0, IsEmpty=False)


def jid_str(value: Any) -> str:
    return f"{value.User}@{value.Server}" if value.User else str(value.Server)


def parse_jid(value: str) -> Any:
    user, _, server = value.partition("@")
    return jid(user.split(":")[0], server or PN)


def qr_string() -> str:
    """A QR payload shaped like whatsmeow's: ``ref,noisePub,identityPub,advSecret``."""
    ref = "2@" + base64.b64encode(secrets.token_bytes(60)).decode()
    keys = [base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(3)]
    return ",".join([ref, *keys])


def phone_message_id() -> str:
    """An id as an Android phone makes them: 32 upper-case hex digits."""
    return secrets.token_hex(16).upper()


def web_message_id() -> str:
    """An id as whatsmeow makes them for this linked device: ``3EB0`` + 18 hex digits."""
    return "3EB0" + secrets.token_hex(9).upper()


def device(
    phone: str = ACCOUNT_PHONE, lid: str = ACCOUNT_LID, push_name: str = ACCOUNT_NAME
) -> Any:
    """neonize's ``Device`` (``client.me``): the linked device's own JIDs (device 12)."""
    return P.Device(
        JID=jid(phone, PN, device=12),
        LID=jid(lid, LID, device=12),
        Platform="android",
        BussinessName="",
        PushName=push_name,
        Initialized=True,
    )


def text(body: str) -> Any:
    return E2E.Message(conversation=body)


def extended_text(
    body: str,
    *,
    quoted_text: str | None = None,
    quoted_id: str = "",
    quoted_participant: str = "",
    mentions: Iterable[str] = (),
) -> Any:
    context = E2E.ContextInfo(mentionedJID=list(mentions))
    if quoted_text is not None:
        context.stanzaID = quoted_id or phone_message_id()
        context.participant = quoted_participant
        context.quotedMessage.CopyFrom(E2E.Message(conversation=quoted_text))
    return E2E.Message(extendedTextMessage=E2E.ExtendedTextMessage(text=body, contextInfo=context))


def _media_fields(data: bytes, kind: str) -> dict[str, Any]:
    media_key = secrets.token_bytes(32)
    path = f"/v/t62.{kind}-24/{secrets.randbelow(10**8)}_{secrets.randbelow(10**15)}_n.enc"
    return {
        "URL": f"https://mmg.whatsapp.net{path}?ccb=11-4&oh=01_{secrets.token_hex(8)}&oe=6700AB12",
        "directPath": path,
        "mediaKey": media_key,
        "fileSHA256": hashlib.sha256(data).digest(),
        "fileEncSHA256": hashlib.sha256(media_key + data).digest(),
        "fileLength": len(data),
        "mediaKeyTimestamp": int(time.time()),
    }


def image(
    caption: str = "",
    *,
    data: bytes = b"\x89PNG\r\n\x1a\n-fake-",
    mimetype: str = "image/jpeg",
    world: FakeWorld | None = None,
) -> Any:
    """An image message; with ``world`` its bytes become downloadable through the fake."""
    fields = _media_fields(data, "7118")
    if world is not None:
        world.media[fields["directPath"]] = data
    return E2E.Message(
        imageMessage=E2E.ImageMessage(
            caption=caption, mimetype=mimetype, height=1280, width=960, **fields
        )
    )


def video(caption: str = "") -> Any:
    fields = _media_fields(b"\x00\x00\x00\x18ftypmp42", "7161")
    return E2E.Message(
        videoMessage=E2E.VideoMessage(caption=caption, mimetype="video/mp4", seconds=7, **fields)
    )


def document(caption: str = "", file_name: str = "invoice.pdf") -> Any:
    fields = _media_fields(b"%PDF-1.7\n", "15962")
    return E2E.Message(
        documentMessage=E2E.DocumentMessage(
            caption=caption,
            fileName=file_name,
            title=file_name,
            mimetype="application/pdf",
            pageCount=1,
            **fields,
        )
    )


def audio(*, ptt: bool = True, data: bytes = b"OggS\x00\x02", world: FakeWorld | None = None
          ) -> Any:
    """A voice note (``ptt``) or audio file; with ``world`` its bytes become downloadable."""
    fields = _media_fields(data, "7114")
    if world is not None:
        world.media[fields["directPath"]] = data
    return E2E.Message(
        audioMessage=E2E.AudioMessage(
            mimetype="audio/ogg; codecs=opus", seconds=4, PTT=ptt, **fields
        )
    )


def sticker() -> Any:
    fields = _media_fields(b"RIFF\x00\x00WEBP", "15575")
    return E2E.Message(
        stickerMessage=E2E.StickerMessage(mimetype="image/webp", height=512, width=512, **fields)
    )


def reaction(
    target_id: str, chat: str, emoji: str = "\N{THUMBS UP SIGN}", *, from_me: bool = True
) -> Any:
    key = MessageKey(remoteJID=chat, fromMe=from_me, ID=target_id)
    return E2E.Message(
        reactionMessage=E2E.ReactionMessage(
            key=key, text=emoji, senderTimestampMS=int(time.time() * 1000)
        )
    )


def protocol_revoke(target_id: str, chat: str) -> Any:
    key = MessageKey(remoteJID=chat, fromMe=False, ID=target_id)
    return E2E.Message(
        protocolMessage=E2E.ProtocolMessage(key=key, type=E2E.ProtocolMessage.REVOKE)
    )


def message_event(
    content: Any,
    *,
    chat: Any,
    sender: Any,
    msg_id: str | None = None,
    push_name: str = "Maria Silva",
    from_me: bool = False,
    group: bool = False,
    sender_alt: Any = None,
    recipient_alt: Any = None,
    timestamp_ms: int | None = None,
    addressing: str = "PN",
) -> Any:
    """neonize's ``Message`` event as ``EncodeEventTypesMessage`` builds it."""
    source = P.MessageSource(
        Chat=chat,
        Sender=sender,
        IsFromMe=from_me,
        IsGroup=group,
        AddressingMode=P.AddressingMode.Value(addressing),
    )
    if sender_alt is not None:
        source.SenderAlt.CopyFrom(sender_alt)
    if recipient_alt is not None:
        source.RecipientAlt.CopyFrom(recipient_alt)
    ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    info = P.MessageInfo(
        MessageSource=source,
        ID=msg_id or phone_message_id(),
        ServerID=0,
        Type="text" if content.conversation or content.HasField("extendedTextMessage") else "media",
        Pushname=push_name,
        Timestamp=ms,
        Category="",
        Multicast=False,
        MediaType="",
        Edit="",
    )
    return P.Message(
        Info=info,
        Message=content,
        IsEphemeral=False,
        IsViewOnce=False,
        IsViewOnceV2=False,
        IsEdit=False,
        Raw=content,
    )


# Events ------------------------------------------------------------------------------------


def pair_success(phone: str = ACCOUNT_PHONE, lid: str = ACCOUNT_LID) -> Any:
    return P.PairStatus(
        ID=jid(phone, PN, device=12),
        BusinessName="",
        Platform="android",
        Status=P.PairStatus.SUCCESS,
    )


def pair_error(error: str = "failed to verify device identity signature") -> Any:
    return P.PairStatus(Status=P.PairStatus.ERROR, Error=error)


def connected() -> Any:
    return P.Connected(status=True)


def disconnected() -> Any:
    return P.Disconnected(status=True)


def keepalive_timeout(errors: int = 3) -> Any:
    return P.KeepAliveTimeout(ErrorCount=errors, LastSuccess=int(time.time()) - 60)


def keepalive_restored() -> Any:
    return P.KeepAliveRestored()


def logged_out(reason: str = "LOGGED_OUT", *, on_connect: bool = False) -> Any:
    return P.LoggedOut(OnConnect=on_connect, Reason=P.ConnectFailureReason.Value(reason))


def stream_replaced() -> Any:
    return P.StreamReplaced()


def temporary_ban(code: str = "SENT_TOO_MANY_SAME_MESSAGE", expire: int = 3600) -> Any:
    return P.TemporaryBan(Code=P.TemporaryBan.TempBanReason.Value(code), Expire=expire)


def connect_failure(reason: str = "SERVICE_UNAVAILABLE", message: str = "") -> Any:
    return P.ConnectFailure(Reason=P.ConnectFailureReason.Value(reason), Message=message)


def client_outdated() -> Any:
    return P.ClientOutdated()


# --------------------------------------------------------------------------------------------
# The fake library


@dataclass
class FakeStore:
    """What the SQLite store would hold: whether a session exists, and its device."""

    path: str
    paired: bool = False
    me: Any = None


@dataclass
class Sent:
    """One message the account handed to the fake."""

    id: str
    to: str  # JID string the backend addressed
    text: str
    quoted_id: str | None
    via: str  # "send_message" or "reply_message"
    message: Any  # the E2E Message that would go out


@dataclass
class FakeWorld:
    """Shared state of every fake client in a test: stores by path, media, recordings."""

    account_phone: str = ACCOUNT_PHONE
    account_lid: str = ACCOUNT_LID
    push_name: str = ACCOUNT_NAME
    auto_qr: bool = True
    stop_hangs: float = 0.0  # seconds stop()/disconnect() block, like neonize in a hung dial
    stores: dict[str, FakeStore] = field(default_factory=dict)
    clients: list[FakeNewClient] = field(default_factory=list)
    media: dict[str, bytes] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    fail_sends: str = ""  # when set, sends raise neonize's SendMessageError with this text
    lid_to_pn: dict[str, str] = field(default_factory=dict)  # whatsmeow's LID store: lid -> pn
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def factory(self, db_path: Path) -> FakeNewClient:
        """Stands in for ``default_client_factory``: the store file exists, then a client."""
        db_path.parent.mkdir(parents=True, exist_ok=True)
        db_path.touch()
        return FakeNewClient(str(db_path), world=self)

    def store(self, path: str) -> FakeStore:
        with self.lock:
            return self.stores.setdefault(path, FakeStore(path))

    def me(self) -> Any:
        return device(self.account_phone, self.account_lid, self.push_name)

    @property
    def latest(self) -> FakeNewClient:
        if not self.clients:
            raise AssertionError("no fake neonize client was created")
        return self.clients[-1]

    def close(self) -> None:
        """Let every fake client's connect() and hung stop() return (test teardown)."""
        self.release.set()
        for client in self.clients:
            client.close()


class FakeNewClient:
    """``neonize.client.NewClient`` without Go: same calls, real protobuf payloads."""

    def __init__(
        self,
        name: str,
        jid: Any = None,
        props: Any = None,
        uuid: str | None = None,
        new_device: bool = False,
        *,
        world: FakeWorld | None = None,
    ) -> None:
        self.name = name
        self.jid = jid
        self.device_props = props
        self.new_device = new_device
        self.uuid = (uuid or name).encode()
        self.world = world or FakeWorld()
        self.store = self.world.store(name)
        self.event = NeonizeEvent(self)  # type: ignore[arg-type]  # neonize's own dispatcher
        self.connected = False
        self.me: Any = None
        self.connect_calls = 0
        self.connect_thread: threading.Thread | None = None
        self.handler_threads: list[threading.Thread] = []
        self.qr_codes: list[str] = []
        self.presences: list[tuple[str, Any, Any]] = []
        self.pair_requests: list[str] = []
        self.downloads: list[str] = []
        self.log: list[str] = []  # every call and dispatch, in order
        self._queue: queue.Queue[tuple[Callable[[], None], threading.Event] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._running = False
        self._connect_error = ""  # set: connect() raises NeonizeError with it (Go gave up)
        self.world.clients.append(self)

    # -- neonize API: lifecycle ---------------------------------------------------------------

    def connect(self, proxy_settings: Any = None) -> None:
        self.connect_calls += 1
        if self.connect_calls > 1:
            self.world.violations.append("connect() called twice on one client")
        with self.world.lock:
            others = [c for c in self.world.clients if c is not self and c._running]
            if others:
                self.world.violations.append("a second client connected while one runs")
            self._running = True
        self.connect_thread = threading.current_thread()
        self.log.append("connect")
        try:
            if self.store.paired:
                self.me = self.store.me
                self._handle(lambda: self._dispatch(connected()))
            elif self.world.auto_qr:
                self._handle(self._show_qr)
            while not self._stopped.is_set():
                try:
                    item = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is None:
                    break
                work, done = item
                try:
                    self._handle(work)
                finally:
                    done.set()
        finally:
            self._running = False
            self.connected = False
        if self._connect_error:
            raise neonize_exc.NeonizeError(self._connect_error)

    def _handle(self, work: Callable[[], None]) -> None:
        self.handler_threads.append(threading.current_thread())
        try:
            work()
        except Exception as exc:  # ctypes prints callback errors and carries on
            self.log.append(f"callback raised {exc!r}")

    def stop(self) -> None:
        """Go's ``Stop``: Disconnect (which may hang), then cancel; connect() then returns."""
        self.log.append("stop")
        self._hang()
        self._stopped.set()
        self._running = False
        self._queue.put(None)

    def disconnect(self) -> None:
        self.log.append("disconnect")
        self._hang()
        self.connected = False

    def _hang(self) -> None:
        if self.world.stop_hangs > 0:
            self.world.release.wait(self.world.stop_hangs)

    def close(self) -> None:
        self._stopped.set()
        self._queue.put(None)

    # -- neonize API: state --------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self.connected

    @property
    def is_logged_in(self) -> bool:
        return self.store.paired

    def get_me(self) -> Any:
        return self.me if self.me is not None else P.Device()

    def get_pn_from_lid(self, lid: Any) -> Any:
        self.log.append("get_pn_from_lid")
        pn = self.world.lid_to_pn.get(lid.User)
        return jid(pn, PN) if pn else P.JID()

    # -- neonize API: messaging ----------------------------------------------------------------

    def send_message(
        self,
        to: Any,
        message: Any,
        link_preview: bool = False,
        ghost_mentions: str | None = None,
        mentions_are_lids: bool = False,
        add_msg_secret: bool = False,
    ) -> Any:
        return self._send(to, message, via="send_message")

    def build_reply_message(
        self,
        message: Any,
        quoted: Any,
        link_preview: bool = False,
        reply_privately: bool = False,
        ghost_mentions: str | None = None,
        mentions_are_lids: bool = False,
    ) -> Any:
        body = E2E.ExtendedTextMessage(text=message) if isinstance(message, str) else message
        source = quoted.Info.MessageSource
        sender = (
            source.SenderAlt
            if source.Sender.Server == LID and source.SenderAlt.User
            else source.Sender
        )
        body.contextInfo.MergeFrom(
            E2E.ContextInfo(
                stanzaID=quoted.Info.ID,
                participant=jid_str(sender),
                quotedMessage=quoted.Message,
            )
        )
        name = type(body).__name__
        out = E2E.Message()
        getattr(out, name[0].lower() + name[1:]).MergeFrom(body)
        return out

    def reply_message(
        self,
        message: Any,
        quoted: Any,
        to: Any = None,
        link_preview: bool = False,
        reply_privately: bool = False,
        ghost_mentions: str | None = None,
        mentions_are_lids: bool = False,
        add_msg_secret: bool = False,
    ) -> Any:
        target = to if to is not None else quoted.Info.MessageSource.Chat
        built = self.build_reply_message(message, quoted)
        return self._send(target, built, via="reply_message", quoted_id=quoted.Info.ID)

    def build_reaction(self, chat: Any, sender: Any, message_id: str, reaction: str) -> Any:
        """Like neonize's (whatsmeow's ``BuildReaction``): a ``reactionMessage`` whose key
        names the reacted message (``fromMe`` when the account sent it)."""
        self.log.append("build_reaction")
        from_me = sender.User == self.world.account_phone
        key = MessageKey(remoteJID=jid_str(chat), fromMe=from_me, ID=message_id)
        if not from_me and chat.Server == "g.us":
            key.participant = jid_str(sender)
        return E2E.Message(reactionMessage=E2E.ReactionMessage(
            key=key, text=reaction, senderTimestampMS=int(time.time() * 1000)))

    def send_document(self, to: Any, file: Any, caption: str | None = None,
                      title: str | None = None, filename: str | None = None,
                      mimetype: str | None = None, **_: Any) -> Any:
        """Like neonize's: upload (the bytes land in ``world.media`` under their direct path),
        then a ``documentMessage`` pointing at them."""
        direct = f"/v/t62.7119-24/{web_message_id()}"
        self.world.media[direct] = bytes(file)
        message = E2E.Message(documentMessage=E2E.DocumentMessage(
            directPath=direct, fileLength=len(file), fileName=filename or "", title=title or "",
            mimetype=mimetype or "application/octet-stream", caption=caption or ""))
        return self._send(to, message, via="send_document")

    def send_image(self, to: Any, file: Any, caption: str | None = None, **_: Any) -> Any:
        direct = f"/v/t62.7118-24/{web_message_id()}"
        self.world.media[direct] = bytes(file)
        message = E2E.Message(imageMessage=E2E.ImageMessage(
            directPath=direct, fileLength=len(file), caption=caption or ""))
        return self._send(to, message, via="send_image")

    def _send(self, to: Any, message: Any, *, via: str, quoted_id: str | None = None) -> Any:
        target = parse_jid(to) if isinstance(to, str) else to
        self.log.append(via)
        if self.world.fail_sends:
            raise neonize_exc.SendMessageError(self.world.fail_sends)
        if isinstance(message, str):
            message = E2E.Message(conversation=message)
        body = message.conversation or message.extendedTextMessage.text
        msg_id = web_message_id()
        self.world.sent.append(
            Sent(
                id=msg_id,
                to=jid_str(target),
                text=body,
                quoted_id=quoted_id,
                via=via,
                message=message,
            )
        )
        return P.SendResponse(Timestamp=int(time.time()), ID=msg_id, ServerID=0, Message=message)

    def send_chat_presence(self, jid: Any, state: Any, media: Any) -> None:
        self.log.append("send_chat_presence")
        self.presences.append((jid_str(jid), state, media))

    def download_any(self, message: Any, path: str | None = None) -> bytes | None:
        self.log.append("download_any")
        # as neonize's download_any: whichever media the message carries
        kind = next((k for k in ("imageMessage", "audioMessage", "videoMessage",
                                 "documentMessage", "stickerMessage") if message.HasField(k)),
                    "imageMessage")
        direct = getattr(message, kind).directPath
        self.downloads.append(direct)
        data = self.world.media.get(direct)
        if data is None:
            raise neonize_exc.DownloadError("download failed with status code 404")
        if path:
            Path(path).write_bytes(data)
            return None
        return data

    def PairPhone(
        self,
        phone: str,
        show_push_notification: bool,
        client_name: Any = None,
        client_type: Any = None,
    ) -> str:
        self.log.append("PairPhone")
        self.pair_requests.append(phone)
        if self.store.paired:
            raise neonize_exc.PairPhoneError("already logged in")
        alphabet = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"
        code = "".join(secrets.choice(alphabet) for _ in range(8))
        return f"{code[:4]}-{code[4:]}"

    # neonize's private login-status callback; the backend may replace it on the instance.
    def _NewClient__onLoginStatus(self, uuid: Any, status: Any) -> None:
        self.log.append(f"login-status {status!r}")

    # -- test controls ---------------------------------------------------------------------------

    def run_on_connect_thread(
        self, work: Callable[[], None], *, wait: bool = True, timeout: float = 5.0
    ) -> None:
        done = threading.Event()
        self._queue.put((work, done))
        if wait and not done.wait(timeout):
            raise AssertionError("the fake's connect thread did not handle the work in time")

    def _dispatch(self, event: Any) -> None:
        self.log.append(f"dispatch {type(event).__name__}")
        if type(event) is P.Connected:
            self.connected = True
        elif type(event) in (
            P.Disconnected,
            P.LoggedOut,
            P.StreamReplaced,
            P.TemporaryBan,
            P.ClientOutdated,
            P.ConnectFailure,
        ):
            self.connected = False
        self.execute(EVENT_TO_INT[type(event)], event.SerializePartialToString())

    def execute(self, code: int, data: bytes) -> None:
        """What Go does with an event: its bytes through neonize's ``Event.execute``."""
        buffer = ctypes.create_string_buffer(data, len(data))
        self.event.execute(0, ctypes.addressof(buffer), len(data), code)

    def _show_qr(self, code: str | None = None) -> None:
        code = code or qr_string()
        self.qr_codes.append(code)
        self.log.append("qr")
        self.event._qr(self, code.encode())

    def emit(self, event: Any, **kw: Any) -> None:
        """Dispatch a neonize protobuf event on the connect thread."""
        self.run_on_connect_thread(lambda: self._dispatch(event), **kw)

    def emit_qr(self, code: str | None = None, **kw: Any) -> str:
        code = code or qr_string()
        self.run_on_connect_thread(lambda: self._show_qr(code), **kw)
        return code

    def emit_login_status(self, status: str, **kw: Any) -> None:
        callback = self._NewClient__onLoginStatus
        self.run_on_connect_thread(lambda: callback(0, status.encode()), **kw)

    def scan(self, **kw: Any) -> None:
        """The phone scans the QR: login "success", PairStatus, Device, Connected."""

        def work() -> None:
            self.store.paired = True
            self.store.me = self.world.me()
            self._NewClient__onLoginStatus(0, b"success")
            self._dispatch(pair_success(self.world.account_phone, self.world.account_lid))
            self.me = self.store.me
            self._dispatch(connected())

        self.run_on_connect_thread(work, **kw)

    def emit_connected(self, **kw: Any) -> None:
        def work() -> None:
            self.me = self.store.me or self.world.me()
            self._dispatch(connected())

        self.run_on_connect_thread(work, **kw)

    def emit_message(self, event: Any, **kw: Any) -> None:
        self.emit(event, **kw)

    def emit_raw(self, event_type: type[Any], data: bytes, **kw: Any) -> None:
        """Hand Go's bytes for an event to neonize as they are (e.g. a string that is not
        UTF-8, which Go does not validate in proto2)."""
        self.run_on_connect_thread(lambda: self.execute(EVENT_TO_INT[event_type], data), **kw)

    def emit_unserializable(self, error: str, **kw: Any) -> None:
        """Go failed to serialize an event: its loop ends and ``connect()`` raises ``error``."""

        def work() -> None:
            self._connect_error = error
            self._stopped.set()

        self.run_on_connect_thread(work, **kw)

    def emit_pair_error(
        self, error: str = "failed to verify device identity signature", **kw: Any
    ) -> None:
        self.emit(pair_error(error), **kw)

    def emit_logged_out(self, reason: str = "LOGGED_OUT", **kw: Any) -> None:
        def work() -> None:
            self.store.paired = False
            self.store.me = None
            self._dispatch(logged_out(reason))

        self.run_on_connect_thread(work, **kw)

    def emit_stream_replaced(self, **kw: Any) -> None:
        self.emit(stream_replaced(), **kw)

    def emit_temporary_ban(
        self, code: str = "SENT_TOO_MANY_SAME_MESSAGE", expire: int = 3600, **kw: Any
    ) -> None:
        self.emit(temporary_ban(code, expire), **kw)

    def emit_connect_failure(
        self, reason: str = "SERVICE_UNAVAILABLE", message: str = "", **kw: Any
    ) -> None:
        self.emit(connect_failure(reason, message), **kw)

    def emit_client_outdated(self, **kw: Any) -> None:
        self.emit(client_outdated(), **kw)

    def emit_keepalive_timeout(self, errors: int = 3, **kw: Any) -> None:
        self.emit(keepalive_timeout(errors), **kw)

    def emit_keepalive_restored(self, **kw: Any) -> None:
        self.emit(keepalive_restored(), **kw)

    def emit_disconnected(self, **kw: Any) -> None:
        self.emit(disconnected(), **kw)

    def wait_connecting(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._running:
            if time.monotonic() > deadline:
                raise AssertionError("the backend never called connect()")
            time.sleep(0.005)
