"""agent.budget and agent.rotation: token bucket, pacing, daily cap, rotation (pure)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import budget, rotation
from agent.budget import Bucket
from agent.rotation import HistoryLine
from wabridge.prices import Price

# --- token bucket --------------------------------------------------------------------------


def run(times: list[float], rate: float = 10.0, burst: int = 5) -> list[bool]:
    bucket: Bucket | None = None
    out = []
    for t in times:
        ok, bucket = budget.take(bucket, t, rate, burst)
        out.append(ok)
    return out


@pytest.mark.parametrize(
    ("times", "rate", "burst", "expected"),
    [
        # a new sender has the full burst
        ([0, 0, 0, 0, 0], 10, 5, [True] * 5),
        ([0] * 7, 10, 5, [True] * 5 + [False] * 2),
        # 10/minute refills one token every 6 s
        ([0] * 5 + [5.9], 10, 5, [True] * 5 + [False]),
        ([0] * 5 + [6.0], 10, 5, [True] * 6),
        ([0] * 5 + [6.0, 6.1], 10, 5, [True] * 6 + [False]),
        # a steady 10/minute never trips it; 20/minute does after the burst
        ([i * 6.0 for i in range(30)], 10, 5, [True] * 30),
        ([i * 3.0 for i in range(12)], 10, 5, [True] * 9 + [False, True, False]),
        # refill never exceeds the burst
        ([0, 1000, 1000, 1000, 1000, 1000, 1000], 10, 5, [True] * 6 + [False]),
        # burst 1
        ([0, 1, 6, 6.5, 12], 10, 1, [True, False, True, False, True]),
        # rate 0: no limit
        ([0] * 50, 0, 1, [True] * 50),
        # a clock going backwards refills nothing
        ([10, 10, 10, 10, 10, 0, 0], 10, 5, [True] * 5 + [False, False]),
    ],
)
def test_token_bucket(times: list[float], rate: float, burst: int, expected: list[bool]) -> None:
    assert run(times, rate, burst) == expected


def test_rejected_take_keeps_partial_tokens() -> None:
    _, b = budget.take(Bucket(0.5, 0.0), 0.0, 10, 5)
    assert b == Bucket(0.5, 0.0)
    ok, b = budget.take(b, 3.0, 10, 5)  # +0.5 -> 1.0
    assert ok and b.tokens == pytest.approx(0.0)


@given(st.lists(st.floats(min_value=0, max_value=600), min_size=1, max_size=80).map(sorted),
       st.floats(min_value=1, max_value=120), st.integers(min_value=1, max_value=10))
def test_bucket_never_admits_more_than_burst_plus_rate(times: list[float], rate: float,
                                                       burst: int) -> None:
    admitted = [t for t, ok in zip(times, run(times, rate, burst), strict=True) if ok]
    span = times[-1] - times[0]
    assert len(admitted) <= burst + rate * span / 60.0 + 1e-9


# --- pacing --------------------------------------------------------------------------------


def notices(times: list[float], rate: float = 10.0, burst: int = 5) -> list[str]:
    """Per message: "ok", "NOTICE" (refused, told to slow down) or "quiet" (refused)."""
    bucket: Bucket | None = None
    slowed = False
    out = []
    for t in times:
        verdict = budget.admit(bucket, slowed, t, rate, burst)
        bucket, slowed = verdict.bucket, verdict.slowed
        out.append("ok" if verdict.allowed else "NOTICE" if verdict.notify else "quiet")
    return out


@pytest.mark.parametrize(
    ("times", "rate", "burst", "expected_notices"),
    [
        # 30 messages in 15 s: tokens refill mid-burst and let some through, one notice
        ([i * 0.5 for i in range(30)], 10, 5, 1),
        # 30 messages in 60 s at 10/minute burst 5: still one episode
        ([i * 2.0 for i in range(30)], 10, 5, 1),
        # a real pause (30 s refills 5 tokens at 10/minute) starts a new episode
        ([0.0] * 7 + [40.0 + i * 0.1 for i in range(7)], 10, 5, 2),
        # a pause too short to refill the bucket does not
        ([0.0] * 7 + [20.0 + i * 0.1 for i in range(7)], 10, 5, 1),
        # within limits: no notice at all
        ([i * 6.0 for i in range(30)], 10, 5, 0),
        ([0.0] * 50, 0, 1, 0),
    ],
)
def test_one_slow_down_notice_per_episode(times: list[float], rate: float, burst: int,
                                          expected_notices: int) -> None:
    got = notices(times, rate, burst)
    assert got.count("NOTICE") == expected_notices
    # the notice rides on the first refused message of an episode, and the bucket decides
    # who is answered exactly as ``take`` alone would
    assert [g == "ok" for g in got] == run(times, rate, burst)


@pytest.mark.parametrize(
    ("last", "now", "gap", "jitter", "expected"),
    [
        (None, 100.0, 1.0, 0.5, 0.0),  # first send: at once
        (100.0, 100.0, 1.0, 0.0, 1.0),
        (100.0, 100.0, 1.0, 0.5, 1.5),
        (100.0, 100.4, 1.0, 0.2, 0.8),
        (100.0, 101.0, 1.0, 0.0, 0.0),
        (100.0, 105.0, 1.0, 0.5, 0.0),  # long ago: at once
        (100.0, 100.0, 0.0, 0.0, 0.0),  # pacing off
    ],
)
def test_send_delay(last: float | None, now: float, gap: float, jitter: float,
                    expected: float) -> None:
    assert budget.send_delay(last, now, gap, jitter) == pytest.approx(expected)


def test_paced_sends_keep_the_gap() -> None:
    """Simulate a sender draining 10 queued replies with an injected clock and jitter."""
    now, last, sent = 0.0, None, []
    jitters = [0.0, 0.5, 0.25, 0.1, 0.5, 0.0, 0.3, 0.2, 0.4, 0.05]
    for j in jitters:
        now += budget.send_delay(last, now, 1.0, j)
        sent.append(now)
        last = now
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(g >= 1.0 - 1e-9 for g in gaps)
    assert gaps == pytest.approx([1.0 + j for j in jitters[1:]])


# --- daily budget --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spent", "cap", "over"),
    [(0.0, 5.0, False), (4.99, 5.0, False), (5.0, 5.0, True), (7.0, 5.0, True),
     (1000.0, 0.0, False), (0.0, 0.0, False)],
)
def test_over_budget(spent: float, cap: float, over: bool) -> None:
    assert budget.over_budget(spent, cap) is over


@pytest.mark.parametrize(("override", "default", "expected"),
                         [(None, 5.0, 5.0), (2.0, 5.0, 2.0), (0.0, 5.0, 0.0)])
def test_effective_budget(override: float | None, default: float, expected: float) -> None:
    assert budget.effective_budget(override, default) == expected


@pytest.mark.parametrize(
    ("ts", "day"),
    [(0.0, "1970-01-01"), (1_700_000_000.0, "2023-11-14"), (1_700_006_399.9, "2023-11-14"),
     (1_700_006_400.0, "2023-11-15")],
)
def test_utc_day(ts: float, day: str) -> None:
    assert budget.utc_day(ts) == day


# --- context rotation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("used", "turns", "window", "threshold", "max_turns", "expected"),
    [
        (0, 0, 200_000, 0.7, 50, None),
        (139_999, 49, 200_000, 0.7, 50, None),
        (140_000, 1, 200_000, 0.7, 50, "context"),
        (10, 50, 200_000, 0.7, 50, "turns"),
        (150_000, 50, 200_000, 0.7, 50, "context"),
        (10, 1000, 200_000, 0.7, 0, None),  # no turn cap
    ],
)
def test_should_rotate(used: int, turns: int, window: int, threshold: float, max_turns: int,
                       expected: str | None) -> None:
    assert rotation.should_rotate(used, turns, window=window, threshold=threshold,
                                  max_turns=max_turns) == expected


def test_context_tokens_counts_input_and_cache() -> None:
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 200,
             "cache_read_input_tokens": 3000, "output_tokens": 99}
    assert rotation.context_tokens(usage) == 3210
    assert rotation.context_tokens({}) == 0


def test_seed_text_and_with_seed() -> None:
    assert rotation.seed_text(None, []) == ""
    assert rotation.seed_text("  ", []) == ""
    only = rotation.seed_text("Ada likes tea.", [])
    assert only == "Summary of the earlier conversation:\nAda likes tea."
    both = rotation.seed_text("S", [HistoryLine("user", "hi"), HistoryLine("assistant", "ho")])
    assert both.splitlines()[-3:] == [rotation.RECENT_HEADER, "User: hi", "You: ho"]
    assert rotation.with_seed("new", "") == "new"
    assert rotation.with_seed("new", only) == f"{only}\n\nNew message:\nnew"
    blocks = rotation.with_seed([{"type": "image"}, {"type": "text", "text": "x"}], only)
    assert isinstance(blocks, list)
    assert blocks[0] == {"type": "text", "text": f"{only}\n\nNew message:"}
    assert blocks[1:] == [{"type": "image"}, {"type": "text", "text": "x"}]


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({}, 0.0),
        ({"input_tokens": 1_000_000}, 3.0),
        ({"output_tokens": 1_000_000}, 15.0),
        ({"input_tokens": 1000, "output_tokens": 100}, 0.0045),
        ({"cache_creation_input_tokens": 1_000_000}, 3.75),
        ({"cache_read_input_tokens": 1_000_000}, 0.3),
    ],
)
def test_usage_cost(usage: dict[str, int], expected: float) -> None:
    assert budget.usage_cost(usage, Price(3.0, 15.0)) == pytest.approx(expected)
