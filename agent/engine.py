"""The conversation engine: durable inbox -> Claude turn -> durable outbox -> WhatsApp.

One turn at a time per chat, chats concurrently. Messages of a burst (within ``debounce``)
are answered in one turn. A turn's reply is committed together with marking its messages done
(:meth:`Store.complete_turn`), then delivered by a single sender task in commit order with
ids chosen before the first attempt, so a crash anywhere yields exactly one reply per turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from agent import shaping
from agent.claude import ClaudeError, ClaudeSession, ClaudeSettings, TurnResult
from agent.store import PendingInbound, PendingReply, Store
from agent.whatsapp.base import SendError, WhatsAppBackend
from agent.whatsapp.events import IncomingMessage
from wabridge import logs
from wabridge.config import ConversationConfig

log = logs.get("agent.engine")

MessageReporter = Callable[[str, str, str, str, str], None]  # direction, chat, sender, text, id


def payload_of(message: IncomingMessage) -> dict[str, Any]:
    """What the inbox keeps of a message (images are kept base64-free: bytes -> hex)."""
    data = asdict(message)
    data["images"] = [
        {"mime_type": i.mime_type, "data": i.data.hex(), "caption": i.caption}
        for i in message.images
    ]
    return data


def message_of(payload: dict[str, Any]) -> IncomingMessage:
    from agent.whatsapp.events import Image  # noqa: PLC0415

    data = dict(payload)
    data["images"] = tuple(
        Image(i["mime_type"], bytes.fromhex(i["data"]), i.get("caption", ""))
        for i in data.get("images", [])
    )
    return IncomingMessage(**data)


def turn_content(batch: list[PendingInbound]) -> str | list[dict[str, Any]]:
    """The user turn Claude sees for a batch of messages (pure)."""
    import base64  # noqa: PLC0415

    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for item in batch:
        msg = message_of(item.payload)
        text = msg.text
        if msg.quoted_text:
            text = f"(replying to: \"{msg.quoted_text}\")\n{text}"
        if msg.is_group:
            text = f"[{msg.sender_name or msg.sender}] {text}"
        texts.append(text)
        images.extend(
            {"type": "image", "source": {"type": "base64", "media_type": img.mime_type,
                                         "data": base64.b64encode(img.data).decode()}}
            for img in msg.images
        )
    joined = "\n".join(t for t in texts if t)
    if not images:
        return joined
    return [*images, {"type": "text", "text": joined or "(image)"}]


class ClaudePool:
    """At most ``size`` live Claude processes; least recently used ones close first."""

    def __init__(self, size: int, idle_timeout: float, settings: ClaudeSettings, root: Path,
                 store: Store) -> None:
        self._size = size
        self._idle = idle_timeout
        self._settings = settings
        self._root = root
        self._store = store
        self._live: dict[str, tuple[ClaudeSession, float]] = {}
        self._busy: set[str] = set()
        self._cond = asyncio.Condition()

    @property
    def live(self) -> int:
        return len(self._live)

    async def acquire(self, chat_id: str) -> ClaudeSession:
        async with self._cond:
            while True:
                entry = self._live.get(chat_id)
                if entry and entry[0].alive:
                    self._busy.add(chat_id)
                    return entry[0]
                if entry:
                    await self._drop(chat_id)
                if len(self._live) < self._size:
                    break
                idle = [c for c in self._live if c not in self._busy]
                if idle:
                    victim = min(idle, key=lambda c: self._live[c][1])
                    await self._drop(victim)
                    break
                await self._cond.wait()
            self._busy.add(chat_id)
        try:
            session = await self._open(chat_id)
        except BaseException:
            async with self._cond:
                self._busy.discard(chat_id)
                self._cond.notify_all()
            raise
        self._live[chat_id] = (session, time.monotonic())
        return session

    async def _open(self, chat_id: str) -> ClaudeSession:
        safe = "".join(c if c.isalnum() else "_" for c in chat_id)[:80]
        workdir = self._root / "chats" / safe
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_dir = self._root / "claude"
        config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        row = self._store.chat(chat_id)
        resume = row.session_id if row else None
        try:
            session = await ClaudeSession.open(settings=self._settings, workdir=workdir,
                                               config_dir=config_dir, resume_session_id=resume)
        except ClaudeError as exc:
            if exc.code != "resume_failed":
                raise
            log.warning("claude.resume_failed", chat_id=chat_id, session_id=resume)
            self._store.set_session(chat_id, None)
            session = await ClaudeSession.open(settings=self._settings, workdir=workdir,
                                               config_dir=config_dir, resume_session_id=None)
        log.info("claude.started", chat_id=chat_id, pid=session.pid, resumed=bool(resume))
        return session

    async def release(self, chat_id: str) -> None:
        async with self._cond:
            self._busy.discard(chat_id)
            if chat_id in self._live:
                self._live[chat_id] = (self._live[chat_id][0], time.monotonic())
            self._cond.notify_all()

    async def discard(self, chat_id: str) -> None:
        async with self._cond:
            await self._drop(chat_id)
            self._busy.discard(chat_id)
            self._cond.notify_all()

    async def _drop(self, chat_id: str) -> None:
        entry = self._live.pop(chat_id, None)
        if entry:
            await entry[0].close()
            log.info("claude.closed", chat_id=chat_id)

    async def reap_idle(self) -> None:
        now = time.monotonic()
        async with self._cond:
            for chat_id in [c for c, (_, used) in self._live.items()
                            if c not in self._busy and now - used > self._idle]:
                await self._drop(chat_id)
            self._cond.notify_all()

    async def close_all(self) -> None:
        entries = list(self._live.items())
        self._live.clear()
        await asyncio.gather(*(s.close() for _, (s, _) in entries), return_exceptions=True)


class Engine:
    def __init__(
        self,
        store: Store,
        backend: WhatsAppBackend,
        pool: ClaudePool,
        conversation: ConversationConfig,
        report_message: MessageReporter,
    ) -> None:
        self._store = store
        self._backend = backend
        self._pool = pool
        self._conv = conversation
        self._report = report_message
        self._chat_tasks: dict[str, asyncio.Task[None]] = {}
        self._outbox_wake = asyncio.Event()
        self.accepting = True
        self.turns_in_flight: dict[str, float] = {}  # chat -> monotonic start (watchdog)

    # --- inbound -----------------------------------------------------------------------
    def persist(self, message: IncomingMessage) -> bool:
        """Called on the backend's thread: commit before anything else. False: duplicate."""
        fresh = self._store.add_inbound(message.chat_id, message.sender, message.wa_id,
                                        payload_of(message))
        if not fresh:
            log.info("message.duplicate", chat_id=message.chat_id, wa_id=message.wa_id)
        return fresh

    def wake_chat(self, chat_id: str) -> None:
        """Start the chat's turn loop if it is not running (loop thread only)."""
        if not self.accepting:
            return
        task = self._chat_tasks.get(chat_id)
        if task is None or task.done():
            self._chat_tasks[chat_id] = asyncio.create_task(self._chat_loop(chat_id),
                                                            name=f"chat:{chat_id}")

    def resume_pending(self) -> None:
        for chat_id in self._store.pending_chats():
            self.wake_chat(chat_id)
        self._outbox_wake.set()

    async def _chat_loop(self, chat_id: str) -> None:
        with structlog.contextvars.bound_contextvars(chat_id=chat_id):
            while self.accepting:
                if self._conv.debounce > 0:
                    await asyncio.sleep(self._conv.debounce)
                batch = self._store.pending_inbound(chat_id, self._conv.max_batch)
                if not batch:
                    return
                await self._turn(chat_id, batch)

    async def _turn(self, chat_id: str, batch: list[PendingInbound]) -> None:
        for item in batch:
            log.info("message.received", wa_id=item.wa_id, sender=item.sender)
            self._report("in", chat_id, item.sender, str(item.payload.get("text", "")),
                         item.wa_id)
        content = turn_content(batch)
        last = message_of(batch[-1].payload)
        with contextlib.suppress(Exception):
            await self._backend.set_typing(chat_id, True)
        self.turns_in_flight[chat_id] = time.monotonic()
        try:
            text, result = await self._ask(chat_id, content)
        finally:
            self.turns_in_flight.pop(chat_id, None)
            with contextlib.suppress(Exception):
                await self._backend.set_typing(chat_id, False)
        replies = shaping.split(shaping.to_whatsapp(text), self._conv.reply_limit)
        # total_cost_usd is cumulative per conversation (restored on --resume): count the
        # per-turn figure instead, so restarts and resumes never double-count.
        cost = result.turn_cost_usd if result else 0.0
        usage = result.usage if result else {}
        queued = self._store.complete_turn(
            chat_id, [i.id for i in batch], replies, payload_of(last),
            session_id=result.session_id if result else None, cost_delta=cost,
            input_tokens=int(usage.get("input_tokens", 0)),
            output_tokens=int(usage.get("output_tokens", 0)),
        )
        log.info("turn.done", messages=len(batch), replies=len(queued),
                 is_error=bool(result is None or result.is_error), cost_usd=round(cost, 6))
        self._outbox_wake.set()

    async def _ask(self, chat_id: str, content: str | list[dict[str, Any]]
                   ) -> tuple[str, TurnResult | None]:
        for attempt in (1, 2):
            try:
                session = await self._pool.acquire(chat_id)
            except ClaudeError as exc:
                log.error("claude.unavailable", code=exc.code, error=str(exc))
                return self._conv.apology, None
            try:
                result = await session.turn(content)
            except ClaudeError as exc:
                log.warning("claude.turn_failed", code=exc.code, error=str(exc), attempt=attempt)
                await self._pool.discard(chat_id)
                continue
            await self._pool.release(chat_id)
            if result.is_error:
                log.error("claude.api_error", error=result.error)
                return self._conv.apology, result
            return result.text or "(no answer)", result
        return self._conv.apology, None

    # --- outbound ----------------------------------------------------------------------
    async def deliver_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.deliver_pending()
            self._outbox_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_wake.wait(), 1.0)

    async def deliver_pending(self) -> None:
        if not self._backend.is_connected():
            return
        for reply in self._store.pending_replies():
            if not await self._send(reply):
                return

    async def _send(self, reply: PendingReply) -> bool:
        quote = message_of(reply.quote) if reply.quote else None
        try:
            await self._backend.send_text(reply.chat_id, reply.text, quote=quote,
                                          msg_id=reply.wa_id)
        except SendError as exc:
            log.warning("outbox.send_failed", chat_id=reply.chat_id, error=str(exc))
            return False
        self._store.mark_sent(reply.id)
        log.info("outbox.delivered", chat_id=reply.chat_id, wa_id=reply.wa_id)
        self._report("out", reply.chat_id, "me", reply.text, reply.wa_id)
        return True

    async def drain(self, timeout: float) -> None:
        """Stop taking turns; let turns in flight finish within ``timeout``; flush the outbox."""
        self.accepting = False
        tasks = [t for t in self._chat_tasks.values() if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.deliver_pending(), max(0.5, timeout / 2))
