"""One contract for every ControlPlane: Firestore (on the emulator), the local SQLite store and
PostgreSQL (the session's private cluster).

Each contract test runs once per backend (ids ``firestore``, ``local`` and ``postgres``) in a
fresh namespace: a new Firestore project, a new database file, a new PostgreSQL schema per
test. Tests that need the emulator or the PostgreSQL binaries skip with the reason when they
cannot run here (``-ra`` prints it). Backend-specific
tests (listener recovery, outages, schema versions, configuration errors) follow the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import firestore_emulator as emulator_helper  # tests/ is on sys.path (no __init__.py)
import postgres_cluster
import psycopg
import psycopg.sql
import pytest
import pytest_asyncio
from postgres_cluster import Cluster

from controller import firestore as firestore_plane
from controller import pgplane
from controller.firestore import FirestorePlane, map_error
from controller.local import SCHEMA_VERSION, LocalPlane
from controller.pgplane import PostgresPlane
from controller.plane import (
    AccountDoc,
    Change,
    ControlPlane,
    PlaneDenied,
    PlaneError,
    PlaneUnavailable,
    Removed,
    message_doc_id,
    usage_doc_id,
)
from wabridge.config import FirebaseConfig
from wabridge.errors import ConfigError, ExitCode, ForeignRecordError, SchemaTooNew, UserIdError
from wabridge.protocol import MessageEvent, Usage
from wabridge.status import DocStatus

CHANGE_TIMEOUT = 2.0  # a write must reach a watcher within this
FIRST_TIMEOUT = 10.0  # the first snapshot also opens the channel
REPO = Path(__file__).resolve().parent.parent


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_gce_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # nothing may probe the GCE metadata server


def require_emulator() -> None:
    reason = emulator_helper.available()
    if reason:
        pytest.skip(f"Firestore emulator unavailable: {reason}")


def emulator_config(address: str, project: str | None = None) -> FirebaseConfig:
    return FirebaseConfig(
        emulator_host=address, project_id=project or f"demo-{uuid.uuid4().hex[:12]}"
    )


class Store:
    """One fresh namespace of one backend; ``open()`` makes more planes on the same data."""

    def __init__(self, kind: str, factory: Callable[[], ControlPlane]) -> None:
        self.kind = kind
        self._factory = factory
        self._planes: list[ControlPlane] = []

    def open(self) -> ControlPlane:
        plane = self._factory()
        self._planes.append(plane)
        return plane

    async def close(self) -> None:
        for plane in reversed(self._planes):
            await plane.close()


@pytest_asyncio.fixture(
    params=[pytest.param("firestore", marks=pytest.mark.firestore), "local", "postgres"],
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "firestore":
        # the session's shared emulator (tests/conftest.py); skips with the reason
        address: str = request.getfixturevalue("firestore_emulator")
        config = emulator_config(address)
        result = Store("firestore", lambda: FirestorePlane(config, deadline=10.0))
    elif request.param == "postgres":
        # the session's shared cluster (tests/conftest.py); skips with the reason
        cluster: Cluster = request.getfixturevalue("postgres")
        schema = f"plane_{uuid.uuid4().hex[:12]}"
        result = Store("postgres", lambda: PostgresPlane(cluster.conninfo(), schema=schema))
    else:
        db = tmp_path / "control" / "control.db"
        result = Store("local", lambda: LocalPlane(db))
    try:
        yield result
    finally:
        await result.close()


class Collector:
    """A watch callback that records deliveries and lets a test wait for them."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.all: list[Change] = []
        self.cursor = 0  # ``next``/``until`` consume in order from here
        self._arrived = asyncio.Event()

    def __call__(self, change: Change) -> None:
        assert asyncio.get_running_loop() is self.loop, "delivered off the loop thread"
        self.all.append(change)
        self._arrived.set()

    async def _wait(self, find: Callable[[], Change | None], timeout: float, what: str) -> Change:
        deadline = time.monotonic() + timeout
        while (found := find()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout} s; got {self.all}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return found

    async def next(self, timeout: float = CHANGE_TIMEOUT) -> Change:
        def find() -> Change | None:
            if self.cursor < len(self.all):
                self.cursor += 1
                return self.all[self.cursor - 1]
            return None

        return await self._wait(find, timeout, "change")

    async def until(
        self, match: Callable[[Change], bool], timeout: float = CHANGE_TIMEOUT
    ) -> Change:
        """The next matching change after the cursor (skipping others); moves the cursor."""

        def find() -> Change | None:
            for index in range(self.cursor, len(self.all)):
                if match(self.all[index]):
                    self.cursor = index + 1
                    return self.all[index]
            return None

        return await self._wait(find, timeout, "matching change")

    async def saw(
        self, match: Callable[[Change], bool], since: int, timeout: float = CHANGE_TIMEOUT
    ) -> Change:
        """Any matching change delivered at or after index ``since`` (order-agnostic)."""

        def find() -> Change | None:
            return next((c for c in self.all[since:] if match(c)), None)

        return await self._wait(find, timeout, "matching change")


def doc_of(user_id: str, status: DocStatus | None = None) -> Callable[[Change], bool]:
    def match(change: Change) -> bool:
        return (
            isinstance(change, AccountDoc)
            and change.user_id == user_id
            and (status is None or change.status == status)
        )

    return match


def removed(user_id: str) -> Callable[[Change], bool]:
    return lambda change: change == Removed(user_id)


def event(event_id: str, ts: float, text: str = "hi", chat: str = "c1") -> MessageEvent:
    return MessageEvent(
        seq=1, event_id=event_id, chat_id=chat, direction="in", sender="s", text=text, ts=ts
    )


# -- the contract ---------------------------------------------------------------------------


async def test_watch_delivers_existing_documents_then_changes(store: Store) -> None:
    plane, other = store.open(), store.open()
    await other.request("alice", DocStatus.CREATE_REQUESTED)
    await other.update("bob", {"status": "connected", "host": "h1"})
    seen = Collector()
    await plane.watch(seen)

    first = [await seen.next(FIRST_TIMEOUT), await seen.next(FIRST_TIMEOUT)]
    assert all(isinstance(c, AccountDoc) for c in first)
    assert {c.user_id for c in first} == {"alice", "bob"}
    assert {c.user_id: c.status for c in first if isinstance(c, AccountDoc)} == {
        "alice": DocStatus.CREATE_REQUESTED,
        "bob": DocStatus.CONNECTED,
    }

    await other.request("carol", DocStatus.CREATE_REQUESTED)
    await seen.until(doc_of("carol", DocStatus.CREATE_REQUESTED))
    await other.update("alice", {"status": DocStatus.STARTING.value})
    changed = await seen.until(doc_of("alice", DocStatus.STARTING))
    assert isinstance(changed, AccountDoc)
    await other.delete("bob")
    await seen.until(removed("bob"))
    assert Removed("alice") not in seen.all and Removed("carol") not in seen.all


