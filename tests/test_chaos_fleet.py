"""``make chaos-fleet``'s short mode, in CI: a host killed and a host frozen under load on a
fleet of three; every figure that must read zero reads zero and failover stays within the
target (see ``bench/chaos_fleet.py``)."""

from __future__ import annotations

from typing import Any

import pytest
from harness.systemd_ns import available

from bench import chaos_fleet

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]


@pytest.mark.timeout(400)
def test_short_fleet_chaos_loses_duplicates_and_double_connects_nothing(
        firestore_emulator: str, postgres: Any, record_property: Any) -> None:
    results = chaos_fleet.run(chaos_fleet.Options.short_mode(out=None),
                              emulator_host=firestore_emulator, postgres=postgres)
    figures = results["figures"]
    record_property("chaos_fleet", figures)
    assert [e["kind"] for e in results["events"]].count("kill") == 1
    assert [e["kind"] for e in results["events"]].count("freeze") == 1
    assert figures["failovers"] >= 2 and figures["messages"] > 0
    assert results["failed"] == [], chaos_fleet.table(results) + f"\n{results['details']}"


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([], 0.5, None), ([3.0], 0.99, 3.0), ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
    ([float(n) for n in range(1, 101)], 0.99, 99.0), ([5.0, 1.0], 1.0, 5.0),
])
def test_percentile_is_the_nearest_rank(values: list[float], q: float,
                                        expected: float | None) -> None:
    assert chaos_fleet.percentile(values, q) == expected
