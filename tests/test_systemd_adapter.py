"""controller/systemd.py against a real systemd 252 booted in a private namespace.

The adapter runs in the test (host) process and reaches the namespace's system bus through
``/proc/<pid1>/root/run/dbus/system_bus_socket``. PIDs that systemd reports are PIDs of the
namespace; ``unit_for_pid`` needs those too (in the real deployment the controller runs inside
the namespace, so SO_PEERCRED PIDs already match).

The worker template runs ``wabridge-fake-worker <instance>``, which reads
``/etc/wabridge-test/<instance>``: ``exit N`` exits with N, ``status TEXT`` sends STATUS=TEXT
to systemd; then it sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.systemd_ns import SystemdNamespace, available

from controller.systemd import Systemd
from controller.unit_manager import SystemdError, UnitState
from wabridge.units import worker_unit

_REASON = available()
pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(_REASON is not None, reason=f"systemd namespace unavailable: {_REASON}"),
]

FAKE_WORKER = """#!/usr/bin/python3
import os, socket, sys, time
inst = sys.argv[1]
try:
    with open(f"/etc/wabridge-test/{inst}") as f:
        cmd, _, arg = f.read().strip().partition(" ")
except FileNotFoundError:
    cmd, arg = "", ""
if cmd == "exit":
    sys.exit(int(arg))
if cmd == "status":
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(f"STATUS={arg}".encode(), addr)
while True:
    time.sleep(3600)
"""

TEMPLATE = """[Unit]
Description=wabridge test worker %i
StartLimitIntervalSec=60
StartLimitBurst=3

