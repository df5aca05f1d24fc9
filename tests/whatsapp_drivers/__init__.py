"""Drivers for the WhatsApp backend contract suite (``tests/test_whatsapp_contract.py``).

The suite runs the same tests against every backend. Each backend gets a *driver*: a module
``tests/whatsapp_drivers/<name>_driver.py`` exposing ``DRIVER``, a class implementing
:class:`BackendDriver`. The driver plays "the rest of the world": the phone that scans the QR,
the contacts who write to the account, and WhatsApp's server when it logs out, replaces or bans
the session.

The suite uses a driver like this::

    async with DRIVER() as driver:                  # no constructor arguments
        backend = driver.make_backend(ctx)         # ctx.state_dir is a fresh private dir
        backend.start(sink)
        ... wait for QrCode ...
        await driver.scan_latest_qr()
        ... wait for Connected(phone=driver.account_phone) ...
        wa_id = await driver.contact_sends("5511999990002", "hi")
        ... wait for IncomingMessage(wa_id=wa_id) ...
        await backend.send_text(chat_id, "hello", quote=msg)
        inbox = await driver.contact_inbox("5511999990002")   # [{"id", "text", "quoted_id"}]
        await driver.trigger("logout")
        await backend.stop()

Rules:
- Phones are digits with country code, no ``+``. ``account_phone`` is the number the
  backend's account gets once linked (known before the scan).
- ``scan_latest_qr`` links the most recent QR code a backend of this driver reported
  (the driver may observe its backends, or ask its server which code is current).
- A driver that cannot do something (e.g. trigger a ban on real WhatsApp) raises
  :class:`DriverUnsupported`; the suite turns that into a skip naming the reason.
- ``trigger`` outcomes: ``"logout"``, ``"replace"``, ``"ban"`` (kw ``expires_in: float``
  seconds), ``"outdated"``, ``"disconnect"`` (the link drops abruptly; a reconnect with the
  same credentials must be accepted).
- ``event_timeout`` is how long the suite waits for any one event (real networks are slower).

Keep this protocol small and stable: other drivers are written against it.

Importing: pytest puts ``tests/`` on ``sys.path`` (no ``tests/__init__.py``; note that the dev
venv's ``linkpreview`` wheel ships a top-level ``tests`` package, so ``import tests.…`` finds
*that*). Import this package as ``whatsapp_drivers`` and, inside a driver module, use relative
imports: ``from . import BackendDriver, DriverUnsupported``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from agent.whatsapp.base import BackendContext, WhatsAppBackend
from agent.whatsapp.events import Image

__all__ = ["LOAD_ERRORS", "OUTCOMES", "BackendDriver", "DriverUnsupported", "discover"]

OUTCOMES = ("logout", "replace", "ban", "outdated", "disconnect")

LOAD_ERRORS: dict[str, str] = {}  # driver name -> why its module did not import


class DriverUnsupported(Exception):
    """This driver cannot do what the test asks; the test is skipped with this reason."""


@runtime_checkable
class BackendDriver(Protocol):
    name: str  # short id used in test ids, e.g. "sim", "neonize"
    account_phone: str  # the linked account's phone, digits with country code
    event_timeout: float  # seconds the suite waits for one event

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def make_backend(self, ctx: BackendContext) -> WhatsAppBackend:
        """A new, not yet started backend for the account, keeping its store in ctx.state_dir."""
        ...

    async def scan_latest_qr(self) -> None:
        """The account's phone scans the last QR code a backend reported."""
        ...

    async def contact_sends(
        self,
        sender_phone: str,
        text: str,
        *,
        msg_id: str | None = None,
        image: Image | None = None,
        group: str | None = None,
        mentioned: bool = False,
    ) -> str:
        """A contact writes to the account; returns the WhatsApp message id.

        ``msg_id`` forces the id (sending the same id twice delivers twice); ``image`` attaches
        a picture (``text`` is then its caption); ``group`` sends in that group (an id the driver
        understands) instead of the private chat; ``mentioned`` @-mentions the account.
        """
        ...

    async def owner_sends(self, text: str, *, to: str | None = None) -> str:
        """The account's own phone writes ``text``: in its self chat, or (``to``, a phone) in
        the chat with that contact. Linked devices get it as an own message. Returns the id."""
        ...

    async def contact_inbox(self, sender_phone: str) -> list[dict[str, Any]]:
        """What the account sent to this contact, oldest first: ``{"id", "text", "quoted_id"}``."""
        ...

    async def trigger(self, outcome: str, **kw: Any) -> None:
        """Make WhatsApp's side do ``outcome`` (one of :data:`OUTCOMES`) to the account."""
        ...


def discover() -> dict[str, type[BackendDriver]]:
    """Every ``*_driver.py`` module in this package, by module stem -> its ``DRIVER`` class.

    A driver module whose import fails (e.g. its library is not installed) is left out and
    the reason recorded in :data:`LOAD_ERRORS` (the suite reports it as a skip).
    """
    found: dict[str, type[BackendDriver]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.endswith("_driver"):
            continue
        name = info.name.removesuffix("_driver")
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except (ImportError, OSError) as exc:
            LOAD_ERRORS[name] = f"{type(exc).__name__}: {exc}"
            continue
        found[name] = module.DRIVER
    return found
