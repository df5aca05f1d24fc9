"""The worker <-> controller link: typed, versioned frames over a unix stream socket.

Wire format: one JSON object per line (UTF-8, ``\\n``-terminated), at most ``MAX_FRAME``
bytes. Every object has ``"v"`` (protocol version) and ``"type"``. Frames that change
control-plane state and must not be lost (``state``, ``qr``, ``pairing_code``, ``message``,
``metrics``) carry a per-worker ``seq``; the controller answers ``ack`` with that ``seq`` once
the write is durable, and the worker re-sends unacked frames after a reconnect. Applying a
frame twice is harmless (state frames are latest-wins, message frames have stable ids).

The controller authenticates a connection by its peer credentials (``SO_PEERCRED`` -> PID ->
systemd unit), never by what ``hello`` claims: ``hello.user_id`` must match the unit.

A malformed frame raises ``ProtocolError``; the receiver answers with an ``error`` frame and
keeps the connection.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any, ClassVar, Literal

from wabridge.errors import ProtocolError
from wabridge.status import WorkerState

VERSION = 1
MAX_FRAME = 1 << 20


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    user_id: str
    pid: int
    version: str


@dataclass(frozen=True)
class State:
    TYPE: ClassVar[str] = "state"
    seq: int
    state: WorkerState
    detail: str = ""
    phone: str = ""
    push_name: str = ""


@dataclass(frozen=True)
class Qr:
    TYPE: ClassVar[str] = "qr"
    seq: int
    code: str  # the raw string WhatsApp rotates (for terminals)
    data_url: str  # PNG data URL, 512 px, margin 2 (for apps)


@dataclass(frozen=True)
class PairingCode:
    TYPE: ClassVar[str] = "pairing_code"
    seq: int
    code: str


@dataclass(frozen=True)
class MessageEvent:
    """A processed message, mirrored to the control plane's message log."""

    TYPE: ClassVar[str] = "message"
    seq: int
    event_id: str  # stable: "<direction>:<whatsapp message id>"
    chat_id: str
    direction: Literal["in", "out"]
    sender: str
    text: str
    ts: float


@dataclass(frozen=True)
class Metrics:
    TYPE: ClassVar[str] = "metrics"
    seq: int
    chats: int
    claude_processes: int
    turns: int
    messages_in: int
    messages_out: int
    input_tokens: int
    output_tokens: int
    cost_today_usd: float
    # since the worker's store was created; absent from older workers: 0
    undecryptable: int = 0  # messages lost to decryption
    stream_errors: int = 0
    replies_failed: int = 0  # replies given up after conversation.send_attempts
    uncertain_replies: int = 0  # replies a crash left half-sent (resent or dropped)


@dataclass(frozen=True)
class Summary:
    """A chat's conversation summary, written when its context was rotated (versioned)."""

    TYPE: ClassVar[str] = "summary"
    seq: int
    chat_id: str
    number: int  # 1, 2, ... per chat
    text: str


@dataclass(frozen=True)
class Problem:
    """Something the owner must fix, shown as the document's ``error`` (e.g. a bad setting)."""

    TYPE: ClassVar[str] = "problem"
    seq: int
    code: str
    message: str


@dataclass(frozen=True)
class ProblemCleared:
    """The cause of the worker's problem ``code`` is gone (a corrected setting): the
    controller clears the document's ``error`` if it is still that problem of this worker."""

    TYPE: ClassVar[str] = "problem_cleared"
    seq: int
    code: str


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    seq: int


@dataclass(frozen=True)
class Error:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    seq: int | None = None


@dataclass(frozen=True)
class Welcome:
    """The controller's answer to ``hello``: the per-user settings from the document."""

    TYPE: ClassVar[str] = "welcome"
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    TYPE: ClassVar[str] = "settings"
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """A user's usage on one UTC day, for billing: the day's totals so far (absolute, from
    the worker's store), so a resent or repeated frame never counts anything twice."""

    TYPE: ClassVar[str] = "usage"
    seq: int
    day: str  # YYYY-MM-DD (UTC)
    turns: int
    input_tokens: int
    output_tokens: int
    cache_creation_tokens: int
    cache_read_tokens: int
    cost_usd: float
    messages_in: int
    messages_out: int
    transcription_seconds: float = 0.0


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
COMMAND_NAMES = ("pair_phone", "reset_chat", "pause_chat", "resume_chat")


@dataclass(frozen=True)
class Command:
    TYPE: ClassVar[str] = "command"
    name: Literal["pair_phone", "reset_chat", "pause_chat", "resume_chat"]
    args: dict[str, str] = field(default_factory=dict)


SlotState = Literal["want", "busy", "idle", "gone"]


@dataclass(frozen=True)
class Slot:
    """Worker -> controller, not sequenced (a live fact, re-sent after a reconnect): the host
    Claude budget's view of one chat's CLI process. ``want`` asks for a slot; ``busy`` and
    ``idle`` report a held one (in a turn, or between turns: only idle ones may be reclaimed);
    ``gone`` gives it back (process closed, or the wait abandoned)."""

    TYPE: ClassVar[str] = "slot"
    chat_id: str
    state: SlotState


@dataclass(frozen=True)
class SlotOrder:
    """Controller -> worker: ``grant`` lets a waiting chat start its process; ``reclaim`` asks
    the worker to close the chat's idle process (answered with ``gone``, or ``busy``)."""

    TYPE: ClassVar[str] = "slot_order"
    chat_id: str
    order: Literal["grant", "reclaim"]


