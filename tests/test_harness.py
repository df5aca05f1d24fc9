"""Self-tests for tests/harness/systemd_ns.py (real systemd in a namespace)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from harness.systemd_ns import Bind, BootError, SystemdNamespace, _cgroup_layout, available
from pystemd.systemd1 import Manager, Unit

pytestmark = pytest.mark.skipif(
    available() is not None, reason=f"systemd namespace harness unavailable: {available()}"
)

TESTS_DIR = Path(__file__).resolve().parent

UNIT_FILES = {
    # a template unit, like wabridge-worker@<user>.service
    "/etc/systemd/system/x@.service": (
        "[Unit]\nDescription=template probe for %i\n"
        "[Service]\nExecStart=/bin/sleep infinity\nEnvironment=WHO=%i\n"
    ),
    "/etc/systemd/system/dyn.service": (
        "[Unit]\nDescription=DynamicUser probe\n"
        "[Service]\nType=oneshot\nDynamicUser=yes\nStateDirectory=dyn-state\n"
        'ExecStart=/usr/bin/python3 -c "import os; '
        "open(os.path.join(os.environ['STATE_DIRECTORY'], 'ok'), 'w').write('x'); "
        "print('dyn-uid', os.getuid(), os.environ['STATE_DIRECTORY'], flush=True)\"\n"
    ),
    "/etc/systemd/system/mem.service": (
        "[Unit]\nDescription=MemoryMax probe\n"
        "[Service]\nMemoryMax=64M\n"
        # b'x' * n memsets, so every page is really touched
        'ExecStart=/usr/bin/python3 -c "import time; '
        "chunks = [b'x' * (16 << 20) for _ in range(32)]; "
        "print('survived', flush=True); time.sleep(60)\"\n"
    ),
    "/etc/wabridge/probe.conf": "hello = 1\n",
    "/usr/local/bin/wabridge-probe": "#!/bin/sh\necho probe-ok\n",
}


def _leftovers(name: str) -> tuple[list[str], list[int]]:
    dirs = []
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        for d in dirnames:
            if d.startswith(name):
                dirs.append(os.path.join(dirpath, d))
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if name in Path(f"/proc/{entry}/cgroup").read_text():
                    procs.append(int(entry))
            except OSError:
                pass
    return dirs, procs


@pytest.fixture(scope="module")
def ns():
    n = SystemdNamespace(
        binds=[Bind(TESTS_DIR, "/opt/wabridge-tests")],
        files=UNIT_FILES,
        file_modes={"/usr/local/bin/wabridge-probe": 0o755},
        enable=["x@bob.service"],
        env={"WABRIDGE_TEST_ENV": 'hello "world"'},
    )
    n.start()
    print(f"boot took {n.boot_seconds:.2f}s (layout {n.layout})")
    try:
        yield n
    finally:
        n.stop()


@pytest.mark.systemd
def test_boot_running_without_failed_units(ns):
    state = ns.systemctl("is-system-running").stdout.strip()
    failed = ns.systemctl("list-units", "--failed", "--no-legend", "--plain").stdout.strip()
    assert failed == "", f"failed units (mask them in the harness):\n{failed}"
    assert state == "running", state
    assert ns.boot_seconds is not None and ns.boot_seconds < 10
    assert ns.run(["cat", "/etc/hostname"]).stdout.strip() == "wabridge-test"
    # PID 1 really is systemd, and the root is the overlay (not the host's disk)
    assert ns.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert ns.run(["findmnt", "-n", "-o", "FSTYPE", "/"]).stdout.strip() == "overlay"


@pytest.mark.systemd
def test_pystemd_manager_from_host(ns):
    before = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    with ns.bus_env() as addr:
        assert addr == ns.bus_address == f"unix:path=/proc/{ns.pid}/root/run/dbus/system_bus_socket"
        with Manager() as m:
            assert m.Manager.Version.split(b".")[0].isdigit()  # e.g. b"252.39-1~deb12u2"
            assert m.Manager.Virtualization == b"container-other"
            names = [u[0] for u in m.Manager.ListUnits()]
            assert b"wabridge-test.target" in names
    assert os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") == before


@pytest.mark.systemd
def test_transient_unit_visible_via_pystemd(ns):
    ns.run(["systemd-run", "--unit=probe", "sleep", "1000"], check=True)
    with ns.bus_env():
        u = Unit(b"probe.service", _autoload=True)
        assert u.Unit.ActiveState == b"active"
        main = u.Service.MainPID
    assert main > 1
    host_pid = ns.translate_pid(main)

    # Type=simple units are "active" as soon as systemd forks; the exec of
    # the real binary can come a moment later.
    def argv() -> list[bytes]:
        return Path(f"/proc/{host_pid}/cmdline").read_bytes().split(b"\0")

    ns.wait_for(
        lambda: argv()[0].endswith(b"/sleep") and argv()[1:2] == [b"1000"], 5, "exec of sleep 1000"
    )
    assert ns.name in Path(f"/proc/{host_pid}/cgroup").read_text()
    ns.systemctl("stop", "probe.service", check=True)


@pytest.mark.systemd
def test_template_unit_via_pystemd(ns):
    # enabled at boot through the boot target
    assert ns.unit_property("x@bob.service", "ActiveState") == "active"
    ns.systemctl("start", "x@alice.service", check=True)
    with ns.bus_env():
        u = Unit(b"x@alice.service", _autoload=True)
        assert u.Unit.ActiveState == b"active"
        assert u.Unit.Description == b"template probe for alice"
        main = u.Service.MainPID
        assert main > 1
        assert b"WHO=alice" in u.Service.Environment
    assert ns.unit_property("x@alice.service", "MainPID") == str(main)


@pytest.mark.systemd
def test_dynamic_user_state_directory_python(ns):
    ns.systemctl("start", "dyn.service", check=True)  # oneshot: returns when done
    assert ns.unit_property("dyn.service", "Result") == "success"
    ns.wait_for(
        lambda: "dyn-uid" in ns.journalctl("-u", "dyn.service", "-o", "cat"),
        5,
        "dyn.service output",
    )
    line = next(
        ln
        for ln in ns.journalctl("-u", "dyn.service", "-o", "cat").splitlines()
        if ln.startswith("dyn-uid")
    )
    _, uid, state_dir = line.split()
    assert 61184 <= int(uid) <= 65519  # systemd's dynamic uid range
    assert state_dir == "/var/lib/dyn-state"
    assert (ns.root / "var/lib/private/dyn-state/ok").read_text() == "x"


@pytest.mark.systemd
def test_memory_max_enforced(ns):
    if ns.layout == "unified" and "memory" not in ns.v2_controllers:
        pytest.skip("memory controller not delegated to the namespace (cgroup v2)")
    assert ns.unit_property("mem.service", "MemoryMax") == str(64 << 20)
    ns.systemctl("start", "mem.service", check=True)
    ns.wait_for(
        lambda: ns.unit_property("mem.service", "ActiveState") in ("failed", "inactive"),
        15,
        "mem.service to be killed",
    )
    result = ns.unit_property("mem.service", "Result")
    assert result in ("signal", "oom-kill"), result
    if result == "signal":  # cgroup v1: the kernel OOM killer's SIGKILL
        assert ns.unit_property("mem.service", "ExecMainStatus") == "9"
    assert "survived" not in ns.journalctl("-u", "mem.service", "-o", "cat")
    ns.systemctl("reset-failed", "mem.service")


@pytest.mark.systemd
def test_files_binds_env_and_write_file(ns):
    assert ns.run(["cat", "/etc/wabridge/probe.conf"]).stdout == "hello = 1\n"
    assert ns.run(["wabridge-probe"]).stdout.strip() == "probe-ok"
    # read-only bind of a host directory
    assert ns.run(["test", "-f", "/opt/wabridge-tests/test_harness.py"]).returncode == 0
    r = ns.run(["touch", "/opt/wabridge-tests/should-fail"])
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    # DefaultEnvironment= reaches units
    r = ns.run(
        ["systemd-run", "--wait", "--pipe", "-q", "printenv", "WABRIDGE_TEST_ENV"], check=True
    )
    assert r.stdout.strip() == 'hello "world"'
    # files added after boot
    ns.write_file(
        "/etc/systemd/system/late.service", "[Service]\nType=oneshot\nExecStart=/bin/true\n"
    )
    ns.daemon_reload()
    ns.systemctl("start", "late.service", check=True)
    assert ns.unit_property("late.service", "Result") == "success"
    # writes inside never reach the host
    ns.run(["sh", "-c", "echo x > /etc/wabridge-written-inside"], check=True)
    assert not Path("/etc/wabridge-written-inside").exists()


@pytest.mark.systemd
def test_wait_for_reports_journal(ns):
    with pytest.raises(AssertionError, match="never-true thing"):
        ns.wait_for(lambda: False, 0.2, "never-true thing")


@pytest.mark.systemd
def test_stop_leaves_nothing_behind_and_restarts():
    for _ in range(2):  # two namespaces in sequence must both work
        n = SystemdNamespace()
        with n:
            name = n.name
            pid = n.pid
            state = n._state
            assert state is not None and state.is_dir()
            assert n.systemctl("is-system-running").stdout.strip() == "running"
            n.run(["systemd-run", "--unit=lingering", "sleep", "1000"], check=True)
            assert _leftovers(name)[0], "cgroup dirs should exist while running"
        assert not Path(f"/proc/{pid}").exists()
        dirs, procs = _leftovers(name)
        assert dirs == [] and procs == [], (dirs, procs)
        assert not state.exists()
        # every mount lived in the private mount namespace
        assert str(state) not in Path("/proc/self/mountinfo").read_text()
        with pytest.raises(RuntimeError):
            _ = n.root  # not running any more


def _ns_pids(name: str) -> list[int]:
    return _leftovers(name)[1]


@pytest.mark.systemd
def test_freeze_stops_every_process_until_thaw():
    ticker = ("[Service]\nExecStart=/bin/sh -c 'i=0; while :; do i=$((i+1)); "
              "echo $i > /run/tick; sleep 0.02; done'\n")
    with SystemdNamespace(files={"/etc/systemd/system/ticker.service": ticker},
                          enable=["ticker.service"]) as n:
        tick = n.root / "run/tick"

        def count() -> int:
            text = tick.read_text().strip() if tick.exists() else ""
            return int(text) if text else 0

        n.wait_for(lambda: count() > 3, 10, "the ticker to tick")
        assert not n.frozen
        n.freeze()
        assert n.frozen
        frozen_at = count()
        time.sleep(0.5)
        assert count() == frozen_at, "a process ran while the namespace was frozen"
        # every process of the namespace (PID 1 included) sits in the freezer
        for pid in _ns_pids(n.name):
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
            assert state in ("D", "S", "T"), (pid, state)
        n.thaw()
        assert not n.frozen
        n.wait_for(lambda: count() > frozen_at + 3, 10, "the ticker to tick again")
        assert n.systemctl("is-system-running").stdout.strip() == "running"


@pytest.mark.systemd
def test_a_frozen_namespace_still_stops_cleanly():
    n = SystemdNamespace()
    n.start()
    name = n.name
    n.freeze()
    n.stop(timeout=5)
    dirs, procs = _leftovers(name)
    assert dirs == [] and procs == [], (dirs, procs)


@pytest.mark.systemd
@pytest.mark.parametrize("frozen_first", [False, True])
def test_crash_kills_every_process_at_once_without_a_clean_stop(tmp_path, frozen_first):
    stopped = tmp_path / "stopped"
    unit = ("[Service]\nExecStart=/bin/sleep infinity\n"
            "ExecStop=/bin/sh -c 'echo clean > /mnt/out/stopped'\n")
    n = SystemdNamespace(binds=[Bind(tmp_path, "/mnt/out", readonly=False)],
                         files={"/etc/systemd/system/graceful.service": unit},
                         enable=["graceful.service"])
    n.start()
    try:
        name, pid1 = n.name, n.pid
        assert n.unit_property("graceful.service", "ActiveState") == "active"
        pids = _ns_pids(name)
        assert pid1 in pids and len(pids) > 3
        if frozen_first:
            n.freeze()
        n.crash()
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), f"{pid} survived the crash"
        assert _leftovers(name) == ([], [])
        assert not stopped.exists(), "a unit was stopped cleanly: that was no crash"
        assert n.pid == 0
        n.start()  # the host boots again, afresh
        assert n.unit_property("graceful.service", "ActiveState") == "active"
    finally:
        n.stop()
    assert stopped.read_text() == "clean\n"  # the control: a real stop does run ExecStop


@pytest.mark.systemd
def test_failed_boot_cleans_up():
    # /proc is a real procfs inside, so installing a file there fails the setup
    n = SystemdNamespace(files={"/proc/wabridge-impossible": "x"})
    with pytest.raises(BootError, match="setup FAILED"):
        n.start(timeout=10)
    dirs, procs = _leftovers(n.name)
    assert dirs == [] and procs == []


@pytest.mark.systemd
def test_interrupt_during_start_cleans_up(monkeypatch):
    n = SystemdNamespace()
    orig = SystemdNamespace._check_launcher
    seen = {}

    def interrupt(self):
        orig(self)
        if self.pid:  # PID 1 exists: interrupt in the middle of the boot
            seen["pid"] = self.pid
            raise KeyboardInterrupt

    monkeypatch.setattr(SystemdNamespace, "_check_launcher", interrupt)
    with pytest.raises(KeyboardInterrupt):
        n.start()
    assert seen
    deadline = time.monotonic() + 5
    while Path(f"/proc/{seen['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{seen['pid']}").exists()
    dirs, procs = _leftovers(n.name)
    assert dirs == [] and procs == []


_PROC_CGROUPS = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n" + "".join(
    f"{c}\t0\t1\t1\n" for c in ("cpu", "cpuacct", "memory", "pids", "net_cls", "net_prio")
)


@pytest.mark.systemd
def test_cgroup_layout_detection_pure_v2():
    layout, hier = _cgroup_layout(
        proc_cgroups=_PROC_CGROUPS,
        self_cgroup="0::/user.slice/user-0.slice/session-3.scope\n",
        mounts="cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n",
    )
    assert layout == "unified"
    assert [(h.version, h.name, h.parent_dir) for h in hier] == [
        (2, "", Path("/sys/fs/cgroup/user.slice/user-0.slice/session-3.scope"))
    ]


@pytest.mark.systemd
def test_cgroup_layout_detection_hybrid_comounted():
    layout, hier = _cgroup_layout(
        proc_cgroups=_PROC_CGROUPS,
        self_cgroup=(
            "5:name=systemd:/x\n4:pids:/\n3:memory:/a/b\n2:cpu,cpuacct:/\n"
            "1:net_cls,net_prio:/\n0::/x\n"
        ),
        mounts=(
            "tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0\n"
            "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
            "cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,xattr,name=systemd 0 0\n"
            "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,cpu,cpuacct 0 0\n"
            "cgroup /sys/fs/cgroup/net_cls,net_prio cgroup rw,net_cls,net_prio 0 0\n"
            "cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0\n"
            "cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0\n"
        ),
    )
    assert layout == "hybrid"
    got = {h.name: (h.version, h.mount_opts, str(h.parent_dir)) for h in hier}
    assert got == {
        "unified": (2, "", "/sys/fs/cgroup/unified/x"),
        "systemd": (1, "none,name=systemd", "/sys/fs/cgroup/systemd/x"),
        "cpu,cpuacct": (1, "cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct"),
        "net_cls,net_prio": (1, "net_cls,net_prio", "/sys/fs/cgroup/net_cls,net_prio"),
        "memory": (1, "memory", "/sys/fs/cgroup/memory/a/b"),
        "pids": (1, "pids", "/sys/fs/cgroup/pids"),
    }


@pytest.mark.systemd
def test_simulated_pure_v2_boot(monkeypatch):
    """On a hybrid host, exercise the pure-v2 code path using only the unified
    hierarchy (a real pure-v2 host runs every other test on that path)."""
    import harness.systemd_ns as mod  # noqa: PLC0415

    layout, hier = mod._cgroup_layout()
    if layout != "hybrid":
        pytest.skip("only simulated on hybrid hosts")
    v2 = [h for h in hier if h.version == 2]
    monkeypatch.setattr(mod, "_cgroup_layout", lambda **_: ("unified", v2))
    # don't touch the host's root subtree_control from a simulation
    monkeypatch.setattr(mod.SystemdNamespace, "_v2_base", lambda _self, h: h.parent_dir)
    n = SystemdNamespace(
        files={"/etc/systemd/system/x@.service": UNIT_FILES["/etc/systemd/system/x@.service"]}
    )
    with n:
        assert n.layout == "unified"
        assert n.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"]).stdout.strip() == "cgroup2fs"
        assert n.systemctl("is-system-running").stdout.strip() == "running"
        n.systemctl("start", "x@v2.service", check=True)
        main = int(n.unit_property("x@v2.service", "MainPID"))
        cg = n.run(["cat", f"/proc/{main}/cgroup"]).stdout
        assert "0::/system.slice/system-x.slice/x@v2.service" in cg
    assert _leftovers(n.name) == ([], [])


@pytest.mark.systemd
@pytest.mark.firestore
def test_a_fleet_of_hosts_shares_postgres_and_each_crashes_or_freezes_alone(
        firestore_emulator, postgres):
    from fleet import Fleet  # noqa: PLC0415 - needs the emulator and the cluster

    with Fleet(plane="firestore", emulator_host=firestore_emulator, postgres=postgres,
               hosts=2) as fleet:
        a, b = fleet.hosts
        assert (a.host_id, b.host_id) == ("host-a", "host-b")
        assert fleet.ns is a.ns  # the single-host API is the first host's

        def doctor(host):
            proc = host.ctl("doctor")
            return {line.split("]", 1)[1].split()[0]: line
                    for line in proc.stdout.splitlines() if line.startswith("[")}

        for host in (a, b):  # each its own controller and admin socket, one database
            lines = doctor(host)
            assert f"controller on {host.host_id}" in lines["admin_socket"], lines
            assert lines["database"].startswith("[ ok ]") and fleet.pg is not None
            assert fleet.pg.name in lines["database"]
        a_pid1 = a.ns.pid
        b.crash()
        assert not b.up and fleet.placement() == {"host-a": [], "host-b": []}
        assert a.ns.pid == a_pid1 and a.prop("wabridge-controller.service",
                                             "ActiveState") == "active"
        a.freeze()
        try:
            assert a.ns.frozen and "--- host-a: frozen" in fleet.journals()
            b.boot()  # the crashed host boots again while the other is paused
            assert "controller on host-b" in doctor(b)["admin_socket"]
        finally:
            a.thaw()
        assert "controller on host-a" in doctor(a)["admin_socket"]
