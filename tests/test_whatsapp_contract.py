"""One contract, every WhatsApp backend.

Every driver module ``tests/whatsapp_drivers/*_driver.py`` (see that package for the
protocol) gets the same tests; a driver that cannot do something raises ``DriverUnsupported``
and the test is skipped with its reason. At the bottom: tests of behaviour specific to the
``sim`` backend (reconnecting in-process, QR expiry, pairing codes, the token file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import whatsapp_drivers
from whatsapp_drivers import BackendDriver, DriverUnsupported

from agent import policy
from agent.whatsapp.base import BackendContext, SendError, WhatsAppBackend
from agent.whatsapp.events import (
    ClientOutdated,
    Connected,
    Disconnected,
    Event,
    Image,
    IncomingMessage,
    LoggedOut,
    PairingCode,
    QrCode,
    QrExpired,
    StreamReplaced,
    TemporaryBan,
)
from agent.whatsapp.sim import SimBackend
from sim.server import SimServer

DRIVERS = whatsapp_drivers.discover()
CONTACT = "5511999990002"
OTHER_CONTACT = "5511999990003"

E = TypeVar("E")


def tiny_png() -> bytes:
    """A valid 1x1 red PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Events:
    """A sink that records events (from any thread) and lets a test wait for them."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.items: list[Event] = []
        self._changed = asyncio.Event()
        self._loop_thread = threading.get_ident()

    def sink(self, event: Event) -> None:
        if threading.get_ident() == self._loop_thread:
            self._add(event)
        else:
            self.loop.call_soon_threadsafe(self._add, event)

    def _add(self, event: Event) -> None:
        self.items.append(event)
        self._changed.set()

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.items if isinstance(e, kind)]

    async def wait(
        self,
        kind: type[E],
        timeout: float,
        where: Callable[[E], bool] = lambda _e: True,
        *,
        count: int = 1,
    ) -> E:
        """Wait until ``count`` events of ``kind`` matching ``where`` were seen; the last one."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.of(kind) if where(e)]
            if len(found) >= count:
                return found[count - 1]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {count}x {kind.__name__} within {timeout} s; saw {self.items!r}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


@pytest.fixture(params=sorted(DRIVERS))
async def driver(request: pytest.FixtureRequest) -> AsyncIterator[BackendDriver]:
    async with DRIVERS[request.param]() as drv:
        yield drv


class Backends:
    """Makes backends for a test and stops every one of them at the end."""

    def __init__(self, driver: BackendDriver, tmp_path: Path) -> None:
        self.driver = driver
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        self.ctx = BackendContext(user_id="alice", state_dir=self.state_dir)
        self.started: list[WhatsAppBackend] = []

    def start(self) -> tuple[WhatsAppBackend, Events]:
        backend = self.driver.make_backend(self.ctx)
        events = Events()
        backend.start(events.sink)
        self.started.append(backend)
        return backend, events

    async def linked(self) -> tuple[WhatsAppBackend, Events]:
        """A backend linked by a QR scan, connected."""
        backend, events = self.start()
        await events.wait(QrCode, self.driver.event_timeout)
        await self.driver.scan_latest_qr()
        await events.wait(Connected, self.driver.event_timeout)
        return backend, events

    async def stop_all(self) -> None:
        for backend in self.started:
            await backend.stop(timeout=3.0)


@pytest.fixture
async def backends(driver: BackendDriver, tmp_path: Path) -> AsyncIterator[Backends]:
    made = Backends(driver, tmp_path)
    try:
        yield made
    finally:
        await made.stop_all()


async def send_or_skip(driver: BackendDriver, *args: Any, **kw: Any) -> str:
    try:
        return await driver.contact_sends(*args, **kw)
    except DriverUnsupported as exc:
        pytest.skip(f"{driver.name}: {exc}")


# --------------------------------------------------------------------------- the contract


