"""``python -m bench.conversation``: what the conversation engine adds to a Claude turn.

One worker, in process (no systemd): the real :class:`agent.main.Worker` (its sink, event
pump, outbox sender, controller link and supervision loop) with a real :class:`Store` in a
temporary directory, the real :class:`Engine` and :class:`ClaudePool` driving the REAL bundled
Claude Code CLI. Only the edges are fake:

* WhatsApp: :class:`BenchWhatsApp`, in memory. Like neonize it hands inbound messages to the
  sink on its own thread; it timestamps (``time.perf_counter_ns``) the moment an
  ``IncomingMessage`` is handed to the sink, and the moment ``send_text`` is called.
* The Anthropic API (``tests/fakes/anthropic_api.py``, no added delay) and a controller that
  acks every report at once, both in ONE helper subprocess, so neither competes for this
  process's GIL nor counts in its memory.

Configuration: debounce 0, ``send_gap``/``send_jitter`` 0, inbound rate limit and daily budget
off, context rotation off, logging at ``info`` as JSON lines into a file (production writes the
same events to journald).

Figures
=======
1. Bridge-added latency of a warm turn = (inbound handed to the sink -> the user line written
   to claude's stdin) + (claude's ``result`` line read -> ``send_text`` called), p50/p99 with
   1, 10 and 50 chats at once, ``claude.max_processes`` = chats (no eviction). Closed loop: a
   chat sends its next message when its previous reply arrives; every chat's first (cold)
   turn is answered before any second message goes out, so the measured warm turns never
   compete with CLI start-ups. Default messages per chat: max(30, 200 / chats).
   The two inner timestamps come from wrapping ``ClaudeSession.turn`` in this process: call
   entry ~ stdin write, return ~ result read (the headline figure, as specified). Entry comes
   a little before the write (JSON encoding, the session lock, ``wait_for``'s task start) and
   return a little after the read (the reader task's queue hand-off, two or three loop
   iterations), so this UNDER-counts the bridge by that much; on a busy loop each iteration
   is other chats' work. A second figure ("precise") also wraps ``ClaudeSession._write`` (the
   user line) and the session's stdout queue (the parsed ``result`` line), which puts those
   steps on the bridge's side. Neither sees the time between the CLI writing its ``result``
   line and our reader reading it (counted as Claude's).
   Breakdown: ``persist`` (the sink's SQLite commit, on the WhatsApp thread), ``to_pump``
   (until the event pump hands the chat to the engine), ``to_turn`` (the chat's step: policy,
   the controller report, the budget query, the pool), ``to_commit`` (``complete_turn``
   committed), ``to_send`` (the outbox sender called ``send_text``).
   CPU per measured turn: this process (the whole worker), the Claude processes, the helper;
   and the event loop thread's time on a CPU vs runnable but waiting for one (``schedstat``):
   when the wait dominates, the tail is the machine's (other chats' CLIs, other work), not
   the bridge's code.
2. Cold vs warm vs resumed turns, end to end (inbound -> ``send_text``), one message in flight
   at a time: cold = a chat's first turn (a CLI spawn), warm = later turns, resumed = pool of
   2 with 3 chats in rotation, so every turn evicts (closes) the least recently used process
   and starts its own with ``--resume``. "bridge" there = end to end - open() - turn().
3. Memory, 20 chats at once with ``max_processes`` = 2: PSS (``Pss`` of
   ``/proc/PID/smaps_rollup``) of this Python process plus its live Claude children, sampled
   every 0.25 s; max and mean. This process does not import neonize (the production worker
   does), so its part is a lower bound.
4. Every ``Store`` call: duration, per turn, on the loop or the WhatsApp thread, and whether
   it overlapped a Store call of the other thread (both write the same SQLite file).

Options: ``--only warm,kinds,memory`` picks scenarios; ``--samples`` adds every message's
timestamps to the JSON; ``--send-latency-ms X`` makes ``send_text`` take X ms after it is
called (a WhatsApp round trip), which shows how the outbox sender wakes up for replies
committed meanwhile. The load average around each scenario is recorded: the machine may be
shared, compare runs with that in mind.

Results: a table on stdout, JSON in ``bench/results/conversation-<UTC date and time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import math
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
OWNER = "4915100000001"
TARGET_P99_MS = 10.0
TAG = re.compile(r"\bc(\d{3})t(\d{4})\b")
NS = 1_000_000  # ns per ms

# --------------------------------------------------------------------------------------------
# helper subprocess: the fake Anthropic API and a controller that acks every report


def serve_peers(sock_path: str) -> int:
    """Run in the helper subprocess (``--serve-peers SOCK``): print the API's URL, serve until
    stdin closes."""
    sys.path.insert(0, str(REPO / "tests"))
    from fakes.anthropic_api import FakeAnthropicAPI  # noqa: PLC0415 - loaded only when this path runs

    from wabridge import protocol  # noqa: PLC0415 - loaded only when this path runs

    async def controller(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\n")  # hello
            writer.write(protocol.encode(protocol.Welcome(settings={})))
            await writer.drain()
            while True:
                line = await reader.readuntil(b"\n")
                data = json.loads(line)
                seq = data.get("seq")
                if isinstance(seq, int):
                    writer.write(protocol.encode(protocol.Ack(seq=seq)))
                    await writer.drain()
                elif data.get("type") == "slot" and data.get("state") == "want":
                    # an unlimited host Claude budget: every chat gets its process at once
                    writer.write(protocol.encode(protocol.SlotOrder(
                        chat_id=str(data.get("chat_id")), order="grant")))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def amain(base_url: str) -> None:
        server = await asyncio.start_unix_server(controller, sock_path, limit=protocol.MAX_FRAME)
        print(base_url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        server.close()

    with FakeAnthropicAPI() as api:
        asyncio.run(amain(api.base_url))
    return 0


class Peers:
    def __init__(self, root: Path) -> None:
        self.sock = str(root / "controller.sock")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.conversation", "--serve-peers", self.sock],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO, text=True,
        )
        assert self.proc.stdout is not None  # noqa: S101 - narrows the type; a benchmark, never run with -O
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            self.close()
            raise RuntimeError("the fake API / controller helper did not start")

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------------------------
# measurements


@dataclasses.dataclass
class Sample:
    """The timestamps (perf_counter_ns) of one message's way through the worker."""

    chat: int
    turn: int
    t_in: int = 0  # handed to the sink (WhatsApp thread)
    t_persisted: int = 0  # Engine.persist returned (SQLite commit done)
    t_pumped: int = 0  # the event pump called Engine.wake_chat
    t_entry: int = 0  # ClaudeSession.turn called
    t_stdin: int = 0  # the user line handed to stdin (ClaudeSession._write)
    t_result: int = 0  # the result line parsed by the stdout reader
    t_return: int = 0  # ClaudeSession.turn returned
    t_committed: int = 0  # Store.complete_turn returned
    t_send: int = 0  # send_text called
    kind: str = ""  # cold | resumed | warm
    open_ms: float = 0.0  # the session's open() (spawn + handshake), for cold/resumed
    error: bool = False  # the reply was not Claude's (apology)

    @property
    def complete(self) -> bool:
        return all((self.t_in, self.t_entry, self.t_return, self.t_send)) and not self.error


