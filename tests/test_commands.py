"""agent.commands: parsing chat commands and their reply texts (pure)."""

from __future__ import annotations

import pytest

from agent import commands
from agent.commands import ChatCommand, StatusInfo


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/reset", ChatCommand("reset")),
        ("  /RESET  ", ChatCommand("reset")),
        ("/status please", ChatCommand("status", "please")),
        ("/help\nme", ChatCommand("help", "me")),
        ("/x", ChatCommand("x")),
        ("/foo-bar_2 a b", ChatCommand("foo-bar_2", "a b")),
        ("reset", None),
        ("hello /reset", None),
        ("/", None),
        ("/ reset", None),
        ("/usr/bin is a path", None),
        ("/123", None),
        ("//reset", None),
        ("", None),
        ("/" + "a" * 40, None),  # not a command word, an ordinary message
    ],
)
def test_parse(text: str, expected: ChatCommand | None) -> None:
    assert commands.parse(text) == expected


def test_known_and_unknown() -> None:
    assert all(ChatCommand(n).known for n in ("reset", "status", "help"))
    assert not ChatCommand("x").known
    text = commands.unknown_text(ChatCommand("x"))
    assert text.startswith("Unknown command /x.")
    assert commands.HELP_TEXT in text


def test_help_lists_every_command() -> None:
    for name in commands.KNOWN:
        if name in commands.OWNER_ONLY:  # shown to the owner in the self chat only
            assert f"/{name}" in commands.OWNER_HELP_TEXT
            assert f"/{name}" not in commands.HELP_TEXT
        else:
            assert f"/{name}" in commands.HELP_TEXT


@pytest.mark.parametrize(
    ("info", "lines"),
    [
        (
            StatusInfo(context_tokens=50_000, context_window=200_000, session_turns=3,
                       total_turns=12, cost_today_usd=0.12345, daily_budget_usd=5.0,
                       model="claude-sonnet-4-5", summaries=1),
            ["Context used: 50,000 of 200,000 tokens (25%)",
             "Turns: 3 in this conversation, 12 in this chat",
             "Cost today: $0.1235 of $5.00 daily budget",
             "Model: claude-sonnet-4-5",
             "Summaries of earlier conversation: 1"],
        ),
        (
            StatusInfo(context_tokens=0, context_window=200_000, session_turns=0, total_turns=0,
                       cost_today_usd=0.0, daily_budget_usd=0.0, model="", summaries=0),
            ["Context used: 0 of 200,000 tokens (0%)", "Cost today: $0.0000 (no daily budget)",
             "Model: default"],
        ),
    ],
)
def test_status_text(info: StatusInfo, lines: list[str]) -> None:
    text = commands.status_text(info)
    for line in lines:
        assert line in text.splitlines()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("4915100000002", ("4915100000002@s.whatsapp.net", "")),
        ("+49 151", ValueError),  # the chat is one token: "+49" is too short
        ("+4915100000002 30", ("4915100000002@s.whatsapp.net", "30")),
        ("120363000000000001@g.us You are a choir's bot.",
         ("120363000000000001@g.us", "You are a choir's bot.")),
        ("123@lid reset", ("123@lid", "reset")),
        ("", ValueError),
        ("alice hello", ValueError),
    ],
)
def test_chat_arg(args: str, expected: tuple[str, str] | type[ValueError]) -> None:
    if expected is ValueError:
        with pytest.raises(ValueError, match=r"chat|phone"):
            commands.chat_arg(args)
    else:
        assert commands.chat_arg(args) == expected


def test_paused_text() -> None:
    assert commands.paused_text([], 0.0) == "No chat is paused."
    text = commands.paused_text([("b@s.whatsapp.net", float("inf")),
                                 ("a@s.whatsapp.net", 600.0)], 0.0)
    assert text.splitlines() == ["Paused chats:", "a@s.whatsapp.net: 10 min left",
                                 "b@s.whatsapp.net: until /resume"]
