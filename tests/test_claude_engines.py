"""One contract for both Claude engines (``claude.engine``): every test runs against ``cli``
(the real Claude Code CLI) and ``api`` (the anthropic SDK in the worker), both talking to the
fake Messages API, through the same :class:`agent.engine.Engine` (the rig of test_engine.py).

What a user relies on, whichever engine answers: a turn is answered; the conversation is
remembered; images reach Claude; a long conversation is rotated and the summary carries it
on; an overloaded API or a hung turn gets the apology and the chat goes on; usage and cost are
recorded; the daily budget holds.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakes.anthropic_api import (
    FakeAnthropicAPI,
    RecordedRequest,
    Reply,
    default_responder,
    last_user_images,
    last_user_text,
)
from PIL import Image as PILImage
from test_engine import (
    ALICE,
    API_PRICE,
    CLI,
    LIMITS,
    SUMMARY,
    MakeRig,
    api,
    jid,
    make_rig,
    rotating_responder,
    texts,
    turn_requests,
    until,
)

from agent import budget, rotation
from agent.anthropic_import import reexports
from agent.claude_api import request_messages
from agent.engine import BUDGET_NOTICE
from agent.main import api_settings
from agent.whatsapp.events import Image, IncomingMessage
from wabridge import claude_cli, config
from wabridge.config import Config
from wabridge.errors import ConfigError

__all__ = ["api", "make_rig"]  # fixtures shared with test_engine.py

pytestmark = [
    pytest.mark.claude,
    pytest.mark.timeout(60),
    pytest.mark.skipif(CLI is None, reason="claude-agent-sdk's bundled CLI missing"),
]


@pytest.fixture(params=["cli", "api"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def by(engine: str, req: RecordedRequest) -> bool:
    """The request came from that engine (the CLI names itself in its user agent)."""
    return ("claude-cli" in req.headers.get("user-agent", "")) == (engine == "cli")


def png() -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (4, 4), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


async def test_a_turn_is_answered(make_rig: MakeRig, api: FakeAnthropicAPI, engine: str) -> None:
    rig = await make_rig()
    rig.incoming("hello there")
    assert (await rig.wait_sent(1, jid(ALICE))) == ["echo: hello there"]
    (req,) = api.message_requests()
    assert by(engine, req)
    assert "You answer WhatsApp messages." in texts(req)  # the system prompt


async def test_the_conversation_is_carried_into_the_next_request(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    rig = await make_rig()
    chat = jid(ALICE)
    rig.incoming("the code word is PELICAN")
    await rig.wait_sent(1, chat)
    rig.incoming("what was it?")
    await rig.wait_sent(2, chat)
    second = api.message_requests()[-1]
    roles = [m["role"] for m in second.json["messages"] if m["role"] != "system"]
    assert roles == ["user", "assistant", "user"]
    body = texts(second)
    assert "the code word is PELICAN" in body and "echo: the code word is PELICAN" in body
    assert "cache_control" in json.dumps(second.json)  # the history is read from the cache
    row = rig.store.chat(chat)
    assert row is not None and row.session_turns == 2


async def test_an_image_reaches_claude_as_an_image_block(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    rig = await make_rig()
    chat = jid(ALICE)
    msg = IncomingMessage(wa_id="IMG1", chat_id=chat, sender=chat, text="what is this?",
                          timestamp=time.time(), images=(Image("image/png", png()),))
    assert rig.engine.persist(msg)
    rig.engine.wake_chat(chat)
    (reply,) = await rig.wait_sent(1, chat)
    assert reply == "echo: what is this? [image image/png]"
    assert last_user_images(api.message_requests()[-1].json) == ["image/png"]


async def test_rotation_seeds_the_next_request_with_the_summary(
        make_rig: MakeRig, api: FakeAnthropicAPI, engine: str) -> None:
    api.responder = rotating_responder
    rig = await make_rig()
    chat = jid(ALICE)
    rig.incoming("the code word is PELICAN")
    await rig.wait_sent(1, chat)
    rig.incoming("BIG question about tea")  # 75 % of the window: rotated after the turn
    await rig.wait_sent(2, chat)
    await until(lambda: bool(rig.summaries), 15, "the summary")
    assert rig.summaries == [(chat, 1, SUMMARY)]
    summary_request = api.message_requests()[-1]
    assert by(engine, summary_request) and "PELICAN" in texts(summary_request)
    row = rig.store.chat(chat)
    assert row is not None and row.session_id is None and row.seed == "summary"
    await asyncio.sleep(0.2)
    assert all("SUMMARY" not in t for t in rig.wa.to(chat))  # the summary is never sent

    rig.incoming("what was the code word?")
    await rig.wait_sent(3, chat)
    new = turn_requests(api)[-1]
    body = texts(new)
    assert SUMMARY in body and rotation.SUMMARY_HEADER in body
    assert "the code word is PELICAN" not in body and "BIG question" not in body
    if engine == "api":  # the ended conversation's history is gone from the store
        row = rig.store.chat(chat)
        assert row is not None and row.session_id is not None
        kept = rig.store._conn().execute(
            "SELECT DISTINCT session_id FROM api_messages WHERE chat_id = ?", (chat,)
        ).fetchall()
        assert [r[0] for r in kept] == [row.session_id]


async def test_an_overloaded_api_gets_the_apology_and_the_chat_goes_on(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    api.responder = lambda body: (Reply(status=529) if "BUSY" in last_user_text(body)
                                  else default_responder(body))
    rig = await make_rig()
    chat = jid(ALICE)
    rig.incoming("hello")
    await rig.wait_sent(1, chat)
    rig.incoming("BUSY now?")
    sent = await rig.wait_sent(2, chat)
    assert sent[1] == "SORRY-APOLOGY"
    assert sum(1 for r in api.message_requests() if r.status == 529) == 1  # no retry
    api.responder = default_responder
    rig.incoming("and now?")
    sent = await rig.wait_sent(3, chat)
    assert sent[2].startswith("echo:") and "and now?" in sent[2]
    body = texts(api.message_requests()[-1])
    assert "hello" in body and "BUSY now?" in body  # the failed turn's text is not lost
    row = rig.store.chat(chat)
    assert row is not None and row.turns == 3


async def test_a_hung_turn_times_out_with_the_apology(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    api.responder = lambda body: (Reply(hang=True) if "HANG" in last_user_text(body)
                                  else default_responder(body))
    rig = await make_rig(turn_timeout=2.0)
    chat = jid(ALICE)
    rig.incoming("hello")
    await rig.wait_sent(1, chat)
    started = time.monotonic()
    rig.incoming("HANG please")
    sent = await rig.wait_sent(2, chat, timeout=10)
    assert sent[1] == "SORRY-APOLOGY"
    assert 1.9 < time.monotonic() - started < 6  # one timeout, no retry
    api.release()
    api.responder = default_responder
    rig.incoming("are you back?")
    sent = await rig.wait_sent(3, chat)
    assert "are you back?" in sent[2]
    assert "hello" in texts(api.message_requests()[-1])  # the conversation goes on


async def test_usage_and_cost_are_recorded(make_rig: MakeRig, api: FakeAnthropicAPI,
                                           engine: str) -> None:
    api.responder = lambda body: Reply(text="ok", input_tokens=1200, output_tokens=80)
    rig = await make_rig()
    chat = jid(ALICE)
    rig.incoming("count me")
    await rig.wait_sent(1, chat)
    await rig.idle()
    row = rig.store.chat(chat)
    assert row is not None
    assert (row.input_tokens, row.output_tokens, row.context_tokens) == (1200, 80, 1200)
    day = budget.utc_day(time.time())
    assert rig.store.cost_on(day) == pytest.approx(row.cost_usd)
    assert row.cost_usd > 0
    if engine == "api":  # priced by claude.api_prices (the CLI prices its own model)
        assert row.cost_usd == pytest.approx((1200 * 3.0 + 80 * 15.0) / 1e6)
        assert API_PRICE.input == 3.0


async def test_the_daily_budget_holds(make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    rig = await make_rig(limits=replace(LIMITS, daily_budget_usd=0.000001))
    chat = jid(ALICE)
    rig.incoming("first")
    await rig.wait_sent(1, chat)
    rig.incoming("second")
    sent = await rig.wait_sent(2, chat)
    assert sent[1] == BUDGET_NOTICE
    await asyncio.sleep(0.2)
    assert len(api.message_requests()) == 1


# --- choosing the engine -----------------------------------------------------------------


@pytest.mark.parametrize("engine", ["cli"])
async def test_a_user_switches_to_the_api_engine_and_keeps_the_conversation(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    rig = await make_rig()
    chat = jid(ALICE)
    rig.incoming("the code word is PELICAN")
    await rig.wait_sent(1, chat)
    assert by("cli", api.message_requests()[-1])
    assert rig.engine.update_settings({"engine": "api"}) is None
    rig.incoming("what was it?")
    await rig.wait_sent(2, chat)
    req = api.message_requests()[-1]
    assert by("api", req)
    # the CLI's session cannot continue on the api engine: recovery from the stored messages
    assert "the code word is PELICAN" in texts(req) and rotation.RECENT_HEADER in texts(req)
    assert rig.pool.pid(chat) is None  # the chat's CLI process was closed when it moved
    problem = rig.engine.update_settings({"engine": "claude"})
    assert problem is not None and problem.key == "settings.engine"
    assert rig.engine.conversations is rig.api  # a bad value keeps the previous choice

    assert rig.engine.update_settings({}) is None  # back to the host's engine, cli
    rig.incoming("and the colour?")
    await rig.wait_sent(3, chat)
    req = api.message_requests()[-1]
    assert by("cli", req)
    assert "what was it?" in texts(req)  # what was said on the api engine is not lost


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ([], []),
        ([("user", [{"type": "text", "text": "a"}])],
         [{"role": "user", "content": [{"type": "text", "text": "a"}]}]),
        # a failed turn left a user message unanswered: merged into the next, as the CLI does
        ([("user", [{"type": "text", "text": "a"}]), ("user", [{"type": "text", "text": "b"}]),
          ("assistant", [{"type": "text", "text": "c"}])],
         [{"role": "user", "content": [{"type": "text", "text": "a"},
                                       {"type": "text", "text": "b"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "c"}]}]),
    ],
)
def test_request_messages(stored: list[tuple[str, list[dict[str, Any]]]],
                          expected: list[dict[str, Any]]) -> None:
    assert request_messages(stored) == expected
    assert stored == [] or stored[0][1][0]["text"] == "a"  # the stored lists are not changed


@pytest.mark.parametrize("engine", ["api"])
async def test_the_api_engine_without_a_key_apologises(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    rig = await make_rig(api_key=None)
    rig.incoming("hello")
    assert (await rig.wait_sent(1, jid(ALICE))) == ["SORRY-APOLOGY"]
    assert api.message_requests() == []


def test_api_settings_use_the_key_and_url_the_cli_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-shared")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = Config()
    settings = api_settings(cfg)
    assert (settings.api_key, settings.base_url) == ("sk-shared", "http://127.0.0.1:9")
    assert settings.model == config.api_model(cfg.claude) and settings.price.input > 0
    (tmp_path / claude_cli.API_KEY_CREDENTIAL).write_text("sk-own\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert api_settings(cfg).api_key == "sk-own"  # the user's own key (apiKeyRef) first
    with pytest.raises(ConfigError) as info:
        api_settings(replace(cfg, claude=replace(cfg.claude, model="claude-unpriced")))
    assert info.value.key == "claude.api_prices"


def test_a_worker_imports_the_sdk_only_for_an_api_turn() -> None:
    """The SDK costs ~65 MB: a worker whose chats run on the CLI never loads it."""
    code = ("import sys, agent.main, agent.claude_api; print('anthropic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).parent.parent).stdout
    assert out.strip() == "False"


async def test_a_restarted_worker_continues_the_stored_conversation(
        make_rig: MakeRig, api: FakeAnthropicAPI) -> None:
    rig = await make_rig("user1")
    chat = jid(ALICE)
    rig.incoming("the code word is PELICAN")
    await rig.wait_sent(1, chat)
    await rig.idle()
    await rig.close()  # the worker stops; its store stays
    again = await make_rig("user1")
    again.incoming("what was it?")
    await again.wait_sent(1, chat)
    body = texts(api.message_requests()[-1])
    assert "the code word is PELICAN" in body
    assert rotation.RECENT_HEADER not in body  # resumed as it was, not rebuilt from a seed


@pytest.mark.parametrize(("source", "names"), [
    ("from .message import Message as Message\n", {"Message": ("message", "Message")}),
    ("from . import types\nfrom ._client import Client, AsyncClient as AC\n",
     {"types": (None, "types"), "Client": ("_client", "Client"), "AC": ("_client", "AsyncClient")}),
    ("from .lib.vertex import *\nimport typing as _t\nfrom typing import Any\n", {}),
])
def test_a_lazy_sdk_package_finds_each_name_where_its_init_would_import_it(
        source: str, names: dict[str, tuple[str | None, str]]) -> None:
    assert reexports(source) == names
