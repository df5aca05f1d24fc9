"""Moving an account between two real hosts sharing one PostgreSQL (issue 13's move, and
issue 14's drain/undrain on the same mechanism): two systemd namespaces with their own
controllers, the Firestore emulator, the simulator and the fake Messages API. The account
reconnects on the other host without a QR, its chat resumes with its Claude transcript
(restored, not reseeded), and messages sent meanwhile are answered exactly once."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fakes.anthropic_api import Reply, last_user_text, tool_or_default_responder
from fleet import (
    FAST_FLEET,
    FAST_SIM_HEARTBEAT,
    ONE_REPLY_PER_MESSAGE,
    Chats,
    Fleet,
    double_connections,
    wait_until,
)
from harness.systemd_ns import available

from wabridge.postgres import account_role

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

ALICE = "5511955550001"
FRIEND, OTHER = "5511955559001", "5511955559002"


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str, postgres: Any) -> Iterator[Fleet]:
    with Fleet(plane="firestore", emulator_host=firestore_emulator, postgres=postgres,
               hosts=2, fleet=FAST_FLEET, sim_heartbeat=FAST_SIM_HEARTBEAT,
               config=ONE_REPLY_PER_MESSAGE) as f:
        yield f


def where(fleet: Fleet, user: str) -> str | None:
    hosts = [h for h, users in fleet.placement().items() if user in users]
    assert len(hosts) <= 1, f"{user} runs on {hosts} at once"
    return hosts[0] if hosts else None


def chat_row(fleet: Fleet, user: str, contact: str) -> tuple[str | None, str | None]:
    """(session id, pending seed) of the account's chat with ``contact``, from its schema."""
    assert fleet.pg is not None
    with fleet.pg.connect() as conn:
        row = conn.execute(
            f'SELECT session_id, seed FROM "{account_role(user)}".chats '  # noqa: S608
            "WHERE chat_id = %s", (f"{contact}@s.whatsapp.net",)).fetchone()
    assert row is not None, f"no chat with {contact}"
    return row[0], row[1]


def test_move_reconnects_without_a_qr_and_resumes_the_transcript(fleet: Fleet) -> None:
    fleet.link("alice", ALICE)
    source = wait_until(lambda: where(fleet, "alice"), 30, "alice to run on a host")
    target = next(h.host_id for h in fleet.hosts if h.host_id != source)
    assert fleet.ask(FRIEND, ALICE, "the code word is PELICAN")["text"] == (
        "echo: the code word is PELICAN")
    session, _seed = wait_until(lambda: chat_row(fleet, "alice", FRIEND)[0] and
                                chat_row(fleet, "alice", FRIEND), 30, "the chat's session")

    chats = Chats(fleet.sim)
    chats.keep_sending([(OTHER, ALICE)], every=0.3, prefix="during-move")
    try:
        moved = fleet.host(source).ctl("move", "alice", target)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        wait_until(lambda: where(fleet, "alice") == target, 60, f"alice to run on {target}",
                   fleet.journals)
        fleet.wait_doc("alice", lambda d: d.get("status") == "connected"
                       and d.get("host") == target, 60, f"connected on {target}")
        chats.send(OTHER, ALICE, "after-move")
    finally:
        chats.stop_sending()
    chats.wait_answered(120, fleet.journals)
    time.sleep(2)  # a duplicate, if any, would arrive now
    # No apology either: the stop's SIGTERM reaches the worker alone (KillMode=mixed), and a
    # turn that cannot finish in time stays pending and is answered on the other host.
    chats.assert_exactly_once()
    # the first of them went out 0.3 s after the move began, the last after it ended
    assert len(chats.sent[(OTHER, ALICE)]) >= 2

    # no QR: the same device (its token in alice's schema) reconnected from the other host
    record = fleet.sim.connections(ALICE)
    (device,) = record["devices"]
    assert device["connected"] and record["double_connections"] == 0
    clients = [i["client"] for i in device["intervals"]]
    assert clients[0] == source and clients[-1] == target, clients
    assert fleet.doc("alice").get("qrRaw") in (None, "")

    # the transcript followed: the next request carries the earlier exchange, same session
    before = len(fleet.api.message_requests())
    assert fleet.ask(FRIEND, ALICE, "what was the code word?")["text"] == (
        "echo: what was the code word?")
    sent = [" ".join(fleet.api.all_texts(r)) for r in fleet.api.message_requests()[before:]]
    asking = [t for t in sent if "what was the code word?" in t]
    assert asking and all("the code word is PELICAN" in t for t in asking), asking
    assert chat_row(fleet, "alice", FRIEND) == (session, None)  # resumed, not reseeded
    assert double_connections(fleet.sim) == {}


def _slow(body: Any) -> str | Reply:
    text = tool_or_default_responder(body)
    if isinstance(text, str) and "slow-" in last_user_text(body):
        return Reply(text=text, delay=3.0)
    return text


def test_a_turn_in_flight_when_the_account_moves_finishes_with_its_answer(
        fleet: Fleet) -> None:
    if where(fleet, "alice") is None:
        fleet.link("alice", ALICE)
    source = wait_until(lambda: where(fleet, "alice"), 30, "alice to run on a host")
    target = next(h.host_id for h in fleet.hosts if h.host_id != source)
    fleet.ask(FRIEND, ALICE, "warm up")  # the chat's Claude process is up
    fleet.api.responder = _slow
    try:
        before = len(fleet.api.message_requests())
        chats = Chats(fleet.sim)
        chats.send(FRIEND, ALICE, "slow-in-flight")
        wait_until(lambda: any("slow-in-flight" in " ".join(fleet.api.all_texts(r))
                               for r in fleet.api.message_requests()[before:]),
                   30, "the turn to reach the API")
        moved = fleet.host(source).ctl("move", "alice", target)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        chats.wait_answered(90, fleet.journals)
        wait_until(lambda: where(fleet, "alice") == target, 60, f"alice on {target}")
        time.sleep(2)
        chats.assert_exactly_once()
    finally:
        fleet.api.responder = tool_or_default_responder