[Service]
ExecStart=/usr/local/bin/wabridge-fake-worker %i
NotifyAccess=main
Restart=on-failure
RestartSec=100ms
"""

FILES = {
    "/etc/systemd/system/wabridge-worker@.service": TEMPLATE,
    "/usr/local/bin/wabridge-fake-worker": FAKE_WORKER,
}
MODES = {"/usr/local/bin/wabridge-fake-worker": 0o755}


@pytest.fixture(scope="module")
def ns():
    n = SystemdNamespace(files=FILES, file_modes=MODES)
    n.start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
async def sd(ns):
    s = Systemd(ns.bus_address)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def configure(ns, instance: str, text: str | None) -> None:
    path = f"/etc/wabridge-test/{instance}"
    if text is None:
        (ns.root / path.lstrip("/")).unlink(missing_ok=True)
    else:
        ns.write_file(path, text + "\n")


class Recorder:
    """A subscriber that keeps every state and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, UnitState]] = []
        self._event = asyncio.Event()

    def __call__(self, st: UnitState) -> None:
        self.seen.append((time.perf_counter(), st))
        self._event.set()

    def mark(self) -> int:
        return len(self.seen)

    def states(self, unit: str, since: int = 0) -> list[UnitState]:
        return [st for _, st in self.seen[since:] if st.unit == unit]

    async def wait(
        self, pred: Callable[[UnitState], bool], since: int = 0, timeout: float = 10.0
    ) -> tuple[float, UnitState]:
        deadline = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.seen):
                if pred(self.seen[i][1]):
                    return self.seen[i]
                i += 1
            self._event.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                got = [(st.unit, st.active_state, st.sub_state) for _, st in self.seen[since:]]
                raise AssertionError(f"no matching state within {timeout}s; got {got}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), left)


def is_(unit: str, active: str) -> Callable[[UnitState], bool]:
    return lambda st: st.unit == unit and st.active_state == active


async def test_start_state_subscribe_list_stop(sd, ns):
    unit = worker_unit("alice")
    configure(ns, "alice", "status linked as alice")
    rec = Recorder()
    sd.subscribe(rec)
    assert sd.version.startswith("252")

    # before the start: loading makes an unloaded unit answer
    st = await sd.state(unit)
    assert (st.active_state, st.sub_state, st.main_pid) == ("inactive", "dead", 0)
    assert st.user_id == "alice"

    mark = rec.mark()
    await sd.start(unit)
    _, active = await rec.wait(is_(unit, "active"), mark)
    assert active.user_id == "alice" and active.main_pid > 1 and active.load_state == "loaded"
    _, status = await rec.wait(lambda s: s.unit == unit and s.status_text != "", mark)
    assert status.status_text == "linked as alice"

    st = await sd.state(unit)
    assert st.active_state == "active" and st.sub_state == "running"
    assert st.main_pid == active.main_pid and st.n_restarts == 0 and st.result == "success"
    assert st.status_text == "linked as alice"
    assert st.since_usec > 1_600_000_000 * 1_000_000  # realtime, microseconds
    assert abs(st.since_usec / 1e6 - time.time()) < 60
    print(f"accounting: memory={st.memory_bytes} cpu_nsec={st.cpu_nsec} tasks={st.tasks}")

    workers = {w.unit: w for w in await sd.list_workers()}
    assert workers[unit].active_state == "active"
    assert workers[unit].main_pid == st.main_pid

    mark = rec.mark()
    await sd.stop(unit)
    _, stopped = await rec.wait(is_(unit, "inactive"), mark)
    assert stopped.main_pid == 0
    assert unit not in {w.unit for w in await sd.list_workers()}
    # systemd drops a cleanly stopped unit; the last state came from signals
    await asyncio.sleep(0.1)
    last = rec.states(unit, mark)[-1]
    assert last.active_state == "inactive"
    after = [(s.active_state, s.sub_state, s.load_state) for s in rec.states(unit, mark)]
    print(f"after stop: {after}")
    configure(ns, "alice", None)


async def test_signals_are_coalesced(sd):
    unit = worker_unit("coalesce")
    rec = Recorder()

    def broken(st: UnitState) -> None:
        raise RuntimeError("a subscriber bug")

    sd.subscribe(broken)  # logged; must not keep the next subscriber from its states
    sd.subscribe(rec)
    signals0 = sd.signals_received
    mark = rec.mark()
    await sd.start(unit)
    await rec.wait(is_(unit, "active"), mark)
    await asyncio.sleep(0.2)  # let any trailing signals arrive
    start_signals = sd.signals_received - signals0
    start_states = rec.states(unit, mark)
    print(f"start: {start_signals} signals -> {len(start_states)} callbacks")
    assert start_signals >= 4
    # one callback normally; two if a slow machine spreads the burst past the quiet time
    assert len(start_states) <= 2, [(s.active_state, s.sub_state) for s in start_states]

    signals0, mark = sd.signals_received, rec.mark()
    await sd.stop(unit)
    await rec.wait(is_(unit, "inactive"), mark)
    await asyncio.sleep(0.2)
    stop_states = rec.states(unit, mark)
    print(f"stop: {sd.signals_received - signals0} signals -> {len(stop_states)} callbacks")
    assert len(stop_states) <= 2


async def test_unit_for_pid_uses_namespace_pids(sd, ns):
    unit = worker_unit("bob")
    await sd.start(unit)
    st = await sd.state(unit)
    assert st.active_state == "active" and st.main_pid > 1

    # find the worker from the host side, then translate its host PID as the controller
    # would have to if it ran outside the namespace
    host_pid = None
    deadline = time.monotonic() + 5
    while host_pid is None and time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv[1:3] == [b"/usr/local/bin/wabridge-fake-worker", b"bob"]:
                    host_pid = int(entry)
        await asyncio.sleep(0.02)
    assert host_pid is not None
    nspid_line = next(
        line
        for line in Path(f"/proc/{host_pid}/status").read_text().splitlines()
        if line.startswith("NSpid:")
    )
    inner_pid = int(nspid_line.split()[-1])
    assert host_pid != inner_pid, "host and namespace PIDs should differ"
    assert inner_pid == st.main_pid
    assert await sd.unit_for_pid(inner_pid) == unit
    assert await sd.unit_for_pid(1) == "init.scope"
    assert await sd.unit_for_pid(4_000_000) is None  # no such process in the namespace
    with pytest.raises(ValueError):
        await sd.unit_for_pid(0)
    await sd.stop(unit)


async def test_kill_then_automatic_restart(sd):
    unit = worker_unit("dora")
    rec = Recorder()
    sd.subscribe(rec)
    mark = rec.mark()
    await sd.start(unit)
    _, first = await rec.wait(is_(unit, "active"), mark)

    mark = rec.mark()
    await sd.kill(unit, signal.SIGKILL)
    _, died = await rec.wait(lambda s: s.unit == unit and s.result == "signal", mark)
    assert (died.exec_main_code, died.exec_main_status) == (2, signal.SIGKILL)  # CLD_KILLED
    assert died.sub_state == "auto-restart", died
    _, again = await rec.wait(lambda s: is_(unit, "active")(s) and s.n_restarts == 1, mark)
    assert again.main_pid not in (0, first.main_pid)

    mark = rec.mark()
    await sd.restart(unit)
    _, restarted = await rec.wait(
        lambda s: is_(unit, "active")(s) and s.main_pid not in (0, again.main_pid), mark
    )
    assert restarted.n_restarts == 0  # a manual restart is not counted
    with pytest.raises(ValueError):
        await sd.kill(unit, signal.SIGTERM, who="everyone")
    await sd.stop(unit)


async def test_failing_unit_hits_start_limit_then_reset_failed(sd, ns):
    unit = worker_unit("carol")
    configure(ns, "carol", "exit 1")
    rec = Recorder()
    sd.subscribe(rec)
    mark = rec.mark()
    t0 = time.monotonic()
    await sd.start(unit)
    _, failed = await rec.wait(is_(unit, "failed"), mark, timeout=15)
    seen = [(s.active_state, s.sub_state, s.n_restarts, s.result) for s in rec.states(unit, mark)]
    print(f"carol after {time.monotonic() - t0:.2f}s: {seen}")
    st = await sd.state(unit)
    print(
        f"failed state: result={st.result} n_restarts={st.n_restarts} "
        f"exec_main=({st.exec_main_code},{st.exec_main_status}) sub={st.sub_state}"
    )
    assert st.active_state == "failed" and st.load_state == "loaded"
    assert st.result in ("exit-code", "start-limit-hit")
    assert st.n_restarts >= 2
    assert (st.exec_main_code, st.exec_main_status) == (1, 1)  # CLD_EXITED, status 1
    assert st.main_pid == 0
    assert failed.result == st.result
    # failed units stay loaded and listed
    assert {w.unit: w.active_state for w in await sd.list_workers()}[unit] == "failed"

    # over the limit, StartUnit still queues a job (start() does not wait for it); the job
    # fails at once and the unit stays failed
    mark = rec.mark()
    await sd.start(unit)
    await asyncio.sleep(0.3)
    st = await sd.state(unit)
    print(f"start while over the limit: {st.active_state}/{st.sub_state} result={st.result}")
    assert st.active_state == "failed"

    await sd.reset_failed(unit)
    st = await sd.state(unit)
    assert st.active_state == "inactive"
    configure(ns, "carol", None)
    mark = rec.mark()
    await sd.start(unit)
    await rec.wait(is_(unit, "active"), mark)
    await sd.stop(unit)
    await sd.reset_failed(unit)  # not loaded any more: a no-op


async def test_unknown_and_invalid_units(sd):
    with pytest.raises(SystemdError) as e:
        await sd.state("nosuch.service")
    assert e.value.code == "no_such_unit" and e.value.unit == "nosuch.service"
    with pytest.raises(SystemdError) as e:
        await sd.start("nosuch.service")
    assert e.value.code == "no_such_unit"
    assert "template" in e.value.explanation
    with pytest.raises(SystemdError) as e:
        await sd.kill(worker_unit("nobody"), signal.SIGTERM)  # not loaded
    assert e.value.code == "no_such_unit"
    await sd.stop("nosuch.service")  # nothing to stop: no error
    await sd.reset_failed("nosuch.service")
    with pytest.raises(SystemdError) as e:
        await sd.start("not a unit name")
    assert e.value.code == "failed"
    assert "InvalidArgs" in e.value.dbus_error


async def test_unavailable_bus():
    s = Systemd("unix:path=/nonexistent/system_bus_socket")
    with pytest.raises(SystemdError) as e:
        await s.open()
    assert e.value.code == "unavailable"
    with pytest.raises(SystemdError) as e:
        await s.start(worker_unit("alice"))  # not open
    assert e.value.code == "unavailable"
    await s.close()


async def test_default_bus_from_environment(ns):
    with ns.bus_env():
        s = Systemd()
        await s.open()
        try:
            st = await s.state(worker_unit("env"))
            assert st.active_state == "inactive"
        finally:
            await s.close()


async def test_start_to_active_callback_latency(sd):
    rec = Recorder()
    sd.subscribe(rec)
    latencies, call_times = [], []
    units = [worker_unit(f"lat{i}") for i in range(20)]
    for unit in units:
        mark = rec.mark()
        t0 = time.perf_counter()
        await sd.start(unit)
        t1 = time.perf_counter()
        t_cb, _ = await rec.wait(is_(unit, "active"), mark)
        latencies.append(t_cb - t0)
        call_times.append(t1 - t0)
    t0 = time.perf_counter()
    for unit in units:
        await sd.state(unit)
    state_ms = (time.perf_counter() - t0) / len(units) * 1000
    t0 = time.perf_counter()
    listed = await sd.list_workers()
    list_ms = (time.perf_counter() - t0) * 1000
    for unit in units:
        await sd.stop(unit)
    ms = sorted(x * 1000 for x in latencies)
    p50 = statistics.median(ms)
    print(
        f"start() -> active callback over {len(ms)} starts: p50 {p50:.1f} ms, "
        f"min {ms[0]:.1f}, max {ms[-1]:.1f}; start() call p50 "
        f"{statistics.median(call_times) * 1000:.1f} ms; state() {state_ms:.1f} ms; "
        f"list_workers() of {len(listed)}: {list_ms:.1f} ms"
    )
    assert p50 < 200


async def test_reconnects_after_dbus_restart_and_survives_systemd_exit():
    n = SystemdNamespace(files=FILES, file_modes=MODES)
    n.start()
    s = Systemd(n.bus_address, reconnect_delay_s=1.0)
    try:
        await s.open()
        rec = Recorder()
        s.subscribe(rec)
        assert s.subscribed
        unit, kept = worker_unit("erin"), worker_unit("gina")
        await s.start(unit)
        await s.start(kept)
        await rec.wait(is_(unit, "active"))
        await rec.wait(is_(kept, "active"))

        mark = rec.mark()
        n.systemctl("restart", "dbus.service", check=True)
        await asyncio.sleep(0.05)  # the loop notices the hang-up
        assert not s.subscribed
        # systemctl talks to systemd's private socket, not the bus: we miss these signals
        n.systemctl("stop", unit, check=True)
        deadline = time.monotonic() + 15
        while not s.subscribed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert s.subscribed
        # the resync reports what changed during the gap, and only that
        _, gone = await rec.wait(is_(unit, "inactive"), mark, timeout=5)
        assert gone.load_state == "unloaded" and gone.main_pid == 0
        await asyncio.sleep(0.1)
        assert rec.states(kept, mark) == []
        # the call connection was replaced transparently, and new signals flow again
        other = worker_unit("frank")
        mark = rec.mark()
        await s.start(other)
        await rec.wait(is_(other, "active"), mark, timeout=10)

        n.stop()
        with pytest.raises(SystemdError) as e:
            await s.state(unit)
        assert e.value.code == "unavailable"
        await asyncio.sleep(0.3)  # the reconnect loop keeps failing quietly
    finally:
        await s.close()
        n.stop()
