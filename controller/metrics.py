"""Fleet figures for Prometheus: ``GET /metrics`` on ``controller.metrics_listen``.

``render`` is a pure function from a :class:`FleetSnapshot` (what the controller knows: unit
states from systemd, the latest ``metrics`` frame of each worker, document statuses) to the
Prometheus text exposition format 0.0.4; it is table-tested in ``tests/test_metrics.py``.
:class:`MetricsServer` serves it with aiohttp (bind it to 127.0.0.1: the figures name users).

Workers share the host's network, so a worker could connect to the endpoint like any local
process and read every other user's figures. The server therefore looks up who is on the
other end of each local connection: the owner UID of the peer's socket in
``/proc/net/tcp{,6}`` (``tcp_peer_uid``), and refuses a worker's (``worker_uid``: a
``DynamicUser=`` UID named ``wab-*``, or one whose name cannot be found) with 403. A local
peer that cannot be found is refused too. (``IPAddressDeny=`` on the worker cannot do this:
it filters addresses, not ports, and workers must reach 127.0.0.1 for a local simulator.)

Per-user series carry a ``user`` label; ``wabridge_fleet_*`` are the sums over the fleet, so
a dashboard needs no PromQL for the headline figures. Worker counters (messages, turns,
tokens) are the worker's own totals from its store and only grow; CPU seconds restart from 0
with each new process, as counters may.
"""

from __future__ import annotations

import ipaddress
import math
import pwd
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiohttp import web

from wabridge import logs
from wabridge.protocol import Usage
from wabridge.units import DYNAMIC_UIDS, SYSTEM_USER_PREFIX

log = logs.get("controller.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNIT_STATES = ("active", "activating", "deactivating", "failed", "inactive", "reloading")

# frame field -> (metric name, help, type, extra labels)
_WORKER_COUNTERS: tuple[tuple[str, str, str, str, str], ...] = (
    ("messages_in", "wabridge_messages_total", "WhatsApp messages handled", "counter",
     'direction="in"'),
    ("messages_out", "wabridge_messages_total", "WhatsApp messages handled", "counter",
     'direction="out"'),
    ("turns", "wabridge_claude_turns_total", "Claude turns taken", "counter", ""),
    ("input_tokens", "wabridge_claude_tokens_total", "Claude tokens", "counter",
     'kind="input"'),
    ("output_tokens", "wabridge_claude_tokens_total", "Claude tokens", "counter",
     'kind="output"'),
    ("cost_today_usd", "wabridge_claude_cost_today_usd",
     "Claude spend of the current UTC day in USD", "gauge", ""),
    # usage for billing, the current UTC day (the worker's usage frames; usage/{user}__{day})
    ("usage_turns", "wabridge_usage_today_turns", "Claude turns of the current UTC day",
     "gauge", ""),
    ("usage_input_tokens", "wabridge_usage_today_tokens",
     "Claude tokens of the current UTC day", "gauge", 'kind="input"'),
    ("usage_output_tokens", "wabridge_usage_today_tokens",
     "Claude tokens of the current UTC day", "gauge", 'kind="output"'),
    ("usage_cache_creation_tokens", "wabridge_usage_today_tokens",
     "Claude tokens of the current UTC day", "gauge", 'kind="cache_creation"'),
    ("usage_cache_read_tokens", "wabridge_usage_today_tokens",
     "Claude tokens of the current UTC day", "gauge", 'kind="cache_read"'),
    ("usage_transcription_seconds", "wabridge_usage_today_transcription_seconds",
     "Seconds of voice notes transcribed in the current UTC day", "gauge", ""),
    ("chats", "wabridge_chats", "Chats the worker knows", "gauge", ""),
    ("claude_processes", "wabridge_claude_processes", "Live Claude processes", "gauge", ""),
)


def with_usage(reported: Mapping[str, float], usage: Usage | None = None) -> dict[str, float]:
    """A worker's figures with the current UTC day's usage: ``usage``'s when it is today's
    (a usage frame), else the ones ``reported`` had (a metrics frame replaces the rest)."""
    figures = {k: v for k, v in reported.items() if k.startswith("usage_")}
    if usage is not None and usage.day == time.strftime("%Y-%m-%d", time.gmtime()):
        figures = {f"usage_{k}": float(v) for k, v in asdict(usage).items()
                   if k not in ("seq", "day")}
    return figures


@dataclass(frozen=True)
class WorkerFigures:
    """One user's figures; ``None``: not known (no unit, no accounting, no frame yet)."""

    user_id: str
    unit_state: str | None = None  # systemd ActiveState
    restarts: int = 0  # NRestarts (automatic restarts since the last manual start)
    memory_bytes: int | None = None
    cpu_seconds: float | None = None
    tasks: int | None = None
    status: str | None = None  # the document's status
    linked: bool = False  # connected to the controller's worker socket
    reported: Mapping[str, float] = field(default_factory=dict)  # latest metrics frame


@dataclass(frozen=True)
class FleetSnapshot:
    workers: tuple[WorkerFigures, ...] = ()
    controller_memory_bytes: int | None = None
    plane: str = ""
    hosts: HostsFigures | None = None  # fleet.enabled only


@dataclass(frozen=True)
class HostsFigures:
    """A fleet's hosts as this controller last read them (``controller.fleet``), and its own
    lease counters since it started."""

    me: str
    held: Mapping[str, int]  # host -> accounts whose lease it holds now
    alive: tuple[str, ...]  # hosts whose heartbeat is recent
    acquired: int = 0  # leases this host won
    lost: int = 0  # workers of this host that stopped because their lease was gone


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.declared: set[str] = set()

    def declare(self, name: str, help_text: str, kind: str) -> None:
        if name not in self.declared:
            self.declared.add(name)
            self.lines.append(f"# HELP {name} {help_text}")
            self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Iterable[str], value: float) -> None:
        parts = [label for label in labels if label]
        text = "{" + ",".join(parts) + "}" if parts else ""
        self.lines.append(f"{name}{text} {_number(value)}")


