"""``python -m bench.chaos_fleet``: host crashes and freezes under load (``make chaos-fleet``).

A fleet as in the fleet end-to-end tests (``tests/fleet.py``): several hosts, each systemd 252
as PID 1 of its own namespace with its own controller, sharing one PostgreSQL (a private
cluster started here), the Firestore emulator (started here), the simulator and the fake
Messages API. Accounts are linked through QR codes and spread over the hosts; contacts send to
every account (one message per turn) while, one after the other, a host with accounts is

- **killed**: SIGKILL of its PID 1 (every process dies at once, sockets close); it boots again
  once its accounts run elsewhere;
- **frozen**: every process stopped by the cgroup freezer for lease + grace + a few seconds
  (sockets stay open and silent, as a paused VM); then thawed, when its workers must find the
  lease gone and exit without sending.

Timings are the tests' short ones (``tests/fleet.py`` ``FAST_FLEET``: lease 6 s, renew 1.5 s,
grace 2 s, margin 2 s; the sim drops a silent device after ~4.5 s). Figures:

- ``failover_s`` p50/p99/max: per affected account, from the fault to its device connected
  from another host (the sim's record); target: p99 <= lease + grace + 10 s;
- must read zero: ``lost`` (never answered), ``duplicated`` (answered twice),
  ``out_of_order`` (chats whose replies came in another order), ``wrong_text``,
  ``double_connections`` (a device connecting while another of its connections is open,
  or two devices of one account connected at once), ``sent_after_thaw`` (replies a thawed
  host sent), ``new_qr`` (accounts that needed another device, i.e. a QR), ``wrong_status``
  (documents that do not end ``connected`` on the host that runs them), ``stuck`` (accounts
  not running elsewhere within 60 s of a fault), ``not_running`` (accounts running nowhere a
  minute after a fault was undone: recorded with their document, and the run goes on).

A table goes to stdout and JSON to ``bench/results/chaos-fleet-<UTC time>.json``; the exit
code is 1 when a zero figure is not zero or the failover target is missed. ``--short`` (CI, as
``tests/test_chaos_fleet.py``): 3 hosts, 6 accounts, one kill and one freeze.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(REPO / "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import firestore_emulator  # noqa: E402 - after the sys.path set-up above
import postgres_cluster  # noqa: E402 - after the sys.path set-up above
from fleet import (  # noqa: E402 - after the sys.path set-up above
    FAST_FLEET,
    FAST_SIM_HEARTBEAT,
    ONE_REPLY_PER_MESSAGE,
    Chats,
    Fleet,
    Host,
    reconnected_after,
    sent_via,
)

TAKEOVER = FAST_FLEET["lease_seconds"] + FAST_FLEET["grace_seconds"]
TARGET_P99 = TAKEOVER + 10.0
STUCK_AFTER = 60.0
ZERO_FIGURES = ("lost", "duplicated", "out_of_order", "wrong_text", "double_connections",
                "sent_after_thaw", "new_qr", "wrong_status", "stuck", "not_running")


@dataclasses.dataclass(frozen=True)
class Options:
    hosts: int = 3
    users: int = 9
    events: int = 10
    interval: float = 1.0  # seconds between two messages of one chat
    seed: int = 7
    out: Path | None = REPO / "bench" / "results"

    @classmethod
    def short_mode(cls, out: Path | None = None) -> Options:
        return cls(hosts=3, users=6, events=2, out=out)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile by the nearest-rank method (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class ChaosFleet:
    def __init__(self, fleet: Fleet, opts: Options) -> None:
        self.fleet = fleet
        self.opts = opts
        self.rng = random.Random(opts.seed)  # noqa: S311 - a reproducible order, not a secret
        self.accounts = {f"cf{n:02d}": f"55119888800{n:02d}" for n in range(opts.users)}
        self.contacts = {u: f"55119999900{n:02d}" for n, u in enumerate(self.accounts)}
        self.chats = Chats(fleet.sim)
        self.events: list[dict[str, Any]] = []
        self.failover: list[float] = []
        self.stuck: list[str] = []
        self.stuck_state: list[dict[str, Any]] = []  # what was seen of each, while stuck
        self.sent_after_thaw: list[dict[str, Any]] = []
        self.not_running: list[dict[str, Any]] = []

    def running(self) -> dict[str, str]:
        return {u: h for h, users in self.fleet.placement().items() for u in users}

    def settle(self, timeout: float = 60) -> None:
        """Wait until every account runs somewhere; one that does not is recorded (with its
        document) as ``not_running`` and the run goes on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.running()) == len(self.accounts):
                return
            time.sleep(0.5)
        for user in sorted(set(self.accounts) - set(self.running())):
            doc = self.fleet.doc(user)
            self.not_running.append({"user": user, "after_event": len(self.events), **{
                k: str(doc.get(k)) for k in ("status", "host", "statusDetail", "error")}})

    def victim(self) -> Host:
        placement = self.fleet.placement()
        host = max(placement, key=lambda h: (len(placement[h]), self.rng.random()))
        return self.fleet.host(host)

    def fault(self, kind: str) -> None:
        self.settle()
        victim = self.victim()
        affected = sorted(u for u, h in self.running().items() if h == victim.host_id)
        at = time.time()
        if kind == "kill":
            victim.crash()
        else:
            victim.freeze()
        times: dict[str, float | None] = dict.fromkeys(affected)
        deadline = time.monotonic() + STUCK_AFTER
        while time.monotonic() < deadline and any(v is None for v in times.values()):
            for user in [u for u, v in times.items() if v is None]:
                times[user] = reconnected_after(self.fleet.sim, self.accounts[user], at,
                                                victim.host_id)
            time.sleep(0.2)
        for user in [u for u, v in times.items() if v is None]:
            self.stuck_state.append(self.why_stuck(user, victim, at))
        if kind == "kill":
            victim.boot()
        else:
            time.sleep(max(0.0, at + TAKEOVER + 4 - time.time()))
            thawed = time.time()
            victim.thaw()
            time.sleep(5)  # its workers must see the lease gone and stop, silently
            self.sent_after_thaw += sent_via(self.fleet.sim, list(self.contacts.values()),
                                             victim.host_id, thawed)
        self.stuck += [u for u, v in times.items() if v is None]
        self.failover += [v for v in times.values() if v is not None]
        self.events.append({"kind": kind, "host": victim.host_id, "accounts": affected,
                            "failover_s": {u: None if v is None else round(v, 2)
                                           for u, v in times.items()}})
        print(f"{kind} {victim.host_id}: {len(affected)} accounts, failover "
              f"{[None if v is None else round(v, 1) for v in times.values()]}", flush=True)

    def why_stuck(self, user: str, victim: Host, at: float) -> dict[str, Any]:
        """An account not running elsewhere ``STUCK_AFTER`` seconds after a fault, as the
        fleet saw it then: its document, lease, the hosts' rows, locks on its lease row, the
        sim's record of its connections and what the live hosts' journals say of it."""
        doc = self.fleet.doc(user)
        state: dict[str, Any] = {
            "user": user, "victim": victim.host_id, "fault_at": at,
            "doc": {k: str(doc.get(k)) for k in ("status", "host", "statusDetail", "error")},
            "connections": self.fleet.sim.connections(self.accounts[user]),
        }
        pg = self.fleet.pg
        if pg is None:
            return state
        with pg.connect() as conn:
            state["lease"] = [str(r) for r in conn.execute(
                "SELECT host_id, epoch, expires_at - now(), released "
                "FROM wabridge_fleet.leases WHERE user_id = %s", (user,))]
            state["hosts"] = [str(r) for r in conn.execute(
                "SELECT host_id, draining, now() - heartbeat_at FROM wabridge_fleet.hosts")]
            state["locks"] = [str(r) for r in conn.execute(
                "SELECT a.usename, a.state, a.wait_event, left(a.query, 80), "
                "now() - a.xact_start, l.mode, l.granted FROM pg_locks l "
                "JOIN pg_stat_activity a USING (pid) "
                "WHERE l.relation = 'wabridge_fleet.leases'::regclass")]
        for host in self.fleet.hosts:
            if host.up and not host.ns.frozen:
                lines = host.journal(None, "--since", f"@{int(at) - 2}").splitlines()
                state[f"journal {host.host_id}"] = [ln for ln in lines if user in ln][-40:]
        return state

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.fleet.link_many(self.accounts)
        linked = time.monotonic() - started
        self.settle()
        self.chats.keep_sending([(self.contacts[u], p) for u, p in self.accounts.items()],
                                every=self.opts.interval, prefix="cf")
        try:
            kinds = ["kill", "freeze"] * (self.opts.events // 2) + ["kill"] * (
                self.opts.events % 2)
            self.rng.shuffle(kinds)
            for kind in kinds:
                self.fault(kind)
            time.sleep(3)
        finally:
            self.chats.stop_sending()
        with contextlib.suppress(AssertionError):
            self.chats.wait_answered(120)
        time.sleep(2)
        return self.figures(linked, time.monotonic() - started)

    def figures(self, linked: float, total: float) -> dict[str, Any]:
        verdict = self.chats.verdict()
        record = self.fleet.sim.all_connections()
        running = self.running()
        wrong_status = []
        for user in self.accounts:
            doc = self.fleet.doc(user)
            if doc.get("status") != "connected" or doc.get("host") != running.get(user):
                wrong_status.append(f"{user}: {doc.get('status')} on {doc.get('host')}, "
                                    f"runs on {running.get(user)}")
        new_qr = [a["phone"] for a in record["accounts"] if len(a["devices"]) != 1]
        latency = list(verdict["answered_after"].values())
        figures = {
            "messages": verdict["sent"],
            "lost": len(verdict["lost"]),
            "duplicated": len(verdict["duplicated"]),
            "out_of_order": len(verdict["out_of_order"]),
            "wrong_text": len(verdict["wrong_text"]),
            "double_connections": record["double_connections"] + record["overlapping_devices"],
            "sent_after_thaw": len(self.sent_after_thaw),
            "new_qr": len(new_qr),
            "wrong_status": len(wrong_status),
            "stuck": len(self.stuck),
            "not_running": len(self.not_running),
            "failovers": len(self.failover),
            "failover_p50_s": percentile(self.failover, 0.5),
            "failover_p99_s": percentile(self.failover, 0.99),
            "failover_max_s": max(self.failover, default=None),
            "reply_latency_p50_s": percentile(latency, 0.5),
            "reply_latency_p99_s": percentile(latency, 0.99),
        }
        failed = [k for k in ZERO_FIGURES if figures[k]]
        p99 = figures["failover_p99_s"]
        if p99 is None or p99 > TARGET_P99:
            failed.append("failover_p99_s")
        return {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "options": {k: str(v) if isinstance(v, Path) else v
                        for k, v in dataclasses.asdict(self.opts).items()},
            "timings": {"fleet": FAST_FLEET, "sim_heartbeat_s": FAST_SIM_HEARTBEAT,
                        "target_failover_p99_s": TARGET_P99, "link_s": round(linked, 1),
                        "total_s": round(total, 1)},
            "figures": figures,
            "failed": failed,
            "events": self.events,
            "details": {"lost": verdict["lost"], "duplicated": verdict["duplicated"],
                        "out_of_order": verdict["out_of_order"],
                        "wrong_text": verdict["wrong_text"], "stuck": self.stuck,
                        "stuck_state": self.stuck_state,
                        "wrong_status": wrong_status, "new_qr": new_qr,
                        "not_running": self.not_running,
                        "sent_after_thaw": self.sent_after_thaw},
        }


