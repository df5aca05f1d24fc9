"""wabridge.units: the boundaries mutation testing found open (issue 20), written out."""

from __future__ import annotations

import pytest

from wabridge.errors import UserIdError
from wabridge.units import (
    DYNAMIC_UIDS,
    MAX_INSTANCE,
    escape_instance,
    system_user_name,
    unescape_instance,
    user_of_unit,
    validate_user_id,
    worker_unit,
)


def test_the_instance_budget_is_231_characters() -> None:
    # 255 (systemd's UNIT_NAME_MAX) - len("wabridge-worker@") - len(".service")
    assert MAX_INSTANCE == 231


def test_an_id_escaping_to_exactly_231_characters_is_accepted() -> None:
    user_id = "@" * 57 + "abc"  # 57 * 4 + 3 = 231
    assert validate_user_id(user_id) == user_id
    assert len(escape_instance(user_id)) == 231
    assert len(worker_unit(user_id)) == 255


def test_one_more_is_refused_with_the_whole_message() -> None:
    user_id = "@" * 57 + "abcd"  # 232
    with pytest.raises(UserIdError) as info:
        validate_user_id(user_id)
    assert str(info.value) == (
        f"user id {user_id!r} escapes to 232 characters; a unit name allows 231 (use fewer "
        "characters other than letters, digits, '_', '.' and ':')")


@pytest.mark.parametrize(("user_id", "message"), [
    (5, "user id must be a string, got int"),
    ("", "user id is empty"),
    ("x" * 129, "user id is 129 characters long; at most 128"),
    ("a b\tc", "user id 'a b\\tc' contains '\\t', ' ' (use printable ASCII without spaces)"),
    ("a/b", "user id 'a/b' contains '/'"),
])
def test_refusals_in_full(user_id: object, message: str) -> None:
    with pytest.raises(UserIdError) as info:
        validate_user_id(user_id)
    assert str(info.value) == message


@pytest.mark.parametrize(("user_id", "instance"), [
    (".a.b", "\\x2ea.b"),  # a leading dot is escaped, the others are kept
    ("a:b_c.d", "a:b_c.d"),
    ("A-Z", "A\\x2dZ"),
    ("~", "\\x7e"),
    ("\\", "\\x5c"),
])
def test_escapes(user_id: str, instance: str) -> None:
    assert escape_instance(user_id) == instance
    assert unescape_instance(instance) == user_id


@pytest.mark.parametrize("instance", ["a\\", "a\\x", "a\\x4", "a\\y41", "a\\xzz"])
def test_malformed_escapes_name_the_instance(instance: str) -> None:
    with pytest.raises(UserIdError) as info:
        unescape_instance(instance)
    assert str(info.value) == f"malformed escape in unit instance {instance!r}"


def test_an_escape_at_the_very_end_is_read() -> None:
    assert unescape_instance("ab\\x41") == "abA"
    assert user_of_unit("wabridge-worker@ab\\x7e.service") == "ab~"


@pytest.mark.parametrize(("user_id", "name"), [
    # no letter or digit in the id: the fallback is the hash alone
    ("@@", "wab-3330e5ba53"),
    ("-", "wab-3973e022e9"),
    # letters and digits, lower-cased, at most 16 of them
    ("Alice.Smith_99", "wab-alicesmith99-694032b0e7"),
    ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "wab-abcdefghijklmnop-d6ec6898de"),
    ("x", "wab-x-2d711642b7"),
])
def test_system_user_name_written_out(user_id: str, name: str) -> None:
    assert system_user_name(user_id) == name


def test_system_user_name_refuses_an_invalid_id() -> None:
    with pytest.raises(UserIdError):
        system_user_name("a b")


def test_a_dash_unescapes_to_a_slash_which_no_id_has() -> None:
    with pytest.raises(UserIdError) as info:
        unescape_instance("a-b")
    assert str(info.value) == "user id 'a/b' contains '/'"


@pytest.mark.parametrize(("uid", "dynamic"), [
    (61183, False), (61184, True),  # DYNAMIC_UID_MIN: 0xef00
    (65519, True), (65520, False),  # DYNAMIC_UID_MAX: 0xffef
    (0, False), (1000, False),
])
def test_systemds_dynamic_uid_range(uid: int, dynamic: bool) -> None:
    """Who may talk to the admin socket and whose processes count as workers: the UIDs
    systemd hands out for ``DynamicUser=`` (src/basic/uid-range.h, 0xef00..0xffef)."""
    assert (uid in DYNAMIC_UIDS) is dynamic


@pytest.mark.parametrize("user_id", ["__abc", "abc__", "__", "___", "a__b"])
def test_ids_with_underscores_that_firestore_allows(user_id: str) -> None:
    assert validate_user_id(user_id) == user_id


def test_an_id_like_a_firestore_reserved_one_in_full() -> None:
    with pytest.raises(UserIdError) as info:
        validate_user_id("__ab__")
    assert (str(info.value), info.value.explanation) == (
        "user id '__ab__' cannot name a control-plane document ('.', '..' and ids like '__x__' "
        "are reserved)", "'.', '..' and ids like '__x__' are reserved")
