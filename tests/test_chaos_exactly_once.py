"""Exactly-once replies across crashes: three chats send continuously while the
worker is SIGKILLed at random moments; every inbound message gets exactly one reply, counted
at the simulated contacts, in per-chat order.

The number of kills is ``WABRIDGE_CHAOS_KILLS`` (default 20).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator

import pytest
from fleet import Fleet, wait_until
from harness.systemd_ns import available

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

ACCOUNT = "5511900000101"
CONTACTS = ["5511911110001", "5511911110002", "5511911110003"]
KILLS = int(os.environ.get("WABRIDGE_CHAOS_KILLS", "20"))
PER_CHAT = KILLS + 10

# Restart fast and without a start limit: this test kills on purpose.
DROPIN = """[Unit]
StartLimitBurst=1000
[Service]
RestartSec=200ms
"""


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str) -> Iterator[Fleet]:
    with Fleet(
        plane="firestore",
        emulator_host=firestore_emulator,
        # one message per turn, so "one reply per message" is exact
        config={"conversation": {"debounce": 0.0, "max_batch": 1},
                "limits": {"inbound_per_minute": 0.0}},
        extra_files={"/etc/systemd/system/wabridge-worker@.service.d/chaos.conf": DROPIN},
    ) as f:
        yield f


def test_sigkill_storm_loses_and_duplicates_nothing(fleet: Fleet) -> None:
    fleet.link("chaos", ACCOUNT)
    unit = fleet.unit("chaos")
    for contact in CONTACTS:  # make each contact known to the account
        fleet.ask(contact, ACCOUNT, f"{contact} hello")
    sent: dict[str, list[tuple[str, str]]] = {c: [] for c in CONTACTS}
    done = threading.Event()
    errors: list[BaseException] = []

    def chat(contact: str) -> None:
        try:
            for n in range(PER_CHAT):
                text = f"{contact}-m{n:03d}"
                sent[contact].append((fleet.sim.send(contact, ACCOUNT, text), text))
                time.sleep(random.uniform(0.05, 0.4))
        except BaseException as exc:
            errors.append(exc)

    senders = [threading.Thread(target=chat, args=(c,)) for c in CONTACTS]
    for t in senders:
        t.start()
    rng = random.Random(int(os.environ.get("WABRIDGE_CHAOS_SEED", "7")))
    kills = 0
    try:
        while kills < KILLS:
            time.sleep(rng.uniform(0.2, 1.2))
            if fleet.prop(unit, "ActiveState") not in ("active", "activating"):
                continue
            fleet.ns.systemctl("kill", "-s", "SIGKILL", unit)
            kills += 1
    finally:
        for t in senders:
            t.join(120)
        done.set()
    assert not errors, errors
    assert kills == KILLS

    def all_answered() -> bool:
        for contact in CONTACTS:
            quoted = {m.get("quoted_id") for m in fleet.sim.inbox(contact)}
            if any(wa_id not in quoted for wa_id, _ in sent[contact]):
                return False
        return True

    wait_until(all_answered, 180, "every message to be answered",
               lambda: fleet.journal(unit)[-4000:])
    time.sleep(2)  # a duplicate, if any, would arrive now

    for contact in CONTACTS:
        inbox = fleet.sim.inbox(contact)
        order = {wa_id: i for i, (wa_id, _) in enumerate(sent[contact])}
        replies = [m for m in inbox if m.get("quoted_id") in order]
        counts: dict[str, int] = {}
        for m in replies:
            counts[m["quoted_id"]] = counts.get(m["quoted_id"], 0) + 1
        dupes = {k: v for k, v in counts.items() if v > 1}
        assert not dupes, f"{contact}: duplicate replies {dupes}"
        assert len(replies) == PER_CHAT
        positions = [order[m["quoted_id"]] for m in replies]
        assert positions == sorted(positions), f"{contact}: replies out of order {positions}"
        for m in replies:
            text = dict(sent[contact])[m["quoted_id"]]
            assert m["text"] == f"echo: {text}" or fleet_apology(m["text"]), m
    restarts = int(fleet.prop(unit, "NRestarts"))
    # a kill that lands while the unit is still activating can coalesce with the restart in
    # progress, so systemd may count a few restarts fewer than the kills sent
    assert restarts >= KILLS * 3 // 4, (restarts, KILLS)


def fleet_apology(text: str) -> bool:
    return text.startswith("Sorry")