Frame = (
    Hello
    | State
    | Qr
    | PairingCode
    | MessageEvent
    | Metrics
    | Summary
    | Problem
    | ProblemCleared
    | Ack
    | Error
    | Welcome
    | Settings
    | Command
    | Usage
    | Slot
    | SlotOrder
)
SequencedFrame = (State | Qr | PairingCode | MessageEvent | Metrics | Summary | Problem
                  | ProblemCleared | Usage)

_TYPES: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (Hello, State, Qr, PairingCode, MessageEvent, Metrics, Summary, Problem,
                ProblemCleared, Ack, Error, Welcome)
}
_TYPES[Settings.TYPE] = Settings
_TYPES[Command.TYPE] = Command
_TYPES[Usage.TYPE] = Usage
_TYPES[Slot.TYPE] = Slot
_TYPES[SlotOrder.TYPE] = SlotOrder

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "user_id": (str,),
    "pid": (int,),
    "version": (str,),
    "seq": (int,),
    "detail": (str,),
    "phone": (str,),
    "push_name": (str,),
    "code": (str,),
    "data_url": (str,),
    "event_id": (str,),
    "chat_id": (str,),
    "sender": (str,),
    "text": (str,),
    "ts": (int, float),
    "message": (str,),
    "chats": (int,),
    "claude_processes": (int,),
    "turns": (int,),
    "messages_in": (int,),
    "messages_out": (int,),
    "input_tokens": (int,),
    "output_tokens": (int,),
    "cost_today_usd": (int, float),
    "undecryptable": (int,),
    "stream_errors": (int,),
    "replies_failed": (int,),
    "uncertain_replies": (int,),
    "settings": (dict,),
    "number": (int,),
    "args": (dict,),
    "order": (str,),
    "day": (str,),
    "cache_creation_tokens": (int,),
    "cache_read_tokens": (int,),
    "cost_usd": (int, float),
    "transcription_seconds": (int, float),
}


def encode(frame: Frame) -> bytes:
    body = {"v": VERSION, "type": frame.TYPE, **asdict(frame)}
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    try:
        data = text.encode() + b"\n"
    except UnicodeEncodeError:
        # A lone surrogate (from a ``\\udXXX`` escape we decoded) has no UTF-8 form; the
        # ASCII spelling escapes it again, so the frame still round-trips.
        data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"{frame.TYPE} frame of {len(data)} bytes exceeds {MAX_FRAME}")
    return data


def decode(line: bytes) -> Frame:
    """Parse one line into a frame; raises ``ProtocolError`` saying what is wrong."""
    if len(line) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(line)} bytes exceeds {MAX_FRAME}")
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError) as exc:
        # ValueError covers UnicodeDecodeError, JSONDecodeError and integers beyond
        # sys.get_int_max_str_digits(); RecursionError deeply nested arrays.
        raise ProtocolError(f"frame is not JSON: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"frame must be a JSON object, got {type(raw).__name__}")
    if type(raw.get("v")) is not int or raw["v"] != VERSION:  # true == 1 in Python
        raise ProtocolError(f"unsupported protocol version {raw.get('v')!r}; expected {VERSION}")
    kind = raw.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown frame type {kind!r}")
    kwargs: dict[str, Any] = {}
    for name, fdef in cls.__dataclass_fields__.items():
        if name not in raw:
            if fdef.default is MISSING and fdef.default_factory is MISSING:
                raise ProtocolError(f"{kind} frame lacks field {name!r}")
            continue
        value = raw[name]
        allowed = _FIELD_TYPES.get(name)
        if value is None and name == "seq" and cls is Error:
            kwargs[name] = None
            continue
        if allowed and (not isinstance(value, allowed) or isinstance(value, bool)):
            raise ProtocolError(
                f"{kind} frame field {name!r} must be {allowed[0].__name__}, "
                f"got {type(value).__name__}"
            )
        kwargs[name] = value
    if cls is State:
        try:
            kwargs["state"] = WorkerState(raw["state"])
        except ValueError:
            raise ProtocolError(f"state frame has unknown state {raw['state']!r}") from None
    if cls is MessageEvent and kwargs["direction"] not in ("in", "out"):
        raise ProtocolError(f"message frame direction must be 'in' or 'out': {raw['direction']!r}")
    if cls is Usage and not _DAY.fullmatch(kwargs["day"]):
        raise ProtocolError(f"usage frame day must be YYYY-MM-DD: {kwargs['day']!r}")
    if cls is Command:
        if kwargs["name"] not in COMMAND_NAMES:
            raise ProtocolError(f"unknown command {kwargs['name']!r}")
        if not all(isinstance(v, str) for v in kwargs.get("args", {}).values()):
            raise ProtocolError("command frame field 'args' must map names to strings")
    if cls is Slot and kwargs["state"] not in ("want", "busy", "idle", "gone"):
        raise ProtocolError(f"slot frame has unknown state {raw['state']!r}")
    if cls is SlotOrder and kwargs["order"] not in ("grant", "reclaim"):
        raise ProtocolError(f"slot_order frame has unknown order {raw['order']!r}")
    try:
        return cls(**kwargs)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ProtocolError(f"{kind} frame: {exc}") from None
