"""Where one account's state lives (``storage.backend``): the conversation store and
neonize's WhatsApp session, both in the state directory (SQLite, the default) or both in the
account's own role and schema on PostgreSQL, which the controller made before the start
(``controller.pg_roles``) and whose password systemd handed over as a credential."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from agent.inbound_hold import next_delay
from agent.store import PostgresTarget, Store
from agent.whatsapp.base import PostgresSessionStore
from wabridge import config, logs

log = logs.get("agent")


def store_location(user_id: str, cfg: config.Config, state_dir: Path
                   ) -> Path | PostgresTarget:
    """Where this account's store lives (``storage.backend``): the SQLite file in its state
    directory, or its own role's schema on PostgreSQL with the password systemd handed over
    (the controller made both: ``controller.pg_roles``)."""
    if cfg.storage.backend != "postgresql":
        return state_dir / "agent.db"
    from wabridge import credentials, postgres  # noqa: PLC0415 (psycopg only when used)

    role = postgres.account_role(user_id)
    return PostgresTarget(postgres.with_user(cfg.storage.postgres_url, role), role,
                          credentials.read(credentials.POSTGRES_PASSWORD))


def session_store(where: Path | PostgresTarget) -> PostgresSessionStore | None:
    """neonize's session store next to the conversation store: on PostgreSQL the same role
    and schema (whatsmeow's tables beside ours), else None (a file in the state directory)."""
    if not isinstance(where, PostgresTarget):
        return None
    from wabridge import postgres  # noqa: PLC0415 (psycopg only when used)

    return PostgresSessionStore(postgres.go_url(where.conninfo, where.password),
                                f"{postgres.describe(where.conninfo)} schema {where.schema}",
                                where.password)


def open_store(where: Path | PostgresTarget, notify: Callable[[str], None],
               sleep: Callable[[float], None] = time.sleep) -> Store:
    """The account's store, once it opens. PostgreSQL down or restarting at start (systemd
    restarted this worker meanwhile): wait for it with backoff (1 s doubling to 30 s), the
    unit "activating" with a STATUS= saying why and its start timeout extended, rather than
    exit and burn the unit's start limit; anything else is raised at once."""
    delay = 0.0
    while True:
        try:
            return Store(where)
        except Exception as exc:
            if not isinstance(where, PostgresTarget):
                raise
            from wabridge import postgres  # noqa: PLC0415 (psycopg only when used)

            if not postgres.is_outage(exc):
                raise
            delay = next_delay(delay)
            log.warning("store.unavailable", task="open", retry_in=delay, error=str(exc))
            notify(f"STATUS=waiting for the database ({postgres.describe(where.conninfo)}): "
                   f"{str(exc).strip().splitlines()[0]}")
            notify(f"EXTEND_TIMEOUT_USEC={int((delay + 30) * 1_000_000)}")
            sleep(delay)
