"""``python -m bench.store_backends``: the worker's store on SQLite and on PostgreSQL, side by
side in one run (``storage.backend``).

* per-turn store cost: what the engine does to the store for one inbound message and its
  reply (``add_inbound``, ``pending_inbound``, ``chat``, ``complete_turn``, ``mark_sending``,
  ``mark_sent``), timed over ``--turns`` turns spread over 10 chats; p50/p95 wall time and
  this process's CPU per turn. SQLite: a file in a temp dir (WAL, ``synchronous=NORMAL``);
  PostgreSQL: a schema in a private cluster (``tests/postgres_cluster.py``: ``fsync`` off,
  over the unix socket, so the figure is the client and server work, not the disk);
* PSS per idle account: ``--accounts`` child processes, each opening one store (its
  migrations run) and idling, as a worker between messages holds it; PSS
  (``/proc/PID/smaps_rollup``) of each child, plus, for PostgreSQL, of the server backend
  process that serves its connection (``pg_backend_pid()``), since that is memory the
  account costs too (on the database host);
* PSS per idle *linked* account: ``--linked`` real worker units per backend in a systemd
  namespace (``tests/fleet.py``: the project's units, the Firestore emulator, the
  simulator), each linked on the simulator (QR scanned, its store and WhatsApp session open,
  its controller link up) and left idle ``--settle`` seconds; PSS of each worker unit, plus,
  for PostgreSQL, its server connections (``pg_stat_activity`` of the accounts' roles) and
  their backends' PSS.

Writes ``bench/results/store-backends-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import postgres_cluster  # noqa: E402 (tests/ helper, after the path is set)
import psycopg  # noqa: E402

from agent.store import PostgresTarget, Store  # noqa: E402
from agent.whatsapp.events import IncomingMessage  # noqa: E402

CHILD = """
import os, sys, json
sys.path.insert(0, {repo!r})
from pathlib import PosixPath
from agent.store import PostgresTarget, Store
where = {where}
store = Store(where)
store.pending_chats()
backend_pid = None
if isinstance(where, PostgresTarget):
    backend_pid = store._conn().execute("SELECT pg_backend_pid()").fetchone()[0]
