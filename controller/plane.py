"""The control plane: where sessions are requested and where the fleet reports.

Two implementations behind :class:`ControlPlane`: Firestore (``controller/firestore.py``) and a
local SQLite store (``controller/local.py``), chosen by ``controller.control_plane``. One
contract suite (``tests/test_control_plane_contract.py``) runs against both.

Layout (same names in both backends, after the seed's collections):
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
- ``sessions/{userId}``: WhatsApp session facts (jid, phone, pushName, connectedAt).
- ``messages/{userId}__{eventId}``: processed messages (userId, chatId, direction, sender,
  text, ts), written idempotently: re-sending a frame rewrites the same document.

Documents are parsed into :class:`SessionDoc` here at the boundary; the controller core never
sees a raw dict.
"""

from __future__ import annotations

import abc
import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wabridge.protocol import MessageEvent
from wabridge.status import REQUESTS, DocStatus, parse_doc_status


@dataclass(frozen=True)
class SessionDoc:
    user_id: str
    status: DocStatus | None  # None: absent or unknown (see raw_status)
    raw_status: object
    settings: Mapping[str, Any] = field(default_factory=dict)
    pairing_phone: str | None = None
    host: str | None = None
    error_code: str | None = None
    unit_state: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Removed:
    """The document of ``user_id`` was deleted."""

    user_id: str


Change = SessionDoc | Removed
ChangeCallback = Callable[[Change], None]


def parse_session(user_id: str, data: Mapping[str, Any]) -> SessionDoc:
    """Turn a raw document into a ``SessionDoc``; never raises (odd fields become None)."""
    raw_status = data.get("status")
    settings = data.get("settings")
    phone = data.get("pairingPhone")
    host = data.get("host")
    error = data.get("error")
    unit = data.get("unit")
    return SessionDoc(
        user_id=user_id,
        status=parse_doc_status(raw_status),
        raw_status=raw_status,
        settings=dict(settings) if isinstance(settings, Mapping) else {},
        pairing_phone=phone if isinstance(phone, str) else None,
        host=host if isinstance(host, str) else None,
        error_code=(
            str(error.get("code")) if isinstance(error, Mapping) and "code" in error else None
        ),
        unit_state=dict(unit) if isinstance(unit, Mapping) else {},
    )


def merge_fields(target: dict[str, Any], fields: Mapping[str, Any], *, top: bool = True) -> None:
    """Firestore's ``set(merge=True)``, as every plane (and the admin mirror) applies it:
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


def error_field(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "at": time.time()}


class ControlPlane(abc.ABC):
    """Async interface; implementations run blocking client calls off the event loop."""

    name: str

    @abc.abstractmethod
    async def watch(self, on_change: ChangeCallback) -> None:
        """Start delivering changes. The first deliveries are every existing document.

        ``on_change`` is called on the event loop thread that called ``watch``.
        """

    @abc.abstractmethod
    async def list_sessions(self) -> list[SessionDoc]:
        """Every session document, parsed."""

    async def pending_requests(self) -> list[SessionDoc]:
        """Documents whose status is a client's request (``*_requested``): the controller's
        check that the change feed missed nothing (``Controller.resync``). This default reads
        every document; a backend that can query by status should."""
        return [doc for doc in await self.list_sessions() if doc.status in REQUESTS]

    async def rewatch(self) -> None:  # noqa: B027 - a no-op unless a feed can go quiet
        """Re-open the change feed after it was found to have missed a change. The fresh feed
        delivers every document again, as ``watch`` does first."""

    @abc.abstractmethod
    async def get(self, user_id: str) -> SessionDoc | None:
        """One session document, or None."""

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
        """Delete the session document (clients; tests)."""

    @abc.abstractmethod
    async def add_message(self, user_id: str, event: MessageEvent) -> None:
        """Record a processed message; idempotent by ``event.event_id``."""

    @abc.abstractmethod
    async def messages(self, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The latest recorded messages of a user, oldest first (for wabridgectl and tests)."""

    @abc.abstractmethod
    async def put_session_info(self, user_id: str, fields: Mapping[str, Any]) -> None:
        """Merge WhatsApp session facts into ``sessions/{userId}``."""

    @abc.abstractmethod
    async def add_summary(self, user_id: str, chat_id: str, number: int, text: str) -> None:
        """Record a chat's conversation summary ``summaries/{userId}__{chatId}__v{number}``;
        idempotent by (user, chat, number)."""

    @abc.abstractmethod
    async def summaries(self, user_id: str, chat_id: str) -> list[dict[str, Any]]:
        """A chat's summaries, oldest first."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop watching and release clients."""