async def test_rewatch_delivers_everything_again_and_keeps_watching(store: Store) -> None:
    """The controller's resync calls ``rewatch`` when the feed missed a request: the fresh
    feed delivers every document again, and later changes still arrive."""
    plane, other = store.open(), store.open()
    await other.request("alice", DocStatus.CREATE_REQUESTED)
    seen = Collector()
    await plane.watch(seen)
    await seen.until(doc_of("alice"), FIRST_TIMEOUT)
    assert plane.feed_alive()
    mark = len(seen.all)
    await plane.rewatch()
    await seen.saw(doc_of("alice"), mark, FIRST_TIMEOUT)
    await other.request("bob", DocStatus.CREATE_REQUESTED)
    await seen.saw(doc_of("bob"), mark, CHANGE_TIMEOUT)
    assert plane.feed_alive()


PLANES = [pytest.param("controller.local", "LocalPlane"),
          pytest.param("controller.firestore", "FirestorePlane"),
          pytest.param("controller.pgplane", "PostgresPlane")]


@pytest.mark.parametrize(("module", "name"), PLANES)
def test_every_plane_decides_every_method_of_the_interface(module: str, name: str) -> None:
    """Abstract or not: a default of the base class (the no-op ``rewatch``, ``feed_alive``
    always True, the full-scan ``pending_requests``) inherited by accident makes a safety
    net inert, as a wrapper plane once did. Each plane defines every public method itself."""
    import importlib  # noqa: PLC0415

    cls = getattr(importlib.import_module(module), name)
    public = [n for n, v in vars(ControlPlane).items()
              if callable(v) and not n.startswith("_")]
    assert {"rewatch", "pending_requests", "feed_alive", "watch"} <= set(public)
    missing = [n for n in public if n not in vars(cls)]
    assert missing == [], f"{name} inherits {missing} from ControlPlane"


async def test_watch_on_empty_store_then_create(store: Store) -> None:
    plane = store.open()
    seen = Collector()
    await plane.watch(seen)
    await plane.request("dave", DocStatus.CREATE_REQUESTED)
    await seen.until(doc_of("dave"), FIRST_TIMEOUT)
    await plane.delete("dave")
    await seen.until(removed("dave"))


async def test_odd_documents_parse_without_raising(store: Store) -> None:
    plane = store.open()
    huge = "x" * 500_000
    await plane.update("n42", {"status": 42})
    await plane.update("unknown", {"status": "zombie", "qrCode": huge})
    await plane.update(
        "weird",
        {
            "status": ["connected"],
            "settings": ["not", "a", "map"],
            "pairingPhone": 4912345,
            "host": {"nested": True},
            "error": {"message": "no code"},
            "unit": "active",
        },
    )
    await plane.update("nostatus", {"phone": "+1"})

    docs = {d.user_id: d for d in await plane.list_accounts()}
    assert set(docs) == {"n42", "unknown", "weird", "nostatus"}
    assert docs["n42"].status is None and docs["n42"].raw_status == 42
    assert docs["unknown"].status is None and docs["unknown"].raw_status == "zombie"
    weird = docs["weird"]
    assert weird.status is None and weird.raw_status == ["connected"]
    assert weird.settings == {} and weird.pairing_phone is None and weird.host is None
    assert weird.error_code is None and weird.unit_state == {}
    assert docs["nostatus"].status is None and docs["nostatus"].raw_status is None

    got = await plane.get("unknown")
    assert got is not None and got.raw_status == "zombie"
    seen = Collector()
    await plane.watch(seen)
    first = [await seen.next(FIRST_TIMEOUT) for _ in range(4)]
    assert {c.user_id for c in first} == set(docs)


async def test_claim_succeeds_once(store: Store) -> None:
    plane = store.open()
    await plane.request("alice", DocStatus.CREATE_REQUESTED)
    expect = frozenset({DocStatus.CREATE_REQUESTED})

    assert await plane.claim("alice", expect, DocStatus.STARTING, "host-a") is True
    doc = await plane.get("alice")
    assert doc is not None
    assert doc.status == DocStatus.STARTING and doc.host == "host-a"

    assert await plane.claim("alice", expect, DocStatus.STARTING, "host-b") is False
    doc = await plane.get("alice")
    assert doc is not None and doc.host == "host-a"

    assert await plane.claim("ghost", expect, DocStatus.STARTING, "host-a") is False
    assert await plane.get("ghost") is None

    await plane.update("odd", {"status": 7})
    assert await plane.claim("odd", expect, DocStatus.STARTING, "host-a") is False


async def test_concurrent_claims_exactly_one_wins(store: Store) -> None:
    first, second = store.open(), store.open()
    users = [f"u{i}" for i in range(3)]
    for user in users:
        await first.request(user, DocStatus.CREATE_REQUESTED)
    expect = frozenset({DocStatus.CREATE_REQUESTED, DocStatus.RESTART_REQUESTED})
    for user in users:
        won = await asyncio.gather(
            first.claim(user, expect, DocStatus.STARTING, "host-1"),
            second.claim(user, expect, DocStatus.STARTING, "host-2"),
        )
        assert sorted(won) == [False, True], (user, won)
        doc = await second.get(user)
        assert doc is not None and doc.status == DocStatus.STARTING
        assert doc.host == ("host-1" if won[0] else "host-2")


async def test_update_merges_and_none_deletes(store: Store) -> None:
    plane = store.open()
    await plane.update(
        "alice",
        {
            "status": "connected",
            "settings": {"model": "a", "tools": True},
            "pairingPhone": "+100",
            "unit": {"activeState": "active", "subState": "running"},
            "error": {"code": "x", "message": "m", "at": 1.0},
        },
    )
    await plane.update(
        "alice", {"settings": {"model": "b"}, "pairingPhone": None, "unit": {}, "host": "h"}
    )
    doc = await plane.get("alice")
    assert doc is not None
    assert doc.status == DocStatus.CONNECTED  # untouched
    assert doc.settings == {"model": "b", "tools": True}  # nested maps merge
    assert doc.pairing_phone is None  # None deleted it
    assert doc.unit_state == {}  # an empty map replaces
    assert doc.host == "h" and doc.error_code == "x"

    await plane.update("alice", {"error": None, "host": None, "settings": {"tools": None}})
    doc = await plane.get("alice")
    assert doc is not None
    assert doc.error_code is None and doc.host is None
    assert doc.settings == {"model": "b", "tools": None}  # nested None is stored as null

    await plane.update("fresh", {"gone": None})  # update creates the document
    fresh = await plane.get("fresh")
    assert fresh is not None and fresh.status is None


