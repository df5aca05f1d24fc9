"""Security properties end to end through a real systemd.

- Identity on the controller socket comes from the unit, never from what ``hello`` claims: a
  transient unit, a process in no unit, and a process inside bob's unit all fail to speak for
  alice (``not_your_unit``).
- Claude runs with tools off unless configured: the API request offers no tools, every
  ``claude`` process has ``--tools ""``, runs as its worker's user, inside its worker's unit.
- A contact who is not the owner cannot run commands (``/reset`` goes to Claude as text and
  forgets nothing); with ``commands_from = everyone`` the same path runs them.
- Text of one chat never reaches another chat's agent: 2 users x 3 chats x 4 turns, checked
  on every request that reached the (fake) Anthropic API.
- Per-user isolation (skipped until per-user UIDs are in place): from inside alice's worker
  sandbox nothing of bob's is readable, nor the controller's secrets.
- ``systemd-analyze security`` exposure of the worker and the controller, as a regression
  guard (the figures are recorded by ``python -m bench.chaos`` too).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, wait_until
from harness.net import free_port
from harness.systemd_ns import available

from agent import commands

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

ALICE, BOB = "5511900000201", "5511900000202"
ALICE_KEY = f"sk-ant-alice-{secrets.token_hex(8)}"  # alice's own key (settings.apiKeyRef)
SHARED_KEY = "test-key"  # worker.env's ANTHROPIC_API_KEY (tests/fleet.py)
METRICS_PORT = free_port()
CTL = "wabridge-controller.service"
SOCKET = "/run/wabridge/controller.sock"
# Regression guards for `systemd-analyze security` (0 = fully locked down, 10 = exposed).
# Measured 2026-11-25 with systemd 252: worker 1.1 OK, controller 2.1 OK (bench/results/
# chaos-*.json records them on every chaos run).
MAX_EXPOSURE = {"worker": 1.1, "controller": 2.5}

# Connects to the controller socket, says hello as argv[1], prints every line it gets back
# (as JSON) and "EOF" when the controller closes the connection.
PROBE = r"""
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
hello = {"v": 1, "type": "hello", "user_id": sys.argv[2], "pid": os.getpid(), "version": "probe"}
try:
    s.sendall(json.dumps(hello).encode() + b"\n")
except OSError:
    pass  # refused (and closed) before the hello was read: the answer is still to be read
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
state = {"v": 1, "type": "state", "seq": 1, "state": "connected", "detail": "probe"}
try:
    s.sendall(json.dumps(state).encode() + b"\n")
    line = f.readline()
    print(line.decode().strip() if line else "EOF", flush=True)
except OSError:
    print("EOF", flush=True)
