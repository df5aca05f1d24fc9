"""Claude's wabridge tools (issue 16): the real CLI runs the real MCP server (agent.mcp_server)
against the fake API, which asks for tool calls; the worker's side (agent.tools.Toolbox)
does them on a real SQLite store. Plus the pure parts as tables."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fakes.anthropic_api import FakeAnthropicAPI, Reply
from fakes.quiet_whatsapp import QuietWhatsApp

from agent import commands, policy, scheduling
from agent.claude import ClaudeSession, ClaudeSettings, ToolFlags, build_command
from agent.engine import Engine
from agent.policy import InvalidSetting
from agent.pool import ClaudePool
from agent.store import Store
from agent.tools import Toolbox, ToolRefused, socket_path, workspace_file
from agent.whatsapp.events import IncomingMessage
from wabridge.claude_cli import bundled_cli
from wabridge.config import ConversationConfig, LimitsConfig, ToolsConfig

CLI = bundled_cli()
requires_cli = pytest.mark.skipif(CLI is None or not CLI.is_file(),
                                  reason="claude-agent-sdk's bundled CLI missing")
CHAT = "5511988887777@s.whatsapp.net"
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAEElEQVR4nGP8z4AATAxEcQAz0QEHOoQ+uAAA"
       "AABJRU5ErkJggg==")  # a 4x4 red PNG
NOW = 1_780_000_000.0  # 2026-05-28T20:26:40Z


class RecordingWhatsApp(QuietWhatsApp):
    def __init__(self) -> None:
        self.reactions: list[tuple[str, str, str]] = []
        self.media: list[tuple[str, str, bytes, str, str, str]] = []

    async def send_text(self, chat_id: str, text: str, *, quote: IncomingMessage | None,
                        msg_id: str | None = None, expiration: int = 0) -> str:
        return msg_id or "x"

    async def send_reaction(self, chat_id: str, message: IncomingMessage, emoji: str) -> None:
        self.reactions.append((chat_id, message.wa_id, emoji))

    async def send_media(self, chat_id: str, kind: str, data: bytes, filename: str, mime: str,
                         caption: str) -> str:
        self.media.append((chat_id, kind, data, filename, mime, caption))
        return "3EB0MEDIA"


# ---- pure parts ---------------------------------------------------------------------------

@pytest.mark.parametrize(("when", "tz", "expected"), [
    ("in 5 seconds", "UTC", NOW + 5),
    ("in 10 minutes", "UTC", NOW + 600),
    ("in 2 hours", "Europe/Berlin", NOW + 7200),
    ("in 1 day", "UTC", NOW + 86400),
    ("2026-05-29T09:00:00", "UTC", 1_780_045_200.0),
    ("2026-05-29T09:00:00", "Europe/Berlin", 1_780_045_200.0 - 7200),  # CEST, +02:00
    ("2026-05-29T09:00:00+00:00", "Europe/Berlin", 1_780_045_200.0),
])
def test_when_is_understood(when: str, tz: str, expected: float) -> None:
    assert scheduling.due_at(when, NOW, tz) == expected


@pytest.mark.parametrize(("when", "problem"), [
    ("tomorrow-ish", "is not a time"),
    ("2020-01-01T00:00:00", "in the past"),
    ("in 400 days", "at most 366 days"),
])
def test_bad_when_is_refused_with_the_reason(when: str, problem: str) -> None:
    with pytest.raises(scheduling.BadWhen, match=problem):
        scheduling.due_at(when, NOW, "UTC")


@pytest.mark.parametrize(("pending", "today", "refused"), [
    (0, 0, None), (19, 49, None), (20, 0, "already has 20"), (0, 50, "at most 50 a day")])
def test_scheduling_limits(pending: int, today: int, refused: str | None) -> None:
    why = scheduling.refusal(pending, today, per_chat=20, per_day=50)
    assert (why is None) if refused is None else (refused in (why or ""))


@pytest.mark.parametrize(("settings", "tools", "tz", "bad_key"), [
    ({}, "none", "UTC", None),
    ({"tools": "wabridge", "timezone": "America/Sao_Paulo"}, "wabridge", "America/Sao_Paulo",
     None),
    ({"tools": "all"}, None, None, "settings.tools"),
    ({"tools": "wabridge", "engine": "api"}, None, None, "settings.tools"),  # cli only
    ({"timezone": "Mars/Olympus"}, None, None, "settings.timezone"),
    ({"timezone": "../../etc/passwd"}, None, None, "settings.timezone"),
    ({"timezone": 2}, None, None, "settings.timezone"),
])
def test_tools_and_timezone_settings(settings: dict[str, Any], tools: str | None,
                                     tz: str | None, bad_key: str | None) -> None:
    if bad_key is not None:
        with pytest.raises(InvalidSetting) as err:
            policy.parse(settings)
        assert err.value.key == bad_key
        return
    parsed = policy.parse(settings)
    assert (parsed.tools, parsed.timezone) == (tools, tz)


def test_workspace_file_refuses_everything_outside(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "report.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "secret.txt").write_text("secret")
    (work / "out").symlink_to(tmp_path / "secret.txt")
    (work / "dirlink").symlink_to(tmp_path)
    assert workspace_file(work, "sub/report.pdf") == (work / "sub" / "report.pdf").resolve()
    for bad, why in [("../../etc/passwd", "'..'"), ("/etc/passwd", "absolute"),
                     ("out", "outside"), ("dirlink/secret.txt", "outside"),
                     ("sub/../../secret.txt", "'..'"), ("missing.txt", "no such file"),
                     ("sub", "no such file"), ("", "give the path")]:
        with pytest.raises(ToolRefused, match=why):
            workspace_file(work, bad)


def test_owner_texts() -> None:
    assert commands.parse("/scheduled cancel 3") == commands.ChatCommand("scheduled", "cancel 3")
    assert commands.parse("/memory") is not None and commands.parse("/memory").known  # type: ignore[union-attr]
    assert "#3 tomorrow to c@s: hi" in commands.scheduled_text([(3, "c@s", "tomorrow", "hi")])
    assert commands.memory_text([]) == "No notes."


# ---- the store --------------------------------------------------------------------------------

def test_due_messages_move_to_the_outbox_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    first = store.schedule(CHAT, NOW + 5, "call mom", "2026-05-28")
    later = store.schedule(CHAT, NOW + 500, "later", "2026-05-28")
    gone = store.schedule(CHAT, NOW + 1, "cancelled", "2026-05-28")
    assert store.cancel_scheduled(gone, "other@s.whatsapp.net") is False  # another chat's id
    assert store.cancel_scheduled(gone, CHAT) is True
    assert store.release_due(NOW + 4) == []
    due = store.release_due(NOW + 6)
    assert [r.text for r in due] == ["call mom"]
    assert store.release_due(NOW + 7) == []  # queued once
    store.close()
    reopened = Store(tmp_path / "agent.db")  # a restart: the outbox row and the rest survive
    assert [r.text for r in reopened.pending_replies()] == ["call mom"]
    assert [s.id for s in reopened.scheduled(CHAT)] == [later]
    assert reopened.scheduled_on("2026-05-28") == 3
    assert first != later


# ---- the real CLI, the real MCP server ------------------------------------------------------

@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    assert CLI is not None
    with FakeAnthropicAPI() as api:
        store = Store(tmp_path / "agent.db")
        backend = RecordingWhatsApp()
        box = Toolbox(store, backend, tmp_path, ToolsConfig(notes_per_chat=2),
                      max_tool_calls=3, clock=lambda: NOW)
        sessions: list[ClaudeSession] = []
        work = tmp_path / "chats" / "c"
        work.mkdir(parents=True)

        async def open_session(enabled: bool = True) -> ClaudeSession:
            box.enabled = enabled
            flags = await box.launch(CHAT, work)
            settings = ClaudeSettings(
                cli_path=CLI, model=None, system_prompt="You answer WhatsApp messages.",
                turn_timeout=30.0, tool_flags=flags,
                extra_env={"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "sk-t"})
            session = await ClaudeSession.open(settings=settings, workdir=work,
                                               config_dir=tmp_path / "home" / ".claude",
                                               resume_session_id=None)
            sessions.append(session)
            return session

        yield {"api": api, "store": store, "box": box, "backend": backend, "work": work,
               "open": open_session}
        for session in sessions:
            await session.close()
        await box.close()
        store.close()


def _msg(text: str) -> IncomingMessage:
    return IncomingMessage(chat_id=CHAT, sender="5511988887777@s.whatsapp.net", wa_id="3AWA1",
                           text=text, timestamp=NOW)


async def _turn(rig: dict[str, Any], text: str) -> str:
    session = await rig["open"]() if not rig.get("session") else rig["session"]
    rig["session"] = session
    rig["box"].begin_turn(CHAT, _msg(text))
    result = await session.turn(text)
    rig["box"].end_turn(CHAT)
    assert not result.is_error, result.error
    return str(result.text)


@requires_cli
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_schedule_list_cancel_through_the_cli(rig: dict[str, Any]) -> None:
    said = await _turn(rig, 'remind me [[tool schedule_message {"when": "in 5 seconds", '
                            '"text": "time to call mom"}]]')
    assert said.startswith("tool schedule_message said: scheduled #1 for")
    store: Store = rig["store"]
    [item] = store.scheduled(CHAT)
    assert (item.due_at, item.text) == (NOW + 5, "time to call mom")
    said = await _turn(rig, '[[tool schedule_message {"when": "yesterday", "text": "x"}]]')
    assert said.startswith("tool schedule_message failed:") and "is not a time" in said
    assert "time to call mom" in await _turn(rig, "[[tool list_scheduled]]")
    assert "cancelled #1" in await _turn(rig, '[[tool cancel_scheduled {"id": 1}]]')
    assert store.scheduled(CHAT) == []
    tools = [t["name"] for t in rig["api"].message_requests()[0].json["tools"]]
    assert "mcp__wabridge__schedule_message" in tools
    assert not [t for t in tools if not t.startswith("mcp__wabridge__")]  # no built-in tool
    assert store.counters()["tool_calls"] == 4
    # the MCP server runs beside the CLI without the CLI's environment (no API key)
    [server] = [p for p in _children(rig["session"].pid) if b"agent.mcp_server" in p[1]]
    assert b"ANTHROPIC_API_KEY" not in server[2] and b"sk-t" not in server[2]
    assert server[2].startswith(b"PYTHONPATH=")


def _children(pid: int | None) -> list[tuple[int, bytes, bytes]]:
    """(pid, cmdline, environ) of ``pid``'s children."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append((int(entry.name), (entry / "cmdline").read_bytes(),
                            (entry / "environ").read_bytes()))
        except (OSError, IndexError, ValueError):
            continue
    return out


