"""agent.commands: reply texts written out in full, and the boundaries (issue 20)."""

from __future__ import annotations

import pytest

from agent import commands
from agent.commands import ChatCommand, StatusInfo


def test_help_and_reset_texts_in_full() -> None:
    assert commands.HELP_TEXT == (
        "Commands:\n"
        "/reset - start a new conversation (I forget what we talked about)\n"
        "/status - context used, turns, cost today and model\n"
        "/scheduled - messages Claude scheduled (/scheduled cancel N cancels one)\n"
        "/memory - what Claude remembers about your contacts\n"
        "/help - this text"
    )
    assert commands.RESET_TEXT == "New conversation started. I have forgotten our earlier messages."
    assert commands.unknown_text(ChatCommand("x")) == f"Unknown command /x.\n\n{commands.HELP_TEXT}"


@pytest.mark.parametrize(("text", "expected"), [
    ("/" + "a" * 32, ChatCommand("a" * 32)),  # the longest command word: 32 characters
    ("/" + "a" * 33, None),
])
def test_command_word_length(text: str, expected: ChatCommand | None) -> None:
    assert commands.parse(text) == expected


def _info(tokens: int, budget: float) -> StatusInfo:
    return StatusInfo(context_tokens=tokens, context_window=200_000, session_turns=50,
                      total_turns=70, cost_today_usd=0.5, daily_budget_usd=budget,
                      model="m", summaries=2)


def test_status_text_in_full_with_a_full_window_and_a_small_budget() -> None:
    # a full window is 100 %, never 101 %; a $0.50 cap is a cap (budget > 0, not > 1)
    assert commands.status_text(_info(200_000, 0.5)) == (
        "Status\n"
        "Context used: 200,000 of 200,000 tokens (100%)\n"
        "Turns: 50 in this conversation, 70 in this chat\n"
        "Cost today: $0.5000 of $0.50 daily budget\n"
        "Model: m\n"
        "Summaries of earlier conversation: 2"
    )


@pytest.mark.parametrize(("tokens", "percent"), [(1_000, "(0%)"), (1_001, "(1%)"),
                                                 (199_000, "(100%)"), (201_000, "(100%)"),
                                                 (202_000, "(101%)")])
def test_status_percent_rounds(tokens: int, percent: str) -> None:
    line = commands.status_text(_info(tokens, 0.0)).splitlines()[1]
    assert line.endswith(percent)


@pytest.mark.parametrize("window", [0, -1])
def test_status_without_a_known_window_shows_no_share(window: int) -> None:
    info = StatusInfo(context_tokens=5_000, context_window=window, session_turns=1,
                      total_turns=1, cost_today_usd=0.0, daily_budget_usd=0.0, model="",
                      summaries=0)
    assert commands.status_text(info).splitlines()[1] == "Context used: 5,000 tokens"


def test_status_with_a_one_token_window() -> None:
    info = StatusInfo(context_tokens=1, context_window=1, session_turns=1, total_turns=1,
                      cost_today_usd=0.0, daily_budget_usd=0.0, model="", summaries=0)
    assert commands.status_text(info).splitlines()[1] == "Context used: 1 of 1 tokens (100%)"


@pytest.mark.parametrize("name", ["reset", "status", "help", "scheduled", "memory"])
def test_known_commands(name: str) -> None:
    assert ChatCommand(name).known is True


@pytest.mark.parametrize("name", ["start", "stop", "schedule", "memories", "hel"])
def test_unknown_commands(name: str) -> None:
    assert ChatCommand(name).known is False


def test_scheduled_text_in_full() -> None:
    assert commands.scheduled_text([]) == "No scheduled messages."
    assert commands.scheduled_text([(3, "Alice", "2030-01-02 09:00", "happy birthday")]) == (
        "Scheduled messages:\n"
        "#3 2030-01-02 09:00 to Alice: happy birthday\n"
        "\n"
        "/scheduled cancel N cancels one.")
    assert commands.scheduled_text([(3, "Alice", "Mon 09:00", "hi"),
                                    (12, "Bob", "Tue 10:30", "call me")]) == (
        "Scheduled messages:\n"
        "#3 Mon 09:00 to Alice: hi\n"
        "#12 Tue 10:30 to Bob: call me\n"
        "\n"
        "/scheduled cancel N cancels one.")