@contextlib.contextmanager
def _services(emulator_host: str | None, postgres: Any) -> Iterator[tuple[str, Any]]:
    with contextlib.ExitStack() as stack:
        if emulator_host is None:
            reason = firestore_emulator.available()
            if reason is not None:
                raise RuntimeError(f"Firestore emulator unavailable: {reason}")
            emulator_host = stack.enter_context(firestore_emulator.running()).address
        if postgres is None:
            reason = postgres_cluster.available()
            if reason is not None:
                raise RuntimeError(f"PostgreSQL unavailable: {reason}")
            postgres = stack.enter_context(postgres_cluster.running())
        yield emulator_host, postgres


def run(opts: Options, emulator_host: str | None = None, postgres: Any = None
        ) -> dict[str, Any]:
    """One run; returns the results (also written to ``opts.out`` when set)."""
    with _services(emulator_host, postgres) as (emulator, cluster), Fleet(
            plane="firestore", emulator_host=emulator, postgres=cluster, hosts=opts.hosts,
            fleet=FAST_FLEET, sim_heartbeat=FAST_SIM_HEARTBEAT,
            config={**ONE_REPLY_PER_MESSAGE, "claude": {"engine": "api"}}) as fleet:
        results = ChaosFleet(fleet, opts).run()
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = opts.out / f"chaos-fleet-{stamp}.json"
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        results["path"] = str(path)
    return results