@requires_cli
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_react_notes_and_files_through_the_cli(rig: dict[str, Any]) -> None:
    backend: RecordingWhatsApp = rig["backend"]
    assert "reacted" in await _turn(rig, '[[tool react {"emoji": "👍"}]]')
    assert backend.reactions == [(CHAT, "3AWA1", "👍")]
    assert "note #1" in await _turn(rig, '[[tool remember {"note": "likes jazz"}]]')
    await _turn(rig, '[[tool remember {"note": "lives in Recife"}]]')
    assert "already has 2 notes" in await _turn(rig, '[[tool remember {"note": "third"}]]')
    assert "#1: likes jazz" in await _turn(rig, "[[tool recall]]")
    (rig["work"] / "report.txt").write_text("the report")
    said = await _turn(rig, '[[tool send_file {"path": "report.txt", "caption": "here"}]]')
    assert "sent report.txt" in said
    assert backend.media == [(CHAT, "document", b"the report", "report.txt", "text/plain",
                              "here")]
    said = await _turn(rig, '[[tool send_file {"path": "../../etc/passwd"}]]')
    assert "tool send_file failed:" in said and "'..'" in said
    said = await _turn(rig, '[[tool send_image {"path": "report.txt"}]]')
    assert "not a PNG, JPEG or WebP image" in said
    assert len(backend.media) == 1
    png = base64.b64decode(PNG)
    (rig["work"] / "chart.dat").write_bytes(png)  # the type is read from the bytes
    assert "sent chart.dat" in await _turn(rig, '[[tool send_image {"path": "chart.dat"}]]')
    assert backend.media[-1][1:5] == ("image", png, "chart.dat", "image/png")


