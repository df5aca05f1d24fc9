"""Bad input, generated: property-based fuzzing of every boundary that reads
something another party wrote. Fast, no systemd: runs in ``make test-fast``.

- Firestore documents: ``controller.plane.parse_account`` + ``controller.reconcile`` never
  raise, whatever the types, statuses or sizes; every rejection is a ``SetError`` naming the
  problem.
- Worker -> controller frames: random lines to a real ``controller.server.WorkerServer`` never
  end the connection loop; every line gets exactly one answer (``ack`` or ``error``).
- Configuration files: random TOML (and random bytes) -> ``wabridge.config.load`` returns a
  config or raises ``ConfigError``, nothing else.
- neonize events: protobuf events built from the real neonize classes (any field, odd
  contents, huge texts, unknown message types) -> ``translate`` returns None or a valid event.
- Claude Code's stream-json: a stand-in CLI prints generated lines (truncated JSON, unknown
  types, odd field types, NaN, huge numbers, no result at all) -> ``ClaudeSession.turn``
  returns a result or raises ``ClaudeError``; never another exception, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import stat
import string
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from fakes import fake_neonize
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.claude import ClaudeError, ClaudeSession, ClaudeSettings, TurnResult
from agent.whatsapp import events as wa_events
from agent.whatsapp.neonize_translate import LoginStatus, Me, translate
from controller import reconcile as rc
from controller.plane import AccountDoc, parse_account
from controller.reconcile import SetError, UnitView
from controller.server import WorkerServer
from wabridge import config, protocol
from wabridge.errors import ConfigError
from wabridge.status import DocStatus, WorkerState
from wabridge.units import validate_user_id

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# --------------------------------------------------------------------------------------------
# shared value strategies

_big_text = st.integers(min_value=10_000, max_value=1_200_000).map(lambda n: "x" * n)
_texts = st.one_of(st.text(max_size=40), st.text(max_size=40), st.text(max_size=40), _big_text)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    _texts,
    st.binary(max_size=40),
    st.datetimes(timezones=st.just(dt.UTC)),
)
# what a Firestore document may hold (Firestore has no tuples or sets; maps have str keys)
_firestore_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)

# --------------------------------------------------------------------------------------------
# 1. Firestore documents -> parse_account -> for_doc / for_unit / reconcile

_ok_user_ids = st.text(
    alphabet=string.ascii_letters + string.digits + "_.:-@+=", min_size=1, max_size=20
).filter(lambda s: not s.startswith("."))
_user_ids = st.one_of(_ok_user_ids, _ok_user_ids, st.text(max_size=200),
                      st.integers(129, 5000).map(lambda n: "u" * n))
_statuses = st.one_of(st.sampled_from([s.value for s in DocStatus]),
                      st.sampled_from([s.value.upper() for s in DocStatus]),
                      _firestore_values)
_phones = st.one_of(st.from_regex(r"\d{8,15}", fullmatch=True), _firestore_values)
_documents = st.fixed_dictionaries(
    {},
    optional={
        "status": _statuses,
        "settings": _firestore_values,
        "pairingPhone": _phones,
        "host": _firestore_values,
        "error": st.one_of(_firestore_values,
                           st.fixed_dictionaries({"code": _firestore_values,
                                                  "message": _firestore_values})),
        "unit": _firestore_values,
        "qrCode": _firestore_values,
    },
).flatmap(lambda d: st.dictionaries(st.text(max_size=12), _firestore_values, max_size=3)
          .map(lambda extra: {**extra, **d}))

_active_states = st.sampled_from(
    ["active", "activating", "deactivating", "inactive", "failed", "reloading", ""]) | st.text(
    max_size=10)
_int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_unit_views = st.builds(
    UnitView,
    active_state=_active_states,
    sub_state=st.sampled_from(["running", "auto-restart", "dead", "failed", ""]) | st.text(
        max_size=8),
    result=st.sampled_from(["success", "signal", "exit-code", "oom-kill", "watchdog",
                            "timeout", "start-limit-hit", ""]) | st.text(max_size=8),
    n_restarts=st.integers(min_value=0, max_value=2**32),
    exec_main_code=st.integers(min_value=0, max_value=4) | _int32,
    exec_main_status=st.integers(min_value=0, max_value=255) | _int32,
    oom=st.booleans(),
    start_limit_burst=st.integers(min_value=0, max_value=1000),
)

# An error must fit on the document it is written to: a Firestore document holds at most
# 1 MiB, and the offending value is on that document already.
MAX_ERROR_MESSAGE = 2000


def _check_parsed(doc: AccountDoc, user_id: str, raw: Mapping[str, Any]) -> None:
    assert doc.user_id == user_id
    assert doc.status is None or isinstance(doc.status, DocStatus)
    assert doc.raw_status is raw.get("status")
    assert isinstance(doc.settings, Mapping)
    assert doc.pairing_phone is None or isinstance(doc.pairing_phone, str)
    assert doc.host is None or isinstance(doc.host, str)
    assert doc.error_code is None or isinstance(doc.error_code, str)
    assert isinstance(doc.unit_state, Mapping)


def _check_actions(actions: list[rc.Action], user_id: str) -> None:
    assert isinstance(actions, list)
    for action in actions:
        assert isinstance(action, rc.Claim | rc.Start | rc.Stop | rc.Update | rc.SetError)
        assert action.user_id == user_id
        if isinstance(action, SetError):
            assert action.code and isinstance(action.code, str)
            assert action.message and isinstance(action.message, str)


@FUZZ
@given(_user_ids, _documents, st.none() | _unit_views)
def test_any_document_is_parsed_and_decided_without_raising(
    user_id: str, raw: dict[str, Any], unit: UnitView | None
) -> None:
    doc = parse_account(user_id, raw)
    _check_parsed(doc, user_id, raw)
    actions = rc.for_doc(doc, unit)
    _check_actions(actions, user_id)
    errors = [a for a in actions if isinstance(a, SetError)]

    try:
        validate_user_id(user_id)
        valid_id = True
    except Exception:
        valid_id = False
    if not valid_id:
        # a bad id is named once (until the document shows that error) and nothing else runs
        assert all(isinstance(a, SetError) for a in actions)
        if doc.error_code != "bad_user_id":
            assert [e.code for e in errors] == ["bad_user_id"]
        return
    if doc.status is None and doc.raw_status is not None and doc.error_code != "unknown_status":
        assert [e.code for e in errors] == ["unknown_status"], actions
        assert not [a for a in actions if isinstance(a, rc.Start | rc.Claim)]
        # the message names the value and what is allowed
        assert "create_requested" in errors[0].message
        shown = repr(doc.raw_status)
        assert shown[:30] in errors[0].message
    if doc.status is DocStatus.PAIRING_REQUESTED:
        phone = doc.pairing_phone or ""
        if not (phone.isascii() and phone.isdigit() and 8 <= len(phone) <= 15):
            assert [e.code for e in errors] == ["bad_pairing_phone"]
            assert not [a for a in actions if isinstance(a, rc.Start | rc.Claim)]
    for action in actions:
        if isinstance(action, rc.Start | rc.Claim):
            assert doc.status is not None, "only a known status may start a worker"


@FUZZ
@given(_user_ids, st.none() | _documents, _unit_views)
def test_any_unit_state_is_mirrored_without_raising(
    user_id: str, raw: dict[str, Any] | None, unit: UnitView
) -> None:
    doc = None if raw is None else parse_account(user_id, raw)
    _check_actions(rc.for_unit(doc, user_id, unit), user_id)
    kind = rc.exit_kind(unit)
    assert isinstance(kind, str)
    facts = rc.exit_facts(unit)
    json.dumps(facts)  # written to the document as is
    assert isinstance(rc.crash_reason(unit), str)


@FUZZ
@given(st.dictionaries(_user_ids, _documents, max_size=5),
       st.dictionaries(_user_ids, _unit_views, max_size=5))
def test_reconcile_of_any_picture_does_not_raise(
    docs: dict[str, dict[str, Any]], units: dict[str, UnitView]
) -> None:
    parsed = {uid: parse_account(uid, raw) for uid, raw in docs.items()}
    actions = rc.reconcile(parsed, units)
    for action in actions:
        assert action.user_id in parsed or action.user_id in units


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=MAX_ERROR_MESSAGE, max_value=1_000_000))
def test_errors_about_huge_fields_fit_on_the_document(size: int) -> None:
    doc = parse_account("alice", {"status": "s" * size})
    (error,) = [a for a in rc.for_doc(doc, None) if isinstance(a, SetError)]
    assert len(error.message) <= MAX_ERROR_MESSAGE


# --------------------------------------------------------------------------------------------
# 2. Worker -> controller lines to a real WorkerServer

ALICE_UNIT = "wabridge-worker@alice.service"
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)
_field_names = sorted({name for cls in protocol._TYPES.values()
                       for name in cls.__dataclass_fields__})
_frame_objects = st.fixed_dictionaries(
    {"v": st.just(1) | _json_values,
     "type": st.sampled_from(sorted(protocol._TYPES)) | st.text(max_size=8)},
).flatmap(lambda head: st.dictionaries(st.sampled_from(_field_names) | st.text(max_size=6),
                                       _json_values, max_size=8)
          .map(lambda body: {**body, **head}))


def _valid_frame_line(frame: protocol.Frame) -> bytes:
    return protocol.encode(frame)


_valid_frames = st.one_of(
    st.builds(protocol.State, seq=st.integers(0, 2**40), state=st.sampled_from(list(WorkerState)),
              detail=st.text(max_size=30)),
    st.builds(protocol.MessageEvent, seq=st.integers(0, 2**40), event_id=st.text(max_size=10),
              chat_id=st.text(max_size=10), direction=st.sampled_from(["in", "out"]),
              sender=st.text(max_size=10), text=st.text(max_size=50),
              ts=st.floats(allow_nan=False, allow_infinity=False)),
).map(_valid_frame_line)
_lines = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
    st.text(max_size=200).map(lambda t: t.replace("\n", "").encode("utf-8", "surrogatepass")),
    _frame_objects.map(lambda o: json.dumps(o).encode()),
    _valid_frames.map(lambda b: b.rstrip(b"\n")),
    st.just(b'{"v":1,"type":"hello","user_id":"bob","pid":1,"version":"x"}'),
    st.integers(0, 40).map(lambda n: b"[" * n + b"]" * n),
    st.just(b"[" * 100_000),  # deeper than json's recursion limit
)


class _Recorder:
    def __init__(self) -> None:
        self.frames: list[protocol.SequencedFrame] = []

    async def unit_for_pid(self, pid: int) -> str | None:
        return ALICE_UNIT if pid == os.getpid() else None

    async def on_frame(self, user_id: str, frame: protocol.SequencedFrame) -> None:
        assert user_id == "alice"
        self.frames.append(frame)

    async def settings_for(self, user_id: str) -> dict[str, Any]:
        return {}


@pytest.fixture(scope="module")
def sock_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="wf-")  # short: unix socket paths are limited
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def _server_exchange(path: str, lines: list[bytes]) -> tuple[list[protocol.Frame], int]:

    rec = _Recorder()
    server = WorkerServer(path, rec.unit_for_pid, rec.on_frame, rec.settings_for)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(path, limit=protocol.MAX_FRAME * 2)
    answers: list[protocol.Frame] = []
    try:
        writer.write(protocol.encode(protocol.Hello(user_id="alice", pid=os.getpid(),
                                                    version="fuzz")))
        assert isinstance(protocol.decode(await reader.readuntil(b"\n")), protocol.Welcome)
        for line in lines:
            writer.write(line + b"\n")
            await writer.drain()
            answers.append(protocol.decode(await asyncio.wait_for(reader.readuntil(b"\n"), 5)))
        # the loop is still up: a good frame is still acked, and the link still registered
        writer.write(protocol.encode(protocol.State(seq=7, state=WorkerState.CONNECTED)))
        await writer.drain()
        last = protocol.decode(await asyncio.wait_for(reader.readuntil(b"\n"), 5))
        assert last == protocol.Ack(seq=7)
        assert "alice" in server.connections
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        await server.close()
    return answers, len(rec.frames)


@FUZZ
@given(st.lists(_lines, min_size=1, max_size=8))
def test_random_lines_never_end_the_connection_loop(sock_dir: str, lines: list[bytes]) -> None:
    path = os.path.join(sock_dir, "c.sock")
    answers, accepted = asyncio.run(_server_exchange(path, lines))
    assert len(answers) == len(lines)
    for answer in answers:
        assert isinstance(answer, protocol.Ack | protocol.Error), answer
        if isinstance(answer, protocol.Error):
            assert answer.code and answer.message
    # every ack is for a frame the controller took, plus the final good one
    assert accepted == sum(isinstance(a, protocol.Ack) for a in answers) + 1


# --------------------------------------------------------------------------------------------
# 3. Configuration files

_SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in dataclasses.fields(config.Config)}
_KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}
_toml_scalars = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["auto", "firestore", "local", "sim", "neonize", "info", "json", "1G",
                     "100%", "127.0.0.1:1", ":", "infinity", ""]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.datetimes(),
    st.dates(),
)
_toml_values = st.recursive(
    _toml_scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _toml_key(key: str) -> str:
    if key and all(c in string.ascii_letters + string.digits + "_-" for c in key):
        return key
    return json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string (or invalid TOML)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


@st.composite
def _toml_documents(draw: st.DrawFn) -> str:
    out: list[str] = []
    for _ in range(draw(st.integers(0, 2))):  # top-level keys: not tables
        out.append(f"{_toml_key(draw(st.text(max_size=8)))} = {_toml_value(draw(_toml_values))}")
    names = draw(st.lists(st.sampled_from(sorted(_SECTIONS)) | st.text(max_size=8),
                          max_size=4, unique=True))
    for name in names:
        out.append(f"[{_toml_key(name)}]")
        known = _KEYS.get(name, [])
        keys = draw(st.lists((st.sampled_from(known) if known else st.nothing())
                             | st.text(max_size=8), max_size=5, unique=True))
        for key in keys:
            out.append(f"{_toml_key(key)} = {_toml_value(draw(_toml_values))}")
    text = "\n".join(out) + "\n"
    if draw(st.integers(0, 9)) == 0:  # now and then: cut it anywhere
        text = text[: draw(st.integers(0, len(text)))]
    return text


_env_names = st.one_of(
    st.builds(lambda s, k: f"WABRIDGE__{s.upper()}__{k.upper()}",
              st.sampled_from(sorted(_SECTIONS)), st.sampled_from(sorted(
                  {k for keys in _KEYS.values() for k in keys}))),
    st.text(alphabet=string.ascii_letters + "_", max_size=12).map(lambda s: "WABRIDGE__" + s),
)
_environments = st.dictionaries(_env_names, st.text(max_size=12).filter(lambda v: "\x00" not in v),
                                max_size=3)


def _load_only_raises_config_error(path: Path, environ: dict[str, str]) -> None:
    try:
        cfg = config.load(path, environ=environ)
    except ConfigError as exc:
        assert isinstance(exc.key, str) and str(exc)
        return
    assert isinstance(cfg, config.Config)


@FUZZ
@given(_toml_documents(), _environments)
def test_random_toml_loads_or_raises_config_error(
    tmp_path: Path, text: str, environ: dict[str, str]
) -> None:
    path = tmp_path / "wabridge.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_only_raises_config_error(path, environ)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_load_or_raise_config_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "wabridge.toml"
    path.write_bytes(data)
    _load_only_raises_config_error(path, {})


# --------------------------------------------------------------------------------------------
# 4. neonize events, from the real protobuf classes


P, E2E = fake_neonize.P, fake_neonize.E2E
_SERVERS = ["s.whatsapp.net", "lid", "g.us", "broadcast", "newsletter", "c.us", "", "bot"]
_proto_texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from([*_SERVERS, "status", "5511999990002", "2@abc", "/reset", "120363@g.us"]),
    st.integers(min_value=10_000, max_value=300_000).map(lambda n: "y" * n),
)
_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# fields the translation reads: drawn more often than the hundreds of others
_HOT = {
    "neonize.Message": ["Info", "Message", "IsEdit"],
    "neonize.MessageInfo": ["MessageSource", "ID", "Pushname", "Timestamp", "Edit"],
    "neonize.MessageSource": ["Chat", "Sender", "IsFromMe", "IsGroup", "SenderAlt",
                              "RecipientAlt"],
    "neonize.JID": ["User", "Server", "Device"],
    "neonize.QR": ["Codes"],
    "neonize.LoggedOut": ["Reason", "OnConnect"],
    "neonize.TemporaryBan": ["Code", "Expire"],
    "neonize.ConnectFailure": ["Reason", "Message"],
    "neonize.PairStatus": ["Status", "Error"],
    "neonize.KeepAliveTimeout": ["ErrorCount"],
}
_CONTENT = ["conversation", "extendedTextMessage", "imageMessage", "videoMessage",
            "documentMessage", "audioMessage", "stickerMessage", "reactionMessage",
            "protocolMessage", "locationMessage", "contactMessage", "pollCreationMessage",
            "ephemeralMessage", "viewOnceMessage", "viewOnceMessageV2",
            "documentWithCaptionMessage", "editedMessage", "senderKeyDistributionMessage"]
_HOT_E2E = ["text", "caption", "contextInfo", "quotedMessage", "mentionedJID", "stanzaID",
            "participant", "message", "mimetype", "fileLength", "PTT"]


def _is_repeated(field: Any) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6 (``label`` is gone in 7)
        return bool(field.is_repeated)
    return bool(field.label == FD.LABEL_REPEATED)


def _scalar(draw: st.DrawFn, field: Any) -> Any:
    kind = field.type
    if kind == FD.TYPE_STRING:
        return draw(_proto_texts)
    if kind == FD.TYPE_BYTES:
        return draw(st.binary(max_size=40))
    if kind == FD.TYPE_BOOL:
        return draw(st.booleans())
    if kind == FD.TYPE_ENUM:
        return draw(st.sampled_from([v.number for v in field.enum_type.values]))
    if kind == FD.TYPE_DOUBLE:
        return draw(st.floats())
    if kind == FD.TYPE_FLOAT:
        return draw(st.floats(width=32))
    low, high = _INT_RANGES[kind]
    return draw(st.integers(min_value=low, max_value=high)
                | st.sampled_from([0, 1, -1, low, high, 1_732_530_000_123]).filter(
                    lambda v: low <= v <= high))


def _fill(draw: st.DrawFn, msg: Any, depth: int) -> None:
    desc = msg.DESCRIPTOR
    plain = [f for f in desc.fields
             if not (f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry)]
    if not plain:
        return
    hot = [desc.fields_by_name[n] for n in _HOT.get(desc.full_name, []) if n in desc.fields_by_name]
    if "conversation" in desc.fields_by_name:  # message content (waE2E.Message)
        hot = [desc.fields_by_name[n] for n in _CONTENT if n in desc.fields_by_name]
    hot += [desc.fields_by_name[n] for n in _HOT_E2E if n in desc.fields_by_name]
    budget = 0 if depth > 5 else (3 if depth > 2 else 5)
    chosen = draw(st.lists(st.sampled_from(hot), max_size=budget,
                           unique_by=lambda f: f.name)) if hot else []
    chosen += draw(st.lists(st.sampled_from(plain), max_size=2 if depth < 4 else 0,
                            unique_by=lambda f: f.name))
    for field in chosen:
        if field.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
            if _is_repeated(field):
                for _ in range(draw(st.integers(0, 2))):
                    _fill(draw, getattr(msg, field.name).add(), depth + 1)
            else:
                sub = getattr(msg, field.name)
                sub.SetInParent()
                _fill(draw, sub, depth + 1)
        elif _is_repeated(field):
            getattr(msg, field.name).extend(
                _scalar(draw, field) for _ in range(draw(st.integers(0, 3))))
        else:
            setattr(msg, field.name, _scalar(draw, field))


@st.composite
def _protobuf(draw: st.DrawFn, cls: Any) -> Any:
    msg = cls()
    _fill(draw, msg, 0)
    return msg


_jid_users = st.sampled_from(["5511999990002", "187654321098765", "120363025246125486",
                              "status", "5511999990001", ""]) | st.text(max_size=12)


def _set_jid(draw: st.DrawFn, target: Any) -> None:
    target.SetInParent()
    target.User = draw(_jid_users)
    target.Server = draw(st.sampled_from(_SERVERS) | st.text(max_size=8))
    target.Device = draw(st.integers(0, 2**32 - 1) | st.just(0))


@st.composite
def _message_events(draw: st.DrawFn) -> Any:
    """A neonize ``Message`` event shaped like whatsmeow's, then anything on top."""
    event = P.Message()
    info = event.Info
    info.ID = draw(st.text(max_size=24) | st.just("3EB0AA"))
    info.Timestamp = draw(st.integers(min_value=-(2**63), max_value=2**63 - 1)
                          | st.just(1_732_530_000_123))
    source = info.MessageSource
    for name in ("Chat", "Sender", "SenderAlt", "RecipientAlt"):
        if draw(st.booleans()):
            _set_jid(draw, getattr(source, name))
    source.IsGroup = draw(st.booleans())
    source.IsFromMe = draw(st.booleans())
    content = event.Message
    kind = draw(st.sampled_from(_CONTENT))
    field = content.DESCRIPTOR.fields_by_name[kind]
    if field.type == FD.TYPE_STRING:
        setattr(content, kind, draw(_proto_texts))
    else:
        sub = getattr(content, kind)
        sub.SetInParent()
        _fill(draw, sub, 1)
    _fill(draw, event, 1)  # and random fields anywhere, wrappers and context included
    return event


