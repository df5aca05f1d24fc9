"""The worker <-> controller wire format."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wabridge import protocol
from wabridge.errors import ProtocolError
from wabridge.protocol import (
    MAX_FRAME,
    VERSION,
    Ack,
    Command,
    Error,
    Hello,
    MessageEvent,
    Metrics,
    PairingCode,
    Qr,
    Settings,
    State,
    Welcome,
    decode,
    encode,
)
from wabridge.status import WorkerState

EVERY_FRAME: list[protocol.Frame] = [
    Hello(user_id="alice", pid=1234, version="0.1.0"),
    State(seq=1, state=WorkerState.CONNECTED, detail="connected as +4915", phone="4915",
          push_name="Alice \u00e9\U0001f600"),
    State(seq=2, state=WorkerState.WAITING_QR),
    Qr(seq=3, code="2@abc,def", data_url="data:image/png;base64,iVBOR"),
    PairingCode(seq=4, code="ABCD-EFGH"),
    MessageEvent(seq=5, event_id="in:3EB0AA", chat_id="4915@s.whatsapp.net", direction="in",
                 sender="4915@s.whatsapp.net", text="hello\nworld \u65e5\u672c", ts=1.5),
    MessageEvent(seq=6, event_id="out:3EB0BB", chat_id="c", direction="out", sender="me",
                 text="", ts=1700000000),
    Metrics(seq=7, chats=2, claude_processes=1, turns=3, messages_in=4, messages_out=5,
            input_tokens=6, output_tokens=7, cost_today_usd=0.25),
    Metrics(seq=12, chats=2, claude_processes=1, turns=3, messages_in=4, messages_out=5,
            input_tokens=6, output_tokens=7, cost_today_usd=0.25, undecryptable=1,
            stream_errors=2, replies_failed=3, uncertain_replies=4),
    protocol.Summary(seq=10, chat_id="4915@s.whatsapp.net", number=2, text="They like tea."),
    protocol.Problem(seq=11, code="bad_setting", message="settings.reply_to: 'x' is not ..."),
    protocol.ProblemCleared(seq=12, code="bad_setting"),
    Ack(seq=8),
    Error(code="bad_frame", message="nope"),
    Error(code="bad_frame", message="nope", seq=9),
    Welcome(settings={"x": 1, "nested": {"a": [1, 2]}}),
    Welcome(),
    Settings(settings={"model": "m"}),
    Command(name="pair_phone", args={"phone": "4915123456"}),
    Command(name="reset_chat", args={"chat_id": "c"}),
    protocol.Slot(chat_id="4915@s.whatsapp.net", state="want"),
    protocol.Slot(chat_id="c", state="gone"),
    protocol.SlotOrder(chat_id="c", order="grant"),
    protocol.SlotOrder(chat_id="c", order="reclaim"),
    Command(name="pause_chat", args={"chat_id": "c", "minutes": "30"}),
    Command(name="resume_chat", args={"chat_id": "c"}),
    protocol.Usage(seq=13, day="2026-12-04", turns=2, input_tokens=10, output_tokens=20,
                   cache_creation_tokens=3, cache_read_tokens=4, cost_usd=0.5, messages_in=5,
                   messages_out=6, transcription_seconds=7.5),
]


@pytest.mark.parametrize("day", ["2026-12-4", "today", ""])
def test_usage_frame_day_must_be_a_date(day: str) -> None:
    line = (b'{"v":1,"type":"usage","seq":1,"day":"' + day.encode() + b'","turns":0,'
            b'"input_tokens":0,"output_tokens":0,"cache_creation_tokens":0,'
            b'"cache_read_tokens":0,"cost_usd":0,"messages_in":0,"messages_out":0}\n')
    with pytest.raises(ProtocolError, match="YYYY-MM-DD"):
        protocol.decode(line)


@pytest.mark.parametrize("frame", EVERY_FRAME, ids=lambda f: type(f).__name__)
def test_round_trip(frame: protocol.Frame) -> None:
    data = encode(frame)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1  # one frame, one line
    body = json.loads(data)
    assert body["v"] == VERSION
    assert body["type"] == frame.TYPE
    back = decode(data)
    assert back == frame
    assert type(back) is type(frame)


def test_every_frame_type_is_covered() -> None:
    assert {type(f) for f in EVERY_FRAME} == set(protocol._TYPES.values())


def test_state_decodes_to_the_enum() -> None:
    frame = decode(b'{"v":1,"type":"state","seq":1,"state":"logged_out"}')
    assert isinstance(frame, State)
    assert frame.state is WorkerState.LOGGED_OUT


def test_unknown_extra_fields_are_ignored() -> None:
    assert decode(b'{"v":1,"type":"ack","seq":3,"future":true}') == Ack(seq=3)


def test_metrics_from_an_older_worker_count_zero_losses() -> None:
    line = (b'{"v":1,"type":"metrics","seq":1,"chats":0,"claude_processes":0,"turns":0,'
            b'"messages_in":0,"messages_out":0,"input_tokens":0,"output_tokens":0,'
            b'"cost_today_usd":0}')
    frame = decode(line)
    assert isinstance(frame, Metrics)
    assert (frame.undecryptable, frame.stream_errors, frame.replies_failed,
            frame.uncertain_replies) == (0, 0, 0, 0)


def test_encode_refuses_oversize_frames() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(MessageEvent(seq=1, event_id="e", chat_id="c", direction="in", sender="s",
                            text="x" * MAX_FRAME, ts=0.0))


def test_lone_surrogate_survives_a_round_trip() -> None:
    # json.loads turns "\ud800" into a lone surrogate; re-encoding it must not crash
    frame = decode(b'{"v":1,"type":"pairing_code","seq":1,"code":"a\\ud800b"}')
    assert decode(encode(frame)) == frame


def _line(**body: Any) -> bytes:
    return json.dumps(body).encode()


_MSG = {"v": 1, "type": "message", "seq": 1, "event_id": "e", "chat_id": "c",
        "direction": "in", "sender": "s", "text": "t", "ts": 1.0}

MALFORMED: list[tuple[str, bytes, str]] = [
    ("not json", b"hello", "not JSON"),
    ("truncated json", b'{"v":1,', "not JSON"),
    ("empty line", b"\n", "not JSON"),
    ("bad utf-8", b'{"v":1,"type":"\xff"}', "not JSON"),
    ("deep nesting", b"[" * 100_000, "not JSON"),
    ("huge integer", b'{"v":1,"type":"ack","seq":' + b"1" * 5000 + b"}", "not JSON"),
    ("array", b"[1,2]", "must be a JSON object, got list"),
    ("string", b'"ack"', "must be a JSON object, got str"),
    ("null", b"null", "must be a JSON object, got NoneType"),
    ("no version", _line(type="ack", seq=1), "unsupported protocol version None"),
    ("wrong version", _line(v=2, type="ack", seq=1), "unsupported protocol version 2"),
    ("version as string", _line(v="1", type="ack", seq=1), "unsupported protocol version '1'"),
    ("version as bool", _line(v=True, type="ack", seq=1), "unsupported protocol version True"),
    ("version as float", _line(v=1.0, type="ack", seq=1), "unsupported protocol version 1.0"),
    ("no type", _line(v=1, seq=1), "unknown frame type None"),
    ("unknown type", _line(v=1, type="shutdown"), "unknown frame type 'shutdown'"),
    ("type not a string", _line(v=1, type=["ack"]), "unknown frame type ['ack']"),
    ("missing field", _line(v=1, type="ack"), "ack frame lacks field 'seq'"),
    ("missing state", _line(v=1, type="state", seq=1), "state frame lacks field 'state'"),
    ("missing hello pid", _line(v=1, type="hello", user_id="a", version="1"),
     "hello frame lacks field 'pid'"),
    ("seq as string", _line(v=1, type="ack", seq="1"), "field 'seq' must be int, got str"),
    ("seq as float", _line(v=1, type="ack", seq=1.5), "field 'seq' must be int, got float"),
    ("seq as bool", _line(v=1, type="ack", seq=True), "field 'seq' must be int, got bool"),
    ("seq null on ack", _line(v=1, type="ack", seq=None), "field 'seq' must be int, got NoneType"),
    ("pid as bool", _line(v=1, type="hello", user_id="a", pid=False, version="1"),
     "field 'pid' must be int, got bool"),
    ("metrics count as bool",
     _line(v=1, type="metrics", seq=1, chats=True, claude_processes=0, turns=0, messages_in=0,
           messages_out=0, input_tokens=0, output_tokens=0, cost_today_usd=0),
     "field 'chats' must be int, got bool"),
    ("cost as bool",
     _line(v=1, type="metrics", seq=1, chats=0, claude_processes=0, turns=0, messages_in=0,
           messages_out=0, input_tokens=0, output_tokens=0, cost_today_usd=True),
     "field 'cost_today_usd' must be int, got bool"),
    ("text as number", _line(**{**_MSG, "text": 5}), "field 'text' must be str, got int"),
    ("ts as string", _line(**{**_MSG, "ts": "now"}), "field 'ts' must be int, got str"),
    ("bad direction", _line(**{**_MSG, "direction": "sideways"}), "direction must be 'in' or"),
    ("direction as object", _line(**{**_MSG, "direction": {}}), "direction must be 'in' or"),
    ("bad state", _line(v=1, type="state", seq=1, state="asleep"), "unknown state 'asleep'"),
    ("state as list", _line(v=1, type="state", seq=1, state=[1]), "unknown state [1]"),
    ("state as null", _line(v=1, type="state", seq=1, state=None), "unknown state None"),
    ("settings as list", _line(v=1, type="welcome", settings=[]),
     "field 'settings' must be dict, got list"),
    ("unknown command", _line(v=1, type="command", name="reboot"), "unknown command 'reboot'"),
    # no worker ever acted on it: a controller sending it is told, not silently ignored
    ("logout command", _line(v=1, type="command", name="logout"), "unknown command 'logout'"),
    ("command args not strings", _line(v=1, type="command", name="reset_chat", args={"a": 1}),
     "'args' must map names to strings"),
    ("oversize", b'{"v":1,"type":"ack","seq":1,"pad":"' + b"x" * MAX_FRAME + b'"}', "exceeds"),
]


@pytest.mark.parametrize(("line", "problem"), [(m[1], m[2]) for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_frames_name_the_problem(line: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(line)
    assert problem in str(info.value)
    assert info.value.code == "bad_frame"


def test_error_frame_seq_may_be_null() -> None:
    assert decode(_line(v=1, type="error", code="c", message="m", seq=None)) == Error("c", "m")


# --- fuzzing -------------------------------------------------------------------------------

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12,
)
_field_names = sorted({f.name for cls in protocol._TYPES.values() for f in fields(cls)})


def _decode_only_raises_protocol_error(line: bytes) -> None:
    try:
        frame = decode(line)
    except ProtocolError:
        return
    # whatever decodes re-encodes to the same frame (compared as bytes: NaN != NaN)
    data = encode(frame)
    assert encode(decode(data)) == data


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_decode_of_arbitrary_bytes(line: bytes) -> None:
    _decode_only_raises_protocol_error(line)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(protocol._TYPES)) | st.text(max_size=8),
    st.one_of(st.just(1), _json_scalars),
    st.dictionaries(st.sampled_from(_field_names) | st.text(max_size=6), _json_values,
                    max_size=10),
)
def test_decode_of_arbitrary_json_objects(kind: str, version: Any, body: dict[str, Any]) -> None:
    obj = {**body, "v": version, "type": kind}
    _decode_only_raises_protocol_error(json.dumps(obj).encode())


@settings(max_examples=300)
@given(
    st.integers(min_value=0, max_value=2**62),
    st.sampled_from(list(WorkerState)),
    st.text(),
    st.text(),
)
def test_state_frames_round_trip(seq: int, state: WorkerState, detail: str, name: str) -> None:
    frame = State(seq=seq, state=state, detail=detail, push_name=name)
    assert decode(encode(frame)) == frame


@settings(max_examples=300)
@given(st.text(), st.floats(allow_nan=False), st.sampled_from(["in", "out"]))
def test_message_frames_round_trip(text: str, ts: float, direction: Any) -> None:
    frame = MessageEvent(seq=1, event_id="in:x", chat_id="c", direction=direction,
                         sender="s", text=text, ts=ts)
    assert decode(encode(frame)) == frame
