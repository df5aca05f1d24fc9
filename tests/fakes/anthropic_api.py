"""A fake Anthropic Messages API server for tests and benchmarks.

It speaks the real HTTP + server-sent-events wire protocol of
``POST /v1/messages`` so the real Claude Code CLI (the one bundled in
claude-agent-sdk's wheel) can be pointed at it with
``ANTHROPIC_BASE_URL=api.base_url`` and any ``ANTHROPIC_API_KEY``.

The server runs on its own asyncio loop in a daemon thread of the test
process and binds to ``127.0.0.1`` on a free port::

    with FakeAnthropicAPI() as api:
        env = {"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "sk-test"}
        ...
        assert api.message_requests()[-1].json["messages"][-1] ...

Default reply: ``"echo: <text of the last user message>"`` (injected
``<system-reminder>`` blocks and ``tool_result`` blocks skipped; image blocks
noted as `` [image <media_type>]``). Replace per test with
``api.responder = fn`` where ``fn(request_json) -> str | Reply``; a
:class:`Reply` can also ask for an HTTP error (Anthropic's JSON error shape),
a delay, a hang (until :meth:`FakeAnthropicAPI.release` or stop), token counts
and the number of ``text_delta`` chunks.

Tool use: ``[[tool NAME {json input}]]`` in the last user text makes the fake answer with
``tool_use`` blocks (stop reason ``tool_use``) for the listed tool named NAME or ending in
``__NAME``; the request that brings the ``tool_result`` back is answered ``tool NAME said:
<result>`` (``failed:`` for an error). So the real CLI runs the real MCP server in tests
(:func:`tool_responder`; a :class:`Reply` may also carry ``tool_uses``).

What Claude Code CLI 2.1.331 sends (observed against this fake, driven as agent/claude.py
drives it: ``-p --input-format stream-json --bare --tools ""``):

* Exactly one ``POST /v1/messages?beta=true`` with ``"stream": true`` per user turn, nothing
  else, when ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1``. Without that variable the CLI
  also sends ``HEAD /api/hello`` at start-up (a connectivity probe; answered 404 here and
  listed by :meth:`FakeAnthropicAPI.unknown_requests`). No ``count_tokens``, title-generation
  or quota-probe requests were seen for ``-p`` turns.
* ``messages`` holds the whole conversation so far (earlier turns, also after ``--resume``),
  plus a ``role: "system"`` entry after the first user message (environment info; empty list
  under ``--bare``). ``system`` is a list of text blocks: ``x-anthropic-billing-header: ...``,
  ``You are a Claude agent, built on Anthropic's Claude Agent SDK.``, then ``--system-prompt``
  (or the CLI's default ~7 kB prompt). ``tools`` is ``[]`` with ``--tools ""``.
  Headers: ``x-api-key``, ``anthropic-version``, ``anthropic-beta``, ``user-agent:
  claude-cli/2.1.331 (external, sdk-cli)`` and ``x-claude-code-session-id`` (the CLI session).
* Images: the user's image block is forwarded as is, followed by an injected text block
  ``[Image: source: <path under $TMPDIR>]`` (ignored by the default responder).
* A failed turn's user text is merged into the next user message.
* Auto-compaction: when reported ``input_tokens`` approach the model's context window (1M for
  the default model, so e.g. ``Reply(input_tokens=990_000)``), the next turn first sends a
  summarisation request (last user message a plain string ``"CRITICAL: Respond with TEXT
  ONLY..."``), then the real turn whose first user text starts ``"This session is being
  continued from a previous conversation..."``. :meth:`FakeAnthropicAPI.message_requests`
  leaves the summarisation request out; the default responder answers it with
  ``<analysis>...</analysis><summary>Summary: the user said <texts></summary>`` (without a
  ``<summary>`` block the CLI asks a second time) and ignores the preamble block in the
  following turn.
* Errors: 401/429/500/529 are not retried with ``CLAUDE_CODE_MAX_RETRIES=0``; each retry
  (when allowed) is a separate recorded request. A 400 is retried 3 times regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = [
    "FakeAnthropicAPI",
    "RecordedRequest",
    "Reply",
    "default_responder",
    "is_compaction_request",
    "last_user_images",
    "last_user_text",
    "request_texts",
    "tool_or_default_responder",
    "tool_responder",
    "tool_results",
]

_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class Reply:
    """What the fake should answer to one ``/v1/messages`` request."""

    text: str = ""
    status: int = 200
    error_type: str | None = None  # default derived from status
    error_message: str | None = None
    delay: float = 0.0  # seconds before any byte of the response
    hang: bool = False  # never answer until api.release() or api.stop()
    input_tokens: int | None = None  # default: rough count of request text
    output_tokens: int | None = None  # default: len(text.split())
    chunks: int = 2  # number of text_delta events (stream mode)
    stop_reason: str = "end_turn"
    headers: Mapping[str, str] = field(default_factory=dict)
    #: ``tool_use`` blocks after the text: (tool name as the request lists it, input)
    tool_uses: tuple[tuple[str, Mapping[str, Any]], ...] = ()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without the query string
    query: str
    headers: Mapping[str, str]
    body: bytes
    json: Any  # parsed body or None if it was not JSON
    received_at: float
    status: int = 0  # status the fake answered with (0 until answered)

    @property
    def is_messages(self) -> bool:
        return self.path == "/v1/messages"


Responder = Callable[[Any], "str | Reply"]


# --------------------------------------------------------------------------
# conversation helpers (also used by the default responder)


def _is_injected_text(text: str) -> bool:
    """Text blocks the CLI adds to a user message (not typed by the user)."""
    s = text.lstrip()
    if s.startswith("[Image: source: "):  # the CLI notes where it stored a pasted image
        return True
    if s.startswith(_COMPACTED_PREAMBLE):  # the summary that replaces compacted history
        return True
    return s.startswith("<system-reminder>") or (
        s.startswith("<")
        and s.split(">", 1)[0].lstrip("<").replace("-", "_")
        in {
            "system_reminder",
            "command_name",
            "command_message",
            "local_command_stdout",
            "local_command_caveat",
        }
    )


_COMPACTED_PREAMBLE = "This session is being continued from a previous conversation"
_COMPACTION_MARKERS = (
    "Please provide your summary based on the conversation so far",
    "CRITICAL: Respond with TEXT ONLY. Do NOT call any tools.",
)


def _user_messages(body: Any) -> list[Mapping[str, Any]]:
    if not isinstance(body, Mapping):
        return []
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return []
    return [m for m in msgs if isinstance(m, Mapping) and m.get("role") == "user"]


def _blocks(content: Any) -> list[Mapping[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, Mapping)]
    return []


def _user_text(msg: Mapping[str, Any]) -> str:
    parts = []
    for b in _blocks(msg.get("content")):
        text = b.get("text")
        if b.get("type") == "text" and isinstance(text, str) and not _is_injected_text(text):
            parts.append(text)
    return "\n".join(parts)


def last_user_text(body: Any) -> str:
    """Text of the last ``user`` message that has real (non-injected) text.

    ``tool_result`` blocks and ``<system-reminder>`` text blocks are skipped;
    ``role: "system"`` entries are ignored.
    """
    for msg in reversed(_user_messages(body)):
        # only consider the very last user message that carries user content
        text = _user_text(msg)
        if text or _images(msg):
            return text
    return ""


def _images(msg: Mapping[str, Any]) -> list[str]:
    out = []
    for b in _blocks(msg.get("content")):
        if b.get("type") == "image":
            src = b.get("source") or {}
            mt = src.get("media_type") if isinstance(src, Mapping) else None
            out.append(str(mt or (src.get("type") if isinstance(src, Mapping) else "?")))
    return out


def last_user_images(body: Any) -> list[str]:
    """Media types of image blocks in the last user message with content."""
    for msg in reversed(_user_messages(body)):
        if _user_text(msg) or _images(msg):
            return _images(msg)
    return []


#: ``[[tool NAME {json input}]]`` in the last user text makes the default responder call the
#: tool whose name is NAME or ends with ``__NAME`` (``mcp__wabridge__NAME``), one ``tool_use``
#: block per marker; once the ``tool_result`` comes back it answers ``tool NAME said: ...``
#: (``tool NAME failed: ...`` for an error). A tool the request does not list is answered
#: ``no tool NAME`` (so a test sees that tools are off).
_TOOL_MARKER = re.compile(r"\[\[tool\s+(\w+)\s*(\{.*?\})?\]\]", re.DOTALL)


def tool_results(body: Any) -> list[Mapping[str, Any]]:
    """The ``tool_result`` blocks of the last user message (empty when it has none)."""
    users = _user_messages(body)
    if not users:
        return []
    return [b for b in _blocks(users[-1].get("content")) if b.get("type") == "tool_result"]


def _result_text(block: Mapping[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    return " ".join(str(b.get("text", "")) for b in _blocks(content))


def tool_responder(body: Any) -> Reply | None:
    """The tool-use part of the default responder (None: no marker, answer normally)."""
    results = tool_results(body)
    names: dict[Any, str] = {}
    if results:
        for msg in body.get("messages", []):
            if isinstance(msg, Mapping) and msg.get("role") == "assistant":
                for b in _blocks(msg.get("content")):
                    if b.get("type") == "tool_use":
                        names[b.get("id")] = str(b.get("name", "")).rpartition("__")[2]
        results = [r for r in results if r.get("tool_use_id") in names]  # answers to us
    if results:
        said = []
        for r in results:
            name = names[r.get("tool_use_id")]
            verb = "failed" if r.get("is_error") else "said"
            said.append(f"tool {name} {verb}: {_result_text(r)}")
        return Reply(text="\n".join(said))
    markers = _TOOL_MARKER.findall(last_user_text(body))
    if not markers:
        return None
    listed = [str(t.get("name")) for t in body.get("tools") or [] if isinstance(t, Mapping)]
    uses: list[tuple[str, Mapping[str, Any]]] = []
    missing = []
    for short, raw in markers:
        full = next((n for n in listed if n == short or n.endswith(f"__{short}")), None)
        if full is None:
            missing.append(f"no tool {short}")
        else:
            uses.append((full, json.loads(raw) if raw else {}))
    if missing or not uses:
        return Reply(text="; ".join(missing))
    return Reply(text="", tool_uses=tuple(uses), stop_reason="tool_use")


def tool_or_default_responder(body: Any) -> str | Reply:
    """The fake's responder unless a test sets another: tool markers, else
    :func:`default_responder`."""
    return tool_responder(body) or default_responder(body)


def default_responder(body: Any) -> str:
    if is_compaction_request(body):
        said = [t for m in _user_messages(body)[:-1] if (t := _user_text(m))]
        # the CLI wants this shape, else it asks a second time
        return (
            "<analysis>fake compaction</analysis>\n<summary>Summary: the user said "
            + " | ".join(said)
            + "</summary>"
        )
    reply = f"echo: {last_user_text(body)}"
    for mt in last_user_images(body):
        reply += f" [image {mt}]"
    return reply


def _collect_texts(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for v in value:
            _collect_texts(v, out)
    elif isinstance(value, Mapping):
        t = value.get("type")
        if t in (None, "text") and isinstance(value.get("text"), str):
            out.append(value["text"])
        if "content" in value:
            _collect_texts(value["content"], out)


def request_texts(body: Any) -> list[str]:
    """Every text in ``system`` and ``messages`` (any role, nested blocks)."""
    out: list[str] = []
    if isinstance(body, Mapping):
        _collect_texts(body.get("system"), out)
        _collect_texts(body.get("messages"), out)
    return out


def _looks_auxiliary(body: Any) -> bool:
    """Heuristic for non-turn requests (quota probes, title generation...)."""
    if not isinstance(body, Mapping):
        return True
    if not isinstance(body.get("messages"), list):
        return True
    mt = body.get("max_tokens")
    if isinstance(mt, int) and mt <= 1:
        return True  # quota / auth probe
    system_text = " ".join(
        t for t in request_texts({"system": body.get("system")}) if isinstance(t, str)
    ).lower()
    aux_markers = (
        "generate a concise",  # title / summary generation
        "session title",
        "analyze if this message indicates a new conversation topic",
    )
    if any(m in system_text for m in aux_markers):
        return True
    return is_compaction_request(body)


def is_compaction_request(body: Any) -> bool:
    """The CLI's auto-compaction call: it asks the model to summarise the history."""
    users = _user_messages(body)
    if not users:
        return False
    for b in _blocks(users[-1].get("content")):
        text = b.get("text")
        if b.get("type") != "text" or not isinstance(text, str):
            continue
        if text.lstrip().startswith(_COMPACTED_PREAMBLE):
            continue  # a summary already in the history, not a request for one
        if any(m in text for m in _COMPACTION_MARKERS):
            return True
    return False


