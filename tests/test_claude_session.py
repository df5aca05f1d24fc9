"""agent.claude.ClaudeSession against the real bundled Claude Code CLI and the fake API."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fakes.anthropic_api import (  # tests/ is on sys.path (no tests/__init__.py)
    FakeAnthropicAPI,
    RecordedRequest,
    Reply,
    default_responder,
)

from agent.claude import ClaudeError, ClaudeSession, ClaudeSettings, build_command
from wabridge.claude_cli import bundled_cli

pytestmark = [pytest.mark.claude, pytest.mark.timeout(60)]


CLI = bundled_cli()
if CLI is not None and not CLI.is_file():
    CLI = None
requires_cli = pytest.mark.skipif(CLI is None, reason="claude-agent-sdk's bundled CLI missing")

# a 4x4 red PNG
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAEElEQVR4nGP8z4AATAxEcQAz0QEHOoQ+uAAAAABJRU5Er"
    "kJggg=="
)


# ---- helpers ----------------------------------------------------------------------------


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / "stat").read_text()
        except OSError:
            continue
        fields = data.rsplit(")", 1)[1].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            out.append(int(entry.name))
    return out


def _assert_gone(pid: int | None) -> None:
    assert pid is not None
    assert not Path(f"/proc/{pid}").exists(), f"claude pid {pid} still exists"
    assert _group_members(pid) == [], "children of the claude process survived"


def _messages(req: RecordedRequest) -> list[dict[str, Any]]:
    return [m for m in req.json["messages"] if m.get("role") in ("user", "assistant")]


def _joined(req: RecordedRequest) -> str:
    return "\n".join(FakeAnthropicAPI.all_texts(req))


@pytest.fixture
def api() -> Iterator[FakeAnthropicAPI]:
    with FakeAnthropicAPI() as fake:
        yield fake


@pytest.fixture
def make_settings(api: FakeAnthropicAPI) -> Callable[..., ClaudeSettings]:
    assert CLI is not None

    def make(**overrides: Any) -> ClaudeSettings:
        extra_env = {"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "sk-ant-test"}
        extra_env.update(overrides.pop("extra_env", {}))
        kwargs: dict[str, Any] = {
            "cli_path": CLI,
            "model": None,
            "system_prompt": "You answer WhatsApp messages.",
            "turn_timeout": 20.0,
            "extra_env": extra_env,
        }
        kwargs.update(overrides)
        return ClaudeSettings(**kwargs)

    return make


@pytest_asyncio.fixture
async def opener(
    tmp_path: Path, make_settings: Callable[..., ClaudeSettings]
) -> AsyncIterator[Callable[..., Any]]:
    """``await opener(name, resume=None, **settings)`` -> open session; closed at teardown."""
    opened: list[ClaudeSession] = []

    async def open_session(
        name: str = "chat", resume: str | None = None, **overrides: Any
    ) -> ClaudeSession:
        session = await ClaudeSession.open(
            settings=make_settings(**overrides),
            workdir=tmp_path / name / "work",
            config_dir=tmp_path / name / "home" / ".claude",
            resume_session_id=resume,
        )
        opened.append(session)
        return session

    yield open_session
    for session in opened:
        await session.close()
        _assert_gone(session.pid)


# ---- tests ------------------------------------------------------------------------------


@requires_cli
@pytest.mark.asyncio
async def test_turn_returns_echo(api: FakeAnthropicAPI, opener: Callable[..., Any]) -> None:
    session = await opener()
    assert session.alive and session.pid
    result = await session.turn("hello there \U0001f44b ção \u2028 ok")
    assert result.text == "echo: hello there \U0001f44b ção \u2028 ok"
    assert not result.is_error and result.error is None
    assert result.session_id and result.session_id == session.session_id
    assert result.usage["input_tokens"] > 0 and result.usage["output_tokens"] > 0
    assert result.total_cost_usd > 0
    reqs = api.message_requests()
    assert len(reqs) == 1
    assert reqs[0].query == "beta=true" and reqs[0].json["stream"] is True
    assert reqs[0].headers["x-api-key"] == "sk-ant-test"
    assert "You answer WhatsApp messages." in _joined(reqs[0])
    assert api.unknown_requests() == []


@requires_cli
@pytest.mark.asyncio
async def test_session_id_is_known_at_open(
    api: FakeAnthropicAPI, opener: Callable[..., Any]
) -> None:
    session = await opener()
    sid = session.session_id
    assert sid is not None
    result = await session.turn("hi")
    assert result.session_id == sid
    assert api.message_requests()[0].headers["x-claude-code-session-id"] == sid
    # a conversation exists on disk only after a turn: a never-used id cannot be resumed
    unused = await opener("unused")
    unused_id = unused.session_id
    await unused.close()
    with pytest.raises(ClaudeError) as info:
        await opener("unused", resume=unused_id)
    assert info.value.code == "resume_failed"


@requires_cli
@pytest.mark.asyncio
async def test_second_turn_carries_first_exchange(
    api: FakeAnthropicAPI, opener: Callable[..., Any]
) -> None:
    session = await opener()
    first = await session.turn("my name is Ada")
    second = await session.turn("what is my name?")
    assert second.text == "echo: what is my name?"
    assert second.session_id == first.session_id
    assert second.total_cost_usd == pytest.approx(first.total_cost_usd + second.turn_cost_usd)
    assert first.turn_cost_usd == pytest.approx(first.total_cost_usd) and first.turn_cost_usd > 0
    last = api.message_requests()[-1]
    roles_texts = [(m["role"], json.dumps(m["content"])) for m in _messages(last)]
    assert [r for r, _ in roles_texts] == ["user", "assistant", "user"]
    assert "my name is Ada" in roles_texts[0][1]
    assert "echo: my name is Ada" in roles_texts[1][1]
    assert "what is my name?" in roles_texts[2][1]


@requires_cli
@pytest.mark.asyncio
async def test_resume_after_close_keeps_context(
    api: FakeAnthropicAPI, opener: Callable[..., Any], tmp_path: Path
) -> None:
    session = await opener("c1")
    first = await session.turn("the code word is PELICAN")
    await session.close()
    _assert_gone(session.pid)
    assert not session.alive

    started = time.monotonic()
    again = await opener("c1", resume=first.session_id)
    assert again.session_id == first.session_id  # known before the first turn
    result = await again.turn("what was the code word?")
    resume_s = time.monotonic() - started
    assert result.text == "echo: what was the code word?"
    assert result.session_id == first.session_id
    texts = _joined(api.message_requests()[-1])
    assert "the code word is PELICAN" in texts
    assert "echo: the code word is PELICAN" in texts
    assert resume_s < 10
    # total_cost_usd continues across the restart; turn_cost_usd is this turn's alone
    assert result.total_cost_usd == pytest.approx(first.total_cost_usd + result.turn_cost_usd)
    assert 0 < result.turn_cost_usd < result.total_cost_usd


@requires_cli
@pytest.mark.asyncio
async def test_resume_unknown_session_fails_cleanly(opener: Callable[..., Any]) -> None:
    with pytest.raises(ClaudeError) as info:
        await opener("c2", resume="0b0e7c3e-1d7a-4a5e-9a43-1c2d3e4f5a6b")
    assert info.value.code == "resume_failed"
    assert "No conversation found" in str(info.value)
    with pytest.raises(ClaudeError) as info:
        await opener("c2", resume="not-a-session-id")
    assert info.value.code == "resume_failed"
    assert _claude_children() == []  # the failed CLI did not outlive open()


def _claude_children() -> list[int]:
    """Live children of this test process that run the bundled CLI."""
    me = os.getpid()
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z" and str(CLI).encode() in cmdline:
                kids.append(int(entry.name))
    return kids


@requires_cli
@pytest.mark.asyncio
async def test_api_overloaded_is_error_result_fast(
    api: FakeAnthropicAPI, opener: Callable[..., Any]
) -> None:
    session = await opener()
    api.responder = lambda body: Reply(status=529, error_message="Overloaded")
    started = time.monotonic()
    result = await session.turn("are you there?")
    elapsed = time.monotonic() - started
    assert result.is_error
    assert result.error and "529" in result.error
    assert elapsed < 3.0, f"a 529 took {elapsed:.1f}s: retries not disabled?"
    assert len(api.message_requests()) == 1  # CLAUDE_CODE_MAX_RETRIES=0: no retry

    api.responder = lambda body: Reply(status=401, error_type="authentication_error")
    result = await session.turn("again")
    assert result.is_error and result.error and "401" in result.error

    # the process survives API errors
    api.responder = lambda body: "recovered"
    result = await session.turn("and now?")
    assert not result.is_error and result.text == "recovered"
    assert session.alive


@requires_cli
@pytest.mark.asyncio
async def test_max_retries_can_be_overridden(
    api: FakeAnthropicAPI, opener: Callable[..., Any]
) -> None:
    calls = {"n": 0}

    def flaky(body: Any) -> str | Reply:
        calls["n"] += 1
        return Reply(status=529) if calls["n"] == 1 else "after retry"

    api.responder = flaky
    session = await opener(extra_env={"CLAUDE_CODE_MAX_RETRIES": "1"})
    result = await session.turn("retry me")
    assert not result.is_error and result.text == "after retry"
    assert len(api.message_requests()) == 2


@requires_cli
@pytest.mark.asyncio
async def test_hanging_api_times_out_and_kills(
    api: FakeAnthropicAPI, opener: Callable[..., Any]
) -> None:
    session = await opener(turn_timeout=3.0)
    api.responder = lambda body: Reply(hang=True)
    pid = session.pid
    started = time.monotonic()
    with pytest.raises(ClaudeError) as info:
        await session.turn("hello?")
    elapsed = time.monotonic() - started
    assert info.value.code == "timeout"
    assert 2.9 <= elapsed < 6.0
    assert not session.alive
    _assert_gone(pid)
    with pytest.raises(ClaudeError) as info:
        await session.turn("still there?")
    assert info.value.code == "process_exited"
    api.release()


@requires_cli
@pytest.mark.asyncio
async def test_cancelled_turn_kills_the_process(
    api: FakeAnthropicAPI, opener: Callable[..., Any]
) -> None:
    session = await opener()
    api.responder = lambda body: Reply(hang=True)
    task = asyncio.create_task(session.turn("never answered"))
    for _ in range(200):  # until the request is in flight
        if api.message_requests():
            break
        await asyncio.sleep(0.05)
    assert api.message_requests()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not session.alive  # its output would be out of step with the next turn
    await session.close()
    _assert_gone(session.pid)
    api.release()


@requires_cli
@pytest.mark.asyncio
async def test_tools_disabled_reach_api_as_no_tools(
    api: FakeAnthropicAPI, opener: Callable[..., Any]
) -> None:
    off = await opener("off")
    await off.turn("hi")
    req = api.message_requests()[-1]
    assert not req.json.get("tools")  # [] (CLI 2.1.331) or absent

    on = await opener("on", tools_enabled=True)
    await on.turn("hi")
    req = api.message_requests()[-1]
    assert req.json.get("tools"), "with tools_enabled the CLI should offer tools"


@requires_cli
@pytest.mark.asyncio
async def test_image_block_reaches_api(api: FakeAnthropicAPI, opener: Callable[..., Any]) -> None:
    session = await opener()
    result = await session.turn(
        [
            {"type": "text", "text": "what is this?"},
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
            },
        ]
    )
    assert result.text == "echo: what is this? [image image/png]"
    last_user = _messages(api.message_requests()[-1])[-1]
    images = [b for b in last_user["content"] if b.get("type") == "image"]
    assert len(images) == 1
    assert images[0]["source"] == {"type": "base64", "media_type": "image/png", "data": PNG_B64}


@requires_cli
@pytest.mark.asyncio
async def test_no_worker_path_reaches_the_model(
    api: FakeAnthropicAPI, opener: Callable[..., Any], tmp_path: Path
) -> None:
    """The CLI keeps a copy of every input image and tells the model where
    (``[Image: source: <its tmp dir>/.../images/1.png]``): a path of the worker's host that the
    model could repeat to a contact. Neither a fresh nor a resumed session sends one."""
    image = {"type": "image",
             "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}}
    session = await opener()
    first = await session.turn([{"type": "text", "text": "what is this?"}, image])
    assert first.text == "echo: what is this? [image image/png]"
    sid = session.session_id
    await session.close()
    resumed = await opener(resume=sid)
    await resumed.turn([{"type": "text", "text": "and this?"}, image])
    roots = {str(tmp_path), os.path.realpath(tmp_path)}
    requests = api.message_requests()
    assert len(requests) == 2
    for req in requests:
        body = json.dumps(req.json)
        assert "[Image: source" not in body and "[Image source" not in body
        leaked = [root for root in roots if root in body]
        assert not leaked, f"a worker path reached the model: {leaked}"
        # the image itself still does
        assert [b["type"] for b in _messages(req)[-1]["content"]].count("image") == 1


@requires_cli
@pytest.mark.asyncio
async def test_slash_text_is_sent_to_the_model(
    api: FakeAnthropicAPI, opener: Callable[..., Any]
) -> None:
    session = await opener()
    first = await session.turn("/clear")
    assert first.text == "echo:  /clear"  # reached the model, with one leading space
    second = await session.turn("/cost")
    assert second.session_id == first.session_id  # /clear did not start a new session
    assert len(api.message_requests()) == 2


@pytest.mark.asyncio
async def test_no_api_key_is_not_configured(
    api: FakeAnthropicAPI,
    make_settings: Callable[..., ClaudeSettings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    for extra_env in ({"ANTHROPIC_BASE_URL": api.base_url}, {"ANTHROPIC_API_KEY": " "}):
        settings = make_settings()
        settings = ClaudeSettings(
            cli_path=settings.cli_path,
            model=None,
            system_prompt=None,
            extra_env=extra_env,
        )
        with pytest.raises(ClaudeError) as info:
            await ClaudeSession.open(
                settings=settings,
                workdir=tmp_path / "w",
                config_dir=tmp_path / "h" / ".claude",
                resume_session_id=None,
            )
        assert info.value.code == "not_configured"
        assert "ANTHROPIC_API_KEY" in str(info.value)
        # what the operator reads in `claude.unavailable`: the file to edit, not an internal
        assert "/etc/wabridge/worker.env" in str(info.value)
        assert "extra_env" not in str(info.value)
    assert api.requests == []


@requires_cli
@pytest.mark.asyncio
async def test_api_key_from_process_env_is_used(
    api: FakeAnthropicAPI, opener: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-env")
    monkeypatch.setenv("CLAUDE_CODE_OAUTH_TOKEN", "must-not-leak")
    session = await opener(extra_env={"ANTHROPIC_API_KEY": "sk-ant-test"})
    await session.turn("hi")
    assert api.message_requests()[-1].headers["x-api-key"] == "sk-ant-test"  # extra_env wins
    env = (Path(f"/proc/{session.pid}") / "environ").read_bytes().split(b"\0")
    assert not any(e.startswith(b"CLAUDE_CODE_OAUTH_TOKEN=") for e in env)


@requires_cli
@pytest.mark.asyncio
async def test_sessions_with_different_config_dirs_never_share_text(
    api: FakeAnthropicAPI, opener: Callable[..., Any], tmp_path: Path
) -> None:
    alice, bob = await asyncio.gather(opener("alice"), opener("bob"))
    a1, b1 = await asyncio.gather(alice.turn("ALICE-SECRET-1"), bob.turn("BOB-SECRET-1"))
    a2, b2 = await asyncio.gather(alice.turn("ALICE-SECRET-2"), bob.turn("BOB-SECRET-2"))
    assert a1.session_id != b1.session_id
    assert (a2.text, b2.text) == ("echo: ALICE-SECRET-2", "echo: BOB-SECRET-2")
    by_session: dict[str, list[RecordedRequest]] = {}
    for req in api.message_requests():
        by_session.setdefault(req.headers["x-claude-code-session-id"], []).append(req)
    assert set(by_session) == {a1.session_id, b1.session_id}
    for req in by_session[a1.session_id]:
        assert "BOB" not in _joined(req)
    for req in by_session[b1.session_id]:
        assert "ALICE" not in _joined(req)
    assert "ALICE-SECRET-1" in _joined(by_session[a1.session_id][-1])
    # transcripts stay in each chat's own config dir
    for name, other in (("alice", "BOB"), ("bob", "ALICE")):
        files = list((tmp_path / name / "home" / ".claude").rglob("*.jsonl"))
        assert files
        assert all(other not in f.read_text() for f in files)


@requires_cli
@pytest.mark.asyncio
async def test_auto_compaction_request_is_not_a_turn(
    api: FakeAnthropicAPI, opener: Callable[..., Any]
) -> None:
    # usage near the 1M context window makes the CLI compact before the next turn
    api.responder = lambda body: Reply(
        text=default_responder(body), input_tokens=990_000, output_tokens=5
    )
    session = await opener()
    await session.turn("one")
    second = await session.turn("two")
    assert second.text == "echo: two"
    assert len(api.requests) == 3  # turn, summarisation, turn
    assert len(api.message_requests()) == 2
    assert "Summary: the user said one" in _joined(api.message_requests()[-1])


# ---- the fake itself ---------------------------------------------------------------------


def _http(api: FakeAnthropicAPI, path: str, body: bytes, method: str = "POST") -> tuple[int, bytes]:
    req = urllib.request.Request(
        api.base_url + path, data=body, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.decode().split("\n\n"):
        if not chunk.strip():
            continue
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_fake_api_wire_protocol(api: FakeAnthropicAPI) -> None:
    turn = {
        "model": "m",
        "max_tokens": 100,
        "stream": True,
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": "ignored"},
                    {"type": "text", "text": "<system-reminder>noise</system-reminder>"},
                    {"type": "text", "text": "last words"},
                ],
            },
            {"role": "system", "content": [{"type": "text", "text": "env"}]},
        ],
    }
    status, raw = _http(api, "/v1/messages?beta=true", json.dumps(turn).encode())
    assert status == 200
    events = _sse_events(raw)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names[-2] == "message_delta" and "content_block_stop" in names
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "echo: last words"
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"

    api.responder = lambda body: Reply(text="plain", input_tokens=7, output_tokens=3)
    status, raw = _http(api, "/v1/messages", json.dumps({**turn, "stream": False}).encode())
    body = json.loads(raw)
    assert status == 200 and body["content"] == [{"type": "text", "text": "plain"}]
    assert body["usage"]["input_tokens"] == 7 and body["usage"]["output_tokens"] == 3

    api.responder = lambda body: Reply(status=529)
    status, raw = _http(api, "/v1/messages", json.dumps(turn).encode())
    assert status == 529 and json.loads(raw)["error"]["type"] == "overloaded_error"

    status, raw = _http(api, "/v1/messages", b"{not json")
    assert status == 400 and json.loads(raw)["type"] == "error"
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, raw = _http(api, "/v1/nope", b"{}")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    status, raw = _http(api, "/v1/messages/count_tokens", json.dumps(turn).encode())
    assert status == 200 and json.loads(raw)["input_tokens"] > 0

    recorded = api.requests
    assert [r.status for r in recorded] == [200, 200, 529, 400, 404, 200]
    assert recorded[3].json is None and recorded[3].body == b"{not json"
    assert [r.path for r in api.unknown_requests()] == ["/v1/nope"]
    assert len(api.message_requests()) == 3
    assert "first" in api.all_texts(recorded[0]) and "env" in api.all_texts(recorded[0])


def test_fake_api_hang_is_released_and_delay_applies(api: FakeAnthropicAPI) -> None:
    turn = json.dumps({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()
    api.responder = lambda body: Reply(hang=True, text="late")
    results: list[tuple[int, bytes]] = []
    worker = threading.Thread(target=lambda: results.append(_http(api, "/v1/messages", turn)))
    worker.start()
    time.sleep(0.5)
    assert results == []
    api.release()
    worker.join(5)
    assert results and json.loads(results[0][1])["content"][0]["text"] == "late"
    api.responder = lambda body: Reply(delay=0.4, text="slow")
    started = time.monotonic()
    assert _http(api, "/v1/messages", turn)[0] == 200
    assert time.monotonic() - started >= 0.4


# ---- protocol robustness, with a stand-in CLI --------------------------------------------

FAKE_CLI = r"""#!/usr/bin/python3
import json, sys
def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
n = 0
for line in sys.stdin:
    msg = json.loads(line)
    if msg["type"] == "control_request":
        out({"type": "control_response",
             "response": {"subtype": "success", "request_id": msg["request_id"], "response": {}}})
        continue
    n += 1
    text = msg["message"]["content"][0]["text"]
    if text == "garbage":
        sys.stdout.write('{"type": "assistant", "message": {"content": [{"ty\n')
        sys.stdout.flush()
    if text == "die":
        sys.exit(3)
    out({"type": "result", "subtype": "success", "is_error": False, "result": "ok " + text,
         "session_id": "5f0c2a53-0000-4000-8000-000000000001", "total_cost_usd": 0.5 * n,
         "usage": {"input_tokens": 3, "output_tokens": 2}, "duration_ms": 7})
