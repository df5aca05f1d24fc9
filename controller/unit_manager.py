"""The unit-manager boundary: what the controller needs of systemd, and what it gets back.

``UnitManager`` is the interface the controller core talks to; ``controller.systemd.Systemd``
implements it over D-Bus (pystemd), ``tests/fakes/units.py`` in memory for the controller's
own tests through ``Controller.run()``. Everything crossing it is plain Python: ``UnitState``
snapshots in, unit names out, ``SystemdError`` for a request that did not succeed. The pure
decisions see a unit through ``controller.reconcile.UnitView``, built from a ``UnitState``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from wabridge.errors import WabridgeError

#: Unit states in which the unit's main process runs or is being started: a worker is there
#: (or about to be) to answer. systemd's other states: deactivating, inactive, failed.
RUNNING_UNIT_STATES = frozenset({"active", "activating", "reloading"})
#: ... and states in which a process may still exist (a stop takes up to TimeoutStopSec=).
PROCESS_UNIT_STATES = RUNNING_UNIT_STATES | {"deactivating"}

NO_SUCH_UNIT = "no_such_unit"
UNAVAILABLE = "unavailable"
FAILED = "failed"

_EXPLAIN = {
    NO_SUCH_UNIT: "is the wabridge-worker@.service template installed? (systemctl daemon-reload)",
    UNAVAILABLE: "systemd's D-Bus API is not reachable: is the system bus running?",
    FAILED: "systemd refused the request; see the journal of the unit",
}


@dataclasses.dataclass(frozen=True)
class UnitState:
    """A snapshot of one unit, read from systemd."""

    unit: str
    user_id: str  # "" for a unit that is not a worker unit
    active_state: str  # active, activating, deactivating, inactive, failed, reloading
    sub_state: str
    main_pid: int  # in systemd's PID namespace; 0 if none
    n_restarts: int
    result: str  # success, exit-code, signal, timeout, core-dump, watchdog, start-limit-hit, ...
    exec_main_code: int  # CLD_EXITED=1, CLD_KILLED=2, CLD_DUMPED=3 (0: not exited yet)
    exec_main_status: int  # exit code or signal number
    status_text: str  # what the worker last sent with STATUS=
    memory_bytes: int | None  # MemoryCurrent; None when not accounted
    cpu_nsec: int | None  # CPUUsageNSec
    tasks: int | None  # TasksCurrent
    since_usec: int  # realtime usec: ActiveEnterTimestamp if active, else StateChangeTimestamp
    load_state: str = "loaded"  # systemd's LoadState, or "unloaded" (see controller.systemd)
    invocation_id: str = ""  # hex; a new one per start (automatic restarts included)
    start_limit_burst: int = 0  # StartLimitBurst= (see reconcile.hit_start_limit)
    # From the exit report of the invocation (see "Exit reports" in controller.systemd); None
    # when there is none for this invocation (running, or the report could not be read).
    oom_kills: int | None = None
    control_group: str = ""  # e.g. /wabridge.slice/wabridge-worker@alice.service
    job_pending: bool = False  # a job is queued for the unit (e.g. StartUnit not yet run)


class SystemdError(WabridgeError):
    """A systemd request that did not succeed.

    ``code`` is one of ``no_such_unit`` (no such unit file / unit not loaded), ``unavailable``
    (the bus or systemd cannot be reached; retry later) and ``failed`` (anything else).
    """

    code = FAILED
    explanation = _EXPLAIN[FAILED]

    def __init__(
        self, code: str, message: str, *, unit: str | None = None, dbus_error: str = ""
    ) -> None:
        super().__init__(message, explanation=_EXPLAIN.get(code, ""))
        self.code = code
        self.unit = unit
        self.dbus_error = dbus_error


class UnitManager(Protocol):
    """What the controller asks of systemd. Every call but ``subscribe`` may raise
    ``SystemdError``; calls reach systemd in the order they are made."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def subscribe(self, callback: Callable[[UnitState], None]) -> None:
        """Call ``callback`` on the event loop with every new state of a worker unit."""

    @property
    def signals_alive(self) -> bool:
        """Whether unit states still arrive (or are being restored): the watchdog's check."""

    async def list_workers(self) -> list[UnitState]:
        """Every worker unit systemd has loaded."""

    async def loaded_state(self, unit: str) -> UnitState | None:
        """A fresh state of a loaded unit (None: not loaded), accounting included."""

    async def reset_failed(self, unit: str) -> None: ...

    async def install_dropin(self, unit: str, text: str) -> bool:
        """Write the unit's wabridge drop-in before a start; True when it changed."""

    async def start(self, unit: str) -> None: ...

    async def restart(self, unit: str) -> None: ...

    async def stop(self, unit: str) -> None: ...

    async def unit_for_pid(self, pid: int) -> str | None:
        """The unit a process (PID in systemd's namespace) belongs to; None: none."""