class Recorder:
    """Collects samples; also the hooks' shared state. Writes come from the loop thread and
    the WhatsApp thread (each field by one of them only)."""

    def __init__(self) -> None:
        self.samples: dict[tuple[int, int], Sample] = {}
        self.inflight: dict[str, tuple[int, int]] = {}  # chat JID -> its message in flight
        self.store_calls: dict[str, list[tuple[int, int, bool]]] = {}  # start, end, on loop
        self.closes_ms: list[float] = []
        self.loop_thread: int | None = None

    def sample(self, key: tuple[int, int]) -> Sample:
        s = self.samples.get(key)
        if s is None:
            s = self.samples[key] = Sample(*key)
        return s

    def by_chat(self, chat_id: str) -> Sample | None:
        key = self.inflight.get(chat_id)
        return self.samples.get(key) if key else None


ACTIVE: Recorder | None = None  # the recorder of the running scenario (hooks write into it)


def tag_of(value: Any) -> tuple[int, int] | None:
    text = value if isinstance(value, str) else json.dumps(value)
    m = TAG.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


@contextlib.contextmanager
def hooks() -> Iterator[None]:
    """Timing wrappers on product classes, in this process only (nothing is edited)."""
    from agent.claude import ClaudeSession  # noqa: PLC0415 - loaded only when this path runs
    from agent.engine import Engine  # noqa: PLC0415 - loaded only when this path runs
    from agent.store import Store  # noqa: PLC0415 - loaded only when this path runs

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, value)

    orig_turn = ClaudeSession.turn
    orig_write = ClaudeSession._write
    orig_init = ClaudeSession.__init__
    orig_open = ClaudeSession.__dict__["open"].__func__
    orig_close = ClaudeSession.close
    orig_persist = Engine.persist
    orig_wake = Engine.wake_chat

    class TimedQueue(asyncio.Queue):  # type: ignore[type-arg]
        def __init__(self, session: Any) -> None:
            super().__init__()
            self._bench_session = session

        def put_nowait(self, item: Any) -> None:
            if isinstance(item, dict) and item.get("type") == "result":
                self._bench_session._bench_result_ns = time.perf_counter_ns()
            super().put_nowait(item)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        self._queue = TimedQueue(self)  # the reader task has not run yet
        self._bench_turns = 0
        self._bench_resumed = False
        self._bench_open_ms = 0.0
        self._bench_tag = None
        self._bench_result_ns = 0

    async def open_(cls: Any, /, **kwargs: Any) -> Any:
        started = time.perf_counter_ns()
        session = await orig_open(cls, **kwargs)
        session._bench_resumed = kwargs.get("resume_session_id") is not None
        session._bench_open_ms = (time.perf_counter_ns() - started) / NS
        return session

    async def turn(self: Any, content: Any) -> Any:
        rec, key = ACTIVE, tag_of(content)
        entry = time.perf_counter_ns()
        nth = self._bench_turns
        self._bench_turns = nth + 1
        self._bench_tag = key
        self._bench_result_ns = 0
        try:
            return await orig_turn(self, content)
        finally:
            done = time.perf_counter_ns()
            self._bench_tag = None
            if rec is not None and key is not None:
                s = rec.sample(key)
                s.t_entry, s.t_return, s.t_result = entry, done, self._bench_result_ns
                s.kind = "warm" if nth else ("resumed" if self._bench_resumed else "cold")
                s.open_ms = self._bench_open_ms if not nth else 0.0

    async def write(self: Any, data: str) -> None:
        key = getattr(self, "_bench_tag", None)
        if ACTIVE is not None and key is not None and data.startswith('{"type": "user"'):
            ACTIVE.sample(key).t_stdin = time.perf_counter_ns()
        await orig_write(self, data)

    async def close(self: Any, timeout: float = 3.0) -> None:
        started = time.perf_counter_ns()
        await orig_close(self, timeout)
        if ACTIVE is not None:
            ACTIVE.closes_ms.append((time.perf_counter_ns() - started) / NS)

    def persist(self: Any, message: Any) -> bool:
        fresh: bool = orig_persist(self, message)
        s = ACTIVE.by_chat(message.chat_id) if ACTIVE is not None else None
        if s is not None:
            s.t_persisted = time.perf_counter_ns()
        return fresh

    def wake_chat(self: Any, chat_id: str) -> None:
        s = ACTIVE.by_chat(chat_id) if ACTIVE is not None else None
        if s is not None and not s.t_pumped:
            s.t_pumped = time.perf_counter_ns()
        orig_wake(self, chat_id)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter_ns()
            try:
                return fn(self, *args, **kwargs)
            finally:
                done = time.perf_counter_ns()
                rec = ACTIVE
                if rec is not None:
                    on_loop = threading.get_ident() == rec.loop_thread
                    rec.store_calls.setdefault(name, []).append((started, done, on_loop))
                    if name == "complete_turn" and args:
                        s = rec.by_chat(args[0])
                        if s is not None:
                            s.t_committed = done

        return wrapper

    patch(ClaudeSession, "turn", turn)
    patch(ClaudeSession, "_write", write)
    patch(ClaudeSession, "__init__", init)
    patch(ClaudeSession, "open", classmethod(open_))
    patch(ClaudeSession, "close", close)
    patch(Engine, "persist", persist)
    patch(Engine, "wake_chat", wake_chat)
    for name, fn in list(vars(Store).items()):
        if callable(fn) and not name.startswith("_") and name != "close":
            patch(Store, name, timed(name, fn))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


