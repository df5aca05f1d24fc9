"""A whole wabridge fleet for end-to-end tests: real systemd, real units, real CLI.

``Fleet`` boots a :class:`SystemdNamespace` with the project's own unit files, the repo bound
read-only at ``/usr/lib/wabridge/src`` and the venv at its own path (world-readable, built from
Debian's python3, so DynamicUser workers can run it). Around it, on the host's 127.0.0.1: the
simulator (``wabridge-sim`` as a subprocess), the fake Anthropic API (a thread), and, for the
Firestore control plane, the emulator (shared per test session). The controller runs as a
unit inside, as in production, so SO_PEERCRED PIDs and GetUnitByPID agree.

``Fleet(hosts=3, postgres=cluster, ...)`` boots several such hosts (:class:`Host`: one
namespace each, its own ``controller.host_id``, /run with its own admin and worker sockets,
its own journal) sharing the network, one PostgreSQL database (``storage.backend =
postgresql``: its own controller role and database in the session's cluster), the control
plane's emulator project, one simulator and one fake Messages API. A host can crash (SIGKILL
of its PID 1), freeze and thaw (cgroup freezer), and boot again. The single-host methods
(``fleet.ns``, ``fleet.journal(...)``...) act on the first host, as they always did.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fakes.anthropic_api import FakeAnthropicAPI
from harness.net import free_port
from harness.packaged import render_toml
from harness.systemd_ns import Bind, SystemdNamespace
from harness.wait import wait_until

REPO = Path(__file__).resolve().parent.parent
SRC = "/usr/lib/wabridge/src"
VENV = Path(sys.prefix)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {url} -> {exc.code}: {exc.read()!r}") from None


class SimClient:
    """The simulator's HTTP API (``sim/server.py``) at ``url``: a phone scans, a contact
    writes, an inbox is read."""

    def __init__(self, url: str) -> None:
        self.url = url

    def healthy(self) -> bool:
        try:
            http("GET", f"{self.url}/api/health")
        except (OSError, AssertionError):
            return False
        return True

    def scan(self, phone: str, code: str) -> Any:
        return http("POST", f"{self.url}/api/phones/{phone}/scan", {"code": code})

    def send(self, sender: str, to: str, text: str, **extra: Any) -> str:
        return str(
            http(
                "POST",
                f"{self.url}/api/messages",
                {"from": sender, "to": to, "text": text, **extra},
            )["id"]
        )

    def owner_send(self, account: str, text: str, to: str | None = None) -> str:
        """The account's own phone writes: in its self chat, or in the chat with ``to``."""
        body = {"text": text} if to is None else {"text": text, "to": to}
        return str(http("POST", f"{self.url}/api/accounts/{account}/messages", body)["id"])

    def inbox(self, phone: str) -> list[dict[str, Any]]:
        return list(http("GET", f"{self.url}/api/contacts/{phone}/inbox"))

    def self_chat(self, account: str) -> list[dict[str, Any]]:
        return list(http("GET", f"{self.url}/api/accounts/{account}/self-chat"))

    def account(self, phone: str) -> dict[str, Any]:
        return dict(http("GET", f"{self.url}/api/accounts/{phone}"))

    def trigger(self, phone: str, outcome: str, **body: Any) -> Any:
        return http("POST", f"{self.url}/api/accounts/{phone}/{outcome}", body)

    def connections(self, phone: str) -> dict[str, Any]:
        """Every interval each device of ``phone`` was connected, and its double
        connections (``sim.world.World.connections``)."""
        return dict(http("GET", f"{self.url}/api/devices/{phone}/connections"))

    def all_connections(self) -> dict[str, Any]:
        """:meth:`connections` of every account, with the totals."""
        return dict(http("GET", f"{self.url}/api/connections"))

    def ask(self, contact: str, account: str, text: str, timeout: float = 60,
            diagnostics: Callable[[], str] | None = None) -> dict[str, Any]:
        """A contact sends ``text``; returns the reply that quotes it."""
        before = len(self.inbox(contact))
        wa_id = self.send(contact, account, text)

        def reply() -> Any:
            got = [m for m in self.inbox(contact)[before:] if m.get("quoted_id") == wa_id]
            return got[0] if got else None

        return dict(wait_until(reply, timeout, f"a reply to {text!r}", diagnostics))