@requires_cli
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_a_turn_makes_at_most_max_tool_calls(rig: dict[str, Any]) -> None:
    four = " ".join(f'[[tool remember {{"note": "n{i}"}}]]' for i in range(4))
    rig["box"]._cfg = ToolsConfig(notes_per_chat=10)
    said = await _turn(rig, four)
    assert said.count("said: remembered") == 3
    assert "at most 3 tool calls per message" in said
    assert len(rig["store"].notes(CHAT)) == 3


@requires_cli
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_a_model_that_keeps_calling_tools_is_stopped(rig: dict[str, Any]) -> None:
    api: FakeAnthropicAPI = rig["api"]
    api.responder = lambda body: Reply(text="", tool_uses=(("mcp__wabridge__recall", {}),),
                                       stop_reason="tool_use")
    session = await rig["open"]()
    result = await session.turn("loop forever")
    assert result.is_error and "maximum number of turns (4)" in (result.error or "")
    assert len(api.message_requests()) == 4  # 3 tool rounds (max_tool_calls) + 1
    assert rig["store"].counters()["tool_calls"] == 4  # the 4th call was refused
    api.responder = lambda body: "fine"
    again = await session.turn("hello")  # the process goes on
    assert (again.is_error, again.text) == (False, "fine")
    # every request of the tool loop is in the turn's cost (what the daily budget counts)
    assert result.turn_cost_usd > again.turn_cost_usd > 0  # 4 requests vs 1 (longer) one


