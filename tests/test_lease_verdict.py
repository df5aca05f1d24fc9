"""When a fleet worker gives its account up (agent/lease_verdict.py), and how it learns its
lease from the unit's environment (wabridge/units.py)."""

from __future__ import annotations

import pytest

from agent.lease_verdict import Verdict, lease_verdict
from wabridge import units


@pytest.mark.parametrize(("now", "last_ok", "lease", "margin", "verdict"), [
    (100.0, 100.0, 30.0, 5.0, Verdict.KEEP),    # just renewed
    (124.9, 100.0, 30.0, 5.0, Verdict.KEEP),    # just inside lease - margin
    (125.0, 100.0, 30.0, 5.0, Verdict.STOP),    # exactly lease - margin: stop
    (129.0, 100.0, 30.0, 5.0, Verdict.STOP),    # before expiry, inside the margin
    (400.0, 100.0, 30.0, 5.0, Verdict.STOP),    # a frozen host, thawed
    (10.5, 10.0, 3.0, 1.0, Verdict.KEEP),       # short leases (tests)
    (12.0, 10.0, 3.0, 1.0, Verdict.STOP),
    (5.0, float("-inf"), 30.0, 5.0, Verdict.STOP),  # never renewed: owns nothing
    (99.0, 100.0, 30.0, 5.0, Verdict.KEEP),     # a renewal sent "later" than now (clock read
                                                # order): still ours
])
def test_lease_verdict(now: float, last_ok: float, lease: float, margin: float,
                       verdict: Verdict) -> None:
    assert lease_verdict(now, last_ok, lease, margin) is verdict


def test_the_lease_travels_through_the_drop_in_environment() -> None:
    env = units.lease_environment("host-a", 7)
    assert env == {"WABRIDGE_HOST_ID": "host-a", "WABRIDGE_LEASE_EPOCH": "7"}
    assert units.lease_from_environment(env) == ("host-a", 7)


@pytest.mark.parametrize("env", [
    {},
    {"WABRIDGE_HOST_ID": "host-a"},
    {"WABRIDGE_LEASE_EPOCH": "3"},
    {"WABRIDGE_HOST_ID": "", "WABRIDGE_LEASE_EPOCH": "3"},
    {"WABRIDGE_HOST_ID": "host-a", "WABRIDGE_LEASE_EPOCH": "-1"},
    {"WABRIDGE_HOST_ID": "host-a", "WABRIDGE_LEASE_EPOCH": "three"},
])
def test_no_lease_without_both_values(env: dict[str, str]) -> None:
    assert units.lease_from_environment(env) is None
