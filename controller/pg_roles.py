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


#: Backoff of the controller's retries while PostgreSQL cannot prepare an account: the first
#: retry, and the longest wait between two.
RETRY_FIRST, RETRY_MAX = 2.0, 60.0


def retry_delay(previous: float) -> float:
    """Seconds until the next try to prepare an account after ``previous`` seconds (0: the
    first failure): doubling from ``RETRY_FIRST`` up to ``RETRY_MAX``."""
    return min(RETRY_MAX, previous * 2) if previous else RETRY_FIRST


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


def controller_password(password_file: Path = CONTROLLER_PASSWORD_FILE) -> str | None:
    """The controller role's password: its unit's credential, else the file that credential
    is loaded from (for ``wabridgectl doctor``); None: none given (trust, a socket)."""
    password = credentials.read(credentials.POSTGRES_PASSWORD)
    if password is None:
        with contextlib.suppress(FileNotFoundError):
            password = password_file.read_text(encoding="utf-8").strip() or None
    return password


def admin_connect(cfg: config.Config, password_file: Path = CONTROLLER_PASSWORD_FILE
                  ) -> psycopg.Connection[tuple[Any, ...]]:
    """The controller's own connection (its password: :func:`controller_password`)."""
    password = controller_password(password_file)
    extra: dict[str, Any] = {"password": password} if password else {}
    return psycopg.connect(cfg.storage.postgres_url, autocommit=True, **extra)


def prepare(cfg: config.Config, user_id: str, directory: Path | None = None) -> Path | None:
    """Before a worker starts: its role and schema exist and its password file is fresh
    (in ``directory``, default ``PASSWORD_DIR``). Returns that file (for
    ``LoadCredential=``), or None on the SQLite backend. Blocking: call it off the event
    loop. Raises ``StoreUnavailable`` when the server cannot do it: the worker would not
    open its store either, so it is not started (the controller retries: ``retry_delay``)."""
    if cfg.storage.backend != "postgresql":
        return None
    try:
        with admin_connect(cfg) as admin:
            password = provision(admin, user_id, fleet=cfg.fleet.enabled)
    except psycopg.Error as exc:
        # the message names the server and the failure; psycopg never puts the password in
        raise StoreUnavailable(f"{postgres.describe(cfg.storage.postgres_url)}: "
                               f"{str(exc).strip()}") from None
    path = password_file(user_id, directory or PASSWORD_DIR)
    write_password(path, password)
    return path


#: Rights on an account's schema or tables given to anyone but their owner (PUBLIC
#: included): the isolation ``provision`` sets up has none. The controller reaches them as a
#: member of each account role, which no ACL shows.
FOREIGN_GRANTS = """
SELECT 'schema ' || n.nspname, a.privilege_type,
       CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END
FROM pg_namespace n, aclexplode(n.nspacl) a
WHERE n.nspname LIKE 'wa\\_%' AND a.grantee <> n.nspowner
UNION ALL
SELECT 'table ' || n.nspname || '.' || c.relname, a.privilege_type,
       CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
WHERE n.nspname LIKE 'wa\\_%' AND a.grantee <> c.relowner
ORDER BY 1, 2, 3"""
#: Roles an account role was made a member of: with ``SET ROLE`` it could use their rights
#: (``NOINHERIT`` only stops it using them without).
ACCOUNT_MEMBERSHIPS = """
SELECT m.rolname, r.rolname FROM pg_auth_members am
JOIN pg_roles m ON m.oid = am.member JOIN pg_roles r ON r.oid = am.roleid
WHERE m.rolname LIKE 'wa\\_%' ORDER BY 1, 2"""


def newer_schemas(versions: dict[str, int], known: int) -> list[str]:
    """The accounts' schemas a newer wabridge migrated (their worker refuses to start here:
    exit 16), each named with its version, for ``wabridgectl doctor``."""
    return [f"schema {schema} is at store version {version}, newer than this wabridge's "
            f"{known} (its worker will not start: upgrade wabridge on this host)"
            for schema, version in sorted(versions.items()) if version > known]


def prepared(cfg: config.Config, user_id: str, directory: Path | None = None) -> Path | None:
    """The password file ``prepare`` last wrote for a worker whose start is under way (None:
    SQLite, or none yet), without a new password: a second StartUnit is a no-op for
    systemd, and the worker it started already loaded this one."""
    if cfg.storage.backend != "postgresql":
        return None
    path = password_file(user_id, directory or PASSWORD_DIR)
    return path if path.exists() else None


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
    problems += [f"{what} grants {privilege} to {grantee}" for what, privilege, grantee
                 in admin.execute(FOREIGN_GRANTS)]
    problems += [f"account role {member} is a member of {role} (SET ROLE reaches its rights)"
                 for member, role in admin.execute(ACCOUNT_MEMBERSHIPS)]
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