async def test_request_creates_the_document(store: Store) -> None:
    plane = store.open()
    assert await plane.get("alice") is None
    await plane.request("alice", DocStatus.PAIRING_REQUESTED, pairingPhone="+4912345")
    doc = await plane.get("alice")
    assert doc is not None
    assert doc.status == DocStatus.PAIRING_REQUESTED and doc.pairing_phone == "+4912345"
    await plane.request("alice", DocStatus.DESTROY_REQUESTED)
    doc = await plane.get("alice")
    assert doc is not None
    assert doc.status == DocStatus.DESTROY_REQUESTED and doc.pairing_phone == "+4912345"
    assert [d.user_id for d in await plane.list_accounts()] == ["alice"]


async def test_pending_requests_are_the_documents_holding_a_request(store: Store) -> None:
    plane = store.open()
    await plane.request("alice", DocStatus.CREATE_REQUESTED)
    await plane.request("bob", DocStatus.DESTROY_REQUESTED)
    await plane.request("carol", DocStatus.PAIRING_REQUESTED, pairingPhone="4912345678")
    await plane.request("dave", DocStatus.RESTART_REQUESTED)
    await plane.request("erin", DocStatus.CREATE_REQUESTED)
    assert await plane.claim("erin", frozenset({DocStatus.CREATE_REQUESTED}),
                             DocStatus.STARTING, "host-a")
    await plane.update("frank", {"status": "banana"})
    await plane.update("grace", {"status": DocStatus.CONNECTED.value})
    pending = {d.user_id: d.status for d in await plane.pending_requests()}
    assert pending == {"alice": DocStatus.CREATE_REQUESTED, "bob": DocStatus.DESTROY_REQUESTED,
                       "carol": DocStatus.PAIRING_REQUESTED,
                       "dave": DocStatus.RESTART_REQUESTED}


async def test_delete_is_idempotent(store: Store) -> None:
    plane = store.open()
    await plane.delete("nobody")
    await plane.request("alice", DocStatus.CREATE_REQUESTED)
    await plane.delete("alice")
    await plane.delete("alice")
    assert await plane.get("alice") is None
    assert await plane.list_accounts() == []


async def test_add_message_is_idempotent_and_ordered(store: Store) -> None:
    plane = store.open()
    await plane.add_message("alice", event("in:e1", ts=30.0, text="third"))
    await plane.add_message("alice", event("in:e2", ts=10.0, text="first"))
    await plane.add_message("alice", event("in:e3", ts=20.0, text="second"))
    await plane.add_message("alice", event("in:e2", ts=10.0, text="first, again"))
    await plane.add_message("alice", event("in:e2", ts=10.0, text="first, again"))
    await plane.add_message("bob", event("in:e1", ts=15.0, text="bob's"))

    got = await plane.messages("alice")
    assert [m["text"] for m in got] == ["first, again", "second", "third"]
    assert got[0] == {
        "userId": "alice",
        "eventId": "in:e2",
        "chatId": "c1",
        "direction": "in",
        "sender": "s",
        "text": "first, again",
        "ts": 10.0,
    }
    assert [m["text"] for m in await plane.messages("alice", limit=2)] == ["second", "third"]
    assert [m["text"] for m in await plane.messages("bob")] == ["bob's"]
    assert await plane.messages("carol") == []

    # event ids are free text: '/' and '%' must neither fail nor collide
    await plane.add_message("alice", event("out:a/b", ts=40.0, text="slash"))
    await plane.add_message("alice", event("out:a%2Fb", ts=41.0, text="percent"))
    assert [m["eventId"] for m in await plane.messages("alice", limit=2)] == [
        "out:a/b",
        "out:a%2Fb",
    ]


async def test_put_link_record_merges(store: Store) -> None:
    plane = store.open()
    info_of = plane.link_record  # type: ignore[attr-defined]
    assert await info_of("alice") is None
    await plane.put_link_record("alice", {"jid": "1@s.whatsapp.net", "phone": "+1"})
    await plane.put_link_record("alice", {"pushName": "Alice", "phone": "+2"})
    assert await info_of("alice") == {
        "jid": "1@s.whatsapp.net",
        "phone": "+2",
        "pushName": "Alice",
    }
    await plane.put_link_record("alice", {"pushName": None})
    assert await info_of("alice") == {"jid": "1@s.whatsapp.net", "phone": "+2"}
    assert await plane.get("alice") is None  # a different collection


async def test_summaries_are_versioned_per_chat_and_idempotent(store: Store) -> None:
    plane = store.open()
    chat, other = "5511988887777@s.whatsapp.net", "120363000@g.us"
    assert await plane.summaries("alice", chat) == []
    await plane.add_summary("alice", chat, 1, "They like tea.")
    await plane.add_summary("alice", chat, 2, "They like tea and cake.")
    await plane.add_summary("alice", chat, 2, "They like tea and cake.")  # a re-sent frame
    await plane.add_summary("alice", other, 1, "A group about cats.")
    await plane.add_summary("bob", chat, 1, "Bob's own chat.")
    got = await plane.summaries("alice", chat)
    assert [(s["number"], s["text"]) for s in got] == [
        (1, "They like tea."), (2, "They like tea and cake.")]
    assert all(s["userId"] == "alice" and s["chatId"] == chat for s in got)


def _usage(day: str, turns: int, tokens: int) -> Usage:
    return Usage(seq=1, day=day, turns=turns, input_tokens=tokens, output_tokens=2 * tokens,
                 cache_creation_tokens=3, cache_read_tokens=4, cost_usd=0.125, messages_in=5,
                 messages_out=6, transcription_seconds=1.5)


