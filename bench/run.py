"""``python -m bench.run``: what one linked account costs, and how fast the fleet reacts.

Everything runs as in the end-to-end tests (``tests/fleet.py``): systemd 252 as PID 1 of a
private namespace, the controller and workers as its units, the sim backend, the fake
Anthropic API and the Firestore emulator, on this machine only (127.0.0.1; the neonize worker
runs with ``PrivateNetwork=yes`` so its dial fails at once and never leaves the host).

Figures (targets are reported, not asserted):

* PSS per idle linked account (sum of ``Pss`` in ``/proc/PID/smaps_rollup`` over the
  processes of each worker unit) with 1, 10 and 50 linked accounts; target <= 65 MB.
* controller reaction: document written -> unit leaves "inactive" (systemd's
  ``InactiveExitTimestampMonotonic``: the controller's StartUnit took effect), and -> unit
  "active" (``ActiveEnterTimestampMonotonic``: the worker sent READY=1); p50, target <= 200 ms.
  CLOCK_MONOTONIC is shared with the namespace, so the bench compares it to its own clock.
* unit start -> QR on the document (the bench sees it in Firestore); p50, target <= 1 s.
* N units started from cold: N documents written at once -> all N units active.
* controller PSS; a neonize worker's PSS in its connecting state (the headline: a real
  account's cost) next to the simulator's.
* unit start -> READY=1 (``ActiveEnter`` - ``InactiveExit``) of a sim worker; p50, target
  <= 200 ms.
* an account with 0, 1 and 2 live chats (the unit's PSS: the worker and its Claude CLI
  processes), and the CLI after 1 and after ``--turns`` turns in one conversation.
* contact-perceived latency of a warm chat with the default ``conversation.debounce``/
  ``settle`` and ``limits.send_gap``/``send_jitter`` (message sent -> reply in the contact's
  inbox, through the simulator) next to the same with none of them (what the bridge, the CLI
  and the fake API add); the bridge-added figure alone is ``bench.conversation``'s.
* engines ``cli`` vs ``api`` per live chat (``bench.engines`` in a subprocess).
* capacity of a 24 GB host computed from the figures above.

Results: a table on stdout and JSON in ``bench/results/<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import firestore_emulator  # noqa: E402 - after the sys.path set-up above
from fleet import Fleet  # noqa: E402 - after the sys.path set-up above
from harness.wait import wait_until  # noqa: E402 - after the sys.path set-up above

MB = 1 << 20
CTL = "wabridge-controller.service"


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def usec(fleet: Fleet, unit: str, prop: str) -> float:
    return int(fleet.prop(unit, prop) or 0) / 1e6


def active_count(fleet: Fleet, pattern: str) -> int:
    out = fleet.ns.run(["systemctl", "list-units", "--no-legend", "--plain", "--state=active",
                        pattern]).stdout
    return len([line for line in out.splitlines() if line.strip()])


def link_many(fleet: Fleet, users: list[tuple[str, str]], timeout: float) -> None:
    """Request every user at once; scan each QR as it appears; wait until all connected."""
    for user, _phone in users:
        fleet.request(user, "create_requested")
    scanned: set[str] = set()
    connected: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(connected) < len(users):
        if time.monotonic() > deadline:
            missing = [u for u, _ in users if u not in connected][:3]
            raise AssertionError(
                f"linked {len(connected)} of {len(users)} in {timeout:.0f}s; e.g. "
                + "; ".join(f"{u}: {fleet.doc(u)}" for u in missing)
                + "\n--- controller journal:\n" + fleet.journal(CTL)[-4000:]
                + (f"\n--- {missing[0]} journal:\n" + fleet.journal(fleet.unit(missing[0]))[-2000:]
                   if missing else ""))
        for user, phone in users:
            if user in connected:
                continue
            doc = fleet.doc(user)
            if doc.get("status") == "connected":
                connected.add(user)
            elif user not in scanned and doc.get("qrRaw"):
                fleet.sim.scan(phone, doc["qrRaw"])
                scanned.add(user)
        time.sleep(0.1)


def measure_latency(fleet: Fleet, samples: int) -> dict[str, Any]:
    start, active, qr, ready = [], [], [], []
    for i in range(samples):
        user = f"lat{i}"
        unit = fleet.unit(user)
        t0 = time.monotonic()  # CLOCK_MONOTONIC: the same inside the namespace
        fleet.request(user, "create_requested")
        def qr_shown(u: str = user) -> float | None:
            return time.monotonic() if fleet.doc(u).get("qrRaw") else None

        def diagnostics(u: str = user) -> str:
            return (f"{fleet.doc(u)}\n" + fleet.journal(CTL)[-3000:]
                    + fleet.journal(fleet.unit(u))[-3000:])

        seen = wait_until(qr_shown, 60, f"{user}: QR", diagnostics)
        fleet.wait_unit(unit, "active", 60)
        left_inactive = usec(fleet, unit, "InactiveExitTimestampMonotonic")
        became_active = usec(fleet, unit, "ActiveEnterTimestampMonotonic")
        start.append(left_inactive - t0)
        active.append(became_active - t0)
        qr.append(seen - left_inactive)
        ready.append(became_active - left_inactive)
        fleet.request(user, "destroy_requested")
    for i in range(samples):
        fleet.wait_doc(f"lat{i}", lambda d: d.get("status") == "stopped", 30, "stopped")
    return {
        "samples": samples,
        "reaction_start_ms_p50": round(p50(start) * 1000, 1),
        "reaction_active_ms_p50": round(p50(active) * 1000, 1),
        "qr_on_document_ms_p50": round(p50(qr) * 1000, 1),
        "unit_start_to_ready_ms_p50": round(p50(ready) * 1000, 1),
        "unit_start_to_ready_ms": [round(x * 1000, 1) for x in ready],
        "reaction_start_ms": [round(x * 1000, 1) for x in start],
        "reaction_active_ms": [round(x * 1000, 1) for x in active],
        "qr_on_document_ms": [round(x * 1000, 1) for x in qr],
    }


def measure_pss(fleet: Fleet, counts: list[int], settle: float) -> list[dict[str, Any]]:
    rows = []
    linked: list[str] = []
    for n in sorted(counts):
        new = [(f"acc{i}", f"55119{i:08d}") for i in range(len(linked), n)]
        link_many(fleet, new, timeout=180 + 5 * len(new))
        linked += [u for u, _ in new]
        time.sleep(settle)  # idle: start-up garbage collected, sockets quiet
        per = [fleet.pss_bytes(fleet.unit(u)) for u in linked]
        rows.append({
            "accounts": n,
            "pss_mb_mean": round(statistics.mean(per) / MB, 1),
            "pss_mb_max": round(max(per) / MB, 1),
            "pss_mb_total": round(sum(per) / MB, 1),
            "controller_pss_mb": round(fleet.pss_bytes(CTL) / MB, 1),
        })
        print(f"  {n} idle linked accounts: {rows[-1]}", flush=True)
    return rows


def entered_active(fleet: Fleet, pattern: str, since_us: float,
                   seen: dict[str, float]) -> int:
    """Record in ``seen`` (unit -> time) the units that became active after ``since_us``
    (kept across calls: a unit that stopped since is no longer listed); total restarts."""
    out = fleet.ns.run(["systemctl", "show", "-p",
                        "Id,ActiveEnterTimestampMonotonic,NRestarts", pattern]).stdout
    restarts = 0
    for block in out.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        entered = int(props.get("ActiveEnterTimestampMonotonic") or 0)
        restarts += int(props.get("NRestarts") or 0)
        if entered >= since_us and props.get("Id") not in seen:
            seen[props["Id"]] = entered / 1e6
    return restarts


def qr_count(fleet: Fleet, prefix: str) -> int:
    docs = fleet.db.collection("user_sessions").stream()
    return sum(1 for d in docs if d.id.startswith(prefix) and (d.to_dict() or {}).get("qrRaw"))


def unit_cpu_s(fleet: Fleet, unit: str) -> float:
    """CPU seconds (user + system) of the unit's live processes (the namespace's systemd
    keeps no CPU accounting)."""
    total = 0
    for pid in fleet.unit_pids(unit):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of the live processes of a process group (the Firestore emulator's)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure_cold(fleet: Fleet, n: int, timeout: float, emulator_pid: int = 0) -> dict[str, Any]:
    """N documents written in one batch -> every unit has been active (ActiveEnterTimestamp)
    and every document has its QR. Units stay up: qr_timeout is raised for the bench. The
    CPU each worker took to get there, and the controller meanwhile, say what paces it."""
    controller_cpu, emulator_cpu = unit_cpu_s(fleet, CTL), group_cpu_s(emulator_pid)
    batch = fleet.db.batch()
    t0 = time.monotonic()
    for i in range(n):
        batch.set(fleet.db.collection("user_sessions").document(f"cold{i}"),
                  {"status": "create_requested"}, merge=True)
    batch.commit()
    seen: dict[str, float] = {}
    state: dict[str, Any] = {}

    def all_active() -> bool:
        state["restarts"] = entered_active(fleet, "wabridge-worker@cold*", t0 * 1e6, seen)
        state["active"] = len(seen)
        return len(seen) >= n

    wait_until(all_active, timeout, f"{n} units active", lambda: str(state))
    state["latest"] = max(seen.values())
    all_qr = wait_until(lambda: qr_count(fleet, "cold") >= n and time.monotonic(), timeout,
                        "every QR")
    failed = fleet.ns.run(["systemctl", "list-units", "--no-legend", "--state=failed",
                           "wabridge-worker@cold*"]).stdout.strip()
    workers_cpu = [unit_cpu_s(fleet, f"wabridge-worker@cold{i}.service") for i in range(n)]
    out = {"units": n, "all_active_s": round(state["latest"] - t0, 2),
           "all_qr_on_documents_s": round(all_qr - t0, 2), "restarts": state["restarts"],
           "failed": failed.splitlines(),
           "worker_cpu_ms_mean": round(statistics.mean(workers_cpu) * 1000),
           "controller_cpu_s": round(unit_cpu_s(fleet, CTL) - controller_cpu, 1),
           "emulator_cpu_s": round(group_cpu_s(emulator_pid) - emulator_cpu, 1)}
    for i in range(n):
        fleet.request(f"cold{i}", "destroy_requested")
    try:
        wait_until(lambda: active_count(fleet, "wabridge-worker@cold*") == 0, timeout,
                   "cold stop")
    except AssertionError:
        out["stop_incomplete"] = active_count(fleet, "wabridge-worker@cold*")
    return out


def measure_neonize(fleet: Fleet, settle: float) -> dict[str, Any]:
    user = "neo"
    fleet.set_dropin(user, "[Service]\nPrivateNetwork=yes\n"
                     "Environment=WABRIDGE__WORKER__BACKEND=neonize\n")
    fleet.request(user, "create_requested")
    fleet.wait_doc(user, lambda d: d.get("status") in ("disconnected", "waiting_qr"), 60,
                   "neonize connecting")
    time.sleep(settle)
    pss = fleet.pss_bytes(fleet.unit(user))
    detail = str(fleet.doc(user).get("statusDetail", ""))[:120]
    fleet.request(user, "destroy_requested")
    fleet.wait_doc(user, lambda d: d.get("status") == "stopped", 30, "stopped")
    return {"pss_mb": round(pss / MB, 1), "state": detail}


def claude_pss_mb(fleet: Fleet, unit: str) -> list[float]:
    """PSS of each Claude CLI process of ``unit`` (host PIDs of the unit, by command line)."""
    out = []
    for pid in fleet.unit_pids(unit):
        try:
            if "claude" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                continue
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        kb = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
        out.append(round(kb * 1024 / MB, 1))
    return out


def ask(fleet: Fleet, contact: str, phone: str, text: str) -> None:
    """Like ``Fleet.ask``, for long conversations: the simulator keeps only a contact's latest
    inbox entries, so the reply is found by what it quotes, not by position."""
    wa_id = fleet.sim.send(contact, phone, text)
    wait_until(lambda: any(m.get("quoted_id") == wa_id for m in fleet.sim.inbox(contact)),
               120, f"a reply to {text!r}")


def measure_chats(fleet: Fleet, settle: float, turns: int) -> dict[str, Any]:
    """One sim account with 0, 1, 2 live chats; then one chat's CLI after ``turns`` turns."""
    user, phone = "chats", "5511900000901"
    unit = fleet.unit(user)
    fleet.link(user, phone)
    time.sleep(settle)
    out: dict[str, Any] = {"pss_mb_0_chats": round(fleet.pss_bytes(unit) / MB, 1)}
    for n, contact in enumerate(("5511988880001", "5511988880002"), start=1):
        ask(fleet, contact, phone, f"hello {n}")
        time.sleep(settle)
        out[f"pss_mb_{n}_chats"] = round(fleet.pss_bytes(unit) / MB, 1)
        out[f"claude_pss_mb_{n}_chats"] = claude_pss_mb(fleet, unit)
    started = time.monotonic()
    for i in range(turns - 1):
        ask(fleet, "5511988880001", phone, f"turn {i + 2}")
    out["turns"] = turns
    out["turns_s"] = round(time.monotonic() - started, 1)
    time.sleep(settle)
    out["pss_mb_after_turns"] = round(fleet.pss_bytes(unit) / MB, 1)
    out["claude_pss_mb_after_turns"] = claude_pss_mb(fleet, unit)
    fleet.request(user, "destroy_requested")
    fleet.wait_doc(user, lambda d: d.get("status") == "stopped", 30, "stopped")
    return out


