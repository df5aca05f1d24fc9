"""``wabridge-worker <userId>``: the composition root of one worker unit.

Over 600 lines because it is the one place the worker's parts meet (controller link, WhatsApp
backend, both Claude engines, tools, transcription, usage reporting): its start-up phases, its
supervision and its shutdown order must be read together; what has a life of its own lives in
its module (where the state is: ``agent.placement``; messages the store refused:
``agent.inbound_hold``, and across a stop ``agent.inbound_spill``; decisions:
``agent.outcomes``).

Start-up phases (a failure in each has its own exit code, see ``wabridge.errors.ExitCode``):
1. synchronous: arguments, configuration, logging, state directory, store (no asyncio yet);
2. ``Worker.run``: the controller link, the WhatsApp event pump, the outbox sender and the
   supervisor (watchdog, status line, timers) as supervised tasks; the messages an earlier
   stop spilled are committed (or held) before WhatsApp is started, so they stay ahead of
   new ones; ``READY=1`` once they run;
3. SIGTERM -> ``STOPPING=1`` -> stop taking messages -> let turns in flight finish -> flush the
   outbox and reports -> close Claude processes -> stop WhatsApp -> commit or spill held
   messages -> exit, all within the unit's ``TimeoutStopSec`` (5 s); a step that needs a
   store that is down (PostgreSQL) is skipped, not the rest. ``KillMode=mixed``: the SIGTERM
   reaches the worker alone, so Claude processes are not killed under a turn in flight;
   systemd's SIGKILL covers the rest.
   A turn that cannot finish in time is cancelled: its messages stay pending in the store and
   are answered after the restart, so a stop never loses nor doubles a reply.

Fleet mode (``fleet.enabled``, ``agent.lease``): before phase 1 opens the store, the lease
this unit was started under (``WABRIDGE_HOST_ID``/``WABRIDGE_LEASE_EPOCH``) must still be
this host's, else exit 17 (``LEASE_LOST``) without connecting; the renewal is a fifth
supervised task. A lost lease stops the worker in another order: WhatsApp first, then the
rest; a clean stop ends by releasing the lease.

Watchdog: ``supervise`` sends ``WATCHDOG=1`` once a second, and only while ``health_problem``
finds nothing wrong: the event loop turned recently (a wedged loop cannot run ``supervise`` at
all; a long stall that ended is caught by its lag), no turn is stuck past
``claude.turn_timeout`` + 30 s, the WhatsApp backend says it is ``healthy()`` and its thread is
not stuck in our sink. Otherwise systemd kills the worker at ``WatchdogSec=`` (SIGABRT:
``faulthandler`` prints every thread's stack to the journal) and restarts it; the controller
writes ``lastExit.reason = "watchdog"`` on the document.

Test hooks (never active in production): with ``WABRIDGE_TEST_HOOKS=1`` in the unit's
environment, ``WABRIDGE_TEST_FAULT`` makes the worker misbehave for the end-to-end tests of
supervision (``tests/test_supervision.py``), ``WABRIDGE_TEST_FAULT_AFTER`` seconds (default
0.5) after it is connected:

* ``wedge-loop``: a blocking sleep on the event loop; ``stuck-turn``: a turn that never ends;
  ``alloc``: allocate memory until the kernel kills the worker. Each happens once per state
  directory (a marker file), so the restarted worker behaves.
* ``ignore-sigterm``: ignore SIGTERM from the start (systemd must SIGKILL at TimeoutStopSec=);
  ``crash``: exit with code 1 at every start (systemd's start limit).
* ``task-crash``: the long-running task named by ``WABRIDGE_TEST_FAULT_TASK`` (one of
  ``TASKS``) raises, once per state directory.

Supervision: the long-running tasks (``TASKS``) are watched by a done-callback: one that ends
while the worker is not stopping (an exception, or a return) stops the worker with exit code
1, which systemd restarts; ``health_problem`` also names a dead task, so the watchdog is fed
only while all of them run. Except a store outage (PostgreSQL down or restarting:
``Store.is_outage``): that task starts again after a backoff (``store.unavailable``), the
WhatsApp link stays up, acknowledged messages wait in the inbound hold, turns wait in their
chat loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sdnotify

from agent import inbound_spill, outcomes, transcription
from agent.budget import utc_day
from agent.claude import ClaudeSettings
from agent.claude_api import ApiConversations, ApiSettings
from agent.engine import Engine
from agent.host_slots import HostSlots
from agent.inbound_hold import InboundHold, next_delay
from agent.link import ControllerLink
from agent.placement import open_store, session_store, store_location
from agent.pool import ClaudePool
from agent.store import PostgresTarget, Store
from agent.tools import Toolbox
from agent.usage import UsageReporter
from agent.whatsapp import events as ev
from agent.whatsapp.base import BackendContext, WhatsAppBackend
from wabridge import __version__, claude_cli, config, logs, protocol, qr, units
from wabridge.errors import ConfigError, ExitCode, WabridgeError
from wabridge.prices import parse_prices
from wabridge.status import WorkerState

if TYPE_CHECKING:
    from agent.lease import LeaseKeeper

log = logs.get("agent")
STOP_BUDGET = 4.0  # seconds of the unit's TimeoutStopSec=5 we use; systemd kills after 5
TEST_FAULTS = frozenset({"wedge-loop", "stuck-turn", "alloc", "ignore-sigterm", "crash",
                         "task-crash"})
#: The worker's long-running tasks (``Worker.run``): one that ends stops the worker.
TASKS = ("link", "pump", "outbox", "supervise")
#: Fleet mode's extra one: renewing the account's lease (``agent.lease``).
LEASE_TASK = "lease"
#: Exits after which systemd starts the worker again under the same lease epoch: the lease
#: is kept for it. Any other end of a fleet worker releases the lease.
KEEPS_LEASE = frozenset({ExitCode.FAILURE, ExitCode.RECONNECT, ExitCode.LEASE_LOST})


def releases_lease(exit_code: ExitCode, *, spilled: bool) -> bool:
    """Whether a fleet worker's clean end gives its lease back: disconnected and committed,
    the next owner need not wait for expiry + grace. Not when systemd starts it again under
    the same epoch (``KEEPS_LEASE``), nor when messages were spilled here: they are not
    committed, so the lease is left to expire and this host (the account's last holder,
    which the placement prefers) runs it next and commits them, rather than another host
    taking it at once."""
    return exit_code not in KEEPS_LEASE and not spilled


def test_fault(environ: dict[str, str] | None = None) -> str:
    """The fault a test asked for (``WABRIDGE_TEST_FAULT``), only with ``WABRIDGE_TEST_HOOKS=1``."""
    env = os.environ if environ is None else environ
    if env.get("WABRIDGE_TEST_HOOKS") != "1":
        return ""
    fault = env.get("WABRIDGE_TEST_FAULT", "")
    return fault if fault in TEST_FAULTS else ""


#: Seconds between checkpoints of the state database's write-ahead log (off the loop).
CHECKPOINT_INTERVAL = 5.0


def default_cli_path() -> Path:
    """The Claude Code binary bundled with claude-agent-sdk (``claude.cli_path`` unset)."""
    path = claude_cli.bundled_cli()
    if path is None:
        raise ConfigError("claude.cli_path", "is empty and claude-agent-sdk (which bundles "
                          "the Claude Code CLI) is not installed")
    return path


def claude_settings(cfg: config.Config) -> ClaudeSettings:
    env: dict[str, str] = {"CLAUDE_CODE_MAX_RETRIES": str(cfg.claude.max_retries)}
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    own_key = claude_cli.credential_api_key()  # the user's own key (settings.apiKeyRef)
    if own_key:
        env["ANTHROPIC_API_KEY"] = own_key
    return ClaudeSettings(
        cli_path=Path(cfg.claude.cli_path) if cfg.claude.cli_path else default_cli_path(),
        model=cfg.claude.model or None,
        system_prompt=cfg.claude.system_prompt or None,
        tools_enabled=cfg.claude.tools,
        turn_timeout=cfg.claude.turn_timeout,
        extra_env=env,
    )


def api_settings(cfg: config.Config) -> ApiSettings:
    """The ``api`` engine's settings: the same key and base URL the CLI gets (the user's own
    key first)."""
    model = config.api_model(cfg.claude)
    prices = parse_prices(cfg.claude.api_prices)
    price = prices.get(model)
    if price is None:
        raise ConfigError("claude.api_prices", f"has no price for the model {model!r}",
                          allowed="model=input/output, comma separated")
    return ApiSettings(
        model=model, price=price, system_prompt=cfg.claude.system_prompt or None,
        prices=prices,
        max_tokens=cfg.claude.api_max_tokens, turn_timeout=cfg.claude.turn_timeout,
        max_retries=cfg.claude.max_retries,
        api_key=claude_cli.credential_api_key() or os.environ.get("ANTHROPIC_API_KEY") or None,
        base_url=os.environ.get("ANTHROPIC_BASE_URL") or None,
    )


def make_backend(cfg: config.Config, ctx: BackendContext) -> WhatsAppBackend:
    """The backend of this process, chosen once from ``worker.backend``/``worker.sim_url``.
    The user's ``backend``/``simUrl`` settings reach these through the environment the
    controller writes into the unit's drop-in before every start (see
    ``controller.reconcile.worker_environment``), so they hold from the first start on;
    settings cached from an earlier run never choose a backend."""
    backend = cfg.worker.backend
    if backend == "sim":
        from agent.whatsapp.sim import SimBackend  # noqa: PLC0415

        return SimBackend(ctx, cfg.worker.sim_url)
    if backend == "neonize":
        from agent.whatsapp.neonize_backend import NeonizeBackend  # noqa: PLC0415

        return NeonizeBackend(ctx)
    raise ConfigError("worker.backend", f"{backend!r} is not a backend", allowed="neonize, sim")


def _qr_frame(seq: int, *, code: str, data_url: str) -> protocol.Frame:
    return protocol.Qr(seq=seq, code=code, data_url=data_url)


def _pairing_frame(seq: int, *, code: str) -> protocol.Frame:
    return protocol.PairingCode(seq=seq, code=code)


class Worker:
    def __init__(self, user_id: str, cfg: config.Config, state_dir: Path, store: Store,
                 lease: LeaseKeeper | None = None) -> None:
        self.user_id = user_id
        self.cfg = cfg
        self.state_dir = state_dir
        self.store = store
        self.lease = lease  # fleet mode only
        self.loop_thread = threading.get_ident()
        self.notifier = sdnotify.SystemdNotifier()
        self.stop = asyncio.Event()
        self.link_stop = asyncio.Event()  # set last: reports flow until the very end
        self.exit_code = ExitCode.OK
        self.state = WorkerState.STARTING
        self.phone = ""
        self.detail = "starting"
        self.disconnected_since: float | None = None
        self.qr_deadline: float | None = None
        self.loop_heartbeat = time.monotonic()
        self.sink_since: float | None = None  # the backend's thread is inside sink() since
        self.unhealthy = ""  # the last health problem (the watchdog is not fed meanwhile)
        self.fault = test_fault()
        self.slots = HostSlots(lambda f: self.link.send_now(f), lambda: self.link.connected,  # noqa: PLW0108 -- the link comes next
                               cfg.claude.slot_wait, lambda c: self.pool.reclaim(c))  # noqa: PLW0108
        self.link = ControllerLink(cfg.controller.socket, user_id, store, __version__,
                                   self._on_settings, self._on_command, slots=self.slots)
        self.settings: dict[str, Any] = {}
        self.report_usage = UsageReporter(store, self.link.report)  # billing, after every turn
        self.pairing_requested = ""
        self.background: set[asyncio.Task[Any]] = set()
        self.tasks: list[asyncio.Task[None]] = []  # the long-running ones (TASKS)
        self.task_factories: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self.task_backoff: dict[str, tuple[float, float]] = {}  # name -> (last restart, delay)
        self.settings_checked = False  # a valid settings map arrived in this process
        self.bad_setting = False  # the last settings map had a bad value
        self.events: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.inbound_hold = InboundHold()  # acked by WhatsApp, refused by the store
        # what the hold still has at a stop, for the next start
        self.spill = inbound_spill.SpillFile(state_dir / inbound_spill.SPILL_FILE)
        self.loop = asyncio.get_running_loop()
        ctx = BackendContext(user_id=user_id, state_dir=state_dir,
                             session_store=session_store(store.path))
        self.backend = make_backend(cfg, ctx)
        self.tools = Toolbox(store, self.backend, state_dir, cfg.tools, cfg.claude.max_tool_calls,
                             restart_idle=lambda: self.pool.close_idle())  # noqa: PLW0108 -- the pool comes next
        lease_check = lease.check if lease is not None else (lambda: None)
        if lease is not None:
            lease.on_lost = self.lease_lost
            self.link.owns_account = lease.holds
            store.on_lease_lost = lambda exc: lease.lose(str(exc))
            self.tools.lease_check = lease_check
        self.pool = ClaudePool(cfg.claude.max_processes, cfg.claude.idle_timeout,
                               claude_settings(cfg), state_dir, store,
                               resume_max_bytes=cfg.conversation.resume_max_bytes,
                               tools=self.tools.launch)
        self.pool.slots = self.slots
        api = None
        if not cfg.claude.tools:
            try:
                api = ApiConversations(api_settings(cfg), store)
            except ConfigError as exc:  # only a user asking for engine = api will miss it
                log.warning("claude_api.unavailable", key=exc.key, error=str(exc))
        self.engine = Engine(store, self.backend, self.pool, cfg.conversation,
                             self._report_message, limits=cfg.limits,
                             context_window=cfg.claude.context_window, model=cfg.claude.model,
                             on_summary=self._report_summary, on_problem=self._report_problem,
                             on_turn=self.report_usage,
                             api=api, engine="api" if cfg.claude.engine == "api" else "cli",
                             tools=cfg.claude.tools, toolbox=self.tools,
                             system_prompt=cfg.claude.system_prompt or None,
                             models_allowed=config.models_allowed(cfg.claude),
                             transcribe=transcription.transcriber(
                                 cfg.transcription, os.environ.get("TRANSCRIPTION_API_KEY")),
                             lease_check=lease_check)
        self.engine.update_settings(self._cached_settings())  # until the controller speaks

    def _cached_settings(self) -> dict[str, Any]:
        import json  # noqa: PLC0415

        raw = self.store.get_kv("settings")
        return dict(json.loads(raw)) if raw else {}

    # --- callbacks from the link --------------------------------------------------------
    def _on_settings(self, settings: dict[str, Any]) -> None:
        import json  # noqa: PLC0415

        self.settings = settings
        self.store.set_kv("settings", json.dumps(settings))
        problem = self.engine.update_settings(settings)  # bad value: keeps the last policy
        if problem is not None:
            message, code = str(problem), problem.code
            self.bad_setting = True
            self.link.report(lambda seq: protocol.Problem(seq=seq, code=code, message=message))
        elif self.bad_setting or not self.settings_checked:
            # Valid now: a bad_setting on the document (this process's, or an earlier
            # one's) has no cause any more. The controller clears it only if it is that.
            self.bad_setting = False
            self.settings_checked = True
            self.link.report(lambda seq: protocol.ProblemCleared(seq=seq, code="bad_setting"))
        phone = settings.get("pairingPhone")
        if (isinstance(phone, str) and phone and phone != self.pairing_requested
                and self.state != WorkerState.CONNECTED):
            self.pairing_requested = phone
            self._spawn(self.backend.pair_phone(phone))

    def _on_command(self, command: protocol.Command) -> None:
        if command.name == "pair_phone":
            self._spawn(self.backend.pair_phone(command.args.get("phone", "")))
        elif command.name == "reset_chat" and command.args.get("chat_id"):
            self._spawn(self.engine.reset_chat(command.args["chat_id"]))
        elif command.name in ("pause_chat", "resume_chat"):
            self.engine.takeover_command(command.name, command.args)

    def lease_lost(self, reason: str) -> None:
        """Fleet mode: another host may own the account now (any thread). Stop at once:
        WhatsApp is disconnected first (``shutdown``), then exit 17, not restarted."""
        if threading.get_ident() != self.loop_thread:
            self.loop.call_soon_threadsafe(self.lease_lost, reason)
            return
        del reason  # (logged by the lease: lease.lost)
        self.exit_code = ExitCode.LEASE_LOST
        self.engine.accepting = False  # no new turn starts meanwhile
        self.stop.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # --- reports -----------------------------------------------------------------------
    def _report_state(self) -> None:
        state, detail, phone = self.state, self.detail, self.phone
        self.link.report(lambda seq: protocol.State(seq=seq, state=state, detail=detail,
                                                    phone=phone))

    def _report_message(self, direction: str, chat: str, sender: str, text: str,
                        wa_id: str) -> None:
        now = time.time()
        self.link.report(lambda seq: protocol.MessageEvent(
            seq=seq, event_id=f"{direction}:{wa_id}", chat_id=chat,
            direction="in" if direction == "in" else "out", sender=sender, text=text, ts=now))

    # --- the WhatsApp sink: any thread --------------------------------------------------
    def sink(self, event: ev.Event) -> None:
        self.sink_since = time.monotonic()
        try:
            if isinstance(event, ev.IncomingMessage):
                try:
                    fresh = self._persist_in_order(event)
                except Exception as exc:  # noqa: BLE001 (the store is down: WhatsApp acked it)
                    log.error("store.inbound_held", chat_id=event.chat_id, wa_id=event.wa_id,
                              error=str(exc))
                    self.inbound_hold.hold(event, time.monotonic())
                    return
                if not fresh:
                    return
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        finally:
            self.sink_since = None

    def _persist_in_order(self, message: ev.IncomingMessage) -> bool:
        """Commit ``message`` (False: a duplicate), unless older ones are held: it must not
        overtake them, so it raises and is held behind them."""
        if self.inbound_hold.holding():
            raise ConnectionError("older messages are waiting for the store")
        return self.engine.persist(message)

    def retry_held_inbound(self, *, final: bool = False, force: bool = False) -> None:
        """Commit the messages the store refused (on the loop, in order; ``force``: now,
        whatever the backoff); at shutdown (``final``) one last try, then spill the rest."""
        committed, error = self.inbound_hold.retry(self.engine.persist, time.monotonic(),
                                                   force=final or force)
        for message in committed:
            log.info("store.inbound_committed", chat_id=message.chat_id, wa_id=message.wa_id)
            self.events.put_nowait(message)
        self.spill.settle(self.inbound_hold.snapshot())
        if error is not None and not final:
            log.warning("store.inbound_retry_failed", held=len(self.inbound_hold.held),
                        error=str(error))
        if final and self.inbound_hold.holding():
            self.spill.keep(self.inbound_hold.snapshot(), error)

    def replay_spilled_inbound(self) -> None:
        """At start, before WhatsApp is started: commit what an earlier stop spilled, in
        order, as the hold's retry commits (woken like fresh arrivals). Whatever the store
        still refuses stays held, ahead of every new message, and the file stays until all
        of it is committed (a crash meanwhile loses nothing)."""
        now = time.monotonic()
        for message in self.spill.replay():
            self.inbound_hold.hold(message, now)
        self.retry_held_inbound(force=True)

    async def pump(self) -> None:
        while not self.stop.is_set():
            event = await self.events.get()
            if isinstance(event, ev.IncomingMessage):
                log.info("whatsapp.message_received", chat_id=event.chat_id,
                         wa_id=event.wa_id, sender=event.sender)
                self.engine.wake_chat(event.chat_id)
                continue
            self.engine.observe(event)  # chat timers, undecryptable messages, stream errors
            decision = outcomes.decide(event)
            if isinstance(event, ev.QrCode):
                log.info("whatsapp.qr_generated")
                code = event.code
                data_url = qr.to_data_url(code)
                self.link.report(functools.partial(_qr_frame, code=code, data_url=data_url))
                if self.qr_deadline is None:
                    self.qr_deadline = time.monotonic() + self.cfg.worker.qr_timeout
            if isinstance(event, ev.PairingCode):
                pcode = event.code
                self.link.report(functools.partial(_pairing_frame, code=pcode))
            if isinstance(event, ev.Connected):
                self.phone = event.phone
                self.engine.set_owner(event.phone or event.jid)
                self.qr_deadline = None
                log.info("whatsapp.ready", phone=event.phone)
                self.engine.resume_pending()
            if decision.start_reconnect_clock and self.disconnected_since is None:
                self.disconnected_since = time.monotonic()
            if decision.stop_reconnect_clock:
                self.disconnected_since = None
            if decision.state is not None:
                self.state, self.detail = decision.state, decision.detail
                log.info("whatsapp.state", state=self.state.value, detail=self.detail)
                self._report_state()
            if decision.wipe_session:
                self._wipe_whatsapp_session()
            if decision.exit_code is not None:
                log.warning("worker.exit_outcome", exit_code=int(decision.exit_code))
                self.exit_code = decision.exit_code
                self.stop.set()

    def _wipe_whatsapp_session(self) -> None:
        self.store.forget_whatsapp_device()  # PostgreSQL: whatsmeow's rows in our schema
        for name in ("whatsapp.db", "whatsapp.db-wal", "whatsapp.db-shm", "sim-device.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / name).unlink()

    # --- supervision --------------------------------------------------------------------
    def status_line(self) -> str:
        procs = self.pool.live
        chats = self.store.chat_count()
        if self.state == WorkerState.CONNECTED:
            head = f"connected as +{self.phone}"
        elif self.state == WorkerState.WAITING_QR:
            head = "waiting for QR scan"
        else:
            head = self.detail
        link = "" if self.link.connected else " - controller unreachable"
        return (f"{head} - {chats} chat{'s' * (chats != 1)} - {procs} claude "
                f"process{'es' * (procs != 1)}{link}")

    async def supervise(self) -> None:
        """Status line, watchdog, timers: once a second."""
        last_status = ""
        last_metrics = 0.0
        last_checkpoint = time.monotonic()
        self.loop_heartbeat = time.monotonic()  # start-up (imports, a busy host) is no stall
        while not self.stop.is_set():
            now = time.monotonic()
            lag = now - self.loop_heartbeat - 1.0
            self.loop_heartbeat = now
            problem = self.health_problem(lag, now)
            if problem is None:
                self.notifier.notify("WATCHDOG=1")
            elif problem != self.unhealthy:
                log.error("watchdog.unhealthy", problem=problem)
            self.unhealthy = problem or ""
            line = self.status_line()
            if self.unhealthy:
                line = f"unhealthy: {self.unhealthy} - {line}"
            if line != last_status:
                self.notifier.notify(f"STATUS={line}")
                last_status = line
            if (self.disconnected_since is not None
                    and now - self.disconnected_since > self.cfg.worker.reconnect_timeout):
                log.warning("whatsapp.reconnect_gave_up")
                self.exit_code = ExitCode.RECONNECT
                self.stop.set()
            if self.qr_deadline is not None and now > self.qr_deadline:
                await self.events.put(ev.QrExpired())
                self.qr_deadline = None
            if now - last_metrics > self.cfg.controller.metrics_interval:
                last_metrics = now
                self._report_metrics()
                self.report_usage()
            await self.engine.reap_idle()
            self.retry_held_inbound()
            if now - last_checkpoint > CHECKPOINT_INTERVAL:
                last_checkpoint = now
                try:
                    await asyncio.to_thread(self.store.checkpoint)
                except sqlite3.Error as exc:  # the next one will try again
                    log.warning("store.checkpoint_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)

    def health_problem(self, lag: float, now: float) -> str | None:
        """Why the watchdog must not be fed now, or None when the worker is alive."""
        stall = self.cfg.worker.watchdog_stall
        if lag > stall:
            return f"event loop stalled for {lag:.1f} s"
        limit = self.cfg.claude.turn_timeout + 30
        stuck = sorted(c for c, t in self.engine.turns_in_flight.items() if now - t > limit)
        if stuck:
            return f"turn stuck for more than {limit:.0f} s in {', '.join(stuck)}"
        since = self.sink_since
        if since is not None and now - since > stall:
            return f"WhatsApp thread stuck for {now - since:.0f} s"
        if not self.backend.healthy():
            return f"WhatsApp backend {self.backend.name} is not healthy"
        dead = [t.get_name() for t in self.tasks if t.done()]
        if dead and not self.stop.is_set():
            return f"task {', '.join(dead)} ended"
        return None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A long-running task ended. While the worker runs that is a failure: stop with
        exit code 1 (systemd restarts us) instead of running on without it."""
        if task.cancelled() or self.stop.is_set():
            return
        if task.get_name() == "link" and self.link_stop.is_set():
            return
        error = task.exception()
        if error is not None and self.store.is_outage(error):
            self._spawn(self._restart_task(task, error))
            return
        log.error("worker.task_died", task=task.get_name(),
                  error=repr(error) if error is not None else "returned")
        if self.exit_code == ExitCode.OK:
            self.exit_code = ExitCode.FAILURE
        self.stop.set()

    async def _restart_task(self, task: asyncio.Task[None], error: BaseException) -> None:
        """Store outages (PostgreSQL down or restarting): a long-running task that met one
        starts again after a backoff instead of ending the worker, which keeps its WhatsApp
        link; acknowledged messages wait in the inbound hold and turns in their chat loops
        until the database answers (README, "PostgreSQL")."""
        name = task.get_name()
        now = time.monotonic()
        last, delay = self.task_backoff.get(name, (0.0, 0.0))
        delay = min(5.0, next_delay(delay if now - last < 60 else 0.0))
        self.task_backoff[name] = (now, delay)
        log.warning("store.unavailable", task=name, retry_in=delay, error=str(error))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)
        if self.stop.is_set():
            return
        again = asyncio.create_task(self.task_factories[name](), name=name)
        again.add_done_callback(self._task_done)
        self.tasks[self.tasks.index(task)] = again

    async def _crash_task(self, name: str, coro: Any) -> None:
        """Test hook ``task-crash``: run ``coro`` as task ``name`` would, then make it raise."""
        inner = asyncio.ensure_future(coro)
        try:
            while self.state != WorkerState.CONNECTED:  # noqa: ASYNC110 - a test hook
                await asyncio.sleep(0.1)
            await asyncio.sleep(float(os.environ.get("WABRIDGE_TEST_FAULT_AFTER", "0.5")))
            if self._fault_once(f"-{name}"):
                log.warning("test.fault", fault=self.fault, task=name)
                raise RuntimeError(f"test fault: task {name} crashed")
            await inner
        finally:
            inner.cancel()

    # --- test hooks (see the module doc; inert unless WABRIDGE_TEST_HOOKS=1) ----------------
    def _fault_once(self, what: str = "") -> bool:
        marker = self.state_dir / f".test-fault-{self.fault}{what}"
        if marker.exists():
            return False
        marker.write_text("done\n")
        return True

    async def _inject_fault(self) -> None:
        after = float(os.environ.get("WABRIDGE_TEST_FAULT_AFTER", "0.5"))
        while self.state != WorkerState.CONNECTED:  # noqa: ASYNC110 - a test hook
            await asyncio.sleep(0.1)
        await asyncio.sleep(after)
        if not self._fault_once():
            return
        log.warning("test.fault", fault=self.fault)
        if self.fault == "wedge-loop":
            time.sleep(3600)  # noqa: ASYNC251 - the point: a loop that does not turn
        elif self.fault == "stuck-turn":
            self.engine.turns_in_flight["test:stuck"] = (
                time.monotonic() - self.cfg.claude.turn_timeout - 31)
        elif self.fault == "alloc":
            import threading  # noqa: PLC0415

            def grow() -> None:
                hog = []
                while True:
                    hog.append(b"\x01" * (8 << 20))  # touched pages, not lazy zero pages
                    time.sleep(0.02)

            threading.Thread(target=grow, name="test-alloc", daemon=True).start()

    def _report_summary(self, chat_id: str, number: int, text: str) -> None:
        self.link.report(lambda seq: protocol.Summary(seq=seq, chat_id=chat_id, number=number,
                                                      text=text))

    def _report_problem(self, code: str, message: str) -> None:
        self.link.report(lambda seq: protocol.Problem(seq=seq, code=code, message=message))

    def _report_metrics(self) -> None:
        t = self.store.totals()
        today = self.store.cost_on(utc_day(time.time()))
        chats, procs = self.store.chat_count(), self.pool.live
        self.link.report(lambda seq: protocol.Metrics(
            seq=seq, chats=chats, claude_processes=procs, turns=int(t["turns"]),
            messages_in=int(t["messages_in"]), messages_out=int(t["messages_out"]),
            input_tokens=int(t["input_tokens"]), output_tokens=int(t["output_tokens"]),
            cost_today_usd=today, undecryptable=int(t.get("undecryptable", 0)),
            stream_errors=int(t.get("stream_errors", 0)),
            replies_failed=int(t["replies_failed"]),
            uncertain_replies=int(t.get("uncertain_replies", 0))))

    async def run(self) -> ExitCode:
        if self.fault == "crash":
            log.warning("test.fault", fault=self.fault)
            return ExitCode.FAILURE
        if self.fault == "ignore-sigterm":
            log.warning("test.fault", fault=self.fault)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by Claude processes too
        else:
            self.loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        self.loop.add_signal_handler(signal.SIGINT, self.stop.set)
        if self.fault in ("wedge-loop", "stuck-turn", "alloc"):
            self._spawn(self._inject_fault())
        self.link.forget_stale()
        self._report_state()
        self.task_factories = {"link": lambda: self.link.run(self.link_stop), "pump": self.pump,
                               "outbox": lambda: self.engine.deliver_forever(self.stop),
                               "supervise": self.supervise}
        coros = {name: make() for name, make in self.task_factories.items()}
        if self.lease is not None:
            lease = self.lease
            self.task_factories[LEASE_TASK] = lambda: lease.run(self.stop)
            coros[LEASE_TASK] = self.task_factories[LEASE_TASK]()
        crash = os.environ.get("WABRIDGE_TEST_FAULT_TASK", "")
        if self.fault == "task-crash" and crash in coros:
            coros[crash] = self._crash_task(crash, coros[crash])
        for name, coro in coros.items():
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(self._task_done)
            self.tasks.append(task)
        self.replay_spilled_inbound()  # before WhatsApp: spilled messages go first
        if self.lease is None or self.lease.holds():  # (a slow start may have outlived it)
            self.backend.start(self.sink)
        self.engine.resume_pending()
        self.notifier.notify("READY=1")
        log.info("worker.started", backend=self.backend.name, state_dir=str(self.state_dir))
        await self.stop.wait()
        await self.shutdown(self.tasks)
        return self.exit_code

    def _unless_outage(self, step: str, call: Callable[[], Any]) -> Any:
        """A shutdown step that needs the store, which is down (PostgreSQL): skipped and
        named, so the rest of the shutdown (the held messages' spill) still runs."""
        try:
            return call()
        except Exception as exc:
            if not self.store.is_outage(exc):
                raise
            log.warning("store.unavailable", task=f"shutdown:{step}", error=str(exc))
            return None

    async def shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        self.notifier.notify("STOPPING=1")
        start = time.monotonic()
        deadline = start + STOP_BUDGET
        lost = self.exit_code == ExitCode.LEASE_LOST
        if lost:
            # Another host may take the account from now on: WhatsApp first, so not one
            # more message goes out or comes in here (the outbox's lease check refuses
            # sends meanwhile; turns in flight cannot commit: their writes are fenced).
            self.notifier.notify("STATUS=stopping: lease lost, disconnecting WhatsApp")
            log.info("worker.stopping", reason="lease_lost")
            await self.backend.stop(timeout=1.5)
            if self.lease is not None:
                self.lease.disconnected.set()
        else:
            self.notifier.notify("STATUS=stopping: finishing turns in flight")
            log.info("worker.stopping")
        # stop taking turns; a turn in flight finishes (or stays pending in the store, to be
        # answered after the restart); the outbox is flushed
        await self.engine.drain(timeout=0.5 if lost else 2.0)
        self.notifier.notify("STATUS=stopping: closing Claude processes")
        try:
            await asyncio.wait_for(self.engine.close_conversations(),
                                   max(0.2, deadline - 1.0 - time.monotonic()))
        except TimeoutError:  # systemd's SIGKILL (KillMode=mixed: the rest) finishes them
            log.warning("worker.claude_close_timed_out")
        await self.tools.close()
        if self.state not in (WorkerState.LOGGED_OUT, WorkerState.BANNED, WorkerState.REPLACED,
                              WorkerState.OUTDATED, WorkerState.QR_EXPIRED):
            self.state, self.detail = WorkerState.STOPPING, "stopping"
        self._unless_outage("report_state", self._report_state)
        if not lost:
            await self.backend.stop(timeout=max(0.3, deadline - 0.5 - time.monotonic()))
            if self.lease is not None:
                self.lease.disconnected.set()
        self.retry_held_inbound(final=True)  # no more arrive: commit or spill them
        if self.lease is not None and releases_lease(self.exit_code,
                                                     spilled=self.inbound_hold.holding()):
            await self.lease.release()
        # Give the link a moment to deliver the last reports; they stay queued otherwise.
        until = min(time.monotonic() + 2.0, deadline + 0.3)
        while (self.link.connected and time.monotonic() < until  # noqa: ASYNC110 - acks land in the store
               and self._unless_outage("flush_reports", self.store.unacked_frames)):
            await asyncio.sleep(0.02)
        self.link_stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("worker.stopped", exit_code=int(self.exit_code),
                 seconds=round(time.monotonic() - start, 2))


