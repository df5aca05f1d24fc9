"""``python -m bench.engines``: the two Claude engines side by side (``claude.engine``).

One process plays the worker: the real :class:`agent.engine.Engine` with a real
:class:`agent.store.Store` in a temporary directory, an in-memory WhatsApp backend, and either
engine -- ``cli`` (:class:`agent.pool.ClaudePool`, the real bundled Claude Code CLI, one
process per live chat) or ``api`` (:class:`agent.claude_api.ApiConversations`, the anthropic
SDK in this process). The fake Messages API runs in a helper subprocess
(:class:`bench.conversation.Peers`), so it counts neither in this process's memory nor its CPU.

Runs: ``cli`` with ``--cli-chats`` chats, ``api`` with as many (same load: turn time and CPU
compare), ``api`` with ``--api-chats`` chats (memory per live chat). In each, every chat takes
``turns`` turns (closed loop, all chats at once, one message in flight per chat; every chat
stays live: ``claude.max_processes`` = chats):

* memory: PSS (``/proc/PID/smaps_rollup``) of this process plus its live Claude children,
  before any turn, after the first chat's first turn, and with all chats live after their
  turns. ``per_live_chat_mb`` = (all live - after the first turn) / (chats - 1): the marginal
  cost of one more live chat. ``first_turn_mb``: what the first turn adds once (a CLI process
  with its shared text; for ``api``, the SDK import and client);
* CPU per warm turn: utime + stime of this process and its Claude children over the warm
  turns (every turn after a chat's first), divided by their number; end-to-end turn time
  (inbound persisted -> reply handed to WhatsApp) p50.

Writes ``bench/results/engines-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fakes.quiet_whatsapp import QuietWhatsApp  # noqa: E402 - tests/ put on the path above

from agent.claude import ClaudeSettings  # noqa: E402
from agent.claude_api import ApiConversations, ApiSettings  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.pool import ClaudePool  # noqa: E402
from agent.store import Store  # noqa: E402
from agent.whatsapp.events import IncomingMessage  # noqa: E402
from bench.conversation import Peers, children, cpu_seconds, pss_kb  # noqa: E402
from wabridge import logs  # noqa: E402
from wabridge.claude_cli import bundled_cli  # noqa: E402
from wabridge.config import ConversationConfig, LimitsConfig  # noqa: E402
from wabridge.prices import Price  # noqa: E402

OWNER = "4915100000001"


class BenchWhatsApp(QuietWhatsApp):
    def __init__(self) -> None:
        self.sent: dict[str, asyncio.Event] = {}

    async def send_text(self, chat_id: str, text: str, *, quote: IncomingMessage | None,
                        msg_id: str | None = None, expiration: int = 0) -> str:
        del text, quote, expiration
        self.sent.setdefault(chat_id, asyncio.Event()).set()
        return msg_id or "OUT"

    def is_connected(self) -> bool:
        return True


def footprint(exclude: set[int]) -> tuple[int, float]:
    """(PSS kB, CPU seconds) of this process and its live Claude children."""
    kids = children(os.getpid(), exclude)
    # process_time: this process's CPU at full resolution (/proc counts 10 ms ticks)
    return (pss_kb(os.getpid()) + sum(pss_kb(p) for p in kids),
            time.process_time() + sum(cpu_seconds(p) for p in kids))


async def run_engine(name: str, base_url: str, root: Path, chats: int, turns: int,
                     exclude: set[int]) -> dict[str, Any]:
    await asyncio.to_thread(root.mkdir, parents=True)
    store = Store(root / "agent.db")
    wa = BenchWhatsApp()
    cli = bundled_cli()
    if cli is None:
        raise SystemExit("claude-agent-sdk's bundled CLI is missing")
    env = {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-ant-bench"}
    pool = ClaudePool(chats, 600.0, ClaudeSettings(cli_path=cli, model=None,
                                                   system_prompt="Answer briefly.",
                                                   extra_env=env), root, store)
    api = ApiConversations(ApiSettings(model="claude-bench", price=Price(3.0, 15.0),
                                       system_prompt="Answer briefly.", api_key="sk-ant-bench",
                                       base_url=base_url), store)
    conv = ConversationConfig(debounce=0.0, rotate_after_turns=0)
    limits = LimitsConfig(daily_budget_usd=0.0, inbound_per_minute=0.0, send_gap=0.0,
                          send_jitter=0.0)
    engine = Engine(store, wa, pool, conv, lambda *a: None, limits=limits, api=api,
                    engine="api" if name == "api" else "cli", rng=lambda: 0.0)
    engine.set_owner(OWNER)
    stop = asyncio.Event()
    deliver = asyncio.create_task(engine.deliver_forever(stop))
    ids = iter(range(1, 10**9))
    durations: list[float] = []

    async def turn(chat: str, text: str) -> float:
        event = wa.sent.setdefault(chat, asyncio.Event())
        event.clear()
        started = time.perf_counter()
        msg = IncomingMessage(wa_id=f"IN{next(ids)}", chat_id=chat, sender=chat, text=text,
                              timestamp=time.time())
        engine.persist(msg)
        engine.wake_chat(chat)
        await asyncio.wait_for(event.wait(), 60)
        return time.perf_counter() - started

    chat_ids = [f"49170{n:08d}@s.whatsapp.net" for n in range(chats)]
    before = footprint(exclude)
    await turn(chat_ids[0], "hello, this is the first message of the benchmark")
    await asyncio.sleep(0.3)
    first = footprint(exclude)
    for chat in chat_ids[1:]:
        await turn(chat, "hello, this is the first message of the benchmark")
    await asyncio.sleep(0.3)
    warm_start = footprint(exclude)
    for n in range(1, turns):
        results = await asyncio.gather(*(turn(c, f"message {n}: tell me more about tea")
                                         for c in chat_ids))
        durations.extend(results)
    await asyncio.sleep(0.3)
    after = footprint(exclude)
    live = pool.live
    await engine.drain(2.0)
    await engine.close_conversations()
    stop.set()
    await asyncio.gather(deliver, return_exceptions=True)
    store.close()
    warm_turns = chats * (turns - 1)
    return {
        "engine": name, "chats": chats, "turns_per_chat": turns,
        "cli_processes_live": live,
        "pss_mb": {"before": round(before[0] / 1024, 1), "after_first_turn":
                   round(first[0] / 1024, 1), "all_chats_live": round(after[0] / 1024, 1)},
        "first_turn_mb": round((first[0] - before[0]) / 1024, 1),
        "per_live_chat_mb": round((after[0] - first[0]) / 1024 / max(1, chats - 1), 2),
        "cpu_ms_per_warm_turn": round((after[1] - warm_start[1]) * 1000 / warm_turns, 1),
        "turn_ms_p50": round(statistics.median(durations) * 1000, 1),
    }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    logs.setup("bench-engines", level="warning", fmt="json")
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "loadavg_before": os.getloadavg(), "engines": []}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        peers = Peers(Path(tmp))
        try:
            # api twice: with as many chats as cli (same load: latency and CPU compare), and
            # with many (memory per live chat)
            runs = (("cli", args.cli_chats), ("api", args.cli_chats), ("api", args.api_chats))
            for n, (name, chats) in enumerate(runs):
                if name not in args.engines.split(","):
                    continue
                result = await run_engine(name, peers.base_url, Path(tmp) / f"{name}{n}",
                                          chats, args.turns, {peers.proc.pid})
                print(json.dumps(result), flush=True)
                out["engines"].append(result)
        finally:
            peers.close()
    out["loadavg_after"] = os.getloadavg()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli-chats", type=int, default=4)
    parser.add_argument("--api-chats", type=int, default=100)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--engines", default="cli,api", help="comma-separated: cli, api")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    result = asyncio.run(amain(args))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"engines-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
