"""A fleet worker and its lease, end to end: a real worker process (``python -m agent.main``)
on the simulator, its store in PostgreSQL under its own role, the fake Messages API behind
its ``api`` engine, and the lease row in ``wabridge_fleet`` (the controller's part played by
the test: it takes the lease, bumps the epoch as another host would, reads what is left).

What a user relies on: a worker whose account another host took over, or that was frozen
longer than its lease, sends nothing more and exits "lease lost" (17, not restarted); a
clean stop hands the account over at once (released); a worker whose lease is not its own
never connects WhatsApp; a message WhatsApp acknowledged while PostgreSQL was down, still held
when the worker stopped (SIGTERM, or exit 17), is answered once after the restart.

Leases here are short (6 s, renewed every 0.5 s, 1.5 s margin) so the tests take seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fakes.anthropic_api import FakeAnthropicAPI, Reply
from fleet import Sim, http
from harness.wait import wait_until
from postgres_cluster import Cluster

from controller import pg_roles
from wabridge import fleet_db, units
from wabridge.errors import ExitCode
from wabridge.postgres import account_role

REPO = Path(__file__).resolve().parent.parent
LEASE, RENEW, MARGIN, GRACE = 6.0, 0.5, 1.5, 1.0
Admin = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def api() -> Iterator[FakeAnthropicAPI]:
    with FakeAnthropicAPI(lambda body: "the answer") as fake:
        yield fake


@pytest.fixture
def admin(postgres: Cluster) -> Iterator[Admin]:
    with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
        fleet_db.migrate(conn)
        yield conn


_phones = iter(range(100, 1000))


@dataclass
class Account:
    user: str
    phone: str
    password: str
    epoch: int
    contact: str  # who writes to it (an inbox of its own at the simulator)


@pytest.fixture
def account(admin: Admin) -> Account:
    n = next(_phones)
    user = f"lease-worker-{n}-{time.monotonic_ns()}"
    password = pg_roles.provision(admin, user, fleet=True)
    got = fleet_db.acquire(admin, user, account_role(user), "host-a", GRACE, LEASE)
    assert got is not None
    return Account(user, f"55119000{n:05d}", password, got.epoch, f"55119777{n:05d}")


class WorkerProcess:
    def __init__(self, tmp_path: Path, cluster: Cluster, sim: Sim, api: FakeAnthropicAPI,
                 account: Account, *, epoch: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        creds = tmp_path / "creds"
        creds.mkdir(exist_ok=True)
        (creds / "postgres-password").write_text(account.password)
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "INVOCATION_ID", "WATCHDOG_USEC")}
        env.update({
            "PYTHONPATH": str(REPO),
            "WABRIDGE_CONFIG": "/dev/null",
            "STATE_DIRECTORY": str(tmp_path / "state"),
            "CREDENTIALS_DIRECTORY": str(creds),
            "ANTHROPIC_BASE_URL": api.base_url,
            "ANTHROPIC_API_KEY": "test-key",
            "WABRIDGE__LOG__FORMAT": "json",
            "WABRIDGE__CONTROLLER__SOCKET": str(tmp_path / "no-controller.sock"),
            "WABRIDGE__WORKER__BACKEND": "sim",
            "WABRIDGE__WORKER__SIM_URL": sim.url,
            "WABRIDGE__CLAUDE__ENGINE": "api",
            "WABRIDGE__CLAUDE__TOOLS": "false",
            "WABRIDGE__STORAGE__BACKEND": "postgresql",
            "WABRIDGE__STORAGE__POSTGRES_URL": cluster.url("postgres"),
            "WABRIDGE__FLEET__ENABLED": "true",
            "WABRIDGE__FLEET__LEASE_SECONDS": str(LEASE),
            "WABRIDGE__FLEET__RENEW_SECONDS": str(RENEW),
            "WABRIDGE__FLEET__MARGIN_SECONDS": str(MARGIN),
            "WABRIDGE__FLEET__GRACE_SECONDS": str(GRACE),
            **units.lease_environment("host-a", account.epoch if epoch is None else epoch),
            **(env or {}),
        })
        self.log = tmp_path / "worker.log"
        self._out = self.log.open("ab")  # (a second start on the same state goes on here)
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.main", account.user],
                                     env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not exit in {timeout} s:\n{self.tail()}"
                                 ) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


@pytest.fixture
def start(tmp_path: Path, postgres: Cluster, sim: Sim, api: FakeAnthropicAPI
          ) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def run(account: Account, **kw: Any) -> WorkerProcess:
        worker = WorkerProcess(tmp_path, postgres, sim, api, account, **kw)
        started.append(worker)
        return worker

    yield run
    for worker in started:
        worker.close()


def _link(sim: Sim, worker: WorkerProcess, phone: str) -> None:
    """The phone scans the worker's QR code; the worker is connected."""
    code = wait_until(lambda: next((q["code"] for q in sim_qrs(sim)), None), 30,
                      "the worker's QR code", worker.tail)
    sim.scan(phone, code)
    wait_until(lambda: sim.account(phone)["connected"], 30, "the worker to connect",
               worker.tail)


