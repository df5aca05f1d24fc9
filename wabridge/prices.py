"""Model prices for the ``api`` engine's cost accounting (``claude.api_prices``), parsed once
at the boundary; :func:`agent.budget.usage_cost` applies them."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    """USD per million tokens of one model (Anthropic's list prices: cache writes cost 1.25x
    the input price, cache reads 0.1x)."""

    input: float
    output: float

    @property
    def cache_write(self) -> float:
        return self.input * 1.25

    @property
    def cache_read(self) -> float:
        return self.input * 0.1


def parse_prices(text: str) -> dict[str, Price]:
    """``claude.api_prices``: ``model=input/output`` pairs separated by commas, in USD per
    million tokens (``claude-sonnet-4-5=3/15``). Raises ValueError naming the bad entry."""
    out: dict[str, Price] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        model, sep, rates = entry.partition("=")
        parts = rates.split("/")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if (not sep or not model.strip() or len(values) != 2
                or not all(math.isfinite(v) and v >= 0 for v in values)):
            raise ValueError(f"{entry!r} is not model=input/output (USD per million tokens)")
        out[model.strip()] = Price(values[0], values[1])
    return out