"""


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str) -> Iterator[Fleet]:
    with Fleet(
        plane="firestore",
        emulator_host=firestore_emulator,
        # one message per turn, no rate limit or budget in the way
        config={"controller": {"metrics_listen": f"127.0.0.1:{METRICS_PORT}"},
                "conversation": {"debounce": 0.0, "max_batch": 1},
                "limits": {"inbound_per_minute": 0.0, "daily_budget_usd": 0.0}},
    ) as f:
        # systemd makes / shared at boot, except in a container (the harness): the credential
        # ramfs of a unit is mounted in a child namespace and must propagate back
        f.ns.run(["mount", "--make-rshared", "/"], check=True)
        f.ns.write_file("/etc/wabridge/keys/alice", ALICE_KEY + "\n", 0o600)
        f.db.collection("user_sessions").document("alice").set(
            {"settings": {"apiKeyRef": "alice"}})
        f.db.collection("user_sessions").document("bob").set(
            {"settings": {"commands_from": "everyone"}})
        f.link("alice", ALICE)
        f.link("bob", BOB)
        yield f


def _frames(out: str) -> list[Any]:
    return [json.loads(line) if line.startswith("{") else line
            for line in out.splitlines() if line.strip()]


def _assert_refused(frames: list[Any], claimed: str | None) -> None:
    """One ``not_your_unit`` frame, then the connection closed. ``claimed`` is the user the
    message names; None for a process in no worker unit, refused before its hello is read."""
    assert frames, "no answer from the controller"
    first = frames[0]
    assert isinstance(first, dict) and first["type"] == "error", frames
    assert first["code"] == "not_your_unit", first
    if claimed is None:
        assert "is not a wabridge worker" in first["message"], first
    else:
        assert claimed in first["message"], first
    assert frames[1:] == ["EOF"], f"the connection must be closed after a refusal: {frames}"


def _unharmed(fleet: Fleet, user: str) -> None:
    doc = fleet.doc(user)
    assert doc.get("status") == "connected", doc.get("status")
    assert doc.get("statusDetail") != "probe"


# --- identity on the controller socket ----------------------------------------------------


def test_a_transient_unit_cannot_speak_for_a_user(fleet: Fleet) -> None:
    r = fleet.ns.run(["systemd-run", "--wait", "--pipe", "--quiet", "--collect",
                      "/usr/bin/python3", "-c", PROBE, SOCKET, "alice"], timeout=60)
    _assert_refused(_frames(r.stdout), None)
    _unharmed(fleet, "alice")
    assert "link.peer_refused" in fleet.journal(CTL)


def test_a_process_in_no_unit_cannot_speak_for_a_user(fleet: Fleet) -> None:
    r = fleet.ns.run(["/usr/bin/python3", "-c", PROBE, SOCKET, "alice"])
    _assert_refused(_frames(r.stdout), None)
    _unharmed(fleet, "alice")


def test_a_process_in_bobs_unit_cannot_speak_for_alice(fleet: Fleet) -> None:
    """A process moved into bob's cgroup is bob to the controller (positive control: it may
    speak for bob), and never alice."""
    cgroup = fleet.prop(fleet.unit("bob"), "ControlGroup")
    hosts = [d / cgroup.lstrip("/") for d in fleet.ns.cgroup_dirs]
    procs = [h / "cgroup.procs" for h in hosts if (h / "cgroup.procs").exists()]
    assert procs, f"bob's cgroup {cgroup} not found under {fleet.ns.cgroup_dirs}"

    def in_bobs_unit(user: str) -> list[Any]:
        # the probe waits for a line on stdin, so it is in bob's cgroup before it connects
        script = "import sys; sys.stdin.readline()\n" + PROBE
        proc = subprocess.Popen(
            ["nsenter", "-t", str(fleet.ns.pid), "-a", "/usr/bin/python3", "-c", script,
             SOCKET, user],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            child = wait_until(lambda: _child_of(proc.pid), 5, "the probe process")
            for path in procs:
                path.write_text(f"{child}\n")
            out, err = proc.communicate("go\n", timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        return _frames(out)

    _assert_refused(in_bobs_unit("alice"), "alice")
    _unharmed(fleet, "alice")
    # the same process may speak for bob: identity really comes from the unit
    linked = fleet.journal(CTL).count("link.worker_connected")
    accepted = in_bobs_unit("bob")
    assert accepted[0]["type"] == "welcome", accepted
    assert accepted[1]["type"] == "ack", accepted
    # bob's real worker (whose link the probe displaced) links again and still answers
    wait_until(lambda: fleet.journal(CTL).count("link.worker_connected") >= linked + 2, 30,
               "bob's worker to link again")
    fleet.wait_doc("bob", lambda d: d.get("status") == "connected", 60, "bob connected")
    assert "echo: still bob" in fleet.ask("5511977770201", BOB, "still bob")["text"]


def _child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


# --- a flood of idle connections ------------------------------------------------

# Run as root inside the namespace: raises its own descriptor limit, becomes nobody, opens
# argv[2] connections to argv[1] (retrying while the listen backlog is full, for at most
# 15 s), prints how many it made and holds them until stdin closes.
FLOOD = r"""
import os, resource, socket, sys, time
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
os.setgroups([]); os.setgid(65534); os.setuid(65534)
held, deadline = [], time.monotonic() + 15
while len(held) < int(sys.argv[2]) and time.monotonic() < deadline:
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(sys.argv[1])
    except BlockingIOError:  # the backlog is full: the controller is not accepting
        s.close()
        time.sleep(0.005)
        continue
    held.append(s)
