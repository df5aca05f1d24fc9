"""The PostgreSQL control plane for a ``Fleet`` (tests/fleet.py): a database and a login role
for the controller in the session's cluster, the files that hand it the password (the
``postgres-password`` credential, as in production), and the documents as a test reads and
writes them (what ``Fleet`` does with the emulator's client on Firestore).

    with postgres_plane(cluster) as plane, PlaneFleet(plane) as fleet: ...
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from fleet import Fleet
from postgres_cluster import Cluster
from psycopg import sql

from controller.pgplane import PostgresPlane

PASSWORD_FILE = "/etc/wabridge/postgres-password"
DROPIN = "/etc/systemd/system/wabridge-controller.service.d/50-postgres.conf"


class PlaneDocs:
    """The plane's documents from the test process, blocking (``Fleet.doc``/``request``/
    ``messages`` on the PostgreSQL plane)."""

    def __init__(self, plane: PostgresPlane) -> None:
        self.plane = plane

    def doc(self, user: str) -> dict[str, Any]:
        found = asyncio.run(self.plane.get(user))
        return dict(found.data) if found is not None else {}

    def request(self, user: str, status: str, **fields: Any) -> None:
        asyncio.run(self.plane.update(user, {"status": status, **fields}))

    def messages(self, user: str) -> list[dict[str, Any]]:
        return asyncio.run(self.plane.messages(user, limit=10_000))

    def close(self) -> None:
        asyncio.run(self.plane.close())


@dataclass(frozen=True)
class PlaneSetup:
    config: dict[str, dict[str, Any]]
    files: dict[str, str]
    docs: PlaneDocs


@contextmanager
def postgres_plane(cluster: Cluster) -> Iterator[PlaneSetup]:
    """A fresh database owned by a fresh controller role (so it may create the plane's
    schema), reached over TCP on 127.0.0.1 with a password; dropped at exit."""
    name = f"plane_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(16)
    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(name), sql.Literal(password)))
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(name)))
    url = cluster.url(name, name)
    docs = PlaneDocs(PostgresPlane(url, password=password))
    try:
        yield PlaneSetup(
            config={"storage": {"postgres_url": url}},
            files={PASSWORD_FILE: password,
                   DROPIN: f"[Service]\nLoadCredential=postgres-password:{PASSWORD_FILE}\n"},
            docs=docs)
    finally:
        docs.close()
        with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


class PlaneFleet(Fleet):
    """A ``Fleet`` on the PostgreSQL plane: its documents through :class:`PlaneDocs`."""

    def __init__(self, plane: PlaneSetup, **kwargs: Any) -> None:
        config = {name: dict(values) for name, values in plane.config.items()}
        for name, values in (kwargs.pop("config", None) or {}).items():
            config.setdefault(name, {}).update(values)
        files = {**plane.files, **(kwargs.pop("extra_files", None) or {})}
        super().__init__(plane="postgres", config=config, extra_files=files, **kwargs)
        self.docs = plane.docs

    def doc(self, user: str) -> dict[str, Any]:
        return self.docs.doc(user)

    def request(self, user: str, status: str, **fields: Any) -> None:
        self.docs.request(user, status, **fields)

    def messages(self, user: str) -> list[dict[str, Any]]:
        return self.docs.messages(user)
