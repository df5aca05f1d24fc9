"""Per-account isolation inside the shared PostgreSQL database: the role and schema the
controller makes for each account (controller/pg_roles.py), exercised against a real
cluster with password logins over TCP."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import postgres_cluster
import psycopg
import pytest
from postgres_cluster import Cluster

from agent.store import MIGRATIONS, PostgresTarget, Store
from agent.whatsapp.events import IncomingMessage
from controller import doctor, pg_roles
from controller.systemd import worker_dropin
from wabridge import config, database, fleet_db
from wabridge.config import with_overrides
from wabridge.postgres import account_role


@pytest.fixture
def admin(postgres: Cluster) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
        yield conn


def _login(cluster: Cluster, user_id: str, password: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(cluster.url(account_role(user_id)), password=password,
                           autocommit=True)


def _msg(text: str) -> IncomingMessage:
    return IncomingMessage(wa_id="W1", chat_id="c@s.whatsapp.net", sender="c@s.whatsapp.net",
                           text=text, timestamp=1.0)


def test_scram_verifier_matches_what_postgres_accepts(
        postgres: Cluster, admin: psycopg.Connection[tuple[Any, ...]]) -> None:
    """The verifier is computed here (the clear password never reaches the server); a login
    with the password proves it is right."""
    password = pg_roles.provision(admin, "verifier-check")
    with _login(postgres, "verifier-check", password) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (
            account_role("verifier-check"),)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _login(postgres, "verifier-check", password + "x")


def test_alice_cannot_reach_bob_nor_the_controller(
        postgres: Cluster, admin: psycopg.Connection[tuple[Any, ...]]) -> None:
    admin.execute("CREATE TABLE IF NOT EXISTS public.controller_accounts (user_id TEXT)")
    admin.execute("INSERT INTO public.controller_accounts VALUES ('bob')")
    alice_pw = pg_roles.provision(admin, "alice", fleet=True)  # a fleet's grants too
    bob_pw = pg_roles.provision(admin, "bob", fleet=True)
    alice_role, bob_role = account_role("alice"), account_role("bob")
    for user, role in (("alice", alice_role), ("bob", bob_role)):
        fleet_db.acquire(admin, user, role, "host-a", 10, 30)
    fleet_db.heartbeat(admin, "host-a", 4, 256)
    fleet_db.pin(admin, "bob", "host-a")

    # each worker's store works in its own schema, as its own role
    bob = Store(PostgresTarget(postgres.url(bob_role), bob_role, bob_pw))
    bob.add_inbound(_msg("bob's secret"))
    bob.rotate("c@s.whatsapp.net", "bob's summary")
    bob.close()
    # a stand-in for whatsmeow's tables, made by bob's role in bob's schema
    with _login(postgres, "bob", bob_pw) as conn:
        conn.execute("CREATE TABLE whatsmeow_device (jid TEXT PRIMARY KEY, noise_key BYTEA)")
        conn.execute("INSERT INTO whatsmeow_device VALUES ('49151@s.whatsapp.net', 'k')")
    alice = Store(PostgresTarget(postgres.url(alice_role), alice_role, alice_pw))
    assert alice.pending_chats() == []  # alice's own, empty, inbox
    alice.close()

    with _login(postgres, "alice", alice_pw) as conn:
        for target in (f"{bob_role}.inbox", f"{bob_role}.summaries",
                       f"{bob_role}.whatsmeow_device", "public.controller_accounts"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT * FROM {target}")  # noqa: S608 (test identifiers)
        # of the controllers' fleet tables: its own lease row, nothing else
        for target in ("wabridge_fleet.hosts", "wabridge_fleet.placements",
                       "wabridge_fleet.schema_version"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT * FROM {target}")  # noqa: S608 (test identifiers)
        assert conn.execute("SELECT user_id FROM wabridge_fleet.leases").fetchall() == [
            ("alice",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE wabridge_fleet.leases SET epoch = epoch + 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE ROLE mallory LOGIN")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"GRANT {alice_role} TO {bob_role}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE SCHEMA elsewhere")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE public.squat (x INT)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"ALTER ROLE {alice_role} SUPERUSER")
    # and bob still sees his own
    with _login(postgres, "bob", bob_pw) as conn:
        row = conn.execute(f"SELECT COUNT(*) FROM {bob_role}.inbox").fetchone()  # noqa: S608
        assert row == (1,)


def test_provisioning_again_keeps_the_data_and_retires_the_old_password(
        postgres: Cluster, admin: psycopg.Connection[tuple[Any, ...]]) -> None:
    first = pg_roles.provision(admin, "carol")
    role = account_role("carol")
    store = Store(PostgresTarget(postgres.url(role), role, first))
    store.add_inbound(_msg("kept"))
    store.close()
    second = pg_roles.provision(admin, "carol")
    assert second != first
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _login(postgres, "carol", first)
    store = Store(PostgresTarget(postgres.url(role), role, second))
    assert [p.message.text for p in store.pending_inbound("c@s.whatsapp.net")] == ["kept"]
    store.close()


def test_the_password_file_is_root_only(tmp_path: Path) -> None:
    path = pg_roles.password_file("dave", tmp_path / "pg")
    pg_roles.write_password(path, "pw1")
    pg_roles.write_password(path, "pw2")
    assert path.read_text() == "pw2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_the_dropin_hands_over_the_roles_password_as_a_credential() -> None:
    text = worker_dropin("wab-alice-2bd806c97f", {}, postgres_password=Path("/run/wabridge/"
                                                                          "postgres/alice"))
    assert "LoadCredential=postgres-password:/run/wabridge/postgres/alice\n" in text
    assert "LoadCredential=postgres" not in worker_dropin("wab-alice-2bd806c97f", {})


def test_prepare_on_postgresql_makes_the_role_and_its_password_file(
        postgres: Cluster, tmp_path: Path) -> None:
    cfg = with_overrides(config.Config(), "storage", backend="postgresql",
                         postgres_url=f"postgresql://postgres@/postgres?host={postgres.socket_dir}"
                                      f"&port={postgres.port}")
    assert pg_roles.prepare(config.Config(), "erin", tmp_path) is None  # sqlite: nothing
    path = pg_roles.prepare(cfg, "erin", tmp_path)
    assert path == tmp_path / "erin"
    with _login(postgres, "erin", path.read_text()) as conn:
        assert conn.execute("SELECT current_schema()").fetchone() == (account_role("erin"),)


def test_prepare_names_an_unreachable_server_without_its_password(tmp_path: Path) -> None:
    cfg = with_overrides(config.Config(), "storage", backend="postgresql",
                         postgres_url="postgresql://ctl@127.0.0.1:1/wabridge")
    with pytest.raises(pg_roles.StoreUnavailable) as info:
        pg_roles.prepare(cfg, "erin", tmp_path)
    assert "ctl@127.0.0.1:1/wabridge" in str(info.value)
    assert not (tmp_path / "erin").exists()


def _pg_cfg(cluster: Cluster, user: str = "postgres") -> config.Config:
    return with_overrides(config.Config(), "storage", backend="postgresql",
                          postgres_url=f"postgresql://{user}@/postgres?host={cluster.socket_dir}"
                                       f"&port={cluster.port}")


def test_doctor_checks_the_database(postgres: Cluster, admin: psycopg.Connection[tuple[Any, ...]]
                                    ) -> None:
    assert doctor.check_database(config.Config()).status == "skip"
    pw = pg_roles.provision(admin, "frank")
    role = account_role("frank")
    Store(PostgresTarget(postgres.url(role), role, pw)).close()  # migrated
    check = doctor.check_database(_pg_cfg(postgres))
    assert check.status == "ok", check
    assert "account schemas" in check.message and "schema versions" in check.message
    admin.execute(f"ALTER ROLE {role} CREATEDB")
    try:
        check = doctor.check_database(_pg_cfg(postgres))
        assert check.status == "fail" and role in check.message
    finally:
        admin.execute(f"ALTER ROLE {role} NOCREATEDB")
    # a controller role that cannot make roles is named
    admin.execute("DROP ROLE IF EXISTS weak")
    admin.execute("CREATE ROLE weak LOGIN")
    check = doctor.check_database(_pg_cfg(postgres, "weak"))
    assert check.status == "fail" and "CREATEROLE" in check.message


def test_doctor_names_an_unreachable_database() -> None:
    cfg = with_overrides(config.Config(), "storage", backend="postgresql",
                         postgres_url="postgresql://ctl@127.0.0.1:1/wabridge")
    check = doctor.check_database(cfg)
    assert check.status == "fail" and "ctl@127.0.0.1:1/wabridge" in check.message


def test_the_controller_knows_the_store_schema_version() -> None:
    """``wabridgectl doctor`` compares account schemas with this (the controller cannot
    import the worker's code): it must follow every new migration step."""
    assert len(MIGRATIONS) == database.STORE_SCHEMA_VERSION


def test_doctor_names_grants_memberships_and_newer_schemas(
        postgres: Cluster, admin: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Each way an account's isolation can be undone by hand is named, as is a schema that
    a newer wabridge migrated (its worker refuses to start here)."""
    roles = {}
    for user in ("gina", "hank"):
        pw = pg_roles.provision(admin, user)
        roles[user] = account_role(user)
        Store(PostgresTarget(postgres.url(roles[user]), roles[user], pw)).close()
    gina, hank = roles["gina"], roles["hank"]
    check = doctor.check_database(_pg_cfg(postgres))
    assert check.status == "ok", check
    assert f"(this wabridge: {database.STORE_SCHEMA_VERSION}" in check.message

    undo = [  # (S608: the identifiers are our own role names)
        (f"GRANT USAGE ON SCHEMA {hank} TO {gina}", f"REVOKE USAGE ON SCHEMA {hank} FROM {gina}",
         f"schema {hank} grants USAGE to {gina}"),
        (f"GRANT SELECT ON {hank}.inbox TO PUBLIC",
         f"REVOKE SELECT ON {hank}.inbox FROM PUBLIC",  # noqa: S608
         f"table {hank}.inbox grants SELECT to PUBLIC"),
        (f"GRANT {hank} TO {gina}", f"REVOKE {hank} FROM {gina}",
         f"account role {gina} is a member of {hank}"),
        (f"UPDATE {hank}.schema_version SET version = 99",  # noqa: S608
         f"UPDATE {hank}.schema_version SET version = {len(MIGRATIONS)}",  # noqa: S608
         f"schema {hank} is at store version 99, newer than this wabridge's {len(MIGRATIONS)}"),
    ]
    for do, revert, named in undo:
        admin.execute(do)
        try:
            check = doctor.check_database(_pg_cfg(postgres))
        finally:
            admin.execute(revert)
        assert check.status == "fail", (do, check)
        assert named in check.message, (do, check.message)
    assert doctor.check_database(_pg_cfg(postgres)).status == "ok"


def test_one_pg_dump_as_the_controller_holds_every_account(
        postgres: Cluster, tmp_path: Path) -> None:
    """README "PostgreSQL", backups: ``pg_dump`` as the controller's role (a member of every
    account role) reads every account's schema, and ``pg_restore`` as that role brings them
    back (here into a second database of the same server, where the roles exist)."""
    role, password, database = postgres.controller_role()
    with psycopg.connect(postgres.url(role, database), password=password,
                         autocommit=True) as admin:
        passwords = {u: pg_roles.provision(admin, u) for u in ("ivy", "jack")}
    for user, pw in passwords.items():
        store = Store(PostgresTarget(postgres.url(account_role(user), database),
                                     account_role(user), pw))
        store.add_inbound(_msg(f"{user}'s message"))
        store.close()
    env = {**os.environ, "PGPASSWORD": password}
    tool = postgres_cluster.bin_dir()
    where = ["-h", "127.0.0.1", "-p", str(postgres.port), "-U", role]
    dump = tmp_path / "wabridge.dump"
    subprocess.run([str(tool / "pg_dump"), *where, "-Fc", "-f", str(dump), database],
                   env=env, check=True, capture_output=True, timeout=60)
    with psycopg.connect(postgres.conninfo(), autocommit=True) as su:  # as README: once
        su.execute(f"CREATE DATABASE {database}_restored OWNER {role}")
    subprocess.run([str(tool / "pg_restore"), *where, "-d", f"{database}_restored", str(dump)],
                   env=env, check=True, capture_output=True, timeout=60)
    for user, pw in passwords.items():
        store = Store(PostgresTarget(postgres.url(account_role(user), f"{database}_restored"),
                                     account_role(user), pw))
        assert [p.message.text for p in store.pending_inbound("c@s.whatsapp.net")] == [
            f"{user}'s message"]
        store.close()
