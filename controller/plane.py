"""The control plane: where accounts are requested and where the fleet reports.

"Session" names three things in this project; the code says which. The collection names are
the external contract (apps read and write them) and stay as they are:

- an **account document** (``AccountDoc``): ``user_sessions/{userId}``, one WhatsApp account
  a client asked for and what the controller says about it (status, QR, errors, process);
- a **link record**: ``sessions/{userId}``, the facts of the account's WhatsApp link once it
  connected (``put_link_record``);
- a **Claude session**: the worker's conversation with Claude for one chat (``agent/``),
  never stored here.

Three implementations behind :class:`ControlPlane`: Firestore (``controller/firestore.py``), a
local SQLite store (``controller/local.py``) and PostgreSQL (``controller/pgplane.py``), chosen
by ``controller.control_plane``. One contract suite (``tests/test_control_plane_contract.py``)
runs against all three.

Layout (same names in every backend, after the seed's collections; the PostgreSQL plane's
tables are ``accounts`` and ``link_records`` for the first and last):
- ``user_sessions/{userId}``: ``status`` (see :class:`wabridge.status.DocStatus`), ``qrCode``
  (PNG data URL), ``qrRaw`` (the raw QR string, for terminals), ``pairingPhone`` /
  ``pairingCode``, ``phone``, ``pushName``, ``error`` ({code, message, at}), ``host``,
  ``claimedAt``, ``unit`` ({activeState, subState, mainPid, nRestarts, result}), ``process``
  ({pid, state, restarts, memoryBytes, cpuSeconds, since}), ``settings`` (per-user policy),
  ``updatedAt``.
- ``summaries/{userId}__{chatId}__v{n}``: a chat's conversation summaries, one per context
  rotation (userId, chatId, number, text, createdAt). In composite ids each part has ``%``,
  ``/`` and ``_`` percent-encoded, so ids are injective (``controller.local.message_doc_id``);
  a write never replaces a record whose ``userId`` is another user's (``ForeignRecordError``).
- ``sessions/{userId}``: the link record, WhatsApp link facts (jid, phone, pushName,
  connectedAt).
- ``messages/{userId}__{eventId}``: processed messages (userId, chatId, direction, sender,
  text, ts), written idempotently: re-sending a frame rewrites the same document.

Documents are parsed into :class:`AccountDoc` here at the boundary; the controller core never
sees a raw dict.
"""

from __future__ import annotations

import abc
import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wabridge.errors import UserIdError, WabridgeError
from wabridge.protocol import MessageEvent, Usage
from wabridge.status import REQUESTS, DocStatus, parse_doc_status


class PlaneError(WabridgeError):
    """The control plane's backend refused or failed a request."""

    code = "plane_error"
    explanation = "the control plane failed a request; the controller's journal says which"


class PlaneUnavailable(PlaneError):
    """The backend is unreachable or overloaded; retrying later may succeed."""

    code = "plane_unavailable"
    explanation = ("Firestore is unreachable or overloaded; the controller retries with back-off "
                   "(check the network, a proxy, or firebase.emulator_host)")


class PlaneDenied(PlaneError):
    """The backend rejected our credentials or denied access; retrying will not help."""

    code = "plane_denied"
    explanation = ("Firestore refused the credentials: check firebase.credentials (or the "
                   "'firebase' systemd credential) and the service account's roles")


@dataclass(frozen=True)
class AccountDoc:
    """One ``user_sessions`` document as the controller knows it: what its decisions read and
    what ``wabridgectl status``/``watch`` show (the admin socket reads this, nothing else).

    ``data`` is the document's fields as parsed from: the controller merges its own writes
    into it (``merged``) so its view never waits for the change feed's echo."""

    user_id: str
    status: DocStatus | None  # None: absent or unknown (see raw_status)
    raw_status: object
    settings: Mapping[str, Any] = field(default_factory=dict)
    pairing_phone: str | None = None
    host: str | None = None
    error_code: str | None = None
    unit_state: Mapping[str, Any] = field(default_factory=dict)
    error_message: str = ""
    error_source: str | None = None  # who reported the error (see ``error_field``)
    status_detail: str = ""
    phone: str | None = None
    qr_raw: str | None = None
    pairing_code: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    process: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def merged(self, fields: Mapping[str, Any]) -> AccountDoc:
        """This document after ``ControlPlane.update(fields)`` (the same merge rules)."""
        data = copy.deepcopy(dict(self.data))
        merge_fields(data, fields)
        return parse_account(self.user_id, data)


@dataclass(frozen=True)
class Removed:
    """The document of ``user_id`` was deleted."""

    user_id: str