print(json.dumps({{"pid": os.getpid(), "backend_pid": backend_pid}}), flush=True)
sys.stdin.read()  # idle until told to go
"""


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def turn_cost(store: Store, turns: int) -> dict[str, float]:
    walls: list[float] = []
    cpu0 = time.process_time()
    for i in range(turns):
        chat = f"49151{i % 10:04d}@s.whatsapp.net"
        msg = IncomingMessage(wa_id=f"3A{i:010d}", chat_id=chat, sender=chat,
                              text=f"question {i}", timestamp=time.time())
        start = time.perf_counter()
        store.add_inbound(msg)
        batch = store.pending_inbound(chat)
        store.chat(chat)
        (reply,) = store.complete_turn(chat, [p.id for p in batch], [f"answer {i}"],
                                       batch[-1].message, session_id=f"s-{chat}",
                                       cost_delta=0.001, input_tokens=100, output_tokens=20,
                                       day="2026-12-05")
        store.mark_sending(reply.id)
        store.mark_sent(reply.id, f"3EB0{i:016d}")
        walls.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu0
    walls.sort()
    return {"turns": turns, "p50_ms": round(statistics.median(walls) * 1000, 3),
            "p95_ms": round(walls[int(len(walls) * 0.95)] * 1000, 3),
            "client_cpu_ms_per_turn": round(cpu / turns * 1000, 3)}


def idle_pss(wheres: list[str]) -> dict[str, Any]:
    children = []
    for where in wheres:
        proc = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), where=where)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline() if proc.stdout is not None else ""
        children.append((proc, json.loads(line)))
    time.sleep(1.0)
    worker = [pss_kb(info["pid"]) for _, info in children]
    server = [pss_kb(info["backend_pid"]) for _, info in children if info["backend_pid"]]
    for proc, _ in children:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)
    out: dict[str, Any] = {"accounts": len(wheres),
                           "worker_store_process_pss_mb": round(statistics.mean(worker) / 1024, 2)}
    if server:
        out["server_backend_pss_mb"] = round(statistics.mean(server) / 1024, 2)
    return out


def linked_pss(cluster: postgres_cluster.Cluster, accounts: int, settle: float
               ) -> dict[str, Any]:
    """Idle linked workers on each backend, one fleet after the other (see the docstring)."""
    import firestore_emulator  # noqa: PLC0415 (tests/ helpers: only this phase needs them)
    from fleet import Fleet  # noqa: PLC0415

    from bench.run import link_many  # noqa: PLC0415

    out: dict[str, Any] = {}
    with firestore_emulator.running() as emu:
        for n, backend in enumerate(("sqlite", "postgresql")):
            config: dict[str, dict[str, Any]] = {}
            files: dict[str, str] = {}
            if backend == "postgresql":
                role, password, database = cluster.controller_role()
                config["storage"] = {"backend": "postgresql",
                                     "postgres_url": cluster.url(role, database)}
                files["/etc/wabridge/postgres-password"] = password
            users = [(f"{backend}-{i}", f"5511934{n}{i:05d}") for i in range(accounts)]
            with Fleet(plane="firestore", emulator_host=emu.address, qr_rotate=600.0,
                       config=config, extra_files=files) as fleet:
                # a unit's credentials ramfs must propagate back (the harness's / is private)
                fleet.ns.run(["mount", "--make-rshared", "/"], check=True)
                link_many(fleet, users, 180)
                time.sleep(settle)
                per = [fleet.pss_bytes(fleet.unit(u)) / 1024 / 1024 for u, _ in users]
                entry: dict[str, Any] = {
                    "accounts": accounts, "settle_s": settle,
                    "linked_worker_pss_mb_mean": round(statistics.mean(per), 1),
                    "linked_worker_pss_mb_max": round(max(per), 1)}
                if backend == "postgresql":
                    with psycopg.connect(cluster.conninfo(), autocommit=True) as su:
                        pids = [int(r[0]) for r in su.execute(
                            "SELECT pid FROM pg_stat_activity WHERE usename LIKE 'wa\\_%'")]
                    entry["server_connections_per_account"] = round(len(pids) / accounts, 2)
                    entry["server_pss_mb_per_account"] = round(
                        sum(pss_kb(p) for p in pids) / 1024 / accounts, 2)
                out[backend] = entry
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--accounts", type=int, default=5)
    parser.add_argument("--linked", type=int, default=3,
                        help="linked workers per backend (0: skip that phase)")
    parser.add_argument("--settle", type=float, default=15.0)
    args = parser.parse_args()
    reason = postgres_cluster.available()
    if reason is not None:
        print(f"PostgreSQL unavailable: {reason}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"turns": args.turns, "accounts": args.accounts,
                              "linked": args.linked}
    with tempfile.TemporaryDirectory() as tmp, postgres_cluster.running() as cluster:
        sqlite = Store(Path(tmp) / "bench.db")
        result["sqlite"] = {"per_turn": turn_cost(sqlite, args.turns)}
        sqlite.close()
        schemas = [f"b_{uuid.uuid4().hex[:10]}" for _ in range(args.accounts + 1)]
        with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
            for schema in schemas:
                admin.execute(f"CREATE SCHEMA {schema}")
        pg = Store(PostgresTarget(cluster.conninfo(), schemas[0]))
        result["postgresql"] = {"per_turn": turn_cost(pg, args.turns)}
        pg.close()
        result["sqlite"]["idle"] = idle_pss(
            [repr(Path(tmp) / f"idle{i}.db") for i in range(args.accounts)])
        result["postgresql"]["idle"] = idle_pss(
            [repr(PostgresTarget(cluster.conninfo(), s)) for s in schemas[1:]])
        if args.linked:
            for backend, entry in linked_pss(cluster, args.linked, args.settle).items():
                result[backend]["linked_idle"] = entry
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = REPO / "bench" / "results" / f"store-backends-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