async def test_qr_scan_connects_with_the_account_phone(
    driver: BackendDriver, backends: Backends
) -> None:
    backend, events = backends.start()
    qr = await events.wait(QrCode, driver.event_timeout)
    assert qr.code
    assert not backend.is_connected()
    await driver.scan_latest_qr()
    connected = await events.wait(Connected, driver.event_timeout)
    assert connected.phone == driver.account_phone
    assert connected.jid.startswith(driver.account_phone)
    assert backend.is_connected()


async def test_incoming_message_reaches_the_sink(driver: BackendDriver, backends: Backends) -> None:
    _backend, events = await backends.linked()
    wa_id = await send_or_skip(driver, CONTACT, "hello there")
    msg = await events.wait(IncomingMessage, driver.event_timeout, lambda m: m.wa_id == wa_id)
    assert msg.text == "hello there"
    assert msg.sender.startswith(CONTACT)
    assert msg.chat_id.startswith(CONTACT)
    assert not msg.is_group
    assert not msg.from_me
    assert msg.images == ()
    assert msg.timestamp > 0


@pytest.mark.parametrize("where", ["self_chat", "contact_chat"])
async def test_the_owners_phone_writes_as_the_account(
    driver: BackendDriver, backends: Backends, where: str
) -> None:
    """What the owner writes on the phone reaches the linked device as the account's own
    message, and the policy reads it as the owner: in the self chat (``reply_to: self``)
    and in a contact's chat (not answered as the contact, the takeover signal)."""
    _backend, events = await backends.linked()
    to = CONTACT if where == "contact_chat" else None
    wa_id = await driver.owner_sends("from my phone", to=to)
    msg = await events.wait(IncomingMessage, driver.event_timeout, lambda m: m.wa_id == wa_id)
    owner = driver.account_phone
    assert msg.from_me and msg.text == "from my phone" and not msg.is_group
    assert policy.phone_of(msg.sender) == owner
    assert policy.phone_of(msg.chat_id) == (CONTACT if to else owner)
    assert policy.is_owner(msg, owner)
    assert policy.is_self_chat(msg, owner) == (to is None)


async def test_send_text_quoting_lands_in_the_contact_inbox(
    driver: BackendDriver, backends: Backends
) -> None:
    backend, events = await backends.linked()
    wa_id = await send_or_skip(driver, CONTACT, "what time is it?")
    msg = await events.wait(IncomingMessage, driver.event_timeout, lambda m: m.wa_id == wa_id)
    sent_id = await backend.send_text(msg.chat_id, "noon", quote=msg)
    assert sent_id
    plain_id = await backend.send_text(msg.chat_id, "anything else?", quote=None)
    assert plain_id != sent_id
    deadline = time.monotonic() + driver.event_timeout
    while True:
        inbox = await driver.contact_inbox(CONTACT)
        if len(inbox) >= 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    by_id = {entry["id"]: entry for entry in inbox}
    assert by_id[sent_id]["text"] == "noon"
    assert by_id[sent_id]["quoted_id"] == wa_id
    assert by_id[plain_id]["text"] == "anything else?"
    assert not by_id[plain_id]["quoted_id"]
    assert await driver.contact_inbox(OTHER_CONTACT) == []


async def test_a_resend_with_the_outbox_id_is_what_honours_message_id_says(
    driver: BackendDriver, backends: Backends
) -> None:
    """What the outbox can promise after a crash mid-send: a backend that sends with the id
    the outbox chose (``honours_message_id``) turns a resend into the same message (exactly
    once); any other turns it into a second message, so the outbox must choose between
    resending (at least once) and dropping (at most once): ``conversation.uncertain_replies``.
    """
    backend, events = await backends.linked()
    wa_id = await send_or_skip(driver, CONTACT, "are you there?")
    msg = await events.wait(IncomingMessage, driver.event_timeout, lambda m: m.wa_id == wa_id)
    chosen = "3EB0" + "C0FFEE" * 3
    first = await backend.send_text(msg.chat_id, "only once", quote=None, msg_id=chosen)
    again = await backend.send_text(msg.chat_id, "only once", quote=None, msg_id=chosen)
    expected = 1 if backend.honours_message_id else 2
    deadline = time.monotonic() + driver.event_timeout
    while True:
        copies = [e for e in await driver.contact_inbox(CONTACT) if e["text"] == "only once"]
        if len(copies) >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)  # a late second copy would show now
    copies = [e for e in await driver.contact_inbox(CONTACT) if e["text"] == "only once"]
    assert len(copies) == expected
    if backend.honours_message_id:
        assert first == again == chosen  # exactly once
    else:
        assert first != again  # the library picked the ids: a second message
        assert {first, again} == {e["id"] for e in copies}


