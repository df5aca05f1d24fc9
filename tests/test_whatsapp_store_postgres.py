"""The WhatsApp session store on PostgreSQL: neonize 0.5.2's Go side (whatsmeow's sqlstore
over lib/pq) given a ``postgres://`` URL, creating its tables in the account's own schema
before ``connect()``, out of other accounts' reach, with the password never printed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from postgres_cluster import Cluster

from agent.placement import session_store
from agent.store import PostgresTarget, Store
from agent.whatsapp.neonize_import import NeonizeStoreError, ensure_store
from controller import pg_roles
from wabridge.postgres import account_role


@pytest.fixture
def accounts(postgres: Cluster) -> Iterator[dict[str, PostgresTarget]]:
    with psycopg.connect(postgres.conninfo(), autocommit=True) as admin:
        out = {}
        for user in ("wa-alice", "wa-bob"):
            role = account_role(user)
            out[user] = PostgresTarget(postgres.url(role) + "?sslmode=disable", role,
                                       pg_roles.provision(admin, user))
        yield out


def _tables(cluster: Cluster, schema: str) -> set[str]:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s",
                            (schema,)).fetchall()
    return {r[0] for r in rows}


def test_whatsmeow_creates_its_tables_in_the_accounts_own_schema(
        postgres: Cluster, accounts: dict[str, PostgresTarget]) -> None:
    alice, bob = accounts["wa-alice"], accounts["wa-bob"]
    where = session_store(alice)
    assert where is not None
    assert ensure_store(where) == 0  # no linked device yet; schema made before connect()
    assert ensure_store(where) == 0  # and opening it again upgrades nothing
    tables = _tables(postgres, alice.schema)
    assert {"whatsmeow_device", "whatsmeow_sessions", "whatsmeow_identity_keys",
            "whatsmeow_pre_keys", "whatsmeow_version"} <= tables
    assert not any(t.startswith("whatsmeow") for t in _tables(postgres, bob.schema))
    assert not any(t.startswith("whatsmeow") for t in _tables(postgres, "public"))
    # the conversation store lives beside it, in the same schema, unharmed
    store = Store(alice)
    assert store.pending_chats() == []
    assert store.forget_whatsapp_device() == 0
    store.close()
    # bob's role cannot read alice's keys
    with psycopg.connect(postgres.url(bob.schema), password=bob.password) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(f"SELECT * FROM {alice.schema}.whatsmeow_device")  # noqa: S608
    # a device's rows hang off whatsmeow_device.jid and go with it (forget_whatsapp_device)
    with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
        cascading = conn.execute(
            "SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = %s AND c.contype = 'f' AND c.confdeltype = 'c' "
            "AND c.confrelid = %s::regclass",
            (alice.schema, f"{alice.schema}.whatsmeow_device"),
        ).fetchone()
    assert cascading is not None and cascading[0] >= 5


def test_a_refused_login_is_reported_without_the_password(
        accounts: dict[str, PostgresTarget]) -> None:
    alice = accounts["wa-alice"]
    wrong = PostgresTarget(alice.conninfo, alice.schema, "Not/The:Password")
    where = session_store(wrong)
    assert where is not None
    assert "Not" not in repr(where) and "Not" not in str(where)
    with pytest.raises(NeonizeStoreError) as info:
        ensure_store(where)
    text = str(info.value)
    assert alice.schema in text  # names the store
    assert "Not/The:Password" not in text and "Not%2FThe%3APassword" not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_the_sqlite_default_keeps_its_file(tmp_path: Path) -> None:
    assert session_store(tmp_path / "agent.db") is None