async def test_usage_is_one_document_per_user_and_day_holding_absolute_totals(
        store: Store) -> None:
    plane = store.open()
    await plane.put_usage("alice", _usage("2026-12-03", 1, 10))
    await plane.put_usage("alice", _usage("2026-12-04", 1, 10))
    await plane.put_usage("alice", _usage("2026-12-04", 2, 30))  # the day's newer totals
    await plane.put_usage("alice", _usage("2026-12-04", 2, 30))  # a re-sent frame
    await plane.put_usage("alice_", _usage("2026-12-04", 9, 90))  # '_' in a user id
    got = await plane.usage("alice", "2026-12-04")
    assert [(u["userId"], u["day"], u["turns"], u["inputTokens"], u["outputTokens"])
            for u in got] == [("alice", "2026-12-04", 2, 30, 60)]
    assert (got[0]["cacheCreationTokens"], got[0]["cacheReadTokens"], got[0]["costUsd"],
            got[0]["messagesIn"], got[0]["messagesOut"], got[0]["transcriptionSeconds"]) == (
        3, 4, 0.125, 5, 6, 1.5)
    assert [(u["userId"], u["day"]) for u in await plane.usage(None, "2026-12-01")] == [
        ("alice", "2026-12-03"), ("alice", "2026-12-04"), ("alice_", "2026-12-04")]
    assert usage_doc_id("alice_", "2026-12-04") == "alice%5F__2026-12-04"


async def test_colliding_ids_never_reach_another_users_records(store: Store) -> None:
    """User ids may contain '_': user ``alice`` writing event ``_in:X`` once wrote user
    ``alice_``'s message ``in:X`` (both ``alice___in:X``), and likewise for summaries. Each
    user's records stay their own, and re-sent frames stay idempotent."""
    plane = store.open()
    await plane.add_message("alice_", event("in:X", ts=10.0, text="victim's"))
    await plane.add_summary("alice_", "c__v1", 2, "victim's summary")
    await plane.add_message("alice", event("_in:X", ts=11.0, text="attacker's"))
    await plane.add_summary("alice", "_c__v1", 2, "attacker's summary")
    assert [(m["userId"], m["eventId"], m["text"]) for m in await plane.messages("alice_")] == [
        ("alice_", "in:X", "victim's")]
    assert [(m["userId"], m["eventId"], m["text"]) for m in await plane.messages("alice")] == [
        ("alice", "_in:X", "attacker's")]
    assert [(s["userId"], s["text"]) for s in await plane.summaries("alice_", "c__v1")] == [
        ("alice_", "victim's summary")]
    assert [s["text"] for s in await plane.summaries("alice", "_c__v1")] == [
        "attacker's summary"]
    await plane.add_message("alice", event("_in:X", ts=11.0, text="attacker's, again"))
    assert [m["text"] for m in await plane.messages("alice")] == ["attacker's, again"]
    assert [m["text"] for m in await plane.messages("alice_")] == ["victim's"]


@pytest.mark.parametrize(("parts", "other"), [
    (("alice", "_in:X"), ("alice_", "in:X")),
    (("a", "b__c"), ("a__b", "c")),
    (("a%5F", "x"), ("a_", "x")),
    (("u", "a/b"), ("u", "a%2Fb")),
])
def test_message_doc_ids_are_injective(parts: tuple[str, str], other: tuple[str, str]) -> None:
    assert message_doc_id(*parts) != message_doc_id(*other)
    for user, ev in (parts, other):
        doc_id = message_doc_id(user, ev)
        assert "/" not in doc_id and doc_id.count("_") == 2, doc_id  # only the separator


async def test_user_ids_that_cannot_name_a_document_are_refused(store: Store) -> None:
    plane = store.open()
    for bad in ("", "a/b", "__x__", ".."):
        with pytest.raises(UserIdError):
            await plane.update(bad, {"status": "x"})
    odd = "a b:c@d.e%f"
    await plane.request(odd, DocStatus.CREATE_REQUESTED)
    assert [d.user_id for d in await plane.list_accounts()] == [odd]


# -- Firestore specifics --------------------------------------------------------------------


@pytest.mark.firestore
async def test_firestore_watch_resubscribes_after_losing_its_listener(
    firestore_emulator: str,
) -> None:
    config = emulator_config(firestore_emulator)
    plane, writer = FirestorePlane(config), FirestorePlane(config)
    try:
        await writer.request("alice", DocStatus.CREATE_REQUESTED)
        await writer.request("bob", DocStatus.CREATE_REQUESTED)
        seen = Collector()
        await plane.watch(seen)
        await seen.until(doc_of("alice"), FIRST_TIMEOUT)
        await seen.until(doc_of("bob"), FIRST_TIMEOUT)

        listener = plane._listener  # simulate a stream that died for good
        assert listener is not None
        await asyncio.to_thread(listener.close)
        mark = len(seen.all)
        await writer.delete("alice")
        await writer.request("carol", DocStatus.CREATE_REQUESTED)
        # the supervisor notices (0.5 s), backs off (~0.5 s), re-subscribes and re-syncs:
        # the deletion it missed arrives as Removed
        await seen.saw(removed("alice"), mark, 10.0)
        await seen.saw(doc_of("carol"), mark, 10.0)
        assert plane._listener is not None and plane._listener is not listener

        # rewatch (the controller's resync found a request the feed missed) does the same
        listener, mark = plane._listener, len(seen.all)
        await plane.rewatch()
        await writer.request("dave", DocStatus.CREATE_REQUESTED)
        await seen.saw(doc_of("dave"), mark, 10.0)
        await seen.saw(doc_of("bob"), mark, 10.0)  # the fresh feed delivers all again
        assert plane._listener is not None and plane._listener is not listener
    finally:
        await plane.close()
        await writer.close()


@pytest.mark.firestore
@pytest.mark.slow  # ~15 s: a private emulator is stopped and restarted
async def test_firestore_watch_survives_an_outage_without_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_emulator()
    monkeypatch.setattr(firestore_plane, "BACKOFF_MAX", 2.0)  # production: 30 s
    with emulator_helper.running() as private:
        config = emulator_config(private.address)
        plane = FirestorePlane(config, deadline=5.0)
        try:
            seen = Collector()
            await plane.watch(seen)
            await plane.request("alice", DocStatus.CREATE_REQUESTED)
            await seen.until(doc_of("alice"), FIRST_TIMEOUT)

            await asyncio.to_thread(private.stop)
            started = time.monotonic()
            with pytest.raises(PlaneUnavailable):
                await plane.get("alice")
            assert time.monotonic() - started < 10.0
            cpu = time.process_time()
            await asyncio.sleep(3.0)
            spent = time.process_time() - cpu
            assert spent < 1.0, f"{spent:.2f} s CPU in 3 s while the backend was down"

            await asyncio.to_thread(private.start)
            # the restarted emulator is empty: the listener re-syncs and reports the loss
            await seen.until(removed("alice"), 45.0)
            await plane.request("bob", DocStatus.CREATE_REQUESTED)
            await seen.until(doc_of("bob"), 5.0)
        finally:
            await plane.close()