async def test_restart_reconnects_without_a_new_qr(
    driver: BackendDriver, backends: Backends
) -> None:
    first, _events = await backends.linked()
    await first.stop(timeout=3.0)
    second, events = backends.start()
    connected = await events.wait(Connected, driver.event_timeout)
    assert connected.phone == driver.account_phone
    assert events.of(QrCode) == []
    assert second.is_connected()


async def test_logout_reports_logged_out_and_voids_the_store(
    driver: BackendDriver, backends: Backends
) -> None:
    first, events = await backends.linked()
    await trigger_or_skip(driver, "logout")
    await events.wait(LoggedOut, driver.event_timeout)
    assert not first.is_connected()
    await first.stop(timeout=3.0)
    _second, again = backends.start()  # same state dir: a new QR is needed
    await again.wait(QrCode, driver.event_timeout)
    assert again.of(Connected) == []


@pytest.mark.parametrize(
    ("outcome", "kw", "expected"),
    [
        ("replace", {}, StreamReplaced),
        ("ban", {"expires_in": 3600}, TemporaryBan),
        ("outdated", {}, ClientOutdated),
        ("disconnect", {}, Disconnected),
    ],
)
async def test_outcome_is_reported(
    driver: BackendDriver,
    backends: Backends,
    outcome: str,
    kw: dict[str, Any],
    expected: type[Event],
) -> None:
    backend, events = await backends.linked()
    before = time.time()
    await trigger_or_skip(driver, outcome, **kw)
    event = await events.wait(expected, driver.event_timeout)
    if isinstance(event, TemporaryBan):
        assert event.expires_at is not None
        assert before + 3000 < event.expires_at < time.time() + 4000
    if outcome != "disconnect":
        assert not backend.is_connected()


async def test_after_disconnect_a_restart_reconnects_without_qr(
    driver: BackendDriver, backends: Backends
) -> None:
    first, events = await backends.linked()
    await trigger_or_skip(driver, "disconnect")
    await events.wait(Disconnected, driver.event_timeout)
    await first.stop(timeout=3.0)
    _second, again = backends.start()
    await again.wait(Connected, driver.event_timeout)
    assert again.of(QrCode) == []


async def test_same_message_id_twice_reaches_the_sink_twice(
    driver: BackendDriver, backends: Backends
) -> None:
    """Deduplication is the agent's job: the backend passes re-deliveries through."""
    _backend, events = await backends.linked()
    first = await send_or_skip(driver, CONTACT, "once", msg_id="3EB0DUPLICATE0001")
    second = await send_or_skip(driver, CONTACT, "once", msg_id="3EB0DUPLICATE0001")
    assert first == second == "3EB0DUPLICATE0001"
    await events.wait(IncomingMessage, driver.event_timeout, lambda m: m.wa_id == first, count=2)


async def test_image_reaches_the_sink_as_bytes(driver: BackendDriver, backends: Backends) -> None:
    _backend, events = await backends.linked()
    png = tiny_png()
    wa_id = await send_or_skip(
        driver, CONTACT, "look at this", image=Image("image/png", png, "look at this")
    )
    msg = await events.wait(IncomingMessage, driver.event_timeout, lambda m: m.wa_id == wa_id)
    assert len(msg.images) == 1
    assert msg.images[0].data == png
    assert msg.images[0].mime_type == "image/png"
    assert msg.images[0].caption == "look at this"
    assert msg.text == "look at this"


