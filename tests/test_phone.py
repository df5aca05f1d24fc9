"""One phone-number rule (wabridge.phone) at every place a number comes in."""

from __future__ import annotations

import pytest

from agent import policy
from controller import admin
from controller.plane import parse_account
from controller.reconcile import Claim, SetError, for_doc
from wabridge.errors import PolicyError
from wabridge.phone import is_phone, normalize_phone
from wabridge.status import DocStatus

# (as typed, the digits kept or None). 7 digits is the shortest number in service (+683 Niue),
# 15 the E.164 maximum.
TABLE = [
    ("4915112345678", "4915112345678"),
    ("+49 151 1234-5678", "4915112345678"),
    ("(030) 1234567", "0301234567"),
    ("6834002", "6834002"),
    ("1" * 15, "1" * 15),
    ("123456", None),
    ("1" * 16, None),
    ("49151abc", None),
    ("+", None),
    ("", None),
    ("\u0664\u0669\u0661\u0665\u0661\u0662\u0663\u0664", None),  # Arabic-Indic digits
    ("\u00b2\u00b3\u00b2\u00b3\u00b2\u00b3\u00b2\u00b3", None),  # superscripts
]


@pytest.mark.parametrize(("raw", "expected"), TABLE)
def test_normalize_phone(raw: str, expected: str | None) -> None:
    assert normalize_phone(raw) == expected
    assert is_phone(raw) == (expected == raw)


def test_is_phone_refuses_what_is_not_a_string() -> None:
    assert not is_phone(4915112345678)
    assert not is_phone(None)


@pytest.mark.parametrize(("raw", "expected"), TABLE)
def test_every_entry_point_follows_the_one_rule(raw: str, expected: str | None) -> None:
    """The allowlist, the admin socket's ``link`` and a document's ``pairingPhone`` accept
    exactly the numbers :func:`normalize_phone` accepts (6-15 digits and 8-15 digits before)."""
    if expected is None:
        with pytest.raises(PolicyError):
            policy.parse({"allowlist": [raw]})
    else:
        assert policy.parse({"allowlist": [raw]}).allowlist == {expected}
    digits = expected if expected is not None else raw
    if expected is None:
        with pytest.raises(admin.AdminError):
            admin.pairing_phone(digits)
    else:
        assert admin.pairing_phone(digits) == digits
    doc = parse_account("alice", {"status": DocStatus.PAIRING_REQUESTED.value,
                                  "pairingPhone": digits})
    first = for_doc(doc, None)[0]
    assert isinstance(first, Claim if expected is not None else SetError)