async def test_firestore_unreachable_backend_raises_plane_unavailable() -> None:
    config = FirebaseConfig(
        emulator_host=f"127.0.0.1:{emulator_helper.free_port()}", project_id="demo-down"
    )
    plane = FirestorePlane(config, deadline=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(PlaneUnavailable) as info:
            await plane.update("alice", {"status": "x"})
        assert time.monotonic() - started < 10.0
        assert info.value.code == "plane_unavailable"
    finally:
        await plane.close()


def test_map_error_maps_google_errors_in_one_place() -> None:
    from google.api_core import exceptions as gx  # noqa: PLC0415
    from google.auth import exceptions as ax  # noqa: PLC0415

    assert isinstance(map_error(gx.ServiceUnavailable("down")), PlaneUnavailable)
    assert isinstance(map_error(gx.DeadlineExceeded("slow")), PlaneUnavailable)
    assert isinstance(map_error(gx.RetryError("gave up", None)), PlaneUnavailable)
    assert isinstance(map_error(ax.TransportError("no route")), PlaneUnavailable)
    assert isinstance(map_error(gx.PermissionDenied("rules")), PlaneDenied)
    assert isinstance(map_error(ax.RefreshError("bad key")), PlaneDenied)
    other = map_error(gx.FailedPrecondition("needs an index"))
    assert type(other) is PlaneError and "needs an index" in str(other)
    # the SDK hides the real error behind its rollback's ValueError
    try:
        try:
            raise gx.ServiceUnavailable("down")
        except gx.ServiceUnavailable:
            raise ValueError("Cannot rollback") from None
    except ValueError as wrapped:
        wrapped.__context__ = gx.ServiceUnavailable("down")
        assert isinstance(map_error(wrapped), PlaneUnavailable)
    assert map_error(ValueError("a bug")) is None
    assert map_error(KeyError("a bug")) is None


def test_firestore_config_errors_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)

    def problem(config: FirebaseConfig) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            FirestorePlane(config)
        return info.value

    err = problem(FirebaseConfig())
    assert err.key == "firebase.credentials" and "CREDENTIALS_DIRECTORY" in err.problem

    err = problem(FirebaseConfig(credentials=str(tmp_path / "missing.json")))
    assert err.key == "firebase.credentials" and "does not exist" in err.problem

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    err = problem(FirebaseConfig(credentials=str(garbage)))
    assert err.key == "firebase.credentials" and "not JSON" in err.problem

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"type": "authorized_user"}), encoding="utf-8")
    err = problem(FirebaseConfig(credentials=str(wrong)))
    assert err.key == "firebase.credentials" and "service-account" in err.problem

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"type": "service_account", "project_id": "p"}), "utf-8")
    err = problem(FirebaseConfig(credentials=str(broken)))
    assert err.key == "firebase.credentials" and "not a usable" in err.problem

    unreadable = tmp_path / "dir.json"
    unreadable.mkdir()
    err = problem(FirebaseConfig(credentials=str(unreadable)))
    assert err.key == "firebase.credentials" and "cannot be read" in err.problem

    creds_dir = tmp_path / "creds"
    creds_dir.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds_dir))
    err = problem(FirebaseConfig())
    assert err.key == "firebase.credentials" and str(creds_dir / "firebase") in err.problem

    err = problem(FirebaseConfig(emulator_host="127.0.0.1:8080"))
    assert err.key == "firebase.project_id"