def state_directory(user_id: str) -> Path:
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    return Path("/var/lib/wabridge") / units.escape_instance(user_id)


async def _amain(user_id: str, cfg: config.Config, state_dir: Path) -> int:
    where = store_location(user_id, cfg, state_dir)
    lease = None
    if cfg.fleet.enabled and isinstance(where, PostgresTarget):  # (config: postgresql)
        # Before anything is opened or connected: this host must still own the account.
        from agent.lease import LeaseKeeper, holder_from_environment  # noqa: PLC0415 (fleet only)

        holder = holder_from_environment(user_id)
        where = replace(where, holder=holder)
        lease = LeaseKeeper(holder, where, cfg.fleet)
        lease.verify()  # LeaseLost: exit 17, WhatsApp never connected
    store = open_store(where,  # (a notifier only if it waits)
                       lambda text: sdnotify.SystemdNotifier().notify(text))
    worker = Worker(user_id, cfg, state_dir, store, lease)
    code = await worker.run()
    store.close()
    if lease is not None:
        lease.close()
    if getattr(worker.backend, "stopped_cleanly", True) is False:
        log.warning("worker.forced_exit", exit_code=int(code))
    if os.environ.get("INVOCATION_ID"):
        # Under systemd, leave now: everything durable is committed. Interpreter teardown
        # (and a neonize Go thread stuck in a dial, which it would wait for) can outlast
        # TimeoutStopSec on a busy host; systemd's SIGKILL would then replace our exit code,
        # which RestartPreventExitStatus= depends on, and restart a logged-out worker.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    return int(code)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: wabridge-worker <userId>\n")
        return int(ExitCode.BAD_USER)
    raw = args[0]
    try:
        user_id = units.validate_user_id(raw)  # the unit passes %I: the unescaped id
    except WabridgeError as exc:
        sys.stderr.write(f"wabridge-worker: {exc}\n")
        return int(ExitCode.BAD_USER)
    try:
        cfg = config.load()
    except ConfigError as exc:
        sys.stderr.write(f"wabridge-worker: {exc}\n")
        return int(ExitCode.CONFIG)
    logs.setup("wabridge-worker", cfg.log.level, cfg.log.format)
    logs.bind(user_id=user_id)
    faulthandler.enable()  # a watchdog kill (SIGABRT) shows where every thread was
    state_dir = state_directory(user_id)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if shutil.disk_usage(state_dir).free < 50 * 1024 * 1024:
        log.warning("worker.low_disk", free_bytes=shutil.disk_usage(state_dir).free)
    try:
        return asyncio.run(_amain(user_id, cfg, state_dir))
    except WabridgeError as exc:
        log.error("worker.failed", code=exc.code, error=str(exc))
        return int(exc.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
