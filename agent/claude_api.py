"""The ``api`` Claude engine: chats talk to the Messages API from the worker itself, through
the official ``anthropic`` SDK; each conversation's history lives in the worker's store.

A conversation is a session id (a UUID, as the CLI's) naming its messages in the store's
``api_messages`` table. A turn sends the session's stored messages plus the new user message
and stores both sides; nothing of a chat is held in memory between turns, so a live chat costs
a dictionary entry (the SDK client is imported on the first turn, without the SDK's eager
package imports: :mod:`agent.anthropic_import`; a worker on the ``cli`` engine never pays it).
The engine (:mod:`agent.engine`) drives it
through :mod:`agent.conversations`, exactly as it drives the CLI pool: same rotation (the
summary turn, then the session forgotten: :meth:`ApiConversations.acquire` drops the old
sessions' messages), same seeding and recovery (a stored session id with no stored messages --
e.g. the chat ran on the ``cli`` engine before -- is not resumable: seed ``recovery``).

Behaviour matched to the CLI engine (agent/claude.py):

* an API error (429, 500, 529 overloaded, 401, a refused connection) is a
  :class:`~agent.claude.TurnResult` with ``is_error`` and ``"API Error: <status> ..."``
  (the engine answers with the apology); no retries unless ``claude.max_retries``;
* the user message is stored before the request, so a failed turn's text reaches Claude with
  the next one (the CLI keeps and merges it the same way: consecutive user messages are
  merged into one);
* a turn longer than ``claude.turn_timeout`` raises ``ClaudeError("timeout")``;
* a missing API key is ``ClaudeError("not_configured")`` when the conversation is acquired;
* user text starting with ``/`` gets the same leading space
  (:func:`agent.claude.normalize_content`);
* cost: the CLI reports its own; here it is ``usage`` priced by ``claude.api_prices``
  (:func:`agent.budget.usage_cost`).

Not streamed: a WhatsApp reply is sent whole after the turn (the engine splits and paces it),
so streaming would add SSE parsing per turn and nothing a contact sees; a non-streamed
request with our own timeout also keeps the SDK from refusing long ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import budget
from agent.anthropic_import import import_anthropic
from agent.claude import ClaudeError, TurnResult, normalize_content
from agent.persona import Profile
from agent.store import Store
from wabridge import logs
from wabridge.prices import Price

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic

log = logs.get("agent.claude_api")

_USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
               "cache_read_input_tokens")


@dataclass(frozen=True)
class ApiSettings:
    model: str
    price: Price  # of ``model``
    system_prompt: str | None
    max_tokens: int = 4096
    turn_timeout: float = 120.0
    max_retries: int = 0
    api_key: str | None = None  # ANTHROPIC_API_KEY (the user's own key first), as the CLI's
    base_url: str | None = None  # ANTHROPIC_BASE_URL
    prices: Mapping[str, Price] = field(default_factory=dict)  # the models a user may pick


def request_messages(stored: list[tuple[str, list[dict[str, Any]]]]
                     ) -> list[dict[str, Any]]:
    """The ``messages`` of a request: the stored ones in order, consecutive messages of the
    same role merged (a failed turn leaves a user message without an answer)."""
    out: list[dict[str, Any]] = []
    for role, blocks in stored:
        if out and out[-1]["role"] == role:
            out[-1]["content"] = [*out[-1]["content"], *blocks]
        else:
            out.append({"role": role, "content": list(blocks)})
    return out


def _usage(raw: Any) -> dict[str, int]:
    return {k: int(getattr(raw, k, 0) or 0) for k in _USAGE_KEYS}


class ApiConversation:
    """One chat's conversation (see the module docstring); made by :class:`ApiConversations`."""

    def __init__(self, owner: ApiConversations, chat_id: str, session_id: str) -> None:
        self._owner = owner
        self._chat_id = chat_id
        self._session_id = session_id
        self.profile = Profile()  # the persona of the chat's next request

    @property
    def session_id(self) -> str:
        return self._session_id

    async def turn(self, content: str | list[dict[str, Any]]) -> TurnResult:
        """Ask with the stored history; raises ``ClaudeError("timeout")``."""
        return await self._owner.ask(self._chat_id, self._session_id, content, self.profile)


