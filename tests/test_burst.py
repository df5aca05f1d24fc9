"""When a chat's turn starts (``agent.burst.turn_delay``)."""

from __future__ import annotations

import pytest

from agent.burst import turn_delay

# (what, now, woke, last arrival, settle, debounce, seconds still to wait)
TABLE = [
    ("a lone message waits only settle", 10.0, 10.0, 10.0, 0.2, 1.5, 0.2),
    ("settle passed without another: start", 10.25, 10.0, 10.0, 0.2, 1.5, 0.0),
    ("another message restarts settle", 10.15, 10.0, 10.1, 0.2, 1.5, 0.15),
    ("a steady stream is cut at debounce", 11.4, 10.0, 11.35, 0.2, 1.5, 0.1),
    ("past debounce: start whatever comes", 11.6, 10.0, 11.55, 0.2, 1.5, 0.0),
    ("messages that came during the last turn: at once", 20.0, 20.0, 12.0, 0.2, 1.5, 0.0),
    ("settle 0: no wait at all", 10.0, 10.0, 10.0, 0.0, 1.5, 0.0),
    ("settle >= debounce: the old fixed debounce", 10.0, 10.0, 10.0, 5.0, 1.5, 1.5),
    ("debounce 0: never waits", 10.0, 10.0, 10.0, 0.2, 0.0, 0.0),
    ("woken without a known arrival (restart): debounce", 10.0, 10.0, None, 0.2, 1.5, 1.5),
]


@pytest.mark.parametrize(("now", "woke", "last", "settle", "debounce", "wait"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_turn_delay(now: float, woke: float, last: float | None, settle: float,
                    debounce: float, wait: float) -> None:
    assert turn_delay(now, woke, last, settle=settle, debounce=debounce) == pytest.approx(wait)