class Sim(SimClient):
    """``wabridge-sim`` as a subprocess on 127.0.0.1."""

    def __init__(self, qr_rotate: float = 20.0, heartbeat: float = 30.0) -> None:
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "WABRIDGE_CONFIG": "/dev/null",
            "WABRIDGE__SIM__QR_ROTATE": str(qr_rotate),
            "WABRIDGE__LOG__FORMAT": "json",
        }
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sim.main", "--listen", f"127.0.0.1:{self.port}",
             "--heartbeat", str(heartbeat)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_until(self._healthy, 20, "wabridge-sim to answer")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"wabridge-sim exited: {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
        return self.healthy()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def firestore_client(emulator_host: str, project: str) -> Any:
    """A Firestore client of the emulator at ``emulator_host``, anonymous (no metadata-server
    probe). Create it after the subprocesses that must not inherit it are forked."""
    os.environ["FIRESTORE_EMULATOR_HOST"] = emulator_host
    os.environ["NO_GCE_CHECK"] = "true"
    from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415
    from google.cloud import firestore  # noqa: PLC0415

    return firestore.Client(project=project, credentials=AnonymousCredentials())


def wrapper(module: str) -> str:
    return f'#!/bin/sh\nexport PYTHONPATH={SRC}\nexec {VENV}/bin/python -m {module} "$@"\n'


def unit_files() -> dict[str, str]:
    return {
        f"/etc/systemd/system/{p.name}": p.read_text()
        for p in (REPO / "systemd").iterdir()
        if p.suffix in (".service", ".slice")
    }


class HostOps:
    """What a test does with one host's systemd (``self.ns``): units, journal, drop-ins,
    processes. :class:`Host` is one host of a fleet; :class:`Fleet` acts on its first."""

    ns: SystemdNamespace

    def unit(self, user: str) -> str:
        from wabridge.units import worker_unit  # noqa: PLC0415

        return worker_unit(user)

    def systemctl(self, *args: str) -> str:
        """``systemctl`` inside the host; a failure shows its output and the journal tail."""
        proc = self.ns.systemctl(*args)
        if proc.returncode != 0:
            raise AssertionError(
                f"systemctl {' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}\n"
                f"--- journal:\n{self.journal(None, '-n', '60')}")
        return proc.stdout

    def prop(self, unit: str, name: str) -> str:
        return self.ns.unit_property(unit, name)

    def wait_unit(self, unit: str, state: str, timeout: float = 30) -> None:
        wait_until(
            lambda: self.prop(unit, "ActiveState") == state,
            timeout,
            f"{unit} to be {state}",
            lambda: self.journal(unit),
        )

    def journal(self, unit: str | None = None, *args: str) -> str:
        extra = ["-u", unit] if unit else []
        return self.ns.journalctl("--no-pager", "-o", "cat", *extra, *args)

    def unit_pids(self, unit: str) -> list[int]:
        out = self.ns.run(["systemctl", "show", "-p", "ControlGroup", "--value", unit]).stdout
        cg = out.strip()
        if not cg:
            return []
        path = self.ns.root / "sys/fs/cgroup/systemd" / cg.lstrip("/") / "cgroup.procs"
        if not path.exists():
            path = self.ns.root / "sys/fs/cgroup" / cg.lstrip("/") / "cgroup.procs"
        try:
            return [int(x) for x in path.read_text().split()]
        except FileNotFoundError:
            return []

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``wabridgectl`` inside the host, as an operator runs it."""
        return self.ns.run(["wabridgectl", *args], timeout=timeout)

    # --- supervision helpers (tests/test_supervision.py, bench/run.py) --------------------
    def dropin_path(self, user: str, name: str = "90-test.conf") -> str:
        return f"/etc/systemd/system/{self.unit(user)}.d/{name}"

    def set_dropin(self, user: str, text: str, name: str = "90-test.conf") -> None:
        """Write a drop-in for one worker instance (it wins over the controller's
        ``/run/systemd/system/...d/50-wabridge.conf``) and reload systemd."""
        self.ns.write_file(self.dropin_path(user, name), text)
        self.ns.daemon_reload()

    def clear_dropin(self, user: str, name: str = "90-test.conf") -> None:
        path = self.ns.root / self.dropin_path(user, name).lstrip("/")
        if path.exists():
            path.unlink()
            self.ns.daemon_reload()

    def props(self, unit: str, *names: str) -> dict[str, str]:
        out = self.ns.run(["systemctl", "show", "-p", ",".join(names), unit]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def pss_bytes(self, unit: str) -> int:
        """Proportional set size of every process of ``unit`` (smaps_rollup, host PIDs)."""
        total = 0
        for pid in self.unit_pids(unit):
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        return total

    def uid_of(self, user: str) -> int:
        """The UID of the user's worker (the owner of its state directory)."""
        out = self.ns.run(["stat", "-c", "%u", f"/var/lib/private/wabridge/{user}"], check=True)
        return int(out.stdout)

    # --- processes (tests/test_security.py, bench/chaos.py) --------------------------------
    def processes(self) -> list[dict[str, Any]]:
        """Every process of the namespace as systemd sees it: ``pid``, ``ppid`` (namespace
        PIDs), ``uid``, ``cgroup`` (the ``name=systemd`` / cgroup2 path inside the namespace,
        e.g. ``/wabridge.slice/wabridge-worker@alice.service``) and ``cmdline``. Kernel
        threads and the probe itself (an nsenter'd process, in no cgroup of the namespace)
        are left out."""
        out = self.ns.run(["/usr/bin/python3", "-c", _PS_SCRIPT], timeout=30).stdout
        return [dict(p) for p in json.loads(out or "[]")]


