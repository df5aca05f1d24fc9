"""agent.takeover: when a chat is paused for its owner, and what Claude is told after."""

from __future__ import annotations

import math

import pytest

from agent import takeover
from agent.takeover import Pause

T0 = 1_800_000_000.0


@pytest.mark.parametrize(
    ("before", "at", "minutes", "expected"),
    [
        (Pause(), T0, 60, Pause(T0 + 3600, ("[owner] hi",))),
        # a second message extends from its own time
        (Pause(T0 + 3600, ("[owner] a",)), T0 + 600, 60,
         Pause(T0 + 4200, ("[owner] a", "[owner] hi"))),
        # never shortened: a /pause without end stays
        (Pause(math.inf), T0, 60, Pause(math.inf, ("[owner] hi",))),
        # 0 minutes: no pause, but Claude learns what the owner said
        (Pause(), T0, 0, Pause(0.0, ("[owner] hi",))),
    ],
)
def test_owner_wrote(before: Pause, at: float, minutes: float, expected: Pause) -> None:
    assert takeover.owner_wrote(before, at, minutes, "hi") == expected


@pytest.mark.parametrize(
    ("pause", "now", "active"),
    [(Pause(), T0, False), (Pause(T0 + 1), T0, True), (Pause(T0), T0, False),
     (Pause(math.inf), T0, True), (takeover.resumed(Pause(math.inf, ("x",))), T0, False)],
)
def test_active(pause: Pause, now: float, active: bool) -> None:
    assert pause.active(now) is active


def test_pause_resume_keep_the_context_for_the_next_turn() -> None:
    p = takeover.held(takeover.owner_wrote(Pause(), T0, 60, "40 EUR"), "and delivery?")
    assert takeover.pause_for(p, T0, None) == Pause(math.inf, p.context)
    assert takeover.pause_for(p, T0, 5) == Pause(T0 + 300, p.context)
    assert takeover.resumed(p) == Pause(0.0, ("[owner] 40 EUR", "and delivery?"))


def test_context_keeps_the_newest_lines() -> None:
    p = Pause(math.inf)
    for i in range(takeover.MAX_CONTEXT_LINES + 5):
        p = takeover.held(p, str(i))
    assert len(p.context) == takeover.MAX_CONTEXT_LINES
    assert p.context[-1] == str(takeover.MAX_CONTEXT_LINES + 4)


def test_with_context() -> None:
    p = Pause(0.0, ("[owner] it costs 40", "ok"))
    assert takeover.with_context("thanks", Pause()) == "thanks"
    text = takeover.with_context("thanks", p)
    assert isinstance(text, str)
    assert text.index("[owner] it costs 40") < text.index("\nok\n") < text.index("thanks")
    assert text.startswith(takeover.CONTEXT_HEADER)
    image = {"type": "image", "source": {}}
    blocks = takeover.with_context([image], p)
    assert isinstance(blocks, list) and blocks[1] == image
    assert "[owner] it costs 40" in blocks[0]["text"]


@pytest.mark.parametrize(("text", "expected"), [("", None), ("30", 30.0), ("1.5", 1.5)])
def test_parse_minutes(text: str, expected: float | None) -> None:
    assert takeover.parse_minutes(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "soon", "inf", "nan"])
def test_parse_minutes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="minutes"):
        takeover.parse_minutes(text)


def test_storage_round_trip_drops_what_is_over() -> None:
    pauses = {"a@s.whatsapp.net": Pause(math.inf, ("x",)), "b@s.whatsapp.net": Pause(T0),
              "c@s.whatsapp.net": Pause()}
    assert takeover.load(takeover.dump(pauses)) == {k: v for k, v in pauses.items()
                                                    if k != "c@s.whatsapp.net"}
    assert takeover.load(None) == {}


def test_what_claude_is_told_after_a_pause_in_full() -> None:
    p = Pause(0.0, ("[owner] it costs 40", "ok"))
    block = ("[While you were paused, the account's owner answered this chat personally. "
             "What was said meanwhile, oldest first; do not contradict the owner:]\n"
             "[owner] it costs 40\n"
             "ok\n"
             "\n"
             "[New message(s):]")
    assert takeover.with_context("thanks", p) == f"{block}\nthanks"
    image = {"type": "image", "source": {}}
    assert takeover.with_context([image], p) == [{"type": "text", "text": block}, image]


def test_a_long_pause_keeps_its_newest_50_lines() -> None:
    p = Pause(math.inf)
    for i in range(60):
        p = takeover.held(p, str(i))
    assert p.context == tuple(str(i) for i in range(10, 60))


def test_under_a_minute_still_pauses() -> None:
    assert takeover.owner_wrote(Pause(), T0, 0.5, "hi") == Pause(T0 + 30, ("[owner] hi",))


@pytest.mark.parametrize(("text", "expected"), [("1", 1.0), ("0.5", 0.5)])
def test_parse_minutes_small(text: str, expected: float) -> None:
    assert takeover.parse_minutes(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("soon", "'soon' is not a number of minutes"),
    ("0", "'0' is not a positive number of minutes"),
    ("inf", "'inf' is not a positive number of minutes"),
])
def test_parse_minutes_messages_in_full(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        takeover.parse_minutes(text)
    assert str(info.value) == message


def test_a_resumed_chats_context_outlives_a_restart() -> None:
    # /resume keeps what was said for the next turn, also when the worker restarts first
    pauses = {"a@s.whatsapp.net": takeover.resumed(Pause(T0, ("[owner] 40 EUR",)))}
    assert takeover.load(takeover.dump(pauses)) == {
        "a@s.whatsapp.net": Pause(0.0, ("[owner] 40 EUR",))}
