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

The pure translation of library events into :mod:`agent.whatsapp.events` is
:mod:`agent.whatsapp.neonize_translate`; importing neonize and opening its store is
:mod:`agent.whatsapp.neonize_import`. This module is the runtime: the client, its threads and
timeouts. Over 600 lines because it is one state machine around one library client
(connect, QR/pairing, events, sending texts, reactions and media, stopping); its parts share
the client's lock and state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from agent.daemon_thread import await_thread as _await_thread
from agent.whatsapp.base import (
    BackendContext,
    PostgresSessionStore,
    SendError,
    Sink,
    WhatsAppBackend,
)
from agent.whatsapp.events import (
    ClientOutdated,
    Connected,
    ConnectFailure,
    Disconnected,
    Event,
    IncomingMessage,
    LoggedOut,
    PairingCode,
    QrExpired,
    StreamError,
    StreamReplaced,
    TemporaryBan,
    Undecryptable,
)
from agent.whatsapp.neonize_import import (
    ClientFactory,
    NeonizeAPI,
    default_client_factory,
    import_neonize,
)
from agent.whatsapp.neonize_translate import (
    LID_SERVER,
    PN_SERVER,
    LoginStatus,
    Me,
    connect_ended,
    me_from_device,
    split_jid,
    text_of,
    translate,
    translate_message,
    unreadable,
)
from wabridge import logs

log = logs.get("wabridge.whatsapp.neonize")

STORE_FILE = "whatsapp.db"

DOWNLOAD_TIMEOUT = 30.0  # seconds an image download may hold the (serial) event thread
QR_TIMEOUT = 65.0  # seconds without a new QR code (or a scan) before QrExpired
SEND_TIMEOUT = 120.0  # a send stuck longer than this is reported as SendError
PRESENCE_TIMEOUT = 10.0
QUOTE_CACHE_SIZE = 512  # raw message events kept for quoting them exactly
LID_CACHE_SIZE = 4096  # LID -> phone pairs learned from events

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
        self.db_path: Path | PostgresSessionStore = (ctx.session_store
                                                     or ctx.state_dir / STORE_FILE)
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
            message = unreadable(event)
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

        return text_of((await self._call_send(_send, chat_id)).ID)

    async def send_reaction(self, chat_id: str, message: IncomingMessage, emoji: str) -> None:
        """``build_reaction`` (chat, the reacted message's sender and id) + ``send_message``."""
        client = self._client
        if client is None or not self._connected:
            raise SendError("WhatsApp is not connected")
        api = self._api(client)
        chat, sender = self._jid(api, chat_id), self._jid(api, message.sender)

        def _send() -> Any:
            return client.send_message(chat, client.build_reaction(chat, sender, message.wa_id,
                                                                   emoji))

        await self._call_send(_send, chat_id)

    async def send_media(self, chat_id: str, kind: str, data: bytes, filename: str, mime: str,
                         caption: str) -> str:
        """``send_document`` / ``send_image``: neonize uploads the bytes (encrypted) to
        WhatsApp's media servers, then sends the message that points at them."""
        client = self._client
        if client is None or not self._connected:
            raise SendError("WhatsApp is not connected")
        to = self._jid(self._api(client), chat_id)

        def _send() -> Any:
            if kind == "image":
                return client.send_image(to, data, caption=caption or None)
            return client.send_document(to, data, caption=caption or None, title=filename,
                                        filename=filename, mimetype=mime)

        return text_of((await self._call_send(_send, chat_id)).ID)

    async def _call_send(self, send: Callable[[], Any], chat_id: str) -> Any:
        try:
            return await _await_thread(send, self._send_timeout, "neonize-send")
        except TimeoutError as exc:
            raise SendError(f"sending to {chat_id} timed out") from exc
        except Exception as exc:
            raise SendError(f"WhatsApp refused the message to {chat_id}: {exc}") from exc

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