def render(snapshot: FleetSnapshot) -> str:
    """The Prometheus text format of ``snapshot`` (deterministic: users sorted)."""
    out = _Out()
    workers = sorted(snapshot.workers, key=lambda w: w.user_id)

    out.declare("wabridge_units", "Worker units by systemd ActiveState", "gauge")
    states = Counter(w.unit_state for w in workers if w.unit_state is not None)
    for state in sorted(set(UNIT_STATES) | set(states)):
        out.sample("wabridge_units", [f'state="{escape_label(state)}"'], states.get(state, 0))

    out.declare("wabridge_sessions", "Account documents (user_sessions) by status", "gauge")
    statuses = Counter(w.status for w in workers if w.status is not None)
    for status in sorted(statuses):
        out.sample("wabridge_sessions", [f'status="{escape_label(status)}"'], statuses[status])

    out.declare("wabridge_workers_linked", "Workers connected to the controller", "gauge")
    out.sample("wabridge_workers_linked", [], sum(1 for w in workers if w.linked))

    per_unit: tuple[tuple[str, str, str, Callable[[WorkerFigures], float | None]], ...] = (
        ("wabridge_worker_restarts", "Automatic restarts since the last manual start",
         "gauge", lambda w: w.restarts if w.unit_state is not None else None),
        ("wabridge_worker_memory_bytes", "Memory of the worker unit (cgroup)", "gauge",
         lambda w: w.memory_bytes),
        ("wabridge_worker_cpu_seconds_total", "CPU time of the worker unit's processes",
         "counter", lambda w: w.cpu_seconds),
        ("wabridge_worker_tasks", "Tasks (threads) of the worker unit", "gauge",
         lambda w: w.tasks),
    )
    for name, help_text, kind, get in per_unit:
        values = [(w, get(w)) for w in workers]
        known = [(w, v) for w, v in values if v is not None]
        if not known:
            continue
        out.declare(name, help_text, kind)
        for w, v in known:
            out.sample(name, [f'user="{escape_label(w.user_id)}"'], v)

    totals: dict[tuple[str, str], float] = {}
    for key, name, help_text, kind, extra in _WORKER_COUNTERS:
        rows = [(w, w.reported.get(key)) for w in workers]
        known_rows = [(w, float(v)) for w, v in rows if isinstance(v, int | float)]
        if not known_rows:
            continue
        out.declare(name, help_text, kind)
        for w, v in known_rows:
            out.sample(name, [f'user="{escape_label(w.user_id)}"', extra], v)
        totals[(name, extra)] = totals.get((name, extra), 0.0) + sum(v for _, v in known_rows)

    fleet: list[tuple[str, str, str, float | None]] = [
        ("wabridge_fleet_memory_bytes", "Memory of all worker units", "gauge",
         _sum(w.memory_bytes for w in workers)),
        ("wabridge_fleet_cpu_seconds_total", "CPU time of all running worker processes",
         "counter", _sum(w.cpu_seconds for w in workers)),
        ("wabridge_fleet_restarts", "Automatic restarts over all worker units", "gauge",
         float(sum(w.restarts for w in workers if w.unit_state is not None))),
    ]
    for name, help_text, kind, value in fleet:
        if value is not None:
            out.declare(name, help_text, kind)
            out.sample(name, [], value)
    for (name, extra), value in sorted(totals.items()):
        fleet_name = name.replace("wabridge_", "wabridge_fleet_", 1)
        out.declare(fleet_name, f"Fleet total of {name}", "counter" if
                    name.endswith("_total") else "gauge")
        out.sample(fleet_name, [extra], value)

    if snapshot.controller_memory_bytes is not None:
        out.declare("wabridge_controller_memory_bytes", "Resident memory of the controller",
                    "gauge")
        out.sample("wabridge_controller_memory_bytes", [], snapshot.controller_memory_bytes)
    if snapshot.hosts is not None:
        hosts = snapshot.hosts
        out.declare("wabridge_host_accounts", "Accounts whose lease each host holds", "gauge")
        for host in sorted(set(hosts.held) | set(hosts.alive)):
            out.sample("wabridge_host_accounts", [f'host="{escape_label(host)}"'],
                       hosts.held.get(host, 0))
        out.declare("wabridge_hosts_alive", "Hosts of the fleet with a recent heartbeat",
                    "gauge")
        out.sample("wabridge_hosts_alive", [], len(hosts.alive))
        me = [f'host="{escape_label(hosts.me)}"']
        out.declare("wabridge_lease_acquisitions_total", "Account leases this host won",
                    "counter")
        out.sample("wabridge_lease_acquisitions_total", me, hosts.acquired)
        out.declare("wabridge_lease_losses_total",
                    "Workers of this host that stopped because their lease was gone", "counter")
        out.sample("wabridge_lease_losses_total", me, hosts.lost)
    out.declare("wabridge_controller_info", "The controller's control plane", "gauge")
    out.sample("wabridge_controller_info", [f'plane="{escape_label(snapshot.plane)}"'], 1)
    return "\n".join(out.lines) + "\n"


