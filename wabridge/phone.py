"""Phone numbers as wabridge accepts them: digits with country code, no ``+``.

One rule for every place a number comes in (a user's allowlist, ``wabridgectl link
--pairing-code``, the admin socket's ``link``, a document's ``pairingPhone``): E.164 caps a
full international number at 15 digits, country code included, and sets no minimum; the
shortest numbers in service have 7 digits (a 3-digit country code and 4-digit subscriber
numbers, as in Niue, +683). Anything shorter is a typo or a local number without its country
code, which WhatsApp would not find.
"""

from __future__ import annotations

import re
from typing import TypeGuard

MIN_DIGITS = 7
MAX_DIGITS = 15
#: The rule in words, for error messages.
PHONE_RULE = f"digits with country code, {MIN_DIGITS}-{MAX_DIGITS} digits, no '+'"

_SEPARATORS = re.compile(r"[\s\-()]")


def is_phone(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a phone number as stored: ASCII digits only, 7-15 of them."""
    return (isinstance(value, str) and value.isascii() and value.isdigit()
            and MIN_DIGITS <= len(value) <= MAX_DIGITS)


def normalize_phone(value: str) -> str | None:
    """A number as people type it (``+49 151 2345-678``, ``(49) 151...``) as its digits, or
    None when it is not a phone number."""
    digits = _SEPARATORS.sub("", value).removeprefix("+")
    return digits if is_phone(digits) else None