# --------------------------------------------------------------------------------------------
# memory


def pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def children(root: int, exclude: set[int]) -> list[int]:
    """Live descendants of ``root`` (not ``exclude`` nor theirs)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parent[int(entry.name)] = int(fields[1])
    out: list[int] = []
    todo = [root]
    while todo:
        p = todo.pop()
        for pid, ppid in parent.items():
            if ppid == p and pid not in exclude:
                out.append(pid)
                todo.append(pid)
    return out


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_snapshot(exclude: set[int]) -> dict[str, float]:
    """CPU seconds used so far by this process, its live Claude children and the helper; and
    (from ``/proc/self/task/TID/schedstat``, called on the loop thread) the seconds the event
    loop's thread spent runnable but waiting for a CPU: the machine's share of the latency."""
    kids = children(os.getpid(), exclude)
    try:
        stat = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat").read_text()
        run_ns, wait_ns = (int(x) for x in stat.split()[:2])
    except (OSError, ValueError):
        run_ns = wait_ns = 0
    return {"python": cpu_seconds(os.getpid()), "claude": sum(cpu_seconds(p) for p in kids),
            "helper": sum(cpu_seconds(p) for p in exclude), "loop_thread": run_ns / 1e9,
            "loop_thread_cpu_wait": wait_ns / 1e9}


class PssSampler(threading.Thread):
    def __init__(self, interval: float, exclude: set[int]) -> None:
        super().__init__(name="pss-sampler", daemon=True)
        self.interval = interval
        self.exclude = exclude
        self.samples: list[tuple[float, int, int, int]] = []  # t, python kB, claude kB, procs
        self._halt = threading.Event()

    def snapshot(self) -> tuple[int, int, int]:
        me = os.getpid()
        kids = children(me, self.exclude)
        return pss_kb(me), sum(pss_kb(p) for p in kids), len(kids)

    def run(self) -> None:
        start = time.monotonic()
        while not self._halt.wait(self.interval):
            self.samples.append((time.monotonic() - start, *self.snapshot()))

    def halt(self) -> None:
        self._halt.set()
        self.join(5)


# --------------------------------------------------------------------------------------------
# the in-memory WhatsApp backend and the message plans


class Plan:
    """Which messages to send first and which after a reply. Keys: (chat, turn), from 1."""

    def __init__(self, order: list[tuple[int, int]], *, sequential: bool,
                 first: list[tuple[int, int]] | None = None) -> None:
        self.order = order
        self.total = len(order)
        self.sequential = sequential
        self._first = first

    @classmethod
    def closed_loop(cls, chats: int, turns: int, *, warm_up: bool = False) -> Plan:
        """Every chat at once, each sending its next message when its reply arrives. With
        ``warm_up`` the second messages wait until every chat's first turn (the CLI spawns)
        is answered, so no measured warm turn competes with start-ups for the CPU."""
        order = [(c, t) for c in range(chats) for t in range(1, turns + 1)]
        plan = cls(order, sequential=False, first=[(c, 1) for c in range(chats)])
        plan.warm_up = warm_up
        return plan

    warm_up = False
    warm_started: float | None = None  # time.monotonic() when the measured part began
    _first_done = 0

    def start(self) -> list[tuple[int, int]]:
        return self._first if self._first is not None else self.order[:1]

    def after(self, key: tuple[int, int]) -> list[tuple[int, int]]:
        if self.sequential:
            i = self.order.index(key)
            return self.order[i + 1:i + 2]
        chat, turn = key
        if self.warm_up and turn == 1:
            self._first_done += 1
            if self._first_done < len(self.start()):
                return []
            self.warm_started = time.monotonic()
            return [(c, 2) for c, _ in self.start() if (c, 2) in self._keys]
        return [(chat, turn + 1)] if (chat, turn + 1) in self._keys else []

    @property
    def _keys(self) -> set[tuple[int, int]]:
        keys = getattr(self, "_keyset", None)
        if keys is None:
            keys = self._keyset = set(self.order)
        return keys


def chat_jid(chat: int) -> str:
    return f"49170{chat:07d}@s.whatsapp.net"


def make_backend_class() -> type:
    from agent.whatsapp import events as ev  # noqa: PLC0415 - loaded only when this path runs
    from agent.whatsapp.base import WhatsAppBackend  # noqa: PLC0415 - loaded only when this path runs

    class BenchWhatsApp(WhatsAppBackend):
        """In memory; inbound messages reach the sink on this backend's own thread."""

        name = "bench"

        def __init__(self, rec: Recorder, plan: Plan, send_latency: float, run_id: str) -> None:
            self.rec = rec
            self.plan = plan
            self.send_latency = send_latency
            self.run_id = run_id
            self.replies = 0
            self.unexpected = 0
            self.done = asyncio.Event()
            self.finished = 0.0  # time.monotonic() of the last reply
            self.exclude: set[int] = set()  # the helper process (not a Claude child)
            self.cpu_marks: list[dict[str, float]] = []  # at the measured start and the end
            self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
            self._thread: threading.Thread | None = None
            self._sink: Callable[[Any], None] | None = None

        # the WhatsApp side ------------------------------------------------------------
        def start(self, sink: Callable[[Any], None]) -> None:
            self._sink = sink
            self._thread = threading.Thread(target=self._run, name="bench-whatsapp",
                                            daemon=True)
            self._thread.start()
            self._q.put(ev.Connected(jid=f"{OWNER}@s.whatsapp.net", phone=OWNER))

        def _run(self) -> None:
            while True:
                event = self._q.get()
                if event is None:
                    return
                assert self._sink is not None  # noqa: S101 - narrows the type; a benchmark, never run with -O
                if isinstance(event, ev.IncomingMessage):
                    key = tag_of(event.text)
                    assert key is not None  # noqa: S101 - narrows the type; a benchmark, never run with -O
                    self.rec.inflight[event.chat_id] = key
                    self.rec.sample(key).t_in = time.perf_counter_ns()
                self._sink(event)

        def deliver(self, key: tuple[int, int]) -> None:
            chat, turn = key
            jid = chat_jid(chat)
            self._q.put(ev.IncomingMessage(
                wa_id=f"B{self.run_id}{chat:03d}{turn:04d}", chat_id=jid, sender=jid,
                text=f"hello c{chat:03d}t{turn:04d}", timestamp=time.time(),
                sender_name=f"user {chat}"))

        # the backend contract ------------------------------------------------------------
        async def send_text(self, chat_id: str, text: str, *, quote: Any,
                            msg_id: str | None = None, expiration: int = 0) -> str:
            now = time.perf_counter_ns()
            key = tag_of(quote.text) if quote is not None else None
            if key is None or key not in self.rec.samples or self.rec.samples[key].t_send:
                self.unexpected += 1
            else:
                s = self.rec.samples[key]
                s.t_send = now
                s.error = not text.startswith("echo:")
                self.replies += 1
                before = self.plan.warm_started
                following = self.plan.after(key)
                if before is None and self.plan.warm_started is not None:
                    self.cpu_marks.append(cpu_snapshot(self.exclude))
                for nxt in following:
                    self.deliver(nxt)
                if self.replies >= self.plan.total:
                    self.cpu_marks.append(cpu_snapshot(self.exclude))
                    self.finished = time.monotonic()
                    self.done.set()
            if self.send_latency > 0:
                await asyncio.sleep(self.send_latency)
            return msg_id or "3EB0BENCH"

        async def set_typing(self, chat_id: str, typing: bool) -> None:
            pass

        async def mark_read(self, message: Any) -> None:
            pass

        async def pair_phone(self, phone: str) -> None:
            pass

        async def stop(self, timeout: float = 3.0) -> None:
            self._q.put(None)
            if self._thread is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._thread.join,
                                                                 timeout)

        def is_connected(self) -> bool:
            return True

    return BenchWhatsApp