_EVENT_CLASSES = [P.Message, P.QR, P.PairStatus, P.Connected,
                  P.KeepAliveTimeout, P.KeepAliveRestored, P.Disconnected, P.LoggedOut,
                  P.StreamReplaced, P.TemporaryBan, P.ConnectFailure, P.ClientOutdated,
                  P.StreamError, P.Receipt, P.UndecryptableMessage, P.HistorySync,
                  P.ChatPresence, P.Presence, P.CallOffer, P.JoinedGroup]
_events = st.one_of(_message_events(), _message_events(),
                    st.sampled_from(_EVENT_CLASSES).flatmap(_protobuf))
_me = st.none() | st.builds(
    Me, jid=st.sampled_from(["5511999990001@s.whatsapp.net", "", "x"]) | st.text(max_size=20),
    phone=st.text(max_size=15), lid=st.sampled_from(["", "203981562134678@lid"]),
    push_name=st.text(max_size=10))
_EVENT_TYPES = tuple(t for t in vars(wa_events).values()
                     if isinstance(t, type) and t.__module__ == wa_events.__name__)


def _download(data: bytes | None, fail: bool) -> Callable[[Any], bytes | None]:
    def download(_message: Any) -> bytes | None:
        if fail:
            raise RuntimeError("download failed")
        return data

    return download


