"""Usage for billing, reported: the user's figures of a UTC day (:meth:`Store.usage_on`) sent
to the controller as a ``usage`` frame whenever they changed. The figures are the day's
absolute totals, so a frame sent twice (or again after a crash) never counts anything twice;
the controller writes them as they are into ``usage/{user}__{day}``."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from agent.budget import utc_day
from agent.store import Store
from wabridge import protocol

Report = Callable[[Callable[[int], protocol.Frame]], None]  # ControllerLink.report


def usage_frame(day: str, u: dict[str, float], seq: int) -> protocol.Frame:
    return protocol.Usage(
        seq=seq, day=day, turns=int(u["turns"]), input_tokens=int(u["input_tokens"]),
        output_tokens=int(u["output_tokens"]),
        cache_creation_tokens=int(u["cache_creation_tokens"]),
        cache_read_tokens=int(u["cache_read_tokens"]), cost_usd=float(u["cost_usd"]),
        messages_in=int(u["messages_in"]), messages_out=int(u["messages_out"]),
        transcription_seconds=float(u["transcription_seconds"]))


class UsageReporter:
    """Called after every turn and with every metrics report (the loop thread)."""

    def __init__(self, store: Store, report: Report,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._report = report
        self._clock = clock
        self._sent: dict[str, dict[str, float]] = {}  # per UTC day: the last reported

    def __call__(self) -> None:
        """Today's figures (and yesterday's final ones) when they changed since the last
        report; a day without any usage is not reported."""
        now = self._clock()
        for day in dict.fromkeys((utc_day(now - 86_400), utc_day(now))):
            usage = self._store.usage_on(day)
            if self._sent.get(day) == usage or (day not in self._sent
                                                and not any(usage.values())):
                continue
            self._sent[day] = usage
            self._report(functools.partial(usage_frame, day, usage))
