"""The boundary between the agent and a WhatsApp implementation.

Two implementations: ``neonize`` (real WhatsApp as a linked device) and ``sim`` (a client of
``wabridge-sim``). One contract test suite (``tests/test_whatsapp_contract.py``) runs against
both.

Rules every backend keeps:
- ``start`` never raises for network or login trouble: it reports it as events through the
  sink. It raises only for programming or configuration errors.
- The sink may be called from any thread (neonize calls back on its Go thread). For
  ``IncomingMessage`` the sink persists the message before returning, because the library has
  already acknowledged it to WhatsApp; a backend must call the sink before anything else with a
  message, and must not call it for messages it filters out (reactions, protocol messages).
- A backend never reconnects by calling connect again in the same process (neonize leaks when
  it does). When the link cannot be kept, it reports ``Disconnected``/``ConnectFailure`` and the
  agent decides to exit so systemd starts a fresh process.
- ``stop`` returns within ``timeout`` seconds even when the library is stuck.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from agent.whatsapp.events import Event, IncomingMessage
from wabridge.errors import WabridgeError

Sink = Callable[[Event], None]


class SendError(WabridgeError):
    """A message could not be handed to WhatsApp; the outbox keeps it for a retry."""

    code = "send_failed"
    explanation = ("the reply stays in the outbox and is retried with backoff, up to "
                   "conversation.send_attempts; then it is marked failed and the owner is told")


@dataclass(frozen=True)
class PostgresSessionStore:
    """A WhatsApp session store on PostgreSQL (``storage.backend = postgresql``): the
    ``postgres://`` URL Go's driver takes, password included, which nothing may print
    (``str()`` and ``repr()`` give ``name``; errors go through ``redact``)."""

    url: str = field(repr=False)
    name: str  # server, database and role: for logs
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.name

    def redact(self, text: str) -> str:
        if not self.password:
            return text
        return text.replace(quote(self.password, safe=""), "***").replace(self.password, "***")


@dataclass(frozen=True)
class BackendContext:
    user_id: str
    state_dir: Path  # private to this user (mode 0700); backends keep their store here
    #: where neonize keeps the linked device instead of a file in ``state_dir``
    session_store: PostgresSessionStore | None = None


class WhatsAppBackend(abc.ABC):
    name: str
    #: Whether ``send_text`` sends with the ``msg_id`` it is given, so that sending a reply
    #: again after a crash is the same message to WhatsApp (exactly once: the simulator).
    #: False (neonize 0.5.2): the library picks the id, a resend is a second message, and the
    #: outbox must decide what to do with a reply whose send may or may not have happened
    #: (``conversation.uncertain_replies``).
    honours_message_id: bool = False

    @abc.abstractmethod
    def start(self, sink: Sink) -> None:
        """Begin connecting in the background; events arrive through ``sink``."""

    @abc.abstractmethod
    async def send_text(
        self, chat_id: str, text: str, *, quote: IncomingMessage | None, msg_id: str | None = None,
        expiration: int = 0,
    ) -> str:
        """Send ``text`` to ``chat_id``, quoting ``quote`` when given; returns the id WhatsApp
        got for it.

        ``msg_id`` is the id chosen by the outbox before the first attempt; a backend with
        ``honours_message_id`` sends with it (a resend after a crash is the same message),
        others ignore it and return the id the library chose. ``expiration`` is the chat's
        disappearing-messages timer in seconds (0: off); the reply carries it, so it
        disappears like the rest of the chat.
        Raises ``SendError`` when not connected or WhatsApp refuses it.
        """

    async def send_reaction(self, chat_id: str, message: IncomingMessage, emoji: str) -> None:
        """React with ``emoji`` to ``message`` of ``chat_id`` (Claude's ``react`` tool).
        Raises ``SendError`` when not connected, refused, or not supported."""
        del chat_id, message, emoji
        raise SendError(f"the {self.name} backend cannot send reactions")

    async def send_media(self, chat_id: str, kind: str, data: bytes, filename: str, mime: str,
                         caption: str) -> str:
        """Upload and send ``data`` as a ``document`` or an ``image`` (Claude's ``send_file``
        and ``send_image`` tools); returns the message's id. Raises ``SendError``."""
        del chat_id, kind, data, filename, mime, caption
        raise SendError(f"the {self.name} backend cannot send files")

    @abc.abstractmethod
    async def set_typing(self, chat_id: str, typing: bool) -> None:
        """Show or clear the "typing…" presence; best effort, never raises."""

    @abc.abstractmethod
    async def pair_phone(self, phone: str) -> None:
        """Ask for a pairing code for ``phone`` (digits with country code); reported as an event."""

    @abc.abstractmethod
    async def stop(self, timeout: float = 3.0) -> None:
        """Disconnect and release the library within ``timeout`` seconds."""

    def is_connected(self) -> bool:
        """Whether the link is up right now (used by the watchdog and status line)."""
        return False

    def healthy(self) -> bool:
        """False when the backend's machinery is wedged or died (the worker's watchdog then
        stops being fed, and systemd restarts the worker). Being disconnected is healthy."""
        return True
