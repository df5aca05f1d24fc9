"""The conversation engine: durable inbox -> policy -> Claude turn -> durable outbox -> WhatsApp.

Over 600 lines because the steps below share the engine's per-chat state (turn loops, token
buckets, the loop guard, the send lock); the decisions themselves are pure modules.

One turn at a time per chat, chats concurrently. Messages of a burst (within ``debounce``)
are answered in one turn; messages arriving during a turn wait for the next one. A turn's
reply is committed together with marking its messages done (:meth:`Store.complete_turn`),
then delivered by a single, paced sender task in commit order. A crash anywhere yields one
reply per turn exactly once on a backend that sends with the id chosen before the first
attempt (the simulator); on neonize, which picks its own ids, a crash during the library call
makes that reply uncertain: at least once (``conversation.uncertain_replies = resend``, the
default) or at most once (``drop``). See :mod:`agent.delivery`.

Per step of a chat (all decisions are pure functions in :mod:`agent.policy`,
:mod:`agent.commands`, :mod:`agent.budget` and :mod:`agent.rotation`):

1. every pending message is decided by the user's :class:`~agent.policy.Policy`; messages
   not answered are marked skipped with a reason (never lost);
2. a command (from the owner, or anyone with ``commands_from = everyone``) is run on its own,
   in order with the surrounding messages, and answered through the outbox;
3. non-owner messages take a token from their sender's bucket; excess ones are skipped and
   the sender gets one "slow down" notice per episode (it ends when the sender has paused
   long enough for the bucket to refill completely);
4. over the daily budget the turn is skipped with one notice per chat per UTC day;
5. otherwise one Claude turn answers the run of messages. A fresh session (first ever, after
   a rotation, or after a failed resume) gets its seed in front of the first turn;
6. after a turn, a conversation near the context window (or at the turn cap) is rotated: a
   summary turn (not sent), a stored numbered summary, the process closed, the session
   forgotten; the next turn starts a fresh session seeded with the summary.

Turn failures: a timeout kills the process (ClaudeSession) and answers with the apology; a
process exit mid-turn is retried once on a resumed session, then the apology.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import structlog

from agent import (
    budget,
    burst,
    commands,
    delivery,
    persona,
    policy,
    rotation,
    scheduling,
    shaping,
    takeover,
)
from agent.claude import ClaudeError, TurnResult
from agent.commands import ChatCommand
from agent.conversations import Conversations
from agent.inbound_hold import next_delay
from agent.persona import Persona
from agent.policy import EngineName, InvalidSetting, MessageDecision, Policy
from agent.store import ChatRow, PendingInbound, PendingReply, Store
from agent.tools import Toolbox, notes_seed
from agent.whatsapp.base import SendError, WhatsAppBackend
from agent.whatsapp.events import (
    Audio,
    ChatExpiration,
    Event,
    IncomingMessage,
    StreamError,
    Undecryptable,
)
from wabridge import logs
from wabridge.config import ConversationConfig, LimitsConfig
from wabridge.errors import LeaseLost, TranscriptionError

log = logs.get("agent.engine")

MessageReporter = Callable[[str, str, str, str, str], None]  # direction, chat, sender, text, id
SummaryReporter = Callable[[str, int, str], None]  # chat, number, text
ProblemReporter = Callable[[str, str], None]  # stable code, message for the owner
# a voice note's words (agent.transcription); raises TranscriptionError
Transcriber = Callable[[Audio], Awaitable[str]]

BUDGET_NOTICE = ("I have reached my daily budget and cannot answer more messages today. "
                 "Please try again tomorrow.")
CHAT_PERSONAS_KEY = "chat_personas"  # kv: {chat: its own system prompt} (/persona)
PAUSES_KEY = "takeover"  # kv: the paused chats (agent.takeover.dump)
SLOW_DOWN_NOTICE = ("You are sending messages faster than I can answer them. Please slow "
                    "down a little; messages sent too quickly are not answered.")


async def _not_configured(audio: Audio) -> str:
    del audio
    raise TranscriptionError("transcription is not configured (transcription.url is empty)")


def _no_summary(chat_id: str, number: int, text: str) -> None:
    del chat_id, number, text


def _no_problem(code: str, message: str) -> None:
    del code, message


def message_line(msg: IncomingMessage) -> str:
    """A message as Claude reads it: quote, sender in groups, a note for unsupported media."""
    text = msg.text
    if msg.transcript is not None:
        note = f"[voice note, transcribed] {msg.transcript or '(no words)'}"
        text = f"{text}\n{note}" if text else note
    elif msg.unsupported_media:
        note = f"[sent a {msg.unsupported_media} message, which cannot be shown to you]"
        text = f"{text}\n{note}" if text else note
    if msg.quoted_text:
        text = f"(replying to: \"{msg.quoted_text}\")\n{text}"
    if msg.is_group:
        text = f"[{msg.sender_name or msg.sender}] {text}"
    return text


def turn_content(batch: list[PendingInbound]) -> str | list[dict[str, Any]]:
    """The user turn Claude sees for a batch of messages (pure; never empty)."""
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for item in batch:
        msg = item.message
        texts.append(message_line(msg))
        images.extend(
            {"type": "image", "source": {"type": "base64", "media_type": img.mime_type,
                                         "data": base64.b64encode(img.data).decode()}}
            for img in msg.images
        )
    joined = "\n".join(t for t in texts if t.strip())
    if not images:
        return joined or "(empty message)"
    return [*images, {"type": "text", "text": joined or "(image)"}]


class TurnAbandoned(Exception):  # control flow inside the engine, never raised out of it
    """A turn given up because the worker is stopping; its messages stay pending."""


class Engine:
    def __init__(
        self,
        store: Store,
        backend: WhatsAppBackend,
        pool: Conversations,
        conversation: ConversationConfig,
        report_message: MessageReporter,
        *,
        limits: LimitsConfig | None = None,
        context_window: int = 200_000,
        model: str = "",
        on_summary: SummaryReporter = _no_summary,
        on_problem: ProblemReporter = _no_problem,
        on_turn: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        api: Conversations | None = None,
        engine: EngineName = "cli",
        tools: bool = False,
        system_prompt: str | None = None,
        models_allowed: tuple[str, ...] = (),
        transcribe: Transcriber | None = None,
        toolbox: Toolbox | None = None,
        lease_check: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        # fleet mode: raises LeaseLost unless the account's lease is surely still this
        # worker's (agent.lease); run right before every WhatsApp send
        self._lease_check = lease_check
        self._backend = backend
        self._engines: dict[EngineName, Conversations] = {"cli": pool}
        if api is not None:
            self._engines["api"] = api
        self._host_engine: EngineName = engine
        self._tools = tools
        self._claude = self._engines[policy.engine_for(None, engine, tools=tools)]
        self._conv = conversation
        self._limits = limits or LimitsConfig()
        self._window = context_window
        self._model = model
        self._report = report_message
        self._on_summary = on_summary
        self._on_problem = on_problem
        self._on_turn = on_turn  # a turn's usage is committed (usage for billing)
        self._clock = clock  # wall clock: budget days, send retries
        self._rng = rng  # pacing jitter
        self._toolbox = toolbox  # wabridge's tools (the user's ``tools`` setting), if wired
        self._policy: Policy = policy.DEFAULT
        self._persona: Persona = persona.DEFAULT
        self._host_prompt = system_prompt
        self._transcribe = transcribe or _not_configured
        self._models_allowed = models_allowed
        self._owner = ""
        self._owner_known = asyncio.Event()
        self._buckets: dict[str, budget.Bucket] = {}
        self._slowed: set[str] = set()  # senders told to slow down (until they may again)
        self._chat_tasks: dict[str, asyncio.Task[None]] = {}
        self._arrived: dict[str, float] = {}  # chat -> when its latest message arrived
        self._outbox_wake = asyncio.Event()
        self._presence_tasks: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()
        self._last_sent: float | None = None  # monotonic
        self._loops: dict[str, policy.LoopState] = {}  # the loop guard, per chat
        self.accepting = True
        self.turns_in_flight: dict[str, float] = {}  # chat -> monotonic start (watchdog)
        self._settle_uncertain()

    # --- settings and identity ----------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def conversations(self) -> Conversations:
        """The engine the user's chats run on now (``claude.engine``, the ``engine``
        setting)."""
        return self._claude

    async def reap_idle(self) -> None:
        for engine in self._engines.values():
            await engine.reap_idle()

    async def close_conversations(self) -> None:
        await asyncio.gather(*(e.close_all() for e in self._engines.values()))

    async def _discard(self, chat_id: str) -> None:
        """End the chat's conversation on every engine (a reset, or the engine changed)."""
        for engine in self._engines.values():
            await engine.discard(chat_id)

    def update_settings(self, settings: Mapping[str, Any]) -> InvalidSetting | None:
        """Apply the user's settings map. A bad value keeps the previous policy, logs
        ``policy.invalid`` and is returned (to be reported on the user's document)."""
        try:
            new = policy.parse(settings)
            chosen = self._engine_for(new)
            who = persona.parse(settings, self._models_allowed)
        except InvalidSetting as exc:
            log.warning("policy.invalid", key=exc.key, error=str(exc))
            return exc
        if self._engines[chosen] is not self._claude:
            log.info("claude.engine", engine=chosen)
            self._claude = self._engines[chosen]
        if new != self._policy:
            log.info("policy.updated", reply_to=new.reply_to, groups=new.groups,
                     commands_from=new.commands_from, allowlist=len(new.allowlist),
                     daily_budget_usd=new.daily_budget_usd, engine=new.engine,
                     tools=new.tools, timezone=new.timezone)
        if self._toolbox is not None:
            self._toolbox.configure(enabled=new.tools == "wabridge", timezone=new.timezone)
        self._policy = new
        if who != self._persona:
            log.info("persona.updated", prompt_chars=len(who.system_prompt or ""),
                     model=who.model, language=who.language,
                     takeover_minutes=who.takeover_minutes)
        self._persona = who
        return None

    def _engine_for(self, new: Policy) -> EngineName:
        chosen = policy.engine_for(new.engine, self._host_engine, tools=self._tools)
        if new.engine == "api" and self._tools:
            raise InvalidSetting("settings.engine", "api has no tools, and this host runs "
                                 "Claude with tools (claude.tools = true)", allowed="cli")
        if new.tools == "wabridge" and chosen != "cli":
            raise InvalidSetting("settings.tools", "wabridge's tools run on the cli engine "
                                 "only, and this host runs api (claude.engine)",
                                 allowed="none (or engine cli)")
        if chosen not in self._engines:
            raise InvalidSetting("settings.engine", f"{chosen!r} is not available on this host "
                                 "(see the worker's journal: claude_api.unavailable)",
                                 allowed=", ".join(self._engines))
        return chosen

    def set_owner(self, phone_or_jid: str) -> None:
        """The linked account's number (from ``Connected``). Turns wait until it is known,
        so a restart never decides "is this the owner?" without knowing the owner."""
        self._owner = policy.phone_of(phone_or_jid) if phone_or_jid else ""
        self._owner_known.set()

    # --- inbound -----------------------------------------------------------------------
    def persist(self, message: IncomingMessage) -> bool:
        """Called on the backend's thread: commit before anything else. False: duplicate."""
        fresh = self._store.add_inbound(message)
        if not fresh:
            log.info("message.duplicate", chat_id=message.chat_id, wa_id=message.wa_id)
        if message.expiration is not None:
            self._note_expiration(message.chat_id, message.expiration)
        return fresh

    def _note_expiration(self, chat_id: str, seconds: int) -> None:
        if self._store.set_expiration(chat_id, seconds):
            log.info("chat.expiration", chat_id=chat_id, seconds=seconds)

    def observe(self, event: Event) -> None:
        """WhatsApp events about chats rather than the link: a chat's disappearing timer,
        messages lost to decryption, stream errors (logged, counted for the metrics; a lost
        message is reported to the owner)."""
        match event:
            case ChatExpiration(chat_id=chat_id, seconds=seconds):
                self._note_expiration(chat_id, seconds)
            case Undecryptable(chat_id=chat_id, sender=sender, wa_id=wa_id):
                self._store.bump("undecryptable")
                log.warning("message.undecryptable", chat_id=chat_id, sender=sender,
                            wa_id=wa_id)
                self._on_problem(
                    "undecryptable",
                    f"a message from {sender} in {chat_id} could not be decrypted and was not "
                    "answered; ask the sender to send it again (WhatsApp usually fixes this "
                    "by itself after the next message)")
            case StreamError(code=code):
                self._store.bump("stream_errors")
                log.warning("whatsapp.stream_error", code=code)
            case _:
                pass

    def wake_chat(self, chat_id: str) -> None:
        """Start the chat's turn loop if it is not running (loop thread only)."""
        if not self.accepting:
            return
        self._arrived[chat_id] = time.monotonic()
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
            await self._owner_known.wait()
            failures = 0
            outage = 0.0  # the store's backoff (agent.inbound_hold.next_delay)
            while self.accepting:
                await self._rest_of_burst(chat_id)
                batch: list[PendingInbound] = []
                try:
                    batch = self._store.pending_inbound(chat_id, self._conv.max_batch)
                    if not batch:
                        return
                    await self._step(chat_id, batch)
                    failures, outage = 0, 0.0
                except LeaseLost:
                    return  # fleet: another host answers these now; the worker is stopping
                except TurnAbandoned:
                    return  # the worker is stopping: pending, answered after the restart
                except Exception as exc:
                    if self._store.is_outage(exc):
                        # PostgreSQL down or restarting: no new turn until it answers; the
                        # messages stay pending (a turn's reply is committed with them or
                        # not at all) and are answered then, not apologised for
                        outage = next_delay(outage)
                        log.warning("chat.store_unavailable", retry_in=outage, error=str(exc))
                        await asyncio.sleep(outage)
                        continue
                    # a bug, not a Claude failure (those are answered with the apology)
                    failures += 1
                    log.exception("chat.step_failed", attempt=failures)
                    if failures >= 3 and batch:
                        self._store.skip_with_notice(chat_id, [i.id for i in batch], "error",
                                                     self._apology(),
                                                     quote=batch[-1].message)
                        self._outbox_wake.set()
                        failures = 0
                    await asyncio.sleep(1.0)

    async def _rest_of_burst(self, chat_id: str) -> None:
        """Wait while the chat's messages keep coming (:mod:`agent.burst`)."""
        woke = time.monotonic()
        # a deadline that moves with each arrival, re-read after each sleep (no event to wait on)
        while (wait := burst.turn_delay(time.monotonic(), woke, self._arrived.get(chat_id),  # noqa: ASYNC110
                                        settle=self._conv.settle,
                                        debounce=self._conv.debounce)) > 0:
            await asyncio.sleep(wait)

    async def _step(self, chat_id: str, batch: list[PendingInbound]) -> None:
        """Decide the pending messages; then run one command or one turn."""
        segment: list[tuple[PendingInbound, IncomingMessage, MessageDecision]] = []
        for item in batch:
            msg = item.message
            if self._store.is_own_reply(item.wa_id):
                decision = MessageDecision("skip", "own_reply")
            else:
                decision = policy.decide(msg, self._policy, self._owner)
            if decision.action == "skip":
                self._store.skip_inbound([item.id], decision.reason)
                log.info("message.skipped", wa_id=item.wa_id, sender=item.sender,
                         reason=decision.reason)
                if decision.reason == "from_me" and policy.owner_wrote(msg, self._owner):
                    log.info("message.owner_wrote", wa_id=item.wa_id)  # the takeover signal
                    self._owner_took_over(chat_id, item)
                continue
            if (decision.action == "answer" and not policy.is_owner(msg, self._owner)
                    and self._held(chat_id, item)):
                continue
            if decision.action == "command" and segment:
                break  # the command runs after the messages before it
            segment.append((item, msg, decision))
            if decision.action == "command":
                break
        admitted = [(item, decision) for item, msg, decision in segment
                    if policy.is_owner(msg, self._owner) or self._admit(chat_id, item)]
        if not admitted:
            return
        first, decision = admitted[0]
        if decision.command is not None:
            await self._command(chat_id, first, decision.command)
        elif self._loop_allows(chat_id, [item for item, _ in admitted]):
            await self._answer(chat_id, [item for item, _ in admitted])

    def _owner_took_over(self, chat_id: str, item: PendingInbound) -> None:
        pause = takeover.owner_wrote(self._pauses().get(chat_id, takeover.Pause()),
                                     item.received_at, self._persona.takeover_minutes,
                                     message_line(item.message))
        self._set_pause(chat_id, pause)
        log.info("takeover.paused", until=round(pause.until, 1), by="owner_wrote")

    def _held(self, chat_id: str, item: PendingInbound) -> bool:
        """A contact's message in a paused chat: kept (skipped ``paused``) and remembered as
        context for the turn after the pause."""
        pause = self._pauses().get(chat_id)
        if pause is None or not pause.active(item.received_at):
            return False
        self._set_pause(chat_id, takeover.held(pause, message_line(item.message)))
        self._store.skip_inbound([item.id], "paused")
        log.info("message.skipped", wa_id=item.wa_id, sender=item.sender, reason="paused")
        return True

    def _loop_allows(self, chat_id: str, batch: list[PendingInbound]) -> bool:
        """The loop guard (:func:`agent.policy.loop_guard`); a stopped chat's messages are
        kept, skipped as ``bot_loop``."""
        verdict, self._loops[chat_id] = policy.loop_guard(
            self._loops.get(chat_id, policy.LoopState()), batch[-1].received_at,
            max_turns=self._conv.loop_max_turns, window=self._conv.loop_window)
        if verdict == "answer":
            return True
        self._store.skip_inbound([i.id for i in batch], "bot_loop")
        if verdict == "stop":
            log.warning("chat.loop_stopped", turns=self._conv.loop_max_turns,
                        window=self._conv.loop_window)
            self._on_problem(
                "bot_loop",
                f"{chat_id} exchanged more than {self._conv.loop_max_turns} turns within "
                f"{self._conv.loop_window:g} s, as two bots answering each other would; it is "
                f"not answered until it has been quiet for {self._conv.loop_window:g} s")
        return False

    def _admit(self, chat_id: str, item: PendingInbound) -> bool:
        """The sender's token bucket; an excess message is skipped, with one notice per
        episode (:func:`agent.budget.admit`)."""
        verdict = budget.admit(self._buckets.get(item.sender), item.sender in self._slowed,
                               item.received_at, self._limits.inbound_per_minute,
                               self._limits.inbound_burst)
        self._buckets[item.sender] = verdict.bucket
        if verdict.slowed:
            self._slowed.add(item.sender)
        else:
            self._slowed.discard(item.sender)
        if verdict.allowed:
            return True
        notice = ((self._persona.slow_down_notice or SLOW_DOWN_NOTICE) if verdict.notify
                  else None)
        self._store.skip_with_notice(chat_id, [item.id], "rate_limited", notice)
        log.warning("message.rate_limited", wa_id=item.wa_id, sender=item.sender,
                    notice=notice is not None)
        self._outbox_wake.set()
        return False

    def _report_in(self, chat_id: str, batch: list[PendingInbound]) -> None:
        for item in batch:
            log.info("message.received", wa_id=item.wa_id, sender=item.sender)
            self._report("in", chat_id, item.sender, item.message.text,
                         item.wa_id)

    # --- commands ----------------------------------------------------------------------
    async def reset_chat(self, chat_id: str) -> None:
        """What ``/reset`` does, asked by the operator (``wabridgectl reset``): the chat's
        Claude process is closed and its next message starts a new conversation."""
        await self._discard(chat_id)
        self._store.reset_chat(chat_id)
        log.info("chat.reset", chat_id=chat_id, by="operator")

    async def _command(self, chat_id: str, item: PendingInbound, command: ChatCommand) -> None:
        self._report_in(chat_id, [item])
        if command.name == "reset":
            await self._discard(chat_id)
            self._store.reset_chat(chat_id)
            text = commands.RESET_TEXT
        elif command.name == "status":
            text = commands.status_text(self._status(chat_id))
        elif command.name == "help":
            text = commands.HELP_TEXT
            if policy.is_owner(item.message, self._owner) and policy.is_self_chat(
                    item.message, self._owner):
                text += commands.OWNER_HELP_TEXT
        elif command.name in commands.OWNER_ONLY:
            if policy.is_owner(item.message, self._owner) and policy.is_self_chat(
                    item.message, self._owner):
                text = self._owner_command(command)
            else:
                text = commands.OWNER_ONLY_TEXT.format(name=command.name)
        elif command.name == "scheduled":
            text = self._scheduled_command(command.args)
        elif command.name == "memory":
            text = commands.memory_text([(n.id, n.chat_id, n.text) for n in self._store.notes()])
        else:
            text = commands.unknown_text(command)
        self._store.answer_locally(chat_id, [item.id],
                                   shaping.split(text, self._conv.reply_limit), item.message)
        log.info("command.done", command=command.name, known=command.known)
        self._outbox_wake.set()

    def _abandon_if_stopping(self, exc: ClaudeError) -> None:
        """A Claude failure while the worker stops (its process ended by the stop, or no
        process to be had) is not the contact's problem: the turn is abandoned, its messages
        stay pending and the next start answers them, instead of an apology now."""
        if not self.accepting:
            log.info("claude.turn_abandoned", code=exc.code, reason="stopping")
            raise TurnAbandoned(str(exc))

    def _apology(self) -> str:
        return self._persona.apology or self._conv.apology

    def _profile(self, chat_id: str) -> persona.Profile:
        """The prompt and model of the chat's next turn (read at every turn: a settings
        change or ``/persona`` applies to the very next one)."""
        return persona.profile(self._persona, self._chat_personas().get(chat_id),
                               self._host_prompt)

    def _chat_personas(self) -> dict[str, str]:
        raw = self._store.get_kv(CHAT_PERSONAS_KEY)
        return dict(json.loads(raw)) if raw else {}

    def _pauses(self) -> dict[str, takeover.Pause]:
        return takeover.load(self._store.get_kv(PAUSES_KEY))

    def _set_pause(self, chat_id: str, pause: takeover.Pause) -> None:
        pauses = self._pauses()
        pauses[chat_id] = pause
        self._store.set_kv(PAUSES_KEY, takeover.dump(pauses))

    def pause_chat(self, chat_id: str, minutes: float | None, *, by: str) -> None:
        """``/pause`` (or ``wabridgectl pause``): the chat is not answered until ``/resume``
        or for ``minutes``."""
        pause = takeover.pause_for(self._pauses().get(chat_id, takeover.Pause()),
                                   self._clock(), minutes)
        self._set_pause(chat_id, pause)
        log.info("takeover.paused", target=chat_id, minutes=minutes, by=by)

    def takeover_command(self, name: str, args: Mapping[str, str]) -> None:
        """The operator's ``pause_chat``/``resume_chat`` (``wabridgectl pause|resume``)."""
        chat_id = args.get("chat_id", "")
        try:
            minutes = takeover.parse_minutes(args.get("minutes", ""))
        except ValueError as exc:
            log.warning("command.invalid", command=name, error=str(exc))
            return
        if chat_id and name == "pause_chat":
            self.pause_chat(chat_id, minutes, by="operator")
        elif chat_id:
            self.resume_chat(chat_id, by="operator")

    def resume_chat(self, chat_id: str, *, by: str) -> None:
        """``/resume`` (or ``wabridgectl resume``): answered again from its next message."""
        self._set_pause(chat_id, takeover.resumed(self._pauses().get(chat_id,
                                                                     takeover.Pause())))
        log.info("takeover.resumed", target=chat_id, by=by)

    def _owner_command(self, command: ChatCommand) -> str:
        """The owner's commands of the self chat (:data:`agent.commands.OWNER_ONLY`)."""
        if command.name == "paused":
            now = self._clock()
            return commands.paused_text(
                [(c, p.until) for c, p in self._pauses().items() if p.active(now)], now)
        try:
            chat_id, rest = commands.chat_arg(command.args)
            minutes = takeover.parse_minutes(rest) if command.name == "pause" else None
        except ValueError as exc:
            return f"/{command.name}: {exc}"
        if command.name == "pause":
            self.pause_chat(chat_id, minutes, by="owner")
            return f"Paused {chat_id}" + (f" for {rest} min." if rest else " until /resume.")
        if command.name == "resume":
            self.resume_chat(chat_id, by="owner")
            return f"Resumed {chat_id}: its next message is answered."
        return self._set_chat_persona(chat_id, rest)

    def _set_chat_persona(self, chat_id: str, text: str) -> str:
        """``/persona <chat> <text>`` (``reset``: the account's persona again)."""
        personas = self._chat_personas()
        if text.lower() == "reset" or not text:
            personas.pop(chat_id, None)
            answer = f"{chat_id} uses the account's persona again."
        elif len(text) > persona.MAX_PROMPT_CHARS:
            return (f"That persona is {len(text)} characters long; at most "
                    f"{persona.MAX_PROMPT_CHARS}.")
        else:
            personas[chat_id] = text
            answer = f"{chat_id} has its own persona from its next message."
        self._store.set_kv(CHAT_PERSONAS_KEY, json.dumps(personas))
        log.info("persona.chat", target=chat_id, chars=len(personas.get(chat_id, "")))
        return answer
    def _scheduled_command(self, args: str) -> str:
        """``/scheduled`` lists every chat's pending scheduled messages; ``/scheduled cancel
        N`` cancels one."""
        words = args.split()
        if len(words) == 2 and words[0].lower() == "cancel" and words[1].lstrip("#").isdigit():
            number = int(words[1].lstrip("#"))
            done = self._store.cancel_scheduled(number)
            log.info("scheduled.cancelled", id=number, done=done, by="owner")
            return f"Cancelled #{number}." if done else f"No scheduled message #{number}."
        tz = self._policy.timezone
        return commands.scheduled_text([
            (s.id, s.chat_id, scheduling.local_time(s.due_at, tz), s.text)
            for s in self._store.scheduled()])

    def _daily_budget(self) -> float:
        return budget.effective_budget(self._policy.daily_budget_usd,
                                       self._limits.daily_budget_usd)

    def _status(self, chat_id: str) -> commands.StatusInfo:
        row = self._store.chat(chat_id)
        return commands.StatusInfo(
            context_tokens=row.context_tokens if row else 0,
            context_window=self._window,
            session_turns=row.session_turns if row else 0,
            total_turns=row.turns if row else 0,
            cost_today_usd=self._store.cost_on(budget.utc_day(self._clock())),
            daily_budget_usd=self._daily_budget(),
            model=self._persona.model or self._claude.model or self._model,
            summaries=len([s for s in self._store.summaries(chat_id) if not s.archived]),
            personas=(tuple(sorted(self._chat_personas().items()))
                      if policy.is_self_chat_id(chat_id, self._owner) else ()),
        )

    # --- turns -------------------------------------------------------------------------
    async def _answer(self, chat_id: str, batch: list[PendingInbound]) -> None:
        self._report_in(chat_id, batch)
        ids = [i.id for i in batch]
        day = budget.utc_day(self._clock())
        cap = self._daily_budget()
        spent = self._store.cost_on(day)
        if budget.over_budget(spent, cap):
            queued = self._store.skip_with_notice(chat_id, ids, "budget",
                                                  self._persona.budget_notice or BUDGET_NOTICE,
                                                  quote=batch[-1].message,
                                                  once_key=("budget", day))
            log.warning("budget.exceeded", spent_usd=round(spent, 6), budget_usd=cap,
                        notice=bool(queued))
            self._outbox_wake.set()
            return
        batch = [await self._transcribed(item) for item in batch]
        content = turn_content(batch)
        pause = self._pauses().get(chat_id)
        if pause is not None and pause.context:
            content = takeover.with_context(content, pause)
        self._typing(chat_id, on=True)
        self.turns_in_flight[chat_id] = time.monotonic()
        if self._toolbox is not None:
            self._toolbox.begin_turn(chat_id, batch[-1].message)
        try:
            text, result = await self._ask(chat_id, content)
        finally:
            if self._toolbox is not None:
                self._toolbox.end_turn(chat_id)
            self.turns_in_flight.pop(chat_id, None)
            self._typing(chat_id, on=False)
        replies = shaping.split(shaping.to_whatsapp(text), self._conv.reply_limit)
        ok = result is not None and not result.is_error
        # total_cost_usd is cumulative per conversation (restored on --resume): count the
        # per-turn figure instead, so restarts and resumes never double-count.
        cost = result.turn_cost_usd if result else 0.0
        usage = result.usage if result else {}
        queued = self._store.complete_turn(
            chat_id, ids, replies, batch[-1].message,
            session_id=result.session_id if result and result.session_id else None,
            cost_delta=cost,
            input_tokens=int(usage.get("input_tokens", 0)),
            output_tokens=int(usage.get("output_tokens", 0)),
            context_tokens=rotation.context_tokens(usage) if ok else None,
            day=budget.utc_day(self._clock()),
            usage=usage,
        )
        self._on_turn()
        if pause is not None and pause.context:  # handed over: not again
            self._set_pause(chat_id, takeover.Pause(pause.until))
        log.info("turn.done", messages=len(batch), replies=len(queued), is_error=not ok,
                 cost_usd=round(cost, 6))
        self._outbox_wake.set()
        if ok and self.accepting:
            await self._maybe_rotate(chat_id)

    async def _transcribed(self, item: PendingInbound) -> PendingInbound:
        """A voice note with its transcript, stored in place of the audio before the turn (a
        crash never transcribes it again). Not configured or failed: it stays "not
        supported", the reason in the log."""
        msg = item.message
        if msg.audio is None or msg.transcript is not None:
            return item
        seconds = 0.0
        try:
            words = await self._transcribe(msg.audio)
        except TranscriptionError as exc:
            log.warning("voice.not_transcribed", wa_id=item.wa_id, reason=str(exc))
            done = replace(msg, audio=None)
        else:
            seconds = msg.audio.seconds
            log.info("voice.transcribed", wa_id=item.wa_id, seconds=seconds, chars=len(words))
            done = replace(msg, audio=None, transcript=words, unsupported_media="")
        self._store.set_transcript(item.id, done, day=budget.utc_day(self._clock()),
                                   seconds=seconds)
        return replace(item, message=done)

    async def _ask(self, chat_id: str, content: str | list[dict[str, Any]]
                   ) -> tuple[str, TurnResult | None]:
        claude = self._claude  # a settings change mid-turn applies from the next turn
        for other in self._engines.values():
            if other is not claude:  # the engine changed: the chat's conversation moves
                await other.discard(chat_id)  # (its CLI process, if any, is closed now)
        for attempt in (1, 2):
            try:
                session = await claude.acquire(chat_id, self._profile(chat_id))
            except ClaudeError as exc:
                self._abandon_if_stopping(exc)
                log.error("claude.unavailable", code=exc.code, error=str(exc))
                return self._apology(), None
            first = content
            row = self._store.chat(chat_id)
            if row is None or row.session_id != session.session_id:  # a fresh session
                seed = "\n\n".join(part for part in (
                    notes_seed([n.text for n in self._store.notes(chat_id)]),
                    self._seed(chat_id, row)) if part)
                if seed:
                    first = rotation.with_seed(content, seed)
                    log.info("claude.seeded", seed=row.seed if row else None, chars=len(seed))
            try:
                result = await session.turn(first)
            except ClaudeError as exc:
                await claude.discard(chat_id)
                self._abandon_if_stopping(exc)
                if exc.code == "process_exited" and attempt == 1:
                    log.warning("claude.turn_failed", code=exc.code, error=str(exc),
                                attempt=attempt, retry=True)
                    continue
                log.error("claude.turn_failed", code=exc.code, error=str(exc), attempt=attempt,
                          retry=False)
                return self._apology(), None
            await claude.release(chat_id)
            if result.is_error:
                log.error("claude.api_error", error=result.error)
                return self._apology(), result
            return result.text or "(no answer)", result
        return self._apology(), None

    def _seed(self, chat_id: str, row: ChatRow | None) -> str:
        """What a fresh session of this chat must be told first ("" for a new conversation)."""
        if row is None or row.seed is None:
            return ""
        summary = self._store.latest_summary(chat_id)
        recent: list[rotation.HistoryLine] = []
        if row.seed == "recovery":
            for h in self._store.history(chat_id, self._conv.recovery_messages, row.reset_at):
                text = message_line(h.message) if h.message is not None else h.text
                recent.append(rotation.HistoryLine(h.role, text))
        return rotation.seed_text(summary.text if summary else None, recent)

    # --- context rotation --------------------------------------------------------------
    async def _maybe_rotate(self, chat_id: str) -> None:
        row = self._store.chat(chat_id)
        if row is None or row.session_id is None:
            return
        reason = rotation.should_rotate(
            row.context_tokens, row.session_turns, window=self._window,
            threshold=self._conv.rotate_at, max_turns=self._conv.rotate_after_turns)
        if reason is not None:
            await self._rotate(chat_id, row, reason)

    async def _rotate(self, chat_id: str, row: ChatRow, reason: str) -> None:
        log.info("context.rotating", reason=reason, context_tokens=row.context_tokens,
                 session_turns=row.session_turns, window=self._window)
        summary: str | None = None
        cost = 0.0
        summary_usage: Mapping[str, int] = {}
        claude = self._claude
        try:
            session = await claude.acquire(chat_id, self._profile(chat_id))
        except ClaudeError as exc:
            log.warning("context.summary_failed", code=exc.code, error=str(exc))
        else:
            try:
                if session.session_id != row.session_id:
                    log.warning("context.summary_failed", error="session could not be resumed")
                else:
                    result = await session.turn(rotation.SUMMARY_PROMPT)
                    cost = result.turn_cost_usd
                    summary_usage = result.usage
                    if result.is_error or not result.text.strip():
                        log.warning("context.summary_failed", error=result.error or "empty")
                    else:
                        summary = result.text.strip()
            except ClaudeError as exc:
                log.warning("context.summary_failed", code=exc.code, error=str(exc))
            finally:
                await claude.discard(chat_id)
        number = self._store.rotate(chat_id, summary, cost_delta=cost,
                                     day=budget.utc_day(self._clock()), usage=summary_usage)
        log.info("context.rotated", number=number, chars=len(summary or ""),
                 seed="summary" if summary else "recovery")
        if number is not None and summary is not None:
            try:
                self._on_summary(chat_id, number, summary)
            except Exception:
                log.exception("context.summary_report_failed")

    def _typing(self, chat_id: str, *, on: bool) -> None:
        """The typing presence is best effort and off the reply path (a neonize presence
        call may take seconds); tasks are kept so none is collected mid-flight."""

        async def send() -> None:
            with contextlib.suppress(Exception):
                await self._backend.set_typing(chat_id, on)

        task = asyncio.create_task(send())
        self._presence_tasks.add(task)
        task.add_done_callback(self._presence_tasks.discard)

    # --- outbound ----------------------------------------------------------------------
    async def deliver_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Clear before delivering: a reply committed while a send is in flight sets the
            # flag again and is picked up at once instead of after the 1 s timeout.
            self._outbox_wake.clear()
            await self.deliver_pending()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_wake.wait(), 1.0)

    async def deliver_pending(self) -> None:
        """Send the outbox in commit order, paced (one sender at a time: never the same reply
        twice concurrently). A reply that waits for a retry holds back the later replies of
        its chat only (per-chat order among sent replies); one that keeps failing is marked
        failed and the chat goes on (:mod:`agent.delivery`)."""
        async with self._send_lock:
            for due in self._store.release_due(self._clock()):
                log.info("scheduled.due", chat_id=due.chat_id, reply_id=due.id)
            held: set[str] = set()  # chats whose oldest reply is waiting for a retry
            for reply in self._store.pending_replies():
                if not self._backend.is_connected():
                    return
                if reply.chat_id in held or reply.next_try > self._clock():
                    held.add(reply.chat_id)
                    continue
                delay = budget.send_delay(self._last_sent, time.monotonic(),
                                          self._limits.send_gap,
                                          self._limits.send_jitter * self._rng())
                if delay > 0:
                    await asyncio.sleep(delay)
                outcome = await self._send(reply)
                if outcome == "wait":
                    return
                if outcome == "retry":
                    held.add(reply.chat_id)
                else:
                    self._last_sent = time.monotonic()

    async def _send(self, reply: PendingReply) -> str:
        """One try: ``sent``, ``retry`` (later), ``failed`` (for good) or ``wait`` (link down).
        The ``sending`` mark is committed before the library call: a crash during it leaves
        the reply uncertain (see :meth:`_settle_uncertain`), never silently pending."""
        expiration = self._store.expiration(reply.chat_id)
        self._lease_check()
        self._store.mark_sending(reply.id)  # fleet mode: fenced
        # again: the mark may have waited on the server (a thawed host's outbox can get
        # here before its renewal task notices the pause)
        self._lease_check()
        try:
            wa_id = await self._backend.send_text(reply.chat_id, reply.text, quote=reply.quote,
                                                  msg_id=reply.wa_id, expiration=expiration)
        except SendError as exc:
            step = delivery.after_send_error(
                reply.attempts, self._backend.is_connected(), self._clock(),
                max_attempts=self._conv.send_attempts, base=self._conv.send_retry_base)
            if step.action == "fail":
                self._store.mark_failed(reply.id, str(exc), attempts=step.attempts)
                log.error("outbox.failed", chat_id=reply.chat_id, reply_id=reply.id,
                          attempts=step.attempts, error=str(exc))
                self._on_problem(
                    "reply_failed",
                    f"a reply to {reply.chat_id} was not delivered after {step.attempts} "
                    f"attempts: {exc}")
                return "failed"
            self._store.mark_retry(reply.id, str(exc), step.next_try, attempts=step.attempts)
            log.warning("outbox.send_failed", chat_id=reply.chat_id, reply_id=reply.id,
                        attempts=step.attempts, retry_in=round(step.next_try - self._clock(), 1),
                        error=str(exc))
            return step.action
        wa_id = wa_id or reply.wa_id
        self._store.mark_sent(reply.id, wa_id)
        log.info("outbox.delivered", chat_id=reply.chat_id, wa_id=wa_id, expiration=expiration)
        self._report("out", reply.chat_id, "me", reply.text, wa_id)
        return "sent"

    def _settle_uncertain(self) -> None:
        """At start-up (nothing is being sent yet): replies a crash left ``sending``."""
        action = delivery.uncertain(self._backend.honours_message_id,
                                    "drop" if self._conv.uncertain_replies == "drop"
                                    else "resend")
        settled = self._store.settle_uncertain(resend=action == "resend")
        for reply in settled:
            log.warning("outbox.uncertain", chat_id=reply.chat_id, reply_id=reply.id,
                        action=action, exactly_once=self._backend.honours_message_id)
        if settled and not self._backend.honours_message_id:
            self._store.bump("uncertain_replies", len(settled))

    async def drain(self, timeout: float) -> None:
        """Stop taking turns; let turns in flight finish within ``timeout``; flush the outbox."""
        self.accepting = False
        self._owner_known.set()  # loops still waiting for the owner end at once
        tasks = [t for t in self._chat_tasks.values() if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.deliver_pending(), max(0.5, timeout / 2))