def measure_reply_latency(fleet: Fleet, samples: int) -> dict[str, Any]:
    """A warm chat's reply as the contact sees it, with the default debounce, settle and send
    pacing (a drop-in sets the defaults back on this one unit), and with none."""
    from wabridge import config  # noqa: PLC0415 - the defaults, read where they are defined

    conv, limits = config.ConversationConfig(), config.LimitsConfig()
    out: dict[str, Any] = {"debounce": conv.debounce, "settle": conv.settle,
                           "send_gap": limits.send_gap, "send_jitter": limits.send_jitter}
    for label, dropin in (
            ("defaults", "[Service]\n"
             f"Environment=WABRIDGE__CONVERSATION__DEBOUNCE={conv.debounce}\n"
             f"Environment=WABRIDGE__CONVERSATION__SETTLE={conv.settle}\n"
             f"Environment=WABRIDGE__LIMITS__SEND_GAP={limits.send_gap}\n"
             f"Environment=WABRIDGE__LIMITS__SEND_JITTER={limits.send_jitter}\n"),
            ("none", "[Service]\nEnvironment=WABRIDGE__CONVERSATION__DEBOUNCE=0\n"
             "Environment=WABRIDGE__CONVERSATION__SETTLE=0\n")):
        user, phone, contact = f"rl{label}", f"55119000009{len(label):02d}", "5511988880009"
        fleet.set_dropin(user, dropin)
        fleet.link(user, phone)
        fleet.ask(contact, phone, "warm up", timeout=120)  # the chat's CLI is live from here
        times = []
        for i in range(samples):
            time.sleep(1.0)
            t0 = time.monotonic()
            fleet.ask(contact, phone, f"sample {i}", timeout=120)
            times.append(time.monotonic() - t0)
        out[f"{label}_ms_p50"] = round(p50(times) * 1000, 1)
        out[f"{label}_ms"] = [round(x * 1000, 1) for x in times]
        fleet.request(user, "destroy_requested")
        fleet.wait_doc(user, lambda d: d.get("status") == "stopped", 30, "stopped")
        fleet.clear_dropin(user)
    return out