def test_firestore_plane_from_a_service_account_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A well-formed key builds a plane without touching the network (project from the key,
    $CREDENTIALS_DIRECTORY/firebase as the path, $FIRESTORE_EMULATOR_HOST ignored)."""
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    key = {
        "type": "service_account",
        "project_id": "wabridge-prod",
        "private_key_id": "0" * 40,
        "private_key": pem,
        "client_email": "bridge@wabridge-prod.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    (tmp_path / "firebase").write_text(json.dumps(key), encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", "127.0.0.1:1")
    plane = FirestorePlane(FirebaseConfig())
    assert plane.project == "wabridge-prod"
    assert plane._client._emulator_host is None
    asyncio.run(plane.close())


# -- local specifics ------------------------------------------------------------------------


async def test_local_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    await LocalPlane(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(SchemaTooNew) as info:
        LocalPlane(path)
    assert info.value.exit_code == ExitCode.SCHEMA_TOO_NEW  # do not restart, like the worker
    assert f"schema version {SCHEMA_VERSION + 1}" in info.value.message
    assert f"({SCHEMA_VERSION})" in info.value.message
    assert "upgrade wabridge" in str(info.value)
    with sqlite3.connect(path) as db:  # refused, not modified
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == (
            SCHEMA_VERSION + 1
        )
    db.close()


async def test_local_reopen_keeps_data_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    plane = LocalPlane(path)
    await plane.request("alice", DocStatus.CREATE_REQUESTED)
    await plane.close()
    again = LocalPlane(path)
    try:
        assert (await again.get("alice")) is not None
        mode = again._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        await again.close()


async def test_local_bad_database_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError) as info:
        LocalPlane(path)
    assert info.value.key == "controller.local_db"


async def test_local_watch_sees_writes_of_another_process(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    plane = LocalPlane(path)
    try:
        seen = Collector()
        await plane.watch(seen)
        script = (
            "import asyncio, sys\n"
            "from controller.local import LocalPlane\n"
            "from wabridge.status import DocStatus\n"
            "async def main():\n"
            "    p = LocalPlane(sys.argv[1])\n"
            "    await p.request('zed', DocStatus.CREATE_REQUESTED)\n"
            "    await p.close()\n"
            "asyncio.run(main())\n"
        )
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", script, str(path)],
            cwd=REPO,
            check=True,
            timeout=60,
        )
        await seen.until(doc_of("zed", DocStatus.CREATE_REQUESTED))
    finally:
        await plane.close()


async def test_local_watch_resyncs_when_the_change_feed_was_pruned(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    plane, writer = LocalPlane(path), LocalPlane(path)
    try:
        await writer.request("alice", DocStatus.CREATE_REQUESTED)
        await writer.request("bob", DocStatus.CREATE_REQUESTED)
        seen = Collector()
        await plane.watch(seen)
        await seen.until(doc_of("alice"))
        await seen.until(doc_of("bob"))
        mark = len(seen.all)
        db = sqlite3.connect(path, isolation_level=None)
        try:  # one transaction: alice goes, carol comes, and the feed loses those rows
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM user_sessions WHERE user_id = 'alice'")
            db.execute(
                "INSERT INTO user_sessions (user_id, fields) VALUES ('carol', ?)",
                (json.dumps({"status": "create_requested"}),),
            )
            db.execute("DELETE FROM changes WHERE id < (SELECT MAX(id) FROM changes)")
            db.execute("COMMIT")
        finally:
            db.close()
        await seen.saw(removed("alice"), mark)
        await seen.saw(doc_of("carol"), mark)
    finally:
        await plane.close()
        await writer.close()


async def test_local_change_feed_prunes_itself(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    plane = LocalPlane(path)
    try:
        await plane.request("alice", DocStatus.CREATE_REQUESTED)
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            for i in range(5000):
                db.execute(
                    "UPDATE user_sessions SET fields = ? WHERE user_id = 'alice'",
                    (json.dumps({"n": i}),),
                )
            db.execute("COMMIT")
            count, low, high = db.execute(
                "SELECT COUNT(*), MIN(id), MAX(id) FROM changes"
            ).fetchone()
        finally:
            db.close()
        assert high == 5001
        assert count == high - low + 1  # the newest rows, contiguous
        assert 4096 <= count < 4096 + 256
    finally:
        await plane.close()


def test_message_doc_ids_are_valid_and_distinct() -> None:
    assert message_doc_id("alice", "in:ABC") == "alice__in:ABC"  # unchanged by the encoding
    assert message_doc_id("a/b", "in:x%y") == "a%2Fb__in:x%25y"
    assert message_doc_id("alice_", "in:X") == "alice%5F__in:X"
    assert message_doc_id("u", "a/b") != message_doc_id("u", "a%2Fb")


@pytest.mark.firestore
async def test_firestore_never_replaces_a_record_another_user_owns(
        firestore_emulator: str) -> None:
    """A message document already under the id a write computes (written before ids were
    injective, or by hand) but owned by another user is kept; the write is refused with
    ``not_your_record``."""
    plane = FirestorePlane(emulator_config(firestore_emulator), deadline=10.0)
    try:
        ref = plane._client.collection(firestore_plane.MESSAGES).document(
            message_doc_id("alice", "in:1"))
        ref.set({"userId": "alice_", "eventId": "in:1", "text": "victim's", "ts": 1.0})
        with pytest.raises(ForeignRecordError) as info:
            await plane.add_message("alice", event("in:1", ts=2.0, text="attacker's"))
        assert info.value.code == "not_your_record" and "'alice_'" in str(info.value)
        assert (ref.get().to_dict() or {})["text"] == "victim's"
        # the owner's own re-sent record is rewritten as before
        await plane.add_message("bob", event("in:1", ts=3.0, text="bob's"))
        await plane.add_message("bob", event("in:1", ts=3.0, text="bob's, again"))
        assert [m["text"] for m in await plane.messages("bob")] == ["bob's, again"]
    finally:
        await plane.close()


async def test_local_migration_keys_records_by_user(tmp_path: Path) -> None:
    """A schema-2 file (records keyed by ``{user}__{event}`` strings) keeps every record
    when it is migrated, and afterwards the formerly colliding pair stays apart."""
    path = tmp_path / "control.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE schema_version (version INTEGER NOT NULL);"
        "INSERT INTO schema_version VALUES (2);"
        "CREATE TABLE user_sessions (user_id TEXT PRIMARY KEY, fields TEXT NOT NULL);"
        "CREATE TABLE sessions (user_id TEXT PRIMARY KEY, fields TEXT NOT NULL);"
        "CREATE TABLE messages (doc_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
        "ts REAL NOT NULL, fields TEXT NOT NULL);"
        "CREATE INDEX messages_by_user_ts ON messages (user_id, ts);"
        "CREATE TABLE changes (id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL);"
        "CREATE TABLE summaries (doc_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
        "chat_id TEXT NOT NULL, number INTEGER NOT NULL, fields TEXT NOT NULL);")
    old = {"userId": "alice_", "eventId": "in:X", "chatId": "c", "direction": "in",
           "sender": "s", "text": "victim's", "ts": 5.0}
    db.execute("INSERT INTO messages VALUES ('alice___in:X', 'alice_', 5.0, ?)",
               (json.dumps(old),))
    db.execute("INSERT INTO summaries VALUES ('alice___c__v1', 'alice_', 'c', 1, ?)",
               (json.dumps({"userId": "alice_", "chatId": "c", "number": 1, "text": "t"}),))
    db.commit()
    db.close()
    plane = LocalPlane(path)
    try:
        assert await plane.messages("alice_") == [old]
        assert [s["text"] for s in await plane.summaries("alice_", "c")] == ["t"]
        await plane.add_message("alice", event("_in:X", ts=6.0, text="attacker's"))
        assert await plane.messages("alice_") == [old]
    finally:
        await plane.close()


# -- PostgreSQL specifics -------------------------------------------------------------------


@pytest.fixture
def pg_schema(postgres: Cluster) -> Callable[..., PostgresPlane]:
    """Planes on one fresh schema of the session's cluster (closed by the test)."""
    schema = f"plane_{uuid.uuid4().hex[:12]}"

    def make(**kwargs: object) -> PostgresPlane:
        return PostgresPlane(postgres.conninfo(), schema=schema, **kwargs)  # type: ignore[arg-type]

    return make


def _superuser(cluster: Cluster) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(cluster.conninfo(), autocommit=True)


