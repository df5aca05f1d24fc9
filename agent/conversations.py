"""The seam between the conversation engine and Claude: a chat's conversation, and the set of
them a worker keeps. Two engines implement it (``claude.engine``):

* ``cli`` -- :class:`agent.pool.ClaudePool` of :class:`agent.claude.ClaudeSession`: one
  Claude Code process per live chat, its transcript kept by the CLI;
* ``api`` -- :class:`agent.claude_api.ApiConversations`: the Messages API called from the
  worker, the history kept in the worker's store.

The engine (:mod:`agent.engine`) only speaks these two protocols, so rotation, seeding,
recovery, budgets and the apology are the same code for both (tests/test_claude_engines.py
runs one contract suite against both).
"""

from __future__ import annotations

from typing import Any, Protocol

from agent.claude import TurnResult
from agent.persona import Profile


class Conversation(Protocol):
    """A chat's conversation with Claude."""

    @property
    def session_id(self) -> str | None:
        """The conversation's id; one the chat's stored session does not name is fresh (the
        engine seeds its first turn)."""

    async def turn(self, content: str | list[dict[str, Any]]) -> TurnResult:
        """Ask; an API error is a result with ``is_error``. Raises ``ClaudeError``
        (``timeout``, ``process_exited``...); must not return before the answer is in."""


class Conversations(Protocol):
    """A worker's conversations, one per chat at most, handed out one turn at a time."""

    @property
    def live(self) -> int:
        """Conversations holding resources now (CLI processes; 0 for ``api``)."""

    @property
    def model(self) -> str:
        """The model asked for ("": the CLI's default)."""

    async def acquire(self, chat_id: str, profile: Profile | None = None) -> Conversation:
        """The chat's conversation (resumed from the chat's stored session, else fresh with
        the chat's seed set to ``recovery``), answering with ``profile``'s prompt and model
        (None: the engine's defaults) from this turn on. Raises ``ClaudeError`` when none can
        be had."""

    async def release(self, chat_id: str) -> None:
        """The turn is over; the conversation stays for the next one."""

    async def discard(self, chat_id: str) -> None:
        """End the chat's live conversation (after a failure, a rotation or a reset)."""

    async def reap_idle(self) -> None:
        """Close what has been idle too long."""

    async def close_all(self) -> None:
        """At stop."""