def sim_qrs(sim: Sim) -> list[dict[str, Any]]:
    return list(http("GET", f"{sim.url}/api/qr"))


def _lease(admin: Admin, user: str) -> fleet_db.Lease:
    got = fleet_db.lease(admin, user)
    assert got is not None
    return got


def _pending_inbound(admin: Admin, user: str) -> int:
    row = admin.execute(f"SELECT COUNT(*) FROM {account_role(user)}.inbox "  # noqa: S608
                        "WHERE state = 'pending'").fetchone()
    return int(row[0]) if row else -1


@pytest.mark.timeout(120)
def test_a_worker_whose_epoch_another_host_took_sends_nothing_and_exits_17(
        sim: Sim, api: FakeAnthropicAPI, admin: Admin, account: Account, start: Any) -> None:
    worker = start(account)
    _link(sim, worker, account.phone)
    answer = sim.ask(account.contact, account.phone, "before", timeout=30,
                     diagnostics=worker.tail)
    assert answer["text"] == "the answer"
    api.responder = lambda body: Reply(text="too late", hang=True)  # a turn in flight
    seen = len(api.requests)
    sim.send(account.contact, account.phone, "during")
    wait_until(lambda: len(api.requests) > seen, 30, "the turn to reach Claude",
               worker.tail)

    # another host takes the account over (after this one's lease ran out, by its clock)
    admin.execute("UPDATE wabridge_fleet.leases SET host_id = 'host-b', epoch = epoch + 1 "
                  "WHERE user_id = %s", (account.user,))
    api.release()  # the turn's answer arrives: it must not be sent, nor its message settled
    assert worker.wait(15) == ExitCode.LEASE_LOST == 17, worker.tail()
    assert [m["text"] for m in sim.inbox(account.contact)] == ["the answer"]
    assert not sim.account(account.phone)["connected"]
    assert _pending_inbound(admin, account.user) == 1  # the next owner answers it
    held = _lease(admin, account.user)
    assert (held.host_id, held.released) == ("host-b", False)  # not released by the loser
    assert '"lease.lost"' in worker.tail()
    # its queue of reports to the controller is the account's (its schema): the next owner's
    # link delivers what is left there, so a "stopping" queued by the loser would reach the
    # next owner's controller as the state of an account that runs
    frames = admin.execute(f"SELECT frame FROM {account_role(account.user)}.link_outbox"  # noqa: S608
                           ).fetchall()
    assert not [f for (f,) in frames if '"stopping"' in f], frames


