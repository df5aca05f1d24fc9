"""The simulated WhatsApp network as a pure in-memory model (no I/O, no asyncio).

Actors:

- an **account** is a phone number; it exists once some device linked to it;
- a **device** is a linked-device client (one wabridge worker) holding a secret token;
- a **connection** is one live device WebSocket, known here only by an integer id;
- a **contact** is anyone writing to an account; what the account sends lands in its inbox;
- the **owner's phone** is the account's primary phone: it writes in the account's own
  "message yourself" chat (the self chat) or in any of its chats, and linked devices receive
  what it wrote as the account's own messages (``from_me``), as WhatsApp delivers messages
  sent from the phone to linked devices.

Every method that changes the world returns the :data:`Action` list the server must carry
out, in order: frames to send on connections and connections to close. Bad input raises
:class:`WorldError` with an HTTP status, a stable ``code`` and the offending ``field``.
``tick()`` advances time-driven things (QR rotation); the clock is injectable.

The world also keeps, per linked device, every interval during which it had a connection
(:class:`Interval`: which connection, the client label its ``hello`` gave, when it began and
ended and why), and counts **double connections**: a device saying ``hello`` while another
of its connections is still open (the old one gets ``stream_replaced``, as WhatsApp does).
A fleet must never cause one; tests read the record at ``GET /api/devices/{phone}/connections``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

USER_SUFFIX = "@s.whatsapp.net"
GROUP_SUFFIX = "@g.us"
MAX_TEXT = 65_536
MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_AUDIO_BYTES = 16 * 1024 * 1024  # WhatsApp's own limit for voice notes
MAX_BAN = 10 * 365 * 86_400.0
KEEP_MESSAGES = 10_000  # remembered for quoting
KEEP_INBOX = 1_000  # per contact or group
KEEP_READ_IDS = 1_000
KEEP_PENDING = 1_000  # per device; the oldest unacked messages are dropped beyond
KEEP_DEAD_CODES = 1_000
KEEP_INTERVALS = 1_000  # per device; the oldest closed intervals are dropped beyond
MAX_CLIENT_LABEL = 128
PAIRING_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"
MEDIA_KINDS = frozenset(
    {"audio", "voice", "video", "document", "sticker", "location", "contact", "poll"}
)
OUTCOMES = ("logout", "replace", "ban", "outdated", "disconnect")

_PHONE_RE = re.compile(r"[0-9]{6,15}")
_GROUP_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}")
_MSG_ID_RE = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces


class WorldError(Exception):
    """Bad input or an impossible request; the server answers ``status`` with this as JSON."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


@dataclass(frozen=True)
class Send:
    conn: int
    frame: dict[str, Any]


@dataclass(frozen=True)
class Close:
    conn: int
    abrupt: bool = False  # drop the socket without a close handshake


Action = Send | Close


# --------------------------------------------------------------------------- validation


def bad(field_name: str, problem: str) -> WorldError:
    return WorldError(400, "invalid_field", f"{field_name}: {problem}", field_name)


def check_phone(value: Any, field_name: str = "phone") -> str:
    if not isinstance(value, str) or not _PHONE_RE.fullmatch(value):
        raise bad(field_name, "must be 6 to 15 digits with country code, no '+'")
    return value


