"""The fleet's leases in PostgreSQL (wabridge/fleet_db.py), against the test session's real
cluster: who may take an account, when, and how a stale owner is fenced out."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from postgres_cluster import Cluster

from agent.store import PostgresTarget, Store
from agent.whatsapp.events import IncomingMessage
from controller import pg_roles
from wabridge import fleet_db
from wabridge import postgres as pg
from wabridge.errors import LeaseLost, SchemaTooNew
from wabridge.postgres import account_role

Admin = psycopg.Connection[tuple[Any, ...]]
_counter = iter(range(1_000_000))


@pytest.fixture
def admin(postgres: Cluster) -> Iterator[Admin]:
    with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
        fleet_db.migrate(conn)
        yield conn


@pytest.fixture
def user() -> str:
    """A fresh account id per test (the schema is shared by the session)."""
    return f"lease-user-{next(_counter)}-{time.monotonic_ns()}"


def _acquire(admin: Admin, user: str, host: str, *, grace: float = 10.0,
             lease: float = 30.0) -> fleet_db.Lease | None:
    return fleet_db.acquire(admin, user, account_role(user), host, grace, lease)


def _expire(admin: Admin, user: str, seconds_ago: float) -> None:
    """Move the lease's expiry into the past, as time passing would (database time)."""
    admin.execute("UPDATE wabridge_fleet.leases SET expires_at = now() - make_interval(secs "
                  "=> %s) WHERE user_id = %s", (seconds_ago, user))


def test_migrate_is_idempotent_and_refuses_a_newer_schema(admin: Admin) -> None:
    fleet_db.migrate(admin)
    fleet_db.migrate(admin)
    row = admin.execute("SELECT MAX(version) FROM wabridge_fleet.schema_version").fetchone()
    assert row == (len(fleet_db.MIGRATIONS),)
    admin.execute("UPDATE wabridge_fleet.schema_version SET version = version + 1")
    try:
        with pytest.raises(SchemaTooNew, match="wabridge_fleet"):
            fleet_db.migrate(admin)
    finally:
        admin.execute("UPDATE wabridge_fleet.schema_version SET version = version - 1")


def test_concurrent_migrations_of_a_fresh_database_agree(postgres: Cluster) -> None:
    with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS fleet_fresh")
        conn.execute("CREATE DATABASE fleet_fresh")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(postgres.conninfo("fleet_fresh"), autocommit=True) as conn:
                fleet_db.migrate(conn)
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(postgres.conninfo("fleet_fresh"), autocommit=True) as conn:
        assert conn.execute("SELECT COUNT(*), MAX(version) FROM wabridge_fleet.schema_version"
                            ).fetchone() == (1, len(fleet_db.MIGRATIONS))


def test_a_free_account_is_taken_and_then_held_against_other_hosts(admin: Admin,
                                                                   user: str) -> None:
    got = _acquire(admin, user, "host-a", lease=30)
    assert got is not None
    assert (got.user_id, got.host_id, got.epoch, got.released) == (user, "host-a", 1, False)
    assert 29 < got.expires_in <= 30
    assert _acquire(admin, user, "host-b") is None  # held, unexpired
    _expire(admin, user, 5)  # expired, but within the grace period
    assert _acquire(admin, user, "host-b", grace=10) is None
    _expire(admin, user, 11)  # expired longer than the grace period: free
    taken = _acquire(admin, user, "host-b", grace=10)
    assert taken is not None and (taken.host_id, taken.epoch) == ("host-b", 2)
    current = fleet_db.lease(admin, user)
    assert current is not None and (current.host_id, current.epoch) == ("host-b", 2)
    assert [x.host_id for x in fleet_db.leases(admin) if x.user_id == user] == ["host-b"]


def test_the_holder_takes_it_again_with_a_new_epoch(admin: Admin, user: str) -> None:
    first = _acquire(admin, user, "host-a")
    again = _acquire(admin, user, "host-a")
    assert first is not None and again is not None
    assert again.epoch == first.epoch + 1
    assert not fleet_db.renew(admin, user, "host-a", first.epoch, 30)  # the old one is fenced


