"""User ids <-> unit names, checked against systemd's own ``systemd-escape``."""

from __future__ import annotations

import re
import shutil
import string
import subprocess
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from wabridge.errors import UserIdError
from wabridge.units import (
    MAX_INSTANCE,
    MAX_USER_ID,
    escape_instance,
    system_user_name,
    unescape_instance,
    user_of_unit,
    validate_user_id,
    worker_unit,
)

SYSTEMD_ESCAPE = shutil.which("systemd-escape")
needs_systemd_escape = pytest.mark.skipif(SYSTEMD_ESCAPE is None, reason="no systemd-escape")

VALID_IDS = [
    "alice",
    "a-b",
    "a.b",
    ".hidden",
    "...",
    "___",
    "a.",
    "user@example.com",
    "a:b",
    "under_score",
    "MiXeD123",
    "-leading-dash",
    "back\\slash",
    "quote'\"",
    "~!#$%^&*()+={}[]|;<>,?`",
    "x" * MAX_USER_ID,
    "0",
]

INVALID_IDS = [
    ("", "empty"),
    ("x" * (MAX_USER_ID + 1), "129 characters"),
    ("a b", "' '"),
    ("tab\there", "'\\t'"),
    ("new\nline", "'\\n'"),
    ("caf\u00e9", "'\u00e9'"),
    ("\u65e5\u672c", "'\u65e5'"),
    ("emoji\U0001f600", "'\U0001f600'"),
    ("a/b", "'/'"),
    ("nul\x00", "'\\x00'"),
    ("del\x7f", "'\\x7f'"),
    ("@" * 58, "escapes to 232 characters"),
    # Firestore's reserved document ids: no document, so no worker either
    (".", "cannot name a control-plane document"),
    ("..", "cannot name a control-plane document"),
    ("__name__", "cannot name a control-plane document"),
    ("____", "cannot name a control-plane document"),
]


def reserved(user_id: str) -> bool:
    return user_id in (".", "..") or (len(user_id) >= 4 and user_id.startswith("__")
                                      and user_id.endswith("__"))


def _systemd_escape(*args: str) -> str:
    assert SYSTEMD_ESCAPE is not None
    done = subprocess.run([SYSTEMD_ESCAPE, *args], capture_output=True, text=True, check=True)
    return done.stdout.rstrip("\n")


@needs_systemd_escape
@pytest.mark.parametrize("user_id", VALID_IDS)
def test_escape_matches_systemd_escape(user_id: str) -> None:
    assert escape_instance(user_id) == _systemd_escape("--", user_id)


@needs_systemd_escape
@pytest.mark.parametrize("user_id", VALID_IDS)
def test_unescape_matches_systemd_escape(user_id: str) -> None:
    instance = escape_instance(user_id)
    assert unescape_instance(instance) == user_id
    assert _systemd_escape("--unescape", "--", instance) == user_id


@needs_systemd_escape
@pytest.mark.parametrize("user_id", VALID_IDS)
def test_worker_unit_matches_systemd_template(user_id: str) -> None:
    expected = _systemd_escape("--template=wabridge-worker@.service", "--", user_id)
    assert worker_unit(user_id) == expected


