"""``wabridge-controller``: control plane -> systemd units; worker reports -> control plane.

Workers are not children of the controller: they are units of their own, so a controller
restart leaves them running; at start-up the controller rebuilds its view from systemd and the
control plane and reconciles (``controller.reconcile``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sdnotify

from controller import admin  # wabridgectl's admin socket
from controller import reconcile as rc
from controller.metrics import FleetSnapshot, MetricsServer, WorkerFigures, own_rss_bytes
from controller.plane import CONTROLLER, WORKER, ControlPlane, Removed, SessionDoc, error_field
from controller.server import WorkerServer, limit_accept_errors
from controller.systemd import (
    EXIT_REPORTS,
    Systemd,
    SystemdError,
    UnitState,
    api_key_file,
    read_exit_report,
    worker_dropin,
)
from wabridge import config, logs, protocol
from wabridge.errors import ConfigError, ExitCode, PolicyError, WabridgeError
from wabridge.status import RUNNING_STATUSES, DocStatus, doc_status_for
from wabridge.units import system_user_name, worker_unit

log = logs.get("controller")
START_SLOT_TIMEOUT = 90.0  # a start slot is given back by then even if no state arrives


def choose_plane(cfg: config.Config) -> ControlPlane:
    choice = cfg.controller.control_plane
    if choice == "auto":
        creds_dir = os.environ.get("CREDENTIALS_DIRECTORY", "")
        has_firebase = bool(
            cfg.firebase.emulator_host or cfg.firebase.credentials
            or os.environ.get("FIRESTORE_EMULATOR_HOST")
            or (creds_dir and (Path(creds_dir) / "firebase").exists())
        )
        choice = "firestore" if has_firebase else "local"
    if choice == "firestore":
        from controller.firestore import FirestorePlane  # noqa: PLC0415

        firebase = cfg.firebase
        env_host = os.environ.get("FIRESTORE_EMULATOR_HOST", "")
        if env_host and not firebase.emulator_host:  # the SDK's own convention, honoured once
            firebase = dataclasses.replace(firebase, emulator_host=env_host)
        return FirestorePlane(firebase)
    from controller.local import LocalPlane  # noqa: PLC0415

    return LocalPlane(Path(cfg.controller.local_db))


def view_of(state: UnitState) -> rc.UnitView:
    # cgroup v1: an OOM kill is a SIGKILL (Result=signal) plus the memory cgroup's oom_kill
    # counter in the invocation's exit report (see controller/systemd.py "Exit reports")
    oom = (bool(state.oom_kills) and state.exec_main_code == rc.CLD_KILLED
           and state.exec_main_status == signal.SIGKILL and state.result in ("signal", "oom-kill"))
    active = state.active_state
    if state.job_pending and active in ("inactive", "failed"):
        # StartUnit loaded the unit and queued its job, which has not run yet (a busy
        # systemd): it is starting, not stopped
        active = "activating"
    return rc.UnitView(
        active_state=active, sub_state=state.sub_state, result=state.result,
        n_restarts=state.n_restarts, exec_main_code=state.exec_main_code,
        exec_main_status=state.exec_main_status, oom=oom,
        start_limit_burst=state.start_limit_burst,
    )


def start_settled(state: UnitState) -> bool:
    """Whether a start is over for ``controller.max_starting``: running (READY=1 sent),
    failed, waiting for an automatic restart, or stopped with no job queued."""
    if state.active_state in ("active", "failed", "deactivating"):
        return True
    if state.sub_state == "auto-restart":
        return True
    return state.active_state == "inactive" and not state.job_pending


def worker_limits(cfg: config.Config) -> dict[str, str]:
    """Resource settings of every worker unit, from ``worker.*`` (empty: the unit file's)."""
    return {"MemoryMax": cfg.worker.memory_max, "MemoryHigh": cfg.worker.memory_high,
            "TasksMax": cfg.worker.tasks_max, "CPUQuota": cfg.worker.cpu_quota}


class Controller:
    def __init__(self, cfg: config.Config, plane: ControlPlane, systemd: Systemd) -> None:
        self.cfg = cfg
        self.plane = plane
        self.systemd = systemd
        self.host = cfg.controller.host_id or socket.gethostname()
        self.docs: dict[str, SessionDoc] = {}
        self.units: dict[str, UnitState] = {}
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.server = WorkerServer(cfg.controller.socket, systemd.unit_for_pid, self.on_frame,
                                   self.settings_for)
        self.watchers = admin.DocWatchers()  # wabridgectl watch/link --follow
        self.admin = admin.AdminServer(cfg.controller.admin_socket, admin.ControllerFacade(self),
                                       group=cfg.controller.admin_group)
        self.exit_code = ExitCode.OK
        self.supervised: set[asyncio.Task[None]] = set()  # long-running: one ends, we exit
        self.unhealthy = ""
        self.notifier = sdnotify.SystemdNotifier()
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_process_write: dict[str, float] = {}
        self.last_process_key: dict[str, tuple[int, str, int]] = {}
        self.reported: dict[str, dict[str, float]] = {}  # latest metrics frame per user
        self.metrics_server: MetricsServer | None = None
        # at most controller.max_starting units activating at once (see start_slot)
        self.start_slots = asyncio.Semaphore(cfg.controller.max_starting)
        self.starting: dict[str, asyncio.Event] = {}
        self.unit_events: defaultdict[str, int] = defaultdict(int)  # states delivered per user
        self.start_mark: dict[str, int] = {}  # unit_events when our last start was queued
        self.loaded = False  # documents read and reconciled: unit events may act
        self.requested_at: dict[str, float] = {}  # user -> monotonic time of a claimed (re)start
        self.worker_status: dict[str, DocStatus] = {}  # user -> what its worker last reported

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("controller.task_failed", error=repr(task.exception()))

    def supervise(self, coro: Any, name: str) -> None:
        """Run a task that lives as long as the controller: if it ends (an exception, or a
        return) before the controller stops, the controller stops with exit code 1 and
        systemd restarts it; a controller missing a part never runs on quietly."""
        task = asyncio.create_task(coro, name=name)
        self.supervised.add(task)
        task.add_done_callback(self._supervised_done)

    def _supervised_done(self, task: asyncio.Task[None]) -> None:
        if self.stop.is_set() or task.cancelled():
            return
        error = task.exception()
        log.error("controller.task_died", task=task.get_name(),
                  error=repr(error) if error is not None else "returned")
        self.exit_code = ExitCode.FAILURE
        self.stop.set()

    def health_problem(self) -> str | None:
        """Why the watchdog must not be fed now (None: every part is alive). systemd
        restarts a controller that stops feeding it (``WatchdogSec=``)."""
        dead = sorted(t.get_name() for t in self.supervised if t.done())
        if dead:
            return f"task {', '.join(dead)} ended"
        if not self.systemd.signals_alive:
            return "systemd signal subscription lost and not being restored"
        if not self.plane.feed_alive():
            return f"the {self.plane.name} change feed ended"
        return None

    # --- the controller's view of documents ----------------------------------------------
    def set_doc(self, user_id: str, doc: SessionDoc | None) -> SessionDoc | None:
        """Replace (None: drop) the view of one document; tells its admin watchers. Returns
        the previous view."""
        old = self.docs.pop(user_id, None) if doc is None else self.docs.get(user_id)
        if doc is not None:
            self.docs[user_id] = doc
        self.watchers.changed(user_id, old, doc)
        return old

    async def write(self, user_id: str, fields: dict[str, Any]) -> None:
        """``plane.update``, and the same merge into our view at once (the feed's echo brings
        the same fields later): wabridgectl and the next decision see what we wrote."""
        await self.plane.update(user_id, fields)
        doc = self.docs.get(user_id)
        if doc is not None:
            self.set_doc(user_id, doc.merged(fields))

    # --- events ------------------------------------------------------------------------
    def on_change(self, change: SessionDoc | Removed) -> None:
        if isinstance(change, Removed):
            self.set_doc(change.user_id, None)
            if change.user_id in self.units:
                self.spawn(self.execute(change.user_id, self.plan_unit))
            return
        old = self.set_doc(change.user_id, change)
        unit = self.units.get(change.user_id)
        settings = rc.for_settings(old, change, view_of(unit) if unit else None)
        if settings:
            self.spawn(self.execute(change.user_id, lambda _uid: settings))
        self.spawn(self.handle_doc(change.user_id))

    async def handle_doc(self, user_id: str) -> None:
        await self.execute(user_id, self.plan_doc)

    def plan_doc(self, user_id: str) -> list[rc.Action]:
        doc = self.docs.get(user_id)
        if doc is None:
            return []
        unit = self.units.get(user_id)
        return rc.for_doc(doc, view_of(unit) if unit else None)

    def plan_unit(self, user_id: str) -> list[rc.Action]:
        unit = self.units.get(user_id)
        if unit is None:
            return []
        if self.start_mark.get(user_id) == self.unit_events[user_id]:
            # No state has been read since this controller's last StartUnit/RestartUnit for
            # the unit returned: what is known predates the start (e.g. the "inactive" of the
            # ResetFailedUnit just before it) and must not mark the document stopped or
            # crashed. The start's own state change follows.
            return []
        return rc.for_unit(self.docs.get(user_id), user_id, view_of(unit))

    def on_unit(self, state: UnitState) -> None:
        self.units[state.user_id] = state
        self.unit_events[state.user_id] += 1
        waiting = self.starting.get(state.user_id)
        if waiting is not None and start_settled(state):
            waiting.set()
        if not self.loaded:
            # Documents are not read yet: a unit without a known document is not an orphan
            # until they are. The start-up reconcile sees this state.
            return
        self.spawn(self.execute(state.user_id, self.plan_unit))
        key = (state.main_pid, state.active_state, state.n_restarts)
        self.spawn(self.write_process(state, force=self.last_process_key.get(state.user_id) != key))

    async def execute(self, user_id: str, plan: Callable[[str], list[rc.Action]]) -> None:
        """Run the actions ``plan(user_id)`` decides, one user at a time. The plan is made
        under the user's lock, from the documents and unit states known *then*: actions
        decided from an event that a later event (or an action of the previous holder of
        the lock) has made stale are never carried out."""
        async with self.locks[user_id]:
            for action in plan(user_id):
                if not await self._do(action):
                    return

    async def _do(self, action: rc.Action) -> bool:
        match action:
            case rc.Claim(user_id=uid, expect=expect, new=new):
                ok = await self.claim(uid, expect, new)
                if ok:
                    log.info("session.claimed", user_id=uid, status=new.value)
                    unit_state = self.units.get(uid)
                    running = unit_state is not None and unit_state.active_state in (
                        "active", "activating", "reloading")
                    if new is DocStatus.STARTING and (
                            not running or DocStatus.RESTART_REQUESTED in expect):
                        # a new worker process will answer this request; what the old one
                        # still says while it stops is stale
                        self.requested_at[uid] = time.monotonic()
                    elif new is DocStatus.STARTING and uid in self.worker_status:
                        # the worker already runs and keeps running: say what it last said
                        # (unless a client's new request got there first)
                        await self.set_status(uid, self.worker_status[uid],
                                              frozenset({DocStatus.STARTING}))
                return ok
            case rc.Start(user_id=uid, reset_failed=reset, restart=restart):
                unit = worker_unit(uid)
                try:
                    if reset:
                        with contextlib.suppress(SystemdError):
                            await self.systemd.reset_failed(unit)
                    # the user's own dynamic user, the resource limits and the backend the
                    # document asks for; fails closed
                    try:
                        dropin = self.dropin_for(uid)
                    except PolicyError as exc:
                        log.warning("session.error", user_id=uid, code=exc.code, error=str(exc))
                        await self.write(uid, {"status": DocStatus.ERROR.value,
                                               "error": error_field(exc.code, str(exc))})
                        return False
                    await self.systemd.install_dropin(unit, dropin)
                    # a start slot, unless this start is a no-op: one is already under way
                    # (a second Start from the document's echo) or the unit runs
                    known = self.units.get(uid)
                    busy = uid in self.starting or (known is not None
                                                    and view_of(known).running)
                    settled = await self.start_slot(uid) if restart or not busy else None
                    try:
                        await (self.systemd.restart(unit) if restart
                               else self.systemd.start(unit))
                    except SystemdError:
                        if settled is not None:
                            settled.set()
                        raise
                    if settled is not None:
                        # a state change is coming (see plan_unit); states delivered from
                        # now on were read after the job was queued (one FIFO D-Bus thread)
                        self.start_mark[uid] = self.unit_events[uid]
                except SystemdError as exc:
                    await self.write(uid, {"status": DocStatus.ERROR.value,
                                           "error": error_field("start_failed", str(exc))})
                    return False
                log.info("unit.start", user_id=uid, unit=unit)
                if rc.clears_error(self.docs.get(uid), CONTROLLER):
                    await self.write(uid, {"error": None})
            case rc.Stop(user_id=uid):
                log.info("unit.stop", user_id=uid)
                with contextlib.suppress(SystemdError):
                    await self.systemd.stop(worker_unit(uid))
            case rc.Update(user_id=uid, fields=fields):
                rest = dict(fields)
                status = rest.pop("status", None)
                if status is not None:
                    doc = self.docs.get(uid)
                    seen = {doc.status} if doc is not None and doc.status else set()
                    if not await self.set_status(uid, DocStatus(status),
                                                 rc.CONTROLLER_OWNED | seen):
                        return True  # the rest describes a status that was not written
                if rest:
                    await self.write(uid, rest)
            case rc.SetError(user_id=uid, code=code, message=message, reason=reason):
                log.warning("session.error", user_id=uid, code=code, message=message,
                            reason=reason)
                error = error_field(code, message)
                if reason:
                    error["reason"] = reason
                await self.write(uid, {"error": error})
            case rc.PushSettings(user_id=uid):
                if await self.server.send(uid, protocol.Settings(
                        settings=await self.settings_for(uid))):
                    log.info("worker.settings_sent", user_id=uid)
        return True

    async def claim(self, user_id: str, expect: frozenset[DocStatus], new: DocStatus) -> bool:
        ok = await self.plane.claim(user_id, expect, new, self.host)
        doc = self.docs.get(user_id)
        if ok and doc is not None:
            self.set_doc(user_id, doc.merged({"status": new.value, "host": self.host}))
        return ok

    async def resync(self) -> None:
        """The safety net under the change feed (a feed can go quiet without an error, a
        claim can fail): every ``controller.resync_interval`` seconds, read the documents that
        hold a client's request and act as ``reconcile.missed_requests`` decides."""
        seen: dict[str, DocStatus | None] = {}
        while True:
            await asyncio.sleep(self.cfg.controller.resync_interval)
            try:
                pending = await self.plane.pending_requests()
            except WabridgeError as exc:
                log.warning("plane.resync_failed", error=str(exc))
                continue
            check = rc.missed_requests(seen, pending, self.docs)
            seen = check.seen
            for user_id in check.missed:
                log.warning("plane.request_missed", user_id=user_id)
            for doc in check.handle:
                self.on_change(doc)
            if check.missed:
                await self.plane.rewatch()

    async def start_slot(self, user_id: str) -> asyncio.Event:
        """Wait for one of ``controller.max_starting`` start slots. The slot is given back
        when the returned event is set (``on_unit``: the unit is active, failed, restarting or
        stopped) or after ``START_SLOT_TIMEOUT``; the caller does not wait for that."""
        await self.start_slots.acquire()
        settled = asyncio.Event()
        previous = self.starting.get(user_id)
        if previous is not None:
            previous.set()
        self.starting[user_id] = settled

        async def give_back() -> None:
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(settled.wait(), START_SLOT_TIMEOUT)
            finally:
                if self.starting.get(user_id) is settled:
                    del self.starting[user_id]
                self.start_slots.release()

        self.spawn(give_back())
        return settled

    async def set_status(self, user_id: str, new: DocStatus,
                         expect: frozenset[DocStatus]) -> bool:
        """Write a status the controller decided, atomically, only while the document's status
        is in ``expect``: a client's request that reached the document after the decision was
        made (and that the controller has not seen yet) is never overwritten."""
        ok = await self.claim(user_id, expect, new)
        if not ok:
            log.info("session.status_not_written", user_id=user_id, status=new.value)
        return ok

    def dropin_for(self, user_id: str) -> str:
        """The unit's drop-in for this user; raises ``PolicyError`` for a bad backend or a bad
        ``apiKeyRef``."""
        doc = self.docs.get(user_id)
        settings = doc.settings if doc is not None else {}
        return worker_dropin(system_user_name(user_id), worker_limits(self.cfg),
                             rc.worker_environment(settings), api_key_file(settings))

    async def write_process(self, state: UnitState, *, force: bool = False) -> None:
        """The document's ``process`` field: on every change of PID/state/restarts, else at
        most once per ``controller.metrics_interval`` (Firestore: ~1 write/s per document)."""
        now = time.monotonic()
        last = self.last_process_write.get(state.user_id, 0.0)
        if not force and now - last < self.cfg.controller.metrics_interval:
            return
        if state.user_id not in self.docs:
            return
        self.last_process_write[state.user_id] = now
        self.last_process_key[state.user_id] = (state.main_pid, state.active_state,
                                                state.n_restarts)
        # systemd keeps a stopped unit's last STATUS= line ("stopping: ..."): it describes
        # a process that is gone
        running = state.active_state in ("active", "activating", "reloading", "deactivating")
        await self.write(state.user_id, {"process": {
            "pid": state.main_pid, "state": state.active_state, "restarts": state.n_restarts,
            "memoryBytes": state.memory_bytes,
            "status": state.status_text if running else None,
            "cpuSeconds": (state.cpu_nsec or 0) / 1e9, "since": state.since_usec / 1e6,
        }})

    # --- worker frames -----------------------------------------------------------------
    async def settings_for(self, user_id: str) -> dict[str, Any]:
        return rc.worker_settings(self.docs.get(user_id))

    def _may_report(self, user_id: str, what: str) -> bool:
        doc = self.docs.get(user_id)
        status = doc.status if doc is not None else None
        if rc.worker_may_report(status):
            return True
        log.info("worker.late_report", user_id=user_id, report=what,
                 status=status.value if status else None)
        return False

    async def on_frame(self, user_id: str, frame: protocol.SequencedFrame) -> None:
        match frame:
            case protocol.State(state=state, detail=detail, phone=phone):
                if (self.server.connected_since.get(user_id, 0.0)
                        < self.requested_at.get(user_id, 0.0)):
                    # The old process, still stopping after a new request: its last words
                    # ("replaced", "logged out") must not undo the request.
                    log.info("worker.stale_state", user_id=user_id, state=state.value)
                    return
                self.worker_status[user_id] = doc_status_for(state)
                if not self._may_report(user_id, "state"):
                    return
                new = rc.status_from_worker(state)  # written only from WORKER_MAY_SET, below
                # The facts first, then the status: whoever watches the document and sees
                # "connected" also sees the phone and the detail.
                fields: dict[str, Any] = {"statusDetail": detail}
                if phone:
                    fields["phone"] = phone
                await self.write(user_id, fields)
                if new is not None and not await self.set_status(user_id, new,
                                                                 rc.worker_may_move(new)):
                    new = None  # a request or a stop got there first: leave it be
                if new is DocStatus.CONNECTED:
                    await self.write(user_id, {"qrCode": None, "qrRaw": None})
                    await self.plane.put_session_info(user_id, {
                        "phone": phone, "connectedAt": time.time()})
                log.info("worker.state", user_id=user_id, state=state.value, detail=detail)
            case protocol.Qr(code=code, data_url=data_url):
                log.info("worker.qr", user_id=user_id)
                await self.write(user_id, {"qrCode": data_url, "qrRaw": code,
                                           "qrAt": time.time()})
            case protocol.PairingCode(code=code):
                await self.write(user_id, {"pairingCode": code})
            case protocol.MessageEvent():
                await self.plane.add_message(user_id, frame)
            case protocol.Summary(chat_id=chat_id, number=number, text=text):
                await self.plane.add_summary(user_id, chat_id, number, text)
            case protocol.Problem(code=code, message=message):
                log.warning("worker.problem", user_id=user_id, code=code, message=message)
                await self.write(user_id, {"error": error_field(code, message, WORKER)})
            case protocol.ProblemCleared(code=code):
                if rc.clears_error(self.docs.get(user_id), WORKER, code):
                    log.info("worker.problem_cleared", user_id=user_id, code=code)
                    await self.write(user_id, {"error": None})
            case protocol.Metrics():
                if not self._may_report(user_id, "metrics"):
                    return
                self.reported[user_id] = {
                    "chats": frame.chats, "claude_processes": frame.claude_processes,
                    "turns": frame.turns, "messages_in": frame.messages_in,
                    "messages_out": frame.messages_out, "input_tokens": frame.input_tokens,
                    "output_tokens": frame.output_tokens, "cost_today_usd": frame.cost_today_usd,
                }
                await self.write(user_id, {"metrics": {
                    "chats": frame.chats, "claudeProcesses": frame.claude_processes,
                    "turns": frame.turns, "messagesIn": frame.messages_in,
                    "messagesOut": frame.messages_out, "inputTokens": frame.input_tokens,
                    "outputTokens": frame.output_tokens, "costTodayUsd": frame.cost_today_usd,
                }})

    # --- process metrics -----------------------------------------------------------------
    async def refresh_metrics(self) -> None:
        """Every ``controller.metrics_interval``: re-read the accounting of active units and
        write each document's ``process`` (memory and CPU change without unit signals)."""
        while True:
            await asyncio.sleep(self.cfg.controller.metrics_interval)
            for user_id, known in list(self.units.items()):
                if known.active_state != "active":
                    continue
                try:
                    fresh = await self.systemd.loaded_state(known.unit)
                except SystemdError as exc:
                    log.debug("metrics.read_failed", user_id=user_id, error=str(exc))
                    continue
                current = self.units.get(user_id)
                if fresh is None or current is None or (
                        fresh.invocation_id != current.invocation_id):
                    continue  # changed meanwhile: the unit signal brings the new state
                merged = dataclasses.replace(current, memory_bytes=fresh.memory_bytes,
                                             cpu_nsec=fresh.cpu_nsec, tasks=fresh.tasks)
                self.units[user_id] = merged
                self.spawn(self.write_process(merged))

    def snapshot(self) -> FleetSnapshot:
        """What ``GET /metrics`` shows (controller.metrics.render)."""
        users = set(self.docs) | set(self.units)
        workers = []
        for uid in users:
            unit = self.units.get(uid)
            doc = self.docs.get(uid)
            workers.append(WorkerFigures(
                user_id=uid,
                unit_state=unit.active_state if unit else None,
                restarts=unit.n_restarts if unit else 0,
                memory_bytes=unit.memory_bytes if unit and unit.active_state != "inactive"
                else None,
                cpu_seconds=(unit.cpu_nsec / 1e9 if unit and unit.cpu_nsec is not None
                             else None),
                tasks=unit.tasks if unit else None,
                status=doc.status.value if doc and doc.status else None,
                linked=uid in self.server.connections,
                reported=self.reported.get(uid, {}),
            ))
        return FleetSnapshot(workers=tuple(workers), controller_memory_bytes=own_rss_bytes(),
                             plane=self.plane.name)

    async def start_metrics_server(self) -> None:
        listen = self.cfg.controller.metrics_listen
        if not listen:
            return
        server = MetricsServer(listen, self.snapshot)
        try:
            await server.start()
        except OSError as exc:  # a taken port must not keep the fleet down
            log.error("metrics.listen_failed", listen=listen, error=str(exc))
            return
        self.metrics_server = server

    def exits_while_away(self) -> dict[str, int]:
        """Exit statuses of workers whose documents expect them but whose units are gone."""
        exits: dict[str, int] = {}
        for uid, doc in self.docs.items():
            unit = self.units.get(uid)
            if doc.status not in RUNNING_STATUSES or (unit is not None and unit.active_state
                                                      in ("active", "activating")):
                continue
            try:
                report = read_exit_report(EXIT_REPORTS, worker_unit(uid))
            except WabridgeError:
                continue
            status = report.get("exit_status", "")
            if report.get("exit_code") == "exited" and status.isdigit():
                exits[uid] = int(status)
        return exits

    # --- lifecycle ---------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        limit_accept_errors(loop)  # descriptor exhaustion must not flood the journal
        await self.systemd.open()
        self.systemd.subscribe(self.on_unit)
        await self.admin.start()  # wabridgectl (controller/admin.py): reads our own view
        await self.server.start()
        for state in await self.systemd.list_workers():
            self.units[state.user_id] = state
        for doc in await self.plane.list_sessions():
            self.set_doc(doc.user_id, doc)
        actions = rc.reconcile(self.docs, {u: view_of(s) for u, s in self.units.items()},
                               self.exits_while_away())
        self.loaded = True
        log.info("controller.reconcile", documents=len(self.docs), units=len(self.units),
                 actions=len(actions))
        by_user: defaultdict[str, list[rc.Action]] = defaultdict(list)
        for action in actions:
            by_user[action.user_id].append(action)
        await asyncio.gather(*(self.execute(u, by_user.__getitem__) for u in by_user))
        await self.plane.watch(self.on_change)
        await self.start_metrics_server()
        self.supervise(self.refresh_metrics(), "metrics")
        self.supervise(self.resync(), "resync")
        self.notifier.notify("READY=1")
        log.info("controller.ready", plane=self.plane.name, host=self.host)
        while not self.stop.is_set():
            problem = self.health_problem()
            if problem is None:
                self.notifier.notify("WATCHDOG=1")
            elif problem != self.unhealthy:
                log.error("watchdog.unhealthy", problem=problem)
            self.unhealthy = problem or ""
            running = sum(1 for s in self.units.values() if s.active_state == "active")
            line = (f"{len(self.docs)} sessions - {running} workers active - "
                    f"{len(self.server.connections)} linked - plane {self.plane.name}")
            self.notifier.notify(f"STATUS={'unhealthy: ' + problem + ' - ' if problem else ''}"
                                 f"{line}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 2.0)
        self.notifier.notify("STOPPING=1")
        log.info("controller.stopping")
        await self.server.close()
        await self.admin.close()  # admin socket (controller/admin.py)
        if self.metrics_server is not None:
            await self.metrics_server.close()
        for task in [*self.supervised, *self.tasks]:
            task.cancel()
        await asyncio.gather(*self.supervised, *self.tasks, return_exceptions=True)
        await self.plane.close()
        await self.systemd.close()
        log.info("controller.stopped", exit_code=int(self.exit_code))
        return int(self.exit_code)


async def _amain(cfg: config.Config) -> int:
    plane = choose_plane(cfg)
    systemd = Systemd()
    code = await Controller(cfg, plane, systemd).run()
    # the package is being removed (packaging/debian/prerm): say so on the documents
    from controller.retire import retire_if_requested  # noqa: PLC0415 - one merge-friendly hunk

    await retire_if_requested(cfg, lambda: choose_plane(cfg))
    return code


def main(argv: list[str] | None = None) -> int:
    del argv
    try:
        cfg = config.load()
    except ConfigError as exc:
        sys.stderr.write(f"wabridge-controller: {exc}\n")
        return int(ExitCode.CONFIG)
    logs.setup("wabridge-controller", cfg.log.level, cfg.log.format)
    try:
        return asyncio.run(_amain(cfg))
    except WabridgeError as exc:
        log.error("controller.failed", code=exc.code, error=str(exc))
        return int(exc.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