@pytest.mark.timeout(120)
def test_a_worker_frozen_longer_than_its_lease_exits_17_without_sending_its_queued_reply(
        sim: Sim, api: FakeAnthropicAPI, admin: Admin, account: Account, start: Any) -> None:
    """A paused host (SIGSTOP here, a VM pause or a cgroup freeze in life): the answer to a
    turn arrives while it is frozen; thawed, the worker commits the turn (nobody took the
    account yet) but must not send the reply: it could not have renewed for longer than
    lease - margin, so another host may own the account now."""
    worker = start(account)
    _link(sim, worker, account.phone)
    api.responder = lambda body: Reply(text="stale reply", delay=1.5)
    seen = len(api.requests)
    sim.send(account.contact, account.phone, "question")
    wait_until(lambda: len(api.requests) > seen, 30, "the turn to reach Claude",
               worker.tail)
    worker.proc.send_signal(signal.SIGSTOP)
    time.sleep(LEASE + 1.0)  # the answer arrived meanwhile; the lease ran out
    worker.proc.send_signal(signal.SIGCONT)
    assert worker.wait(15) == ExitCode.LEASE_LOST, worker.tail()
    assert sim.inbox(account.contact) == []
    # nothing lost: either the turn committed (its reply waits in the outbox for the next
    # owner) or it did not (its message is still pending)
    role = account_role(account.user)
    outbox = admin.execute(f"SELECT state FROM {role}.outbox").fetchall()  # noqa: S608
    assert [r[0] for r in outbox] in (["pending"], []), outbox
    assert len(outbox) + _pending_inbound(admin, account.user) == 1


@pytest.mark.timeout(120)
def test_a_clean_stop_releases_the_lease(sim: Sim, admin: Admin, account: Account,
                                         start: Any) -> None:
    worker = start(account)
    _link(sim, worker, account.phone)
    answer = sim.ask(account.contact, account.phone, "hello", timeout=30,
                     diagnostics=worker.tail)
    assert answer["text"] == "the answer"
    time.sleep(RENEW * 3)
    renewed = _lease(admin, account.user)
    assert renewed.expires_in > LEASE - 1.0 and not renewed.released  # kept alive
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(15) == ExitCode.OK, worker.tail()
    released = _lease(admin, account.user)
    assert released.released and released.epoch == account.epoch
    # so another host takes it at once, without waiting for expiry + grace
    taken = fleet_db.acquire(admin, account.user, account_role(account.user), "host-b",
                             GRACE, LEASE)
    assert taken is not None and taken.epoch == account.epoch + 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stale", ["epoch", "released"])
def test_a_worker_without_the_current_lease_never_connects(
        sim: Sim, admin: Admin, account: Account, start: Any, stale: str) -> None:
    if stale == "released":
        assert fleet_db.release(admin, account.user, "host-a", account.epoch)
        worker = start(account)
    else:
        worker = start(account, epoch=account.epoch - 1 if account.epoch > 1 else 99)
    assert worker.wait(30) == ExitCode.LEASE_LOST, worker.tail()
    assert sim_qrs(sim) == []  # no connection ever asked for a QR code
    assert "lease_lost" in worker.tail()


