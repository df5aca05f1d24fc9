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
