"""The host's Claude budget: at most ``budget`` Claude CLI processes live on the host, whatever
the number of accounts chatting at once.

Workers ask the controller for a slot before starting a chat's process and give it back when
the process closes (``wabridge.protocol.Slot`` / ``SlotOrder``). ``decide`` is the pure rule:
free slots go to waiting chats fairly (the account holding the fewest slots first, then the
longest waiting), and while chats still wait, or the host is over budget (workers that ran
on their local limit while the controller was down report their processes on reconnect), the
least recently used idle processes on the host are reclaimed. A busy process (in a turn) is
never reclaimed. ``SlotLedger`` keeps the host's view and applies the decisions.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wabridge.protocol import SlotState

# The default budget (``claude.host_max_processes = 0``) is what is left of the fleet slice
# once the running workers are paid for, with a reserve kept back, in CLI processes:
#   budget = (slice x (1 - RESERVE_SHARE) - running workers x PER_WORKER_BYTES
#             - those of them on the api engine x API_SDK_BYTES) // PER_CHAT_BYTES
# recomputed at every slot decision, so each account that starts takes its share from Claude.
# Figures from ``make bench`` (bench/results/): a neonize worker in its connecting state
# (the real account's cost, rounded up), the anthropic SDK a worker on the ``api`` engine
# loads (bench.engines' first turn), one live CLI chat (~110 MB after a turn). The
# reserve is for the controller and for CLIs that grow in long conversations (up to ~270 MB
# after hundreds of turns). Counting workers rather than reading the slice's memory.current:
# that counts page cache and momentary peaks, and would shrink the budget whenever a CLI's
# own memory grew, so the controller would be taking slots back from the chats it measures.
PER_CHAT_BYTES = 110 * 2**20
PER_WORKER_BYTES = 50 * 2**20
API_SDK_BYTES = 30 * 2**20
RESERVE_SHARE = 0.15
FLEET_SLICE = Path("/sys/fs/cgroup/wabridge.slice/memory.max")
FLEET_SHARE = 0.9  # wabridge.slice's MemoryMax=90% where the cgroup file is not readable

Key = tuple[str, str]  # (user id, chat id)


def default_budget(memory_bytes: int, workers: int, api_workers: int = 0) -> int:
    """Claude CLI processes a fleet slice of ``memory_bytes`` may run beside ``workers``
    running workers, ``api_workers`` of them on the ``api`` engine; 0 when the workers alone
    fill it (every CLI chat then apologises)."""
    left = (int(memory_bytes * (1 - RESERVE_SHARE)) - workers * PER_WORKER_BYTES
            - api_workers * API_SDK_BYTES)
    return max(0, left // PER_CHAT_BYTES)


def on_api_engine(settings: Mapping[str, Any], host_engine: str) -> bool:
    """Whether a worker with these document ``settings`` runs its chats on the ``api`` engine
    (it then loads the SDK and takes no CLI slot): the user's ``engine``, else the host's
    ``claude.engine``; never with ``tools = wabridge`` (as ``agent.policy.engine_for``; an
    invalid value, which the worker refuses, counts as the host's)."""
    if settings.get("tools") == "wabridge":
        return False
    engine = settings.get("engine")
    return (engine if engine in ("cli", "api") else host_engine) == "api"


def fleet_memory(slice_file: Path = FLEET_SLICE, meminfo: Path = Path("/proc/meminfo")) -> int:
    """The fleet slice's memory limit in bytes: its cgroup's ``memory.max``, else 90 % of the
    host's memory (the slice's ``MemoryMax=90%``)."""
    try:
        text = slice_file.read_text().strip()
        if text.isdigit():
            return int(text)
    except OSError:
        pass
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) * 1024 * FLEET_SHARE)
    raise ValueError(f"no MemTotal in {meminfo}")


@dataclass(frozen=True)
class Held:
    user_id: str
    chat_id: str
    busy: bool
    used: float  # when it was last busy or idle (monotonic)
    reclaiming: bool = False  # asked back; counts until the worker says it is gone

    @property
    def key(self) -> Key:
        return self.user_id, self.chat_id