print(len(held), flush=True)
sys.stdin.readline()
"""

# Times one admin round trip (what `wabridgectl status` waits for), in seconds.
ADMIN_STATUS = r"""
import json, socket, time
start = time.monotonic()
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect("/run/wabridge/admin.sock")
s.sendall(b'{"op": "status"}\n')
answer = json.loads(s.makefile("rb").readline())
assert answer["ok"], answer
print(time.monotonic() - start)
"""


def test_idle_connections_of_a_local_user_do_not_lock_up_the_controller(fleet: Fleet) -> None:
    """2,000 idle connections from uid nobody (the socket is 0666): the controller still
    answers wabridgectl within 1 s, a restarted worker links again and answers, and the
    journal is not flooded."""
    flood = subprocess.Popen(
        ["nsenter", "-t", str(fleet.ns.pid), "-a", "/usr/bin/python3", "-c", FLOOD, SOCKET,
         "2000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert flood.stdout is not None
        made = flood.stdout.readline().strip()
        took = float(fleet.ns.run(["/usr/bin/python3", "-c", ADMIN_STATUS], check=True,
                                  timeout=30).stdout)
        print(f"admin round trip under the flood: {took:.3f} s")
        assert took < 1.0, f"wabridgectl's request took {took:.2f} s"
        linked = fleet.journal(CTL).count("link.worker_connected")
        fleet.systemctl("restart", fleet.unit("alice"))
        wait_until(lambda: fleet.journal(CTL).count("link.worker_connected") > linked, 30,
                   "alice's restarted worker to link", lambda: fleet.journal(CTL)[-3000:])
        fleet.wait_doc("alice", lambda d: d.get("status") == "connected", 60, "connected")
        assert "echo: after the flood" in fleet.ask("5511977770301", ALICE,
                                                    "after the flood")["text"]
        took = float(fleet.ns.run(["/usr/bin/python3", "-c", ADMIN_STATUS], check=True,
                                  timeout=30).stdout)
        assert took < 1.0, f"wabridgectl's request took {took:.2f} s"
    finally:
        if flood.poll() is None:
            flood.communicate("", timeout=30)
    assert made == "2000", f"the controller accepted {made} of 2,000 connections"
    journal = fleet.journal(CTL)
    assert "out of system resource" not in journal and "accept_failed" not in journal
    assert journal.count("link.peer_refused") <= 10, "refusals must be rate-limited"


# --- Claude: tools off, inside the worker -------------------------------------------------


def test_claude_runs_without_tools_as_the_worker_inside_its_unit(fleet: Fleet) -> None:
    before = len(fleet.api.message_requests())
    assert "echo: any tools?" in fleet.ask("5511977770101", ALICE, "any tools?")["text"]
    requests = fleet.api.message_requests()[before:]
    assert requests, "no request reached the API"
    for req in requests:
        assert req.json.get("tools") in ([], None), req.json.get("tools")
    procs = fleet.processes()
    workers = {p["pid"]: p for p in procs if "agent.main" in p["cmdline"]}
    claudes = [p for p in procs if "_bundled/claude" in p["cmdline"]]
    assert claudes, "a claude process should be alive after a turn"
    for p in claudes:
        argv = (fleet.ns.root / f"proc/{p['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--tools") + 1] == b"", argv
        for flag in (b"--strict-mcp-config", b"--disable-slash-commands", b"--bare"):
            assert flag in argv, (flag, argv)
        parent = workers.get(p["ppid"])
        assert parent is not None, f"claude {p} is not a child of a worker"
        assert p["uid"] == parent["uid"] != 0, (p, parent)
        assert p["cgroup"] == parent["cgroup"], (p, parent)
        assert re.search(r"/wabridge-worker@[^/]+\.service$", p["cgroup"]), p


# --- commands: owner only -----------------------------------------------------------------


def test_a_contact_cannot_run_commands(fleet: Fleet) -> None:
    contact = "5511977770102"
    word = f"kiwi{secrets.token_hex(3)}"
    fleet.ask(contact, ALICE, f"remember {word}")
    for command in ("/reset", "/status", "/help"):
        before = len(fleet.api.message_requests())
        reply = fleet.ask(contact, ALICE, command)["text"]
        assert reply not in (commands.RESET_TEXT, commands.HELP_TEXT), reply
        assert not reply.startswith("Status\n"), reply
        # it went to Claude as ordinary text (never as a CLI slash command)
        assert command in reply, reply
        assert len(fleet.api.message_requests()) > before
    before = len(fleet.api.message_requests())
    fleet.ask(contact, ALICE, "what did I ask you to remember?")
    texts = " ".join(" ".join(fleet.api.all_texts(r))
                     for r in fleet.api.message_requests()[before:])
    assert word in texts, "the conversation was reset by a contact"


def test_commands_from_everyone_is_the_owners_choice(fleet: Fleet) -> None:
    before = len(fleet.api.message_requests())
    reply = fleet.ask("5511977770202", BOB, "/help")["text"]
    assert reply == commands.HELP_TEXT
    time.sleep(0.5)
    assert len(fleet.api.message_requests()) == before, "a command must not reach Claude"


# --- chats stay apart -----------------------------------------------------------------------

_MARK = re.compile(r"xc-(\w+)-(\d)-t(\d+)-[0-9a-f]{6}")


def test_text_of_one_chat_never_reaches_another(fleet: Fleet) -> None:
    turns = 4
    nonce = secrets.token_hex(3)
    accounts = {"alice": ALICE, "bob": BOB}
    first = len(fleet.api.requests)
    errors: list[BaseException] = []

    def chat(user: str, index: int) -> None:
        contact = f"55119777{'12' if user == 'alice' else '22'}{index:03d}"
        try:
            for n in range(turns):
                text = f"xc-{user}-{index}-t{n}-{nonce}"
                reply = fleet.ask(contact, accounts[user], text, timeout=120)
                assert reply["text"] == f"echo: {text}", reply
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(u, i)) for u in accounts for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[0]
    requests = [r for r in fleet.api.requests[first:] if r.is_messages and r.json]
    seen = 0
    for req in requests:
        marks = {(m.group(1), m.group(2)) for text in fleet.api.all_texts(req)
                 for m in _MARK.finditer(text) if nonce in m.group(0)}
        seen += bool(marks)
        assert len(marks) <= 1, f"one request carried text of several chats: {sorted(marks)}"
    assert seen >= 2 * 3 * turns


# --- isolation between users (needs per-user UIDs) ------------------------------------------


def _alice_pid_and_uid(fleet: Fleet) -> tuple[int, int]:
    pids = {u: int(fleet.prop(fleet.unit(u), "MainPID")) for u in ("alice", "bob")}
    uids = {}
    for user, pid in pids.items():
        status = (fleet.ns.root / f"proc/{pid}/status").read_text()
        uids[user] = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    assert uids["alice"] != uids["bob"], f"alice and bob both run as uid {uids['alice']}"
    return pids["alice"], uids["alice"]


def _in_alices_sandbox(fleet: Fleet, pid: int, uid: int,
                       *argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv in alice's worker's namespaces (mounts, /proc, users...) as her UID."""
    return fleet.ns.run(["nsenter", "-t", str(pid), "-a", "-S", str(uid), "-G", str(uid),
                         *argv])


