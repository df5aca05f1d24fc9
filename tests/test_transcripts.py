"""Claude transcripts follow the account: on a portable store (PostgreSQL) the worker's pool
mirrors each chat's CLI transcript into the store after a turn, and a pool on another host
(another state directory, an empty CLI config dir) restores it before ``--resume``: the
chat goes on with its context instead of a reseed. Real CLI, fake Messages API."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fakes.anthropic_api import FakeAnthropicAPI
from postgres_cluster import Cluster

from agent.claude import ClaudeSettings
from agent.pool import ClaudePool, transcript_path
from agent.store import PostgresTarget, Store
from wabridge.claude_cli import bundled_cli

pytestmark = [pytest.mark.claude, pytest.mark.timeout(120)]

CLI = bundled_cli()
requires_cli = pytest.mark.skipif(CLI is None or not CLI.is_file(),
                                  reason="claude-agent-sdk's bundled CLI missing")


@pytest.fixture
def api() -> Iterator[FakeAnthropicAPI]:
    with FakeAnthropicAPI() as fake:
        yield fake


def _settings(api: FakeAnthropicAPI) -> ClaudeSettings:
    assert CLI is not None
    return ClaudeSettings(cli_path=CLI, model=None, system_prompt="You answer WhatsApp.",
                          turn_timeout=30.0,
                          extra_env={"ANTHROPIC_BASE_URL": api.base_url,
                                     "ANTHROPIC_API_KEY": "sk-ant-test"})


def _pg_store(cluster: Cluster) -> Store:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return Store(PostgresTarget(cluster.conninfo(), schema))


async def _first_host(api: FakeAnthropicAPI, store: Store, root: Path) -> str:
    pool = ClaudePool(2, 600, _settings(api), root, store)
    session = await pool.acquire("c")
    result = await session.turn("the code word is PELICAN")
    store.complete_turn("c", [], [result.text or ""], None, session_id=result.session_id)
    await pool.release("c")
    await pool.close_all()
    assert result.session_id
    return result.session_id


async def _second_host(api: FakeAnthropicAPI, store: Store, root: Path) -> tuple[str, str]:
    pool = ClaudePool(2, 600, _settings(api), root, store)
    session = await pool.acquire("c")
    try:
        result = await session.turn("what was the code word?")
        assert result.text == "echo: what was the code word?"
    finally:
        await pool.release("c")
        await pool.close_all()
    return session.session_id, "\n".join(FakeAnthropicAPI.all_texts(api.message_requests()[-1]))


@requires_cli
async def test_a_moved_chat_resumes_with_its_transcript(api: FakeAnthropicAPI, postgres: Cluster,
                                                        tmp_path: Path) -> None:
    store = _pg_store(postgres)
    try:
        first = await _first_host(api, store, tmp_path / "host-a" / "alice")
        assert store.transcript("c", first) is not None  # mirrored after the turn
        session_id, sent = await _second_host(api, store, tmp_path / "host-b" / "state")
        assert session_id == first  # resumed, not a fresh session
        assert "the code word is PELICAN" in sent  # the earlier exchange went along
        row = store.chat("c")
        assert row is not None and row.seed is None  # no reseed was needed
        assert transcript_path(tmp_path / "host-b" / "state" / "claude", first) is not None
    finally:
        store.close()


@requires_cli
async def test_without_a_portable_store_the_other_host_reseeds(api: FakeAnthropicAPI,
                                                                tmp_path: Path) -> None:
    """The same move over an SQLite store (no mirror): the resume fails and the chat is
    reseeded, which is what the mirror prevents."""
    store = Store(tmp_path / "agent.db")
    try:
        first = await _first_host(api, store, tmp_path / "host-a" / "alice")
        assert store.transcript("c", first) is None
        session_id, sent = await _second_host(api, store, tmp_path / "host-b" / "state")
        assert session_id != first
        assert "PELICAN" not in sent
        row = store.chat("c")
        assert row is not None and row.seed == "recovery"
    finally:
        store.close()
