"""``wabridge-worker <userId>``: the composition root of one worker unit.

Start-up phases (a failure in each has its own exit code, see ``wabridge.errors.ExitCode``):
1. synchronous: arguments, configuration, logging, state directory, store (no asyncio yet);
2. ``Worker.run``: one TaskGroup holding the controller link, the WhatsApp event pump, the
   outbox sender, the watchdog and the status line; ``READY=1`` once they run;
3. SIGTERM -> ``STOPPING=1`` -> stop taking messages -> let turns in flight finish -> flush the
   outbox and reports -> close Claude processes -> stop WhatsApp -> exit, all within the unit's
   ``TimeoutStopSec`` (5 s); systemd's SIGKILL with ``KillMode=control-group`` covers the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import sdnotify

from agent import outcomes, qr
from agent.claude import ClaudeSettings
from agent.engine import ClaudePool, Engine
from agent.link import ControllerLink
from agent.store import Store
from agent.whatsapp import events as ev
from agent.whatsapp.base import BackendContext, WhatsAppBackend
from wabridge import __version__, config, logs, protocol, units
from wabridge.errors import ConfigError, ExitCode, WabridgeError
from wabridge.status import WorkerState

log = logs.get("agent")
STOP_BUDGET = 4.0  # seconds of the unit's TimeoutStopSec=5 we use; systemd kills after 5


def default_cli_path() -> Path:
    import claude_agent_sdk  # noqa: PLC0415

    return Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"


def claude_settings(cfg: config.Config) -> ClaudeSettings:
    env: dict[str, str] = {"CLAUDE_CODE_MAX_RETRIES": str(cfg.claude.max_retries)}
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return ClaudeSettings(
        cli_path=Path(cfg.claude.cli_path) if cfg.claude.cli_path else default_cli_path(),
        model=cfg.claude.model or None,
        system_prompt=cfg.claude.system_prompt or None,
        tools_enabled=cfg.claude.tools,
        turn_timeout=cfg.claude.turn_timeout,
        extra_env=env,
    )


def make_backend(
    cfg: config.Config, ctx: BackendContext, settings: dict[str, Any]
) -> WhatsAppBackend:
    backend = str(settings.get("backend") or cfg.worker.backend)
    if backend == "sim":
        from agent.whatsapp.sim import SimBackend  # noqa: PLC0415

        return SimBackend(ctx, str(settings.get("simUrl") or cfg.worker.sim_url))
    if backend == "neonize":
        from agent.whatsapp.neonize_backend import NeonizeBackend  # noqa: PLC0415

        return NeonizeBackend(ctx)
    raise ConfigError("worker.backend", f"{backend!r} is not a backend", allowed="neonize, sim")


def _qr_frame(seq: int, *, code: str, data_url: str) -> protocol.Frame:
    return protocol.Qr(seq=seq, code=code, data_url=data_url)


def _pairing_frame(seq: int, *, code: str) -> protocol.Frame:
    return protocol.PairingCode(seq=seq, code=code)


class Worker:
    def __init__(self, user_id: str, cfg: config.Config, state_dir: Path, store: Store) -> None:
        self.user_id = user_id
        self.cfg = cfg
        self.state_dir = state_dir
        self.store = store
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
        self.link = ControllerLink(cfg.controller.socket, user_id, store, __version__,
                                   self._on_settings, self._on_command)
        self.settings: dict[str, Any] = {}
        self.pairing_requested = ""
        self.background: set[asyncio.Task[Any]] = set()
        self.events: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        ctx = BackendContext(user_id=user_id, state_dir=state_dir)
        self.backend = make_backend(cfg, ctx, self._cached_settings())
        self.pool = ClaudePool(cfg.claude.max_processes, cfg.claude.idle_timeout,
                               claude_settings(cfg), state_dir, store,
                               resume_max_bytes=cfg.conversation.resume_max_bytes)
        self.engine = Engine(store, self.backend, self.pool, cfg.conversation,
                             self._report_message, limits=cfg.limits,
                             context_window=cfg.claude.context_window, model=cfg.claude.model)
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
        self.engine.update_settings(settings)  # bad value: keeps the policy, logs policy.invalid
        phone = settings.get("pairingPhone")
        if (isinstance(phone, str) and phone and phone != self.pairing_requested
                and self.state != WorkerState.CONNECTED):
            self.pairing_requested = phone
            self._spawn(self.backend.pair_phone(phone))

    def _on_command(self, command: protocol.Command) -> None:
        if command.name == "pair_phone":
            self._spawn(self.backend.pair_phone(command.args.get("phone", "")))

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
        if isinstance(event, ev.IncomingMessage) and not self.engine.persist(event):
            return
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def pump(self) -> None:
        while not self.stop.is_set():
            event = await self.events.get()
            if isinstance(event, ev.IncomingMessage):
                log.info("whatsapp.message_received", chat_id=event.chat_id,
                         wa_id=event.wa_id, sender=event.sender)
                self.engine.wake_chat(event.chat_id)
                continue
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
        while not self.stop.is_set():
            now = time.monotonic()
            lag = now - self.loop_heartbeat - 1.0
            self.loop_heartbeat = now
            if self._alive(lag):
                self.notifier.notify("WATCHDOG=1")
            line = self.status_line()
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
            await self.pool.reap_idle()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)

    def _alive(self, lag: float) -> bool:
        if lag > self.cfg.worker.watchdog_stall:
            log.error("watchdog.loop_stalled", lag=round(lag, 1))
            return False
        limit = self.cfg.claude.turn_timeout + 30
        stuck = [c for c, t in self.engine.turns_in_flight.items()
                 if time.monotonic() - t > limit]
        if stuck:
            log.error("watchdog.turn_stuck", chats=stuck)
            return False
        return True

    def _report_metrics(self) -> None:
        t = self.store.totals()
        chats, procs = self.store.chat_count(), self.pool.live
        self.link.report(lambda seq: protocol.Metrics(
            seq=seq, chats=chats, claude_processes=procs, turns=int(t["turns"]),
            messages_in=int(t["messages_in"]), messages_out=int(t["messages_out"]),
            input_tokens=int(t["input_tokens"]), output_tokens=int(t["output_tokens"]),
            cost_today_usd=float(t["cost_usd"])))

    async def run(self) -> ExitCode:
        self.loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        self.loop.add_signal_handler(signal.SIGINT, self.stop.set)
        self.link.forget_stale()
        self._report_state()
        tasks = [
            asyncio.create_task(self.link.run(self.link_stop), name="link"),
            asyncio.create_task(self.pump(), name="pump"),
            asyncio.create_task(self.engine.deliver_forever(self.stop), name="outbox"),
            asyncio.create_task(self.supervise(), name="supervise"),
        ]
        self.backend.start(self.sink)
        self.engine.resume_pending()
        self.notifier.notify("READY=1")
        log.info("worker.started", backend=self.backend.name, state_dir=str(self.state_dir))
        await self.stop.wait()
        crashed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
        for task in crashed:
            log.error("worker.task_crashed", task=task.get_name(), error=repr(task.exception()))
        await self.shutdown(tasks)
        return ExitCode.FAILURE if crashed and self.exit_code == ExitCode.OK else self.exit_code

    async def shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        self.notifier.notify("STOPPING=1")
        self.notifier.notify("STATUS=stopping: finishing turns in flight")
        log.info("worker.stopping")
        start = time.monotonic()
        await self.engine.drain(timeout=2.0)
        await self.pool.close_all()
        if self.state not in (WorkerState.LOGGED_OUT, WorkerState.BANNED, WorkerState.REPLACED,
                              WorkerState.OUTDATED, WorkerState.QR_EXPIRED):
            self.state, self.detail = WorkerState.STOPPING, "stopping"
        self._report_state()
        await self.backend.stop(timeout=max(0.3, STOP_BUDGET - 1.0 - (time.monotonic() - start)))
        # Give the link a moment to deliver the last reports; they stay queued otherwise.
        deadline = time.monotonic() + 0.8
        while self.store.unacked_frames() and self.link.connected and time.monotonic() < deadline:  # noqa: ASYNC110 - acks land in SQLite
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
    store = Store(state_dir / "agent.db")
    worker = Worker(user_id, cfg, state_dir, store)
    code = await worker.run()
    store.close()
    if getattr(worker.backend, "stopped_cleanly", True) is False:
        # neonize's Go side is stuck (a hung dial): its thread would keep the interpreter
        # alive past TimeoutStopSec and systemd's SIGKILL would hide our exit code, which
        # RestartPreventExitStatus= depends on. Everything durable is committed by now.
        log.warning("worker.forced_exit", exit_code=int(code))
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