def _check_event(out: Any) -> None:
    if out is None:
        return
    assert isinstance(out, _EVENT_TYPES), out
    if isinstance(out, wa_events.IncomingMessage):
        assert all(isinstance(getattr(out, name), str) for name in
                   ("wa_id", "chat_id", "sender", "text", "sender_name", "quoted_text",
                    "unsupported_media"))
        assert isinstance(out.timestamp, float) and math.isfinite(out.timestamp)
        assert all(isinstance(i, wa_events.Image) and isinstance(i.data, bytes) and i.data
                   for i in out.images)
    if isinstance(out, wa_events.QrCode):
        assert isinstance(out.code, str) and out.code


@FUZZ
@given(_events, _me, st.none() | st.binary(max_size=30), st.booleans())
def test_neonize_events_translate_to_none_or_a_valid_event(
    event: Any, me: Me | None, data: bytes | None, fail: bool
) -> None:
    _check_event(translate(event, me=me, download=_download(data, fail), now=1.7e9))
    _check_event(translate(event, me=me, download=None))


@FUZZ
@given(st.binary(max_size=60) | st.text(max_size=60)
       | st.builds(LoginStatus, st.text(max_size=20)))
def test_qr_and_login_callbacks_translate_to_none_or_a_valid_event(payload: Any) -> None:
    _check_event(translate(payload))


