"""The controller's systemd adapter: start/stop worker units and watch their state over D-Bus.

Over 600 lines because it is the one adapter of pystemd: the thread-confined call bus, the
signal bus and its coalescing, exit reports and drop-ins all live with the binding's pitfalls
recorded below (about 120 lines of this docstring), and change together when it does.

This is the only module of the controller that imports pystemd. ``Systemd`` implements the
unit-manager boundary (``controller.unit_manager.UnitManager``); everything it hands out is
plain Python (``UnitState``, ``SystemdError``, defined there), so the core never sees sd-bus
types.

Threads and buses
-----------------
sd-bus connections are not thread-safe, so each connection here belongs to exactly one thread:

* **Method calls** (StartUnit, GetAll, ...) run on one dedicated worker thread
  (``ThreadPoolExecutor(max_workers=1)``) that owns its own bus connection, opened lazily in
  that thread and reopened after the connection is lost. One thread keeps calls in order
  (a stop issued after a start reaches systemd after it) and needs no locking.
* **Signals** arrive on a second connection owned by the event-loop thread: its fd is
  registered with ``loop.add_reader`` and every readable event runs ``sd_bus_process`` until
  the queue is empty. No thread waits for signals.

pystemd does not release the GIL while ``sd_bus_call`` waits for systemd's reply (there is
no ``nogil`` anywhere in ``dbuslib.pyx``), so while a call is in flight the event loop is
stalled too, worker thread or not. Calls to systemd normally answer in 0.3-3 ms (a
daemon-reload: ~50 ms), so this is acceptable; the worker thread still keeps the API
``async`` and the connection thread-confined, and would give real concurrency if the binding
ever released the GIL. A hung systemd blocks the loop for sd-bus' method-call timeout (25 s,
or ``$SYSTEMD_BUS_TIMEOUT``).

Signals and coalescing
----------------------
``subscribe()`` calls ``Manager.Subscribe()`` and matches ``PropertiesChanged`` (every unit
object path, filtered here to worker units and to the ``Unit``/``Service`` interfaces),
``UnitNew``, ``UnitRemoved`` and ``JobRemoved``. A start or stop emits ~10 such signals within
a few milliseconds; they are folded per unit until the unit has been quiet for
``coalesce_quiet_s`` (10 ms) or ``coalesce_window_s`` (50 ms) have passed since the first one,
then one fresh ``UnitState`` is read (GetUnit + 18 property Gets, ~1 ms) and handed to the
callbacks on the event-loop thread, unless it equals the last state delivered for that unit
(ignoring the accounting fields). Set both to 0.05 for a fixed 50 ms window.

systemd garbage-collects an inactive, non-failed unit right after it stops (``UnitRemoved``);
its state can then no longer be read without loading it again. Subscribers then get a state
built from the last ``PropertiesChanged`` values seen for it, with ``load_state="unloaded"``
(memory/cpu/tasks are None). Failed units stay loaded until ``reset_failed``.

If the signal connection drops (dbus-daemon restarted, systemd gone), it is re-established in
the background with back-off, and every loaded worker's state is delivered again so that
nothing missed during the gap stays stale.

Exit reports (OOM kills on cgroup v1)
-------------------------------------
On cgroup v1 systemd 252 cannot tell an OOM kill from any other SIGKILL (``Result=signal``),
and the unit's memory cgroup, whose ``memory.oom_control`` counts ``oom_kill``, is removed as
soon as the unit stops. The worker unit therefore runs a privileged one-line
``ExecStopPost=+/bin/sh ...`` that reads its own memory cgroup while it still exists (stop-post
runs in the unit's cgroup after the main process is gone) and writes
``/run/wabridge/exits/<unit>``: ``invocation=``, ``result=``, ``exit_code=``,
``exit_status=``, ``oom_kill=`` (``memory.events`` on cgroup v2). States of stopped, failed
or restarting units carry ``oom_kills`` from the report whose ``invocation`` is the unit's
current ``InvocationID`` (systemd keeps that id when it refuses a start for the start limit,
so the last real run's report still matches). No kernel log is needed (``/dev/kmsg`` is not
readable from a sandboxed controller, nor inside containers).

Per-instance drop-ins
---------------------
``install_dropin`` writes ``/run/systemd/system/<unit>.d/50-wabridge.conf`` (``User=``, the
resource limits) when its content changed. systemd reads drop-ins when it loads a unit, and
an instance that is not loaded (never started, or garbage-collected after it stopped) is
loaded by ``StartUnit``: no ``daemon-reload`` is needed for it. Only a unit still loaded with
an older drop-in (``NeedDaemonReload=yes``, e.g. a failed unit after a configuration change)
needs a reload; reloads are coalesced (one reload that starts after a caller's write serves
every caller waiting). A daemon-reload costs 0.1-0.7 s here with 0-200 loaded units and
blocks systemd meanwhile, which is why it is avoided. ``SetUnitProperties(runtime=True)``
would need no reload for the resource limits (it works on a template instance before its
first start), but cannot set ``User=``.

PIDs
----
systemd answers in PIDs of *its* PID namespace. ``unit_for_pid`` must be given such a PID.
In production and in the end-to-end tests the controller runs inside the same namespace as
systemd, so SO_PEERCRED PIDs of worker connections already match; a process outside (like
the adapter's own test) must translate a host PID first (last field of ``NSpid:`` in
``/proc/<host-pid>/status``).

Pitfalls of pystemd 0.15.3 that this module works around (keep them in mind when editing):

* ``match_signal`` stores the callback as a borrowed pointer: the Python callable must be
  kept alive by us for as long as the bus lives, or the process crashes.
* ``match_signal`` writes ``callback.metadata = {"userdata": ...}`` onto the callable itself,
  so one callable shared by several matches sees only the last userdata. Use one closure per
  match.
* ``DbusMessage.get_interface()`` returns the *path*; test signals with ``is_signal()``.
* ``DBus.process()`` hides sd_bus_process' return value; a NULL message and an empty one both
  report ``is_empty()``. sd-bus reads one message per read, so with a level-triggered reader
  stopping at the first empty result never strands data in the kernel buffer.
* ``DBus.close()`` frees the connection without clearing the pointer: call it exactly once.
  A ``DBus`` that is never closed leaks its fd (there is no ``__dealloc__``).
* On connection loss sd-bus closes the fd itself and delivers a local ``Disconnected``
  signal; the reader must be removed then.
* Error classes other than ``DBusBaseError`` blank ``err_name``; ``NoSuchUnit`` arrives as
  ``DBusNoSuchUnitError``, ``NoUnitForPID`` as a base error with its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pystemd import dbusexc
from pystemd.dbuslib import DBus, DBusAddress, apply_signature, path_decode, path_encode

from controller.unit_manager import FAILED, NO_SUCH_UNIT, UNAVAILABLE, SystemdError, UnitState
from wabridge import claude_cli, credentials, logs
from wabridge.errors import PolicyError
from wabridge.units import WORKER_PREFIX, WORKER_SUFFIX, user_of_unit

log = logs.get("controller.systemd")

T = TypeVar("T")

DEST = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER_IFACE = b"org.freedesktop.systemd1.Manager"
UNIT_IFACE = b"org.freedesktop.systemd1.Unit"
SERVICE_IFACE = b"org.freedesktop.systemd1.Service"
PROPS_IFACE = b"org.freedesktop.DBus.Properties"
UNIT_PATH_PREFIX = b"/org/freedesktop/systemd1/unit"
WORKER_PATTERN = f"{WORKER_PREFIX}*{WORKER_SUFFIX}"
_WORKER_PATH_PREFIX: bytes = path_encode(UNIT_PATH_PREFIX, WORKER_PREFIX.encode())
_LOCAL_IFACE = b"org.freedesktop.DBus.Local"
_NO_UNIT_FOR_PID = b"org.freedesktop.systemd1.NoUnitForPID"
_NO_SUCH_UNIT = b"org.freedesktop.systemd1.NoSuchUnit"
_UNSET = 2**64 - 1  # systemd's "no value" for uint64 accounting properties
_MAX_DISPATCH = 512  # messages handled per readable event before yielding to the loop
KILL_WHO = ("main", "control", "all")
_UNIT_PROPS = (
    b"Id",
    b"LoadState",
    b"ActiveState",
    b"SubState",
    b"ActiveEnterTimestamp",
    b"StateChangeTimestamp",
    b"InvocationID",
    b"StartLimitBurst",
    b"Job",
)
_STATE_PROPS = (b"ActiveState", b"SubState", b"StateChangeTimestamp")
_SERVICE_PROPS = (
    b"MainPID",
    b"NRestarts",
    b"Result",
    b"ExecMainCode",
    b"ExecMainStatus",
    b"StatusText",
    b"MemoryCurrent",
    b"CPUUsageNSec",
    b"TasksCurrent",
    b"ControlGroup",
)
UNLOADED = "unloaded"  # load_state of a state rebuilt from signals after systemd dropped the unit
EXIT_REPORTS = Path("/run/wabridge/exits")  # written by the worker unit's ExecStopPost=
RUNTIME_UNIT_DIR = Path("/run/systemd/system")
WORKER_DROPIN = "50-wabridge.conf"

# Errors meaning "the bus or systemd is not there", as pystemd classes and as errnos (pystemd
# raises a plain DBusBaseError for socket-level failures).
_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    dbusexc.DBusDisconnectedError,
    dbusexc.DBusConnectionRefusedError,
    dbusexc.DBusFileNotFoundError,
    dbusexc.DBusNoReplyError,
    dbusexc.DBusTimeoutError,
    dbusexc.DBusTimedOutError,
    dbusexc.DBusServiceUnknownError,
    dbusexc.DBusNameHasNoOwnerError,
    dbusexc.DBusNoServerError,
    dbusexc.DBusBadAddressError,
)
_UNAVAILABLE_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENOTCONN,
        errno.EPIPE,
        errno.ENOENT,
        errno.ETIMEDOUT,
        errno.ESHUTDOWN,
        errno.EBADF,
    }
)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def map_error(exc: BaseException, action: str, unit: str | None = None) -> SystemdError:
    """The one place where sd-bus/pystemd errors become ``SystemdError``."""
    if isinstance(exc, SystemdError):
        return exc
    name = _text(getattr(exc, "err_name", b""))
    if not name:  # pystemd blanks err_name on its subclasses; name it after the class
        name = type(exc).__name__
    err = -int(getattr(exc, "errno", 0) or 0)
    detail = _text(getattr(exc, "err_message", b"")) or str(exc).splitlines()[0]
    if isinstance(exc, dbusexc.DBusNoSuchUnitError) or name == _NO_SUCH_UNIT.decode():
        code = NO_SUCH_UNIT
    elif isinstance(exc, _UNAVAILABLE_TYPES) or (
        type(exc) is dbusexc.DBusBaseError
        and not getattr(exc, "err_name", b"")
        and err in _UNAVAILABLE_ERRNOS
    ):
        code = UNAVAILABLE
    else:
        code = FAILED
    target = f" {unit}" if unit else ""
    return SystemdError(code, f"systemd {action}{target}: {detail}", unit=unit, dbus_error=name)


def _int(props: dict[bytes, Any], key: bytes) -> int:
    value = props.get(key)
    return int(value) if isinstance(value, int) else 0


def _opt(props: dict[bytes, Any], key: bytes) -> int | None:
    value = props.get(key)
    if not isinstance(value, int) or value == _UNSET:
        return None
    return int(value)


def _job_id(value: object) -> int:
    """The id of the unit's ``Job`` property, ``(uo)``; 0 when no job is queued."""
    if isinstance(value, list | tuple) and value and isinstance(value[0], int):
        return int(value[0])
    return 0