def test_alices_sandbox_sees_nothing_of_bob(fleet: Fleet) -> None:
    pid, uid = _alice_pid_and_uid(fleet)
    fleet.ask("5511977770103", ALICE, "fill alice's state")
    own = _in_alices_sandbox(fleet, pid, uid, "head", "-c", "15",
                             "/var/lib/wabridge/alice/agent.db")
    assert own.stdout == "SQLite format 3", own  # the probe itself works
    files = fleet.ns.run(["find", "/var/lib/private/wabridge/bob", "-type", "f"],
                         check=True).stdout.split()
    assert any(f.endswith("/agent.db") for f in files), files
    targets = [p for f in files for p in (f, f.replace("/var/lib/private/", "/var/lib/"))]
    inner_bob = [p["pid"] for p in fleet.processes()
                 if p["cgroup"].endswith("/" + fleet.unit("bob"))]
    assert inner_bob
    for pb in inner_bob:
        targets += [f"/proc/{pb}/environ", f"/proc/{pb}/cmdline", f"/proc/{pb}/cwd/agent.db",
                    f"/proc/{pb}/root/etc/hostname"]
    leaked = []
    for path in targets:
        r = _in_alices_sandbox(fleet, pid, uid, "head", "-c", "64", path)
        if r.returncode == 0:
            leaked.append((path, r.stdout[:40]))
    assert not leaked, f"alice's worker can read: {leaked}"