@requires_cli
@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_tools_none_requests_carry_no_tools(rig: dict[str, Any]) -> None:
    session = await rig["open"](enabled=False)
    result = await session.turn('[[tool schedule_message {"when": "in 5 seconds", "text": "x"}]]')
    assert result.text == "no tool schedule_message"
    assert [r.json["tools"] for r in rig["api"].message_requests()] == [[]]
    assert rig["store"].scheduled(CHAT) == []
    assert not (rig["work"].parent.parent / "tools").exists() or not os.listdir(
        rig["work"].parent.parent / "tools")




def test_the_cli_gets_the_chat_tools_and_no_builtin_tool(tmp_path: Path) -> None:
    flags = ToolFlags(mcp_config='{"mcpServers": {}}', allowed=("mcp__wabridge__react",))
    base = ClaudeSettings(cli_path=tmp_path / "claude", model=None, system_prompt=None)
    plain = build_command(base, None)
    assert plain[plain.index("--tools") + 1] == "" and "--mcp-config" not in plain
    cmd = build_command(dataclasses.replace(base, tool_flags=flags), None)
    assert cmd[cmd.index("--tools") + 1] == ""
    assert cmd[cmd.index("--mcp-config") + 1] == '{"mcpServers": {}}'
    assert cmd[cmd.index("--allowedTools") + 1] == "mcp__wabridge__react"
    assert cmd[cmd.index("--max-turns") + 1] == "11"
    assert "--strict-mcp-config" in cmd  # never the chat directory's own MCP servers



# ---- the engine with tools: settings, turns, the outbox, fresh sessions ----------------------

class EngineWhatsApp(RecordingWhatsApp):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str, str | None]] = []

    async def send_text(self, chat_id: str, text: str, *, quote: IncomingMessage | None,
                        msg_id: str | None = None, expiration: int = 0) -> str:
        self.sent.append((chat_id, text, quote.wa_id if quote else None))
        return msg_id or "x"

    def is_connected(self) -> bool:
        return True