def _hex_id(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, list | tuple) and all(isinstance(b, int) for b in value):
        return bytes(value).hex()
    return ""


def _build_state(
    unit: str, uprops: dict[bytes, Any], sprops: dict[bytes, Any], load_state: str | None = None
) -> UnitState:
    name = _text(uprops.get(b"Id")) or unit
    active = _text(uprops.get(b"ActiveState")) or "inactive"
    since = _int(uprops, b"ActiveEnterTimestamp") if active == "active" else 0
    return UnitState(
        invocation_id=_hex_id(uprops.get(b"InvocationID")),
        start_limit_burst=_int(uprops, b"StartLimitBurst"),
        unit=name,
        user_id=user_of_unit(name) or "",
        active_state=active,
        sub_state=_text(uprops.get(b"SubState")) or "dead",
        main_pid=_int(sprops, b"MainPID"),
        n_restarts=_int(sprops, b"NRestarts"),
        result=_text(sprops.get(b"Result")) or "success",
        exec_main_code=_int(sprops, b"ExecMainCode"),
        exec_main_status=_int(sprops, b"ExecMainStatus"),
        status_text=_text(sprops.get(b"StatusText")),
        memory_bytes=_opt(sprops, b"MemoryCurrent"),
        cpu_nsec=_opt(sprops, b"CPUUsageNSec"),
        tasks=_opt(sprops, b"TasksCurrent"),
        since_usec=since or _int(uprops, b"StateChangeTimestamp"),
        load_state=load_state or _text(uprops.get(b"LoadState")) or "loaded",
        control_group=_text(sprops.get(b"ControlGroup")),
        job_pending=_job_id(uprops.get(b"Job")) != 0,
    )