def test_renew_keeps_only_the_current_owners_lease(admin: Admin, user: str) -> None:
    got = _acquire(admin, user, "host-a", lease=30)
    assert got is not None
    _expire(admin, user, 1)  # expired but not taken: renewing it is safe
    assert fleet_db.renew(admin, user, "host-a", got.epoch, 30)
    current = fleet_db.lease(admin, user)
    assert current is not None and 29 < current.expires_in <= 30
    assert not fleet_db.renew(admin, user, "host-b", got.epoch, 30)
    assert not fleet_db.renew(admin, user, "host-a", got.epoch + 1, 30)
    assert not fleet_db.renew(admin, "nobody-" + user, "host-a", got.epoch, 30)


def test_release_frees_the_account_at_once_and_ends_the_owner(admin: Admin, user: str) -> None:
    got = _acquire(admin, user, "host-a", lease=30)
    assert got is not None
    assert not fleet_db.release(admin, user, "host-b", got.epoch)  # not b's to release
    assert fleet_db.release(admin, user, "host-a", got.epoch)
    assert not fleet_db.release(admin, user, "host-a", got.epoch)  # once
    assert not fleet_db.renew(admin, user, "host-a", got.epoch, 30)
    with pytest.raises(LeaseLost, match="released"):
        fleet_db.fence(admin, user, "host-a", got.epoch)
    taken = _acquire(admin, user, "host-b")  # no waiting for expiry + grace
    assert taken is not None and taken.epoch == got.epoch + 1


def test_fence_raises_for_a_stale_epoch_and_the_write_rolls_back(admin: Admin,
                                                                 user: str) -> None:
    old = _acquire(admin, user, "host-a")
    assert old is not None
    admin.execute("CREATE TABLE IF NOT EXISTS public.fenced_writes (user_id TEXT)")
    with admin.transaction():
        fleet_db.fence(admin, user, "host-a", old.epoch)  # current: no error
        admin.execute("INSERT INTO public.fenced_writes VALUES (%s)", (user,))
    _expire(admin, user, 60)
    new = _acquire(admin, user, "host-b")
    assert new is not None
    with pytest.raises(LeaseLost, match="host-b epoch 2"), admin.transaction():
        admin.execute("INSERT INTO public.fenced_writes VALUES (%s)", (user,))
        fleet_db.fence(admin, user, "host-a", old.epoch)
    assert admin.execute("SELECT COUNT(*) FROM public.fenced_writes WHERE user_id = %s",
                         (user,)).fetchone() == (1,)
    with pytest.raises(LeaseLost, match="no lease"):
        fleet_db.fence(admin, "nobody-" + user, "host-a", 1)


