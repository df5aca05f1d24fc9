"""Boot a real systemd as PID 1 of a private namespace, for tests.

``SystemdNamespace`` starts the host's own systemd (``/lib/systemd/systemd``)
as PID 1 of a fresh PID/mount/UTS/IPC/cgroup namespace. It boots in about
0.4 s and writes nothing to the host disk. Tests reach it over D-Bus, via
``nsenter`` and through ``/proc/<pid1>/root``. The network namespace is
shared on purpose, so units inside can reach services that the test process
runs on the host's 127.0.0.1.

How it works, and why each step is needed
-----------------------------------------

1. **Cgroups.** systemd needs a writable cgroup subtree that it owns. For
   every cgroup hierarchy mounted under ``/sys/fs/cgroup`` (each v1
   controller, ``name=systemd`` and the v2 ``unified`` mount on a hybrid
   host, or one cgroup2 mount on a pure-v2 host) we create
   ``<current cgroup of this process>/wabridge-test-<random>``. The child is
   made under our *current* cgroup, not under the hierarchy root, because
   sandboxes often put us in a non-root cgroup. For a v1 ``cpuset`` we copy
   ``cpuset.cpus``/``cpuset.mems`` from the parent, because the kernel
   rejects tasks in a cpuset that has none. A pure-v2 host needs extra
   care, because a child cgroup gets only the controllers that its parent
   enables in ``cgroup.subtree_control``, and a non-root cgroup that holds
   processes (our test process) cannot enable any. We try to enable them.
   If ``memory`` still isn't available, and our parent cgroup does delegate
   it, we create the container's cgroup as a *sibling* of ours instead.
   ``SystemdNamespace.v2_controllers`` shows what the container got.

2. **Launcher.** We run ``script -qfec "unshare --fork --pid --mount --uts
   --ipc --propagation private bash setup.sh stage1" /dev/null``. ``script``
   gives the container a pty, which becomes ``/dev/console``. systemd prints
   its status output there, and we save it to a log for error messages.
   ``--fork`` makes the setup script PID 1 of the new PID namespace, and it
   later ``exec``s systemd, which then stays PID 1. The network namespace is
   not unshared.

3. **stage1** (PID 1 of the new namespace, still using the host's /proc and
   cgroup fs). It records its host-side pid by reading ``/proc/self/stat``,
   which still resolves in the host's PID namespace. It moves itself into the
   child cgroups. Then it runs ``exec unshare --cgroup`` (with no fork, so it
   stays PID 1), so the root of the cgroup namespace is the child cgroup.
   Only the container's processes are inside it: ``script`` and ``unshare``
   stay in the test process's cgroup. This matters on pure cgroup v2, where
   a cgroup that holds processes cannot delegate controllers.

4. **stage2** builds the new root under a tmpfs, in the private mount
   namespace:

   * It mounts an overlay with ``lowerdir=/`` (the host root, never written)
     and the upper and work dirs on that tmpfs. The container sees the host's
     binaries, Python and systemd units, but every write goes to RAM.
   * It mounts a fresh ``proc``, because a new PID namespace needs its own
     proc. ``/proc/sys`` is bound read-only so that units cannot change
     host-global sysctls, including network sysctls (the netns is shared).
   * It mounts ``sysfs`` read-only. This also makes udev and similar units
     skip themselves through ``ConditionPathIsReadWrite=/sys``. Under it, it
     remakes the cgroup mounts *inside the cgroup namespace* in the host's
     layout: a tmpfs at ``/sys/fs/cgroup`` plus one ``cgroup -o <ctrl>``
     mount for each v1 hierarchy, with ``name=systemd`` and ``unified``
     (cgroup2) on a hybrid host, or a single cgroup2 mount on a pure-v2 host.
     A cgroup mount made from inside a cgroup namespace has the namespace
     root as its root, so systemd sees the child cgroup as ``/``.
   * It creates a private ``/dev`` on tmpfs. The null, zero, full, random,
     urandom and tty nodes are bound from the host. It adds a ``devpts``
     instance of its own with ``ptmx``, a ``/dev/shm`` tmpfs, and
     ``/dev/console``, which is a bind of the ``script`` pty. Nothing can
     reach host block devices.
   * It mounts tmpfs on ``/run`` and ``/tmp``. systemd requires these to be
     writable, and the D-Bus socket lives on ``/run``.
   * It writes a fresh ``/etc/machine-id``, a hostname, an empty
     ``/etc/fstab``, and symlinks from ``/dev/null`` that mask units that
     fail or touch the host in a container. Those units are gettys, logind,
     udev, timesyncd, networking, the kernel-global fs mounts and
     modules/sysctl/binfmt loaders, the audit socket, and every unit
     enabled in the host's ``/etc/systemd/system/*.wants`` (cron, ssh, apt,
     and so on).
   * It writes the boot target ``wabridge-test.target``, which Requires
     basic.target, dbus.socket and dbus.service and Wants the caller's
     ``enable`` units. It also writes drop-ins for system.conf (short
     timeouts, ``DefaultEnvironment=`` from ``env``) and for journald
     (volatile storage), and the caller's ``files``.
   * It bind-mounts the caller's ``binds`` (read-only by default).
   * It runs ``pivot_root`` into the new root and lazily unmounts the old
     root. It then runs ``exec env -i container=wabridge-test
     /lib/systemd/systemd --unit=wabridge-test.target``. The ``container=``
     variable is how systemd learns that it runs in a container.

5. **Readiness.** We wait until ``/proc/<pid1>/root/run/dbus/system_bus_socket``
   exists and ``systemctl is-system-running`` (run through nsenter) reports
   ``running`` or ``degraded``.

6. **Access.** The test process can use D-Bus with
   ``DBUS_SYSTEM_BUS_ADDRESS=unix:path=/proc/<pid1>/root/run/dbus/system_bus_socket``
   (``bus_address`` / ``bus_env()``), for example from pystemd, which opens
   the system bus through libsystemd and honours that variable.
   ``nsenter -t <pid1> -a`` runs commands inside (``run``, ``systemctl``,
   ``journalctl``). Files are written through ``/proc/<pid1>/root``
   (``write_file``).

7. **Crash and freeze** (fleet tests). ``crash()`` SIGKILLs PID 1, as a host that loses
   power: the kernel kills every process of the PID namespace at once, no unit stops
   cleanly, and their sockets close. ``freeze()``/``thaw()`` stop and resume every process
   of the namespace with the cgroup freezer (v1 ``freezer.state``, or v2 ``cgroup.freeze``),
   as a paused VM: sockets stay open, nothing answers, clocks go on.

8. **Stop.** We send ``SIGRTMIN+4`` to PID 1 (systemd's "exit.target") and
   wait, with a time limit, for the launcher to exit. When PID 1 of a PID
   namespace dies, the kernel kills everything else in that namespace. If
   that does not happen in time we use SIGKILL. Then we SIGKILL any process
   still in the child cgroups and ``rmdir`` them deepest-first. systemd
   creates nested dirs such as ``init.scope`` and ``system.slice/...``. All
   mounts lived in the private mount namespace, so they vanish with it.
   Temporary files are kept in ``/dev/shm`` (tmpfs) and are removed.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["BOOT_TARGET", "CGROUP_PREFIX", "Bind", "BootError", "SystemdNamespace", "available"]

SYSTEMD = "/lib/systemd/systemd"
CGROUP_FS = Path("/sys/fs/cgroup")
BOOT_TARGET = "wabridge-test.target"
CONTAINER_ENV = "wabridge-test"
CGROUP_PREFIX = "wabridge-test-"
HOSTNAME = "wabridge-test"
_INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Units that fail in a container or that would touch host-global kernel
# state. Units listed in the host's /etc/systemd/system/*.wants/ are masked
# too (see _host_enabled_units), unless the caller enables them explicitly.
DEFAULT_MASK: tuple[str, ...] = (
    # consoles and logins
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "container-getty@.service",
    "getty-static.service",
    "systemd-logind.service",
    "systemd-user-sessions.service",
    # hardware, time, network
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    "systemd-timesyncd.service",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "systemd-resolved.service",
    "networking.service",
    "ifupdown-pre.service",
    "ifup@.service",
    "systemd-pstore.service",
    "systemd-repart.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-remount-fs.service",
    "systemd-random-seed.service",
    "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service",
    # host-global kernel state: never let the container change it
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "systemd-journald-audit.socket",
    # periodic / daemon noise
    "cron.service",
    "anacron.service",
    "anacron.timer",
    "ssh.service",
    "ssh.socket",
    "rsyslog.service",
    "syslog.socket",
    "apt-daily.timer",
    "apt-daily.service",
    "apt-daily-upgrade.timer",
    "apt-daily-upgrade.service",
    "dpkg-db-backup.timer",
    "dpkg-db-backup.service",
    "e2scrub_all.timer",
    "e2scrub_all.service",
    "e2scrub_reap.service",
    "fstrim.timer",
    "fstrim.service",
    "man-db.timer",
    "man-db.service",
    "logrotate.timer",
    "logrotate.service",
    "systemd-tmpfiles-clean.timer",
)

_NEVER_MASK = {"dbus.service", "dbus.socket", BOOT_TARGET}


@dataclass
class Bind:
    """Host path bind-mounted into the container at ``target`` (absolute)."""

    host: Path
    target: str
    readonly: bool = True


# --------------------------------------------------------------------------
# cgroup layout detection
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hierarchy:
    version: int  # 1 or 2
    mountpoint: Path  # host mount point, e.g. /sys/fs/cgroup/memory
    mount_opts: str  # v1: "memory" / "none,name=systemd"; v2: ""
    current: str  # our cgroup path in this hierarchy, e.g. /process_api/x

    @property
    def name(self) -> str:
        """Mount point relative to /sys/fs/cgroup ("" for a pure v2 root)."""
        rel = os.path.relpath(self.mountpoint, CGROUP_FS)
        return "" if rel == "." else rel

    @property
    def parent_dir(self) -> Path:
        return self.mountpoint / self.current.lstrip("/")


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _cgroup_layout(
    *,
    proc_cgroups: str | None = None,
    self_cgroup: str | None = None,
    mounts: str | None = None,
) -> tuple[str, list[_Hierarchy]]:
    """Return (layout, hierarchies); layout is 'unified', 'hybrid' or 'legacy'.

    The keyword arguments replace /proc/cgroups, /proc/self/cgroup and
    /proc/self/mounts (for tests of the detection itself).
    """
    if proc_cgroups is None:
        proc_cgroups = _read("/proc/cgroups")
    if self_cgroup is None:
        self_cgroup = _read("/proc/self/cgroup")
    if mounts is None:
        mounts = _read("/proc/self/mounts")
    subsystems = {
        line.split()[0] for line in proc_cgroups.splitlines() if line and not line.startswith("#")
    }
    # our own membership: {frozenset(controllers) or "v2": path}
    membership: dict[object, str] = {}
    for line in self_cgroup.splitlines():
        hid, ctrls, path = line.split(":", 2)
        if hid == "0" and ctrls == "":
            membership["v2"] = path
        else:
            membership[frozenset(ctrls.split(","))] = path
    hier: list[_Hierarchy] = []
    seen: set[object] = set()
    for line in mounts.splitlines():
        _src, mnt, fstype, opts, *_rest = line.split()
        mnt = _unescape_mount(mnt)
        if not (mnt == str(CGROUP_FS) or mnt.startswith(str(CGROUP_FS) + "/")):
            continue
        if fstype == "cgroup2":
            if "v2" in seen or "v2" not in membership:
                continue
            seen.add("v2")
            hier.append(_Hierarchy(2, Path(mnt), "", membership["v2"]))
        elif fstype == "cgroup":
            names = [o for o in opts.split(",") if o in subsystems or o.startswith("name=")]
            key = frozenset(names)
            if not names or key in seen or key not in membership:
                continue
            seen.add(key)
            mopts = ",".join(names)
            if all(c.startswith("name=") for c in names):
                mopts = "none," + mopts
            hier.append(_Hierarchy(1, Path(mnt), mopts, membership[key]))
    v1 = [h for h in hier if h.version == 1]
    v2 = [h for h in hier if h.version == 2]
    if v2 and v2[0].mountpoint == CGROUP_FS:
        return "unified", v2
    if v1 and v2:
        return "hybrid", hier
    if v1:
        return "legacy", v1
    raise RuntimeError("no cgroup hierarchy found under /sys/fs/cgroup")


def available() -> str | None:
    """None if the harness can run here, else a human-readable reason."""
    if os.geteuid() != 0:
        return "needs root (uid 0)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} not found"
    for tool in ("unshare", "nsenter", "script", "mount", "pivot_root", "bash", "env"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found in PATH"
    if not Path("/proc/self/ns/cgroup").exists():
        return "kernel lacks cgroup namespaces"
    try:
        _layout, hier = _cgroup_layout()
    except Exception as exc:
        return f"cannot determine cgroup layout: {exc}"
    for h in hier:
        if not os.access(h.parent_dir, os.W_OK):
            return f"cgroup dir {h.parent_dir} not writable"
    # Probe: can we actually create a child cgroup?
    probe = hier[0].parent_dir / f"{CGROUP_PREFIX}probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create cgroup {probe}: {exc}"
    else:
        probe.rmdir()
    return None


# --------------------------------------------------------------------------
# the namespace
# --------------------------------------------------------------------------

_LIVE: set[SystemdNamespace] = set()


@atexit.register
def _cleanup_live() -> None:  # pragma: no cover - safety net
    for ns in list(_LIVE):
        with contextlib.suppress(Exception):
            ns.stop(timeout=5)


class BootError(RuntimeError):
    """The namespace failed to boot; message includes console/setup output."""


class SystemdNamespace:
    """A systemd booted as PID 1 of a private namespace. See module doc."""

    #: extend in a subclass to mask more units
    MASK: tuple[str, ...] = DEFAULT_MASK

    def __init__(
        self,
        *,
        binds: Sequence[Bind] = (),
        files: Mapping[str, str] = {},
        file_modes: Mapping[str, int] = {},
        enable: Sequence[str] = (),
        env: Mapping[str, str] = {},
    ) -> None:
        for b in binds:
            if not str(b.target).startswith("/"):
                raise ValueError(f"bind target must be absolute: {b.target!r}")
        for p in files:
            if not p.startswith("/"):
                raise ValueError(f"file path must be absolute: {p!r}")
        for k in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"bad environment variable name {k!r}")
        self.binds = list(binds)
        self.files = dict(files)
        self.file_modes = dict(file_modes)
        self.enable = list(enable)
        self.env = dict(env)
        self.name = CGROUP_PREFIX + secrets.token_hex(6)
        self.pid: int = 0
        self.boot_seconds: float | None = None
        self.layout: str = ""
        self.v2_controllers: list[str] = []
        self._hier: list[_Hierarchy] = []
        self._cgdirs: list[Path] = []
        self._enabled_subtree: list[tuple[Path, str]] = []
        self._state: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None

    # ----------------------------------------------------------- properties
    @property
    def root(self) -> Path:
        self._require_running()
        return Path(f"/proc/{self.pid}/root")

    @property
    def bus_address(self) -> str:
        self._require_running()
        return f"unix:path=/proc/{self.pid}/root/run/dbus/system_bus_socket"

    @property
    def cgroup_dirs(self) -> list[Path]:
        """Host paths of the child cgroups (one per hierarchy)."""
        return list(self._cgdirs)

    def _require_running(self) -> None:
        if not self.pid:
            raise RuntimeError("SystemdNamespace is not running")

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> SystemdNamespace:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> None:
        """Boot; return once ``systemctl is-system-running`` says running/degraded.

        So the ``enable`` units have finished starting (or failed: "degraded").
        On any failure, including KeyboardInterrupt, everything is torn down
        and the error (``BootError`` carries console/setup/journal output)
        is re-raised.
        """
        if self._proc is not None:
            raise RuntimeError("already started")
        reason = available()
        if reason is not None:
            raise RuntimeError(f"systemd namespace harness unavailable: {reason}")
        t0 = time.monotonic()
        _LIVE.add(self)
        try:
            self._prepare_cgroups()
            self._prepare_state()
            self._launch()
            self._wait_booted(t0 + timeout)
        except BaseException:
            # KeyboardInterrupt included: never leave a half-booted container
            self._cleanup(timeout=5.0, graceful=False)
            raise
        self.boot_seconds = time.monotonic() - t0

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down (SIGRTMIN+4, then SIGKILL after ``timeout``) and remove the
        cgroups and temp files. Idempotent."""
        self._cleanup(timeout=timeout)

    # -------------------------------------------------------------- cgroups
    def _prepare_cgroups(self) -> None:
        self.layout, self._hier = _cgroup_layout()
        for h in self._hier:
            unified = h.version == 2 and self.layout == "unified"
            base = self._v2_base(h) if unified else h.parent_dir
            d = base / self.name
            d.mkdir()
            self._cgdirs.append(d)
            if h.version == 1 and "cpuset" in h.mount_opts.split(","):
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not (d / f).read_text().strip():
                        (d / f).write_text((base / f).read_text())
            if unified:
                self.v2_controllers = (d / "cgroup.controllers").read_text().split()

    def _v2_base(self, h: _Hierarchy) -> Path:
        """Pure v2: pick the cgroup to create our child in, with controllers.

        A child only gets the controllers enabled in its parent's
        ``cgroup.subtree_control``, and a non-root cgroup that holds processes
        (ours does: the test process) cannot enable any (EBUSY). So: try to
        enable them in our current cgroup (works when it is the root); if
        ``memory`` still isn't delegated but our parent delegates it, create
        the container's cgroup as a *sibling* of ours instead.
        """
        base = h.parent_dir

        def subtree(p: Path) -> list[str]:
            return (p / "cgroup.subtree_control").read_text().split()

        enabled = subtree(base)
        for c in (base / "cgroup.controllers").read_text().split():
            if c in enabled:
                continue
            try:
                (base / "cgroup.subtree_control").write_text(f"+{c}")
                self._enabled_subtree.append((base, c))
            except OSError:
                pass  # EBUSY: no-internal-process rule
        if "memory" in subtree(base) or base == h.mountpoint:
            return base
        with contextlib.suppress(OSError):
            if "memory" in subtree(base.parent):
                return base.parent
        return base

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for d in self._cgdirs:
            if not d.exists():
                continue
            for dirpath, _dirs, _files in os.walk(d):
                with contextlib.suppress(OSError):
                    for tok in Path(dirpath, "cgroup.procs").read_text().split():
                        pids.add(int(tok))
        return pids

    def _remove_cgroups(self, deadline: float) -> None:
        remaining = [d for d in self._cgdirs if d.exists()]
        while remaining:
            for pid in self._cgroup_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            failed: list[Path] = []
            for top in remaining:
                dirs = [Path(p) for p, _d, _f in os.walk(top)]
                for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                    try:
                        d.rmdir()
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                            raise
                if top.exists():
                    failed.append(top)
            remaining = failed
            if remaining:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not remove cgroups: {remaining}")
                time.sleep(0.02)
        self._cgdirs = []
        for parent, c in reversed(self._enabled_subtree):
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text(f"-{c}")
        self._enabled_subtree = []

    # --------------------------------------------------------- setup script
    def _prepare_state(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # keep off disk
        self._state = Path(tempfile.mkdtemp(prefix="wabridge-ns-", dir=base))
        (self._state / "base").mkdir()
        payload = self._state / "payload"
        payload.mkdir()
        installs: list[tuple[str, str, int]] = []  # (payload name, container path, mode)

        def add(path: str, text: str, mode: int = 0o644) -> None:
            src = payload / str(len(installs))
            src.write_text(text)
            installs.append((src.name, path, mode))

        wants = " ".join(self.enable)
        add(
            f"/etc/systemd/system/{BOOT_TARGET}",
            "[Unit]\n"
            "Description=wabridge test boot target\n"
            "Requires=basic.target dbus.socket dbus.service\n"
            "After=basic.target dbus.socket dbus.service\n"
            + (f"Wants={wants}\n" if wants else "")
            + "AllowIsolate=yes\n",
        )
        conf = "[Manager]\nDefaultTimeoutStartSec=30s\nDefaultTimeoutStopSec=5s\nShowStatus=yes\n"
        if self.env:
            quoted = " ".join(
                '"' + f"{k}={v}".replace("\\", "\\\\").replace('"', '\\"') + '"'
                for k, v in self.env.items()
            )
            conf += f"DefaultEnvironment={quoted}\n"
        add("/etc/systemd/system.conf.d/50-wabridge-test.conf", conf)
        add(
            "/etc/systemd/journald.conf.d/50-wabridge-test.conf",
            "[Journal]\nStorage=volatile\nRateLimitIntervalSec=0\nForwardToConsole=no\nForwardToWall=no\n",
        )
        add("/etc/machine-id", secrets.token_hex(16) + "\n", 0o444)
        add("/etc/hostname", HOSTNAME + "\n")
        add("/etc/fstab", "# wabridge-test: intentionally empty\n")
        for path, text in self.files.items():
            add(path, text, self.file_modes.get(path, 0o644))

        # never mask what the caller enables or ships a unit file for
        enabled = set(self.enable) | _NEVER_MASK
        enabled |= {Path(p).name for p in self.files if p.startswith("/etc/systemd/system/")}
        mask = [u for u in dict.fromkeys([*self.MASK, *_host_enabled_units()]) if u not in enabled]

        st = shlex.quote(str(self._state))
        lines = [
            "#!/bin/bash",
            "# generated by tests/harness/systemd_ns.py",
            "set -euo pipefail",
            f"STATE={st}",
            'exec 9>>"$STATE/setup.trace"; BASH_XTRACEFD=9; set -x',
            "trap 'echo \"wabridge-ns setup FAILED at line $LINENO: $BASH_COMMAND\" >&2' ERR",
            'if [ "${1:-}" = stage1 ]; then',
            # host pid: /proc is still the host's procfs here
            "  read -r hostpid _ < /proc/self/stat",
            '  echo "$hostpid" > "$STATE/pid.tmp"; mv "$STATE/pid.tmp" "$STATE/pid"',
        ]
        for d in self._cgdirs:
            lines.append(f"  echo 0 > {shlex.quote(str(d / 'cgroup.procs'))}")
        lines += [
            "  exec 9>&-",
            '  exec unshare --cgroup /bin/bash "$0" stage2',
            "fi",
            'B="$STATE/base"; R="$B/root"',
            'mount -t tmpfs -o mode=0755 wabridge-test "$B"',
            'mkdir "$B/upper" "$B/work" "$R"',
            'mount -t overlay overlay -o "lowerdir=/,upperdir=$B/upper,workdir=$B/work" "$R"',
            # /proc
            'mount -t proc -o nosuid,nodev,noexec proc "$R/proc"',
            'mount --bind "$R/proc/sys" "$R/proc/sys"',
            'mount -o remount,bind,ro,nosuid,nodev,noexec "$R/proc/sys"',
            # /sys and cgroups
            'mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"',
        ]
        if self.layout == "unified":
            lines.append('mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"')
        else:
            lines.append('mount -t tmpfs -o mode=0755,nosuid,nodev,noexec tmpfs "$R/sys/fs/cgroup"')
            for h in self._hier:
                tgt = shlex.quote(h.name)
                lines.append(f'mkdir -p "$R/sys/fs/cgroup/"{tgt}')
                if h.version == 1:
                    lines.append(
                        f"mount -t cgroup -o nosuid,nodev,noexec,{h.mount_opts} cgroup "
                        f'"$R/sys/fs/cgroup/"{tgt}'
                    )
                else:
                    lines.append(
                        f'mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup/"{tgt}'
                    )
            # symlinks such as cpu -> cpu,cpuacct
            for entry in sorted(CGROUP_FS.iterdir()):
                if entry.is_symlink():
                    lines.append(
                        f"ln -s {shlex.quote(os.readlink(entry))} "
                        f'"$R/sys/fs/cgroup/"{shlex.quote(entry.name)}'
                    )
            lines.append('mount -o remount,ro,nosuid,nodev,noexec,mode=0755 "$R/sys/fs/cgroup"')
        lines += [
            # /dev
            'mount -t tmpfs -o mode=0755,nosuid,size=64m tmpfs "$R/dev"',
            "for n in null zero full random urandom tty; do",
            '  touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"',
            "done",
            'mkdir "$R/dev/pts" "$R/dev/shm"',
            "mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec"
            ' devpts "$R/dev/pts"',
            'ln -s pts/ptmx "$R/dev/ptmx"',
            'mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"',
            'ln -s /proc/self/fd "$R/dev/fd"',
            'ln -s /proc/self/fd/0 "$R/dev/stdin"',
            'ln -s /proc/self/fd/1 "$R/dev/stdout"',
            'ln -s /proc/self/fd/2 "$R/dev/stderr"',
            'touch "$R/dev/console"; mount --bind "$(tty)" "$R/dev/console"',
            # /run /tmp
            'mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"',
            'mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"',
            "hostname " + HOSTNAME,
            # masks
            'mkdir -p "$R/etc/systemd/system"',
        ]
        for u in mask:
            q = shlex.quote(u)
            lines.append(
                f'rm -f "$R/etc/systemd/system/"{q}; ln -s /dev/null "$R/etc/systemd/system/"{q}'
            )
        for src, path, mode in installs:
            lines.append(
                f'install -D -m {mode:04o} "$STATE/payload/"{shlex.quote(src)} '
                f'"$R"{shlex.quote(path)}'
            )
        for b in self.binds:
            host = Path(b.host).resolve()
            if not host.exists():
                raise FileNotFoundError(f"bind source does not exist: {host}")
            tgt = '"$R"' + shlex.quote(b.target)
            if host.is_dir():
                lines.append(f"mkdir -p {tgt}")
            else:
                lines.append(f'mkdir -p "$(dirname {tgt})"; touch {tgt}')
            ro = " -o ro" if b.readonly else ""
            lines.append(f"mount --bind{ro} {shlex.quote(str(host))} {tgt}")
        lines += [
            'mkdir -p "$R/.wabridge-oldroot"',
            'cd "$R"',
            "pivot_root . .wabridge-oldroot",
            "cd /",
            "umount -l /.wabridge-oldroot",
            "rmdir /.wabridge-oldroot",
            "set +x; exec 9>&-",
            f"exec env -i container={CONTAINER_ENV} {SYSTEMD} --unit={BOOT_TARGET}",
        ]
        script = self._state / "setup.sh"
        script.write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        assert self._state is not None
        inner = "exec " + shlex.join(
            [
                "unshare",
                "--fork",
                "--pid",
                "--mount",
                "--uts",
                "--ipc",
                "--propagation",
                "private",
                "/bin/bash",
                str(self._state / "setup.sh"),
                "stage1",
            ]
        )
        self._console = open(self._state / "console.log", "wb")  # noqa: SIM115 - closed in _cleanup
        env = {"PATH": _INNER_PATH, "SHELL": "/bin/sh", "TERM": "dumb", "LANG": "C.UTF-8"}
        self._proc = subprocess.Popen(
            ["script", "-qfec", inner, "/dev/null"],
            stdin=subprocess.PIPE,  # never written; EOF only when we close it
            stdout=self._console,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a terminal ^C reaches us, not the launcher
            close_fds=True,
        )

    def _wait_booted(self, deadline: float) -> None:
        assert self._state is not None and self._proc is not None
        pidfile = self._state / "pid"
        while not pidfile.exists():
            self._check_launcher()
            self._check_deadline(deadline, "container PID 1 to start")
            time.sleep(0.005)
        self.pid = int(pidfile.read_text())
        nspid = _status_field(self.pid, "NSpid")
        if nspid is None or nspid.split()[-1] != "1":
            raise BootError(
                f"pid {self.pid} is not PID 1 of a namespace (NSpid={nspid!r})"
                + self._diagnostics()
            )
        sock = Path(f"/proc/{self.pid}/root/run/dbus/system_bus_socket")
        while True:
            self._check_launcher()
            if sock.exists():
                state = self.run(["systemctl", "is-system-running"], timeout=5).stdout.strip()
                if state in ("running", "degraded"):
                    return
                if state in ("stopping", "offline", "maintenance"):
                    raise BootError(f"system state {state!r} during boot" + self._diagnostics())
            self._check_deadline(deadline, "systemctl is-system-running to report running/degraded")
            time.sleep(0.02)

    def _check_launcher(self) -> None:
        assert self._proc is not None
        rc = self._proc.poll()
        if rc is not None:
            raise BootError(
                f"namespace launcher exited with status {rc} during boot" + self._diagnostics()
            )

    def _check_deadline(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise BootError(f"timed out waiting for {what}" + self._diagnostics())

    def _diagnostics(self) -> str:
        out = []
        if self._state is not None:
            for name in ("console.log", "setup.trace"):
                p = self._state / name
                with contextlib.suppress(OSError):
                    text = p.read_bytes().decode("utf-8", "replace")
                    tail = "\n".join(text.splitlines()[-60:])
                    out.append(f"\n--- {name} (tail) ---\n{tail}")
        if self.pid and Path(f"/proc/{self.pid}/root/run/systemd/private").exists():
            with contextlib.suppress(Exception):
                out.append(
                    "\n--- systemctl --failed ---\n"
                    + self.systemctl("--failed", "--no-legend").stdout
                )
                out.append(
                    "\n--- systemctl list-jobs ---\n"
                    + self.systemctl("list-jobs", "--no-legend").stdout
                )
                out.append("\n--- journal (tail) ---\n" + self.journalctl("-n", "40"))
        return "".join(out)

    # -------------------------------------------------------------- cleanup
    # ------------------------------------------------------- crash and freeze
    def crash(self, timeout: float = 10.0) -> None:
        """SIGKILL PID 1 (the host crashes): everything in the namespace dies at once.
        Returns once the launcher has exited and the cgroups are gone; ``start()`` boots it
        afresh (a rebooted host: nothing of the old /run, /var or /tmp survives)."""
        self._require_running()
        self._thaw_if_frozen()  # a frozen task does not die until thawed
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self._cleanup(timeout=timeout, graceful=False)

    def freeze(self, timeout: float = 10.0) -> None:
        """Freeze every process of the namespace (a paused VM); returns once all are."""
        self._require_running()
        path, on, _off = self._freezer()
        path.write_text(on)
        self._wait_freezer(path, frozen=True, deadline=time.monotonic() + timeout)

    def thaw(self, timeout: float = 10.0) -> None:
        """Resume a frozen namespace; returns once every process runs again."""
        self._require_running()
        path, _on, off = self._freezer()
        path.write_text(off)
        self._wait_freezer(path, frozen=False, deadline=time.monotonic() + timeout)

    @property
    def frozen(self) -> bool:
        if not self.pid or not self._cgdirs:
            return False
        path, _on, _off = self._freezer()
        return self._freezer_state(path) != "THAWED"

    def _freezer(self) -> tuple[Path, str, str]:
        """The file that freezes the namespace's cgroup, and what to write to freeze and
        thaw: the v1 freezer hierarchy when there is one, else cgroup v2's own freezer."""
        for h, d in zip(self._hier, self._cgdirs, strict=False):  # a prefix while booting
            if h.version == 1 and "freezer" in h.mount_opts.split(","):
                return d / "freezer.state", "FROZEN", "THAWED"
        for h, d in zip(self._hier, self._cgdirs, strict=False):  # a prefix while booting
            if h.version == 2 and (d / "cgroup.freeze").exists():
                return d / "cgroup.freeze", "1", "0"
        raise RuntimeError("no cgroup freezer here (neither v1 freezer nor cgroup.freeze)")

    @staticmethod
    def _freezer_state(path: Path) -> str:
        """THAWED, FREEZING or FROZEN (v2's cgroup.events mapped onto v1's words)."""
        if path.name == "freezer.state":
            return path.read_text().strip()
        events = dict(line.split() for line in (path.parent / "cgroup.events").read_text()
                      .splitlines() if line)
        if events.get("frozen") == "1":
            return "FROZEN"
        return "FREEZING" if path.read_text().strip() == "1" else "THAWED"

    def _wait_freezer(self, path: Path, *, frozen: bool, deadline: float) -> None:
        want = "FROZEN" if frozen else "THAWED"
        while (state := self._freezer_state(path)) != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cgroup freezer still {state} (wanted {want})")
            time.sleep(0.01)

    def _thaw_if_frozen(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            path, _on, off = self._freezer()
            if self._freezer_state(path) != "THAWED":
                path.write_text(off)

    def _cleanup(self, timeout: float, graceful: bool = True) -> None:
        deadline = time.monotonic() + max(timeout, 0.5)
        self._thaw_if_frozen()  # frozen tasks neither stop nor die
        proc, self._proc = self._proc, None
        pid, self.pid = self.pid, 0
        try:
            if proc is not None and not pid and self._state is not None:
                # interrupted before we learned PID 1: it may be about to appear
                pidfile = self._state / "pid"
                limit = time.monotonic() + 1.0
                while proc.poll() is None and time.monotonic() < limit:
                    if pidfile.exists():
                        with contextlib.suppress(ValueError, OSError):
                            pid = int(pidfile.read_text())
                        break
                    time.sleep(0.005)
            if proc is not None:
                if pid and _pid_alive(pid):
                    # systemd handles SIGRTMIN+4 (start exit.target). The setup
                    # script that precedes it has no handler, and PID 1 of a
                    # namespace ignores such signals, so kill it outright.
                    graceful = graceful and _comm(pid) == "systemd"
                    sig = signal.SIGRTMIN + 4 if graceful else signal.SIGKILL
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    if pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)  # kills the whole PID namespace
                    try:
                        proc.wait(timeout=3)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait(timeout=3)
                if proc.stdin:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
            elif pid and _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._remove_cgroups(time.monotonic() + 5)
        finally:
            if self._console is not None:
                self._console.close()
                self._console = None
            if self._state is not None:
                shutil.rmtree(self._state, ignore_errors=True)
                self._state = None
            _LIVE.discard(self)

    # --------------------------------------------------------------- access
    @contextlib.contextmanager
    def bus_env(self) -> Iterator[str]:
        """Set DBUS_SYSTEM_BUS_ADDRESS to this container's bus for the block."""
        addr = self.bus_address
        old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = addr
        try:
            yield addr
        finally:
            if old is None:
                os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
            else:
                os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside all of the container's namespaces (nsenter -a).

        The process gets a clean environment; it is not in the container's
        cgroup (it stays in the caller's), so it is not a systemd unit.
        """
        self._require_running()
        env = {
            "PATH": _INNER_PATH,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *argv],
            check=check,
            timeout=timeout,
            input=input,
            text=True,
            capture_output=True,
            env=env,
        )

    def systemctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def journalctl(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", "-q", *args]).stdout

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload", check=True)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file into the running container (via /proc/<pid1>/root).

        After adding or changing unit files call ``daemon_reload()``.
        """
        if not path.startswith("/"):
            raise ValueError(f"path must be absolute: {path!r}")
        dst = self.root / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.wabridge-tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, dst)

    def unit_property(self, unit: str, prop: str) -> str:
        r = self.systemctl("show", "-p", prop, "--value", unit, check=True)
        return r.stdout.rstrip("\n")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if predicate():
                return
            if time.monotonic() > deadline:
                journal = ""
                with contextlib.suppress(Exception):
                    journal = self.journalctl("-n", "40")
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}\n"
                    f"--- last journal lines ---\n{journal}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def translate_pid(self, container_pid: int) -> int:
        """Host pid of the process that has ``container_pid`` inside."""
        self._require_running()
        if container_pid == 1:
            return self.pid
        ns = os.readlink(f"/proc/{self.pid}/ns/pid")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                    continue
                nspid = _status_field(int(entry), "NSpid")
                if nspid and int(nspid.split()[-1]) == int(container_pid):
                    return int(entry)
        raise LookupError(f"no process with pid {container_pid} in the container")


def _status_field(pid: int, field: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _host_enabled_units() -> list[str]:
    """Units the host enables via /etc/systemd/system/*.wants (not targets)."""
    units: list[str] = []
    etc = Path("/etc/systemd/system")
    with contextlib.suppress(OSError):
        for wants in sorted(etc.glob("*.wants")) + sorted(etc.glob("*.requires")):
            for u in sorted(wants.iterdir()):
                if u.name.endswith(
                    (".service", ".socket", ".timer", ".path", ".mount", ".automount")
                ):
                    units.append(u.name)
    return units
