"""The neonize backend: the event table, the backend against the fake, and the real library.

- ``translate`` is checked row by row with neonize's real protobuf events
  (built by :mod:`fakes.fake_neonize`);
- :class:`NeonizeBackend` runs against the fake ``NewClient`` (same Python API, callbacks on
  the connect thread, no Go, no network);
- the real neonize is exercised in fresh interpreters only: its import must not touch the root
  logger, and building a client must create the store schema without any network traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fakes import fake_neonize as fn

from agent import outcomes, policy
from agent.store import Store
from agent.whatsapp import neonize_backend
from agent.whatsapp.base import BackendContext, SendError
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
    PairingCode,
    QrCode,
    QrExpired,
    StreamError,
    StreamReplaced,
    TemporaryBan,
    Undecryptable,
)
from agent.whatsapp.neonize_backend import STORE_FILE, NeonizeBackend
from agent.whatsapp.neonize_translate import (
    LoginStatus,
    Me,
    connect_ended,
    me_from_device,
    translate,
)
from wabridge.errors import ExitCode
from wabridge.status import WorkerState

REPO = Path(__file__).resolve().parents[1]
E = TypeVar("E")

ME = Me(
    jid=f"{fn.ACCOUNT_PHONE}@s.whatsapp.net",
    phone=fn.ACCOUNT_PHONE,
    lid=f"{fn.ACCOUNT_LID}@lid",
    push_name=fn.ACCOUNT_NAME,
)
CONTACT = "5511999990002"
CONTACT_LID = "187654321098765"
GROUP = "120363025246125486@g.us"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR-not-really"
TS_MS = 1_732_530_000_123


# --------------------------------------------------------------------------------------------
# translate: connection events


def test_me_from_device_drops_the_device_part() -> None:
    assert me_from_device(fn.device()) == ME
    assert me_from_device(fn.P.Device()) is None
    assert me_from_device(None) is None


CONNECTION_ROWS: list[tuple[str, Callable[[], Any], Event | None]] = [
    ("qr-callback-bytes", lambda: b"2@abc,def,ghi,jkl", QrCode("2@abc,def,ghi,jkl")),
    ("qr-callback-empty", lambda: b"", None),
    (
        "qr-event",
        lambda: fn.P.QR(Codes=["2@first,x,y,z", "2@second,x,y,z"]),
        QrCode("2@first,x,y,z"),
    ),
    ("qr-event-empty-first", lambda: fn.P.QR(Codes=["", "2@second,x,y,z"]),
     QrCode("2@second,x,y,z")),
    ("qr-event-only-empty", lambda: fn.P.QR(Codes=[""]), None),
    ("login-timeout", lambda: LoginStatus("timeout"), QrExpired()),
    ("login-success", lambda: LoginStatus("success"), None),
    ("login-outdated", lambda: LoginStatus("err-client-outdated"), ClientOutdated()),
    (
        "login-error",
        lambda: LoginStatus("err-scanned-without-multidevice"),
        ConnectFailure("login failed: err-scanned-without-multidevice", permanent=False),
    ),
    ("pair-success", fn.pair_success, None),
    (
        "pair-error",
        lambda: fn.pair_error("bad signature"),
        ConnectFailure("pairing failed: bad signature", permanent=False),
    ),
    (
        "connected",
        fn.connected,
        Connected(jid=ME.jid, phone=fn.ACCOUNT_PHONE, push_name=fn.ACCOUNT_NAME),
    ),
    (
        "keepalive-timeout",
        lambda: fn.keepalive_timeout(3),
        Disconnected("keepalive timeout (3 errors)"),
    ),
    (
        "keepalive-restored",
        fn.keepalive_restored,
        Connected(jid=ME.jid, phone=fn.ACCOUNT_PHONE, push_name=fn.ACCOUNT_NAME),
    ),
    ("disconnected", fn.disconnected, Disconnected("disconnected")),
    ("logged-out", fn.logged_out, LoggedOut("logged_out")),
    (
        "logged-out-main-device-gone-on-connect",
        lambda: fn.logged_out("MAIN_DEVICE_GONE", on_connect=True),
        LoggedOut("main_device_gone (on connect)"),
    ),
    ("stream-replaced", fn.stream_replaced, StreamReplaced()),
    (
        "temporary-ban",
        lambda: fn.temporary_ban("SENT_TOO_MANY_SAME_MESSAGE", 3600),
        TemporaryBan("sent_too_many_same_message", expires_at=1_000_000.0 + 3600),
    ),
    (
        "temporary-ban-no-expiry",
        lambda: fn.temporary_ban("BLOCKED_BY_USERS", 0),
        TemporaryBan("blocked_by_users", expires_at=None),
    ),
    (
        "connect-failure-transient",
        lambda: fn.connect_failure("SERVICE_UNAVAILABLE", "503 from edge"),
        ConnectFailure("service_unavailable: 503 from edge", permanent=False,
                       code="service_unavailable"),
    ),
    (
        "connect-failure-internal",
        lambda: fn.connect_failure("INTERNAL_SERVER_ERROR"),
        ConnectFailure("internal_server_error", permanent=False, code="internal_server_error"),
    ),
    (
        "connect-failure-outdated",
        lambda: fn.connect_failure("CLIENT_OUTDATED"),
        ConnectFailure("client_outdated", permanent=False, code="client_outdated"),
    ),
    (
        "connect-failure-bad-user-agent-keeps-the-session",
        lambda: fn.connect_failure("BAD_USER_AGENT"),
        ConnectFailure("bad_user_agent", permanent=False, code="bad_user_agent"),
    ),
    (
        "connect-failure-logged-out-voids-the-session",
        lambda: fn.connect_failure("LOGGED_OUT"),
        ConnectFailure("logged_out", permanent=True, code="logged_out"),
    ),
    (
        "connect-failure-main-device-gone",
        lambda: fn.connect_failure("MAIN_DEVICE_GONE"),
        ConnectFailure("main_device_gone", permanent=True, code="main_device_gone"),
    ),
    ("client-outdated", fn.client_outdated, ClientOutdated()),
    ("stream-error", lambda: fn.P.StreamError(Code="515"), StreamError(code="515")),
    (
        "undecryptable",
        lambda: fn.P.UndecryptableMessage(
            Info=inbound(fn.text("x"), chat=contact_lid(), sender=contact_lid(2),
                         sender_alt=fn.jid(CONTACT), addressing="LID").Info,
            IsUnavailable=False),
        Undecryptable(chat_id=f"{CONTACT}@s.whatsapp.net", sender=f"{CONTACT}@s.whatsapp.net",
                      wa_id="A1B2C3D4E5F60718293A4B5C6D7E8F90"),
    ),
    ("unrelated-receipt", fn.P.Receipt, None),
    ("unrelated-history-sync", fn.P.HistorySync, None),
    ("not-an-event", lambda: 42, None),
]


@pytest.mark.parametrize(
    ("make", "expected"),
    [pytest.param(make, expected, id=name) for name, make, expected in CONNECTION_ROWS],
)
def test_translate_connection_events(make: Callable[[], Any], expected: Event | None) -> None:
    assert translate(make(), me=ME, now=1_000_000.0) == expected


def test_translate_connected_without_me_still_reports_the_link() -> None:
    assert translate(fn.connected()) == Connected(jid="", phone="")


# --------------------------------------------------------------------------------------------
# translate: messages


def contact_pn() -> Any:
    return fn.jid(CONTACT)


def contact_lid(device: int = 0) -> Any:
    return fn.jid(CONTACT_LID, fn.LID, device)


def inbound(content: Any, **kw: Any) -> Any:
    """A 1:1 message from the contact, PN addressing, unless overridden."""
    kw.setdefault("chat", contact_pn())
    kw.setdefault("sender", fn.jid(CONTACT, fn.PN, device=0))
    kw.setdefault("msg_id", "A1B2C3D4E5F60718293A4B5C6D7E8F90")
    kw.setdefault("timestamp_ms", TS_MS)
    return fn.message_event(content, **kw)


def in_group(content: Any, **kw: Any) -> Any:
    """A group message, LID addressing, the sender's phone JID in SenderAlt."""
    kw.setdefault("chat", fn.parse_jid(GROUP))
    kw.setdefault("sender", contact_lid(device=3))
    kw.setdefault("sender_alt", fn.jid(CONTACT))
    kw.setdefault("group", True)
    kw.setdefault("addressing", "LID")
    kw.setdefault("timestamp_ms", TS_MS)
    return fn.message_event(content, **kw)