def test_two_controllers_racing_for_a_free_account_get_one_winner(postgres: Cluster,
                                                                  admin: Admin) -> None:
    """Both for a fresh row (the insert race) and for an expired one (the update race)."""
    for prepare in ("fresh", "expired"):
        user = f"race-{prepare}-{time.monotonic_ns()}"
        if prepare == "expired":
            assert _acquire(admin, user, "host-old") is not None
            _expire(admin, user, 100)
        barrier = threading.Barrier(2)
        won: dict[str, fleet_db.Lease | None] = {}

        def race(host: str, user: str = user, barrier: threading.Barrier = barrier,
                 won: dict[str, fleet_db.Lease | None] = won) -> None:
            with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
                barrier.wait()
                won[host] = fleet_db.acquire(conn, user, account_role(user), host, 10, 30)

        threads = [threading.Thread(target=race, args=(h,)) for h in ("host-a", "host-b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [h for h, got in won.items() if got is not None]
        assert len(winners) == 1, (prepare, won)
        current = fleet_db.lease(admin, user)
        assert current is not None and current.host_id == winners[0]


def test_a_take_waits_for_a_fenced_write_in_flight(postgres: Cluster, admin: Admin,
                                                   user: str) -> None:
    """The fence locks the row: a take either happens before the write's check (which then
    fails) or after its commit, never between the check and the commit. The owner's own
    renewals are not held up by it."""
    old = _acquire(admin, user, "host-a")
    assert old is not None
    _expire(admin, user, 60)
    with psycopg.connect(postgres.conninfo(), autocommit=True) as worker:
        worker.execute("BEGIN")
        fleet_db.fence(worker, user, "host-a", old.epoch)
        started = time.monotonic()
        assert _acquire(admin, user, "host-b") is None  # lock timeout: called held
        assert time.monotonic() - started >= 1.5
        started = time.monotonic()
        assert fleet_db.renew(admin, user, "host-a", old.epoch, 30)  # not held up
        assert time.monotonic() - started < 1.0
        worker.execute("COMMIT")
    _expire(admin, user, 60)  # (renewed above)
    taken = _acquire(admin, user, "host-b")
    assert taken is not None and taken.host_id == "host-b"


def test_hosts_heartbeats_draining_and_pins(admin: Admin) -> None:
    host = f"host-{time.monotonic_ns()}"
    fleet_db.heartbeat(admin, host, 12, 768)
    row = next(h for h in fleet_db.hosts(admin) if h.host_id == host)
    assert (row.max_workers, row.memory_mb, row.draining) == (12, 768, False)
    assert row.heartbeat_age is not None and 0 <= row.heartbeat_age < 5
    assert row.started_at is not None
    assert fleet_db.set_draining(admin, host, True)
    fleet_db.heartbeat(admin, host, 10, 600)  # a heartbeat keeps the draining flag
    row = next(h for h in fleet_db.hosts(admin) if h.host_id == host)
    assert (row.max_workers, row.memory_mb, row.draining) == (10, 600, True)
    assert not fleet_db.set_draining(admin, "no-such-" + host, True)
    fleet_db.pin(admin, "pinned-" + host, host)
    fleet_db.pin(admin, "pinned-" + host, "other")
    assert fleet_db.pins(admin)["pinned-" + host] == "other"
    fleet_db.unpin(admin, "pinned-" + host)
    assert "pinned-" + host not in fleet_db.pins(admin)


def test_an_account_role_reads_and_renews_only_its_own_lease(postgres: Cluster,
                                                             admin: Admin) -> None:
    suffix = time.monotonic_ns()
    alice, bob = f"alice-{suffix}", f"bob-{suffix}"
    alice_pw = pg_roles.provision(admin, alice, fleet=True)
    pg_roles.provision(admin, bob, fleet=True)
    mine = _acquire(admin, alice, "host-a")
    theirs = _acquire(admin, bob, "host-a")
    assert mine is not None and theirs is not None
    fleet_db.heartbeat(admin, "host-a", 1, 1)
    fleet_db.pin(admin, bob, "host-a")
    with psycopg.connect(postgres.url(account_role(alice)), password=alice_pw,
                         autocommit=True) as conn:
        assert [x.user_id for x in fleet_db.leases(conn)] == [alice]  # bob's row is hidden
        assert fleet_db.lease(conn, bob) is None
        assert fleet_db.renew(conn, alice, "host-a", mine.epoch, 30)
        assert not fleet_db.renew(conn, bob, "host-a", theirs.epoch, 30)
        with conn.transaction():
            fleet_db.fence(conn, alice, "host-a", mine.epoch)
        with pytest.raises(LeaseLost), conn.transaction():
            fleet_db.fence(conn, bob, "host-a", theirs.epoch)  # invisible: no lease
        for table in ("hosts", "placements"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT * FROM wabridge_fleet.{table}")  # noqa: S608
        for change in ("epoch = epoch + 1", "host_id = 'host-z'", "role = 'x'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"UPDATE wabridge_fleet.leases SET {change}")  # noqa: S608
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO wabridge_fleet.leases VALUES ('x', 'y', 'z', 1, now())")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM wabridge_fleet.leases")
        # a renewal far beyond any lease (a worker keeping its account for ever) is refused
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("UPDATE wabridge_fleet.leases SET expires_at = now() + "
                         "interval '2 hours' WHERE user_id = %s", (alice,))
        # an update of every row touches only its own (the policy)
        conn.execute("UPDATE wabridge_fleet.leases SET released = true")
        assert fleet_db.release(conn, alice, "host-a", mine.epoch) is False  # already
    theirs_now = fleet_db.lease(admin, bob)
    assert theirs_now is not None and not theirs_now.released


def test_fence_through_a_worker_store_connection(postgres: Cluster, admin: Admin) -> None:
    """The worker's own connection type (SQLite's conventions) works with every call."""
    user = f"store-{time.monotonic_ns()}"
    password = pg_roles.provision(admin, user, fleet=True)
    got = _acquire(admin, user, "host-a")
    assert got is not None
    conn = pg.connect(postgres.url(account_role(user)), account_role(user), password=password)
    try:
        with pg.immediate(conn):
            fleet_db.fence(conn, user, "host-a", got.epoch)
        assert fleet_db.renew(conn, user, "host-a", got.epoch, 30)
        assert fleet_db.release(conn, user, "host-a", got.epoch)
        with pytest.raises(LeaseLost), pg.immediate(conn):
            fleet_db.fence(conn, user, "host-a", got.epoch)
    finally:
        conn.close()


# --- the worker's store, fenced --------------------------------------------------------------
def _incoming(n: int) -> IncomingMessage:
    return IncomingMessage(wa_id=f"W{n}", chat_id="c@s.whatsapp.net", sender="c@s.whatsapp.net",
                           text=f"m{n}", timestamp=1.0)


def test_a_stale_owners_store_neither_acknowledges_nor_marks_a_send(postgres: Cluster,
                                                                    admin: Admin) -> None:
    user = f"fenced-{time.monotonic_ns()}"
    role = account_role(user)
    password = pg_roles.provision(admin, user, fleet=True)
    got = _acquire(admin, user, "host-a")
    assert got is not None
    holder = fleet_db.Holder(user, "host-a", got.epoch)
    store = Store(PostgresTarget(postgres.url(role), role, password, holder=holder))
    seen: list[str] = []
    store.on_lease_lost = lambda exc: seen.append(exc.code)
    try:
        assert store.add_inbound(_incoming(1))
        [first] = store.pending_inbound("c@s.whatsapp.net")
        [reply] = store.complete_turn("c@s.whatsapp.net", [first.id], ["r1"], None)
        store.mark_sending(reply.id)
        store.mark_sent(reply.id)
        assert store.add_inbound(_incoming(2))
        [second] = store.pending_inbound("c@s.whatsapp.net")
        [queued] = store.answer_locally("c@s.whatsapp.net", [], ["notice"], None)
        assert seen == []

        _expire(admin, user, 60)  # host-a froze; host-b took the account over
        assert _acquire(admin, user, "host-b") is not None

        with pytest.raises(LeaseLost):
            store.complete_turn("c@s.whatsapp.net", [second.id], ["r2"], None)
        with pytest.raises(LeaseLost):
            store.mark_sending(queued.id)
        with pytest.raises(LeaseLost):
            store.set_kv("settings", "{}")
        assert seen == ["lease_lost"] * 3
        # nothing of it stuck: the message is still to be answered, the reply still pending
        assert [p.id for p in store.pending_inbound("c@s.whatsapp.net")] == [second.id]
        assert store.reply_state(queued.id)[0] == "pending"
        assert [r.text for r in store.pending_replies()] == ["notice"]
        # what WhatsApp acknowledged is kept for the next owner; the link's reports go on
        assert store.add_inbound(_incoming(3))
        assert len(store.pending_inbound("c@s.whatsapp.net")) == 2
        store.queue_frame(lambda seq: f"frame {seq}".encode())
    finally:
        store.close()


def test_without_a_holder_the_store_runs_no_fleet_query(postgres: Cluster, admin: Admin) -> None:
    """Fleet off: the same store, no lease row at all, and every write works."""
    user = f"unfenced-{time.monotonic_ns()}"
    role = account_role(user)
    password = pg_roles.provision(admin, user)
    store = Store(PostgresTarget(postgres.url(role), role, password))
    try:
        store.add_inbound(_incoming(1))
        [first] = store.pending_inbound("c@s.whatsapp.net")
        [reply] = store.complete_turn("c@s.whatsapp.net", [first.id], ["r1"], None)
        store.mark_sending(reply.id)
        store.set_kv("k", "v")
        assert fleet_db.lease(admin, user) is None
    finally:
        store.close()
