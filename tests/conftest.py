"""Session-wide fixtures: the Firestore emulator is started once and shared (one project per
test keeps databases apart)."""

from __future__ import annotations

from collections.abc import Iterator

import firestore_emulator as emulator
import postgres_cluster
import pytest


@pytest.fixture(scope="session")
def firestore_emulator() -> Iterator[str]:
    """HOST:PORT of a Firestore emulator shared by the session; skips with the reason."""
    reason = emulator.available()
    if reason is not None:
        pytest.skip(f"Firestore emulator unavailable: {reason}")
    with emulator.running() as emu:
        yield emu.address


@pytest.fixture(scope="session")
def postgres() -> Iterator[postgres_cluster.Cluster]:
    """A private PostgreSQL 15 cluster shared by the session; skips with the reason."""
    reason = postgres_cluster.available()
    if reason is not None:
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    with postgres_cluster.running() as cluster:
        yield cluster
