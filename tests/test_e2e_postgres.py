"""PostgreSQL restarted, and down for a while, under load, end to end: nothing is lost.

Three accounts on ``storage.backend = "postgresql"`` (the session's real cluster), each
linked on the simulator in a real systemd namespace, each with two contacts who keep writing
while the server is restarted twice (a clean restart, then a crash) and then stopped for
longer than the workers' retry backoff and started again. Counted at the simulated contacts:
every message answered exactly once, in per-chat order; no worker said it lost a message
(``store.inbound_lost``); every account ends connected with its unit active.

The simulator acks each message *before* the worker sees it (the hook
``WABRIDGE_TEST_SIM_ACK=receipt``: neonize's order), so a message the store refused exists
only in the worker's inbound hold (``agent/inbound_hold.py``): without the hold this test
loses messages.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fleet import Fleet, wait_until
from harness.systemd_ns import available
from postgres_cluster import Cluster

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.slow,
    pytest.mark.timeout(720),
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

ACCOUNTS = {"pgload-a": "5511900000201", "pgload-b": "5511900000202",
            "pgload-c": "5511900000203"}
CONTACTS = {user: [f"55119222{n}{i}01" for i in range(2)]
            for n, user in enumerate(ACCOUNTS)}
DOWN_SECONDS = 25.0  # past the hold's backoff (1, 2, 4, 8 s...) and systemd's RestartSec=2

# The simulator acks on receipt, as WhatsApp does through neonize (see the module docstring).
HOOKS = """[Service]
Environment=WABRIDGE_TEST_HOOKS=1 WABRIDGE_TEST_SIM_ACK=receipt
"""


@pytest.fixture(scope="module")
def controller_role(postgres: Cluster) -> tuple[str, str, str]:
    return postgres.controller_role()


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str, postgres: Cluster,
          controller_role: tuple[str, str, str]) -> Iterator[Fleet]:
    role, password, database = controller_role
    with Fleet(
        plane="firestore",
        emulator_host=firestore_emulator,
        config={
            "storage": {"backend": "postgresql", "postgres_url": postgres.url(role, database)},
            # the api engine: the conversation lives in the store too (more store traffic
            # per turn), and no Claude Code process per chat on a 2-core machine
            "claude": {"engine": "api"},
            # one message per turn, so "one reply per message" is exact
            "conversation": {"debounce": 0.0, "max_batch": 1, "loop_max_turns": 0},
            "limits": {"inbound_per_minute": 0.0},
        },
        extra_files={
            "/etc/wabridge/postgres-password": password,
            "/etc/systemd/system/wabridge-worker@.service.d/hooks.conf": HOOKS,
        },
    ) as f:
        # systemd makes / shared at boot, except in a container (the harness): a unit's
        # credentials ramfs (the role's password) must propagate back (as test_security.py)
        f.ns.run(["mount", "--make-rshared", "/"], check=True)
        yield f


def test_postgres_restarted_and_down_under_load_loses_nothing(
        fleet: Fleet, postgres: Cluster) -> None:
    for user, phone in ACCOUNTS.items():
        fleet.link(user, phone)
        for contact in CONTACTS[user]:
            assert "echo: hello" in fleet.ask(contact, phone, "hello")["text"]

    sent: dict[tuple[str, str], list[tuple[str, str]]] = {
        (phone, c): [] for user, phone in ACCOUNTS.items() for c in CONTACTS[user]}
    stop = threading.Event()
    errors: list[BaseException] = []

    def chat(phone: str, contact: str) -> None:
        rng = random.Random(contact)
        n = 0
        try:
            while not stop.is_set():
                text = f"{contact}-m{n:03d}"
                sent[phone, contact].append((fleet.sim.send(contact, phone, text), text))
                n += 1
                time.sleep(rng.uniform(0.3, 0.8))
        except BaseException as exc:
            errors.append(exc)

    senders = [threading.Thread(target=chat, args=key) for key in sent]
    for t in senders:
        t.start()
    try:
        time.sleep(3)
        postgres.restart("fast")  # every session ended; back at once
        time.sleep(5)
        postgres.restart("immediate")  # a crash: recovery at start
        time.sleep(5)
        postgres.stop("fast")
        time.sleep(DOWN_SECONDS)
        postgres.start()
        time.sleep(8)
    finally:
        stop.set()
        for t in senders:
            t.join(30)
    assert not errors, errors
    total = sum(len(v) for v in sent.values())

    def unanswered() -> dict[str, int]:
        missing = {}
        for (_, contact), messages in sent.items():
            quoted = {m.get("quoted_id") for m in fleet.sim.inbox(contact)}
            left = [wa_id for wa_id, _ in messages if wa_id not in quoted]
            if left:
                missing[contact] = len(left)
        return missing

    wait_until(lambda: not unanswered(), 240,
               f"every one of {total} messages to be answered",
               lambda: f"unanswered: {unanswered()}\n" + _journals(fleet))
    time.sleep(2)  # a duplicate, if any, would arrive now

    for (_, contact), messages in sent.items():
        order = {wa_id: i for i, (wa_id, _) in enumerate(messages)}
        replies = [m for m in fleet.sim.inbox(contact) if m.get("quoted_id") in order]
        counts: dict[str, int] = {}
        for m in replies:
            counts[m["quoted_id"]] = counts.get(m["quoted_id"], 0) + 1
        assert not {k: v for k, v in counts.items() if v > 1}, f"{contact}: duplicates"
        assert len(replies) == len(messages)
        positions = [order[m["quoted_id"]] for m in replies]
        assert positions == sorted(positions), f"{contact}: out of order {positions}"
        texts = dict(messages)
        for m in replies:
            # the fake API echoes the prompt (after a context rotation: the summary first);
            # no apology for an outage
            assert m["text"].startswith("echo: ") and texts[m["quoted_id"]] in m["text"], m

    journal = fleet.journal(None)
    assert "store.inbound_lost" not in journal, "a worker gave up on an acknowledged message"
    assert "store.inbound_held" in journal, "the outage never reached a worker's inbox"
    restarts = {}
    for user in ACCOUNTS:
        fleet.wait_doc(user, lambda d: d.get("status") == "connected", 30, "connected")
        assert fleet.prop(fleet.unit(user), "ActiveState") == "active"
        restarts[user] = int(fleet.prop(fleet.unit(user), "NRestarts"))
    print(f"postgres outage: {total} messages answered exactly once, in order; "
          f"held {journal.count('store.inbound_held')}, worker restarts {restarts}")


def _journals(fleet: Fleet) -> str:
    parts: list[Any] = [fleet.journal("wabridge-controller.service")[-2000:]]
    parts += [f"--- {u}:\n" + fleet.journal(fleet.unit(u))[-3000:] for u in ACCOUNTS]
    return "\n".join(parts)