class Host(HostOps):
    """One host of a fleet: its own systemd namespace, configuration and host id."""

    def __init__(self, host_id: str, files: dict[str, str], modes: dict[str, int],
                 credentials: bool = False) -> None:
        self.host_id = host_id
        self.credentials = credentials
        self.ns = SystemdNamespace(
            binds=[Bind(REPO, SRC), Bind(VENV, str(VENV))],
            files=files,
            file_modes=modes,
            enable=["wabridge-controller.service"],
        )

    def __repr__(self) -> str:
        return f"Host({self.host_id!r}, pid={self.ns.pid})"

    @property
    def up(self) -> bool:
        """Booted and not crashed (a frozen host is up)."""
        return bool(self.ns.pid)

    def boot(self, timeout: float = 30) -> None:
        """Boot (again, after a crash: a fresh /run, /var and /tmp) until the controller is
        active."""
        self.ns.start()
        if self.credentials:
            # systemd makes / shared at boot, except in a container (the harness): a unit's
            # credential ramfs is mounted in a child namespace and must propagate back
            self.ns.run(["mount", "--make-rshared", "/"], check=True)
        self.wait_unit("wabridge-controller.service", "active", timeout)

    def crash(self) -> None:
        """SIGKILL the host's PID 1: every process dies at once, no unit stops cleanly."""
        self.ns.crash()

    def freeze(self) -> None:
        """Pause every process of the host (a paused VM): its sockets stay open, silent."""
        self.ns.freeze()

    def thaw(self) -> None:
        self.ns.thaw()

    def workers(self) -> list[str]:
        """The users whose worker unit is active (or activating) here."""
        if not self.up or self.ns.frozen:
            return []
        out = self.ns.run(["systemctl", "list-units", "--plain", "--no-legend",
                           "--state=active,activating,reloading", "wabridge-worker@*"]).stdout
        from wabridge.units import user_of_unit  # noqa: PLC0415

        users = [user_of_unit(line.split()[0]) for line in out.splitlines() if line.strip()]
        return sorted(u for u in users if u)

    def stop(self) -> None:
        if self.ns.pid:
            self.ns.stop()


