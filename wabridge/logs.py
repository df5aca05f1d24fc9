"""One logging setup for every wabridge process.

Events have stable names (``whatsapp.qr_generated``, ``outbox.delivered``) and details in
fields; ``user_id`` and ``chat_id`` are bound with ``structlog.contextvars`` so every line of a
worker or a turn carries them.

Under systemd (``$JOURNAL_STREAM`` set, or ``format = "journal"``) lines go to journald through
its native protocol, so ``journalctl USER_ID=alice`` and ``journalctl CHAT_ID=...`` work; fields
become upper-case journal fields (``USER_ID``, ``CHAT_ID``, ``EVENT``, ``PRIORITY``,
``MESSAGE``). Elsewhere: console lines on a TTY, JSON lines otherwise.

Foreign libraries that log through the standard library (neonize calls
``logging.basicConfig`` at import) are routed into the same output.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO


def _import_structlog() -> None:
    """Import structlog as the packaged venv has it: without rich (a development tool's
    dependency). structlog imports rich at its top when it is installed, for console
    tracebacks no unit prints: ~30 ms of every unit's start and ~2 MB (``python -X
    importtime``). ``None`` in ``sys.modules`` makes its ``import rich`` fail as it would."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # the documented "not importable"
    try:
        import structlog  # noqa: F401, PLC0415 - the import this function is for
    finally:
        del sys.modules["rich"]


_import_structlog()
import structlog  # noqa: E402 - after _import_structlog above

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2,
             "exception": 3}


def _journal_field(name: str) -> str:
    # journald ignores fields whose names are not [A-Z0-9_]+, start with '_' or a digit, or
    # are longer than 64 characters.
    cleaned = "".join(
        c if c.isascii() and c.isalnum() else "_" for c in name.upper()
    ).lstrip("_")
    if cleaned[:1].isdigit():
        cleaned = "F_" + cleaned
    return cleaned[:64] or "FIELD"


def encode_journal(fields: Mapping[str, Any]) -> bytes:
    """Serialize fields in journald's native datagram format (binary-safe for newlines)."""
    out = bytearray()
    for key, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        name = key.encode()
        if b"\n" in data:
            out += name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out)


class JournalRenderer:
    """structlog's last processor under systemd: sends the event to journald itself."""

    def __init__(self, identifier: str, path: str = JOURNAL_SOCKET) -> None:
        self._identifier = identifier
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __call__(self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        event = str(event_dict.pop("event", ""))
        level = str(event_dict.pop("level", method))
        event_dict.pop("timestamp", None)
        # the logger's name is a field of its own (LOGGER=), not repeated in MESSAGE
        details = " ".join(f"{k}={v}" for k, v in event_dict.items()
                           if k not in ("exception", "logger"))
        fields: dict[str, Any] = {
            "MESSAGE": f"{event} {details}".strip(),
            "PRIORITY": _PRIORITY.get(level, 6),
            "SYSLOG_IDENTIFIER": self._identifier,
            "EVENT": event,
        }
        if "exception" in event_dict:
            fields["MESSAGE"] += "\n" + str(event_dict["exception"])
        for key, value in event_dict.items():
            name = _journal_field(key)
            # a detail called ``message`` must not replace MESSAGE (it is in MESSAGE already)
            if key != "exception" and name not in fields:
                fields[name] = value
        try:
            self._sock.sendto(encode_journal(fields), self._path)
        except OSError:
            # journald gone (shutdown) or the datagram too large: fall back to stderr,
            # which systemd also connects to the journal.
            sys.stderr.write(fields["MESSAGE"] + "\n")
        raise structlog.DropEvent


def _format(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("JOURNAL_STREAM") and Path(JOURNAL_SOCKET).exists():
        return "journal"
    return "console" if sys.stderr.isatty() else "json"


def processors(renderer: Any) -> list[Any]:
    """The processor chain of every wabridge process, ending in ``renderer``."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]


def setup(identifier: str, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger once per process."""
    chosen = _format(fmt)
    renderer: Any
    if chosen == "journal":
        renderer = JournalRenderer(identifier)
    elif chosen == "json":
        renderer = structlog.processors.JSONRenderer(serializer=json.dumps, default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=processors(renderer),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_named_loggers(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries using stdlib logging (neonize, google, grpc) land in the same stream.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(max(numeric, logging.INFO))


class _StdlibBridge(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger(record.name)
        method = record.levelname.lower()
        getattr(log, method if method in _PRIORITY else "info")(
            "library.log", library=record.name, text=record.getMessage()
        )


def get(name: str) -> Any:
    """The logger of one part (``controller.server``, ``agent.link``...): every line it logs
    carries ``logger=<name>`` (JSON key, console detail, journal field ``LOGGER``), so a reader
    knows which end of a link spoke. Bound lazily: modules call this at import time, before
    ``setup`` configures the processors (``add_logger_name`` adds it)."""
    return structlog.get_logger(name)


class _NamedLogger(structlog.PrintLogger):
    """structlog's print logger, knowing the name ``get`` was given."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def _named_loggers(file: TextIO) -> Callable[..., _NamedLogger]:
    def factory(*args: Any) -> _NamedLogger:
        return _NamedLogger(file, str(args[0]) if args else "")
    return factory


def add_logger_name(logger: Any, _method: str, event_dict: MutableMapping[str, Any]
                    ) -> MutableMapping[str, Any]:
    name = getattr(logger, "name", "")
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


bind = structlog.contextvars.bind_contextvars
unbind = structlog.contextvars.unbind_contextvars