def wrapped(field: str, content: Any) -> Any:
    message = fn.E2E.Message()
    getattr(message, field).message.CopyFrom(content)
    return message


OGG = b"OggS\x00\x02"  # fake_neonize.audio's bytes


def download_ok(content: Any) -> bytes:
    if content.HasField("audioMessage"):
        return OGG
    assert content.HasField("imageMessage")
    return PNG


def download_fails(content: Any) -> bytes:
    raise RuntimeError("download failed with status code 403")


MESSAGE_ROWS: list[tuple[str, Callable[[], Any], dict[str, Any] | Event | None]] = [
    (
        "conversation-pn",
        lambda: inbound(fn.text("hello there"), push_name="Maria"),
        {
            "wa_id": "A1B2C3D4E5F60718293A4B5C6D7E8F90",
            "chat_id": f"{CONTACT}@s.whatsapp.net",
            "sender": f"{CONTACT}@s.whatsapp.net",
            "text": "hello there",
            "timestamp": TS_MS / 1000,
            "sender_name": "Maria",
            "is_group": False,
            "from_me": False,
            "mentioned": False,
            "quoted_text": "",
            "images": (),
            "unsupported_media": "",
        },
    ),
    (
        "conversation-lid-prefers-pn",
        lambda: inbound(
            fn.text("hi"),
            chat=contact_lid(),
            sender=contact_lid(device=2),
            sender_alt=fn.jid(CONTACT),
            addressing="LID",
        ),
        {"chat_id": f"{CONTACT}@s.whatsapp.net", "sender": f"{CONTACT}@s.whatsapp.net"},
    ),
    (
        "conversation-lid-only",
        lambda: inbound(fn.text("hi"), chat=contact_lid(), sender=contact_lid(), addressing="LID"),
        {"chat_id": f"{CONTACT_LID}@lid", "sender": f"{CONTACT_LID}@lid"},
    ),
    (
        "from-me-in-lid-chat",
        lambda: inbound(
            fn.text("sent from my phone"),
            chat=contact_lid(),
            sender=fn.jid(fn.ACCOUNT_LID, fn.LID, device=0),
            sender_alt=fn.jid(fn.ACCOUNT_PHONE),
            recipient_alt=fn.jid(CONTACT),
            from_me=True,
            addressing="LID",
        ),
        {
            "chat_id": f"{CONTACT}@s.whatsapp.net",
            "sender": f"{fn.ACCOUNT_PHONE}@s.whatsapp.net",
            "from_me": True,
        },
    ),
    (
        "self-chat",
        lambda: inbound(
            fn.text("note to self"),
            chat=fn.jid(fn.ACCOUNT_PHONE),
            sender=fn.jid(fn.ACCOUNT_PHONE, fn.PN, device=0),
            from_me=True,
        ),
        {"chat_id": ME.jid, "sender": ME.jid, "from_me": True, "text": "note to self"},
    ),
    (
        "extended-text-quote-and-mention-of-me",
        lambda: inbound(
            fn.extended_text(
                f"@{fn.ACCOUNT_LID} what about this?",
                quoted_text="the original question",
                quoted_id="3A0F2C4E6B8D0A1C3E5F",
                quoted_participant=f"{CONTACT}@s.whatsapp.net",
                mentions=[f"{fn.ACCOUNT_LID}@lid"],
            )
        ),
        {
            "text": f"@{fn.ACCOUNT_LID} what about this?",
            "quoted_text": "the original question",
            "mentioned": True,
        },
    ),
    (
        "extended-text-reply-to-my-message",
        lambda: in_group(
            fn.extended_text(
                "thanks!",
                quoted_text="the answer",
                quoted_id="3EB0AAAABBBBCCCCDDDDEE",
                quoted_participant=f"{fn.ACCOUNT_PHONE}@s.whatsapp.net",
            )
        ),
        {"mentioned": True, "quoted_text": "the answer", "is_group": True},
    ),
    (
        "extended-text-mentions-someone-else",
        lambda: in_group(
            fn.extended_text("@5511999990003 look", mentions=["5511999990003@s.whatsapp.net"])
        ),
        {"mentioned": False, "text": "@5511999990003 look"},
    ),
    (
        "group-lid-sender-with-pn-alt",
        lambda: in_group(fn.text("hi all"), push_name="Maria"),
        {
            "chat_id": GROUP,
            "sender": f"{CONTACT}@s.whatsapp.net",
            "is_group": True,
            "sender_name": "Maria",
        },
    ),
    (
        "group-lid-sender-without-alt",
        lambda: in_group(fn.text("hi all"), sender_alt=None),
        {"chat_id": GROUP, "sender": f"{CONTACT_LID}@lid"},
    ),
    (
        "image-with-caption",
        lambda: inbound(fn.image("look at this", data=PNG, mimetype="image/png")),
        {
            "text": "look at this",
            "images": (Image("image/png", PNG, "look at this"),),
            "unsupported_media": "",
        },
    ),
    (
        "image-without-downloader",
        lambda: ("no-download", inbound(fn.image("caption only"))),
        {"text": "caption only", "images": (), "unsupported_media": "image"},
    ),
    (
        "image-download-fails",
        lambda: ("failing-download", inbound(fn.image(""))),
        {"images": (), "unsupported_media": "image"},
    ),
    (
        "video-caption",
        lambda: inbound(fn.video("watch this")),
        {"text": "watch this", "unsupported_media": "video"},
    ),
    (
        "document-caption",
        lambda: inbound(fn.document("the invoice")),
        {"text": "the invoice", "unsupported_media": "document"},
    ),
    # downloaded for transcription; "voice"/"audio" until transcribed (agent.engine)
    ("voice-note", lambda: inbound(fn.audio(ptt=True)),
     {"text": "", "unsupported_media": "voice",
      "audio": Audio("audio/ogg; codecs=opus", OGG, 4.0, voice=True)}),
    ("audio-file", lambda: inbound(fn.audio(ptt=False)),
     {"unsupported_media": "audio", "audio": Audio("audio/ogg; codecs=opus", OGG, 4.0,
                                                   voice=False)}),
    ("voice-note-download-fails", lambda: ("failing-download", inbound(fn.audio(ptt=True))),
     {"unsupported_media": "voice", "audio": None}),
    ("sticker", lambda: inbound(fn.sticker()), {"unsupported_media": "sticker"}),
    (
        "location",
        lambda: inbound(
            fn.E2E.Message(
                locationMessage=fn.E2E.LocationMessage(
                    degreesLatitude=-23.5, degreesLongitude=-46.6
                )
            )
        ),
        {"unsupported_media": "location"},
    ),
    (
        "ephemeral-wrapper",
        lambda: inbound(wrapped("ephemeralMessage", fn.text("disappearing"))),
        {"text": "disappearing"},
    ),
    (
        "document-with-caption-wrapper",
        lambda: inbound(wrapped("documentWithCaptionMessage", fn.document("wrapped pdf"))),
        {"text": "wrapped pdf", "unsupported_media": "document"},
    ),
    (
        "timestamp-in-seconds",
        lambda: inbound(fn.text("old encoder"), timestamp_ms=1_732_530_000),
        {"timestamp": 1_732_530_000.0},
    ),
    (
        "reaction",
        lambda: inbound(fn.reaction("3EB0AAAABBBBCCCCDDDDEE", f"{CONTACT}@s.whatsapp.net")),
        None,
    ),
    (
        "protocol-revoke",
        lambda: inbound(fn.protocol_revoke("A1B2C3", f"{CONTACT}@s.whatsapp.net")),
        None,
    ),
    (
        "status-broadcast",
        lambda: inbound(fn.text("my status"), chat=fn.jid("status", "broadcast")),
        None,
    ),
    (
        "newsletter",
        lambda: inbound(fn.text("news"), chat=fn.jid("120363200000000000", "newsletter")),
        None,
    ),
    ("edit", lambda: _edited(inbound(fn.text("edited text"))), None),
    (
        "sender-key-distribution-only",
        lambda: in_group(
            fn.E2E.Message(
                senderKeyDistributionMessage=fn.E2E.SenderKeyDistributionMessage(
                    groupID=GROUP, axolotlSenderKeyDistributionMessage=b"\x33\x0a"
                )
            )
        ),
        None,
    ),
    ("empty", lambda: inbound(fn.E2E.Message()), None),
    # the "message yourself" chat of an account WhatsApp moved to LID addressing: no
    # RecipientAlt, only the account's own LID
    (
        "self-chat-by-own-lid",
        lambda: inbound(
            fn.text("note to self"),
            chat=fn.jid(fn.ACCOUNT_LID, fn.LID),
            sender=fn.jid(fn.ACCOUNT_LID, fn.LID, device=0),
            from_me=True,
            addressing="LID",
        ),
        {"chat_id": ME.jid, "sender": ME.jid, "from_me": True},
    ),
    # disappearing messages: the chat's timer, quoted or not
    (
        "expiration-from-context",
        lambda: inbound(_expiring(fn.extended_text("psst"), 604800)),
        {"text": "psst", "expiration": 604800},
    ),
    (
        "expiration-in-ephemeral-wrapper-with-quote",
        lambda: inbound(wrapped("ephemeralMessage", _expiring(
            fn.extended_text("and this?", quoted_text="earlier"), 86400))),
        {"text": "and this?", "quoted_text": "earlier", "expiration": 86400},
    ),
    ("no-context-no-expiration", lambda: inbound(fn.text("plain")), {"expiration": None}),
    ("context-without-timer-is-off", lambda: inbound(fn.extended_text("x")), {"expiration": 0}),
    (
        "ephemeral-setting-changed",
        lambda: inbound(fn.E2E.Message(protocolMessage=fn.E2E.ProtocolMessage(
            type=fn.E2E.ProtocolMessage.EPHEMERAL_SETTING, ephemeralExpiration=0))),
        ChatExpiration(chat_id=f"{CONTACT}@s.whatsapp.net", seconds=0),
    ),
    # kinds that cannot be answered get the note, not silence
    *[
        (f"unsupported-{field}", (lambda f=field: inbound(fn.E2E.Message(**{f: {}}))),
         {"unsupported_media": kind})
        for field, kind in [
            ("buttonsResponseMessage", "button reply"),
            ("templateButtonReplyMessage", "button reply"),
            ("listResponseMessage", "list reply"),
            ("interactiveResponseMessage", "interactive reply"),
            ("pollCreationMessageV3", "poll"),
            ("eventMessage", "event"),
            ("groupInviteMessage", "group invite"),
        ]
    ],
]