class PostgresDatabase:
    """A fleet's own database in the session's cluster, owned by its own controller role
    (``CREATEROLE``, as the README's PostgreSQL section asks), whose password the hosts get in
    ``/etc/wabridge/postgres-password`` (what the controller unit loads)."""

    def __init__(self, cluster: Any) -> None:
        import psycopg  # noqa: PLC0415
        from psycopg import sql  # noqa: PLC0415

        token = secrets.token_hex(4)
        self.cluster = cluster
        self.role = f"wbctl_{token}"
        self.name = f"wabridge_{token}"
        self.password = secrets.token_urlsafe(16)
        with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
                sql.Identifier(self.role), sql.Literal(self.password)))
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(self.name), sql.Identifier(self.role)))

    @property
    def url(self) -> str:
        return str(self.cluster.url(self.role, self.name))

    def connect(self) -> Any:
        """A superuser connection to this database (tests read leases and stores)."""
        import psycopg  # noqa: PLC0415

        return psycopg.connect(self.cluster.conninfo(self.name), autocommit=True)


def host_names(count: int) -> list[str]:
    return [f"host-{letter}" for letter in string.ascii_lowercase[:count]]


class Fleet(HostOps):
    """Everything a scenario needs; use as a context manager.

    ``hosts``: how many hosts (or their ids); more than one needs a shared control plane
    (``plane="firestore"``: the local plane lives on one host). ``postgres``: the session's
    cluster (``conftest.postgres``): the accounts' state goes to PostgreSQL. ``fleet``: the
    ``[fleet]`` section (``enabled`` and the timings). ``sim_heartbeat``: how long the sim
    waits for a silent device (a frozen host's) before dropping it.
    """

    def __init__(
        self,
        *,
        plane: str,
        emulator_host: str = "",
        api_key: bool = True,
        config_extra: str = "",
        config: dict[str, dict[str, Any]] | None = None,
        extra_files: dict[str, str] | None = None,
        qr_rotate: float = 20.0,
        hosts: int | Sequence[str] = 1,
        postgres: Any = None,
        fleet: dict[str, Any] | None = None,
        sim_heartbeat: float = 30.0,
    ) -> None:
        ids = host_names(hosts) if isinstance(hosts, int) else list(hosts)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"hosts: need distinct host ids, got {ids}")
        if len(ids) > 1 and plane == "local":
            raise ValueError("several hosts need a shared control plane; the local one is "
                             "per host")
        self.plane_kind = plane
        self.project = f"demo-{secrets.token_hex(4)}"
        self.emulator_host = emulator_host
        self.hosts: list[Host] = []
        self.api = FakeAnthropicAPI()
        self.api.start()
        self.sim = Sim(qr_rotate=qr_rotate, heartbeat=sim_heartbeat)
        try:
            self.pg = PostgresDatabase(postgres) if postgres is not None else None
            self.hosts = [self._host(host_id, len(ids) > 1, plane, api_key, config_extra,
                                     config, extra_files, fleet) for host_id in ids]
        except BaseException:
            self.sim.stop()
            self.api.stop()
            raise
        self.ns = self.hosts[0].ns
        self._db: Any = None
        self._fleet = fleet or {}

    def _host(self, host_id: str, named: bool, plane: str, api_key: bool, config_extra: str,
              config: dict[str, dict[str, Any]] | None, extra_files: dict[str, str] | None,
              fleet: dict[str, Any] | None) -> Host:
        sections: dict[str, dict[str, Any]] = {
            "controller": {"control_plane": plane, "metrics_listen": "",
                           "metrics_interval": 1.0},
            "worker": {"backend": "sim", "sim_url": self.sim.url},
            "conversation": {"debounce": 0.2},
            "claude": {"turn_timeout": 60.0},
            # pacing protects real numbers from bans; the simulator needs none (tests of
            # pacing set it back)
            "limits": {"send_gap": 0.0, "send_jitter": 0.0},
        }
        if named:  # one host keeps today's default (its hostname)
            sections["controller"]["host_id"] = host_id
        if plane == "firestore":
            sections["firebase"] = {"emulator_host": self.emulator_host,
                                    "project_id": self.project}
        if self.pg is not None:
            sections["storage"] = {"backend": "postgresql", "postgres_url": self.pg.url}
        if fleet is not None:
            sections["fleet"] = dict(fleet)
        for name, values in (config or {}).items():
            sections.setdefault(name, {}).update(values)
        config_text = render_toml(sections) + config_extra
        worker_env = f"ANTHROPIC_BASE_URL={self.api.base_url}\n"
        if api_key:
            worker_env += "ANTHROPIC_API_KEY=test-key\n"
        files = {
            **unit_files(),
            "/etc/wabridge/wabridge.toml": config_text,
            "/etc/wabridge/worker.env": worker_env,
            "/usr/bin/wabridge-worker": wrapper("agent.main"),
            "/usr/bin/wabridge-controller": wrapper("controller.main"),
            "/usr/bin/wabridgectl": wrapper("controller.ctl"),
            **(extra_files or {}),
        }
        modes = {p: 0o755 for p in files if p.startswith("/usr/bin/")}
        if self.pg is not None:
            files["/etc/wabridge/postgres-password"] = self.pg.password
            modes["/etc/wabridge/postgres-password"] = 0o600
        return Host(host_id, files, modes, credentials=self.pg is not None)

    def __enter__(self) -> Fleet:
        try:
            for host in self.hosts:
                host.boot()
            if self._fleet.get("enabled") and self.pg is not None:
                self.wait_hosts_alive()
        except BaseException:
            self.close()
            raise
        return self

    def wait_hosts_alive(self, timeout: float = 60) -> None:
        """Until every host's controller heartbeats (as an operator brings a fleet up before
        adding accounts): accounts are spread over the hosts alive when they are placed, and
        a host that joins later takes only new accounts."""
        assert self.pg is not None
        dead_after = float(self._fleet.get("host_dead_seconds", 20.0))
        want = {h.host_id for h in self.hosts}

        def alive() -> bool:
            import psycopg  # noqa: PLC0415 - only fleets need it

            try:
                with self.pg.connect() as conn:  # type: ignore[union-attr]
                    rows = conn.execute(
                        "SELECT host_id FROM wabridge_fleet.hosts "
                        "WHERE now() - heartbeat_at < make_interval(secs => %s)",
                        (dead_after,)).fetchall()
            except psycopg.errors.UndefinedTable:  # before the first controller's migration
                return False
            return want <= {r[0] for r in rows}

        wait_until(alive, timeout, "every host to heartbeat", self.journals)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            for host in self.hosts:
                with contextlib.suppress(Exception):
                    host.stop()
        finally:
            self.sim.stop()
            self.api.stop()

    def host(self, host_id: str) -> Host:
        for host in self.hosts:
            if host.host_id == host_id:
                return host
        raise KeyError(f"no host {host_id!r} (have {[h.host_id for h in self.hosts]})")

    def placement(self) -> dict[str, list[str]]:
        """host id -> the users whose worker is active there (live hosts only)."""
        return {h.host_id: h.workers() for h in self.hosts}

    def journals(self, lines: int = 40) -> str:
        """Every live host's journal tail (diagnostics of a multi-host scenario)."""
        out = []
        for host in self.hosts:
            if not host.up:
                out.append(f"--- {host.host_id}: down")
            elif host.ns.frozen:
                out.append(f"--- {host.host_id}: frozen")
            else:
                out.append(f"--- {host.host_id}:\n{host.journal(None, '-n', str(lines))}")
        return "\n".join(out)

    # --- control plane -----------------------------------------------------------------
    @property
    def db(self) -> Any:
        if self._db is None:
            self._db = firestore_client(self.emulator_host, self.project)
        return self._db

    def doc(self, user: str) -> dict[str, Any]:
        snap = self.db.collection("user_sessions").document(user).get()
        return dict(snap.to_dict() or {})

    def request(self, user: str, status: str, **fields: Any) -> None:
        self.db.collection("user_sessions").document(user).set(
            {"status": status, **fields}, merge=True
        )

    def wait_doc(
        self, user: str, predicate: Callable[[dict[str, Any]], Any], timeout: float, what: str
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check() -> Any:
            nonlocal last
            last = self.doc(user)
            return predicate(last)

        def diagnostics() -> str:
            if len(self.hosts) > 1:
                return f"document: {_short(last)}\n{self.journals(60)}"
            return (f"document: {_short(last)}\n--- controller journal:\n"
                    + self.journal("wabridge-controller.service")[-3000:]
                    + f"\n--- worker journal:\n{self.journal(self.unit(user))[-3000:]}")

        wait_until(check, timeout, f"{user}: {what}", diagnostics)
        return last

    def messages(self, user: str) -> list[dict[str, Any]]:
        from google.cloud.firestore_v1.base_query import FieldFilter  # noqa: PLC0415

        docs = self.db.collection("messages").where(
            filter=FieldFilter("userId", "==", user)).stream()
        return sorted((d.to_dict() for d in docs), key=lambda m: m.get("ts", 0))

    # --- a linked account ----------------------------------------------------------------
    def link(self, user: str, phone: str, timeout: float = 60) -> dict[str, Any]:
        """create_requested -> QR on the document -> the sim phone scans -> connected."""
        self.request(user, "create_requested")
        doc = self.wait_doc(user, lambda d: d.get("qrRaw"), timeout, "a QR code")
        assert str(doc["qrCode"]).startswith("data:image/png;base64,")
        self.sim.scan(phone, doc["qrRaw"])
        return self.wait_doc(
            user, lambda d: d.get("status") == "connected", timeout, "status connected"
        )

    def link_many(self, accounts: dict[str, str], timeout: float = 180,
                  settings: dict[str, Any] | None = None) -> None:
        """Link several accounts (user -> phone) at once: every request first, then each QR
        scanned by its phone as it shows, until all are connected."""
        for user in accounts:
            if settings is not None:
                self.db.collection("user_sessions").document(user).set({"settings": settings})
            self.request(user, "create_requested")
        pending, scanned = dict(accounts), set()
        deadline = time.monotonic() + timeout
        while pending:
            for user, phone in list(pending.items()):
                doc = self.doc(user)
                if doc.get("status") == "connected":
                    del pending[user]
                elif doc.get("qrRaw") and doc["qrRaw"] not in scanned:
                    scanned.add(doc["qrRaw"])
                    with contextlib.suppress(AssertionError):  # rotated meanwhile: the next
                        self.sim.scan(phone, doc["qrRaw"])
            if time.monotonic() > deadline:
                raise AssertionError(f"not linked after {timeout:.0f}s: {sorted(pending)}\n"
                                     f"{self.journals(60)}")
            time.sleep(0.2)

    def ask(self, contact: str, account: str, text: str, timeout: float = 60) -> dict[str, Any]:
        """A contact sends ``text``; returns the reply that quotes it."""
        return self.sim.ask(contact, account, text, timeout,
                            lambda: self.journals(80) if len(self.hosts) > 1
                            else self.journal(None, "-n", "80"))


#: Short fleet timings for tests (the defaults are 30/10/10/5 s): a lease of 6 s renewed every
#: 1.5 s, taken over 2 s after it expired; a host 6 s without heartbeat is dead (no later than
#: its leases can be taken, so failovers wait for nothing more; six missed beats, so a
#: controller slowed by a burst of starts on two busy cores is not taken for dead).
FAST_FLEET: dict[str, Any] = {
    "enabled": True, "lease_seconds": 6.0, "renew_seconds": 1.5, "grace_seconds": 2.0,
    "margin_seconds": 2.0, "heartbeat_seconds": 1.0, "host_dead_seconds": 6.0,
    "tick_seconds": 0.5,
}
#: The sim drops a silent device after about 1.5 x this (4.5 s): a frozen host's sockets end
#: before its leases (6 s + 2 s) let another host connect the account.
FAST_SIM_HEARTBEAT = 3.0
#: one message per turn, so "one reply per message" is exact; no rate limit, and no loop
#: guard (a contact writing every second looks like a bot to it), in the way
ONE_REPLY_PER_MESSAGE: dict[str, dict[str, Any]] = {
    "conversation": {"debounce": 0.0, "max_batch": 1, "loop_max_turns": 0},
    "limits": {"inbound_per_minute": 0.0},
}


class Chats:
    """Contacts writing to accounts during a scenario, and what a user relies on, counted at
    the sim's contacts: every message answered exactly once, in per-chat order, with the
    right text (``echo: <text>`` from the fake Messages API)."""

    def __init__(self, sim: SimClient) -> None:
        self.sim = sim
        self.sent: dict[tuple[str, str], list[tuple[str, str, float]]] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.errors: list[BaseException] = []

    def send(self, contact: str, account: str, text: str) -> str:
        wa_id = self.sim.send(contact, account, text)
        with self._lock:
            self.sent.setdefault((contact, account), []).append((wa_id, text, time.time()))
        return wa_id

    def keep_sending(self, pairs: Sequence[tuple[str, str]], every: float = 0.5,
                     prefix: str = "m") -> None:
        """One thread per (contact, account) pair, sending until :meth:`stop_sending`."""
        def run(contact: str, account: str) -> None:
            n = 0
            try:
                while not self._stop.wait(every):
                    self.send(contact, account, f"{prefix}-{contact[-4:]}-{n:03d}")
                    n += 1
            except BaseException as exc:  # reported by stop_sending
                self.errors.append(exc)

        self._stop.clear()
        for contact, account in pairs:
            thread = threading.Thread(target=run, args=(contact, account), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop_sending(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._threads = []
        assert not self.errors, self.errors

    def _replies(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        with self._lock:
            chats = {k: list(v) for k, v in self.sent.items()}
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        inboxes = {contact: self.sim.inbox(contact) for contact, _ in chats}
        for (contact, account), sent in chats.items():
            ids = {wa_id for wa_id, _text, _at in sent}
            out[(contact, account)] = [m for m in inboxes[contact]
                                       if m.get("from") == account and m.get("quoted_id") in ids]
        return out

    def unanswered(self) -> list[str]:
        replies = self._replies()
        with self._lock:
            return [wa_id for key, sent in self.sent.items() for wa_id, _t, _a in sent
                    if wa_id not in {m["quoted_id"] for m in replies.get(key, [])}]

    def wait_answered(self, timeout: float, diagnostics: Callable[[], str] | None = None
                      ) -> None:
        def unanswered_by_chat() -> str:
            ids = set(self.unanswered())
            with self._lock:
                return "; ".join(f"{contact}->{account}: {[t for i, t, _a in sent if i in ids]}"
                                 for (contact, account), sent in self.sent.items()
                                 if any(i in ids for i, _t, _a in sent))

        wait_until(lambda: not self.unanswered(), timeout, "every message to be answered",
                   lambda: f"unanswered: {unanswered_by_chat()}\n"
                   + (diagnostics() if diagnostics else ""))

    def verdict(self) -> dict[str, Any]:
        """``sent``; ``lost`` (unanswered ids), ``duplicated`` (id -> replies),
        ``out_of_order`` (chats whose replies came in another order), ``wrong_text``;
        ``answered_after`` (id -> seconds from send to reply, by the sim's clock)."""
        replies = self._replies()
        with self._lock:
            chats = {k: list(v) for k, v in self.sent.items()}
        lost: list[str] = []
        duplicated: dict[str, int] = {}
        out_of_order: list[str] = []
        wrong: list[str] = []
        answered_after: dict[str, float] = {}
        for key, sent in chats.items():
            order = {wa_id: i for i, (wa_id, _t, _a) in enumerate(sent)}
            texts = {wa_id: text for wa_id, text, _a in sent}
            sent_at = {wa_id: at for wa_id, _t, at in sent}
            got = replies.get(key, [])
            counts: dict[str, int] = {}
            for m in got:
                counts[m["quoted_id"]] = counts.get(m["quoted_id"], 0) + 1
                answered_after.setdefault(m["quoted_id"],
                                          float(m.get("ts", 0)) - sent_at[m["quoted_id"]])
                if not _echoes(str(m.get("text")), texts[m["quoted_id"]]):
                    wrong.append(f"{m['quoted_id']} {texts[m['quoted_id']]!r}: "
                                 f"{str(m.get('text'))[:200]!r}")
            duplicated.update({k: v for k, v in counts.items() if v > 1})
            lost += [wa_id for wa_id in order if wa_id not in counts]
            positions = [order[m["quoted_id"]] for m in got]
            if positions != sorted(positions):
                out_of_order.append(f"{key[0]}->{key[1]}")
        return {"sent": sum(len(v) for v in chats.values()), "lost": lost,
                "duplicated": duplicated, "out_of_order": out_of_order, "wrong_text": wrong,
                "answered_after": answered_after}

    def assert_exactly_once(self) -> None:
        """No message lost, duplicated or answered out of order; every answer the echo of
        its message (an apology is a wrong text)."""
        verdict = self.verdict()
        problems = {k: verdict[k] for k in ("lost", "duplicated", "out_of_order", "wrong_text")
                    if verdict[k]}
        assert not problems, f"of {verdict['sent']} messages: {problems}"


def _echoes(reply: str, text: str) -> bool:
    """The fake API's answer to ``text``: ``echo: <text>``, or, on the first turn of a fresh
    session, the echo of the seed (summary, notes) followed by ``text``."""
    return reply == f"echo: {text}" or (reply.startswith("echo: ")
                                        and reply.endswith(f"\n{text}"))


def reconnected_after(sim: SimClient, phone: str, since: float, away_from: str
                      ) -> float | None:
    """Seconds from ``since`` (the sim's clock: this machine's) until the account's device
    connected from a client other than ``away_from``; None if it has not."""
    for device in sim.connections(phone)["devices"]:
        for interval in device["intervals"]:
            if interval["start"] >= since and interval["client"] not in ("", away_from):
                return float(interval["start"]) - since
    return None


def sent_via(sim: SimClient, contacts: Sequence[str], client: str, since: float
             ) -> list[dict[str, Any]]:
    """What ``client`` (a host) sent to ``contacts`` after ``since``."""
    return [m for contact in contacts for m in sim.inbox(contact)
            if m.get("via") == client and float(m.get("ts", 0)) >= since]


def double_connections(sim: SimClient) -> dict[str, Any]:
    """The sim's record reduced to what must stay zero: double connections and two devices
    of one account connected at once, per account."""
    record = sim.all_connections()
    return {a["phone"]: {"double_connections": a["double_connections"],
                         "overlapping_devices": a["overlapping_devices"]}
            for a in record["accounts"]
            if a["double_connections"] or a["overlapping_devices"]}


# Run inside the namespace by Fleet.processes(): /proc of the namespace, one JSON list.
_PS_SCRIPT = r"""
import json, os
me = os.getpid()
out = []
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == me:
        continue
    try:
        with open(f"/proc/{name}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{name}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{name}/status") as f:
            uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        with open(f"/proc/{name}/cgroup") as f:
            lines = f.read().splitlines()
    except (OSError, StopIteration, ValueError, IndexError):
        continue  # gone meanwhile
    if not argv or (ppid == 0 and name != "1"):
        continue  # kernel thread, or nsenter'd from outside
    cgroup = ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "name=systemd" or (controllers == "" and not cgroup):
            cgroup = path
    out.append({"pid": int(name), "ppid": ppid, "uid": uid, "cgroup": cgroup,
                "cmdline": " ".join(argv)})
print(json.dumps(out))
"""


def _short(doc: dict[str, Any]) -> str:
    return json.dumps(
        {k: (v[:60] + "..." if isinstance(v, str) and len(v) > 60 else v) for k, v in doc.items()},
        default=str,
    )


@contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