@needs_systemd_escape
def test_longest_escaped_id_is_still_a_unit_name_for_systemd() -> None:
    longest = "@" * (MAX_INSTANCE // 4)
    assert worker_unit(longest) == _systemd_escape(
        "--template=wabridge-worker@.service", "--", longest
    )
    assert len(worker_unit(longest)) <= 255
    # one more and systemd itself refuses: so must we
    too_long = longest + "@"
    with pytest.raises(subprocess.CalledProcessError):
        _systemd_escape("--template=wabridge-worker@.service", "--", too_long)
    with pytest.raises(UserIdError):
        worker_unit(too_long)


def test_known_escapes() -> None:
    assert escape_instance("a-b") == "a\\x2db"
    assert escape_instance(".x") == "\\x2ex"
    assert escape_instance("x.") == "x."
    assert escape_instance("a@b") == "a\\x40b"
    assert escape_instance("a:b") == "a:b"


@pytest.mark.parametrize(("user_id", "named"), INVALID_IDS)
def test_invalid_ids_are_rejected_with_the_problem_named(user_id: str, named: str) -> None:
    with pytest.raises(UserIdError) as info:
        validate_user_id(user_id)
    assert named in str(info.value)
    with pytest.raises(UserIdError):
        escape_instance(user_id)
    with pytest.raises(UserIdError):
        worker_unit(user_id)
    with pytest.raises(UserIdError):
        system_user_name(user_id)


@pytest.mark.parametrize("value", [None, 5, b"alice", ["alice"]])
def test_non_strings_are_rejected(value: object) -> None:
    with pytest.raises(UserIdError, match="must be a string"):
        validate_user_id(value)


def test_128_accepted_129_rejected() -> None:
    assert validate_user_id("a" * 128) == "a" * 128
    with pytest.raises(UserIdError, match="129 characters long; at most 128"):
        validate_user_id("a" * 129)


@pytest.mark.parametrize(
    "instance",
    ["a\\x", "a\\x4", "a\\q41", "\\", "a\\xzz", "a\\x-1", "a-b", "\\x2f", "\\x20", "\\xc3\\xa9"],
)
def test_unescape_rejects_malformed_or_invalid(instance: str) -> None:
    with pytest.raises(UserIdError):
        unescape_instance(instance)


_PRINTABLE_ID_CHARS = "".join(c for c in string.printable if not c.isspace() and c != "/")


@settings(max_examples=300)
@given(st.text(alphabet=_PRINTABLE_ID_CHARS, min_size=1, max_size=MAX_USER_ID))
def test_round_trip_over_printable_ascii(user_id: str) -> None:
    assume(not reserved(user_id))
    try:
        instance = escape_instance(user_id)
    except UserIdError as exc:
        # only the unit-name budget may refuse an otherwise fine id
        assert "escapes to" in str(exc)
        return
    assert len(instance) <= MAX_INSTANCE
    assert unescape_instance(instance) == user_id
    assert user_of_unit(worker_unit(user_id)) == user_id
    assert re.fullmatch(r"[A-Za-z0-9:_.\\]+", instance)
    assert not instance.startswith(".")


@settings(max_examples=100)
@given(st.text(alphabet=_PRINTABLE_ID_CHARS, min_size=1, max_size=40))
def test_round_trip_agrees_with_systemd_escape(user_id: str) -> None:
    if SYSTEMD_ESCAPE is None:
        pytest.skip("no systemd-escape")
    assume(not reserved(user_id))
    assert escape_instance(user_id) == _systemd_escape("--", user_id)


# --- worker_unit / user_of_unit ---------------------------------------------------------


def test_worker_unit_of_simple_ids_reads_naturally() -> None:
    assert worker_unit("alice") == "wabridge-worker@alice.service"
    assert worker_unit("a-b") == "wabridge-worker@a\\x2db.service"


@pytest.mark.parametrize(
    ("unit", "user"),
    [
        ("wabridge-worker@alice.service", "alice"),
        ("wabridge-worker@a\\x2db.service", "a-b"),
        ("wabridge-worker@\\x2ehidden.service", ".hidden"),
        ("wabridge-worker@.service", None),  # the template itself
        ("wabridge-worker.service", None),
        ("wabridge-controller.service", None),
        ("wabridge-worker@alice.socket", None),
        ("other@alice.service", None),
        ("wabridge-worker@a-b.service", None),  # '-' means '/', which no id contains
        ("wabridge-worker@bad\\x.service", None),
        ("wabridge-worker@sp\\x20ace.service", None),
        # non-canonical spellings of a valid id are a different unit: they name nobody
        ("wabridge-worker@a\\x61.service", None),
        ("wabridge-worker@\\x2D.service", None),
        ("wabridge-worker@.hidden.service", None),
    ],
)
def test_user_of_unit(unit: str, user: str | None) -> None:
    assert user_of_unit(unit) == user


# --- system_user_name --------------------------------------------------------------------

UNIX_NAME = re.compile(r"^[a-z_][a-z0-9_-]*$")


@pytest.mark.parametrize("user_id", [*VALID_IDS, "@@@", "...", "UPPER", "x" * 128])
def test_system_user_name_is_a_short_valid_unix_name(user_id: str) -> None:
    name = system_user_name(user_id)
    assert len(name) <= 31
    assert UNIX_NAME.match(name), name
    assert system_user_name(user_id) == name  # stable


def test_system_user_name_is_stable_across_processes() -> None:
    code = "from wabridge.units import system_user_name as s; print(s('alice@example.com'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == system_user_name("alice@example.com")


def test_system_user_name_distinguishes_ids_sharing_a_16_char_prefix() -> None:
    a = "abcdefghijklmnop-one"
    b = "abcdefghijklmnop-two"
    c = "ABCDEFGHIJKLMNOP-one"  # differs only in case
    names = {system_user_name(x) for x in (a, b, c)}
    assert len(names) == 3
    assert all(n.startswith("wab-abcdefghijklmnop-") for n in names)


@settings(max_examples=300)
@given(
    st.lists(
        st.text(alphabet=_PRINTABLE_ID_CHARS, min_size=1, max_size=50),
        min_size=2,
        max_size=2,
        unique=True,
    )
)
def test_system_user_names_are_valid_and_distinct(ids: list[str]) -> None:
    assume(not any(reserved(i) for i in ids))
    names = [system_user_name(i) for i in ids]
    for name in names:
        assert len(name) <= 31
        assert UNIX_NAME.match(name), name
    assert names[0] != names[1]