@dataclass(frozen=True)
class Wanted:
    user_id: str
    chat_id: str
    since: float

    @property
    def key(self) -> Key:
        return self.user_id, self.chat_id


@dataclass(frozen=True)
class Decision:
    grant: tuple[Key, ...] = ()
    reclaim: tuple[Key, ...] = ()


def decide(budget: int, held: Sequence[Held], wanted: Sequence[Wanted]) -> Decision:
    """Which waiting chats get a slot now, and which idle processes must be given back."""
    counts = Counter(h.user_id for h in held)
    free = budget - len(held)
    waiting = list(wanted)
    grant: list[Key] = []
    while free > 0 and waiting:
        pick = min(waiting, key=lambda w: (counts[w.user_id], w.since, w.key))
        waiting.remove(pick)
        grant.append(pick.key)
        counts[pick.user_id] += 1
        free -= 1
    need = max(0, -free) + len(waiting) - sum(h.reclaiming for h in held)
    idle = sorted((h for h in held if not h.busy and not h.reclaiming),
                  key=lambda h: (h.used, h.key))
    return Decision(grant=tuple(grant), reclaim=tuple(h.key for h in idle[:max(0, need)]))


class SlotLedger:
    """The controller's view of the host's Claude processes, changed by workers' reports."""

    def __init__(self, budget: int | Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._budget = budget
        self._clock = clock
        self.held: dict[Key, Held] = {}
        self.wanted: dict[Key, Wanted] = {}
        self.peak = 0  # most slots held at once (diagnostics, tests)

    @classmethod
    def for_host(cls, budget: int, workers: Callable[[], tuple[int, int]]) -> SlotLedger:
        """``claude.host_max_processes``; 0: derived from the fleet slice's memory and the
        ``workers`` running now, and how many of them are on the ``api`` engine (read at every
        decision)."""
        if budget:
            return cls(budget)
        memory = fleet_memory()
        return cls(lambda: default_budget(memory, *workers()))

    @property
    def budget(self) -> int:
        return self._budget() if callable(self._budget) else self._budget

    @budget.setter
    def budget(self, budget: int) -> None:
        self._budget = budget

    def report(self, user_id: str, chat_id: str, state: SlotState) -> Decision:
        key = (user_id, chat_id)
        now = self._clock()
        if state == "gone":
            self.held.pop(key, None)
            self.wanted.pop(key, None)
        elif state == "want":
            if key in self.held:  # asked again (a lost grant): it has the slot already
                self.held[key] = replace(self.held[key], busy=True, used=now, reclaiming=False)
                return self._apply(extra=(key,))
            self.wanted.setdefault(key, Wanted(user_id, chat_id, now))
        else:
            # busy also answers a reclaim that came during a turn; a process reported by a
            # worker back from an outage counts even over budget (then idle ones go back)
            old = self.held.get(key)
            reclaiming = bool(old and old.reclaiming and state == "idle")
            self.held[key] = Held(user_id, chat_id, busy=state == "busy", used=now,
                                  reclaiming=reclaiming)
            self.wanted.pop(key, None)
        return self._apply()

    def drop(self, user_id: str) -> Decision:
        """The worker's link is gone: its processes are no longer counted (it runs on its
        local limit; it reports them again when it is back)."""
        for table in (self.held, self.wanted):
            for key in [k for k in table if k[0] == user_id]:
                del table[key]
        return self._apply()

    def _apply(self, extra: tuple[Key, ...] = ()) -> Decision:
        decision = decide(self.budget, list(self.held.values()), list(self.wanted.values()))
        now = self._clock()
        for key in decision.grant:
            self.wanted.pop(key)
            self.held[key] = Held(*key, busy=True, used=now)
        for key in decision.reclaim:
            self.held[key] = replace(self.held[key], reclaiming=True)
        self.peak = max(self.peak, len(self.held))
        return Decision(grant=extra + decision.grant, reclaim=decision.reclaim)