def _link_light(fleet: Fleet, user: str, phone: str) -> None:
    """An account on the ``api`` engine (no Claude process to start: lighter on 2 cores)."""
    fleet.db.collection("user_sessions").document(user).set({"settings": {"engine": "api"}})
    fleet.link(user, phone)


def _hosts(fleet: Fleet, host: str) -> dict[str, Any]:
    proc = fleet.host(host).ctl("hosts", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {r["host"]: r for r in json.loads(proc.stdout)["hosts"]}


def _logged(fleet: Fleet, host: str, event: str) -> dict[str, list[float]]:
    """user -> when ``host``'s controller logged ``event`` about it (journal times)."""
    out = fleet.host(host).ns.journalctl("-u", "wabridge-controller.service", "-o", "json",
                                        "--output-fields=MESSAGE")
    times: dict[str, list[float]] = {}
    for line in out.splitlines():
        entry = json.loads(line)
        words = str(entry.get("MESSAGE", "")).split()
        if words and words[0] == event:
            fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            times.setdefault(fields.get("user_id", ""), []).append(
                int(entry["__REALTIME_TIMESTAMP"]) / 1e6)
    return times


def _transits(fleet: Fleet, users: list[str], source: str, target: str
              ) -> list[tuple[float, float]]:
    """For each account that left ``source``: (``source`` sent it away, ``target`` won its
    lease), from the two controllers' journals."""
    moved = _logged(fleet, source, "fleet.move")
    taken = _logged(fleet, target, "fleet.lease_acquired")
    out = []
    for user in users:
        if moved.get(user):
            left = moved[user][-1]
            arrived = [t for t in taken.get(user, []) if t >= left]
            out.append((left, arrived[0] if arrived else float("inf")))
    return sorted(out)


def _state(fleet: Fleet, users: list[str]) -> str:
    docs = {u: {k: fleet.doc(u).get(k) for k in ("status", "host", "statusDetail")}
            for u in users}
    return f"placement {fleet.placement()}\ndocuments {docs}\n{fleet.journals(150)}"


def test_drain_empties_a_host_one_account_at_a_time_and_undrain_pulls_nothing_back(
        fleet: Fleet) -> None:
    phones = {"bob": "5511955550002", "carol": "5511955550003", "dave": "5511955550004"}
    for user, phone in phones.items():
        _link_light(fleet, user, phone)
    users = ["alice", *phones] if where(fleet, "alice") else list(phones)
    wait_until(lambda: all(where(fleet, u) for u in users), 60, "every account to run")
    placement = fleet.placement()
    drained = max(placement, key=lambda h: (len(placement[h]), h))
    other = next(h for h in placement if h != drained)
    leaving = {u: p for u, p in {"alice": ALICE, **phones}.items() if u in placement[drained]}
    assert len(leaving) >= 2, placement  # spread within one: 4 accounts, 2 hosts

    chats = Chats(fleet.sim)
    contacts = [f"55119555591{n:02d}" for n in range(len(users))]
    all_phones = {"alice": ALICE, **phones}
    chats.keep_sending([(c, all_phones[u]) for c, u in zip(contacts, users, strict=True)],
                       every=0.6, prefix="drain")
    try:
        done = fleet.host(other).ctl("drain", drained)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(lambda: fleet.placement()[drained] == [], 120, f"{drained} to empty",
                   fleet.journals)
        wait_until(lambda: sorted(fleet.placement()[other]) == sorted(users), 60,
                   f"every account on {other}")
        for user in users:
            fleet.wait_doc(user, lambda d: d.get("status") == "connected"
                           and d.get("host") == other, 60, f"connected on {other}")
    finally:
        chats.stop_sending()
    chats.wait_answered(120, lambda: _state(fleet, users))
    time.sleep(2)
    chats.assert_exactly_once()  # no apology: see the move above
    # one at a time: the next account is sent away only once the previous one holds its
    # lease on the other host (journal times: allow for the logging's own delay)
    transits = _transits(fleet, list(leaving), drained, other)
    assert len(transits) == len(leaving), transits
    for (_left, arrived), (next_left, _next_arrived) in itertools.pairwise(transits):
        assert next_left >= arrived - 0.2, f"two accounts in transit at once: {transits}"
    assert double_connections(fleet.sim) == {}
    rows = _hosts(fleet, other)
    assert rows[drained]["draining"] and rows[drained]["accounts"] == 0, rows

    undone = fleet.host(other).ctl("undrain", drained)
    assert undone.returncode == 0, undone.stdout + undone.stderr
    time.sleep(3)  # several placement ticks: nothing is pulled back
    assert fleet.placement()[drained] == []
    assert not _hosts(fleet, drained)[drained]["draining"]
    _link_light(fleet, "erin", "5511955550005")  # a new account goes to the emptied host
    wait_until(lambda: where(fleet, "erin") == drained, 60, f"erin on {drained}")
    assert sorted(fleet.placement()[other]) == sorted(users)