def test_memory_text_in_full() -> None:
    assert commands.memory_text([]) == "No notes."
    assert commands.memory_text([(1, "Alice", "likes tea")]) == (
        "Notes about your contacts:\n#1 Alice: likes tea")
    assert commands.memory_text([(1, "Alice", "likes tea"), (4, "Bob", "vegan")]) == (
        "Notes about your contacts:\n"
        "#1 Alice: likes tea\n"
        "#4 Bob: vegan")


@pytest.mark.parametrize("name", ["persona", "pause", "resume", "paused"])
def test_the_owners_commands_are_known(name: str) -> None:
    # an unknown /pause would get the help text and pause nothing
    assert commands.parse(f"/{name} 4915100000002").known is True  # type: ignore[union-attr]


def test_owner_texts_in_full() -> None:
    assert commands.OWNER_HELP_TEXT == (
        "\n\nIn your own chat (message yourself) only:\n"
        "/persona <chat> <text> - that chat's own system prompt (/persona <chat> reset: back "
        "to the account's)\n"
        "/pause <chat> [minutes] - stop answering that chat (no minutes: until /resume)\n"
        "/resume <chat> - answer that chat again\n"
        "/paused - the chats not answered now"
    )
    assert commands.OWNER_ONLY_TEXT.format(name="pause") == (
        "/pause works only in your own chat (message yourself).")


@pytest.mark.parametrize(("args", "expected"), [
    ("4915100000002@s.whatsapp.net hi", ("4915100000002@s.whatsapp.net", "hi")),
    ("+49-151-0000000-2", ("4915100000002@s.whatsapp.net", "")),  # as people type it
    ("1234567  x ", ("1234567@s.whatsapp.net", "x")),  # 7 digits, the shortest number
    ("123456789012345", ("123456789012345@s.whatsapp.net", "")),  # 15, the longest
])
def test_chat_arg_accepts(args: str, expected: tuple[str, str]) -> None:
    assert commands.chat_arg(args) == expected


@pytest.mark.parametrize(("args", "message"), [
    ("  ", "name the chat: a phone number with country code, or a chat JID"),
    ("123456 x", "'123456' is not a phone number (digits with country code) or a chat JID"),
    ("1234567890123456",
     "'1234567890123456' is not a phone number (digits with country code) or a chat JID"),
    ("\u0664\u0669\u0661\u0665\u0661\u0660\u0660\u0660",  # Arabic-Indic digits: not a number
     "'\u0664\u0669\u0661\u0665\u0661\u0660\u0660\u0660' is not a phone number "
     "(digits with country code) or a chat JID"),
    ("+", "'+' is not a phone number (digits with country code) or a chat JID"),
    ("shopkeeper", "'shopkeeper' is not a phone number (digits with country code) or a chat JID"),
])
def test_chat_arg_refuses_in_full(args: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        commands.chat_arg(args)
    assert str(info.value) == message


@pytest.mark.parametrize(("until", "left"), [
    (10.0, "1 min left"),  # under a minute still shows 1, never 0
    (90.0, "2 min left"),  # rounds: 1.5 -> 2
    (3600.0, "60 min left"),
    (7170.0, "120 min left"),
])
def test_paused_minutes_left(until: float, left: str) -> None:
    now = 1_800_000_000.0  # epoch seconds, as the pauses keep them
    assert commands.paused_text([("a@g.us", now + until)], now) == (
        f"Paused chats:\na@g.us: {left}")


@pytest.mark.parametrize(("prompt", "shown"), [
    ("x" * 80, "x" * 80),  # up to 80 characters: in full
    ("x" * 81, "x" * 79 + "\u2026"),  # longer: cut to 80 with the ellipsis
    ("You are\n  Ana,\tthe baker. ", "You are Ana, the baker."),  # on one line
])
def test_status_shows_a_chats_own_persona_short(prompt: str, shown: str) -> None:
    info = StatusInfo(context_tokens=1, context_window=0, session_turns=1, total_turns=1,
                      cost_today_usd=0.0, daily_budget_usd=0.0, model="", summaries=0,
                      personas=(("a@g.us", prompt),))
    assert commands.status_text(info).splitlines()[-1] == f"Own persona of a@g.us: {shown}"