# --------------------------------------------------------------------------------------------
# 5. Claude Code's stream-json, from a stand-in CLI


# Answers the control handshake; for each user turn, prints the lines of the file named by
# the turn's text, then ends as its ``.end`` file says: a good result line, exit, or hang.
STAND_IN = r"""#!/usr/bin/python3
import json, os, sys, time
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if not isinstance(msg, dict):
        continue
    if msg.get("type") == "control_request":
        prelude = os.environ.get("FUZZ_PRELUDE")
        if prelude:  # lines before the handshake's answer, then maybe no answer at all
            with open(prelude, "rb") as f:
                sys.stdout.buffer.write(f.read())
            sys.stdout.flush()
            with open(prelude + ".end") as f:
                end = f.read()
            if end == "exit":
                sys.exit(3)
            if end == "hang":
                time.sleep(3600)
        sys.stdout.write(json.dumps({"type": "control_response", "response": {
            "subtype": "success", "request_id": msg["request_id"], "response": {}}}) + "\n")
        sys.stdout.flush()
        continue
    if msg.get("type") != "user":
        continue
    path = msg["message"]["content"][0]["text"].strip()
    with open(path, "rb") as f:
        sys.stdout.buffer.write(f.read())
    sys.stdout.flush()
    with open(path + ".end") as f:
        end = f.read()
    if end == "result":
        sys.stdout.write(json.dumps({"type": "result", "subtype": "success", "is_error": False,
            "result": "ok", "session_id": "5f0c2a53-0000-4000-8000-000000000001",
            "total_cost_usd": 0.01, "usage": {"input_tokens": 1}, "duration_ms": 3}) + "\n")
        sys.stdout.flush()
    elif end == "exit":
        sys.exit(3)
    else:
        time.sleep(3600)
"""
TURN_TIMEOUT = 1.0
_CLAUDE_ERRORS = {"timeout", "process_exited", "protocol", "not_configured", "resume_failed"}