"""


@pytest.mark.asyncio
async def test_non_json_line_is_a_protocol_error_for_that_turn(tmp_path: Path) -> None:
    cli = tmp_path / "fake-claude"
    cli.write_text(FAKE_CLI)
    cli.chmod(cli.stat().st_mode | stat.S_IXUSR)
    settings = ClaudeSettings(
        cli_path=cli, model=None, system_prompt=None, extra_env={"ANTHROPIC_API_KEY": "k"}
    )
    session = await ClaudeSession.open(
        settings=settings,
        workdir=tmp_path / "w",
        config_dir=tmp_path / "h" / ".claude",
        resume_session_id=None,
    )
    try:
        first = await session.turn("fine")
        assert (first.text, first.total_cost_usd, first.duration_ms) == ("ok fine", 0.5, 7)
        assert first.turn_cost_usd == 0.5  # no model_usage_since_last_result: difference
        assert first.usage == {"input_tokens": 3, "output_tokens": 2}
        with pytest.raises(ClaudeError) as info:
            await session.turn("garbage")
        assert info.value.code == "protocol"
        again = await session.turn("after")  # same process, stream still in step
        assert again.text == "ok after"
        with pytest.raises(ClaudeError) as info:
            await session.turn("die")
        assert info.value.code == "process_exited"
        assert not session.alive
    finally:
        await session.close()
    _assert_gone(session.pid)


def test_command_line_flags() -> None:
    settings = ClaudeSettings(
        cli_path=Path("/x/claude"), model="claude-x", system_prompt="P", extra_env={}
    )
    cmd = build_command(settings, "0b0e7c3e-1d7a-4a5e-9a43-1c2d3e4f5a6b")
    assert cmd[cmd.index("--tools") + 1] == ""
    assert cmd[cmd.index("--system-prompt") + 1] == "P"
    assert cmd[cmd.index("--model") + 1] == "claude-x"
    assert "--resume=0b0e7c3e-1d7a-4a5e-9a43-1c2d3e4f5a6b" in cmd
    assert "--no-session-persistence" not in cmd