def _in_sandbox_of(fleet: Fleet, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv in ``user``'s worker's namespaces as its UID."""
    pid = int(fleet.prop(fleet.unit(user), "MainPID"))
    return _in_alices_sandbox(fleet, pid, fleet.uid_of(user), *argv)


def test_each_worker_has_its_own_dev_shm(fleet: Fleet) -> None:
    name = f"/dev/shm/alice-{secrets.token_hex(4)}"
    wrote = _in_sandbox_of(fleet, "alice", "sh", "-c", f"echo secret > {name} && cat {name}")
    assert wrote.returncode == 0 and wrote.stdout.strip() == "secret", wrote  # it works
    seen = _in_sandbox_of(fleet, "bob", "ls", "-a", "/dev/shm")
    assert seen.returncode == 0, seen
    assert name.rsplit("/", 1)[1] not in seen.stdout, f"bob sees alice's {name}"
    assert not (fleet.ns.root / name.lstrip("/")).exists(), "alice's file is on the host's"


def test_workers_cannot_read_the_controllers_secrets(fleet: Fleet) -> None:
    pid, uid = _alice_pid_and_uid(fleet)
    secret = f"secret-{secrets.token_hex(8)}"
    fleet.ns.write_file("/etc/wabridge/firebase.json", json.dumps({"private_key": secret}),
                        0o600)
    cpid = fleet.prop(CTL, "MainPID")
    for path in ("/etc/wabridge/firebase.json", f"/proc/{cpid}/environ",
                 f"/proc/{cpid}/root/etc/wabridge/firebase.json",
                 "/run/credentials/wabridge-controller.service/firebase"):
        r = _in_alices_sandbox(fleet, pid, uid, "cat", path)
        assert r.returncode != 0 and secret not in r.stdout, (path, r.stdout[:80])
    # nor can it drive the admin API (wabridgectl's socket: root and the admin group only)
    admin = _in_alices_sandbox(fleet, pid, uid, "/usr/bin/python3", "-c",
                               "import socket; s = socket.socket(socket.AF_UNIX); "
                               "s.connect('/run/wabridge/admin.sock')")
    assert admin.returncode != 0, "a worker could connect to the admin socket"
    assert "PermissionError" in admin.stderr or "FileNotFoundError" in admin.stderr, admin.stderr


# GETs argv[1]; prints the HTTP status, then the body.
SCRAPE = r"""
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""


def test_a_worker_cannot_read_the_fleets_metrics(fleet: Fleet) -> None:
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    fleet.wait_doc("bob", lambda d: d.get("status") == "connected", 60, "connected")
    for who in ([], ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]):
        scraper = fleet.ns.run([*who, "/usr/bin/python3", "-c", SCRAPE, url], check=True)
        assert scraper.stdout.startswith("200\n") and 'user="bob"' in scraper.stdout, (
            who, scraper.stdout[:300])
    worker = _in_sandbox_of(fleet, "alice", "/usr/bin/python3", "-c", SCRAPE, url)
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.startswith("403\n"), worker.stdout[:300]
    assert "bob" not in worker.stdout
    assert "metrics.refused" in fleet.journal(CTL)


