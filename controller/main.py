"""``wabridge-controller``: control plane -> systemd units; worker reports -> control plane.

Workers are not children of the controller: they are units of their own, so a controller
restart leaves them running; at start-up the controller rebuilds its view from systemd and the
control plane and reconciles (``controller.reconcile``).

The core reads as: an event (a document change, a unit state, a worker frame) updates the
user's ``UserState``; a pure function of ``controller.reconcile`` plans from that state; the
controller carries the plan out, one user at a time (``execute``).

Over 600 lines because carrying out the plan (claims, starts with their slots, the drop-in's
settings, key and database role), the worker frames and the lifecycle are read together; the
decisions are in ``controller.reconcile`` and the per-user record in ``controller.users``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sdnotify

from controller import (
    admin,  # wabridgectl's admin socket
    pg_roles,
)
from controller import fleet as fl  # fleet.enabled: this host among others
from controller import metrics as mx  # today's usage (billing) beside the metrics
from controller import reconcile as rc
from controller.metrics import FleetSnapshot, MetricsServer, WorkerFigures, own_rss_bytes
from controller.plane import CONTROLLER, WORKER, AccountDoc, ControlPlane, Removed, error_field
from controller.planes import choose_plane
from controller.server import WorkerServer, limit_accept_errors
from controller.slots import SlotLedger, on_api_engine
from controller.systemd import EXIT_REPORTS, Systemd, api_key_file, read_exit_report, worker_dropin
from controller.unit_manager import (
    PROCESS_UNIT_STATES,
    RUNNING_UNIT_STATES,
    SystemdError,
    UnitManager,
    UnitState,
)
from controller.users import Column, UserState
from wabridge import config, logs, postgres, protocol
from wabridge.errors import ConfigError, ExitCode, PolicyError, WabridgeError
from wabridge.status import REQUESTS, RUNNING_STATUSES, DocStatus, doc_status_for
from wabridge.units import system_user_name, worker_unit

log = logs.get("controller")
START_SLOT_TIMEOUT = 90.0  # a start slot is given back by then even if no state arrives


def worker_limits(cfg: config.Config) -> dict[str, str]:
    """Resource settings of every worker unit, from ``worker.*`` (empty: the unit file's)."""
    return {"MemoryMax": cfg.worker.memory_max, "MemoryHigh": cfg.worker.memory_high,
            "TasksMax": cfg.worker.tasks_max, "CPUQuota": cfg.worker.cpu_quota}


class Controller:
    def __init__(self, cfg: config.Config, plane: ControlPlane, systemd: UnitManager) -> None:
        self.cfg = cfg
        self.plane = plane
        self.systemd = systemd
        self.host = cfg.controller.host_id or socket.gethostname()
        self.users: dict[str, UserState] = {}
        self.docs: Mapping[str, AccountDoc] = Column(self.users, lambda s: s.doc)
        self.units: Mapping[str, UnitState] = Column(self.users, lambda s: s.unit)
        self.server = WorkerServer(cfg.controller.socket, systemd.unit_for_pid, self.on_frame,
                                   self.settings_for,
                                   SlotLedger.for_host(cfg.claude.host_max_processes,
                                                       self.running_workers))
        self.watchers = admin.DocWatchers()  # wabridgectl watch/link --follow
        self.admin = admin.AdminServer(cfg.controller.admin_socket, admin.ControllerFacade(self),
                                       group=cfg.controller.admin_group)
        self.exit_code = ExitCode.OK
        self.supervised: set[asyncio.Task[None]] = set()  # long-running: one ends, we exit
        self.unhealthy = ""
        self.notifier = sdnotify.SystemdNotifier()
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.metrics_server: MetricsServer | None = None
        # at most controller.max_starting units activating at once (see start_slot)
        self.start_slots = asyncio.Semaphore(cfg.controller.max_starting)
        self.loaded = False  # documents read and reconciled: unit events may act
        # fleet.enabled: leases and placement in PostgreSQL (controller/fleet.py); None: every
        # account is this host's, as on a single host
        self.fleet = (fl.open_fleet(cfg, self.host, lambda: pg_roles.admin_connect(cfg))
                      if cfg.fleet.enabled else None)
        # PostgreSQL could not prepare these accounts: their next try (_store_unavailable)
        self.store_backoff: dict[str, float] = {}
        self.store_retries: set[str] = set()

    def running_workers(self) -> tuple[int, int]:
        """Worker units holding memory now (starting, running or stopping), and how many of
        them are on the ``api`` engine: what the default Claude budget leaves room for
        (``controller.slots.default_budget``)."""
        running = [u for u, s in self.units.items()
                   if s.active_state not in ("inactive", "failed")]
        on_api = sum(1 for u in running if on_api_engine(
            rc.worker_settings(self.docs.get(u)), self.cfg.claude.engine))
        return len(running), on_api

    def user(self, user_id: str) -> UserState:
        state = self.users.get(user_id)
        if state is None:
            state = self.users[user_id] = UserState(user_id)
        return state

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
    def set_doc(self, user_id: str, doc: AccountDoc | None) -> AccountDoc | None:
        """Replace (None: drop) the view of one document; tells its admin watchers. Returns
        the previous view."""
        state = self.user(user_id)
        old, state.doc = state.doc, doc
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
    def on_change(self, change: AccountDoc | Removed) -> None:
        if isinstance(change, Removed):
            self.set_doc(change.user_id, None)
            if change.user_id in self.units:
                self.spawn(self.execute(change.user_id, self.plan_unit))
            return
        old = self.set_doc(change.user_id, change)
        settings = rc.for_settings(old, change, self.users[change.user_id].view)
        if settings:
            self.spawn(self.execute(change.user_id, lambda _uid: settings))
        self.spawn(self.handle_doc(change.user_id))

    async def handle_doc(self, user_id: str) -> None:
        await self.execute(user_id, self.plan_doc)

    def plan_doc(self, user_id: str) -> list[rc.Action]:
        user = self.user(user_id)
        if user.doc is None:
            return []
        if self.fleet is not None and not self.handles_here(self.fleet, user_id, user.doc):
            return []
        return rc.for_doc(user.doc, user.view)

    def handles_here(self, fleet: fl.Fleet, user_id: str, doc: AccountDoc) -> bool:
        """In a fleet: whether this host acts on the document now. A request is the business
        of the host the plan gives the account (the claim is a transaction: two hosts acting
        on a stale plan cannot both win it); a stop of the host whose worker runs it, or of
        any host when none holds its lease."""
        unit = self.users[user_id].view
        if unit is not None and unit.running and user_id not in fleet.away:
            return True
        snap = fleet.snapshot
        lease = snap.leases.get(user_id) if snap is not None else None
        if doc.status in (DocStatus.DESTROY_REQUESTED, DocStatus.STOPPING):
            return not fl.held_by_other(lease, self.host)
        if doc.status in REQUESTS:
            return fleet.owner(user_id, self.docs) == self.host
        return True

    def plan_unit(self, user_id: str) -> list[rc.Action]:
        user = self.user(user_id)
        if user.unit is None or rc.predates_start(user.start_mark, user.unit_events):
            return []
        if self.fleet is not None and self.fleet.lost(user.unit):
            return []  # the account went (or is going) elsewhere: its document is not ours
        return rc.for_unit(user.doc, user_id, rc.view_of(user.unit))

    def on_unit(self, state: UnitState) -> None:
        user = self.user(state.user_id)
        user.unit = state
        user.unit_events += 1
        if user.starting is not None and rc.start_settled(state):
            user.starting.set()
        if user.gone is not None and state.active_state not in PROCESS_UNIT_STATES:
            user.gone.set()
        if not self.loaded:
            # Documents are not read yet: a unit without a known document is not an orphan
            # until they are. The start-up reconcile sees this state.
            return
        if (self.fleet is not None and state.active_state in ("inactive", "failed")
                and state.user_id not in self.fleet.away):
            self.spawn(self.unit_ended_in_fleet(self.fleet, state.user_id))
        else:
            self.spawn(self.execute(state.user_id, self.plan_unit))
        key = (state.main_pid, state.active_state, state.n_restarts)
        self.spawn(self.write_process(state, force=user.process_key != key))

    async def unit_ended_in_fleet(self, fleet: fl.Fleet, user_id: str) -> None:
        """A worker of this host ended: its account may be another host's by now (this host
        was frozen or cut off; its worker saw the lease gone and exited 17, or was stopped
        before it could say so). Only while no other host holds the lease does the end say
        anything about the document (stopped, crashed, an outcome)."""
        if await fleet.taken_elsewhere(user_id):
            return
        await self.execute(user_id, self.plan_unit)

    async def execute(self, user_id: str, plan: Callable[[str], list[rc.Action]]) -> None:
        """Run the actions ``plan(user_id)`` decides, one user at a time. The plan is made
        under the user's lock, from the documents and unit states known *then*: actions
        decided from an event that a later event (or an action of the previous holder of
        the lock) has made stale are never carried out."""
        async with self.user(user_id).lock:
            for action in plan(user_id):
                if not await self._do(action):
                    return

    async def _do(self, action: rc.Action) -> bool:
        """Carry one action out; False: the rest of the plan must not be."""
        match action:
            case rc.Claim(user_id=uid, expect=expect, new=new):
                return await self._claim(uid, expect, new)
            case rc.Start(user_id=uid, reset_failed=reset, restart=restart):
                return await self._start(uid, reset=reset, restart=restart)
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
                log.warning("account.error", user_id=uid, code=code, message=message,
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

    async def _claim(self, uid: str, expect: frozenset[DocStatus], new: DocStatus) -> bool:
        ok = await self.claim(uid, expect, new)
        if ok:
            log.info("account.claimed", user_id=uid, status=new.value)
            user = self.user(uid)
            active = user.unit.active_state if user.unit is not None else None
            if rc.awaits_new_worker(new, expect, active):
                user.requested_at = time.monotonic()
            replay = rc.replayed_status(new, expect, active, user.last_report)
            if replay is not None:  # unless a client's new request got there first
                await self.set_status(uid, replay, frozenset({DocStatus.STARTING}))
        return ok

    async def _start(self, uid: str, *, reset: bool, restart: bool) -> bool:
        unit = worker_unit(uid)
        user = self.user(uid)
        if uid in self.store_retries:  # PostgreSQL was unavailable: the retry will start it
            return False
        lease: dict[str, str] = {}
        settled: asyncio.Event | None = None
        if self.fleet is not None:
            # the lease first, inside a start slot (its time runs from the acquisition); a
            # restart stops the old process before: the lease is taken only with no worker
            # of this account running here
            if restart:
                await self.stop_and_wait(self.fleet, uid)
                restart = False
            taken = await self.take_lease(self.fleet, uid)
            if taken is None:
                return False
            lease, settled = taken
        try:
            if reset:
                with contextlib.suppress(SystemdError):
                    await self.systemd.reset_failed(unit)
            # the user's own dynamic user, the resource limits and the backend the document
            # asks for; fails closed
            try:
                # storage.backend = postgresql: the account's role and schema, a new password;
                # not for a no-op Start while ours is under way (the document's echo): the
                # password the starting worker loaded must stay its role's (in a fleet the
                # start is a real one: take_lease refused the others)
                pg_password = (
                    await asyncio.to_thread(pg_roles.prepare, self.cfg, uid)
                    if self.fleet is not None or rc.needs_start_slot(
                        restart, user.starting is not None, user.view)
                    else pg_roles.prepared(self.cfg, uid))
                dropin = self.dropin_for(uid, pg_password, lease)
            except pg_roles.StoreUnavailable as exc:
                if settled is not None:
                    settled.set()
                await self._store_unavailable(uid, exc, rc.Start(uid, reset, restart))
                return False
            except PolicyError as exc:
                if settled is not None:
                    settled.set()
                log.warning("account.error", user_id=uid, code=exc.code, error=str(exc))
                await self.write(uid, {"status": DocStatus.ERROR.value,
                                       "error": error_field(exc.code, str(exc))})
                return False
            await self.systemd.install_dropin(unit, dropin)
            if self.fleet is None:
                settled = (await self.start_slot(uid)
                           if rc.needs_start_slot(restart, user.starting is not None, user.view)
                           else None)
            try:
                await (self.systemd.restart(unit) if restart else self.systemd.start(unit))
            except SystemdError:
                if settled is not None:
                    settled.set()
                raise
            if settled is not None:
                # a state change is coming (see plan_unit); states delivered from now on
                # were read after the job was queued (one FIFO D-Bus thread)
                user.start_mark = user.unit_events
        except SystemdError as exc:
            await self.write(uid, {"status": DocStatus.ERROR.value,
                                   "error": error_field("start_failed", str(exc))})
            return False
        log.info("unit.start", user_id=uid, unit=unit)
        self.store_backoff.pop(uid, None)
        if rc.clears_error(user.doc, CONTROLLER):
            await self.write(uid, {"error": None})
        if self.fleet is not None and user.doc is not None and user.doc.host != self.host:
            await self.write(uid, {"host": self.host})  # the document says where it runs
        return True

    # --- fleet.enabled ------------------------------------------------------------------
    async def take_lease(self, fleet: fl.Fleet, uid: str
                         ) -> tuple[dict[str, str], asyncio.Event | None] | None:
        """A start slot and the account's lease for this host (None: do not start): the
        drop-in's environment for the worker, and the slot's event."""
        user = self.user(uid)
        if user.starting is not None or (user.view is not None and user.view.running):
            # a worker of it runs here, or is being started: it holds the lease, and a new
            # epoch would fence it out (a document's echo asks for a start again)
            return None
        settled = await self.start_slot(uid)
        try:
            epoch = await fleet.take(uid, postgres.account_role(uid), self.docs)
        except fl.FleetUnavailable as exc:
            log.warning("fleet.acquire_failed", user_id=uid, error=str(exc))
            epoch = None
        if epoch is None:
            if settled is not None:
                settled.set()
            return None
        return fl.lease_environment(self.host, epoch), settled

    async def stop_and_wait(self, fleet: fl.Fleet, uid: str,
                            timeout: float = START_SLOT_TIMEOUT) -> None:
        """Stop the account's worker here and wait until no process of it is left (its
        unit's state, as systemd reports it); its states meanwhile say nothing about the
        document (a restart in a fleet: stop, take the lease again, start)."""
        user = self.user(uid)
        if user.unit is None or user.unit.active_state not in PROCESS_UNIT_STATES:
            return
        fleet.away.add(uid)
        gone = user.gone = asyncio.Event()  # set by on_unit
        with contextlib.suppress(SystemdError):
            await self.systemd.stop(worker_unit(uid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), timeout)
        user.gone = None

    def start_here(self, user_id: str) -> None:
        """The fleet loop's start of an account the plan gives this host."""
        async def start(fleet: fl.Fleet) -> None:
            try:
                view = self.user(user_id).view
                failed = view is not None and view.active_state == "failed"
                await self.execute(user_id, lambda uid: [rc.Start(uid, reset_failed=failed)])
            finally:
                fleet.started(user_id)

        if self.fleet is not None:
            self.spawn(start(self.fleet))

    def handle_request(self, user_id: str) -> None:
        self.spawn(self.handle_doc(user_id))

    def stop_here(self, user_id: str) -> None:
        """The fleet loop's stop of an account that goes to another host: the worker
        finishes its turn, commits and releases its lease; its unit's states from now on do
        not touch the document (the new host's do)."""
        async def stop() -> None:
            log.info("unit.stop", user_id=user_id, reason="moved")
            with contextlib.suppress(SystemdError):
                await self.systemd.stop(worker_unit(user_id))

        self.spawn(stop())

    async def _store_unavailable(self, uid: str, exc: pg_roles.StoreUnavailable,
                                 start: rc.Start) -> None:
        """PostgreSQL cannot prepare the account (down, unreachable, refusing us): no worker
        is started that could not open its store. The document keeps its status and says
        why (``store_unavailable``, naming the cause); the start is tried again with backoff
        (``pg_roles.retry_delay``) while the document still wants a worker, until the
        database answers; then the error is cleared."""
        delay = self.store_backoff[uid] = pg_roles.retry_delay(self.store_backoff.get(uid, 0.0))
        log.warning("account.store_unavailable", user_id=uid, retry_in=delay, error=str(exc))
        doc = self.docs.get(uid)
        if doc is not None and doc.status in RUNNING_STATUSES - {DocStatus.STARTING}:
            await self.set_status(uid, DocStatus.STARTING, RUNNING_STATUSES)  # no worker yet
        await self.write(uid, {"error": error_field(
            exc.code, f"{exc} (the worker is started once it answers; next try in "
            f"{delay:.0f} s)")})
        if uid in self.store_retries:
            return
        self.store_retries.add(uid)

        async def retry() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)

            def plan(_uid: str) -> list[rc.Action]:
                self.store_retries.discard(uid)  # under the user's lock: this is the retry
                return rc.retried_start(self.user(uid).doc, self.user(uid).view, start)

            if not self.stop.is_set():
                await self.execute(uid, plan)

        self.spawn(retry())

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
        user = self.user(user_id)
        if user.starting is not None:
            user.starting.set()
        user.starting = settled

        async def give_back() -> None:
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(settled.wait(), START_SLOT_TIMEOUT)
            finally:
                if user.starting is settled:
                    user.starting = None
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
            log.info("account.status_not_written", user_id=user_id, status=new.value)
        return ok

    def dropin_for(self, user_id: str, postgres_password: Path | None = None,
                   lease: Mapping[str, str] | None = None) -> str:
        """The unit's drop-in for this user (``lease``: a fleet's host and lease epoch);
        raises ``PolicyError`` for a bad backend or a bad ``apiKeyRef``."""
        doc = self.docs.get(user_id)
        settings = doc.settings if doc is not None else {}
        return worker_dropin(system_user_name(user_id), worker_limits(self.cfg),
                             {**rc.worker_environment(settings), **(lease or {})},
                             api_key_file(settings), postgres_password)

    async def write_process(self, state: UnitState, *, force: bool = False) -> None:
        """The document's ``process`` field: on every change of PID/state/restarts, else at
        most once per ``controller.metrics_interval`` (Firestore: ~1 write/s per document)."""
        now = time.monotonic()
        user = self.user(state.user_id)
        if not force and now - user.process_written_at < self.cfg.controller.metrics_interval:
            return
        if user.doc is None or (self.fleet is not None and state.user_id in self.fleet.away):
            return
        user.process_written_at = now
        user.process_key = (state.main_pid, state.active_state, state.n_restarts)
        await self.write(state.user_id, {"process": rc.process_fields(state)})

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
                user = self.user(user_id)
                if rc.stale_report(self.server.connected_since.get(user_id, 0.0),
                                   user.requested_at):
                    log.info("worker.stale_state", user_id=user_id, state=state.value)
                    return
                user.last_report = doc_status_for(state)
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
                    await self.plane.put_link_record(user_id, {
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
                self.user(user_id).reported = {
                    **mx.with_usage(self.user(user_id).reported),
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

            case protocol.Usage():  # a day's absolute totals: a resent frame bills nothing twice
                await self.plane.put_usage(user_id, frame)
                user = self.user(user_id)
                user.reported = {**user.reported, **mx.with_usage(user.reported, frame)}

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
                user = self.user(user_id)
                current = user.unit
                if fresh is None or current is None or (
                        fresh.invocation_id != current.invocation_id):
                    continue  # changed meanwhile: the unit signal brings the new state
                merged = dataclasses.replace(current, memory_bytes=fresh.memory_bytes,
                                             cpu_nsec=fresh.cpu_nsec, tasks=fresh.tasks)
                user.unit = merged
                self.spawn(self.write_process(merged))

    def snapshot(self) -> FleetSnapshot:
        """What ``GET /metrics`` shows (controller.metrics.render)."""
        workers = []
        for uid, user in list(self.users.items()):
            if not user.known:
                continue
            unit, doc = user.unit, user.doc
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
                reported=user.reported,
            ))
        return FleetSnapshot(workers=tuple(workers), controller_memory_bytes=own_rss_bytes(),
                             plane=self.plane.name,
                             hosts=self.fleet.figures() if self.fleet is not None else None)

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
                                                      in RUNNING_UNIT_STATES):
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
            self.user(state.user_id).unit = state
        for doc in await self.plane.list_accounts():
            self.set_doc(doc.user_id, doc)
        if self.fleet is not None:
            await self.fleet.open()  # registered, and the plan's first snapshot (or logged)
        actions = rc.reconcile(self.docs, {u: rc.view_of(s) for u, s in self.units.items()},
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
        if self.fleet is not None:
            self.supervise(self.fleet.heartbeat_loop(), "fleet-heartbeat")
            self.supervise(self.fleet.placement_loop(self), "fleet")
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
            line = (f"{len(self.docs)} accounts - {running} workers active - "
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
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.close)
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