async def _kill_listener(cluster: Cluster, plane: PostgresPlane) -> None:
    """What a server restart or a network cut does to the feed's connection."""
    def kill() -> int:
        with _superuser(cluster) as conn:
            return len(conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s", (f"wabridge feed {plane.schema}",)).fetchall())

    assert await asyncio.to_thread(kill) == 1


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        await asyncio.sleep(0.05)


async def test_postgres_a_notify_missed_while_the_listener_was_down_is_caught_by_resync(
        postgres: Cluster, pg_schema: Callable[..., PostgresPlane],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY is not durable: a request written while the feed's connection is lost is never
    heard. ``feed_alive`` says so at once (the controller's watchdog sees it), the request is
    among ``pending_requests`` (the controller's resync), and ``rewatch`` delivers it."""
    monkeypatch.setattr(pgplane, "BACKOFF_MIN", 60.0)  # the feed stays down on its own
    plane, writer = pg_schema(), pg_schema()
    try:
        seen = Collector()
        await plane.watch(seen)
        await writer.request("alice", DocStatus.CREATE_REQUESTED)
        await seen.until(doc_of("alice"))
        assert plane.feed_alive()
        await _kill_listener(postgres, plane)
        await _until(lambda: not plane.feed_alive(), 5.0, "reported lost")
        mark = len(seen.all)
        await writer.request("bob", DocStatus.CREATE_REQUESTED)
        await asyncio.sleep(1.0)
        assert not any(doc_of("bob")(c) for c in seen.all[mark:]), "heard while down?"
        assert "bob" in {d.user_id for d in await plane.pending_requests()}
        await plane.rewatch()
        assert plane.feed_alive()
        await seen.saw(doc_of("bob", DocStatus.CREATE_REQUESTED), mark)
        await writer.request("carol", DocStatus.CREATE_REQUESTED)  # and it listens again
        await seen.saw(doc_of("carol"), mark)
    finally:
        await plane.close()
        await writer.close()


async def test_postgres_feed_reopens_itself_and_reads_what_it_missed(
        postgres: Cluster, pg_schema: Callable[..., PostgresPlane]) -> None:
    plane, writer = pg_schema(), pg_schema()
    try:
        await writer.request("alice", DocStatus.CREATE_REQUESTED)
        seen = Collector()
        await plane.watch(seen)
        await seen.until(doc_of("alice"))
        await _kill_listener(postgres, plane)
        await _until(lambda: not plane.feed_alive(), 5.0, "reported lost")
        mark = len(seen.all)
        await writer.delete("alice")
        await writer.request("bob", DocStatus.CREATE_REQUESTED)
        # re-opened after ~0.5 s: the deletion it did not hear arrives as Removed
        await seen.saw(removed("alice"), mark, 10.0)
        await seen.saw(doc_of("bob"), mark, 10.0)
        assert plane.feed_alive()
        await writer.request("carol", DocStatus.CREATE_REQUESTED)
        await seen.saw(doc_of("carol"), mark)
    finally:
        await plane.close()
        await writer.close()


async def test_postgres_a_burst_of_100_requests_is_all_delivered(
        postgres: Cluster, pg_schema: Callable[..., PostgresPlane]) -> None:
    """100 requests, each its own transaction, from another client's connection (and one
    written by hand in SQL, as an operator might: the trigger notifies whoever writes)."""
    plane = pg_schema()
    try:
        seen = Collector()
        await plane.watch(seen)
        users = [f"u{i:03}" for i in range(100)]

        def burst() -> None:
            with _superuser(postgres) as conn:
                conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(
                    psycopg.sql.Identifier(plane.schema)))
                for user in users:
                    conn.execute("INSERT INTO accounts (user_id, fields) VALUES (%s, %s)",
                                 (user, json.dumps({"status": "create_requested"})))

        await asyncio.to_thread(burst)
        await _until(lambda: {c.user_id for c in seen.all if doc_of(c.user_id,
                     DocStatus.CREATE_REQUESTED)(c)} >= set(users), 10.0, "all delivered")
        # the status column is derived from what the client wrote
        assert {d.user_id for d in await plane.pending_requests()} == set(users)
        # and through the plane, 100 writes in flight at once
        writer = pg_schema()
        try:
            mark = len(seen.all)
            await asyncio.gather(*(writer.request(u, DocStatus.DESTROY_REQUESTED)
                                   for u in users))
            await _until(lambda: {c.user_id for c in seen.all[mark:] if doc_of(
                c.user_id, DocStatus.DESTROY_REQUESTED)(c)} == set(users), 10.0, "all delivered")
        finally:
            await writer.close()
    finally:
        await plane.close()


async def test_postgres_concurrent_merges_lose_nothing(
        postgres: Cluster, pg_schema: Callable[..., PostgresPlane]) -> None:
    """A merge that waits for another host's merge of the same document reads what that one
    wrote (the row is held from the read to the write), and merges from two planes at once
    (the first write creating the document) keep every field."""
    first, second = pg_schema(), pg_schema()
    try:
        await asyncio.gather(
            *(first.update("alice", {"settings": {f"a{i}": i}}) for i in range(20)),
            *(second.update("alice", {"settings": {f"b{i}": i}}) for i in range(20)))
        doc = await first.get("alice")
        assert doc is not None
        assert doc.settings == {**{f"a{i}": i for i in range(20)},
                                **{f"b{i}": i for i in range(20)}}
        assert isinstance(doc.data["updatedAt"], float)  # the database's clock

        with _superuser(postgres) as other:  # another host, in the middle of its merge
            other.execute(psycopg.sql.SQL("SET search_path TO {}").format(
                psycopg.sql.Identifier(first.schema)))
            other.execute("BEGIN")
            other.execute("UPDATE accounts SET fields = %s WHERE user_id = 'alice'",
                          (json.dumps({"settings": {"other": 1}}),))
            waiting = asyncio.create_task(first.update("alice", {"settings": {"mine": 2}}))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            other.execute("COMMIT")
            await waiting
        doc = await second.get("alice")
        assert doc is not None and doc.settings == {"other": 1, "mine": 2}
    finally:
        await first.close()
        await second.close()


async def test_postgres_refuses_a_newer_schema(
        postgres: Cluster, pg_schema: Callable[..., PostgresPlane]) -> None:
    plane = pg_schema()
    await plane.request("alice", DocStatus.CREATE_REQUESTED)
    await plane.close()
    with _superuser(postgres) as conn:
        conn.execute(psycopg.sql.SQL("UPDATE {}.schema_version SET version = %s").format(
            psycopg.sql.Identifier(plane.schema)), (pgplane.SCHEMA_VERSION + 1,))
    again = pg_schema()
    try:
        with pytest.raises(SchemaTooNew) as info:
            await again.get("alice")
        assert info.value.exit_code == ExitCode.SCHEMA_TOO_NEW
        assert f"schema version {pgplane.SCHEMA_VERSION + 1}" in info.value.message
        assert plane.schema in info.value.message
    finally:
        await again.close()
    with _superuser(postgres) as conn:  # refused, not modified
        version = conn.execute(psycopg.sql.SQL("SELECT version FROM {}.schema_version").format(
            psycopg.sql.Identifier(plane.schema))).fetchone()
        assert version == (pgplane.SCHEMA_VERSION + 1,)


async def test_postgres_refused_login_is_denied_and_no_server_is_unavailable(
        postgres: Cluster) -> None:
    with _superuser(postgres) as conn:
        conn.execute("CREATE ROLE plane_ctl LOGIN PASSWORD 'right'")
    wrong = PostgresPlane(postgres.url("plane_ctl"), password="wrong", deadline=1.0)
    try:
        with pytest.raises(PlaneDenied) as denied:
            await wrong.list_accounts()
        assert "password" in str(denied.value) and "wrong" not in str(denied.value)
    finally:
        await wrong.close()
    down = PostgresPlane(f"postgresql://ctl@127.0.0.1:{emulator_helper.free_port()}/x",
                         deadline=1.0)  # constructing connects to nothing
    try:
        started = time.monotonic()
        with pytest.raises(PlaneUnavailable):
            await down.update("alice", {"status": "x"})
        assert time.monotonic() - started < 10.0
    finally:
        await down.close()


async def test_postgres_plane_is_chosen_and_checked_with_the_controllers_credential(
        postgres: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``control_plane = "postgres"``: the controller logs in as its role with the
    ``postgres-password`` credential (as for storage), and ``wabridgectl doctor`` reports the
    plane's schema, then its version and documents once the controller made it."""
    from controller import doctor, planes  # noqa: PLC0415
    from wabridge import config  # noqa: PLC0415

    database = f"plane_{uuid.uuid4().hex[:8]}"
    with _superuser(postgres) as conn:
        conn.execute("DROP ROLE IF EXISTS plane_owner")
        conn.execute("CREATE ROLE plane_owner LOGIN PASSWORD 'owner-secret'")
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {} OWNER plane_owner").format(
            psycopg.sql.Identifier(database)))
    (tmp_path / "postgres-password").write_text("owner-secret\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = config.with_overrides(
        config.with_overrides(config.Config(), "controller", control_plane="postgres"),
        "storage", postgres_url=postgres.url("plane_owner", database))
    assert planes.plane_kind(cfg) == "postgres"
    check = await asyncio.to_thread(doctor.check_plane, cfg, None)
    assert check.status == "fail" and "does not exist" in check.message, check
    plane = planes.choose_plane(cfg)
    try:
        assert plane.name == "postgres"
        await plane.request("alice", DocStatus.CREATE_REQUESTED)
    finally:
        await plane.close()
    check = await asyncio.to_thread(doctor.check_plane, cfg, "postgres")
    assert check.status == "ok", check
    assert check.message == (f"PostgreSQL plane postgresql plane_owner@127.0.0.1:"
                             f"{postgres.port}/{database} schema wabridge_plane version "
                             f"{pgplane.SCHEMA_VERSION}, 1 accounts")
    (tmp_path / "postgres-password").write_text("wrong\n", encoding="utf-8")
    check = await asyncio.to_thread(doctor.check_plane, cfg, "postgres")
    assert check.status == "fail" and "password" in check.message and "wrong" not in (
        check.message)


def _pg_ctl(cluster: Cluster, *args: str) -> None:
    """``pg_ctl`` on a private cluster (tests/postgres_cluster.py's layout), as its owner."""
    owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*owner, str(postgres_cluster.bin_dir() / "pg_ctl"),
                    "-D", str(cluster.socket_dir / "data"), *args],
                   check=True, capture_output=True, timeout=60)


