"""Each account's own corner of the shared PostgreSQL database: a login role and a schema of
the same name (``wabridge.postgres.account_role``), made by the controller before it starts
the worker (``storage.backend = postgresql``).

What the worker's role can do, and why that is enough:
- it owns its schema, so it creates and migrates its own tables (the store's, whatsmeow's);
- no other role's schema grants it ``USAGE``, and no table grants it anything: another
  account's inbox, summaries and WhatsApp keys, and the controller's tables, are out of reach
  (PostgreSQL 15 no longer lets ``PUBLIC`` create in ``public`` either);
- it is ``NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS NOINHERIT``: it cannot make itself
  more;
- in a fleet (``fleet.enabled``) it may read and renew its own lease row in
  ``wabridge_fleet.leases`` (a row policy hides the others) and see nothing else of the
  controllers' schema (``wabridge.fleet_db``).

The password is new at every start: the controller sets it (sent as a SCRAM verifier, so
the clear text never reaches the server or its statement log), writes it to a root-only file
under ``/run`` and names that file in the unit's ``LoadCredential=``; systemd hands the
worker a copy it alone can read. Nothing to store, nothing to leak from a backup.

The controller's own role needs ``CREATEROLE`` and ``CREATE`` on the database (README,
"PostgreSQL").
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from wabridge import config, credentials, fleet_db, postgres, units
from wabridge.errors import WabridgeError

#: Where the per-account passwords wait for systemd (tmpfs: gone at reboot, remade at start).
PASSWORD_DIR = Path("/run/wabridge/postgres")
#: The controller's own password (root, 0600), which its unit loads as the credential
#: ``postgres-password`` (README, "PostgreSQL"); ``wabridgectl doctor`` reads it there.
CONTROLLER_PASSWORD_FILE = Path("/etc/wabridge/postgres-password")
SCRAM_ITERATIONS = 4096


class StoreUnavailable(WabridgeError):
    code = "store_unavailable"
    explanation = ("the controller could not prepare the account's role in PostgreSQL "
                   "(storage.postgres_url): check the server, the controller's "
                   "'postgres-password' credential and that its role has CREATEROLE")


def scram_verifier(password: str, salt: bytes | None = None) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5802/7677): the server can
    check a login with it and cannot recover the password."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return (f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}"
            f"${b64(stored_key)}:{b64(server_key)}")


def provision(admin: psycopg.Connection[tuple[Any, ...]], user_id: str, *,
              fleet: bool = False) -> str:
    """Make (or keep) the account's role and schema and give the role a new password, which
    is returned. Idempotent; one transaction. ``fleet``: the role may also read and renew its
    own lease row in ``wabridge_fleet`` (made first if missing), and nothing else there."""
    if fleet:
        fleet_db.migrate(admin)
    role = postgres.account_role(user_id)
    ident = sql.Identifier(role)
    password = secrets.token_urlsafe(32)
    verifier = sql.Literal(scram_verifier(password))
    with admin.transaction():
        # one provisioning at a time, across controllers: concurrent GRANTs on the database
        # update its one catalog row and fail with "tuple concurrently updated"
        admin.execute("SELECT pg_advisory_xact_lock(hashtext('wabridge_provision'))")
        exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists is None:
            admin.execute(sql.SQL(
                "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT "
                "NOREPLICATION NOBYPASSRLS PASSWORD {}").format(ident, verifier))
        else:
            admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, verifier))
        # PostgreSQL 15: creating a schema owned by another role needs membership in it
        admin.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(ident))
        admin.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
            ident, ident))
        admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(admin.info.dbname), ident))
        if fleet:
            fleet_db.grant_account(admin, role)
    return password


def password_file(user_id: str, directory: Path = PASSWORD_DIR) -> Path:
    return directory / units.escape_instance(user_id)


def write_password(path: Path, password: str) -> None:
    """Root-only, replaced atomically (systemd reads it when the unit starts)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(password)
    tmp.replace(path)


def admin_connect(cfg: config.Config, password_file: Path = CONTROLLER_PASSWORD_FILE
                  ) -> psycopg.Connection[tuple[Any, ...]]:
    """The controller's own connection (its password: its unit's credential, else the file
    that credential is loaded from, for ``wabridgectl doctor``)."""
    password = credentials.read(credentials.POSTGRES_PASSWORD)
    if password is None:
        with contextlib.suppress(FileNotFoundError):
            password = password_file.read_text(encoding="utf-8").strip() or None
    extra: dict[str, Any] = {"password": password} if password else {}
    return psycopg.connect(cfg.storage.postgres_url, autocommit=True, **extra)


def prepare(cfg: config.Config, user_id: str, directory: Path = PASSWORD_DIR) -> Path | None:
    """Before a worker starts: its role and schema exist and its password file is fresh.
    Returns that file (for ``LoadCredential=``), or None on the SQLite backend. Blocking:
    call it off the event loop."""
    if cfg.storage.backend != "postgresql":
        return None
    try:
        with admin_connect(cfg) as admin:
            password = provision(admin, user_id, fleet=cfg.fleet.enabled)
    except psycopg.Error as exc:
        # the message names the server and the failure; psycopg never puts the password in
        raise StoreUnavailable(f"{postgres.describe(cfg.storage.postgres_url)}: "
                               f"{str(exc).strip()}") from None
    path = password_file(user_id, directory)
    write_password(path, password)
    return path


def health(admin: psycopg.Connection[tuple[Any, ...]]) -> tuple[list[str], dict[str, int]]:
    """What ``wabridgectl doctor`` reports: problems (each a sentence), and the accounts'
    schema versions (schema -> version; -1: not migrated yet, or not readable by this role:
    the controller reads them as a member of each role it made)."""
    problems: list[str] = []
    row = admin.execute("SELECT current_setting('server_version_num')::int, "
                        "r.rolsuper OR r.rolcreaterole, "
                        "has_database_privilege(current_database(), 'CREATE') "
                        "FROM pg_roles r WHERE r.rolname = current_user").fetchone()
    if row is None:  # current_user always has a pg_roles row
        return ["the controller's role is not in pg_roles"], {}
    version, createrole, create = row
    if int(str(version)) < 150000:
        problems.append(f"server version {version} is older than PostgreSQL 15")
    if not createrole:
        problems.append("the controller's role lacks CREATEROLE (it makes the accounts' roles)")
    if not create:
        problems.append("the controller's role lacks CREATE on the database (it makes the "
                        "accounts' schemas)")
    for name, in admin.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'wa\\_%' AND (rolsuper OR "
            "rolcreaterole OR rolcreatedb OR rolbypassrls OR rolreplication) ORDER BY 1"):
        problems.append(f"account role {name} has more rights than its own schema")
    versions: dict[str, int] = {}
    schemas = admin.execute(
        "SELECT n.nspname, has_schema_privilege(n.oid, 'USAGE') AND "
        "to_regclass(quote_ident(n.nspname) || '.schema_version') IS NOT NULL "
        "FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner AND r.rolname = n.nspname "
        "WHERE n.nspname LIKE 'wa\\_%' ORDER BY 1").fetchall()
    for schema, migrated in schemas:
        versions[str(schema)] = -1
        if migrated:
            got = admin.execute(sql.SQL("SELECT MAX(version) FROM {}.schema_version").format(
                sql.Identifier(str(schema)))).fetchone()
            versions[str(schema)] = int(got[0]) if got and got[0] is not None else 0
    return problems, versions
