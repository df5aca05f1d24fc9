"""The host's Claude budget through real systemd: three linked accounts, two contacts each,
all writing at once, with `claude.host_max_processes = 2`. The real Claude CLI runs in each
worker's unit against the fake Messages API; the namespace's process table is sampled all
along. Every message is answered (no apology), no more than two CLI processes ever live on
the host, idle ones are reclaimed for waiting chats, and no worker is killed or restarted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fleet import Fleet
from harness.systemd_ns import available

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

BUDGET = 2
USERS = {"bud1": "5511900000071", "bud2": "5511900000072", "bud3": "5511900000073"}
APOLOGY = "Sorry, I could not answer"


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str) -> Iterator[Fleet]:
    config = {"claude": {"host_max_processes": BUDGET, "max_processes": 2}}
    with Fleet(plane="firestore", emulator_host=firestore_emulator, config=config) as f:
        yield f


def claude_processes(fleet: Fleet) -> int:
    return sum(1 for p in fleet.processes() if "_bundled/claude" in p["cmdline"])


def test_a_flood_keeps_to_the_host_budget_and_every_message_is_answered(fleet: Fleet) -> None:
    for user, phone in USERS.items():
        fleet.link(user, phone)
    chats = [(f"55119888800{i}{n}", phone) for i, phone in enumerate(USERS.values())
             for n in (1, 2)]
    most = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, claude_processes(fleet))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(len(chats)) as pool:
            replies = list(pool.map(
                lambda chat: fleet.ask(chat[0], chat[1], f"hello from {chat[0]}", timeout=150),
                chats))
    finally:
        done.set()
        sampler.join()
    assert len(replies) == 6
    assert not [r for r in replies if APOLOGY in str(r.get("text"))]
    assert 1 <= most <= BUDGET, most
    journals = "".join(fleet.journal(fleet.unit(u)) for u in USERS)
    assert "claude.reclaimed" in journals  # idle processes gave way to waiting chats
    for user in USERS:
        props = fleet.props(fleet.unit(user), "Result", "NRestarts", "ActiveState")
        assert props == {"Result": "success", "NRestarts": "0", "ActiveState": "active"}, props
