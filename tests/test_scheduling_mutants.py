"""agent.scheduling: every delay unit, the edges of "past" and "too far ahead", and the whole
sentences the model reads when it is refused (issue 20)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agent import scheduling
from agent.scheduling import BadWhen

NOW = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC, 22:26:40 in Berlin (CEST)
DAY = 86_400.0


@pytest.mark.parametrize(("when", "due"), [
    ("in 5 s", NOW + 5), ("in 5 sec", NOW + 5), ("in 5 secs", NOW + 5),
    ("in 1 second", NOW + 1), ("in 5 seconds", NOW + 5),
    ("in 3 m", NOW + 180), ("in 3 min", NOW + 180), ("in 3 mins", NOW + 180),
    ("in 1 minute", NOW + 60), ("in 3 minutes", NOW + 180),
    ("in 2 h", NOW + 7200), ("in 1 hour", NOW + 3600), ("in 2 hours", NOW + 7200),
    ("in 1 d", NOW + DAY), ("in 1 day", NOW + DAY), ("in 2 days", NOW + 2 * DAY),
    ("in 1.5 hours", NOW + 5400),
    ("  IN 2 HOURS  ", NOW + 7200),  # any case, spaces around
    ("in 2hours", NOW + 7200),
    ("in\t10\tminutes", NOW + 600),
    ("in 0 seconds", NOW),
    ("in 366 days", NOW + 366 * DAY),  # the furthest ahead
    # ISO 8601: without an offset the user's local time
    ("2026-05-28T22:30:00", NOW + 200),
    (" 2026-05-28T20:30:00+00:00 ", NOW + 200),
    # up to a second in the past is "now" (the model's clock and ours)
    ("2026-05-28T22:26:39", NOW),
    ("2026-05-28T20:26:39.500+00:00", NOW),
])
def test_due_at(when: str, due: float) -> None:
    assert scheduling.due_at(when, NOW, "Europe/Berlin") == due


NOT_A_TIME = ("is not a time: use ISO 8601 like 2026-05-01T09:00 (local time, Europe/Berlin) "
              "or a delay like 'in 10 minutes'")


@pytest.mark.parametrize(("when", "message"), [
    ("tomorrow-ish", f"'tomorrow-ish' {NOT_A_TIME}"),
    ("in2hours", f"'in2hours' {NOT_A_TIME}"),  # "in" is a word of its own
    ("in 2 hours later", f"'in 2 hours later' {NOT_A_TIME}"),
    ("in 2 weeks", f"'in 2 weeks' {NOT_A_TIME}"),
    ("in -2 hours", f"'in -2 hours' {NOT_A_TIME}"),
    ("in .5 hours", f"'in .5 hours' {NOT_A_TIME}"),
    ("in x hours", f"'in x hours' {NOT_A_TIME}"),  # digits only
    ("in 2.x hours", f"'in 2.x hours' {NOT_A_TIME}"),
    ("in 2_0 hours", f"'in 2_0 hours' {NOT_A_TIME}"),
    ("in 2.5_0 hours", f"'in 2.5_0 hours' {NOT_A_TIME}"),
    ("in 2. hours", f"'in 2. hours' {NOT_A_TIME}"),
    ("2026-05-28T22:26:38", "2026-05-28T22:26:38+02:00 is in the past"),
    ("2026-05-28T20:26:38.500+00:00", "2026-05-28T22:26:38+02:00 is in the past"),
    ("in 366.01 days", "at most 366 days ahead"),
    ("in 31622401 seconds", "at most 366 days ahead"),  # 366 days and a second
])
def test_bad_when_in_full(when: str, message: str) -> None:
    with pytest.raises(BadWhen) as info:
        scheduling.due_at(when, NOW, "Europe/Berlin")
    assert str(info.value) == message


def test_bad_when_is_a_value_error_and_the_limit_a_year() -> None:
    assert issubclass(BadWhen, ValueError)
    assert timedelta(days=366) == scheduling.MAX_AHEAD


def test_times_as_the_user_reads_them() -> None:
    assert scheduling.local_time(NOW, "Europe/Berlin") == "2026-05-28 22:26:40 (Europe/Berlin)"
    assert scheduling.local_time(NOW, "UTC") == "2026-05-28 20:26:40 (UTC)"
    assert scheduling.utc_day_of(NOW) == "2026-05-28"
    assert scheduling.utc_day_of(NOW + 3 * 3600 + 33 * 60 + 19) == "2026-05-28"  # 23:59:59
    assert scheduling.utc_day_of(NOW + 3 * 3600 + 33 * 60 + 20) == "2026-05-29"


@pytest.mark.parametrize(("pending", "today", "why"), [
    (0, 0, None),
    (19, 49, None),
    (20, 0, "this chat already has 20 scheduled messages (at most 20); cancel one first"),
    (21, 60, "this chat already has 21 scheduled messages (at most 20); cancel one first"),
    (0, 50, "50 messages were scheduled today (at most 50 a day)"),
    (19, 51, "51 messages were scheduled today (at most 50 a day)"),
])
def test_refusal_in_full(pending: int, today: int, why: str | None) -> None:
    assert scheduling.refusal(pending, today, per_chat=20, per_day=50) == why