_odd = st.one_of(
    st.none(), st.booleans(), st.text(max_size=20), st.floats(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=300, max_value=600).map(lambda n: 10**n),  # beyond float range
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                         max_size=3),
)
_blocks = st.lists(
    st.one_of(_odd, st.fixed_dictionaries({"type": st.sampled_from(["text", "tool_use",
                                                                     "thinking"]) | _odd,
                                           "text": _odd})),
    max_size=3,
)
_line_objects = st.fixed_dictionaries(
    {"type": st.sampled_from(["assistant", "result", "system", "user", "control_request",
                              "control_response", "stream_event", "rate_limit_event"])
     | st.text(max_size=10)},
    optional={
        "subtype": st.sampled_from(["success", "init", "error_during_execution"]) | _odd,
        "message": st.one_of(_odd, st.fixed_dictionaries({}, optional={
            "content": st.one_of(_odd, _blocks), "role": _odd})),
        "session_id": st.one_of(_odd, st.uuids().map(str)),
        "is_error": _odd,
        "result": _odd,
        "errors": _odd,
        "total_cost_usd": _odd,
        "usage": _odd,
        "duration_ms": _odd,
        "model_usage_since_last_result": st.one_of(
            _odd, st.dictionaries(st.text(max_size=5), _odd | st.fixed_dictionaries(
                {"costUSD": _odd}), max_size=2)),
        "request_id": _odd,
        "request": st.one_of(_odd, st.fixed_dictionaries({"subtype": _odd})),
        "response": st.one_of(_odd, st.fixed_dictionaries({"subtype": _odd,
                                                           "request_id": _odd})),
    },
)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=True)