@pytest.mark.timeout(120)
def test_a_worker_cut_off_from_its_lease_is_off_whatsapp_before_the_lease_expires(
        sim: Sim, api: FakeAnthropicAPI, postgres: Cluster, admin: Admin, account: Account,
        start: Any) -> None:
    """Renewals cannot get through (the lease row locked, as a stuck server or a partition
    would hold them), and a message arrives meanwhile, whose turn's commit then hangs on the
    same row on the event loop: the worker cannot even run its own shutdown. It must still be
    off WhatsApp before its lease expires (by the database's clock), send nothing, and exit
    17 (the fail-stop thread ends it)."""
    worker = start(account)
    _link(sim, worker, account.phone)
    with psycopg.connect(postgres.conninfo(), autocommit=True) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("SELECT 1 FROM wabridge_fleet.leases WHERE user_id = %s FOR UPDATE",
                        (account.user,))
        cut_off = time.monotonic()
        sim.send(account.contact, account.phone, "question")
        wait_until(lambda: not sim.account(account.phone)["connected"], LEASE + 5,
                   "the worker to leave WhatsApp", worker.tail)
        off_after = time.monotonic() - cut_off
        left = _lease(admin, account.user).expires_in  # a plain read is not blocked
        code = worker.wait(15)
        blocker.execute("ROLLBACK")
    assert code == ExitCode.LEASE_LOST, worker.tail()
    assert left > 0, (f"off WhatsApp {-left:.2f} s after the lease expired "
                      f"({off_after:.2f} s after the cut)")
    assert off_after < LEASE, off_after
    assert sim.inbox(account.contact) == []
    # not lost: stored to be answered by the next owner, or (the loop was stuck before it
    # could store it) never acknowledged, so WhatsApp delivers it to the next connection
    unacked = sum(d["pending"] for d in sim.account(account.phone)["devices"])
    assert _pending_inbound(admin, account.user) + unacked >= 1, worker.tail()


#: The simulator acks a message before the worker sees it, as WhatsApp does through neonize
#: (``agent.whatsapp.sim``): a message the store refuses exists only in the worker.
ACK_ON_RECEIPT = {"WABRIDGE_TEST_HOOKS": "1", "WABRIDGE_TEST_SIM_ACK": "receipt"}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stopped_by", ["sigterm", "lease_lost"])
def test_a_message_held_when_the_worker_stops_in_an_outage_is_answered_after_the_restart(
        sim: Sim, postgres: Cluster, account: Account, start: Any, tmp_path: Path,
        stopped_by: str) -> None:
    """PostgreSQL goes down; a message arrives and is acknowledged, the store refuses it,
    the worker holds it; the worker stops while the database is still down (a SIGTERM, or
    exit 17 once it could not renew its lease for lease - margin). The message survives in
    the state directory and is answered exactly once by the next start on this host."""
    worker = start(account, env=ACK_ON_RECEIPT)
    _link(sim, worker, account.phone)
    assert sim.ask(account.contact, account.phone, "before", timeout=30,
                   diagnostics=worker.tail)["text"] == "the answer"
    spill = tmp_path / "state" / "inbound-spill.jsonl"
    postgres.stop("fast")
    try:
        wa_id = sim.send(account.contact, account.phone, "during the outage")
        wait_until(lambda: '"store.inbound_held"' in worker.tail(), 15,
                   "the worker to hold the message", worker.tail)
        assert sum(d["pending"] for d in sim.account(account.phone)["devices"]) == 0  # acked
        if stopped_by == "sigterm":
            worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(20) in (ExitCode.OK, ExitCode.LEASE_LOST), worker.tail()
        if stopped_by == "lease_lost":
            assert worker.proc.returncode == ExitCode.LEASE_LOST
        assert '"store.inbound_spilled"' in worker.log.read_text()
        assert wa_id in spill.read_text()
    finally:
        postgres.start()
    # the controller's part: this host takes the account's lease again and starts it
    with psycopg.connect(postgres.conninfo(), autocommit=True) as controller:  # (a new one)
        again = fleet_db.acquire(controller, account.user, account_role(account.user),
                                 "host-a", GRACE, LEASE)
    assert again is not None
    worker = start(account, epoch=again.epoch, env=ACK_ON_RECEIPT)

    def answers() -> list[dict[str, Any]]:
        return [m for m in sim.inbox(account.contact) if m.get("quoted_id") == wa_id]

    wait_until(answers, 30, "the held message to be answered", worker.tail)
    time.sleep(2)  # a second answer, if any, would come now
    assert len(answers()) == 1, sim.inbox(account.contact)
    assert len(sim.inbox(account.contact)) == 2  # "before" and the held one, nothing else
    assert not spill.exists()
    assert '"store.inbound_lost"' not in worker.log.read_text()  # (both starts)
