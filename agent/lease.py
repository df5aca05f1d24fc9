"""A fleet worker's hold on its account (``fleet.enabled``): the lease the controller won for
this host (``wabridge.fleet_db``), kept alive by the worker itself so it keeps answering while
its controller is down.

- :meth:`LeaseKeeper.verify` at start, before the store is opened and long before WhatsApp:
  one renewal; a lease that is not this host's and epoch any more, or released, raises
  :class:`~wabridge.errors.LeaseLost` (exit 17, not restarted).
- :meth:`LeaseKeeper.run` (a supervised task) runs a daemon thread that renews every
  ``fleet.renew_seconds`` on the database's clock (neither a hung server nor a stalled event
  loop holds the other up) and remembers when the last successful renewal was *sent*
  (monotonic: the conservative end). The lease is lost when a renewal says so, or when
  ``agent.lease_verdict`` says it may run out (renewals failing, or the host frozen).
- :meth:`LeaseKeeper.check`, right before every WhatsApp send: the same verdict, now.
- :meth:`LeaseKeeper.release`, at a clean stop (WhatsApp disconnected, everything committed):
  the next owner need not wait for expiry and grace.

Losing the lease calls ``on_lost`` once (the worker disconnects WhatsApp and exits 17); the
store's fenced writes (``agent.store_postgres``) report a refusal the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable

import psycopg

from agent.daemon_thread import await_thread
from agent.lease_verdict import Verdict, lease_verdict
from agent.store import PostgresTarget
from wabridge import fleet_db, logs, postgres, units
from wabridge.config import FleetConfig
from wabridge.errors import ExitCode, LeaseLost

log = logs.get("agent.lease")

#: How often the supervised task looks at the verdict.
TICK = 0.2
#: After a failed renewal, try again this soon (or at the usual interval, if shorter).
RETRY = 1.0
#: A renewal or release statement the server has not answered by then is given up (the
#: verdict decides what that means); the release waits as long at most.
STATEMENT_TIMEOUT_MS = 3000
RELEASE_WAIT = 2.0
#: Once the lease is lost, WhatsApp must be disconnected within half the margin (at most
#: this long), else the process is ended (``LeaseKeeper._watch``).
HARD_STOP_MAX = 2.0


def holder_from_environment(user_id: str, environ: dict[str, str] | None = None
                            ) -> fleet_db.Holder:
    """The lease this worker was started under (the drop-in's ``WABRIDGE_HOST_ID`` and
    ``WABRIDGE_LEASE_EPOCH``). A worker started without one (by hand, or by an older
    controller) owns nothing: :class:`LeaseLost`, before anything is opened."""
    found = units.lease_from_environment(os.environ if environ is None else environ)
    if found is None:
        raise LeaseLost(f"fleet.enabled, but no lease in the environment "
                        f"({units.HOST_ID_ENV}, {units.LEASE_EPOCH_ENV})",
                        explanation="a fleet worker is started by its host's controller after "
                        "it won the account's lease; start it with wabridgectl, not systemctl")
    host_id, epoch = found
    return fleet_db.Holder(user_id, host_id, epoch)


class LeaseKeeper:
    def __init__(self, holder: fleet_db.Holder, target: PostgresTarget, fleet: FleetConfig,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.holder = holder
        self.target = target
        self.fleet = fleet
        self.on_lost: Callable[[str], None] = lambda _reason: None
        self.lost = ""  # why the lease is gone, once it is
        self.last_ok = float("-inf")  # monotonic: when the last good renewal was sent
        self.renewals = 0
        self._clock = clock
        self._conn: postgres.Connection | None = None
        self._busy = threading.Lock()  # one statement at a time on the connection
        self._losing = threading.Lock()  # the loop and the renewal thread may both find it
        #: set by the worker once WhatsApp is disconnected (see :meth:`_watch`)
        self.disconnected = threading.Event()
        self.hard_stop_after = min(HARD_STOP_MAX, fleet.margin_seconds / 2)

    # --- the database (blocking: daemon threads, or before the loop serves anything) -------
    def _connection(self) -> postgres.Connection:
        if self._conn is not None and not self._conn.usable:
            self._drop()
        if self._conn is None:
            conn = postgres.connect(self.target.conninfo, self.target.schema,
                                    password=self.target.password)
            conn.raw.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _renew(self) -> bool:
        h = self.holder
        with self._busy:
            try:
                return fleet_db.renew(self._connection(), h.user_id, h.host_id, h.epoch,
                                      self.fleet.lease_seconds)
            except psycopg.Error:
                self._drop()  # a fresh connection next time
                raise

    def _release(self) -> bool:
        h = self.holder
        with self._busy:
            try:
                return fleet_db.release(self._connection(), h.user_id, h.host_id, h.epoch)
            finally:
                self._drop()

    def close(self) -> None:
        with self._busy:
            self._drop()

    # --- the decisions ---------------------------------------------------------------------
    def verify(self) -> None:
        """At start (blocking; nothing else runs yet): renew once, or :class:`LeaseLost`."""
        sent = self._clock()
        if not self._renew():
            self.lost = (f"lease of {self.holder.user_id!r} is not {self.holder.host_id}'s "
                         f"epoch {self.holder.epoch} any more (taken over or released)")
            raise LeaseLost(self.lost)
        self.last_ok, self.renewals = sent, 1
        log.info("lease.held", host_id=self.holder.host_id, epoch=self.holder.epoch)

    def lose(self, reason: str) -> None:
        """The lease is gone (any thread): tell the worker, once."""
        with self._losing:
            if self.lost:
                return
            self.lost = reason
        log.error("lease.lost", host_id=self.holder.host_id, epoch=self.holder.epoch,
                  reason=reason)
        self.on_lost(reason)

    def holds(self) -> bool:
        """Whether the lease is surely still ours now (else it is declared lost)."""
        if self.lost:
            return False
        now = self._clock()
        if lease_verdict(now, self.last_ok, self.fleet.lease_seconds,
                         self.fleet.margin_seconds) is Verdict.STOP:
            self.lose(f"not renewed for {now - self.last_ok:.1f} s (limit: lease "
                      f"{self.fleet.lease_seconds:g} s - margin {self.fleet.margin_seconds:g} s)")
            return False
        return True

    def check(self) -> None:
        """Right before a WhatsApp send: :class:`LeaseLost` unless :meth:`holds`."""
        if not self.holds():
            raise LeaseLost(self.lost)

    # --- the renewals --------------------------------------------------------------------
    def _renew_forever(self, halt: threading.Event) -> None:
        """The renewal thread: every ``renew_seconds`` (sooner again after a failure) until
        ``halt`` or a renewal that says the lease is gone. A thread, not a coroutine: a
        stalled event loop (a slow import, a long synchronous call) must not starve the
        renewals; a frozen process stops every thread alike, which the verdict catches."""
        every = self.fleet.renew_seconds
        next_at = self.last_ok + every
        while not halt.wait(max(0.0, next_at - self._clock())):
            if not self.holds():
                # The window closed (the host was frozen, or renewals kept failing): give
                # up, even though a renewal might still succeed now. Another host may have
                # been told the account is free; stopping is the answer it relies on.
                return
            sent = self._clock()
            try:
                ok = self._renew()
            except psycopg.Error as exc:  # the server's trouble: try again soon
                log.warning("lease.renew_failed", error=str(exc).strip() or type(exc).__name__,
                            since_ok=round(self._clock() - self.last_ok, 1))
                next_at = self._clock() + min(RETRY, every)
                continue
            if not ok:
                self.lose("the lease was taken over or released")
                return
            self.last_ok = max(self.last_ok, sent)
            self.renewals += 1
            next_at = sent + every

    def _watch(self, halt: threading.Event) -> None:
        """The fail-stop thread: it never waits on the server, so it sees the verdict even
        while the renewal thread and the event loop are both stuck in calls to an
        unreachable one. Once the lease is lost, WhatsApp must be disconnected within
        ``hard_stop_after``; a worker that cannot (its loop stuck in such a call) is ended
        here and the kernel closes its sockets: another host may connect soon."""
        while not halt.wait(TICK):
            if self.holds():
                continue
            if self.disconnected.wait(self.hard_stop_after):
                return
            log.error("lease.fail_stop", reason=self.lost,
                      seconds=round(self.hard_stop_after, 2))
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(int(ExitCode.LEASE_LOST))

    async def run(self, stop: asyncio.Event) -> None:
        """The supervised task: runs the renewal and fail-stop threads and watches the
        verdict until ``stop``, or until the lease is lost (then it returns: the worker is
        stopping). The fail-stop thread outlives a stop: a lost lease is watched until
        WhatsApp is disconnected."""
        halt, unwatch = threading.Event(), threading.Event()
        threads = [threading.Thread(target=self._renew_forever, args=(halt,),
                                    name="lease-renew", daemon=True),
                   threading.Thread(target=self._watch, args=(unwatch,), name="lease-watch",
                                    daemon=True)]
        for thread in threads:
            thread.start()
        try:
            while not stop.is_set():
                if not self.holds():
                    return
                if not all(t.is_alive() for t in threads):
                    raise RuntimeError("a lease thread ended")  # a bug: exit 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), TICK)
        finally:
            halt.set()
            if not self.lost:
                unwatch.set()

    async def release(self) -> bool:
        """A clean stop's last word; False when the lease was not ours any more or the
        server did not answer in time (the lease then simply expires)."""
        if self.lost:
            return False
        try:
            released = await await_thread(self._release, RELEASE_WAIT, "lease-release")
        except (TimeoutError, psycopg.Error) as exc:
            log.warning("lease.release_failed", error=str(exc).strip() or type(exc).__name__)
            return False
        log.info("lease.released", host_id=self.holder.host_id, epoch=self.holder.epoch,
                 released=released)
        return released