class ApiConversations:
    """The worker's ``api`` conversations (:class:`agent.conversations.Conversations`)."""

    def __init__(self, settings: ApiSettings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._client: AsyncAnthropic | None = None
        self._open: dict[str, ApiConversation] = {}

    @property
    def live(self) -> int:
        return 0  # nothing is held per chat between turns

    @property
    def model(self) -> str:
        return self._settings.model

    def _get_client(self) -> AsyncAnthropic:
        if self._client is None:
            anthropic = import_anthropic()  # only workers on the api engine pay for it
            s = self._settings
            self._client = anthropic.AsyncAnthropic(
                api_key=s.api_key, base_url=s.base_url, max_retries=s.max_retries,
                timeout=s.turn_timeout)
        return self._client

    async def acquire(self, chat_id: str, profile: Profile | None = None) -> ApiConversation:
        """The chat's conversation; its requests carry ``profile``'s prompt and model (every
        request sends the system prompt, so a change applies to the very next one)."""
        conv = await self._acquire(chat_id)
        profile = profile or Profile()
        if profile.model and profile.model != self._settings.model \
                and profile.model not in self._settings.prices:
            raise ClaudeError("not_configured", f"the api engine has no price for the model "
                              f"{profile.model!r} (claude.api_prices)")
        conv.profile = profile
        return conv

    async def _acquire(self, chat_id: str) -> ApiConversation:
        key = self._settings.api_key
        if not key or not key.strip():
            raise ClaudeError(
                "not_configured",
                "no Anthropic API key configured: put ANTHROPIC_API_KEY=sk-ant-... in "
                "/etc/wabridge/worker.env (mode 0600) and restart the account",
            )
        conv = self._open.get(chat_id)
        row = self._store.chat(chat_id)
        stored = row.session_id if row else None
        if conv is not None and conv.session_id == stored:
            return conv
        if stored and self._store.has_api_session(stored):
            conv = ApiConversation(self, chat_id, stored)
        else:
            if stored:
                log.warning("claude.resume_failed", chat_id=chat_id, session_id=stored,
                            error="no stored api conversation")
                self._store.set_session(chat_id, None, seed="recovery")
            conv = ApiConversation(self, chat_id, str(uuid.uuid4()))
        dropped = self._store.drop_api_sessions(chat_id, keep=stored if stored == conv.session_id
                                                else None)
        if dropped:
            log.info("claude_api.history_dropped", chat_id=chat_id, messages=dropped)
        self._open[chat_id] = conv
        return conv

    async def release(self, chat_id: str) -> None:
        del chat_id  # nothing is held between turns

    async def discard(self, chat_id: str) -> None:
        self._open.pop(chat_id, None)

    async def reap_idle(self) -> None:
        pass  # nothing to close: a chat costs no process

    async def close_all(self) -> None:
        self._open.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ask(self, chat_id: str, session_id: str, content: str | list[dict[str, Any]],
                  profile: Profile | None = None) -> TurnResult:
        anthropic = import_anthropic()  # loaded by _get_client already
        s = self._settings
        blocks = normalize_content(content)
        self._store.add_api_message(chat_id, session_id, "user", blocks)
        messages = request_messages(self._store.api_messages(session_id))
        client = self._get_client()
        started = time.monotonic()
        # the history is sent again with every turn: cached, it is read at 0.1x the input
        # price (the CLI marks its requests the same way)
        profile = profile or Profile()
        model = profile.model or s.model
        price = s.price if model == s.model else s.prices[model]
        system = profile.system_prompt or s.system_prompt
        kwargs: dict[str, Any] = {"model": model, "max_tokens": s.max_tokens,
                                  "messages": messages, "cache_control": {"type": "ephemeral"}}
        if system:
            kwargs["system"] = system
        try:
            reply = await asyncio.wait_for(client.messages.create(**kwargs),
                                           timeout=s.turn_timeout)
        except (TimeoutError, anthropic.APITimeoutError):
            raise ClaudeError("timeout", f"no answer within {s.turn_timeout:g}s") from None
        except anthropic.APIStatusError as exc:
            return self._error(session_id, f"API Error: {exc.status_code} {exc.message}",
                               started)
        except anthropic.APIConnectionError as exc:
            return self._error(session_id, f"API Error: {exc.message}", started)
        text = "".join(b.text for b in reply.content if b.type == "text")
        self._store.add_api_message(chat_id, session_id, "assistant",
                                    [{"type": "text", "text": text or "(no answer)"}])
        usage = _usage(reply.usage)
        cost = budget.usage_cost(usage, price)
        return TurnResult(text=text, is_error=False, error=None, session_id=session_id,
                          total_cost_usd=cost, usage=usage,
                          duration_ms=round((time.monotonic() - started) * 1000),
                          turn_cost_usd=cost)

    @staticmethod
    def _error(session_id: str, error: str, started: float) -> TurnResult:
        return TurnResult(text=error, is_error=True, error=error, session_id=session_id,
                          total_cost_usd=0.0, usage={},
                          duration_ms=round((time.monotonic() - started) * 1000))