_stream_lines = st.one_of(
    _line_objects.map(_dumps),
    _line_objects.map(_dumps),
    st.tuples(_line_objects.map(_dumps), st.floats(0, 1)).map(
        lambda t: t[0][: int(len(t[0]) * t[1])]),  # truncated JSON
    st.text(max_size=40),
    _odd.map(_dumps),  # JSON, but not an object
    st.just(""),
    st.just("[" * 100_000),  # deeper than json's recursion limit
).map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=20)  # not UTF-8


@pytest.fixture(scope="module")
def claude_env() -> Iterator[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="wfc-"))
    cli = root / "claude"
    cli.write_text(STAND_IN)
    cli.chmod(cli.stat().st_mode | stat.S_IXUSR)
    loop = asyncio.new_event_loop()
    crashes: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: crashes.append(context))
    env: dict[str, Any] = {"root": root, "loop": loop, "crashes": crashes, "session": None,
                           "n": 0, "settings": ClaudeSettings(
                               cli_path=cli, model=None, system_prompt=None,
                               turn_timeout=TURN_TIMEOUT, extra_env={"ANTHROPIC_API_KEY": "k"})}
    yield env
    session = env["session"]
    if session is not None:
        loop.run_until_complete(session.close(timeout=1.0))
    loop.close()
    shutil.rmtree(root, ignore_errors=True)