Change = AccountDoc | Removed
ChangeCallback = Callable[[Change], None]


def parse_account(user_id: str, data: Mapping[str, Any]) -> AccountDoc:
    """Turn a raw document into a ``AccountDoc``; never raises (odd fields become None)."""
    raw_status = data.get("status")
    settings = data.get("settings")
    phone = data.get("pairingPhone")
    host = data.get("host")
    error = data.get("error")
    error = error if isinstance(error, Mapping) else {}
    unit = data.get("unit")
    return AccountDoc(
        user_id=user_id,
        status=parse_doc_status(raw_status),
        raw_status=raw_status,
        settings=dict(settings) if isinstance(settings, Mapping) else {},
        pairing_phone=phone if isinstance(phone, str) else None,
        host=host if isinstance(host, str) else None,
        error_code=str(error["code"]) if "code" in error else None,
        unit_state=dict(unit) if isinstance(unit, Mapping) else {},
        error_message=_text(error.get("message")),
        error_source=error.get("source") if isinstance(error.get("source"), str) else None,
        status_detail=_text(data.get("statusDetail")),
        phone=_text(data.get("phone")) or None,
        qr_raw=_text(data.get("qrRaw")) or None,
        pairing_code=_text(data.get("pairingCode")) or None,
        metrics=_map(data.get("metrics")),
        process=_map(data.get("process")),
        data=copy.deepcopy(dict(data)),
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _map(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def merge_fields(target: dict[str, Any], fields: Mapping[str, Any], *, top: bool = True) -> None:
    """Firestore's ``set(merge=True)``, as every plane (and ``AccountDoc.merged``) applies it:
    non-empty maps merge key by key, anything else (including an empty map) replaces with a
    copy; at the top level ``None`` deletes the field."""
    for key, value in fields.items():
        if value is None and top:
            target.pop(key, None)
        elif isinstance(value, Mapping) and value:
            current = target.get(key)
            if not isinstance(current, dict):
                current = target[key] = {}
            merge_fields(current, value, top=False)
        else:
            target[key] = copy.deepcopy(value)


# --- document ids and fields both planes write -----------------------------------------


def check_doc_id(user_id: str) -> str:
    """Ids valid as Firestore document ids (both planes accept the same ids): non-empty,
    no '/', not '.' or '..', not ``__.*__``. Raises ``UserIdError``."""
    if (
        not user_id
        or "/" in user_id
        or user_id in (".", "..")
        or (user_id.startswith("__") and user_id.endswith("__"))
    ):
        raise UserIdError(f"user id {user_id!r} cannot name a control-plane document")
    return user_id


def _id_part(part: str) -> str:
    """One part of a composite document id: '%', '/' (ids cannot contain it) and '_' (the
    separator's character) percent-encoded, so the only '_' in a composite id are the
    separators and the id names exactly one tuple of parts."""
    return part.replace("%", "%25").replace("/", "%2F").replace("_", "%5F")


def message_doc_id(user_id: str, event_id: str) -> str:
    """``{userId}__{eventId}``, each part encoded by ``_id_part`` (the Firestore id; the local
    plane keys by the pair). Without encoding '_', user ``alice`` with event ``_in:X`` and
    user ``alice_`` with event ``in:X`` shared one id: one user could overwrite another's
    record. Ids of parts without '%', '/' or '_' are unchanged."""
    return f"{_id_part(user_id)}__{_id_part(event_id)}"


def message_fields(user_id: str, event: MessageEvent) -> dict[str, Any]:
    """The fields of a message document (both planes)."""
    return {
        "userId": user_id,
        "eventId": event.event_id,
        "chatId": event.chat_id,
        "direction": event.direction,
        "sender": event.sender,
        "text": event.text,
        "ts": event.ts,
    }


def summary_doc_id(user_id: str, chat_id: str, number: int) -> str:
    """``{userId}__{chatId}__v{number}`` (parts encoded like message ids)."""
    return f"{message_doc_id(user_id, chat_id)}__v{number}"


def summary_fields(user_id: str, chat_id: str, number: int, text: str) -> dict[str, Any]:
    """The fields of a summary document (both planes)."""
    return {"userId": user_id, "chatId": chat_id, "number": number, "text": text,
            "createdAt": time.time()}


def usage_doc_id(user_id: str, day: str) -> str:
    """``{userId}__{YYYY-MM-DD}`` (the user part encoded like message ids)."""
    return f"{_id_part(user_id)}__{day}"


USAGE_FIGURES = ("turns", "inputTokens", "outputTokens", "cacheCreationTokens",
                 "cacheReadTokens", "costUsd", "messagesIn", "messagesOut",
                 "transcriptionSeconds")


def usage_fields(user_id: str, usage: Usage) -> dict[str, Any]:
    """The fields of a usage document (both planes): the day's totals as the worker reported
    them (absolute values: writing them again changes nothing)."""
    return {"userId": user_id, "day": usage.day, "turns": usage.turns,
            "inputTokens": usage.input_tokens, "outputTokens": usage.output_tokens,
            "cacheCreationTokens": usage.cache_creation_tokens,
            "cacheReadTokens": usage.cache_read_tokens, "costUsd": usage.cost_usd,
            "messagesIn": usage.messages_in, "messagesOut": usage.messages_out,
            "transcriptionSeconds": usage.transcription_seconds, "updatedAt": time.time()}


#: Who reported an error; only that source clears it (``controller.reconcile.clears_error``).
WORKER, CONTROLLER = "worker", "controller"


def error_field(code: str, message: str, source: str = CONTROLLER) -> dict[str, Any]:
    return {"code": code, "message": message, "source": source, "at": time.time()}


class ControlPlane(abc.ABC):
    """Async interface; implementations run blocking client calls off the event loop."""

    name: str

    @abc.abstractmethod
    async def watch(self, on_change: ChangeCallback) -> None:
        """Start delivering changes. The first deliveries are every existing document.

        ``on_change`` is called on the event loop thread that called ``watch``.
        """

    @abc.abstractmethod
    async def list_accounts(self) -> list[AccountDoc]:
        """Every account document, parsed."""

    async def pending_requests(self) -> list[AccountDoc]:
        """Documents whose status is a client's request (``*_requested``): the controller's
        check that the change feed missed nothing (``Controller.resync``). This default reads
        every document; a backend that can query by status should."""
        return [doc for doc in await self.list_accounts() if doc.status in REQUESTS]

    async def rewatch(self) -> None:  # noqa: B027 - a no-op unless a feed can go quiet
        """Re-open the change feed after it was found to have missed a change. The fresh feed
        delivers every document again, as ``watch`` does first."""

    def feed_alive(self) -> bool:
        """Whether the change feed's machinery runs (its task or listener supervisor has not
        ended). A feed can also go quiet while alive: ``Controller.resync`` covers that; the
        controller stops feeding its watchdog when this is False."""
        return True

    @abc.abstractmethod
    async def get(self, user_id: str) -> AccountDoc | None:
        """One account document, or None."""

    @abc.abstractmethod
    async def claim(
        self, user_id: str, expect: frozenset[DocStatus], new: DocStatus, host: str
    ) -> bool:
        """Atomically move a document from one of ``expect`` to ``new`` (with host and
        claimedAt); False if the document is gone or its status changed meanwhile."""

    @abc.abstractmethod
    async def update(self, user_id: str, fields: Mapping[str, Any]) -> None:
        """Merge ``fields`` into the document (creating it if needed); sets updatedAt.
        A value of ``None`` deletes that field."""

    @abc.abstractmethod
    async def request(self, user_id: str, status: DocStatus, **fields: Any) -> None:
        """What a client does: set a ``*_requested`` status (and fields), creating the doc."""

    @abc.abstractmethod
    async def delete(self, user_id: str) -> None:
        """Delete the account document (clients; tests)."""

    @abc.abstractmethod
    async def add_message(self, user_id: str, event: MessageEvent) -> None:
        """Record a processed message; idempotent by ``event.event_id``."""

    @abc.abstractmethod
    async def messages(self, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The latest recorded messages of a user, oldest first (for wabridgectl and tests)."""

    @abc.abstractmethod
    async def put_link_record(self, user_id: str, fields: Mapping[str, Any]) -> None:
        """Merge WhatsApp link facts into the link record ``sessions/{userId}``."""

    @abc.abstractmethod
    async def add_summary(self, user_id: str, chat_id: str, number: int, text: str) -> None:
        """Record a chat's conversation summary ``summaries/{userId}__{chatId}__v{number}``;
        idempotent by (user, chat, number)."""

    @abc.abstractmethod
    async def summaries(self, user_id: str, chat_id: str) -> list[dict[str, Any]]:
        """A chat's summaries, oldest first."""

    @abc.abstractmethod
    async def put_usage(self, user_id: str, usage: Usage) -> None:
        """Write a user's usage on a day, ``usage/{userId}__{YYYY-MM-DD}``
        (:func:`usage_fields`), replacing what was there."""

    @abc.abstractmethod
    async def usage(self, user_id: str | None, since_day: str) -> list[dict[str, Any]]:
        """Usage documents from ``since_day`` on (one user, or all), by user then day."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop watching and release clients."""
