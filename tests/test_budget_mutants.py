"""agent.budget and agent.rotation: the boundaries mutation testing found open (issue 20)."""

from __future__ import annotations

import pytest

from agent import budget, rotation
from agent.budget import Bucket
from agent.rotation import HistoryLine


@pytest.mark.parametrize(("spent", "cap", "over"), [
    # a cap below one dollar is a cap (budget > 0, not > 1)
    (0.49, 0.5, False), (0.5, 0.5, True), (0.51, 0.5, True),
    (0.01, 0.01, True),
    # a negative cap (never accepted by config or settings) means no cap either
    (100.0, -1.0, False),
])
def test_over_budget_small_caps(spent: float, cap: float, over: bool) -> None:
    assert budget.over_budget(spent, cap) is over


@pytest.mark.parametrize(("used", "window", "expected"), [
    # a window of 0 (unknown) never rotates for context, however much is used
    (10**9, 0, None),
    (0, 0, None),
    (1, 1, "context"),  # 0.5 * 1 <= 1
    (0, 1, None),
])
def test_should_rotate_window_boundary(used: int, window: int, expected: str | None) -> None:
    assert rotation.should_rotate(used, 0, window=window, threshold=0.5,
                                  max_turns=0) == expected


@pytest.mark.parametrize(("turns", "max_turns", "expected"), [
    (1, 1, "turns"), (0, 1, None), (5, -1, None),
])
def test_should_rotate_turn_boundary(turns: int, max_turns: int, expected: str | None) -> None:
    assert rotation.should_rotate(0, turns, window=0, threshold=0.5,
                                  max_turns=max_turns) == expected


def test_rotation_texts_in_full() -> None:
    assert rotation.SUMMARY_PROMPT == (
        "[wabridge] This conversation is about to continue in a new session that will not see "
        "it. Write a summary of 3 to 4 paragraphs of everything that must be remembered to "
        "carry it on: who the user is, what was asked and answered, facts, names, preferences, "
        "open questions and promises made. Reply with the summary only, no preamble.")
    assert rotation.seed_text(" Ada likes tea. ", [HistoryLine("user", "hi"),
                                                   HistoryLine("assistant", "ho")]) == (
        "Summary of the earlier conversation:\nAda likes tea.\n\n"
        "Most recent messages of the earlier conversation (oldest first):\n"
        "User: hi\nYou: ho")
    assert rotation.seed_text(None, [HistoryLine("assistant", "only")]) == (
        "Most recent messages of the earlier conversation (oldest first):\nYou: only")
    assert rotation.with_seed("new", "SEED") == "SEED\n\nNew message:\nnew"
    assert rotation.with_seed([], "SEED") == [{"type": "text", "text": "SEED\n\nNew message:"}]
    assert rotation.with_seed([{"type": "image"}], "") == [{"type": "image"}]


def test_context_tokens_each_kind() -> None:
    assert rotation.context_tokens({"input_tokens": 1}) == 1
    assert rotation.context_tokens({"cache_creation_input_tokens": 20}) == 20
    assert rotation.context_tokens({"cache_read_input_tokens": 300}) == 300


@pytest.mark.parametrize(("bucket", "now", "rate", "burst", "expected"), [
    # disabled: allowed, and the bucket stays full at ``now``
    (Bucket(0.0, 0.0), 5.0, 0.0, 3, (True, Bucket(3.0, 5.0))),
    (Bucket(0.0, 0.0), 5.0, -1.0, 3, (True, Bucket(3.0, 5.0))),
    # a new sender starts full
    (None, 7.0, 60.0, 3, (True, Bucket(2.0, 7.0))),
    # refill: 60/min is one token a second, capped at burst
    (Bucket(0.0, 0.0), 1.0, 60.0, 3, (True, Bucket(0.0, 1.0))),
    (Bucket(0.0, 0.0), 0.5, 60.0, 3, (False, Bucket(0.5, 0.5))),
    (Bucket(2.5, 0.0), 100.0, 60.0, 3, (True, Bucket(2.0, 100.0))),
    # a clock that goes backwards refills nothing and keeps the later time
    (Bucket(0.5, 10.0), 4.0, 60.0, 3, (False, Bucket(0.5, 10.0))),
])
def test_take_rows(bucket: Bucket | None, now: float, rate: float, burst: int,
                   expected: tuple[bool, Bucket]) -> None:
    assert budget.take(bucket, now, rate, burst) == expected


@pytest.mark.parametrize(("last", "now", "expected"), [
    (None, 5.0, 0.0), (10.0, 10.0, 1.5), (10.0, 11.0, 0.5), (10.0, 12.0, 0.0),
])
def test_send_delay_rows(last: float | None, now: float, expected: float) -> None:
    assert budget.send_delay(last, now, 1.0, 0.5) == expected


# a sender's messages against a bucket of 3 refilled by 1 a second (60 a minute), unless said
@pytest.mark.parametrize(("bucket", "slowed", "now", "rate", "admission"), [
    # the first message: a full bucket, one token taken, nothing to tell
    (None, False, 100.0, 60.0,
     budget.Admission(True, False, Bucket(2.0, 100.0), False)),
    # the bucket is empty: refused, and told once ...
    (Bucket(0.0, 100.0), False, 100.0, 60.0,
     budget.Admission(False, True, Bucket(0.0, 100.0), True)),
    # ... not again in the same episode
    (Bucket(0.0, 100.0), True, 100.5, 60.0,
     budget.Admission(False, False, Bucket(0.5, 100.5), True)),
    # a token refilled mid-burst is no new episode: allowed, still slowed
    (Bucket(0.0, 100.0), True, 101.0, 60.0,
     budget.Admission(True, False, Bucket(0.0, 101.0), True)),
    # two tokens back of three: not full, still slowed
    (Bucket(0.0, 100.0), True, 102.0, 60.0,
     budget.Admission(True, False, Bucket(1.0, 102.0), True)),
    # full again: the episode is over
    (Bucket(0.0, 100.0), True, 103.0, 60.0,
     budget.Admission(True, False, Bucket(2.0, 103.0), False)),
    # a slow rate (half a message a minute) is a rate, not "no limit"
    (Bucket(0.0, 100.0), True, 220.0, 0.5,
     budget.Admission(True, False, Bucket(0.0, 220.0), True)),
    # a sender marked slowed without a bucket has a full one: the episode is over
    (None, True, 100.0, 60.0,
     budget.Admission(True, False, Bucket(2.0, 100.0), False)),
    # no limit at all ends any episode
    (Bucket(0.0, 100.0), True, 100.0, 0.0,
     budget.Admission(True, False, Bucket(3.0, 100.0), False)),
])
def test_admit_rows(bucket: Bucket | None, slowed: bool, now: float, rate: float,
                    admission: budget.Admission) -> None:
    assert budget.admit(bucket, slowed, now, rate, 3) == admission


@pytest.mark.parametrize(("usage", "cost"), [
    ({"input_tokens": 1_000_000}, 3.0),  # prices are per million tokens, exactly
    ({"output_tokens": 2_000_000}, 30.0),
    ({"cache_creation_input_tokens": 4_000_000}, 15.0),  # 1.25x the input price
    ({"cache_read_input_tokens": 10_000_000}, 3.0),  # 0.1x
])
def test_usage_cost_exactly(usage: dict[str, int], cost: float) -> None:
    # to the last bits a float keeps (0.1x of 3.0 is 0.30000000000000004)
    assert budget.usage_cost(usage, budget.Price(3.0, 15.0)) == pytest.approx(cost, rel=1e-12)