def read_exit_report(directory: Path, unit: str) -> dict[str, str]:
    """The last exit report of ``unit`` (``key=value`` lines); empty if there is none."""
    try:
        text = (directory / unit).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out = {}
    for line in text.splitlines()[:32]:
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def with_exit_report(st: UnitState, directory: Path | None) -> UnitState:
    """``st`` with ``oom_kills`` from its invocation's exit report, when it has ended."""
    ended = st.active_state in ("failed", "inactive") or st.sub_state == "auto-restart"
    if directory is None or not ended or not st.invocation_id:
        return st
    report = read_exit_report(directory, st.unit)
    if report.get("invocation") != st.invocation_id:
        return st
    try:
        kills = int(report.get("oom_kill", ""))
    except ValueError:
        return st
    return dataclasses.replace(st, oom_kills=kills)


_CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"),
                 Path("/sys/fs/cgroup"))
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_nsec(control_group: str, proc: Path = Path("/proc"),
                  roots: tuple[Path, ...] = _CGROUP_ROOTS) -> int | None:
    """CPU time of a cgroup's processes from ``/proc/PID/stat`` (their own time and that of
    children they reaped). For hosts where systemd has no cpuacct controller for the unit
    (CPUUsageNSec "[not set]"), e.g. cgroup v1 with ``cpu`` and ``cpuacct`` mounted apart."""
    if not control_group:
        return None
    for root in roots:
        procs = root / control_group.lstrip("/") / "cgroup.procs"
        try:
            pids = procs.read_text().split()
        except OSError:
            continue
        ticks = 0
        for pid in pids:
            try:
                stat = (proc / pid / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            fields = stat[stat.rfind(")") + 2:].split()
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        return ticks * 1_000_000_000 // _CLOCK_TICKS
    return None


def with_cpu_fallback(st: UnitState) -> UnitState:
    if st.cpu_nsec is not None or st.active_state not in ("active", "reloading", "deactivating"):
        return st
    return dataclasses.replace(st, cpu_nsec=proc_cpu_nsec(st.control_group))


def worker_dropin(user_name: str, limits: Mapping[str, str],
                  environment: Mapping[str, str] | None = None,
                  api_key: Path | None = None, postgres_password: Path | None = None) -> str:
    """The per-instance drop-in: the user's own dynamic user, the resource limits, the
    environment its document asks for (``controller.reconcile.worker_environment``), and the
    user's own Anthropic API key file if they have one (``api_key_file``), and its
    PostgreSQL role's password file (``controller.pg_roles.prepare``).

    ``limits`` maps unit settings (``MemoryMax``...) to values; empty values are left out, so
    the template's value applies. Environment values must be checked already (no quotes,
    backslashes or whitespace); ``%`` is escaped (systemd's specifiers). The key is handed
    over as a systemd credential: systemd reads the file (root-only) and puts a copy in this
    unit's own ``$CREDENTIALS_DIRECTORY``, readable by this unit's user only; it never enters
    an environment file or a unit file.
    """
    lines = [
        "# Written by wabridge-controller before it starts this unit; rewritten as needed.",
        "[Service]",
        f"User={user_name}",
    ]
    lines += [f"{key}={value}" for key, value in limits.items() if value]
    for key, value in (environment or {}).items():
        if any(c in value for c in '"\\') or any(c.isspace() for c in value):
            raise ValueError(f"{key}: {value!r} cannot be written into a unit file")
        lines.append(f'Environment="{key}={value.replace("%", "%%")}"')
    if api_key is not None:
        lines.append(f"LoadCredential={claude_cli.API_KEY_CREDENTIAL}:{api_key}")
    if postgres_password is not None:  # storage.backend = postgresql: its role's password
        lines.append(f"LoadCredential={credentials.POSTGRES_PASSWORD}:{postgres_password}")
    return "\n".join(lines) + "\n"


def api_key_file(settings: Mapping[str, Any], keys_dir: Path = claude_cli.API_KEYS_DIR,
                 ) -> Path | None:
    """The key file a user's ``settings.apiKeyRef`` names, or None when it names none.

    Raises ``PolicyError`` (``bad_setting``, shown on the document) for a reference that is
    not a plain file name or whose file is missing: systemd would refuse to start the unit
    (243/CREDENTIALS) and retry until its start limit."""
    ref = settings.get("apiKeyRef")
    if ref is None or ref == "":
        return None
    if not isinstance(ref, str) or not claude_cli.API_KEY_REF.fullmatch(ref):
        raise PolicyError(
            f"setting 'apiKeyRef': {ref!r} is not a key name",
            explanation=f"name a file in {keys_dir}: letters, digits, '.', '_', '-'")
    path = keys_dir / ref
    if not path.is_file():
        raise PolicyError(f"setting 'apiKeyRef': no key file {path}",
                          explanation=f"put the key in {path} (root, mode 0600)")
    return path


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o644)
    tmp.replace(path)
    return True