def _expiring(message: Any, seconds: int) -> Any:
    message.extendedTextMessage.contextInfo.expiration = seconds
    return message


def _edited(event: Any) -> Any:
    event.IsEdit = True
    event.Info.Edit = "1"
    return event


@pytest.mark.parametrize(
    ("make", "expected"),
    [pytest.param(make, expected, id=name) for name, make, expected in MESSAGE_ROWS],
)
def test_translate_messages(make: Callable[[], Any],
                            expected: dict[str, Any] | Event | None) -> None:
    made = make()
    download: Callable[[Any], bytes] | None = download_ok
    if isinstance(made, tuple):
        mode, made = made
        download = None if mode == "no-download" else download_fails
    result = translate(made, me=ME, download=download)
    if expected is None or not isinstance(expected, dict):
        assert result == expected
        return
    assert isinstance(result, IncomingMessage)
    for name, value in expected.items():
        assert getattr(result, name) == value, name


def test_translate_lid_only_contact_through_the_lid_store() -> None:
    event = inbound(fn.text("hi"), chat=contact_lid(), sender=contact_lid(), addressing="LID")
    found = translate(event, me=ME, resolve={CONTACT_LID: CONTACT}.get)
    assert isinstance(found, IncomingMessage)
    assert (found.chat_id, found.sender) == (f"{CONTACT}@s.whatsapp.net",) * 2
    unknown = translate(event, me=ME, resolve=lambda lid: None)
    assert isinstance(unknown, IncomingMessage)
    assert unknown.chat_id == f"{CONTACT_LID}@lid"  # unknown: stays a LID, nothing invented