async def _one_turn(env: dict[str, Any], lines: list[bytes], end: str) -> None:
    session: ClaudeSession | None = env["session"]
    if session is None or not session.alive:
        if session is not None:
            await session.close(timeout=1.0)
        session = await ClaudeSession.open(settings=env["settings"], workdir=env["root"] / "w",
                                           config_dir=env["root"] / "h" / ".claude",
                                           resume_session_id=None)
        env["session"] = session
    env["n"] += 1
    plan = env["root"] / f"turn-{env['n']}"
    plan.write_bytes(b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines))
    (env["root"] / f"turn-{env['n']}.end").write_text(end)
    try:
        result = await asyncio.wait_for(session.turn(str(plan)), TURN_TIMEOUT + 5)
    except ClaudeError as exc:
        assert exc.code in _CLAUDE_ERRORS
        if end == "hang":
            return
        if end == "exit":
            assert exc.code in ("process_exited", "protocol"), exc
        return
    assert isinstance(result, TurnResult)
    assert isinstance(result.text, str) and isinstance(result.is_error, bool)
    assert result.error is None or isinstance(result.error, str)
    assert isinstance(result.session_id, str)
    assert isinstance(result.total_cost_usd, float)
    assert isinstance(result.turn_cost_usd, float)
    assert isinstance(result.duration_ms, int)
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in result.usage.items())


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(_stream_lines, max_size=6),
       st.sampled_from(["result"] * 12 + ["exit", "hang"]))
