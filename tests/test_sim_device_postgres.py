"""The sim backend's device token on PostgreSQL (``storage.backend = postgresql``): kept in
the account's own schema, so the account reconnects from another host's state directory
without a QR (what a move or a failover relies on), and a database that cannot be read is
retried, never taken for "not linked"."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from postgres_cluster import Cluster

from agent.placement import session_store
from agent.store import PostgresTarget
from agent.whatsapp.base import BackendContext
from agent.whatsapp.events import Connected, Disconnected, Event, QrCode
from agent.whatsapp.sim import SimBackend
from controller import pg_roles
from sim.server import SimServer
from wabridge.postgres import account_role

USER, PHONE = "sim-dev-alice", "15550004444"
E = TypeVar("E", bound=Event)


@pytest.fixture
def target(postgres: Cluster) -> PostgresTarget:
    with psycopg.connect(postgres.conninfo(), autocommit=True) as admin:
        role = account_role(USER)
        return PostgresTarget(postgres.url(role) + "?sslmode=disable", role,
                              pg_roles.provision(admin, USER))


async def _next(events: asyncio.Queue[Event], kind: type[E], seen: list[Event]) -> E:
    async def wait() -> E:
        while True:
            event = await events.get()
            seen.append(event)
            if isinstance(event, kind):
                return event

    return await asyncio.wait_for(wait(), 15)


def _backend(state_dir: Path, target: PostgresTarget, sim: SimServer) -> SimBackend:
    state_dir.mkdir()
    ctx = BackendContext(USER, state_dir, session_store=session_store(target))
    return SimBackend(ctx, sim.base_url, backoff_min=0.05, backoff_max=0.2)


async def test_the_account_reconnects_from_another_hosts_state_dir_without_a_qr(
        tmp_path: Path, target: PostgresTarget) -> None:
    async with SimServer(port=0) as sim:
        seen: list[Event] = []
        events: asyncio.Queue[Event] = asyncio.Queue()
        host_a = _backend(tmp_path / "a", target, sim)
        host_a.start(events.put_nowait)
        qr = await _next(events, QrCode, seen)
        sim.dispatch(sim.world.scan(PHONE, {"code": qr.code}))  # the phone scans
        await _next(events, Connected, seen)
        await host_a.stop()
        assert list((tmp_path / "a").iterdir()) == []  # nothing on the host's disk

        seen_b: list[Event] = []
        events_b: asyncio.Queue[Event] = asyncio.Queue()
        host_b = _backend(tmp_path / "b", target, sim)
        host_b.start(events_b.put_nowait)
        try:
            connected = await _next(events_b, Connected, seen_b)
        finally:
            await host_b.stop()
        assert connected.phone == PHONE
        assert not any(isinstance(e, QrCode) for e in seen_b)
        record = sim.world.connections(PHONE)
        assert record["double_connections"] == 0
        (device,) = record["devices"]
        assert len(device["intervals"]) == 2  # one device, connected from a, then from b


async def test_an_unreadable_token_is_retried_and_never_shows_a_qr(
        tmp_path: Path, target: PostgresTarget) -> None:
    broken = PostgresTarget(target.conninfo, target.schema, "not-the-password")
    async with SimServer(port=0) as sim:
        seen: list[Event] = []
        events: asyncio.Queue[Event] = asyncio.Queue()
        backend = _backend(tmp_path / "a", broken, sim)
        backend.start(events.put_nowait)
        try:
            down = await _next(events, Disconnected, seen)
            await asyncio.sleep(0.5)  # several retries
        finally:
            await backend.stop()
        assert down.reason.startswith("device token unreadable")
        assert "not-the-password" not in down.reason
        assert not any(isinstance(e, QrCode) for e in seen)
        assert sim.world.pending_qr() == [] and not sim.world.conns