# ---------------------------------------------------------------- worker-thread functions
# Each takes the worker thread's bus as its first argument and runs only on that thread.


def _open_bus(address: str | None) -> DBus:
    bus = DBusAddress(address.encode()) if address else DBus()
    try:
        bus.open()
    except BaseException:
        bus.close()  # a half-opened sd_bus is allocated; free it
        raise
    return bus


def _manager(bus: DBus, method: bytes, signature: bytes = b"", *args: Any) -> Any:
    call_args = apply_signature(signature, list(args)) if signature else []
    return bus.call_method(DEST, MANAGER_PATH, MANAGER_IFACE, method, call_args).body


def _get(bus: DBus, path: bytes, iface: bytes, names: tuple[bytes, ...]) -> dict[bytes, Any]:
    # One Get per property: 15 Gets take ~0.6 ms, GetAll of Unit+Service (~400 properties,
    # some read from cgroupfs) ~2 ms.
    out = {}
    for name in names:
        args = apply_signature(b"ss", [iface, name])
        out[name] = bus.call_method(DEST, path, PROPS_IFACE, b"Get", args).body
    return out


def _read(bus: DBus, unit: str, path: bytes) -> tuple[dict[bytes, Any], dict[bytes, Any]]:
    """Read the properties of one unit as one consistent snapshot.

    The Gets are separate calls, so systemd may process a state change between them (seen:
    ActiveState "active" with the Service's Result already "exit-code"). systemd changes a
    unit's state and its service result in one step, so re-reading the state afterwards and
    retrying when it moved gives a consistent snapshot.
    """
    for _ in range(3):
        uprops = _get(bus, path, UNIT_IFACE, _UNIT_PROPS)
        if _text(uprops.get(b"LoadState")) != "loaded" or not unit.endswith(".service"):
            return uprops, {}
        sprops = _get(bus, path, SERVICE_IFACE, _SERVICE_PROPS)
        again = _get(bus, path, UNIT_IFACE, _STATE_PROPS)
        if all(again[k] == uprops[k] for k in _STATE_PROPS):
            break
    return uprops, sprops