async def _until(pred: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (got := pred()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return got


@requires_cli
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_the_engine_wires_settings_turns_outbox_and_notes(tmp_path: Path) -> None:
    assert CLI is not None
    with FakeAnthropicAPI() as api:
        store = Store(tmp_path / "agent.db")
        wa = EngineWhatsApp()
        pool: ClaudePool | None = None
        box = Toolbox(store, wa, tmp_path, ToolsConfig(), max_tool_calls=5,
                      restart_idle=lambda: pool.close_idle() if pool else asyncio.sleep(0))
        settings = ClaudeSettings(
            cli_path=CLI, model=None, system_prompt="You answer WhatsApp messages.",
            turn_timeout=30.0,
            extra_env={"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "sk-t"})
        pool = ClaudePool(2, 600.0, settings, tmp_path, store, tools=box.launch)
        conv = ConversationConfig(debounce=0.01)
        limits = LimitsConfig(daily_budget_usd=0.0, inbound_per_minute=0.0, send_gap=0.0,
                              send_jitter=0.0)
        engine = Engine(store, wa, pool, conv, lambda *a: None, limits=limits, toolbox=box)
        stop = asyncio.Event()
        deliver = asyncio.create_task(engine.deliver_forever(stop))
        engine.set_owner("4915100000001")
        ids = iter(range(1, 100))

        def incoming(text: str) -> str:
            wa_id = f"IN{next(ids)}"
            assert engine.persist(IncomingMessage(wa_id=wa_id, chat_id=CHAT, sender=CHAT,
                                                  text=text, timestamp=time.time()))
            engine.wake_chat(CHAT)
            return wa_id

        def replies_to(wa_id: str) -> list[str]:
            return [text for _, text, quoted in wa.sent if quoted == wa_id]

        try:
            assert engine.update_settings({"tools": "wabridge", "timezone": "Asia/Tokyo"}) is None
            assert box.enabled and box.timezone == "Asia/Tokyo"
            asked = incoming('[[tool schedule_message {"when": "in 1 seconds", "text": "ping!"}]]')
            [said] = await _until(lambda: replies_to(asked), "the tool's answer")
            assert said.startswith("tool schedule_message said: scheduled #1") and "Tokyo" in said
            await _until(lambda: [t for _, t, _ in wa.sent if t == "ping!"], "the reminder")
            await asyncio.sleep(1.5)
            assert [(c, q) for c, t, q in wa.sent if t == "ping!"] == [(CHAT, None)]
            reacted = incoming('[[tool react {"emoji": "❤️"}]]')
            await _until(lambda: replies_to(reacted), "the react answer")
            assert wa.reactions == [(CHAT, reacted, "❤️")]  # the message being answered
            noted = incoming('[[tool remember {"note": "allergic to peanuts"}]]')
            await _until(lambda: replies_to(noted), "the remember answer")
            await engine.reset_chat(CHAT)
            n = len(api.message_requests())
            after = incoming("what should I cook?")
            await _until(lambda: replies_to(after), "the answer after /reset")
            first = " ".join(api.all_texts(api.message_requests()[n]))
            assert "allergic to peanuts" in first and "what should I cook?" in first
            # tools off: the idle process is closed, the next one has no tools at all
            assert engine.update_settings({"tools": "none"}) is None
            await _until(lambda: pool.live == 0, "the idle process closed")
            n = len(api.message_requests())
            off = incoming('[[tool recall]]')
            assert await _until(lambda: replies_to(off), "tools off") == ["no tool recall"]
            assert [r.json["tools"] for r in api.message_requests()[n:]] == [[]]
        finally:
            await engine.drain(1.0)
            await pool.close_all()
            stop.set()
            await asyncio.gather(deliver, return_exceptions=True)
            await box.close()
            store.close()


@pytest.mark.asyncio
async def test_a_chat_socket_acts_on_its_own_chat_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    box = Toolbox(store, RecordingWhatsApp(), tmp_path, ToolsConfig(), max_tool_calls=5,
                  clock=lambda: NOW)
    box.enabled = True
    other = "5511900000000@s.whatsapp.net"
    try:
        for chat in (CHAT, other):
            assert await box.launch(chat, tmp_path) is not None
        path = socket_path(tmp_path, CHAT)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

        async def ask(line: bytes) -> dict[str, Any]:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(line + b"\n")
            answer = json.loads(await reader.readline())
            writer.close()
            return dict(answer)

        # whatever the arguments say, the call acts on the socket's chat
        got = await ask(json.dumps({"tool": "schedule_message", "args": {
            "when": "in 1 hour", "text": "hi", "chat_id": other}}).encode())
        assert got == {"ok": True, "text": "scheduled #1 for 2026-05-28 21:26:40 (UTC)"}
        assert [s.chat_id for s in store.scheduled()] == [CHAT]
        assert await ask(b"not json") == {"ok": False, "error": "malformed tool request"}
        got = await ask(b'{"tool": "shell", "args": {}}')
        assert got == {"ok": False, "error": "unknown tool 'shell'"}
        got = await ask(b'{"tool": "cancel_scheduled", "args": {"id": "x"}}')
        assert got["ok"] is False and "bad arguments for cancel_scheduled" in got["error"]
    finally:
        await box.close()
        store.close()