# --------------------------------------------------------------------------------------------
# one scenario = one worker


def bench_config(pool_size: int, ctl_sock: str) -> Any:
    from wabridge import config  # noqa: PLC0415 - loaded only when this path runs

    return config.Config(
        controller=dataclasses.replace(config.ControllerConfig(), socket=ctl_sock),
        claude=dataclasses.replace(
            config.ClaudeConfig(), max_processes=pool_size, idle_timeout=3600.0,
            turn_timeout=120.0, context_window=200_000),
        conversation=dataclasses.replace(
            config.ConversationConfig(), debounce=0.0, rotate_after_turns=0, rotate_at=0.95),
        limits=config.LimitsConfig(daily_budget_usd=0.0, inbound_per_minute=0.0,
                                   inbound_burst=1000, send_gap=0.0, send_jitter=0.0),
    )


class NullNotifier:
    """``sdnotify.SystemdNotifier`` outside systemd (its notify() is a no-op there too)."""

    def notify(self, state: str) -> None:
        del state


@dataclasses.dataclass
class Outcome:
    name: str
    chats: int
    pool: int
    plan: Plan
    rec: Recorder
    wall_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    pss_end: tuple[int, int, int] | None
    pss_samples: list[tuple[float, int, int, int]]
    peak_processes: int
    unexpected_sends: int
    cpu_marks: list[dict[str, float]]
    measured_s: float  # from the measured start (after the warm-up) to the last reply