def test_a_users_own_api_key_goes_to_the_api_and_to_no_other_worker(fleet: Fleet) -> None:
    nonce = secrets.token_hex(3)
    before = len(fleet.api.message_requests())
    fleet.ask("5511977770401", ALICE, f"alice's key {nonce}")
    fleet.ask("5511977770402", BOB, f"bob's key {nonce}")
    keys: dict[str, set[str]] = {"alice": set(), "bob": set()}
    for req in fleet.api.message_requests()[before:]:
        text = " ".join(fleet.api.all_texts(req))
        for user, seen in keys.items():
            if f"{user}'s key {nonce}" in text:
                seen.add(req.headers.get("x-api-key", ""))
    assert keys == {"alice": {ALICE_KEY}, "bob": {SHARED_KEY}}, keys
    # alice's worker has it (positive control); nobody else can read it
    credential = f"/run/credentials/{fleet.unit('alice')}/anthropic-api-key"
    own = _in_sandbox_of(fleet, "alice", "cat", credential)
    assert own.stdout.strip() == ALICE_KEY, own
    for path in (credential, "/etc/wabridge/keys/alice", "/etc/wabridge/keys"):
        r = _in_sandbox_of(fleet, "bob", "cat", path)
        assert r.returncode != 0 and ALICE_KEY not in r.stdout, (path, r.stdout[:80])
    alices = fleet.unit("alice")
    others = [p for p in fleet.processes() if not p["cgroup"].endswith("/" + alices)]
    assert any(fleet.unit("bob") in p["cgroup"] for p in others)
    for p in others:
        environ = fleet.ns.root / f"proc/{p['pid']}/environ"
        try:
            assert ALICE_KEY.encode() not in environ.read_bytes(), p
        except FileNotFoundError:
            continue  # gone meanwhile
    dropin = fleet.ns.root / f"run/systemd/system/{alices}.d/50-wabridge.conf"
    assert ALICE_KEY not in dropin.read_text()  # a path to the key, never the key


def test_a_bad_api_key_ref_is_reported_and_starts_nothing(fleet: Fleet) -> None:
    fleet.request("carol", "create_requested", settings={"apiKeyRef": "../worker.env"})
    doc = fleet.wait_doc("carol", lambda d: d.get("status") == "error", 30, "status error")
    assert doc["error"]["code"] == "bad_setting" and "apiKeyRef" in doc["error"]["message"]
    assert fleet.prop(fleet.unit("carol"), "ActiveState") == "inactive"


# --- systemd-analyze security ---------------------------------------------------------------


def exposure(fleet: Fleet, unit: str) -> tuple[float, str]:
    """``systemd-analyze security``'s overall exposure of a loaded unit: (level, verdict)."""
    out = fleet.ns.run(["systemd-analyze", "security", "--no-pager", unit], timeout=60).stdout
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", out)
    assert m, out[-2000:]
    return float(m.group(1)), m.group(2)


def test_systemd_analyze_security_exposure(fleet: Fleet, record_property: Any) -> None:
    figures = {"worker": exposure(fleet, fleet.unit("alice")),
               "controller": exposure(fleet, CTL)}
    for name, (level, verdict) in figures.items():
        record_property(f"exposure_{name}", f"{level} {verdict}")
        print(f"systemd-analyze security {name}: {level} {verdict}")
        assert level <= MAX_EXPOSURE[name], (name, level, verdict)
