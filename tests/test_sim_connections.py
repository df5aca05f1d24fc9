"""wabridge-sim's record of device connections over its real HTTP API and device WebSocket
(``sim/server.py``): intervals, double connections, and the heartbeat that drops a client
which stopped answering pings (a frozen host)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from sim.server import SimServer

ACCOUNT = "15550003333"


async def _frame(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = await asyncio.wait_for(ws.receive_json(), 5)
        if frame["type"] == kind:
            return frame


async def _link(http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> str:
    """hello without a token, the phone scans the QR: the device's token."""
    await ws.send_json({"type": "hello", "token": None, "client": "host-a"})
    qr = await _frame(ws, "qr")
    async with http.post(f"/api/phones/{ACCOUNT}/scan", json={"code": qr["code"]}) as resp:
        assert resp.status == 200
    paired = await _frame(ws, "paired")
    await _frame(ws, "connected")
    return str(paired["token"])


async def _record(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get(f"/api/devices/{ACCOUNT}/connections") as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def test_a_second_connection_of_a_device_is_counted_and_replaces_the_first() -> None:
    async with SimServer(port=0) as sim, aiohttp.ClientSession(sim.base_url) as http:
        async with http.ws_connect("/ws/device") as first:
            token = await _link(http, first)
            async with http.ws_connect("/ws/device") as second:
                await second.send_json({"type": "hello", "token": token, "client": "host-b"})
                await _frame(second, "connected")
                assert (await _frame(first, "stream_replaced"))["type"] == "stream_replaced"
                record = await _record(http)
        assert record["double_connections"] == 1
        (device,) = record["devices"]
        assert [(i["client"], i["ended_by"]) for i in device["intervals"]] == [
            ("host-a", "stream_replaced"), ("host-b", None)]
        async with http.get("/api/connections") as resp:
            totals = await resp.json()
        assert totals["double_connections"] == 1
        assert [a["phone"] for a in totals["accounts"]] == [ACCOUNT]
        async with http.get("/api/devices/12/connections") as resp:
            assert resp.status == 400 and (await resp.json())["field"] == "phone"


async def test_a_client_that_stops_answering_pings_is_dropped_after_the_heartbeat() -> None:
    heartbeat = 0.6
    async with SimServer(port=0, heartbeat=heartbeat) as sim, \
            aiohttp.ClientSession(sim.base_url) as http:
        # autoping off and nobody reading: the client is as silent as a frozen process
        async with http.ws_connect("/ws/device", autoping=False) as frozen:
            await _link(http, frozen)
            started = time.monotonic()
            while (await _record(http))["devices"][0]["connected"]:
                assert time.monotonic() - started < 10 * heartbeat, "never dropped"
                await asyncio.sleep(0.05)
            dropped_after = time.monotonic() - started
        (interval,) = (await _record(http))["devices"][0]["intervals"]
        assert interval["ended_by"] == "ping_timeout"
        assert dropped_after >= heartbeat  # one ping interval, then half of one for the pong


async def test_a_client_that_answers_pings_stays_connected() -> None:
    async with SimServer(port=0, heartbeat=0.3) as sim, \
            aiohttp.ClientSession(sim.base_url) as http:
        async with http.ws_connect("/ws/device") as ws:  # autoping: pongs come back
            await _link(http, ws)
            reader = asyncio.create_task(ws.receive())  # the client reads: pings are answered
            await asyncio.sleep(1.5)
            record = await _record(http)
            reader.cancel()
        assert record["devices"][0]["connected"] is True
        assert record["devices"][0]["intervals"][0]["ended_by"] is None


def test_heartbeat_is_a_command_line_option() -> None:
    from sim.main import parse_args  # noqa: PLC0415
    from sim.server import HEARTBEAT  # noqa: PLC0415
    from wabridge.config import Config  # noqa: PLC0415

    assert parse_args([], Config()).heartbeat == HEARTBEAT == 30.0
    assert parse_args(["--heartbeat", "2.5"], Config()).heartbeat == 2.5
    with pytest.raises(SystemExit):
        parse_args(["--heartbeat", "0.1"], Config())


async def test_a_device_dropped_for_a_late_pong_reconnects(tmp_path: Any) -> None:
    """A worker whose event loop stalls past the sim's heartbeat (a loaded host) is dropped;
    writing its late pong or ack to the closing socket is a lost connection like any other:
    the backend reconnects, it does not die."""
    from fleet import Sim  # noqa: PLC0415 - the sim in its own process: it must not stall too

    from agent.whatsapp.base import BackendContext  # noqa: PLC0415
    from agent.whatsapp.events import Connected, Disconnected, Event, QrCode  # noqa: PLC0415
    from agent.whatsapp.sim import SimBackend  # noqa: PLC0415

    sim = Sim(heartbeat=0.5)
    events: asyncio.Queue[Event] = asyncio.Queue()
    backend = SimBackend(BackendContext("late-pong", tmp_path), sim.url,
                         backoff_min=0.05, backoff_max=0.2)

    async def next_event(kind: type) -> Any:
        while True:
            event = await asyncio.wait_for(events.get(), 10)
            if isinstance(event, kind):
                return event

    try:
        backend.start(events.put_nowait)
        qr = await next_event(QrCode)
        await asyncio.to_thread(sim.scan, ACCOUNT, qr.code)
        await next_event(Connected)
        for _ in range(3):
            time.sleep(1.2)  # the stall under test: no pong goes out
            down = await next_event(Disconnected)
            assert "failed unexpectedly" not in down.reason, down
            await next_event(Connected)  # and back, by itself
        assert backend.healthy()
        record = await asyncio.to_thread(sim.connections, ACCOUNT)
        ended = [i["ended_by"] for i in record["devices"][0]["intervals"]]
        assert ended.count("ping_timeout") >= 3 and record["double_connections"] == 0
    finally:
        await backend.stop()
        sim.stop()


async def test_a_write_to_a_closing_socket_is_a_lost_connection_not_a_dead_backend(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the fleet tests met on a loaded machine: aiohttp answers a ping as the sim closes
    the socket and raises ClientConnectionResetError out of the receive loop."""
    from agent.whatsapp.base import BackendContext  # noqa: PLC0415
    from agent.whatsapp.events import Connected, Disconnected, Event, QrCode  # noqa: PLC0415
    from agent.whatsapp.sim import SimBackend  # noqa: PLC0415

    real_receive = aiohttp.ClientWebSocketResponse.receive
    armed = asyncio.Event()

    async def receive(self: aiohttp.ClientWebSocketResponse, *args: Any, **kw: Any) -> Any:
        if armed.is_set():
            armed.clear()
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        return await real_receive(self, *args, **kw)

    monkeypatch.setattr(aiohttp.ClientWebSocketResponse, "receive", receive)
    events: asyncio.Queue[Event] = asyncio.Queue()

    async def next_event(kind: type) -> Any:
        while True:
            event = await asyncio.wait_for(events.get(), 10)
            if isinstance(event, kind):
                return event

    async with SimServer(port=0) as sim:
        backend = SimBackend(BackendContext("reset", tmp_path), sim.base_url,
                             backoff_min=0.05, backoff_max=0.2)
        backend.start(events.put_nowait)
        try:
            qr = await next_event(QrCode)
            sim.dispatch(sim.world.scan(ACCOUNT, {"code": qr.code}))
            await next_event(Connected)
            armed.set()
            sim.dispatch(sim.world.post_message({"from": "15550009999", "to": ACCOUNT,
                                                 "text": "wake the reader"})[1])
            down = await next_event(Disconnected)
            assert down.reason.startswith("connection lost"), down
            await next_event(Connected)  # reconnected by itself
            assert backend.healthy()
        finally:
            await backend.stop()