def _error_body(err_type: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": err_type, "message": message},
        "request_id": f"req_fake_{uuid.uuid4().hex[:20]}",
    }


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _split(text: str, n: int) -> list[str]:
    n = max(1, n)
    if not text:
        return [""]
    size = max(1, -(-len(text) // n))
    return [text[i : i + size] for i in range(0, len(text), size)]


# --------------------------------------------------------------------------


class FakeAnthropicAPI:
    """Threaded fake of the Anthropic Messages API on 127.0.0.1."""

    def __init__(self, responder: Responder | None = None, *, port: int = 0) -> None:
        self.responder: Responder = responder or tool_or_default_responder
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._released = threading.Event()
        self._stopping = threading.Event()
        self._stopped_event: asyncio.Event | None = None

    # ---- lifecycle -------------------------------------------------------

    @property
    def base_url(self) -> str:
        if not self._ready.is_set():
            raise RuntimeError("FakeAnthropicAPI not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> FakeAnthropicAPI:
        if self._thread is not None:
            return self
        if self._port == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                self._port = s.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="fake-anthropic-api", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._start_error is not None:
            raise RuntimeError("fake API failed to start") from self._start_error
        if not self._ready.is_set():
            raise RuntimeError("fake API did not start in time")
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        loop = self._loop
        if loop is not None and self._stopped_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._stopped_event.set)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> FakeAnthropicAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release(self) -> None:
        """Let requests that are hanging (``Reply(hang=True)``) complete."""
        self._released.set()

    def reset_release(self) -> None:
        self._released.clear()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:
            self._start_error = e
            self._ready.set()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._stopped_event = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, reuse_address=True)
        await site.start()
        self._ready.set()
        if self._stopping.is_set():
            self._stopped_event.set()
        await self._stopped_event.wait()
        await self._runner.cleanup()

    # ---- recording -------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, req: RecordedRequest) -> int:
        with self._lock:
            self._requests.append(req)
            return len(self._requests) - 1

    def _set_status(self, idx: int, status: int) -> None:
        with self._lock:
            r = self._requests[idx]
            self._requests[idx] = RecordedRequest(
                r.method, r.path, r.query, r.headers, r.body, r.json, r.received_at, status
            )

    def message_requests(self) -> list[RecordedRequest]:
        """``POST /v1/messages`` requests that are real conversation turns."""
        return [
            r
            for r in self.requests
            if r.method == "POST" and r.is_messages and not _looks_auxiliary(r.json)
        ]

    def unknown_requests(self) -> list[RecordedRequest]:
        """Requests the fake answered 404 to (unexpected paths)."""
        return [r for r in self.requests if r.status == 404]

    @staticmethod
    def all_texts(req: RecordedRequest) -> list[str]:
        return request_texts(req.json)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.message_requests()) >= n:
                return True
            time.sleep(0.02)
        return False

    # ---- HTTP ------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parsed: Any = None
        json_ok = False
        if body:
            try:
                parsed = json.loads(body)
                json_ok = True
            except (ValueError, UnicodeDecodeError):
                parsed = None
        idx = self._record(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=request.query_string,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                json=parsed,
                received_at=time.time(),
            )
        )
        resp = await self._dispatch(request, parsed, json_ok)
        self._set_status(idx, resp.status)
        return resp

    async def _dispatch(self, request: web.Request, body: Any, json_ok: bool) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if request.method == "HEAD" and path in ("", "/v1", "/v1/messages"):
            return web.Response(status=200)
        if request.method != "POST" or path not in ("/v1/messages", "/v1/messages/count_tokens"):
            return self._error(
                404, "not_found_error", f"Not found: {request.method} {request.path}"
            )
        if not json_ok or not isinstance(body, dict):
            return self._error(
                400, "invalid_request_error", "Request body is not valid JSON object"
            )
        if not isinstance(body.get("messages"), list):
            return self._error(400, "invalid_request_error", "messages: Field required")
        if path == "/v1/messages/count_tokens":
            return web.json_response({"input_tokens": self._count_input(body)})

        try:
            out = self.responder(body)
        except Exception as e:
            return self._error(500, "api_error", f"fake responder raised: {e!r}")
        reply = out if isinstance(out, Reply) else Reply(text=str(out))

        if reply.delay > 0:
            await self._sleep_unless_stopping(reply.delay)
        if reply.hang:
            while not self._released.is_set() and not self._stopping.is_set():
                await asyncio.sleep(0.05)
            if self._stopping.is_set():
                return self._error(529, "overloaded_error", "fake API stopping")
        if reply.status >= 400:
            err_type = reply.error_type or _ERROR_TYPES.get(reply.status, "api_error")
            return self._error(
                reply.status, err_type, reply.error_message or f"fake {err_type}", reply.headers
            )

        in_tok = reply.input_tokens if reply.input_tokens is not None else self._count_input(body)
        out_tok = (
            reply.output_tokens
            if reply.output_tokens is not None
            else max(1, len(reply.text.split()))
        )
        msg_id = f"msg_fake_{uuid.uuid4().hex[:24]}"
        model = str(body.get("model") or "claude-fake")
        if body.get("stream"):
            return await self._stream(request, reply, msg_id, model, in_tok, out_tok)
        return web.json_response(
            {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": reply.text}],
                "stop_reason": reply.stop_reason,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": in_tok,
                    "output_tokens": out_tok,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            },
            headers={"request-id": f"req_fake_{uuid.uuid4().hex[:20]}", **reply.headers},
        )

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    @staticmethod
    def _count_input(body: Any) -> int:
        return max(1, sum(len(t.split()) for t in request_texts(body)))

    @staticmethod
    def _error(
        status: int, err_type: str, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.json_response(
            _error_body(err_type, message),
            status=status,
            headers={"request-id": f"req_fake_{uuid.uuid4().hex[:20]}", **(headers or {})},
        )

    async def _stream(
        self,
        request: web.Request,
        reply: Reply,
        msg_id: str,
        model: str,
        in_tok: int,
        out_tok: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "request-id": f"req_fake_{uuid.uuid4().hex[:20]}",
                **reply.headers,
            },
        )
        await resp.prepare(request)
        usage0 = {
            "input_tokens": in_tok,
            "output_tokens": 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": usage0,
                    },
                },
            ),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ("ping", {"type": "ping"}),
        ]
        for piece in _split(reply.text, reply.chunks):
            events.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        for idx, (name, args) in enumerate(reply.tool_uses, start=1):
            events += [
                ("content_block_start", {
                    "type": "content_block_start", "index": idx,
                    "content_block": {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}",
                                      "name": name, "input": {}}}),
                ("content_block_delta", {
                    "type": "content_block_delta", "index": idx,
                    "delta": {"type": "input_json_delta", "partial_json": json.dumps(args)}}),
                ("content_block_stop", {"type": "content_block_stop", "index": idx}),
            ]
        events += [
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": out_tok},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        try:
            for name, data in events:
                await resp.write(_sse(name, data))
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        return resp
