"""agent.delivery: the backoff's edges, written out (issue 20)."""

from __future__ import annotations

import pytest

from agent import delivery


@pytest.mark.parametrize(("attempts", "base", "cap", "expected"), [
    (1, 0.5, 300.0, 0.5),  # a base under a second still waits
    (2, 0.5, 300.0, 1.0),
    (1, -1.0, 300.0, 0.0),  # a negative base: no wait, never a negative one
    (-1, 5.0, 300.0, 0.0),
    # the exponent stops at 30: a long-failing reply cannot overflow the float
    (31, 1.0, float("inf"), 2.0 ** 30),
    (40, 1.0, float("inf"), 2.0 ** 30),
    (3, 5.0, 15.0, 15.0),  # the cap
])
def test_backoff_edges(attempts: int, base: float, cap: float, expected: float) -> None:
    waited = delivery.backoff(attempts, base, cap)
    assert waited == expected
    assert type(waited) is float


def test_the_longest_wait_is_five_minutes() -> None:
    assert delivery.MAX_BACKOFF == 300.0
    assert delivery.backoff(100, 1.0) == 300.0