async def test_group_message_with_mention(driver: BackendDriver, backends: Backends) -> None:
    _backend, events = await backends.linked()
    wa_id = await send_or_skip(driver, CONTACT, "@bot hi all", group="team-1", mentioned=True)
    msg = await events.wait(IncomingMessage, driver.event_timeout, lambda m: m.wa_id == wa_id)
    assert msg.is_group
    assert msg.mentioned
    assert msg.sender.startswith(CONTACT)
    assert not msg.chat_id.startswith(CONTACT)
    plain = await send_or_skip(driver, CONTACT, "no mention", group="team-1")
    msg = await events.wait(IncomingMessage, driver.event_timeout, lambda m: m.wa_id == plain)
    assert msg.is_group
    assert not msg.mentioned


async def test_stop_returns_within_timeout(driver: BackendDriver, backends: Backends) -> None:
    backend, _events = await backends.linked()
    started = time.monotonic()
    await backend.stop(timeout=2.0)
    assert time.monotonic() - started < 2.5
    assert not backend.is_connected()


async def test_stop_while_waiting_for_a_scan(driver: BackendDriver, backends: Backends) -> None:
    backend, events = backends.start()
    await events.wait(QrCode, driver.event_timeout)
    started = time.monotonic()
    await backend.stop(timeout=2.0)
    assert time.monotonic() - started < 2.5


async def trigger_or_skip(driver: BackendDriver, outcome: str, **kw: Any) -> None:
    try:
        await driver.trigger(outcome, **kw)
    except DriverUnsupported as exc:
        pytest.skip(f"{driver.name}: {exc}")


@pytest.mark.parametrize("name", sorted(whatsapp_drivers.LOAD_ERRORS) or ["(none)"])
def test_every_driver_module_loads(name: str) -> None:
    """A driver that does not load (its library missing from the venv) fails here, instead of
    its half of the contract silently not running."""
    if name in whatsapp_drivers.LOAD_ERRORS:
        pytest.fail(f"driver {name!r} not loaded: {whatsapp_drivers.LOAD_ERRORS[name]}")


# --------------------------------------------------------------------------- sim backend only

sim_only = pytest.mark.skipif("sim" not in DRIVERS, reason="the sim driver did not load")


@pytest.fixture
async def sim() -> AsyncIterator[Any]:
    async with DRIVERS["sim"](qr_rotate=1.0, qr_max=2) as drv:  # type: ignore[call-arg]
        yield drv


@pytest.fixture
async def sim_backends(sim: Any, tmp_path: Path) -> AsyncIterator[Backends]:
    made = Backends(sim, tmp_path)
    try:
        yield made
    finally:
        await made.stop_all()


@sim_only
async def test_sim_token_file_is_private_and_deleted_on_logout(
    sim: Any, sim_backends: Backends
) -> None:
    _backend, events = await sim_backends.linked()
    token_file = sim_backends.state_dir / "sim-device.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert json.loads(token_file.read_text())["phone"] == sim.account_phone
    await sim.trigger("logout")
    await events.wait(LoggedOut, 5)
    assert not token_file.exists()


@sim_only
async def test_sim_backend_reconnects_in_process_after_disconnect(
    sim: Any, sim_backends: Backends
) -> None:
    backend, events = await sim_backends.linked()
    qr_codes = len(events.of(QrCode))
    await sim.trigger("disconnect")
    await events.wait(Disconnected, 5)
    await events.wait(Connected, 5, count=2)
    assert backend.is_connected()
    assert len(events.of(QrCode)) == qr_codes  # the token was reused, no new QR
    wa_id = await sim.contact_sends(CONTACT, "still there?")
    await events.wait(IncomingMessage, 5, lambda m: m.wa_id == wa_id)


@sim_only
async def test_sim_messages_queued_offline_arrive_on_connect(
    sim: Any, sim_backends: Backends
) -> None:
    first, _events = await sim_backends.linked()
    await first.stop(timeout=3.0)
    wa_id = await sim.contact_sends(CONTACT, "while you were away")
    _second, events = sim_backends.start()
    msg = await events.wait(IncomingMessage, 5, lambda m: m.wa_id == wa_id)
    assert msg.text == "while you were away"