def test_claude_stream_lines_give_a_result_or_a_claude_error(
    claude_env: dict[str, Any], lines: list[bytes], end: str
) -> None:
    loop: asyncio.AbstractEventLoop = claude_env["loop"]
    loop.run_until_complete(_one_turn(claude_env, lines, end))
    # no task of the session (its stdout/stderr readers) died of an exception
    session = claude_env["session"]
    for task in (session._reader, session._err_reader):
        if task.done() and not task.cancelled():
            assert task.exception() is None, repr(task.exception())
    crashes = list(claude_env["crashes"])
    claude_env["crashes"].clear()
    assert not crashes, crashes


async def _one_open(env: dict[str, Any], lines: list[bytes], end: str) -> None:
    env["n"] += 1
    prelude = env["root"] / f"prelude-{env['n']}"
    prelude.write_bytes(b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines))
    (env["root"] / f"prelude-{env['n']}.end").write_text(end)
    settings = dataclasses.replace(env["settings"], extra_env={
        **env["settings"].extra_env, "FUZZ_PRELUDE": str(prelude)})
    try:
        session = await asyncio.wait_for(ClaudeSession.open(
            settings=settings, workdir=env["root"] / "w", config_dir=env["root"] / "h" / ".claude",
            resume_session_id=None), TURN_TIMEOUT + 5)
    except ClaudeError as exc:
        assert exc.code in _CLAUDE_ERRORS
        return
    try:
        for task in (session._reader, session._err_reader):
            if task.done() and not task.cancelled():
                assert task.exception() is None, repr(task.exception())
    finally:
        await session.close(timeout=1.0)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(_stream_lines, max_size=5), st.sampled_from(["answer"] * 12 + ["exit", "hang"]))
def test_claude_start_up_lines_give_a_session_or_a_claude_error(
    claude_env: dict[str, Any], lines: list[bytes], end: str
) -> None:
    loop: asyncio.AbstractEventLoop = claude_env["loop"]
    loop.run_until_complete(_one_open(claude_env, lines, end))
    crashes = list(claude_env["crashes"])
    claude_env["crashes"].clear()
    assert not crashes, crashes