def _sum(values: Iterable[float | int | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) if known else None


Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]
PROC_NET_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def _address(text: str) -> Address:
    """``0100007F:24E8`` (/proc/net/tcp: 32-bit words in host order, port in hex)."""
    hex_ip, hex_port = text.split(":")
    raw = bytes.fromhex(hex_ip)
    packed = b"".join(struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0])
                      for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(hex_port, 16)


def _normal(host: str, port: int) -> Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


def tcp_peer_uid(tables: Iterable[str], peer: Address, ours: Address) -> int | None:
    """The UID owning the local socket at ``peer`` connected to ``ours``, from the text of
    /proc/net/tcp and tcp6; None if no such socket is listed (the peer is on another host)."""
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 8:
                continue
            try:
                if _address(fields[1]) == peer and _address(fields[2]) == ours:
                    return int(fields[7])
            except ValueError:
                continue
    return None


def worker_uid(uid: int) -> bool:
    """Whether ``uid`` may be a wabridge worker's: a ``DynamicUser=`` UID whose name is a
    worker's, or cannot be found (fail closed)."""
    if uid not in DYNAMIC_UIDS:
        return False
    try:
        return pwd.getpwuid(uid).pw_name.startswith(SYSTEM_USER_PREFIX)
    except KeyError:
        return True


def own_rss_bytes(statm: Path = Path("/proc/self/statm")) -> int | None:
    """This process's resident set size."""
    import os  # noqa: PLC0415

    try:
        resident = int(statm.read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident * os.sysconf("SC_PAGE_SIZE")


class MetricsServer:
    """``GET /metrics`` (and ``/``) answering ``render(snapshot())``."""

    def __init__(self, listen: str, snapshot: Callable[[], FleetSnapshot]) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self._snapshot = snapshot
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        app.router.add_get("/", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0 and site._server is not None:  # tests: the port picked
            sockets = getattr(site._server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        log.info("metrics.listening", host=self.host, port=self.port)

    def _refusal(self, request: web.Request) -> str | None:
        """Why this connection may not read the figures, or None."""
        peername = request.transport.get_extra_info("peername") if request.transport else None
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not peername or not sockname:
            return "unknown peer"
        peer, ours = _normal(*peername[:2]), _normal(*sockname[:2])
        tables = []
        for path in PROC_NET_TCP:
            try:
                tables.append(path.read_text())
            except OSError:
                continue
        uid = tcp_peer_uid(tables, peer, ours)
        if uid is None:
            # not a socket of this host's network namespace: a remote scraper, unless the
            # address is our own
            return "unknown local peer" if peer[0].is_loopback else None
        return f"uid {uid} is a wabridge worker" if worker_uid(uid) else None

    async def _handle(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            log.warning("metrics.refused", peer=str(request.remote), reason=refusal)
            return web.Response(status=403, text="forbidden: workers may not read the "
                                "fleet's figures\n")
        body = render(self._snapshot())
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