def test_translate_message_without_me_mentions_nobody() -> None:
    event = in_group(fn.extended_text("@bot", mentions=[f"{fn.ACCOUNT_LID}@lid"]))
    result = translate(event)
    assert isinstance(result, IncomingMessage)
    assert not result.mentioned


def test_translate_skips_huge_images_without_downloading() -> None:
    content = fn.image("big")
    content.imageMessage.fileLength = 200 * 1024 * 1024
    calls: list[Any] = []
    result = translate(inbound(content), me=ME, download=lambda c: calls.append(c) or PNG)
    assert isinstance(result, IncomingMessage)
    assert result.unsupported_media == "image"
    assert calls == []


# --------------------------------------------------------------------------------------------
# The backend against the fake client


class Recorder:
    """A sink recording (event, thread) from any thread; tests wait on it."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.items: list[tuple[Event, threading.Thread]] = []
        self.hook: Callable[[Event], None] | None = None
        self._changed = asyncio.Event()

    def sink(self, event: Event) -> None:
        if self.hook is not None:
            self.hook(event)
        self.items.append((event, threading.current_thread()))
        self.loop.call_soon_threadsafe(self._changed.set)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e, _ in self.items if isinstance(e, kind)]

    async def wait(self, kind: type[E], timeout: float = 5.0, count: int = 1) -> E:
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__}; saw {[e for e, _ in self.items]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self.of(kind)[count - 1]


@pytest.fixture
def world() -> Iterator[fn.FakeWorld]:
    made = fn.FakeWorld()
    yield made
    made.close()
    assert made.violations == []


@pytest.fixture
def ctx(tmp_path: Path) -> BackendContext:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return BackendContext(user_id="alice", state_dir=state)


class Linked:
    def __init__(self, backend: NeonizeBackend, rec: Recorder, client: fn.FakeNewClient) -> None:
        self.backend = backend
        self.rec = rec
        self.client = client

    async def receive(self, event: Any) -> IncomingMessage:
        before = len(self.rec.of(IncomingMessage))
        await asyncio.to_thread(self.client.emit_message, event)
        return await self.rec.wait(IncomingMessage, count=before + 1)


@pytest.fixture
async def linked(world: fn.FakeWorld, ctx: BackendContext) -> AsyncIterator[Linked]:
    backend = NeonizeBackend(ctx, client_factory=world.factory)
    rec = Recorder()
    backend.start(rec.sink)
    await rec.wait(QrCode)
    await asyncio.to_thread(world.latest.scan)
    await rec.wait(Connected)
    yield Linked(backend, rec, world.latest)
    await backend.stop(timeout=2.0)


async def test_start_builds_the_client_on_the_state_dir_store(
    world: fn.FakeWorld, ctx: BackendContext
) -> None:
    paths: list[Path] = []

    def factory(path: Path) -> fn.FakeNewClient:
        paths.append(path)
        return world.factory(path)

    backend = NeonizeBackend(ctx, client_factory=factory)
    rec = Recorder()
    backend.start(rec.sink)
    try:
        qr = await rec.wait(QrCode)
        assert paths == [ctx.state_dir / STORE_FILE]
        assert qr.code == world.latest.qr_codes[0]
        assert qr.code.startswith("2@") and qr.code.count(",") == 3
        with pytest.raises(RuntimeError):
            backend.start(rec.sink)
    finally:
        await backend.stop(timeout=2.0)


async def test_handlers_call_the_sink_on_the_connect_thread(linked: Linked) -> None:
    msg = await linked.receive(inbound(fn.text("hi")))
    threads = {thread for _event, thread in linked.rec.items}
    assert threads == {linked.client.connect_thread}
    assert linked.client.connect_thread is not threading.current_thread()
    assert linked.client.connect_thread.name == "neonize-connect"
    assert linked.client.connect_thread.daemon
    assert msg.text == "hi"


async def test_the_sink_gets_a_message_before_anything_else_happens(linked: Linked) -> None:
    seen: list[list[str]] = []

    def hook(event: Event) -> None:
        if isinstance(event, IncomingMessage):
            seen.append(list(linked.client.log))

    linked.rec.hook = hook
    await linked.receive(inbound(fn.text("persist me first")))
    assert seen[0][-1] == "dispatch Message"
    await linked.receive(inbound(fn.image("pic", data=PNG, world=linked.client.world)))
    assert seen[1][-2:] == ["dispatch Message", "download_any"]
    msg = linked.rec.of(IncomingMessage)[-1]
    assert msg.images == (Image("image/jpeg", PNG, "pic"),)
    # a voice note is downloaded the same way, for transcription
    ogg = b"OggS\x00\x02-a-voice-note"
    await linked.receive(inbound(fn.audio(data=ogg, world=linked.client.world)))
    assert seen[2][-2:] == ["dispatch Message", "download_any"]
    msg = linked.rec.of(IncomingMessage)[-1]
    assert (msg.audio, msg.unsupported_media) == (
        Audio("audio/ogg; codecs=opus", ogg, 4.0, voice=True), "voice")


async def test_ignored_messages_never_reach_the_sink(linked: Linked) -> None:
    for event in (
        inbound(fn.reaction("3EB0AAAABBBBCCCCDDDDEE", f"{CONTACT}@s.whatsapp.net")),
        inbound(fn.protocol_revoke("A1B2", f"{CONTACT}@s.whatsapp.net")),
        inbound(fn.text("status"), chat=fn.jid("status", "broadcast")),
    ):
        await asyncio.to_thread(linked.client.emit_message, event)
    await linked.receive(inbound(fn.text("real one")))
    assert [m.text for m in linked.rec.of(IncomingMessage)] == ["real one"]


async def test_send_text_quoting_uses_reply_message(linked: Linked) -> None:
    world = linked.client.world
    event = inbound(
        fn.text("what time is it?"),
        chat=contact_lid(),
        sender=contact_lid(device=2),
        sender_alt=fn.jid(CONTACT),
        addressing="LID",
    )
    msg = await linked.receive(event)
    sent_id = await linked.backend.send_text(msg.chat_id, "noon", quote=msg)
    sent = world.sent[-1]
    assert sent.id == sent_id and sent_id.startswith("3EB0")
    assert sent.via == "reply_message"
    assert sent.to == f"{CONTACT}@s.whatsapp.net"
    assert sent.quoted_id == msg.wa_id
    context = sent.message.extendedTextMessage.contextInfo
    assert sent.message.extendedTextMessage.text == "noon"
    assert context.stanzaID == msg.wa_id
    assert context.participant == f"{CONTACT}@s.whatsapp.net"
    assert context.quotedMessage.conversation == "what time is it?"


async def test_a_reaction_names_the_message_it_reacts_to(linked: Linked) -> None:
    msg = await linked.receive(inbound(fn.text("we won!")))
    await linked.backend.send_reaction(msg.chat_id, msg, "🎉")
    sent = linked.client.world.sent[-1]
    assert (sent.via, sent.to) == ("send_message", f"{CONTACT}@s.whatsapp.net")
    reaction = sent.message.reactionMessage
    assert reaction.text == "🎉" and msg.wa_id == reaction.key.ID
    assert reaction.key.remoteJID == msg.chat_id and not reaction.key.fromMe


async def test_a_file_is_uploaded_and_sent_as_a_document(linked: Linked) -> None:
    chat = f"{CONTACT}@s.whatsapp.net"
    sent_id = await linked.backend.send_media(chat, "document", b"%PDF-1.4 x", "r.pdf",
                                              "application/pdf", "the report")
    sent = linked.client.world.sent[-1]
    doc = sent.message.documentMessage
    assert (sent.id, sent.via, sent.to) == (sent_id, "send_document", chat)
    assert (doc.fileName, doc.mimetype, doc.caption) == ("r.pdf", "application/pdf", "the report")
    assert linked.client.world.media[doc.directPath] == b"%PDF-1.4 x"
    await linked.backend.send_media(chat, "image", b"\x89PNG\r\n\x1a\n", "p.png", "image/png", "")
    assert linked.client.world.sent[-1].via == "send_image"


async def test_send_text_quoting_a_message_from_before_a_restart(linked: Linked) -> None:
    old = IncomingMessage(
        wa_id="3A0F2C4E6B8D0A1C3E5F",
        chat_id=f"{CONTACT}@s.whatsapp.net",
        sender=f"{CONTACT}@s.whatsapp.net",
        text="asked yesterday",
        timestamp=1.0,
    )
    await linked.backend.send_text(old.chat_id, "answer", quote=old)
    sent = linked.client.world.sent[-1]
    assert sent.via == "reply_message"
    assert sent.quoted_id == old.wa_id
    assert sent.message.extendedTextMessage.contextInfo.quotedMessage.conversation == old.text


async def test_send_text_without_quote_sends_a_plain_message(linked: Linked) -> None:
    sent_id = await linked.backend.send_text(f"{CONTACT}@s.whatsapp.net", "hi *there*", quote=None)
    sent = linked.client.world.sent[-1]
    assert (sent.id, sent.via, sent.to) == (sent_id, "send_message", f"{CONTACT}@s.whatsapp.net")
    assert sent.message.conversation == "hi *there*"


async def test_send_text_cannot_choose_the_message_id(linked: Linked) -> None:
    """neonize 0.5.2 has no way to pass an id to whatsmeow: the outbox id is not used."""
    chat = f"{CONTACT}@s.whatsapp.net"
    sent_id = await linked.backend.send_text(chat, "hi", quote=None, msg_id="3EB0OUTBOX000001")
    assert sent_id == linked.client.world.sent[-1].id
    assert sent_id != "3EB0OUTBOX000001"


async def test_replies_carry_the_disappearing_timer_quoted_or_not(linked: Linked) -> None:
    # a chat set to disappear after 7 days: the contact's message says so
    msg = await linked.receive(inbound(_expiring(fn.extended_text("still there?"), 604800)))
    assert msg.expiration == 604800
    await linked.backend.send_text(msg.chat_id, "yes", quote=msg, expiration=604800)
    await linked.backend.send_text(msg.chat_id, "and more", quote=None, expiration=604800)
    quoted, plain = linked.client.world.sent[-2:]
    context = quoted.message.extendedTextMessage.contextInfo
    assert context.expiration == 604800
    assert context.stanzaID == msg.wa_id  # still a quote
    assert plain.message.extendedTextMessage.text == "and more"
    assert plain.message.extendedTextMessage.contextInfo.expiration == 604800
    # no timer: a plain conversation message, as before
    await linked.backend.send_text(msg.chat_id, "bye", quote=None)
    assert linked.client.world.sent[-1].message.conversation == "bye"


async def test_invalid_utf8_from_go_is_decoded_not_lost(linked: Linked, tmp_path: Path) -> None:
    # Go does not validate proto2 strings; Python's parser hands them over as bytes
    event = inbound(fn.text("caf\u00e9 MARK"), push_name="Jo MARK")
    data = event.SerializePartialToString().replace(b"MARK", b"\xff\xfe\xc3\x28")
    before = len(linked.rec.of(IncomingMessage))
    await asyncio.to_thread(linked.client.emit_raw, fn.P.Message, data)
    msg = await linked.rec.wait(IncomingMessage, count=before + 1)
    assert msg.text == "caf\u00e9 \ufffd\ufffd\ufffd("
    assert msg.sender_name == "Jo \ufffd\ufffd\ufffd("
    store = Store(tmp_path / "agent.db")  # what the worker's sink does first
    try:
        assert store.add_inbound(msg)
        (kept,) = store.pending_inbound(msg.chat_id)
        assert kept.message == msg
    finally:
        store.close()


async def test_a_message_that_cannot_be_translated_is_kept_not_lost(
    linked: Linked, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(neonize_backend, "translate_message", broken)
    msg = await linked.receive(inbound(fn.text("?"), msg_id="DDDD0001"))
    assert (msg.wa_id, msg.chat_id) == ("DDDD0001", f"{CONTACT}@s.whatsapp.net")
    assert msg.unsupported_media == "garbled"  # answered with the note, like a sticker


async def test_lid_only_contact_is_one_chat_with_its_phone_number(linked: Linked,
                                                                  tmp_path: Path) -> None:
    first = await linked.receive(inbound(fn.text("hi"), msg_id="AAAA0001"))  # PN addressing
    linked.client.world.lid_to_pn[CONTACT_LID] = CONTACT  # whatsmeow's LID store knows it
    lid_only = await linked.receive(
        inbound(fn.text("me again"), chat=contact_lid(), sender=contact_lid(1),
                msg_id="AAAA0002", addressing="LID"))
    assert (lid_only.chat_id, lid_only.sender) == (first.chat_id, first.sender)
    assert "get_pn_from_lid" in linked.client.log


async def test_same_message_first_with_alt_then_lid_only_is_one_message(
    linked: Linked, tmp_path: Path
) -> None:
    # the library's LID store does not know this contact: the pair the first event carried
    # names the second one
    with_alt = inbound(fn.text("hello"), chat=contact_lid(), sender=contact_lid(2),
                       sender_alt=fn.jid(CONTACT), msg_id="BBBB0001", addressing="LID")
    lid_only = inbound(fn.text("hello"), chat=contact_lid(), sender=contact_lid(2),
                       msg_id="BBBB0001", addressing="LID")
    one = await linked.receive(with_alt)
    two = await linked.receive(lid_only)
    assert (two.chat_id, two.sender, two.wa_id) == (one.chat_id, one.sender, one.wa_id)
    store = Store(tmp_path / "agent.db")
    try:
        assert store.add_inbound(one)
        assert not store.add_inbound(two)
    finally:
        store.close()


async def test_self_chat_by_the_accounts_own_lid(linked: Linked) -> None:
    msg = await linked.receive(
        inbound(fn.text("remind me"), chat=fn.jid(fn.ACCOUNT_LID, fn.LID),
                sender=fn.jid(fn.ACCOUNT_LID, fn.LID, 12), from_me=True, addressing="LID"))
    assert msg.chat_id == msg.sender == f"{fn.ACCOUNT_PHONE}@s.whatsapp.net"
    assert policy.decide(msg, policy.Policy(reply_to="self"), fn.ACCOUNT_PHONE).action == "answer"


async def test_undecryptable_messages_and_stream_errors_reach_the_sink(linked: Linked) -> None:
    info = inbound(fn.text("x"), msg_id="CCCC0001").Info
    await asyncio.to_thread(linked.client.emit, fn.P.UndecryptableMessage(
        Info=info, IsUnavailable=False,
        DecryptFailMode=fn.P.UndecryptableMessage.DecryptFailModeT.Value("DECRYPT_FAIL_SHOW")))
    lost = await linked.rec.wait(Undecryptable)
    assert lost == Undecryptable(chat_id=f"{CONTACT}@s.whatsapp.net",
                                 sender=f"{CONTACT}@s.whatsapp.net", wa_id="CCCC0001")
    await asyncio.to_thread(linked.client.emit, fn.P.StreamError(Code="503"))
    assert await linked.rec.wait(StreamError) == StreamError(code="503")


async def test_send_failures_raise_send_error(linked: Linked) -> None:
    linked.client.world.fail_sends = "server returned error 479"
    with pytest.raises(SendError, match="479"):
        await linked.backend.send_text(f"{CONTACT}@s.whatsapp.net", "x", quote=None)


async def test_send_when_not_connected_raises_send_error(
    world: fn.FakeWorld, ctx: BackendContext
) -> None:
    backend = NeonizeBackend(ctx, client_factory=world.factory)
    with pytest.raises(SendError):
        await backend.send_text(f"{CONTACT}@s.whatsapp.net", "x", quote=None)
    rec = Recorder()
    backend.start(rec.sink)
    try:
        await rec.wait(QrCode)
        with pytest.raises(SendError, match="not connected"):
            await backend.send_text(f"{CONTACT}@s.whatsapp.net", "x", quote=None)
        await backend.set_typing(f"{CONTACT}@s.whatsapp.net", True)  # best effort: no raise
        assert world.latest.presences == []
        assert "send_message" not in world.latest.log
    finally:
        await backend.stop(timeout=2.0)


async def test_typing_presence(linked: Linked) -> None:
    chat = f"{CONTACT}@s.whatsapp.net"
    await linked.backend.set_typing(chat, True)
    await linked.backend.set_typing(chat, False)
    presence = fn.ENUM.ChatPresence
    media = fn.ENUM.ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT
    assert linked.client.presences == [
        (chat, presence.CHAT_PRESENCE_COMPOSING, media),
        (chat, presence.CHAT_PRESENCE_PAUSED, media),
    ]


async def test_pair_phone_reports_a_pairing_code(world: fn.FakeWorld, ctx: BackendContext) -> None:
    backend = NeonizeBackend(ctx, client_factory=world.factory)
    rec = Recorder()
    backend.start(rec.sink)
    try:
        await rec.wait(QrCode)
        await backend.pair_phone(fn.ACCOUNT_PHONE)
        code = await rec.wait(PairingCode)
        assert len(code.code) == 9 and code.code[4] == "-"
        assert world.latest.pair_requests == [fn.ACCOUNT_PHONE]
        with pytest.raises(ValueError):
            await backend.pair_phone("+55 11 99999")
    finally:
        await backend.stop(timeout=2.0)


async def test_pair_phone_failure_is_an_event(linked: Linked) -> None:
    await linked.backend.pair_phone(fn.ACCOUNT_PHONE)  # already paired: the fake refuses
    failure = await linked.rec.wait(ConnectFailure)
    assert "already logged in" in failure.reason
    assert not failure.permanent


async def test_link_state_follows_the_events(linked: Linked) -> None:
    assert linked.backend.is_connected()
    await asyncio.to_thread(linked.client.emit_keepalive_timeout)
    await linked.rec.wait(Disconnected)
    assert not linked.backend.is_connected()
    await asyncio.to_thread(linked.client.emit_keepalive_restored)
    await linked.rec.wait(Connected, count=2)
    assert linked.backend.is_connected()
    await asyncio.to_thread(linked.client.emit_connect_failure, "SERVICE_UNAVAILABLE")
    failure = await linked.rec.wait(ConnectFailure)
    assert failure == ConnectFailure("service_unavailable", permanent=False,
                                     code="service_unavailable")
    assert not linked.backend.is_connected()
    assert linked.backend.me == ME


async def test_stop_returns_within_timeout_when_neonize_hangs(linked: Linked) -> None:
    linked.client.world.stop_hangs = 30.0
    started = time.monotonic()
    await linked.backend.stop(timeout=0.5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert linked.backend.stopped_cleanly is False
    assert not linked.backend.is_connected()


async def test_clean_stop_ends_the_connect_call(linked: Linked) -> None:
    await linked.backend.stop(timeout=2.0)
    assert linked.backend.stopped_cleanly is True
    thread = linked.client.connect_thread
    assert thread is not None
    thread.join(2.0)
    assert not thread.is_alive()
    assert linked.client.connect_calls == 1


async def test_after_stop_only_messages_reach_the_sink(linked: Linked) -> None:
    linked.client.world.stop_hangs = 30.0  # Go still delivers while stop() hangs
    await linked.backend.stop(timeout=0.2)
    await asyncio.to_thread(linked.client.emit_disconnected)
    await asyncio.to_thread(linked.client.emit_message, inbound(fn.text("late but acked")))
    await linked.rec.wait(IncomingMessage)
    assert linked.rec.of(Disconnected) == []


async def test_qr_expiry_from_the_login_status(world: fn.FakeWorld, ctx: BackendContext) -> None:
    backend = NeonizeBackend(ctx, client_factory=world.factory)
    rec = Recorder()
    backend.start(rec.sink)
    try:
        await rec.wait(QrCode)
        await asyncio.to_thread(world.latest.emit_qr)
        await rec.wait(QrCode, count=2)
        await asyncio.to_thread(world.latest.emit_login_status, "timeout")
        await rec.wait(QrExpired)
        await asyncio.sleep(0.1)
        assert len(rec.of(QrExpired)) == 1
    finally:
        await backend.stop(timeout=2.0)


async def test_qr_expiry_by_timer_when_neonize_goes_quiet(
    world: fn.FakeWorld, ctx: BackendContext
) -> None:
    backend = NeonizeBackend(ctx, client_factory=world.factory, qr_timeout=0.3)
    rec = Recorder()
    backend.start(rec.sink)
    try:
        await rec.wait(QrCode)
        await rec.wait(QrExpired, timeout=3.0)
        await asyncio.sleep(0.4)
        assert len(rec.of(QrExpired)) == 1
    finally:
        await backend.stop(timeout=2.0)


async def test_no_qr_expiry_once_scanned(world: fn.FakeWorld, ctx: BackendContext) -> None:
    backend = NeonizeBackend(ctx, client_factory=world.factory, qr_timeout=0.3)
    rec = Recorder()
    backend.start(rec.sink)
    try:
        await rec.wait(QrCode)
        await asyncio.to_thread(world.latest.scan)
        await rec.wait(Connected)
        await asyncio.sleep(0.6)
        assert rec.of(QrExpired) == []
    finally:
        await backend.stop(timeout=2.0)


async def test_connect_error_is_reported_not_raised(ctx: BackendContext) -> None:
    class Broken(fn.FakeNewClient):
        def connect(self, proxy_settings: Any = None) -> None:
            raise fn.neonize_exc.NeonizeError("database is locked")

    world = fn.FakeWorld()
    backend = NeonizeBackend(ctx, client_factory=lambda path: Broken(str(path), world=world))
    rec = Recorder()
    backend.start(rec.sink)
    try:
        failure = await rec.wait(ConnectFailure)
        assert failure == ConnectFailure("connect failed: database is locked", permanent=False)
    finally:
        await backend.stop(timeout=2.0)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(None, ConnectFailure("the WhatsApp client stopped", permanent=False),
                     id="returned"),
        pytest.param("database is locked",
                     ConnectFailure("connect failed: database is locked", permanent=False),
                     id="ordinary-error"),
        pytest.param("proto: required field neonize.TemporaryBan.Code not set",
                     ConnectFailure("proto: required field neonize.TemporaryBan.Code not set",
                                    permanent=False, code=LIBRARY_STOPPED),
                     id="unserializable-event"),
    ],
)
def test_connect_ended(error: str | None, expected: ConnectFailure) -> None:
    assert connect_ended(error) == expected


async def test_bad_user_agent_stops_as_outdated_and_keeps_the_store(linked: Linked) -> None:
    # 409 through neonize's own dispatch: "upgrade", not "re-scan"
    await asyncio.to_thread(linked.client.emit_connect_failure, "BAD_USER_AGENT")
    decision = outcomes.decide(await linked.rec.wait(ConnectFailure))
    assert decision.state is WorkerState.OUTDATED
    assert decision.exit_code is ExitCode.OUTDATED
    assert not decision.wipe_session


async def test_an_event_go_cannot_encode_stops_without_reconnecting(linked: Linked) -> None:
    error = "proto: required field neonize.TemporaryBan.Code not set"
    await asyncio.to_thread(linked.client.emit_unserializable, error)
    failure = await linked.rec.wait(ConnectFailure)
    assert failure.code == LIBRARY_STOPPED
    assert not linked.backend.is_connected()  # the watchdog and status line see it down
    decision = outcomes.decide(failure)
    assert decision.exit_code is ExitCode.BANNED  # RestartPreventExitStatus: no re-dial loop
    assert not decision.start_reconnect_clock
    assert error in decision.detail
    assert linked.client.connect_calls == 1


async def test_restart_shares_the_store_and_connects_without_qr(
    world: fn.FakeWorld, ctx: BackendContext, linked: Linked
) -> None:
    await linked.backend.stop(timeout=2.0)
    second = NeonizeBackend(ctx, client_factory=linked.client.world.factory)
    rec = Recorder()
    second.start(rec.sink)
    try:
        connected = await rec.wait(Connected)
        assert connected.phone == fn.ACCOUNT_PHONE
        assert rec.of(QrCode) == []
    finally:
        await second.stop(timeout=2.0)


# --------------------------------------------------------------------------------------------
# The real neonize, in fresh interpreters


def _run_python(code: str, *, isolate_network: bool) -> dict[str, Any]:
    argv = [sys.executable, "-c", code]
    if isolate_network and _can_unshare_network():
        argv = ["unshare", "--net", *argv]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _can_unshare_network() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--net", "true"], capture_output=True, timeout=10, check=False
    )
    return probe.returncode == 0


IMPORT_CONTAINMENT = r"""
import json, logging, sys, tempfile
from pathlib import Path