def measure_engines() -> dict[str, Any]:
    """``bench.engines`` in its own process (it measures its own process and children)."""
    import subprocess  # noqa: PLC0415

    done = subprocess.run([sys.executable, "-m", "bench.engines", "--cli-chats", "3",
                           "--api-chats", "50", "--turns", "4"], cwd=REPO, check=True,
                          capture_output=True, text=True, timeout=900)
    path = Path(done.stdout.strip().splitlines()[-1])
    out: dict[str, Any] = {"file": path.name}
    for run in json.loads(path.read_text())["engines"]:
        out[f"{run['engine']}_{run['chats']}"] = {
            k: run[k] for k in ("per_live_chat_mb", "first_turn_mb", "cpu_ms_per_warm_turn",
                                "turn_ms_p50") if k in run}
    return out


HOST_GB = 24
HOST_BYTES = HOST_GB * 1024 * MB


def capacity(r: dict[str, Any], accounts: int = 300) -> dict[str, Any]:
    """What a 24 GB host holds, from this run's figures: the fleet slice is 90 % of it
    (``wabridge.slice``); the default Claude budget is what ``controller.slots`` derives
    beside ``accounts`` running workers, checked here against the measured costs."""
    from controller.slots import (  # noqa: PLC0415
        FLEET_SHARE,
        PER_WORKER_BYTES,
        default_budget,
    )

    fleet_mb = HOST_BYTES * FLEET_SHARE / MB
    out: dict[str, Any] = {"host_gb": HOST_GB, "fleet_slice_mb": round(fleet_mb),
                           "accounts": accounts}
    idle = r.get("neonize_connecting", {}).get("pss_mb")
    if idle:
        out["idle_neonize_accounts"] = int(fleet_mb // idle)
        # the budget's per-worker figure must not be below what a worker measures
        out["budget_per_worker_mb"] = PER_WORKER_BYTES / MB
        out["budget_per_worker_covers_measured"] = idle <= PER_WORKER_BYTES / MB
    budget = default_budget(int(HOST_BYTES * FLEET_SHARE), accounts)
    out["claude_budget_beside_accounts"] = budget
    out["claude_budget_empty_host"] = default_budget(int(HOST_BYTES * FLEET_SHARE), 0)
    chats = r.get("chats", {})
    if chats.get("pss_mb_2_chats") and chats.get("pss_mb_1_chats"):
        per_chat = chats["pss_mb_2_chats"] - chats["pss_mb_1_chats"]
        out["cli_chat_mb"] = round(per_chat, 1)
        if idle:  # the accounts and a full budget of CLI chats at the measured costs
            used = accounts * idle + budget * per_chat
            out["accounts_and_full_cli_budget_mb"] = round(used)
            out["accounts_and_full_cli_budget_fit"] = used <= fleet_mb
    apis = {int(k[4:]): v for k, v in r.get("engines", {}).items() if k.startswith("api_")}
    if apis and idle:
        many, few = apis[max(apis)], apis[min(apis)]  # per chat; the SDK once per worker
        left = fleet_mb - accounts * (idle + few["first_turn_mb"])
        out["api_chat_mb"] = many["per_live_chat_mb"]
        out["api_sdk_mb_per_account"] = few["first_turn_mb"]
        # every account on `api` pays the SDK once: how many fit at all, and the chats beside
        out["accounts_on_api"] = int(fleet_mb // (idle + few["first_turn_mb"]))
        out["api_chats_beside_accounts_on_api"] = max(
            0, int(left // max(many["per_live_chat_mb"], 0.01)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="cap accounts and cold units at 20")
    ap.add_argument("--accounts", default="1,10,50", help="comma-separated account counts")
    ap.add_argument("--cold", type=int, default=100, help="units started from cold")
    ap.add_argument("--samples", type=int, default=10, help="latency samples")
    ap.add_argument("--settle", type=float, default=5.0, help="idle seconds before PSS")
    ap.add_argument("--no-neonize", action="store_true")
    ap.add_argument("--turns", type=int, default=200, help="turns of one chat's CLI")
    ap.add_argument("--phases", default="latency,pss,neonize,chats,reply,cold,engines",
                    help="comma-separated subset of latency,pss,neonize,chats,reply,cold,"
                    "engines")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--capacity-from", type=Path, action="append", default=[],
                    help="a results file whose neonize/chats/engines figures the capacity "
                    "uses where this run has none (e.g. a --phases chats run)")
    args = ap.parse_args(argv)
    counts = sorted({int(c) for c in args.accounts.split(",") if c})
    cold = args.cold
    if args.quick:
        counts = sorted({min(c, 20) for c in counts})
        cold = min(cold, 20)
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {"accounts": counts, "cold": cold, "samples": args.samples,
                 "quick": args.quick},
        # the machine is shared (2 cores): a busy one slows start-up figures
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    with firestore_emulator.running() as emu, Fleet(
            plane="firestore", emulator_host=emu.address, qr_rotate=600.0,
            config={"controller": {"metrics_interval": 5.0},
                    "worker": {"qr_timeout": 3600.0},
                    # one conversation, one CLI process for all --turns turns (the loop guard
                    # would stop answering a contact after 30 turns in 10 minutes)
                    "conversation": {"rotate_after_turns": 0, "loop_max_turns": 0},
                    # one contact asks --turns times in a row: no sender rate limit, no budget
                    "limits": {"inbound_per_minute": 0.0, "daily_budget_usd": 0.0}}) as fleet:
        phases = set(args.phases.split(","))
        if args.no_neonize:
            phases.discard("neonize")
        steps: list[tuple[str, str, Any]] = [
            ("latency", "latency", lambda: measure_latency(fleet, args.samples)),
            ("pss", "pss", lambda: measure_pss(fleet, counts, args.settle)),
            ("neonize", "neonize_connecting", lambda: measure_neonize(fleet, args.settle)),
            ("chats", "chats", lambda: measure_chats(fleet, args.settle, args.turns)),
            ("reply", "reply_latency", lambda: measure_reply_latency(fleet, args.samples)),
            # last: after a burst of this size the emulator's listener has been seen to stall
            ("cold", "cold", lambda: measure_cold(fleet, cold, timeout=120 + 2 * cold,
                                                  emulator_pid=emu.pid)),
        ]
        for phase, key, run in steps:
            if phase not in phases:
                continue
            print(f"{phase} ...", flush=True)
            try:
                results[key] = run()
            except AssertionError as exc:  # keep what was measured; say what failed
                results.setdefault("errors", {})[phase] = str(exc).splitlines()[0]
                print(f"  {phase} failed: {str(exc).splitlines()[0]}", flush=True)
            else:
                print(f"  {results[key]}", flush=True)
            results["controller_pss_mb"] = round(fleet.pss_bytes(CTL) / MB, 1)
    if "engines" in set(args.phases.split(",")):
        print("engines ...", flush=True)
        results["engines"] = measure_engines()
        print(f"  {results['engines']}", flush=True)
    if args.capacity_from:  # figures of earlier runs
        for earlier in args.capacity_from:
            for key, value in json.loads(earlier.read_text()).items():
                if key in ("neonize_connecting", "chats", "engines"):
                    results.setdefault(key, value)
                    results.setdefault("figures_from", {})[key] = earlier.name
    results["capacity"] = capacity(results)
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    name = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    rows = [("figure", "value", "target")]
    if "neonize_connecting" in r:  # the headline: what a real account costs
        rows.append(("PSS per idle account, neonize backend (connecting, no network)",
                     f"{r['neonize_connecting']['pss_mb']} MB", "<= 55 MB"))
    for row in r.get("pss", []):
        rows.append((f"PSS per idle linked account, {row['accounts']} accounts (mean/max)",
                     f"{row['pss_mb_mean']} / {row['pss_mb_max']} MB", "<= 65 MB"))
    if "latency" in r:
        lat = r["latency"]
        rows += [
            ("unit start -> READY=1, sim worker (p50)",
             f"{lat['unit_start_to_ready_ms_p50']} ms", "<= 200 ms"),
            ("reaction: document -> unit starting (p50)", f"{lat['reaction_start_ms_p50']} ms",
             "<= 200 ms"),
            ("reaction: document -> unit active (p50)", f"{lat['reaction_active_ms_p50']} ms",
             ""),
            ("unit start -> QR on the document (p50)", f"{lat['qr_on_document_ms_p50']} ms",
             "<= 1000 ms"),
        ]
    for phase, error in r.get("errors", {}).items():
        rows.append((f"{phase}: FAILED", error[:60], ""))
    if "cold" in r:
        cold = r["cold"]
        rows += [
            (f"{cold['units']} units from cold: all active", f"{cold['all_active_s']} s", ""),
            (f"{cold['units']} units from cold: every QR on its document",
             f"{cold['all_qr_on_documents_s']} s", ""),
            ("  CPU per worker to its QR (mean) / controller meanwhile",
             f"{cold.get('worker_cpu_ms_mean')} ms / {cold.get('controller_cpu_s')} s", ""),
        ]
    rows.append(("controller PSS", f"{r['controller_pss_mb']} MB", ""))
    if "chats" in r:
        c = r["chats"]
        rows += [(f"account (sim) with {n} live chats: unit PSS", f"{c[f'pss_mb_{n}_chats']} MB",
                  "") for n in (0, 1, 2)]
        rows += [
            ("Claude CLI after 1 turn", f"{c['claude_pss_mb_1_chats']} MB", ""),
            (f"Claude CLI after {c['turns']} turns", f"{c['claude_pss_mb_after_turns']} MB", ""),
        ]
    if "reply_latency" in r:
        rl = r["reply_latency"]
        rows += [
            ("warm reply as the contact sees it, defaults (p50)", f"{rl['defaults_ms_p50']} ms",
             ""),
            ("warm reply, no debounce/settle/pacing (p50)", f"{rl['none_ms_p50']} ms", ""),
        ]
    for key, run in r.get("engines", {}).items():
        if isinstance(run, dict):
            rows.append((f"engine {key}: MB per live chat", f"{run.get('per_live_chat_mb')}",
                         ""))
    for key, value in r.get("capacity", {}).items():
        rows.append((f"24 GB host: {key}", str(value), ""))
    rows.append(("load average before / after (1 min)",
                 f"{r['loadavg_before'][0]} / {r['loadavg_after'][0]}", f"{r['cpus']} CPUs"))
    width = max(len(a) for a, _, _ in rows)
    print()
    for a, b, c in rows:
        print(f"{a:<{width}}  {b:>18}  {c}")


if __name__ == "__main__":
    raise SystemExit(main())