def _w_version(bus: DBus) -> str:
    body = bus.call_method(
        DEST, MANAGER_PATH, PROPS_IFACE, b"Get", apply_signature(b"ss", [MANAGER_IFACE, b"Version"])
    ).body
    return _text(body)


def _w_load_state(bus: DBus, unit: str) -> UnitState:
    path = _manager(bus, b"LoadUnit", b"s", unit.encode())
    uprops, sprops = _read(bus, unit, path)
    return _build_state(unit, uprops, sprops)


def _w_loaded_state(bus: DBus, unit: str) -> UnitState | None:
    """The unit's state if systemd has it loaded, else None (never loads it)."""
    try:
        path = _manager(bus, b"GetUnit", b"s", unit.encode())
    except dbusexc.DBusNoSuchUnitError:
        return None
    uprops, sprops = _read(bus, unit, path)
    return _build_state(unit, uprops, sprops)


def _w_list_workers(bus: DBus) -> list[UnitState]:
    rows = _manager(bus, b"ListUnitsByPatterns", b"asas", [], [WORKER_PATTERN.encode()]) or []
    states = []
    for row in rows:
        unit, path = _text(row[0]), row[6]
        if user_of_unit(unit) is None:
            continue
        try:
            uprops, sprops = _read(bus, unit, path)
        except dbusexc.DBusNoSuchUnitError:
            continue  # went away between the listing and the read
        states.append(_build_state(unit, uprops, sprops))
    return states


def _w_need_reload(bus: DBus, unit: str) -> bool:
    """Whether a loaded unit has changed on disk since it was loaded (False if not loaded)."""
    try:
        path = _manager(bus, b"GetUnit", b"s", unit.encode())
    except dbusexc.DBusNoSuchUnitError:
        return False
    return bool(_get(bus, path, UNIT_IFACE, (b"NeedDaemonReload",))[b"NeedDaemonReload"])


def _w_unit_for_pid(bus: DBus, pid: int) -> str | None:
    try:
        path = _manager(bus, b"GetUnitByPID", b"u", pid)
    except dbusexc.DBusBaseError as exc:
        if getattr(exc, "err_name", b"") == _NO_UNIT_FOR_PID:
            return None
        raise
    body = bus.call_method(
        DEST, path, PROPS_IFACE, b"Get", apply_signature(b"ss", [UNIT_IFACE, b"Id"])
    ).body
    return _text(body) or None


# ------------------------------------------------------------------------------ adapter


