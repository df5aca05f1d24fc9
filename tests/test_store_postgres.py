"""The store on PostgreSQL: choosing it by config, naming an account's role and schema, and
keeping the password out of URLs and logs. (Every store behaviour runs on both backends in
tests/test_store.py.)"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from postgres_cluster import Cluster

from agent.placement import store_location
from agent.store import PostgresTarget, Store
from wabridge import config
from wabridge import postgres as postgres_mod
from wabridge.errors import ConfigError


def _cfg(tmp_path: Path, body: str) -> config.Config:
    path = tmp_path / "wabridge.toml"
    path.write_text(body)
    return config.load(path, environ={})


def test_sqlite_stays_the_default(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "")
    assert cfg.storage.backend == "sqlite"
    assert store_location("alice", cfg, tmp_path) == tmp_path / "agent.db"


@pytest.mark.parametrize(("body", "key", "words"), [
    ('[storage]\nbackend = "postgresql"\n', "storage.postgres_url", "is empty"),
    ('[storage]\nbackend = "mysql"\n', "storage.backend", "not one of"),
    ('[storage]\npostgres_url = "postgresql://w:secret@db/wabridge"\n', "storage.postgres_url",
     "carries a password"),
    ('[storage]\npostgres_url = "postgresql://w@db/wabridge?password=secret"\n',
     "storage.postgres_url", "carries a password"),
    ('[storage]\npostgres_url = "mysql://w@db/x"\n', "storage.postgres_url", "not a postgresql"),
])
def test_bad_storage_settings_are_refused_by_name(tmp_path: Path, body: str, key: str,
                                                  words: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, body)
    assert key in str(info.value) and words in str(info.value)
    assert "secret" not in str(info.value)


def test_postgresql_is_the_accounts_own_role_and_schema_with_the_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "postgres-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = _cfg(tmp_path, '[storage]\nbackend = "postgresql"\n'
                         'postgres_url = "postgresql://controller@db.example:5433/wabridge"\n')
    where = store_location("Alice+1@x", cfg, tmp_path)
    assert isinstance(where, PostgresTarget)
    role = postgres_mod.account_role("Alice+1@x")
    assert where.schema == role
    parts = psycopg.conninfo.conninfo_to_dict(where.conninfo)
    assert (parts["user"], parts["host"], parts["port"], parts["dbname"]) == (
        role, "db.example", "5433", "wabridge")
    assert where.password == "s3cret"
    assert "s3cret" not in repr(where)  # a logged target never shows it


@pytest.mark.parametrize(("user_id", "role"), [
    ("alice", "wa_alice_2bd806c97f0e"),
    ("Alice", "wa_alice_3bc51062973c"),  # the hash keeps ids that sanitize alike apart
    ("+49 151/x", "wa_49_151_x_"),
    ("!!!", "wa_"),
])
def test_account_role_names(user_id: str, role: str) -> None:
    name = postgres_mod.account_role(user_id)
    assert name.startswith(role)
    assert len(name.encode()) <= 63 and name == name.lower()
    assert all(c.isalnum() or c == "_" for c in name)


def test_account_role_of_a_long_id_fits_an_identifier() -> None:
    assert len(postgres_mod.account_role("u" * 128)) <= 63
    assert postgres_mod.account_role("u" * 128) != postgres_mod.account_role("u" * 127)


def test_describe_never_shows_a_password() -> None:
    text = postgres_mod.describe("postgresql://w:hunter2@db:5432/wabridge")
    assert text == "postgresql w@db:5432/wabridge"


def test_a_missing_schema_is_named(postgres: Cluster) -> None:
    with pytest.raises(postgres_mod.SchemaMissing) as info:
        Store(PostgresTarget(postgres.conninfo(), "nobody_here"))
    assert "nobody_here" in str(info.value)
    assert "controller" in info.value.explanation