def table(results: dict[str, Any]) -> str:
    f = results["figures"]

    def num(value: Any) -> str:
        return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(
            value)

    lines = [f"{len(results['events'])} faults ({', '.join(e['kind'] for e in results['events'])}"
             f"), {f['messages']} messages, {f['failovers']} failovers",
             f"failover p50 {num(f['failover_p50_s'])} s, p99 {num(f['failover_p99_s'])} s, "
             f"max {num(f['failover_max_s'])} s (target p99 <= "
             f"{results['timings']['target_failover_p99_s']:.0f} s)",
             f"reply latency p50 {num(f['reply_latency_p50_s'])} s, "
             f"p99 {num(f['reply_latency_p99_s'])} s"]
    lines += [f"{name:<20}{f[name]}" for name in ZERO_FIGURES]
    lines.append("FAILED: " + ", ".join(results["failed"]) if results["failed"] else "ok")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=Options.hosts)
    ap.add_argument("--users", type=int, default=Options.users)
    ap.add_argument("--events", type=int, default=Options.events,
                    help="host faults, kills and freezes alternating in a shuffled order")
    ap.add_argument("--seed", type=int, default=Options.seed)
    ap.add_argument("--short", action="store_true", help="the CI mode: 6 accounts, 2 faults")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    opts = (Options.short_mode(out=args.out) if args.short else
            Options(hosts=args.hosts, users=args.users, events=args.events, seed=args.seed,
                    out=args.out))
    if opts.hosts < 2:
        ap.error("--hosts: a fault needs another host to fail over to")
    results = run(opts)
    print(table(results))
    if "path" in results:
        print(f"results: {results['path']}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