root = logging.getLogger()
mine = logging.StreamHandler(sys.stderr)
root.addHandler(mine)
root.setLevel(logging.WARNING)
before = (list(root.handlers), root.level)

import agent.whatsapp.neonize_backend
import agent.whatsapp.neonize_import as nb
after_module = (list(root.handlers), root.level)
lazy = "neonize" not in sys.modules and "neonize.client" not in sys.modules

tmp = Path(tempfile.mkdtemp())
client = nb.default_client_factory(tmp / "whatsapp.db")
after_client = (list(root.handlers), root.level)
print(json.dumps({
    "module_kept_root": after_module == before,
    "lazy": lazy,
    "client_kept_root": after_client == before,
    "neonize_loaded": "neonize.client" in sys.modules,
    "client_type": type(client).__module__ + "." + type(client).__name__,
}))
"""


def test_importing_neonize_leaves_root_logging_alone() -> None:
    result = _run_python(IMPORT_CONTAINMENT, isolate_network=True)
    assert result == {
        "module_kept_root": True,
        "lazy": True,
        "client_kept_root": True,
        "neonize_loaded": True,
        "client_type": "neonize.client.NewClient",
    }


REAL_CLIENT_SMOKE = r"""
import json, sqlite3, sys
from pathlib import Path

from agent.whatsapp.neonize_import import default_client_factory, ensure_store

