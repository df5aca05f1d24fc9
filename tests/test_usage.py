"""agent.usage: the day's usage is reported when it changed, as absolute totals."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.store import Store
from agent.usage import UsageReporter
from wabridge import protocol

DAY2 = 1_764_892_800.0 + 3600  # 2025-12-05 01:00 UTC


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "agent.db")
    yield s
    s.close()


def test_reports_only_changes_and_never_an_empty_day(store: Store) -> None:
    frames: list[protocol.Frame] = []

    def report(build: Callable[[int], protocol.Frame]) -> None:
        frames.append(build(len(frames) + 1))

    reporter = UsageReporter(store, report, clock=lambda: DAY2)
    reporter()
    assert frames == []  # nothing used on either day
    store.complete_turn("c", [], ["a"], None, cost_delta=0.5, day="2025-12-05",
                        usage={"input_tokens": 7, "output_tokens": 3})
    reporter()
    reporter()  # unchanged: not again
    assert len(frames) == 1
    frame = frames[0]
    assert isinstance(frame, protocol.Usage)
    assert (frame.day, frame.turns, frame.input_tokens, frame.output_tokens, frame.cost_usd) == (
        "2025-12-05", 1, 7, 3, 0.5)
    store.complete_turn("c", [], ["b"], None, cost_delta=0.25, day="2025-12-05",
                        usage={"input_tokens": 1, "output_tokens": 1})
    reporter()
    last = frames[-1]
    assert isinstance(last, protocol.Usage)
    assert (len(frames), last.turns, last.input_tokens, last.cost_usd) == (2, 2, 8, 0.75)
