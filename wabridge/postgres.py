"""PostgreSQL as a wabridge process uses it: the same calls as :mod:`wabridge.database`.

A store written for SQLite (``?`` and ``?N`` placeholders, rows read by index or by name,
explicit transactions) runs here unchanged when its SQL keeps to what both speak:
``ON CONFLICT ... DO NOTHING`` rather than ``INSERT OR IGNORE``, ``IS [NOT] DISTINCT FROM``
rather than ``IS`` between values, ``RETURNING`` rather than ``lastrowid``, an alias on every
sub-select. :class:`Connection` translates only the placeholders (no ``?`` inside a quoted
literal, then) and binds values on the client (``ClientCursor``), so a ``NULL`` parameter
needs no declared type, as in SQLite.

- :func:`connect`: autocommit (transactions are explicit), ``search_path`` set to the
  account's schema, which must exist (the controller creates it with the account's role;
  the worker's role cannot create schemas).
- :func:`immediate`: a write transaction that first takes a transaction-scoped advisory lock
  keyed by the schema: like SQLite's ``BEGIN IMMEDIATE``, a read-then-write (the next summary
  number, a migration step re-reading the version) never races another writer of the same
  account.
- Migrations are :func:`wabridge.database.migrate`'s, run with :func:`immediate`.

Errors: :class:`SchemaMissing` when the schema is absent; psycopg's own ``OperationalError``
otherwise (the server is down or refused us): the worker exits and systemd restarts it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql

from wabridge.errors import WabridgeError


class SchemaMissing(WabridgeError):
    code = "postgres_schema_missing"
    explanation = ("the account's schema does not exist in the database: the controller "
                   "creates it with the account's role before it starts the worker")


class Row(tuple[Any, ...]):
    """A result row read by position (``r[0]``) or by column name (``r["id"]``), as
    ``sqlite3.Row``."""

    names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self.names)


def _row_factory(cursor: psycopg.Cursor[Any]) -> Any:
    names = {d.name: i for i, d in enumerate(cursor.description or ())}
    cls = type("Row", (Row,), {"names": names})

    def make(values: Sequence[Any]) -> Row:
        return cls(values)  # type: ignore[no-any-return]

    return make


#: Seconds to wait for the server: a store call on the event loop must not hang on a dead one.
CONNECT_TIMEOUT = 5

_NUMBERED = re.compile(r"\?(\d+)")


@lru_cache(maxsize=512)
def translate(query: str) -> tuple[str, bool]:
    """``query`` with SQLite placeholders as psycopg's (``?N`` -> ``%(pN)s``, ``?`` -> ``%s``,
    a literal ``%`` doubled); the flag says the parameters are numbered."""
    text = query.replace("%", "%%")
    numbered = bool(_NUMBERED.search(text))
    if numbered:
        return _NUMBERED.sub(lambda m: f"%(p{m.group(1)})s", text), True
    return text.replace("?", "%s"), False


def _bind(params: Sequence[Any], numbered: bool) -> Sequence[Any] | dict[str, Any]:
    return {f"p{i}": v for i, v in enumerate(params, 1)} if numbered else params


class Connection:
    """One server connection with SQLite's calling convention (see the module docstring)."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self.raw = conn
        self.schema = schema

    def execute(self, query: str, params: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        text, numbered = translate(query)
        cur = self.raw.cursor()
        cur.execute(text, _bind(params, numbered))
        return cur

    def executemany(self, query: str, rows: Iterable[Sequence[Any]], /) -> psycopg.Cursor[Any]:
        text, numbered = translate(query)
        cur = self.raw.cursor()
        cur.executemany(text, [_bind(r, numbered) for r in rows])
        return cur

    @property
    def usable(self) -> bool:
        """False once the server is gone for this connection (restarted, or our backend
        terminated): psycopg never reconnects by itself, the caller opens a new one."""
        return not self.raw.closed and not self.raw.broken

    def close(self) -> None:
        self.raw.close()


def connect(conninfo: str, schema: str, *, password: str | None = None) -> Connection:
    """Open ``conninfo`` (a ``postgresql://`` URL or ``key=value`` string) working in
    ``schema``; ``password`` (from a credential) is passed apart, never in the URL."""
    extra: dict[str, Any] = {"password": password} if password else {}
    conn = psycopg.connect(conninfo, autocommit=True, cursor_factory=psycopg.ClientCursor,
                           row_factory=_row_factory, connect_timeout=CONNECT_TIMEOUT, **extra)
    try:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        missing = found.fetchone() is None
        if not missing:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    except BaseException:
        conn.close()
        raise
    if missing:
        conn.close()
        raise SchemaMissing(f"schema {schema!r} does not exist")
    return Connection(conn, schema)


@contextmanager
def immediate(db: Connection) -> Iterator[Connection]:
    """A write transaction serialized with every other writer of the same schema (see the
    module docstring); rolled back when the block raises."""
    db.raw.execute("BEGIN")
    try:
        db.raw.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema()))")
        yield db
    except BaseException:
        db.raw.execute("ROLLBACK")
        raise
    db.raw.execute("COMMIT")


def describe(conninfo: str) -> str:
    """``conninfo`` for a log line or an error: host, port, database and user, never a
    password (even one a careless URL carries)."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "postgresql (unparsable conninfo)"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"postgresql {parts.get('user') or '-'}@{host}:{port}/{parts.get('dbname') or '-'}"


_UNSAFE = re.compile(r"[^a-z0-9_]+")


def account_role(user_id: str) -> str:
    """The role, and the schema of the same name, that hold one account's state.

    A valid PostgreSQL identifier (lower case, at most 63 bytes) for any user id: the id's
    first letters for the operator to recognise, and a hash of the whole id so two ids that
    sanitize alike never share a role. PostgreSQL's default ``search_path`` (``"$user"``)
    then finds the schema by itself."""
    readable = _UNSAFE.sub("_", user_id.lower()).strip("_")[:40]
    digest = hashlib.sha256(user_id.encode()).hexdigest()[:12]
    return f"wa_{readable}_{digest}" if readable else f"wa_{digest}"


def with_user(conninfo: str, user: str) -> str:
    """``conninfo`` connecting as ``user`` (a worker's own role on the shared server)."""
    return psycopg.conninfo.make_conninfo(conninfo, user=user)


def go_url(conninfo: str, password: str | None) -> str:
    """``conninfo`` as the ``postgres://`` URL neonize hands to Go's ``lib/pq`` (whatsmeow's
    store), with ``password`` in it: the form Go takes, kept in memory only (never logged: see
    ``agent.whatsapp.base.PostgresSessionStore``). Any other parameter (``sslmode``...) follows."""
    parts = dict(psycopg.conninfo.conninfo_to_dict(conninfo))
    user = quote(str(parts.pop("user", "") or ""), safe="")
    parts.pop("password", None)
    host = str(parts.pop("host", "") or "")
    port = str(parts.pop("port", "") or "")
    dbname = quote(str(parts.pop("dbname", "") or ""), safe="")
    if host.startswith("/"):  # a socket directory: lib/pq takes it as a parameter
        parts["host"], host = host, ""
    auth = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    netloc = f"{auth}{host}{':' + port if port else ''}"
    query = urlencode({k: str(v) for k, v in parts.items()})
    return f"postgres://{netloc}/{dbname}" + (f"?{query}" if query else "")

