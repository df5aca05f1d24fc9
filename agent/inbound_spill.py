"""Acknowledged inbound messages still held when the worker stops (``agent.inbound_hold``:
the store refused them, PostgreSQL down) go to a file in the state directory, and are
committed at the next start before WhatsApp is connected again. WhatsApp will not deliver
them a second time: without this file a stop during an outage would drop them.

The file, ``inbound-spill.jsonl``: one message a line, in arrival order, each line the
store's own encoding of a message (``agent.store.encode_message``, the inbox's ``payload``).
It is only ever replaced whole (``wabridge.atomic_write``): a crash or a full disk leaves
the previous spill or the new one, never a part. A second spill (stopped again during the
same outage) comes after the first. The file is removed only once every message in it is
committed; replaying one twice is harmless (the store ignores a ``wa_id`` it has).

A file that does not parse is moved aside (``*.bad``, kept for the operator) and named in
the log; the worker starts anyway.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.store import decode_message, encode_message
from agent.whatsapp.events import IncomingMessage
from wabridge import logs
from wabridge.atomic_write import write_atomically
from wabridge.errors import WabridgeError

log = logs.get("agent")

SPILL_FILE = "inbound-spill.jsonl"
#: the fields the inbox's columns and every turn rely on, and their types
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "wa_id": str, "chat_id": str, "sender": str, "text": str, "timestamp": (int, float)}


class SpillUnreadable(WabridgeError):
    """The spill file does not parse (the message says where and what)."""

    code = "spill_unreadable"
    explanation = ("the file was moved aside as *.bad, its messages not committed: fix the "
                   "line and move it back to inbound-spill.jsonl, then restart the worker")


def spill(path: Path, messages: Sequence[IncomingMessage]) -> None:
    """Add ``messages`` after whatever ``path`` already holds, atomically (``OSError``: the
    file is as it was)."""
    try:
        before = path.read_bytes()
    except FileNotFoundError:
        before = b""
    if before and not before.endswith(b"\n"):
        before += b"\n"
    lines = "".join(f"{encode_message(m)}\n" for m in messages)
    write_atomically(path, before + lines.encode())


def read(path: Path) -> list[IncomingMessage]:
    """The spilled messages in order ([] without a file), or :class:`SpillUnreadable`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise SpillUnreadable(f"{path}: {exc}") from None
    messages = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpillUnreadable(f"{path} line {number}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise SpillUnreadable(f"{path} line {number}: not a message (a JSON "
                                  f"{type(data).__name__}, not an object)")
        try:
            message = decode_message(line)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise SpillUnreadable(f"{path} line {number}: not a message "
                                  f"({type(exc).__name__}: {exc})") from None
        wrong = [name for name, kind in _FIELDS.items()
                 if not isinstance(getattr(message, name), kind)]
        if wrong or not (message.wa_id and message.chat_id):
            raise SpillUnreadable(f"{path} line {number}: not a message (wrong "
                                  f"{', '.join(wrong) or 'empty wa_id or chat_id'})")
        messages.append(message)
    return messages


def set_aside(path: Path) -> Path:
    """Move an unreadable spill out of the way (``<name>.bad``, ``<name>.2.bad``...: an
    earlier one is never overwritten); returns where it went."""
    for n in itertools.count(1):
        aside = path.with_name(f"{path.name}.bad" if n == 1 else f"{path.name}.{n}.bad")
        if not aside.exists():
            path.rename(aside)
            return aside
    raise AssertionError("unreachable")  # (itertools.count never ends)


@dataclass
class SpillFile:
    """One worker's spill file, and the messages read from it at this start that may not be
    committed yet (the very objects, handed to the inbound hold: compared by identity)."""

    path: Path
    replayed: list[IncomingMessage] = field(default_factory=list)

    def replay(self) -> list[IncomingMessage]:
        """At start: the spilled messages, to be held and committed in order. An unreadable
        file is moved aside and named (``store.spill_unreadable``): nothing to replay."""
        try:
            messages = read(self.path)
        except SpillUnreadable as exc:
            try:
                aside = str(set_aside(self.path))
            except OSError as moving:
                aside = f"not moved: {moving}"
            log.error("store.spill_unreadable", path=str(self.path), moved_to=aside,
                      error=str(exc), explanation=exc.explanation)
            return []
        if not messages:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # (an empty file: nothing to replay)
            return []
        log.info("store.spill_replaying", count=len(messages), path=str(self.path),
                 wa_ids=[m.wa_id for m in messages])
        self.replayed = messages
        return messages

    def settle(self, held: Sequence[IncomingMessage]) -> None:
        """After each retry of the hold: once none of the replayed messages is held any more
        (each committed, or a duplicate), the file goes."""
        if not self.replayed or self._replayed(held):
            return
        self.replayed = []
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        log.info("store.spill_committed", path=str(self.path))

    def keep(self, held: Sequence[IncomingMessage], error: Exception | None) -> None:
        """At shutdown, the store still refusing ``error``: the held messages go to the
        file. The replayed ones still held are in it already; only later ones are added,
        behind them. A spill that fails (a full disk) is the one loss, named loudly."""
        replayed = {id(m) for m in self.replayed}
        later = [m for m in held if id(m) not in replayed]
        said = {"count": len(held), "wa_ids": [m.wa_id for m in held],
                "error": str(error) if error else "", "path": str(self.path)}
        try:
            if later:
                spill(self.path, later)
        except OSError as exc:  # nothing else can keep them: WhatsApp will not send them again
            log.critical("store.inbound_lost", spill_error=str(exc), **said)
            return
        log.warning("store.inbound_spilled", **said)

    def _replayed(self, held: Sequence[IncomingMessage]) -> bool:
        replayed = {id(m) for m in self.replayed}  # (kept alive by the list: ids are stable)
        return any(id(m) in replayed for m in held)
