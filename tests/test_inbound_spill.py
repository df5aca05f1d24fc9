"""agent.inbound_spill: acknowledged messages still held at a stop survive it on disk, in
order, one spill after another; a spill that fails leaves the file as it was; a file that
does not parse is named precisely and set aside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import inbound_spill
from agent.inbound_spill import SpillUnreadable
from agent.store import encode_message
from agent.whatsapp.events import Audio, Image, IncomingMessage
from wabridge import atomic_write


def _msg(n: int, **kw: object) -> IncomingMessage:
    return IncomingMessage(wa_id=f"W{n}", chat_id="4915@s.whatsapp.net",
                           sender="4915@s.whatsapp.net", text=f"m{n}", timestamp=float(n),
                           **kw)  # type: ignore[arg-type]


RICH = _msg(9, sender_name="Ana", is_group=True, mentioned=True, quoted_text="earlier\nline",
            images=(Image("image/jpeg", b"\xff\xd8\x00\n", "a caption"),),
            expiration=86400, audio=Audio("audio/ogg", b"OggS\x00", 3.5, voice=True),
            unsupported_media="voice")


@pytest.mark.parametrize("messages", [[_msg(1)], [_msg(1), _msg(2), _msg(3)], [RICH]],
                         ids=["one", "three in order", "every field"])
def test_round_trip(tmp_path: Path, messages: list[IncomingMessage]) -> None:
    path = tmp_path / inbound_spill.SPILL_FILE
    inbound_spill.spill(path, messages)
    assert inbound_spill.read(path) == messages
    assert path.stat().st_mode & 0o777 == 0o600  # message texts: the worker's alone


def test_no_file_is_nothing_to_replay(tmp_path: Path) -> None:
    assert inbound_spill.read(tmp_path / inbound_spill.SPILL_FILE) == []


def test_a_second_spill_comes_after_the_first(tmp_path: Path) -> None:
    """Stopped twice during one outage: the second stop must not overwrite the first."""
    path = tmp_path / inbound_spill.SPILL_FILE
    inbound_spill.spill(path, [_msg(1), _msg(2)])
    inbound_spill.spill(path, [_msg(3)])
    assert [m.wa_id for m in inbound_spill.read(path)] == ["W1", "W2", "W3"]


def test_a_spill_after_a_file_without_its_last_newline_keeps_both(tmp_path: Path) -> None:
    path = tmp_path / inbound_spill.SPILL_FILE
    path.write_text(encode_message(_msg(1)))  # (written by hand)
    inbound_spill.spill(path, [_msg(2)])
    assert [m.wa_id for m in inbound_spill.read(path)] == ["W1", "W2"]


@pytest.mark.parametrize("failing", ["write", "fsync", "rename"])
def test_a_spill_that_fails_leaves_the_earlier_one_whole_and_no_partial_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    path = tmp_path / inbound_spill.SPILL_FILE
    inbound_spill.spill(path, [_msg(1)])
    before = path.read_bytes()

    def full(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    def full_after_open(fd: int, *_a: object) -> None:
        os.close(fd)
        full()

    if failing == "write":
        monkeypatch.setattr(atomic_write.os, "fdopen", full_after_open)
    elif failing == "fsync":
        monkeypatch.setattr(atomic_write.os, "fsync", full)
    else:
        monkeypatch.setattr(Path, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        inbound_spill.spill(path, [_msg(2), _msg(3)])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [inbound_spill.SPILL_FILE]


GOOD = encode_message(_msg(1))


@pytest.mark.parametrize(("content", "named"), [
    (b"{not json\n", "line 1: not JSON"),
    (f"{GOOD}\n{GOOD[:-5]}\n".encode(), "line 2: not JSON"),
    (GOOD.replace('"text"', '"colour": "red", "text"').encode(),
     "line 1: not a message (TypeError: IncomingMessage.__init__() got an unexpected "
     "keyword argument 'colour')"),
    (GOOD.replace('"text": "m1", ', "").encode(),
     "line 1: not a message (TypeError: IncomingMessage.__init__() missing 1 required "
     "positional argument: 'text')"),
    (b"[1, 2]\n", "line 1: not a message (a JSON list, not an object)"),
    (GOOD.replace('"wa_id": "W1"', '"wa_id": 7').encode(), "line 1: not a message (wrong wa_id)"),
    (GOOD.replace('"wa_id": "W1"', '"wa_id": ""').encode(),
     "line 1: not a message (wrong empty wa_id or chat_id)"),
    (GOOD.replace('"timestamp": 1.0', '"timestamp": "noon"').encode(),
     "line 1: not a message (wrong timestamp)"),
    (GOOD.replace('"images": []', '"images": [{"mime_type": "image/png", "data": "zz"}]'
                  ).encode(), "line 1: not a message (ValueError: non-hexadecimal"),
    (b"\xff\xfe\n", "can't decode byte 0xff"),
], ids=["not json", "torn second line", "unknown field", "missing field", "not an object",
        "wa_id not a string", "empty wa_id", "timestamp not a number", "image not hex",
        "not utf-8"])
def test_an_unreadable_spill_names_the_file_and_what_is_wrong(
        tmp_path: Path, content: bytes, named: str) -> None:
    path = tmp_path / inbound_spill.SPILL_FILE
    path.write_bytes(content)
    with pytest.raises(SpillUnreadable) as caught:
        inbound_spill.read(path)
    assert str(caught.value).startswith(str(path))
    assert named in str(caught.value)
    assert caught.value.code == "spill_unreadable"


def test_set_aside_never_overwrites_an_earlier_bad_file(tmp_path: Path) -> None:
    path = tmp_path / inbound_spill.SPILL_FILE
    path.write_text("first\n")
    assert inbound_spill.set_aside(path).name == "inbound-spill.jsonl.bad"
    path.write_text("second\n")
    assert inbound_spill.set_aside(path).name == "inbound-spill.jsonl.2.bad"
    assert not path.exists()
    assert (tmp_path / "inbound-spill.jsonl.bad").read_text() == "first\n"
    assert (tmp_path / "inbound-spill.jsonl.2.bad").read_text() == "second\n"
