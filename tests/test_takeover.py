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