async def run_scenario(name: str, root: Path, peers: Peers, *, chats: int, pool: int,
                       plan: Plan, send_latency: float, sample_every: float | None) -> Outcome:
    global ACTIVE  # noqa: PLW0603 - the running scenario, read by the hooks patched into the worker
    import sdnotify  # noqa: PLC0415 - the worker's modules load only when a scenario runs

    from agent import main as agent_main  # noqa: PLC0415 - as above
    from agent.store import Store  # noqa: PLC0415 - as above
    from wabridge.status import WorkerState  # noqa: PLC0415 - as above

    state_dir = root / name
    state_dir.mkdir(mode=0o700)
    rec = Recorder()
    rec.loop_thread = threading.get_ident()
    backend = make_backend_class()(rec, plan, send_latency, name.replace("-", "")[:6])
    store = Store(state_dir / "agent.db")
    saved_env = {k: os.environ.get(k) for k in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")}
    saved_make = agent_main.make_backend
    saved_notifier = sdnotify.SystemdNotifier
    os.environ["ANTHROPIC_BASE_URL"] = peers.base_url
    os.environ["ANTHROPIC_API_KEY"] = "sk-ant-bench"
    agent_main.make_backend = lambda cfg, ctx: backend
    # not under systemd: sdnotify would leak a socket (ResourceWarning) without NOTIFY_SOCKET
    sdnotify.SystemdNotifier = NullNotifier
    try:
        worker = agent_main.Worker("bench", bench_config(pool, peers.sock), state_dir, store)
    finally:
        agent_main.make_backend = saved_make
        sdnotify.SystemdNotifier = saved_notifier
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    runner = asyncio.create_task(worker.run(), name="worker")
    sampler: PssSampler | None = None
    pss_end = None
    try:
        deadline = time.monotonic() + 20
        while not (worker.state == WorkerState.CONNECTED and worker.link.connected):
            if runner.done() or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the worker did not connect ({worker.detail})")
            await asyncio.sleep(0.01)
        exclude = {peers.proc.pid}
        backend.exclude = exclude
        if not plan.warm_up:
            backend.cpu_marks.append(cpu_snapshot(exclude))
        if sample_every:
            sampler = PssSampler(sample_every, exclude)
            sampler.start()
        load_before = os.getloadavg()
        ACTIVE = rec
        started = time.monotonic()
        for key in plan.start():
            backend.deliver(key)
        limit = 120 + plan.total * 2.0
        waiter = asyncio.create_task(backend.done.wait())
        await asyncio.wait({waiter, runner}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        wall = time.monotonic() - started
        ACTIVE = None
        load_after = os.getloadavg()
        if sampler is not None:
            sampler.halt()
        if not backend.done.is_set():
            raise RuntimeError(f"{name}: {backend.replies} of {plan.total} replies in "
                               f"{wall:.0f} s")
        pss_end = PssSampler(0, exclude).snapshot()
    finally:
        ACTIVE = None
        if sampler is not None and sampler.is_alive():
            sampler.halt()
        worker.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner, 30)
        # the link leaves its wait tasks pending when it is cancelled: end them here, or they
        # are garbage-collected while pending ("Task was destroyed but it is pending!")
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        store.close()
    return Outcome(name, chats, pool, plan, rec, wall, load_before, load_after, pss_end,
                   sampler.samples if sampler else [], worker.pool.peak, backend.unexpected,
                   backend.cpu_marks,
                   backend.finished - (plan.warm_started or started))


# --------------------------------------------------------------------------------------------
# statistics and the report


def pct(values: list[float], q: float) -> float:
    """Percentile ``q`` (0-100), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 50), 3), "p99": round(pct(values, 99), 3),
            "max": round(max(values), 3) if values else float("nan"),
            "mean": round(sum(values) / len(values), 3) if values else float("nan")}


def ms(a: int, b: int) -> float:
    return (b - a) / NS


def latency_figures(samples: list[Sample]) -> dict[str, Any]:
    inbound = [ms(s.t_in, s.t_entry) for s in samples]
    outbound = [ms(s.t_return, s.t_send) for s in samples]
    bridge = [i + o for i, o in zip(inbound, outbound, strict=True)]
    precise = [ms(s.t_in, s.t_stdin) + ms(s.t_result, s.t_send) for s in samples
               if s.t_stdin and s.t_result]
    out: dict[str, Any] = {
        "bridge_ms": dist(bridge),
        "inbound_ms": dist(inbound),
        "outbound_ms": dist(outbound),
        "bridge_precise_ms": dist(precise),
        "claude_turn_ms": dist([ms(s.t_entry, s.t_return) for s in samples]),
        "end_to_end_ms": dist([ms(s.t_in, s.t_send) for s in samples]),
    }
    steps = {
        "persist": ("t_in", "t_persisted"), "to_pump": ("t_persisted", "t_pumped"),
        "to_turn": ("t_pumped", "t_entry"), "to_commit": ("t_return", "t_committed"),
        "to_send": ("t_committed", "t_send"),
    }
    out["steps_ms"] = {
        name: dist([ms(getattr(s, a), getattr(s, b)) for s in samples
                    if getattr(s, a) and getattr(s, b)])
        for name, (a, b) in steps.items()
    }
    return out


def store_figures(rec: Recorder, turns: int) -> dict[str, Any]:
    """Per Store method and thread: durations, and how many calls overlapped a Store call on
    the other thread (both threads write the same SQLite file: one waits for the other's
    lock in SQLite's busy handler, which sleeps)."""
    other: dict[bool, tuple[list[int], list[int]]] = {}
    for on_loop in (True, False):
        spans = sorted((a, b) for calls in rec.store_calls.values() for a, b, loop in calls
                       if loop != on_loop)
        other[on_loop] = ([a for a, _ in spans], [b for _, b in spans])

    def overlaps(start: int, end: int, on_loop: bool) -> bool:
        starts, ends = other[on_loop]
        i = bisect.bisect_left(starts, end) - 1
        return any(ends[j] > start for j in range(max(0, i - 2), i + 1))

    out: dict[str, Any] = {}
    for name, calls in sorted(rec.store_calls.items()):
        for where, on_loop in (("loop", True), ("thread", False)):
            mine = [(a, b) for a, b, loop in calls if loop == on_loop]
            if not mine:
                continue
            d: dict[str, float | None] = {**dist([(b - a) / NS for a, b in mine])}
            d["per_turn"] = round(len(mine) / max(1, turns), 2)
            crossed = [(b - a) / NS for a, b in mine if overlaps(a, b, on_loop)]
            d["overlapping_other_thread"] = len(crossed)
            d["overlapping_p50"] = round(pct(crossed, 50), 3) if crossed else None
            out[f"{name}@{where}"] = d
    return out


def pss_figures(samples: list[tuple[float, int, int, int]]) -> dict[str, Any]:
    if not samples:
        return {}
    tot = [(py + cl) / 1024 for _, py, cl, _ in samples]
    py = [p / 1024 for _, p, _, _ in samples]
    cl = [c / 1024 for _, _, c, _ in samples]
    return {
        "samples": len(samples),
        "total_mb": {"max": round(max(tot), 1), "mean": round(sum(tot) / len(tot), 1)},
        "python_mb": {"max": round(max(py), 1), "mean": round(sum(py) / len(py), 1)},
        "claude_mb": {"max": round(max(cl), 1), "mean": round(sum(cl) / len(cl), 1)},
        "claude_processes_max": max(n for *_, n in samples),
    }


def cpu_figures(o: Outcome) -> dict[str, Any]:
    """CPU per measured turn: this process (the whole worker), the Claude processes (live at
    both marks: exact without eviction) and the helper (fake API + controller)."""
    if len(o.cpu_marks) < 2:
        return {}
    a, b = o.cpu_marks[0], o.cpu_marks[-1]
    turns = max(1, o.plan.total - (o.chats if o.plan.warm_up else 0))
    return {f"{k}_ms": round((b[k] - a[k]) * 1000 / turns, 2) for k in a}


def scenario_common(o: Outcome) -> dict[str, Any]:
    done = [s for s in o.rec.samples.values() if s.t_send]
    measured = o.plan.total - (o.chats if o.plan.warm_up else 0)
    return {
        "chats": o.chats, "max_processes": o.pool, "messages": o.plan.total,
        "errors": sum(s.error for s in done), "unexpected_sends": o.unexpected_sends,
        "wall_s": round(o.wall_s, 2), "measured_s": round(o.measured_s, 2),
        "turns_per_s": round(measured / o.measured_s, 1) if o.measured_s > 0 else None,
        "cpu_per_turn": cpu_figures(o),
        "peak_processes": o.peak_processes, "closes": dist(o.rec.closes_ms),
        "loadavg_before": o.load_before, "loadavg_after": o.load_after,
        "pss_end_mb": None if o.pss_end is None else {
            "python": round(o.pss_end[0] / 1024, 1), "claude": round(o.pss_end[1] / 1024, 1),
            "claude_processes": o.pss_end[2]},
    }


def raw_samples(o: Outcome) -> list[dict[str, Any]]:
    """Every message's timestamps in microseconds after its ``t_in`` (``--samples``)."""
    out = []
    for s in sorted(o.rec.samples.values(), key=lambda s: s.t_in):
        row: dict[str, Any] = {"chat": s.chat, "turn": s.turn, "kind": s.kind,
                               "error": s.error, "open_ms": round(s.open_ms, 2)}
        for name in ("t_persisted", "t_pumped", "t_entry", "t_stdin", "t_result", "t_return",
                     "t_committed", "t_send"):
            value = getattr(s, name)
            row[name] = round((value - s.t_in) / 1000, 1) if value and s.t_in else None
        out.append(row)
    return out


def summarize_warm(o: Outcome) -> dict[str, Any]:
    samples = [s for s in o.rec.samples.values() if s.complete]
    warm = [s for s in samples if s.kind == "warm"]
    cold = [s for s in samples if s.kind == "cold"]
    out = scenario_common(o)
    out.update(latency_figures(warm))
    out["cold_end_to_end_ms"] = dist([ms(s.t_in, s.t_send) for s in cold])
    out["cold_open_ms"] = dist([s.open_ms for s in cold])
    out["target_p99_ms"] = TARGET_P99_MS
    out["target_met"] = out["bridge_ms"]["p99"] <= TARGET_P99_MS
    out["store_calls"] = store_figures(o.rec, len(samples))
    return out


def summarize_kinds(cold_warm: Outcome, resume: Outcome) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, o in (("cold_warm", cold_warm), ("resume", resume)):
        out[label] = scenario_common(o)
    samples = [s for o in (cold_warm, resume) for s in o.rec.samples.values() if s.complete]
    cold_plain = [s for s in cold_warm.rec.samples.values() if s.complete and s.kind == "cold"]
    for kind, group in (("cold", cold_plain),
                        ("warm", [s for s in samples if s.kind == "warm"]),
                        ("resumed", [s for s in samples if s.kind == "resumed"])):
        out[kind] = {
            "end_to_end_ms": dist([ms(s.t_in, s.t_send) for s in group]),
            "open_ms": dist([s.open_ms for s in group if s.open_ms]),
            "to_turn_ms": dist([ms(s.t_in, s.t_entry) for s in group]),
            "claude_turn_ms": dist([ms(s.t_entry, s.t_return) for s in group]),
            "bridge_ms": dist([ms(s.t_in, s.t_entry) - s.open_ms + ms(s.t_return, s.t_send)
                               for s in group]),
        }
    out["resumed"]["evict_close_ms"] = dist(resume.rec.closes_ms)
    return out


def summarize_memory(o: Outcome) -> dict[str, Any]:
    out = scenario_common(o)
    samples = [s for s in o.rec.samples.values() if s.complete]
    out["pss"] = pss_figures(o.pss_samples)
    out["end_to_end_ms"] = dist([ms(s.t_in, s.t_send) for s in samples])
    out["kinds"] = {k: sum(s.kind == k for s in samples) for k in ("cold", "resumed", "warm")}
    return out


def f(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pp(d: dict[str, Any]) -> str:
    return f"{f(d['p50'])} / {f(d['p99'])}"


def print_report(result: dict[str, Any]) -> None:
    print(f"\nwabridge conversation benchmark  {result['started']}  "
          f"({result['machine']['cpus']} CPUs, load "
          f"{' '.join(f(x) for x in result['machine']['loadavg_start'])} at start)")
    if "bridge_latency" in result:
        report_warm(result["bridge_latency"])
    if "turn_kinds" in result:
        report_kinds(result["turn_kinds"])
    if "memory" in result:
        report_memory(result["memory"])
    if "bridge_latency" in result:
        report_store(result["bridge_latency"])
    print(f"\nJSON: {result['json_path']}")


def report_warm(w: dict[str, Any]) -> None:
    cols = list(w)
    p = print
    p("\n1. Bridge-added latency, warm turns, ms (closed loop, max_processes = chats)")
    p(f"{'':44}" + "".join(f"{'chats=' + c:>18}" for c in cols))

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> None:
        p(f"{label:44}" + "".join(f"{get(w[c]):>18}" for c in cols))

    row("warm samples", lambda d: str(d["bridge_ms"]["n"]))
    row("BRIDGE-ADDED p50 / p99 (turn() wrap)", lambda d: pp(d["bridge_ms"]))
    row("  target p99 <= 10 ms", lambda d: "met" if d["target_met"] else "MISSED")
    row("  inbound: sink -> turn() entry", lambda d: pp(d["inbound_ms"]))
    row("  outbound: turn() return -> send_text", lambda d: pp(d["outbound_ms"]))
    row("  bridge, precise (stdin / result line)", lambda d: pp(d["bridge_precise_ms"]))
    row("  max", lambda d: f(d["bridge_ms"]["max"]))
    for step in ("persist", "to_pump", "to_turn", "to_commit", "to_send"):
        def step_ms(d: dict[str, Any], s: str = step) -> str:
            return pp(d["steps_ms"][s])

        row(f"    step {step}", step_ms)
    row("claude turn (CLI + fake API)", lambda d: pp(d["claude_turn_ms"]))
    row("end to end", lambda d: pp(d["end_to_end_ms"]))
    row("cold first turns e2e p50 / p99 (at once)", lambda d: pp(d["cold_end_to_end_ms"]))
    row("warm turns/s", lambda d: f(d["turns_per_s"], 1))
    row("CPU ms/turn: worker / claude / fake API",
        lambda d: "/".join(f(d["cpu_per_turn"].get(k, float("nan")), 1)
                           for k in ("python_ms", "claude_ms", "helper_ms")))
    row("loop thread ms/turn: on CPU / waiting for one",
        lambda d: "/".join(f(d["cpu_per_turn"].get(k, float("nan")), 2)
                           for k in ("loop_thread_ms", "loop_thread_cpu_wait_ms")))
    row("PSS at end: python + claude, MB",
        lambda d: f"{f(d['pss_end_mb']['python'], 0)} + {f(d['pss_end_mb']['claude'], 0)}")
    row("load avg (1 min) before -> after",
        lambda d: f"{f(d['loadavg_before'][0], 1)} -> {f(d['loadavg_after'][0], 1)}")


def report_kinds(k: dict[str, Any]) -> None:
    p = print
    p("\n2. Turn kinds, end to end (inbound -> send_text), one message in flight, ms")
    p(f"{'':12}{'n':>5}{'e2e p50':>10}{'e2e p99':>10}{'open p50':>10}{'claude p50':>12}"
      f"{'bridge p50':>12}")
    for kind in ("cold", "warm", "resumed"):
        d = k[kind]
        p(f"{kind:12}{d['end_to_end_ms']['n']:>5}{f(d['end_to_end_ms']['p50'], 1):>10}"
          f"{f(d['end_to_end_ms']['p99'], 1):>10}{f(d['open_ms']['p50'], 1):>10}"
          f"{f(d['claude_turn_ms']['p50'], 1):>12}{f(d['bridge_ms']['p50'], 2):>12}")
    p(f"  resumed turns also close the evicted process first: close p50 "
      f"{f(k['resumed']['evict_close_ms']['p50'], 1)} ms")


def report_memory(m: dict[str, Any]) -> None:
    p = print
    pss = m["pss"]
    p(f"\n3. Memory, {m['chats']} chats at once, max_processes = {m['max_processes']} "
      f"({m['messages']} messages, {pss.get('samples', 0)} samples every 0.25 s)")
    if pss:
        p(f"  PSS total  max {pss['total_mb']['max']:.0f} MB  mean {pss['total_mb']['mean']:.0f}"
          f" MB   (python max {pss['python_mb']['max']:.0f}, claude max "
          f"{pss['claude_mb']['max']:.0f} MB in up to {pss['claude_processes_max']} processes)")
    p(f"  turns: {m['kinds']}; e2e p50 {f(m['end_to_end_ms']['p50'], 0)} ms, p99 "
      f"{f(m['end_to_end_ms']['p99'], 0)} ms (includes waiting for a process slot)")


def report_store(w: dict[str, Any]) -> None:
    p = print
    biggest = list(w)[-1]
    calls = w[biggest]["store_calls"]
    p(f"\n4. Store (SQLite) calls at chats={biggest}, ms (loop = the event loop thread)")
    p(f"{'':26}{'per turn':>9}{'p50':>8}{'p99':>8}{'max':>8}   overlapping the other thread")
    for name, d in sorted(calls.items(), key=lambda kv: -kv[1]["p99"] * kv[1]["per_turn"]):
        cross = (f"{d['overlapping_other_thread']} (p50 {d['overlapping_p50']:.2f})"
                 if d["overlapping_other_thread"] else "0")
        p(f"{name:26}{d['per_turn']:>9.2f}{d['p50']:>8.3f}{d['p99']:>8.3f}{d['max']:>8.2f}"
          f"   {cross}")


# --------------------------------------------------------------------------------------------


def configure_logging(path: Path) -> Callable[[], None]:
    """Production-like logging (``wabridge.logs.setup`` at ``info`` with JSON lines) into
    ``path`` instead of stderr/journald; the stdlib root logger is left alone. Returns the
    undo (the previous structlog configuration)."""
    import logging  # noqa: PLC0415 - loaded only when this path runs

    import structlog  # noqa: PLC0415 - loaded only when this path runs

    from wabridge import logs  # noqa: PLC0415 - loaded only when this path runs

    saved = structlog.get_config()
    stream = path.open("a", buffering=1)
    structlog.configure(
        processors=logs.processors(
            structlog.processors.JSONRenderer(serializer=json.dumps, default=str)),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )

    def undo() -> None:
        structlog.configure(**saved)
        stream.close()

    return undo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.conversation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chats", default="", help="concurrent chats per run (default 1,10,50; "
                    "--quick: 1,10)")
    ap.add_argument("--turns", type=int, default=0,
                    help="messages per chat (default: max(30, 200/chats); --quick: "
                    "max(6, 60/chats))")
    ap.add_argument("--quick", action="store_true", help="at most 10 chats, fewer turns")
    ap.add_argument("--memory-chats", type=int, default=20)
    ap.add_argument("--memory-pool", type=int, default=2)
    ap.add_argument("--send-latency-ms", type=float, default=0.0,
                    help="send_text takes this long after it is called (default 0)")
    ap.add_argument("--only", default="warm,kinds,memory",
                    help="scenarios to run (default warm,kinds,memory)")
    ap.add_argument("--samples", action="store_true",
                    help="also write every message's timestamps into the JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary state directories")
    ap.add_argument("--serve-peers", metavar="SOCK", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    chats = [int(c) for c in args.chats.split(",") if c.strip()] if args.chats else (
        [1, 10] if args.quick else [1, 10, 50])
    if args.quick:
        chats = [c for c in chats if c <= 10] or [1]
    args.chat_counts = chats
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    return args


def turns_for(args: argparse.Namespace, chats: int) -> int:
    if args.turns:
        return int(args.turns)
    return max(6, 60 // chats) if args.quick else max(30, 200 // chats)


async def amain(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    peers = Peers(root)
    latency = args.send_latency_ms / 1000
    out: dict[str, Any] = {}
    try:
        if "warm" in args.only:
            warm: dict[str, Any] = {}
            for n in args.chat_counts:
                turns = turns_for(args, n)
                o = await run_scenario(f"warm-{n}", root, peers, chats=n, pool=n,
                                       plan=Plan.closed_loop(n, turns, warm_up=True),
                                       send_latency=latency, sample_every=None)
                warm[str(n)] = summarize_warm(o)
                warm[str(n)]["turns_per_chat"] = turns
                if args.samples:
                    warm[str(n)]["samples"] = raw_samples(o)
            out["bridge_latency"] = warm
        if "kinds" in args.only:
            # cold / warm / resumed, one message in flight at a time
            kinds_turns = max(3, min(args.turns or 6, 6))
            cw_chats = 3 if args.quick or (args.turns and args.turns < 5) else 5
            order = [(c, t) for c in range(cw_chats) for t in range(1, kinds_turns + 1)]
            cold_warm = await run_scenario(
                "kinds-cold", root, peers, chats=cw_chats, pool=cw_chats,
                plan=Plan(order, sequential=True), send_latency=latency, sample_every=None)
            rounds = 2 if args.turns and args.turns <= 3 else min(args.turns or 8, 8)
            order = [(c, r) for r in range(1, rounds + 1) for c in range(3)]
            resume = await run_scenario(
                "kinds-resume", root, peers, chats=3, pool=2,
                plan=Plan(order, sequential=True), send_latency=latency, sample_every=None)
            out["turn_kinds"] = summarize_kinds(cold_warm, resume)
        if "memory" in args.only:
            if args.turns:
                mem_turns = 1 if args.turns <= 3 else min(args.turns, 5)  # 1: smoke test
            else:
                mem_turns = 3 if args.quick else 5
            o = await run_scenario("memory", root, peers, chats=args.memory_chats,
                                   pool=args.memory_pool,
                                   plan=Plan.closed_loop(args.memory_chats, mem_turns),
                                   send_latency=latency, sample_every=0.25)
            out["memory"] = summarize_memory(o)
            out["memory"]["turns_per_chat"] = mem_turns
    finally:
        peers.close()
    return out


def cli_version() -> str:
    from agent.main import default_cli_path  # noqa: PLC0415 - loaded only when this path runs

    try:
        return (default_cli_path().parent / "claude.version").read_text().strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_peers:
        return serve_peers(args.serve_peers)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    started = datetime.now(UTC)
    root = Path(tempfile.mkdtemp(prefix="wabridge-bench-"))
    undo_logging = configure_logging(root / "worker.log")
    load_start = os.getloadavg()
    t0 = time.monotonic()
    try:
        with hooks():
            figures = asyncio.run(amain(args, root))
    finally:
        undo_logging()
        if args.keep:
            print(f"state kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "conversation",
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 1),
        "command": "python -m bench.conversation " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "claude_cli": cli_version(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "settings": {"debounce": 0.0, "send_gap": 0.0, "send_jitter": 0.0,
                     "inbound_per_minute": 0.0, "daily_budget_usd": 0.0,
                     "send_latency_ms": args.send_latency_ms, "quick": args.quick,
                     "fake_api_delay": 0.0, "log": "info, JSON lines to a file"},
        **figures,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    gitkeep = RESULTS_DIR / ".gitkeep"
    if not gitkeep.exists():
        gitkeep.touch()
    path = RESULTS_DIR / f"conversation-{started.strftime('%Y-%m-%dT%H%M%SZ')}.json"
    result["json_path"] = str(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