@pytest.mark.slow  # a private cluster, stopped for a few seconds
async def test_postgres_plane_rides_out_a_server_restart() -> None:
    """While the server is down a call fails with PlaneUnavailable after its deadline and the
    feed says it is not alive; once it is back both connections re-open by themselves and
    the feed delivers again."""
    reason = postgres_cluster.available()
    if reason is not None:
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    with postgres_cluster.running() as private:
        plane = PostgresPlane(private.conninfo(), schema="p", deadline=2.0)
        writer = PostgresPlane(private.conninfo(), schema="p", deadline=30.0)
        claimer = PostgresPlane(private.conninfo(), schema="p", deadline=30.0)
        try:
            seen = Collector()
            await plane.watch(seen)
            await writer.request("alice", DocStatus.CREATE_REQUESTED)
            await seen.until(doc_of("alice"))
            assert await claimer.get("alice") is not None  # its connection, idle from here
            await asyncio.to_thread(_pg_ctl, private, "-m", "fast", "-w", "stop")
            await _until(lambda: not plane.feed_alive(), 15.0, "reported lost")
            started = time.monotonic()
            with pytest.raises(PlaneUnavailable):
                await plane.get("alice")
            assert time.monotonic() - started < 10.0
            options = (f"-k {private.socket_dir} -p {private.port} -c listen_addresses="
                       f"{postgres_cluster.HOST} -c fsync=off")
            await asyncio.to_thread(_pg_ctl, private, "-o", options, "-l",
                                    str(private.socket_dir / "log"), "-w", "start")
            mark = len(seen.all)
            await writer.request("bob", DocStatus.CREATE_REQUESTED)
            await seen.saw(doc_of("bob"), mark, 15.0)
            assert plane.feed_alive()
            got = await plane.get("bob")
            assert got is not None and got.status == DocStatus.CREATE_REQUESTED
            # a claim is never sent twice, but one that cannot have been sent is retried
            assert await claimer.claim("bob", frozenset({DocStatus.CREATE_REQUESTED}),
                                       DocStatus.STARTING, "host-a")
        finally:
            await plane.close()
            await writer.close()
            await claimer.close()


async def test_postgres_plane_is_out_of_the_accounts_roles_reach(
        postgres: Cluster, pg_schema: Callable[..., PostgresPlane]) -> None:
    """A worker's own role (controller/pg_roles.py) can neither read nor write the plane."""
    from controller import pg_roles  # noqa: PLC0415
    from wabridge.postgres import account_role  # noqa: PLC0415

    plane = pg_schema()
    await plane.request("alice", DocStatus.CREATE_REQUESTED)
    user = f"reader-{uuid.uuid4().hex[:6]}"
    with _superuser(postgres) as admin:
        password = pg_roles.provision(admin, user)
    try:
        with psycopg.connect(postgres.url(account_role(user)),
                             password=password, autocommit=True) as worker:
            table = psycopg.sql.Identifier(plane.schema, "accounts")
            for statement in ("SELECT fields FROM {}", "UPDATE {} SET fields = '{{}}'"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    worker.execute(psycopg.sql.SQL(statement).format(table))
    finally:
        await plane.close()