db = Path(sys.argv[1]) / "state" / "whatsapp.db"
client = default_client_factory(db)
with sqlite3.connect(db) as conn:
    tables = sorted(r[0] for r in conn.execute("select name from sqlite_master where type='table'"))
    version = conn.execute("select version from whatsmeow_version").fetchone()[0]
    devices = conn.execute("select count(*) from whatsmeow_device").fetchone()[0]
print(json.dumps({
    "exists": db.is_file(),
    "tables": tables,
    "version": version,
    "devices": devices,
    "sessions_again": ensure_store(db),
    "uuid": client.uuid.decode(),
    "connected": client.connected,
    "has_api": all(hasattr(client, n) for n in (
        "connect", "stop", "disconnect", "send_message", "reply_message",
        "send_chat_presence", "mark_read", "download_any", "PairPhone", "logout", "get_me",
        "_NewClient__onLoginStatus")),
}))
"""


def test_real_client_creates_the_store_schema_without_network(tmp_path: Path) -> None:
    """Builds a real NewClient (never connects) in a fresh interpreter; with root it runs in
    an empty network namespace, which proves no network is touched."""
    code = REAL_CLIENT_SMOKE.replace("sys.argv[1]", repr(str(tmp_path)))
    result = _run_python(code, isolate_network=True)
    assert result["exists"]
    assert {"whatsmeow_device", "whatsmeow_sessions", "whatsmeow_lid_map"} <= set(result["tables"])
    assert result["version"] >= 1
    assert result["devices"] == 0
    assert result["sessions_again"] == 0
    assert result["uuid"] == str(tmp_path / "state" / "whatsapp.db")
    assert result["connected"] is False
    assert result["has_api"] is True