class Systemd:
    """Async access to systemd's manager for the worker fleet. See the module doc."""

    def __init__(
        self,
        bus_address: str | None = None,
        *,
        coalesce_quiet_s: float = 0.01,
        coalesce_window_s: float = 0.05,
        reconnect_delay_s: float = 0.5,
        exit_reports: Path | None = EXIT_REPORTS,
        dropin_dir: Path = RUNTIME_UNIT_DIR,
    ) -> None:
        # None: sd_bus_open_system(), which honours $DBUS_SYSTEM_BUS_ADDRESS
        self._address = bus_address
        self._exit_reports = exit_reports
        self._dropin_dir = dropin_dir
        self._reload_lock = asyncio.Lock()
        self._reloads_started = 0
        self.reloads = 0  # daemon-reloads done (diagnostics, tests)
        self._quiet = coalesce_quiet_s
        self._window = max(coalesce_window_s, coalesce_quiet_s)
        self._reconnect_delay = reconnect_delay_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._bus: DBus | None = None  # worker thread only
        self._closed = False
        self.version = ""
        # signal side: event-loop thread only
        self._callbacks: list[Callable[[UnitState], None]] = []
        self._sbus: DBus | None = None
        self._sfd = -1
        self._match_refs: list[Callable[..., None]] = []  # pystemd keeps borrowed pointers
        self._dispatched = 0
        self._pending_first: dict[str, float] = {}
        self._pending_timer: dict[str, asyncio.TimerHandle] = {}
        self._last_props: dict[str, dict[bytes, dict[bytes, Any]]] = {}
        self._last_delivered: dict[str, UnitState] = {}  # without accounting fields
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconnect_task: asyncio.Task[None] | None = None
        self.signals_received = 0  # worker-unit signals seen (diagnostics, tests)
        self.states_delivered = 0  # subscriber callbacks made (per state, not per callback)

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Connect (the call connection now; the signal one if someone subscribed)."""
        if self._executor is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wabridge-systemd")
        try:
            self.version = await self._call("connect", None, _w_version)
            if self._callbacks:
                self._setup_signals()
        except BaseException:
            await self.close()
            raise
        log.debug("systemd.connected", version=self.version, address=self._address or "system")

    async def close(self) -> None:
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            self._reconnect_task = None
        for handle in self._pending_timer.values():
            handle.cancel()
        self._pending_timer.clear()
        self._pending_first.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._teardown_signals()
        executor, self._executor = self._executor, None
        if executor is not None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(Exception):
                await loop.run_in_executor(executor, self._w_close)
            executor.shutdown(wait=False)

    def _w_close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.close()

    # --------------------------------------------------------------- calls
    def _run(self, action: str, unit: str | None, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(bus, *args)`` on the worker thread; map errors; replace a dead connection.

        A connection that worked before but is found dead (dbus-daemon restarted) is replaced
        and the call tried once more, except for kill, which must not be sent twice.
        """
        retry = self._bus is not None and action != "kill"
        while True:
            try:
                if self._bus is None:
                    self._bus = _open_bus(self._address)
                return fn(self._bus, *args)
            except dbusexc.DBusBaseError as exc:
                err = map_error(exc, action, unit)
                if err.code != UNAVAILABLE:
                    raise err from exc
                self._w_close()  # reopened by the retry or by the next call
                if not retry:
                    raise err from exc
                retry = False

    async def _call(self, action: str, unit: str | None, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise SystemdError(UNAVAILABLE, f"systemd {action}: adapter is not open", unit=unit)
        loop = asyncio.get_running_loop()
        job = functools.partial(self._run, action, unit, fn, *args)
        return await loop.run_in_executor(self._executor, job)

    async def start(self, unit: str) -> None:
        """StartUnit(unit, "replace"); returns once the job is queued, not when it is done."""
        await self._call("start", unit, _manager, b"StartUnit", b"ss", unit.encode(), b"replace")

    async def stop(self, unit: str) -> None:
        """StopUnit(unit, "replace"). Stopping a unit systemd does not know is a no-op."""
        try:
            await self._call("stop", unit, _manager, b"StopUnit", b"ss", unit.encode(), b"replace")
        except SystemdError as exc:
            if exc.code != NO_SUCH_UNIT:
                raise

    async def restart(self, unit: str) -> None:
        await self._call(
            "restart", unit, _manager, b"RestartUnit", b"ss", unit.encode(), b"replace"
        )

    async def reset_failed(self, unit: str) -> None:
        """ResetFailedUnit. A unit that is not loaded is not failed: a no-op."""
        try:
            await self._call(
                "reset-failed", unit, _manager, b"ResetFailedUnit", b"s", unit.encode()
            )
        except SystemdError as exc:
            if exc.code != NO_SUCH_UNIT:
                raise

    async def kill(self, unit: str, signal: int, who: str = "main") -> None:
        """KillUnit: send ``signal`` to the unit's main process, control process or all."""
        if who not in KILL_WHO:
            raise ValueError(f"who must be one of {KILL_WHO}, got {who!r}")
        await self._call(
            "kill", unit, _manager, b"KillUnit", b"ssi", unit.encode(), who.encode(), int(signal)
        )

    async def state(self, unit: str) -> UnitState:
        """The unit's state; loads it first, so inactive units answer too.

        Raises ``SystemdError("no_such_unit")`` when no unit file backs the name (LoadState
        not-found). Other load failures (masked, bad-setting, error) come back as a state
        with that ``load_state``.
        """
        st = await self._call("state", unit, _w_load_state, unit)
        if st.load_state == "not-found":
            raise SystemdError(NO_SUCH_UNIT, f"systemd state {unit}: unit not found", unit=unit)
        return with_exit_report(st, self._exit_reports)

    async def loaded_state(self, unit: str) -> UnitState | None:
        """The unit's state if systemd has it loaded, else None (never loads it)."""
        st = await self._call("read", unit, _w_loaded_state, unit)
        return None if st is None else with_cpu_fallback(with_exit_report(st, self._exit_reports))

    async def list_workers(self) -> list[UnitState]:
        """Every worker unit systemd has loaded (running, failed, transitioning, ...)."""
        states = await self._call("list-units", None, _w_list_workers)
        return [with_cpu_fallback(with_exit_report(st, self._exit_reports)) for st in states]

    # --------------------------------------------------------------- drop-ins, reload
    def dropin_path(self, unit: str) -> Path:
        return self._dropin_dir / f"{unit}.d" / WORKER_DROPIN

    async def install_dropin(self, unit: str, text: str) -> bool:
        """Make ``text`` the unit's runtime drop-in before a start; True if it changed.

        Raises ``SystemdError`` (``failed``) when the file cannot be written. See
        "Per-instance drop-ins" in the module doc for when this reloads systemd.
        """
        path = self.dropin_path(unit)
        try:
            changed = _write_if_changed(path, text)
        except OSError as exc:
            raise SystemdError(FAILED, f"cannot write {path}: {exc.strerror or exc}",
                               unit=unit) from exc
        if changed and await self._call("need-reload", unit, _w_need_reload, unit):
            await self.daemon_reload()
        return changed

    async def daemon_reload(self) -> None:
        """Manager.Reload, coalesced: returns once a reload that began after the call ended."""
        ticket = self._reloads_started
        async with self._reload_lock:
            if self._reloads_started > ticket:
                return  # a reload started after our caller's change, and has finished
            self._reloads_started += 1
            await self._call("daemon-reload", None, _manager, b"Reload")
            self.reloads += 1

    async def unit_for_pid(self, pid: int) -> str | None:
        """The unit a PID (in systemd's PID namespace) belongs to; None if none."""
        if pid <= 0:  # 0 would ask systemd about the caller itself
            raise ValueError(f"pid must be positive, got {pid}")
        return await self._call("unit-for-pid", None, _w_unit_for_pid, pid)

    # --------------------------------------------------------------- signals
    @property
    def subscribed(self) -> bool:
        """True while the signal connection is up (False before subscribe, while reconnecting)."""
        return self._sbus is not None

    @property
    def signals_alive(self) -> bool:
        """The signal connection is up or being re-established (the controller feeds its
        watchdog only while this holds: a lost subscription that nothing restores would
        leave every unit state unseen)."""
        task = self._reconnect_task
        return self._sbus is not None or (task is not None and not task.done())

    def subscribe(self, callback: Callable[[UnitState], None]) -> None:
        """Call ``callback(state)`` on the event loop whenever a worker unit changes.

        Call from the event loop thread. Before ``open()`` this only registers the callback.
        """
        self._callbacks.append(callback)
        if (
            self._executor is not None
            and self._sbus is None
            and self._reconnect_task is None
            and not self._closed
        ):
            self._setup_signals()

    def _setup_signals(self) -> None:
        """Open the signal connection on this (the loop's) thread, match, Subscribe()."""
        if self._sbus is not None:
            return
        loop = asyncio.get_running_loop()
        refs: list[Callable[..., None]] = []
        bus: DBus | None = None
        try:
            bus = _open_bus(self._address)
            matches: list[tuple[bytes | None, bytes, bytes, Callable[[Any], None]]] = [
                (None, PROPS_IFACE, b"PropertiesChanged", self._on_properties_changed),
                (MANAGER_PATH, MANAGER_IFACE, b"UnitNew", self._on_unit_signal),
                (MANAGER_PATH, MANAGER_IFACE, b"UnitRemoved", self._on_unit_signal),
                (MANAGER_PATH, MANAGER_IFACE, b"JobRemoved", self._on_job_removed),
            ]
            for path, iface, member, handler in matches:
                cb = self._match_callback(handler)
                refs.append(cb)
                bus.match_signal(DEST, path, iface, member, cb)
            bus.call_method(DEST, MANAGER_PATH, MANAGER_IFACE, b"Subscribe", [])
            fd = int(bus.get_fd())
        except dbusexc.DBusBaseError as exc:
            if bus is not None:
                bus.close()
            raise map_error(exc, "subscribe") from exc
        self._sbus, self._sfd, self._match_refs = bus, fd, refs
        loop.add_reader(fd, self._drain)
        self._drain()  # signals that came in while the setup calls waited for replies

    def _match_callback(self, handler: Callable[[Any], None]) -> Callable[..., None]:
        # one fresh function per match: pystemd stores metadata on the callable itself
        def on_signal(msg: Any, error: Any = None, userdata: Any = None) -> None:
            self._dispatched += 1
            try:
                handler(msg)
            except Exception:  # an exception must not unwind through sd-bus
                log.exception("systemd.signal_handler_failed")

        return on_signal

    def _drain(self) -> None:
        bus = self._sbus
        if bus is None:
            return
        for _ in range(_MAX_DISPATCH):
            before = self._dispatched
            try:
                msg = bus.process()
            except dbusexc.DBusBaseError as exc:
                self._signals_lost(map_error(exc, "process signals"))
                return
            if msg.is_signal(_LOCAL_IFACE, b"Disconnected"):
                self._signals_lost(SystemdError(UNAVAILABLE, "systemd signal connection closed"))
                return
            if self._dispatched == before and msg.is_empty():
                return  # nothing left; the level-triggered reader calls us again for more

    def _on_properties_changed(self, msg: Any) -> None:
        path = msg.get_path()
        if not path.startswith(_WORKER_PATH_PREFIX):
            return  # another unit's, or a job's
        unit = _text(path_decode(path, UNIT_PATH_PREFIX))
        if user_of_unit(unit) is None:
            return
        msg.process_reply(False)
        iface, changed = msg.body[0], msg.body[1]
        if iface not in (UNIT_IFACE, SERVICE_IFACE):
            return
        if isinstance(changed, dict):
            self._last_props.setdefault(unit, {}).setdefault(iface, {}).update(changed)
        self._note(unit)

    def _on_unit_signal(self, msg: Any) -> None:  # UnitNew / UnitRemoved (s id, o path)
        msg.process_reply(False)
        unit = _text(msg.body[0])
        if user_of_unit(unit) is not None:
            self._note(unit)

    def _on_job_removed(self, msg: Any) -> None:  # (u id, o job, s unit, s result)
        msg.process_reply(False)
        unit = _text(msg.body[2])
        if user_of_unit(unit) is not None:
            self._note(unit)

    def _note(self, unit: str) -> None:
        """Fold a signal into the unit's pending refresh (see "coalescing" in the module doc)."""
        self.signals_received += 1
        loop = asyncio.get_running_loop()
        now = loop.time()
        first = self._pending_first.setdefault(unit, now)
        old = self._pending_timer.get(unit)
        if old is not None:
            old.cancel()
        due = min(now + self._quiet, first + self._window)
        self._pending_timer[unit] = loop.call_at(due, self._flush, unit)

    def _flush(self, unit: str) -> None:
        self._pending_first.pop(unit, None)
        self._pending_timer.pop(unit, None)
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(unit))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, unit: str) -> None:
        try:
            st = await self._call("read", unit, _w_loaded_state, unit)
        except SystemdError as exc:
            log.warning("systemd.refresh_failed", unit=unit, code=exc.code, error=str(exc))
            return
        if st is None:
            self._deliver(self._unloaded_state(unit))
        else:
            self._deliver(with_cpu_fallback(with_exit_report(st, self._exit_reports)))

    def _unloaded_state(self, unit: str) -> UnitState:
        """A unit systemd has garbage-collected, described by the last signalled values.

        systemd only collects units that are inactive, so the state itself is certain; the
        result and exit status are the last ones signalled (best effort).
        """
        last = self._last_props.pop(unit, {})
        st = _build_state(
            unit, last.get(UNIT_IFACE, {}), last.get(SERVICE_IFACE, {}), load_state=UNLOADED
        )
        return dataclasses.replace(st, active_state="inactive", sub_state="dead", main_pid=0)

    def _deliver(self, st: UnitState) -> None:
        key = dataclasses.replace(st, memory_bytes=None, cpu_nsec=None, tasks=None)
        if self._last_delivered.get(st.unit) == key:
            return  # same state again (a second burst that changed nothing we report)
        self._last_delivered[st.unit] = key
        self.states_delivered += 1
        for callback in list(self._callbacks):
            try:
                callback(st)
            except Exception:  # one bad subscriber must not stop the others
                log.exception("systemd.subscriber_failed", unit=st.unit)

    def _teardown_signals(self) -> None:
        bus, self._sbus = self._sbus, None
        if bus is None:
            return
        if self._loop is not None and self._sfd >= 0:
            self._loop.remove_reader(self._sfd)
        self._sfd = -1
        bus.close()
        self._match_refs = []  # only after close: sd-bus may call them until then

    def _signals_lost(self, err: SystemdError) -> None:
        self._teardown_signals()
        if self._closed:
            return
        log.warning("systemd.signals_lost", error=str(err))
        if self._reconnect_task is None:
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = self._reconnect_delay
        while True:
            await asyncio.sleep(delay)
            if self._closed:
                return
            try:
                self._setup_signals()
            except SystemdError as exc:
                log.debug("systemd.resubscribe_failed", error=str(exc))
                delay = min(delay * 2, 10.0)
                continue
            break
        if self._reconnect_task is asyncio.current_task():
            self._reconnect_task = None  # a new loss from here on starts a new task
        log.info("systemd.signals_restored")
        # whatever changed while we were not listening; states that did not change are
        # filtered out by _deliver
        try:
            states = await self.list_workers()
        except SystemdError as exc:
            log.warning("systemd.resync_failed", error=str(exc))
            return
        for st in states:
            self._deliver(st)
        listed = {st.unit for st in states}
        for unit, last in list(self._last_delivered.items()):
            if unit not in listed and last.load_state != UNLOADED:
                self._flush(unit)  # loaded before, not listed now: re-read (probably unloaded)