def _opt_str(body: Mapping[str, Any], name: str, max_len: int = 256) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad(name, f"must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise bad(name, f"is longer than {max_len} characters")
    return value


def _req_str(body: Mapping[str, Any], name: str, max_len: int = 256) -> str:
    value = _opt_str(body, name, max_len)
    if value is None or value == "":
        raise bad(name, "is required")
    return value


def _check_body(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise WorldError(400, "invalid_body", "the body must be a JSON object")
    return body


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(name, f"must be a number, got {type(value).__name__}")
    if not low < value <= high:
        raise bad(name, f"must be > {low} and <= {high}")
    return float(value)


def phone_of_jid(jid: str) -> str:
    """The phone number of a user JID (``<digits>@s.whatsapp.net``)."""
    return jid.removesuffix(USER_SUFFIX)


def user_jid(phone: str) -> str:
    return phone + USER_SUFFIX


def group_jid(gid: str) -> str:
    return gid + GROUP_SUFFIX


def normalize_pairing_code(code: str) -> str:
    return code.replace("-", "").replace(" ", "").upper()


# --------------------------------------------------------------------------- model


@dataclass
class Pending:
    frame: dict[str, Any]
    delivered: bool = False  # sent on the device's current connection


#: Why a device's connection ended: the socket closed (either side), the server dropped it
#: after unanswered pings, or the world ended it (the frame it sent first, or ``disconnect``).
EndReason = Literal["closed", "ping_timeout", "stream_replaced", "logged_out",
                    "temporary_ban", "client_outdated", "disconnect"]


@dataclass
class Interval:
    """One stretch of time during which a device had a connection."""

    conn: int
    client: str  # the label the device's hello gave (a fleet sends its host id)
    start: float
    end: float | None = None  # None: still connected
    ended_by: EndReason | None = None

    def to_json(self) -> dict[str, Any]:
        return {"conn": self.conn, "client": self.client, "start": self.start,
                "end": self.end, "ended_by": self.ended_by}


@dataclass
class Device:
    id: str
    token: str
    phone: str
    linked_at: float
    conn: int | None = None
    pending: list[Pending] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)
    #: hellos while another connection of this device was open (each answered by
    #: stream_replaced on the older one): what a fleet must never cause
    double_connections: int = 0


@dataclass
class Account:
    phone: str
    push_name: str
    created_at: float
    devices: dict[str, Device] = field(default_factory=dict)
    typing: dict[str, bool] = field(default_factory=dict)
    read_ids: list[str] = field(default_factory=list)
    banned_until: float | None = None
    ban_reason: str = ""
    self_chat: list[dict[str, Any]] = field(default_factory=list)  # the owner's phone + devices


@dataclass
class Contact:
    phone: str
    name: str
    inbox: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Group:
    gid: str
    name: str
    members: list[str] = field(default_factory=list)
    inbox: list[dict[str, Any]] = field(default_factory=list)


ConnState = Literal["new", "qr", "connected", "closed"]


@dataclass
class Conn:
    id: int
    opened_at: float
    state: ConnState = "new"
    device: Device | None = None
    qr_code: str | None = None
    qr_issued: int = 0
    qr_expires_at: float = 0.0
    pairing: tuple[str, str] | None = None  # (phone, normalized code)
    client: str = ""  # the hello's optional "client" label


class World:
    def __init__(
        self,
        *,
        qr_rotate: float = 20.0,
        qr_max: int = 6,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if qr_rotate <= 0:
            raise ValueError("qr_rotate must be positive")
        if qr_max < 1:
            raise ValueError("qr_max must be at least 1")
        self.qr_rotate = qr_rotate
        self.qr_max = qr_max
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self.accounts: dict[str, Account] = {}
        self.contacts: dict[str, Contact] = {}
        self.groups: dict[str, Group] = {}
        self.messages: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.tokens: dict[str, Device] = {}
        self.revoked: OrderedDict[str, None] = OrderedDict()
        self.conns: dict[int, Conn] = {}
        self._dead_codes: OrderedDict[str, str] = OrderedDict()  # QR/pairing code -> why
        self._next_conn = 1
        self.version = 0  # bumped on every change worth persisting
        # ids the devices chose for their sends: WhatsApp treats a resend of the same id as
        # the same message, which is what makes a worker's retry after a crash harmless.
        self.sent_ids: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ helpers

    def now(self) -> float:
        return self._clock()

    def _hex(self, nbytes: int) -> str:
        return f"{self._rng.getrandbits(nbytes * 8):0{nbytes * 2}x}"

    def _new_msg_id(self) -> str:
        return "3EB0" + self._hex(8).upper()

    def _bury_code(self, code: str, why: str) -> None:
        self._dead_codes[code] = why
        while len(self._dead_codes) > KEEP_DEAD_CODES:
            self._dead_codes.popitem(last=False)

    def _remember(self, msg_id: str, record: dict[str, Any]) -> None:
        self.messages[msg_id] = record
        self.messages.move_to_end(msg_id)
        while len(self.messages) > KEEP_MESSAGES:
            self.messages.popitem(last=False)

    def _account(self, phone: str) -> Account:
        check_phone(phone)
        account = self.accounts.get(phone)
        if account is None:
            raise WorldError(404, "unknown_account", f"no account {phone} (link a device first)")
        return account

    def _conn(self, conn_id: int) -> Conn:
        conn = self.conns.get(conn_id)
        if conn is None:
            raise KeyError(f"unknown connection {conn_id}")
        return conn

    def _drop(self, conn: Conn, why: EndReason, abrupt: bool = False) -> list[Action]:
        """Unbind a connection now and tell the server to close it."""
        self._unbind(conn, why)
        conn.state = "closed"
        return [Close(conn.id, abrupt)]

    def _unbind(self, conn: Conn, why: EndReason) -> None:
        if conn.qr_code is not None:
            self._bury_code(conn.qr_code, "expired")
            conn.qr_code = None
        if conn.pairing is not None:
            self._bury_code(conn.pairing[1], "expired")
            conn.pairing = None
        device = conn.device
        if device is not None and device.conn == conn.id:
            device.conn = None
            for item in device.pending:
                item.delivered = False
            current = device.intervals[-1] if device.intervals else None
            if current is not None and current.conn == conn.id and current.end is None:
                current.end = self.now()
                current.ended_by = why
        conn.device = None

    # ------------------------------------------------------------------ connections

    def open_conn(self) -> int:
        conn = Conn(id=self._next_conn, opened_at=self.now())
        self._next_conn += 1
        self.conns[conn.id] = conn
        return conn.id

    def close_conn(self, conn_id: int, why: EndReason = "closed") -> None:
        """The socket ended (either side, or the server gave up on its pings: ``why``);
        idempotent."""
        conn = self.conns.pop(conn_id, None)
        if conn is not None:
            self._unbind(conn, why)
            conn.state = "closed"

    def device_frame(self, conn_id: int, frame: Any) -> list[Action]:
        """Handle one decoded JSON frame from a device connection."""
        conn = self._conn(conn_id)
        if conn.state == "closed":
            return []
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return [self._error(conn, "a frame must be a JSON object with a string 'type'")]
        kind = frame["type"]
        if conn.state == "new" and kind != "hello":
            return [self._error(conn, f"send hello first (got {kind!r})")]
        handler = {
            "hello": self._on_hello,
            "ack": self._on_ack,
            "send": self._on_send,
            "typing": self._on_typing,
            "read": self._on_read,
            "pair_phone": self._on_pair_phone,
        }.get(kind)
        if handler is None:
            return [self._error(conn, f"unknown frame type {kind!r}")]
        return handler(conn, frame)

    @staticmethod
    def _error(conn: Conn, message: str) -> Send:
        return Send(conn.id, {"type": "error", "error": message})

    def _on_hello(self, conn: Conn, frame: dict[str, Any]) -> list[Action]:
        if conn.state != "new":
            return [self._error(conn, "hello was already sent on this connection")]
        token = frame.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > 256):
            return [self._error(conn, "hello: token must be a string or null")]
        client = frame.get("client", "")
        if not isinstance(client, str) or len(client) > MAX_CLIENT_LABEL:
            return [self._error(conn, f"hello: client must be a string of at most "
                                      f"{MAX_CLIENT_LABEL} characters")]
        conn.client = client
        if token is not None and token in self.revoked:
            return [
                Send(conn.id, {"type": "logged_out", "reason": "this device was removed"}),
                *self._drop(conn, "logged_out"),
            ]
        device = self.tokens.get(token) if token is not None else None
        if device is None:
            conn.state = "qr"
            return self._issue_qr(conn)
        account = self.accounts[device.phone]
        if account.banned_until is not None and account.banned_until > self.now():
            return [Send(conn.id, self._ban_frame(account)), *self._drop(conn, "temporary_ban")]
        actions: list[Action] = []
        if device.conn is not None and device.conn in self.conns:
            device.double_connections += 1
            old = self.conns[device.conn]
            actions.append(Send(old.id, {"type": "stream_replaced"}))
            actions.extend(self._drop(old, "stream_replaced"))
        actions.extend(self._bind(conn, device))
        return actions

    def _bind(self, conn: Conn, device: Device) -> list[Action]:
        account = self.accounts[device.phone]
        conn.state = "connected"
        conn.device = device
        device.conn = conn.id
        device.intervals.append(Interval(conn.id, conn.client, self.now()))
        if len(device.intervals) > KEEP_INTERVALS:
            del device.intervals[0]
        actions: list[Action] = [Send(conn.id, self._connected_frame(account))]
        for item in device.pending:
            item.delivered = True
            actions.append(Send(conn.id, item.frame))
        return actions

    @staticmethod
    def _connected_frame(account: Account) -> dict[str, Any]:
        return {
            "type": "connected",
            "jid": user_jid(account.phone),
            "phone": account.phone,
            "push_name": account.push_name,
        }

    @staticmethod
    def _ban_frame(account: Account) -> dict[str, Any]:
        return {
            "type": "temporary_ban",
            "reason": account.ban_reason,
            "expires_at": account.banned_until,
        }

    def _issue_qr(self, conn: Conn) -> list[Action]:
        if conn.qr_code is not None:
            self._bury_code(conn.qr_code, "expired")
        conn.qr_code = f"sim-qr:{self._hex(12)}"
        conn.qr_issued += 1
        conn.qr_expires_at = self.now() + self.qr_rotate
        return [Send(conn.id, {"type": "qr", "code": conn.qr_code})]

    def tick(self) -> list[Action]:
        """Rotate QR codes that are due; after ``qr_max`` codes send ``qr_expired``."""
        now = self.now()
        actions: list[Action] = []
        for conn in list(self.conns.values()):
            if conn.state != "qr" or conn.qr_expires_at > now:
                continue
            if conn.qr_issued >= self.qr_max:
                actions.append(Send(conn.id, {"type": "qr_expired"}))
                actions.extend(self._drop(conn, "closed"))
            else:
                actions.extend(self._issue_qr(conn))
        return actions

    def _on_ack(self, conn: Conn, frame: dict[str, Any]) -> list[Action]:
        msg_id = frame.get("id")
        if not isinstance(msg_id, str):
            return [self._error(conn, "ack: id must be a string")]
        device = conn.device
        if conn.state != "connected" or device is None:
            return [self._error(conn, "ack: not connected")]
        for index, item in enumerate(device.pending):
            if item.delivered and item.frame["id"] == msg_id:
                del device.pending[index]
                self.version += 1
                break
        return []  # acking twice is harmless, as with WhatsApp receipts

    def _on_send(self, conn: Conn, frame: dict[str, Any]) -> list[Action]:
        req = frame.get("req")
        if isinstance(req, bool) or not isinstance(req, int):
            return [self._error(conn, "send: req must be an integer")]

        def fail(error: str) -> list[Action]:
            return [Send(conn.id, {"type": "send_error", "req": req, "error": error})]

        device = conn.device
        if conn.state != "connected" or device is None:
            return fail("not connected")
        to, text, quote_id = frame.get("to"), frame.get("text"), frame.get("quote_id")
        if not isinstance(to, str):
            return fail("to: must be a chat JID string")
        extra, problem = _send_extra(frame)
        if problem:
            return fail(problem)
        if not isinstance(text, str) or (text == "" and not extra):
            return fail("text: must be a non-empty string")
        if len(text) > MAX_TEXT:
            return fail(f"text: longer than {MAX_TEXT} characters")
        if quote_id is not None and not isinstance(quote_id, str):
            return fail("quote_id: must be a string or null")
        chosen = frame.get("id")
        if chosen is not None and (not isinstance(chosen, str) or not 0 < len(chosen) <= 64):
            return fail("id: must be a string of 1 to 64 characters or null")
        if chosen is not None and (device.phone, chosen) in self.sent_ids:
            return [Send(conn.id, {"type": "sent", "req": req, "id": chosen, "duplicate": True})]
        recipients: list[Contact] = []
        group: Group | None = None
        account = self.accounts[device.phone]
        if to == user_jid(device.phone):
            pass  # the self chat: only the account itself reads it
        elif to.endswith(USER_SUFFIX):
            contact = self.contacts.get(to.removesuffix(USER_SUFFIX))
            if contact is None:
                return fail(f"unknown chat {to}")
            recipients = [contact]
        elif to.endswith(GROUP_SUFFIX):
            group = self.groups.get(to.removesuffix(GROUP_SUFFIX))
            if group is None:
                return fail(f"unknown chat {to}")
            recipients = [self.contacts[p] for p in group.members if p in self.contacts]
        else:
            return fail(f"unknown chat {to}")
        msg_id = chosen or self._new_msg_id()
        self.sent_ids.add((device.phone, msg_id))
        entry = {
            "id": msg_id,
            "from": device.phone,
            "chat": to,
            "text": text,
            "quoted_id": quote_id,
            "ts": self.now(),
            "by": "device",
            "via": conn.client,  # which client sent it (a fleet: the host)
            **extra,
        }
        for contact in recipients:
            _append_capped(contact.inbox, entry)
        if group is not None:
            _append_capped(group.inbox, entry)
        if to == user_jid(device.phone):
            _append_capped(account.self_chat, entry)
        self._remember(msg_id, {"sender": device.phone, "text": text, "chat": to})
        self.version += 1
        return [Send(conn.id, {"type": "sent", "req": req, "id": msg_id})]

    def _on_typing(self, conn: Conn, frame: dict[str, Any]) -> list[Action]:
        to, on = frame.get("to"), frame.get("on")
        if not isinstance(to, str) or not isinstance(on, bool):
            return [self._error(conn, "typing: needs to (string) and on (boolean)")]
        if conn.device is None:
            return [self._error(conn, "typing: not connected")]
        self.accounts[conn.device.phone].typing[to] = on
        return []

    def _on_read(self, conn: Conn, frame: dict[str, Any]) -> list[Action]:
        ids = frame.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return [self._error(conn, "read: ids must be a list of strings")]
        if conn.device is None:
            return [self._error(conn, "read: not connected")]
        read = self.accounts[conn.device.phone].read_ids
        for msg_id in ids:
            if msg_id not in read:
                read.append(msg_id)
        del read[:-KEEP_READ_IDS]
        return []

    def _on_pair_phone(self, conn: Conn, frame: dict[str, Any]) -> list[Action]:
        phone = frame.get("phone")
        if not isinstance(phone, str) or not _PHONE_RE.fullmatch(phone):
            return [self._error(conn, "pair_phone: phone must be 6 to 15 digits")]
        if conn.state != "qr":
            return [self._error(conn, "pair_phone: this connection is already linked")]
        if conn.pairing is not None:
            self._bury_code(conn.pairing[1], "expired")
        code = "".join(self._rng.choice(PAIRING_ALPHABET) for _ in range(8))
        conn.pairing = (phone, code)
        return [Send(conn.id, {"type": "pairing_code", "code": f"{code[:4]}-{code[4:]}"})]

    # ------------------------------------------------------------------ the phone

    def pending_qr(self) -> list[dict[str, Any]]:
        """Connections waiting for a scan, oldest first (for tests and the web page)."""
        return [
            {
                "conn": c.id,
                "code": c.qr_code,
                "issued": c.qr_issued,
                "expires_at": c.qr_expires_at,
                "pairing_phone": c.pairing[0] if c.pairing else None,
            }
            for c in sorted(self.conns.values(), key=lambda c: c.id)
            if c.state == "qr" and c.qr_code is not None
        ]

    def scan(self, phone: str, body: Any) -> list[Action]:
        """The phone ``phone`` scans QR ``body["code"]``."""
        check_phone(phone)
        body = _check_body(body)
        code = _req_str(body, "code")
        push_name = _opt_str(body, "push_name", 64)
        for conn in self.conns.values():
            if conn.state == "qr" and conn.qr_code == code:
                return self._link(conn, phone, push_name)
        raise self._dead_or_unknown(code, "QR code")

    def pairing_link(self, phone: str, body: Any) -> list[Action]:
        """The phone ``phone`` types pairing code ``body["code"]``."""
        check_phone(phone)
        body = _check_body(body)
        code = normalize_pairing_code(_req_str(body, "code", 16))
        push_name = _opt_str(body, "push_name", 64)
        for conn in self.conns.values():
            if conn.state == "qr" and conn.pairing == (phone, code):
                return self._link(conn, phone, push_name)
        raise self._dead_or_unknown(code, f"pairing code for {phone}")

    def _dead_or_unknown(self, code: str, what: str) -> WorldError:
        why = self._dead_codes.get(code)
        if why is not None:
            return WorldError(410, "code_" + why.replace(" ", "_"), f"this {what} is {why}", "code")
        return WorldError(404, "unknown_code", f"no device is showing this {what}", "code")

    def _link(self, conn: Conn, phone: str, push_name: str | None) -> list[Action]:
        now = self.now()
        account = self.accounts.get(phone)
        banned_until = account.banned_until if account is not None else None
        if banned_until is not None and banned_until > now:
            raise WorldError(403, "banned", f"account {phone} is temporarily banned")
        if account is None:
            account = Account(phone, push_name or f"Sim {phone[-4:]}", now)
            self.accounts[phone] = account
        elif push_name:
            account.push_name = push_name
        if conn.qr_code is not None:
            self._bury_code(conn.qr_code, "already used")
            conn.qr_code = None
        if conn.pairing is not None:
            self._bury_code(conn.pairing[1], "already used")
            conn.pairing = None
        device = Device(id=f"dev-{self._hex(4)}", token=self._hex(24), phone=phone, linked_at=now)
        account.devices[device.id] = device
        self.tokens[device.token] = device
        self.version += 1
        paired = {
            "type": "paired",
            "token": device.token,
            "jid": user_jid(phone),
            "phone": phone,
            "push_name": account.push_name,
            "device_id": device.id,
        }
        return [Send(conn.id, paired), *self._bind(conn, device)]

    # ------------------------------------------------------------------ contacts

    def _content(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """What a message carries, validated: text, id, quote, image, other media."""
        text = _opt_str(body, "text", MAX_TEXT) or ""
        msg_id = _opt_str(body, "id", 128)
        if msg_id is not None and not _MSG_ID_RE.fullmatch(msg_id):
            raise bad("id", "must be 1 to 128 printable ASCII characters without spaces")
        quoted_id = _opt_str(body, "quoted_id", 128)
        image = self._parse_image(body.get("image"))
        audio = self._parse_audio(body.get("audio"))
        media = _opt_str(body, "media", 32)
        if media is not None and media not in MEDIA_KINDS:
            raise bad("media", f"must be one of {', '.join(sorted(MEDIA_KINDS))}")
        if sum(x is not None for x in (image, media, audio)) > 1:
            raise bad("media", "image, audio and media cannot be combined")
        if not text and image is None and media is None and audio is None:
            raise bad("text", "is required (unless image, audio or media is given)")
        if image is not None and not text:
            text = image["caption"]
        elif image is not None and not image["caption"]:
            image["caption"] = text
        return {"text": text, "id": msg_id, "quoted_id": quoted_id, "image": image,
                "media": media or "", "audio": audio}

    @staticmethod
    def _group_id(body: Mapping[str, Any]) -> str | None:
        gid = _opt_str(body, "group", 64)
        if gid is not None and not _GROUP_RE.fullmatch(gid):
            raise bad("group", "must be letters, digits and '-' (at most 64)")
        return gid

    def _deliver(self, account: Account, frame: dict[str, Any]) -> list[Action]:
        """Queue ``frame`` for every linked device of ``account``; send it to connected ones."""
        self._remember(frame["id"], {"sender": phone_of_jid(frame["sender"]),
                                     "text": frame["text"], "chat": frame["chat"]})
        self.version += 1
        actions: list[Action] = []
        for device in account.devices.values():
            item = Pending(frame)
            device.pending.append(item)
            del device.pending[:-KEEP_PENDING]
            if device.conn is not None:
                item.delivered = True
                actions.append(Send(device.conn, frame))
        return actions

    def post_message(self, body: Any) -> tuple[str, list[Action]]:
        """A contact writes to an account; returns the message id and the deliveries."""
        body = _check_body(body)
        sender = check_phone(body.get("from"), "from")
        to = check_phone(body.get("to"), "to")
        content = self._content(body)
        gid = self._group_id(body)
        group_name = _opt_str(body, "group_name", 128)
        push_name = _opt_str(body, "push_name", 64)
        mentions = body.get("mentions") or []
        if not isinstance(mentions, list) or not all(isinstance(m, str) for m in mentions):
            raise bad("mentions", "must be a list of phone numbers")
        for mention in mentions:
            check_phone(mention, "mentions")
        if sender == to:
            raise bad("from", "must differ from to (the owner writes with "
                      f"POST /api/accounts/{to}/messages)")
        account = self._account(to)

        contact = self._contact(sender, push_name)
        quoted_id = content["quoted_id"]
        quoted = self.messages.get(quoted_id) if quoted_id else None
        is_group = gid is not None
        if gid is not None:
            group = self._group(gid, group_name)
            if sender not in group.members:
                group.members.append(sender)
            chat = group_jid(gid)
        else:
            chat = user_jid(sender)
        mentioned = to in mentions or (
            is_group and quoted is not None and quoted.get("sender") == to
        )
        msg_id = content["id"] or self._new_msg_id()
        frame: dict[str, Any] = {
            "type": "message",
            "id": msg_id,
            "chat": chat,
            "sender": user_jid(sender),
            "sender_name": contact.name,
            "text": content["text"],
            "ts": self.now(),
            "is_group": is_group,
            "mentioned": mentioned,
            "quoted_id": quoted_id,
            "quoted_text": quoted["text"] if quoted else "",
            "image": content["image"],
            "audio": content["audio"],
            "media": content["media"],
        }
        return msg_id, self._deliver(account, frame)

    def owner_message(self, phone: str, body: Any) -> tuple[str, list[Action]]:
        """The owner's phone of account ``phone`` writes: in the self chat (no ``to`` and no
        ``group``), to contact ``to``, or in group ``group``. The account's linked devices get
        it as an own message (``from_me``); the contact or group gets it like a device's send.
        """
        account = self._account(phone)
        body = _check_body(body)
        content = self._content(body)
        to = body.get("to")
        gid = self._group_id(body)
        if to is not None:
            check_phone(to, "to")
            if gid is not None:
                raise bad("group", "cannot be combined with to (one chat per message)")
            if to == phone:
                to = None  # writing to one's own number is the self chat
        quoted_id = content["quoted_id"]
        quoted = self.messages.get(quoted_id) if quoted_id else None
        msg_id = content["id"] or self._new_msg_id()
        if gid is not None:
            group = self.groups.get(gid)
            if group is None:
                raise WorldError(404, "unknown_chat", f"no group {gid} (a contact must write "
                                 "in it first)", "group")
            chat = group_jid(gid)
        elif to is not None:
            self._contact(to, None)
            chat = user_jid(to)
        else:
            chat = user_jid(phone)
        entry = {"id": msg_id, "from": phone, "chat": chat, "text": content["text"],
                 "quoted_id": quoted_id, "ts": self.now(), "by": "phone"}
        if gid is not None:
            for member in self.groups[gid].members:
                if member in self.contacts:
                    _append_capped(self.contacts[member].inbox, entry)
            _append_capped(self.groups[gid].inbox, entry)
        elif to is not None:
            _append_capped(self.contacts[to].inbox, entry)
        else:
            _append_capped(account.self_chat, entry)
        frame: dict[str, Any] = {
            "type": "message",
            "id": msg_id,
            "chat": chat,
            "sender": user_jid(phone),
            "sender_name": account.push_name,
            "text": content["text"],
            "ts": entry["ts"],
            "is_group": gid is not None,
            "from_me": True,
            "mentioned": False,
            "quoted_id": quoted_id,
            "quoted_text": quoted["text"] if quoted else "",
            "image": content["image"],
            "audio": content["audio"],
            "media": content["media"],
        }
        return msg_id, self._deliver(account, frame)

    def _contact(self, phone: str, push_name: str | None) -> Contact:
        contact = self.contacts.get(phone)
        if contact is None:
            contact = Contact(phone, push_name or f"Contact {phone[-4:]}")
            self.contacts[phone] = contact
        elif push_name:
            contact.name = push_name
        return contact

    def _group(self, gid: str, name: str | None) -> Group:
        group = self.groups.get(gid)
        if group is None:
            group = Group(gid, name or f"Group {gid}")
            self.groups[gid] = group
        elif name:
            group.name = name
        return group

    @staticmethod
    def _parse_image(value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise bad("image", "must be an object with mime_type, data_b64 and caption")
        mime = value.get("mime_type")
        if not isinstance(mime, str) or not re.fullmatch(r"image/[a-z0-9.+-]{1,40}", mime):
            raise bad("image.mime_type", "must be an image/* type such as image/png")
        data = _data_b64(value, "image", MAX_IMAGE_BYTES)
        caption = value.get("caption", "") or ""
        if not isinstance(caption, str) or len(caption) > MAX_TEXT:
            raise bad("image.caption", "must be a string")
        return {"mime_type": mime, "data_b64": data, "caption": caption}

    @staticmethod
    def _parse_audio(value: Any) -> dict[str, Any] | None:
        """A voice note (``voice``: true, the default) or audio file: mime_type (audio/*),
        data_b64, seconds; delivered like WhatsApp's audioMessage."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise bad("audio", "must be an object with mime_type, data_b64 and seconds")
        mime = value.get("mime_type", "audio/ogg; codecs=opus")
        if not isinstance(mime, str) or not re.fullmatch(r"audio/[a-z0-9.+-]{1,40}(; ?codecs="
                                                         r"[a-z0-9]{1,20})?", mime):
            raise bad("audio.mime_type", "must be an audio/* type such as audio/ogg")
        data = _data_b64(value, "audio", MAX_AUDIO_BYTES)
        seconds = value.get("seconds", 0)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise bad("audio.seconds", "must be a number of seconds >= 0")
        return {"mime_type": mime, "data_b64": data, "seconds": float(seconds),
                "voice": bool(value.get("voice", True))}

    def contact_inbox(self, phone: str) -> list[dict[str, Any]]:
        check_phone(phone)
        contact = self.contacts.get(phone)
        return list(contact.inbox) if contact else []

    def self_chat(self, phone: str) -> list[dict[str, Any]]:
        """The account's own "message yourself" chat: what its phone and devices wrote."""
        return list(self._account(phone).self_chat)

    def group_inbox(self, gid: str) -> list[dict[str, Any]]:
        if not _GROUP_RE.fullmatch(gid):
            raise bad("group", "must be letters, digits and '-' (at most 64)")
        group = self.groups.get(gid)
        return list(group.inbox) if group else []

    # ------------------------------------------------------------------ accounts

    def account_state(self, phone: str) -> dict[str, Any]:
        account = self._account(phone)
        return {
            "phone": account.phone,
            "jid": user_jid(account.phone),
            "push_name": account.push_name,
            "linked": bool(account.devices),
            "connected": any(d.conn is not None for d in account.devices.values()),
            "devices": [
                {
                    "id": d.id,
                    "connected": d.conn is not None,
                    "linked_at": d.linked_at,
                    "pending": len(d.pending),
                }
                for d in account.devices.values()
            ],
            "typing": dict(account.typing),
            "read_ids": list(account.read_ids),
            "banned_until": account.banned_until,
        }

    def connections(self, phone: str) -> dict[str, Any]:
        """Every interval during which each of the account's devices had a connection, and
        the double connections: a device's hello while another of its connections was open
        (``double_connections``), and intervals of two different devices of the account that
        overlap (``overlapping_devices``: one account linked and connected twice)."""
        account = self._account(phone)
        devices = list(account.devices.values())
        return {
            "phone": account.phone,
            "double_connections": sum(d.double_connections for d in devices),
            "overlapping_devices": _overlaps(devices),
            "devices": [
                {"id": d.id, "connected": d.conn is not None,
                 "double_connections": d.double_connections,
                 "intervals": [i.to_json() for i in d.intervals]}
                for d in devices
            ],
        }

    def all_connections(self) -> dict[str, Any]:
        """:meth:`connections` of every account, and the totals a chaos run reports."""
        accounts = [self.connections(p) for p in sorted(self.accounts)]
        return {
            "double_connections": sum(a["double_connections"] for a in accounts),
            "overlapping_devices": sum(a["overlapping_devices"] for a in accounts),
            "accounts": accounts,
        }

    def list_accounts(self) -> list[dict[str, Any]]:
        return [self.account_state(p) for p in sorted(self.accounts)]

    def outcome(self, phone: str, kind: str, body: Any = None) -> list[Action]:
        """Make WhatsApp's side do something to every device of an account."""
        if kind not in OUTCOMES:
            raise WorldError(404, "unknown_outcome", f"unknown outcome {kind!r}", "outcome")
        account = self._account(phone)
        body = _check_body({} if body is None else body)
        live = [self.conns[d.conn] for d in account.devices.values() if d.conn in self.conns]
        actions: list[Action] = []
        if kind == "logout":
            if not account.devices:
                raise WorldError(409, "not_linked", f"account {phone} has no linked device")
            for conn in live:
                actions.append(Send(conn.id, {"type": "logged_out", "reason": "logged out"}))
                actions.extend(self._drop(conn, "logged_out"))
            for device in account.devices.values():
                self.tokens.pop(device.token, None)
                self.revoked[device.token] = None
            while len(self.revoked) > KEEP_MESSAGES:
                self.revoked.popitem(last=False)
            account.devices.clear()
            account.typing.clear()
            self.version += 1
            return actions
        if kind == "ban":
            expires_in = _number(body, "expires_in", 3600.0, 0.0, MAX_BAN)
            reason = _opt_str(body, "reason", 256) or "temporary ban (simulated)"
            account.banned_until = self.now() + expires_in
            account.ban_reason = reason
            self.version += 1
            for conn in live:
                actions.append(Send(conn.id, self._ban_frame(account)))
                actions.extend(self._drop(conn, "temporary_ban"))
            return actions
        if not live:
            raise WorldError(409, "not_connected", f"account {phone} has no connected device")
        why: EndReason = "disconnect"
        if kind == "replace":
            why = "stream_replaced"
        elif kind == "outdated":
            why = "client_outdated"
        for conn in live:
            if kind == "replace":
                actions.append(Send(conn.id, {"type": "stream_replaced"}))
            elif kind == "outdated":
                actions.append(Send(conn.id, {"type": "client_outdated"}))
            actions.extend(self._drop(conn, why, abrupt=kind == "disconnect"))
        return actions

    def unban(self, phone: str) -> None:
        account = self._account(phone)
        account.banned_until = None
        account.ban_reason = ""
        self.version += 1

    # ------------------------------------------------------------------ persistence

    def to_state(self) -> dict[str, Any]:
        """Everything but live connections, as JSON-able data."""
        return {
            "version": 1,
            "accounts": [
                {
                    "phone": a.phone,
                    "push_name": a.push_name,
                    "created_at": a.created_at,
                    "banned_until": a.banned_until,
                    "ban_reason": a.ban_reason,
                    "read_ids": a.read_ids,
                    "self_chat": a.self_chat,
                    "devices": [
                        {
                            "id": d.id,
                            "token": d.token,
                            "linked_at": d.linked_at,
                            "pending": [p.frame for p in d.pending],
                        }
                        for d in a.devices.values()
                    ],
                }
                for a in self.accounts.values()
            ],
            "contacts": [
                {"phone": c.phone, "name": c.name, "inbox": c.inbox}
                for c in self.contacts.values()
            ],
            "groups": [
                {"gid": g.gid, "name": g.name, "members": g.members, "inbox": g.inbox}
                for g in self.groups.values()
            ],
            "messages": [[k, v] for k, v in self.messages.items()],
            "revoked": list(self.revoked),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the world's data with ``state`` (from :meth:`to_state`); raises ValueError."""
        try:
            if state.get("version") != 1:
                raise ValueError(f"unsupported state version {state.get('version')!r}")
            accounts: dict[str, Account] = {}
            tokens: dict[str, Device] = {}
            for a in state["accounts"]:
                account = Account(
                    str(a["phone"]), str(a["push_name"]), float(a["created_at"]),
                    banned_until=a.get("banned_until"), ban_reason=str(a.get("ban_reason", "")),
                    read_ids=[str(i) for i in a.get("read_ids", [])],
                    self_chat=[dict(m) for m in a.get("self_chat", [])],
                )
                for d in a["devices"]:
                    device = Device(
                        str(d["id"]), str(d["token"]), account.phone, float(d["linked_at"]),
                        pending=[Pending(dict(f)) for f in d.get("pending", [])],
                    )
                    account.devices[device.id] = device
                    tokens[device.token] = device
                accounts[account.phone] = account
            contacts = {
                str(c["phone"]): Contact(str(c["phone"]), str(c["name"]), list(c["inbox"]))
                for c in state["contacts"]
            }
            groups = {
                str(g["gid"]): Group(
                    str(g["gid"]), str(g["name"]), list(g["members"]), list(g["inbox"])
                )
                for g in state["groups"]
            }
            messages = OrderedDict((str(k), dict(v)) for k, v in state["messages"])
            revoked = OrderedDict((str(t), None) for t in state["revoked"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed state: {exc!r}") from None
        self.accounts, self.tokens, self.contacts = accounts, tokens, contacts
        self.groups, self.messages, self.revoked = groups, messages, revoked


def _overlaps(devices: list[Device]) -> int:
    """Pairs of intervals of *different* devices that overlap in time (an open interval has
    no end yet); a device's own intervals never overlap (its hello ends the last)."""
    spans = sorted((i.start, i.end if i.end is not None else math.inf, d.id)
                   for d in devices for i in d.intervals)
    count = 0
    for index, (_start, end, device) in enumerate(spans):
        for other_start, _other_end, other in spans[index + 1:]:
            if other_start >= end:
                break
            if other != device:
                count += 1
    return count


def _send_extra(frame: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A ``send`` frame's reaction or media, as the recipients' inbox shows it (media: its
    name, type, size and SHA-256, not its bytes); or the problem with it."""
    reaction, media = frame.get("reaction"), frame.get("media")
    if reaction is not None:
        if (not isinstance(reaction, dict) or not isinstance(reaction.get("target_id"), str)
                or not isinstance(reaction.get("emoji"), str)
                or not 0 < len(reaction["emoji"]) <= 8):
            return {}, "reaction: must be {target_id, emoji}"
        return {"reaction": {"target_id": reaction["target_id"],
                             "emoji": reaction["emoji"]}}, ""
    if media is not None:
        if not isinstance(media, dict) or media.get("kind") not in ("document", "image"):
            return {}, "media: kind must be document or image"
        name, mime, data = media.get("filename"), media.get("mime"), media.get("data")
        if not isinstance(name, str) or not isinstance(mime, str) or not isinstance(data, str):
            return {}, "media: filename, mime and data (base64) are strings"
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            return {}, "media: data is not base64"
        return {"media": {"kind": media["kind"], "filename": name, "mime": mime,
                          "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}}, ""
    return {}, ""


def _append_capped(items: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    items.append(entry)
    del items[:-KEEP_INBOX]


def _data_b64(value: Mapping[str, Any], kind: str, limit: int) -> str:
    """A media object's ``data_b64``, checked: present, base64, at most ``limit`` bytes."""
    data = value.get("data_b64")
    if not isinstance(data, str) or not data:
        raise bad(f"{kind}.data_b64", f"is required (base64 of the {kind} bytes)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{kind}.data_b64", "is not valid base64") from None
    if len(raw) > limit:
        raise bad(f"{kind}.data_b64", f"decodes to more than {limit} bytes")
    return data