@sim_only
async def test_sim_unacked_message_is_redelivered(sim: Any, sim_backends: Backends) -> None:
    """A sink that fails means no ack: the sim re-delivers on the next connect."""
    wa_id = await _to_a_failing_sink(sim, sim_backends, "persist me")
    _third, events = sim_backends.start()
    await events.wait(IncomingMessage, 5, lambda m: m.wa_id == wa_id)


async def _to_a_failing_sink(sim: Any, sim_backends: Backends, text: str) -> str:
    """A contact writes ``text`` while the account is offline; a backend whose sink raises
    for it receives it and stops. Returns the message's id."""
    first, _ = await sim_backends.linked()
    await first.stop(timeout=3.0)
    wa_id = await sim.contact_sends(CONTACT, text)
    failing = Events()

    def broken_sink(event: Event) -> None:
        failing.sink(event)
        if isinstance(event, IncomingMessage):
            raise RuntimeError("store down")

    backend = sim.make_backend(sim_backends.ctx)
    backend.start(broken_sink)
    sim_backends.started.append(backend)
    await failing.wait(IncomingMessage, 5, lambda m: m.wa_id == wa_id)
    await backend.stop(timeout=3.0)
    return str(wa_id)


@sim_only
async def test_sim_acks_on_receipt_with_the_test_hook(
        sim: Any, sim_backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    """``WABRIDGE_TEST_SIM_ACK=receipt`` (tests/test_e2e_postgres.py): neonize's order, the
    ack before the sink, so a sink that fails has the only copy (nothing is re-delivered)."""
    monkeypatch.setenv("WABRIDGE_TEST_HOOKS", "1")
    monkeypatch.setenv("WABRIDGE_TEST_SIM_ACK", "receipt")
    wa_id = await _to_a_failing_sink(sim, sim_backends, "acked at once")
    _third, events = sim_backends.start()
    await events.wait(Connected, 5)
    await asyncio.sleep(1.0)
    assert not [m for m in events.of(IncomingMessage) if m.wa_id == wa_id]


@sim_only
async def test_sim_qr_expires_after_qr_max_codes(sim: Any, sim_backends: Backends) -> None:
    _backend, events = sim_backends.start()
    await events.wait(QrExpired, 6)
    assert len(events.of(QrCode)) == 2
    assert len({q.code for q in events.of(QrCode)}) == 2


@sim_only
async def test_sim_pairing_code_links(sim: Any, sim_backends: Backends) -> None:
    backend, events = sim_backends.start()
    await events.wait(QrCode, 5)
    await backend.pair_phone(sim.account_phone)
    code = await events.wait(PairingCode, 5)
    assert len(code.code) == 9 and code.code[4] == "-"
    status, body = await sim.api(
        "POST", f"/api/phones/{sim.account_phone}/pairing-code", {"code": code.code}
    )
    assert status == 200, body
    connected = await events.wait(Connected, 5)
    assert connected.phone == sim.account_phone


@sim_only
async def test_sim_unreachable_is_reported_then_connects(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    backend = SimBackend(
        BackendContext("bob", state), f"http://127.0.0.1:{unused_tcp_port}", backoff_max=0.3
    )
    events = Events()
    backend.start(events.sink)
    try:
        down = await events.wait(Disconnected, 5)
        assert down.reason.startswith("sim unreachable")
        async with SimServer(port=unused_tcp_port, qr_rotate=1.0):
            await events.wait(QrCode, 5)
        assert len(events.of(Disconnected)) >= 1
    finally:
        await backend.stop(timeout=2.0)


@sim_only
async def test_sim_send_text_when_not_connected_raises(sim: Any, sim_backends: Backends) -> None:
    backend, events = sim_backends.start()
    await events.wait(QrCode, 5)
    with pytest.raises(SendError):
        await backend.send_text(f"{CONTACT}@s.whatsapp.net", "hi", quote=None)


@sim_only
async def test_sim_send_to_unknown_chat_raises(sim: Any, sim_backends: Backends) -> None:
    backend, _events = await sim_backends.linked()
    with pytest.raises(SendError, match="unknown chat"):
        await backend.send_text("5511000000000@s.whatsapp.net", "hi", quote=None)


@sim_only
async def test_sim_typing_is_recorded(sim: Any, sim_backends: Backends) -> None:
    backend, events = await sim_backends.linked()
    wa_id = await sim.contact_sends(CONTACT, "hi")
    msg = await events.wait(IncomingMessage, 5, lambda m: m.wa_id == wa_id)
    await backend.set_typing(msg.chat_id, True)
    deadline = time.monotonic() + 5
    while True:
        _status, account = await sim.api("GET", f"/api/accounts/{sim.account_phone}")
        if account["typing"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert account["typing"] == {msg.chat_id: True}
    assert account["connected"] and account["linked"]


@sim_only
async def test_sim_server_state_file_keeps_linked_devices(tmp_path: Path) -> None:
    state_file = tmp_path / "sim-state.json"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ctx = BackendContext("carol", state)
    async with SimServer(port=0, qr_rotate=1.0, state_file=state_file) as server:
        port = server.port
        backend = SimBackend(ctx, server.base_url, backoff_max=0.3)
        events = Events()
        backend.start(events.sink)
        try:
            qr = await events.wait(QrCode, 5)
            server.dispatch(server.world.scan("5511999990009", {"code": qr.code}))
            await events.wait(Connected, 5)
        finally:
            await backend.stop(timeout=2.0)
    assert stat.S_IMODE(os.stat(state_file).st_mode) == 0o600
    async with SimServer(port=port, qr_rotate=1.0, state_file=state_file) as server:
        backend = SimBackend(ctx, server.base_url, backoff_max=0.3)
        events = Events()
        backend.start(events.sink)
        try:
            await events.wait(Connected, 5)
            assert events.of(QrCode) == []
        finally:
            await backend.stop(timeout=2.0)


@sim_only
@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("POST", "/api/messages", b"{not json", 400, None),
        ("POST", "/api/messages", b'{"from": "1", "to": "2"}', 400, "from"),
        ("POST", "/api/messages", b'["a list"]', 400, None),
        ("POST", "/api/phones/12/scan", b'{"code": "x"}', 400, "phone"),
        ("POST", "/api/phones/5511999990001/scan", b"{}", 400, "code"),
        ("POST", "/api/phones/5511999990001/scan", b'{"code": "sim-qr:no"}', 404, "code"),
        ("POST", "/api/accounts/5511999990001/ban", b'{"expires_in": "x"}', 404, None),
        ("GET", "/api/accounts/5511999990001", None, 404, None),
        ("GET", "/api/nothing-here", None, 404, None),
    ],
)
async def test_sim_api_answers_bad_input_with_json_errors(
    sim: Any, method: str, path: str, body: bytes | None, status: int, field: str | None
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, sim.base_url + path, data=body) as response,
    ):
        assert response.status == status
        data = await response.json()
    assert data["error"]
    if field is not None:
        assert data["field"] == field


@sim_only
async def test_sim_websocket_answers_bad_frames_with_error_frames(sim: Any) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(sim.base_url + "/ws/device") as ws:
        await ws.send_str("not json")
        assert (await ws.receive_json(timeout=5))["type"] == "error"
        await ws.send_json({"type": "send", "req": 1})
        assert "hello first" in (await ws.receive_json(timeout=5))["error"]
        await ws.send_bytes(b"\x00")
        assert (await ws.receive_json(timeout=5))["type"] == "error"
        await ws.send_json({"type": "hello", "token": None})
        assert (await ws.receive_json(timeout=5))["type"] == "qr"
        await ws.send_json({"type": "wave"})
        reply = await ws.receive_json(timeout=5)
        assert reply == {"type": "error", "error": "unknown frame type 'wave'"}
