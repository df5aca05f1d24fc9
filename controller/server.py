"""The controller's end of the worker link (see ``wabridge.protocol``).

A connection is authenticated by its peer credentials: ``SO_PEERCRED`` gives the PID (already
translated into our PID namespace by the kernel), systemd maps it to a unit (``GetUnitByPID``),
and the unit names the one user this connection may speak for. What ``hello`` claims is only
checked against that. A malformed frame is answered with an ``error`` frame; the connection
stays up.

The socket is mode 0666 (workers are dynamic users, with no group in common), so any local
process can connect; authentication therefore happens at accept time, before anything is
read (``admit``): a peer whose UID cannot be a worker's (not root, not in systemd's
``DynamicUser=`` range) is closed at once, without even a D-Bus call; a peer in no worker unit
gets one ``not_your_unit`` frame and is closed; connections that have not said hello yet are
bounded per UID and in total, and must say it within ``HELLO_TIMEOUT``. A helloed worker
replaces its user's previous connection, so a worker holds at most one. Refusals and the
loop's "accept() out of system resource" are logged at most once per ``LOG_EVERY`` seconds,
with the count of those left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from controller.slots import Decision, SlotLedger
from wabridge import logs, protocol
from wabridge.errors import ForeignRecordError, ProtocolError
from wabridge.units import DYNAMIC_UIDS, user_of_unit

log = logs.get("controller.server")

UnitForPid = Callable[[int], Awaitable[str | None]]
FrameHandler = Callable[[str, protocol.SequencedFrame], Awaitable[None]]
SettingsFor = Callable[[str], Awaitable[dict[str, Any]]]


HELLO_TIMEOUT = 5.0  # seconds from accept to hello
MAX_PENDING_PER_UID = 4  # connections of one UID not yet past hello
MAX_PENDING = 64  # connections of all UIDs not yet past hello
LOG_EVERY = 10.0  # seconds between two log lines of one kind of refusal


def peer_cred(writer: asyncio.StreamWriter) -> tuple[int, int]:
    """(pid, uid) of the peer, as the kernel recorded them at connect time."""
    sock: socket.socket = writer.get_extra_info("socket")
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", data)
    return int(pid), int(uid)


def admit(uid: int, pending: Mapping[int, int]) -> str | None:
    """Why a new connection from ``uid`` is closed before anything is read from it, or None.
    ``pending`` counts the connections of each UID not yet past hello."""
    if uid != 0 and uid not in DYNAMIC_UIDS:
        return "not_a_worker_uid"
    if pending.get(uid, 0) >= MAX_PENDING_PER_UID:
        return "too_many_pending_for_uid"
    if sum(pending.values()) >= MAX_PENDING:
        return "too_many_pending"
    return None


class Throttled:
    """Log one event at most once per ``every`` seconds, with how many were left out."""

    def __init__(self, event: str, every: float = LOG_EVERY) -> None:
        self.event = event
        self.every = every
        self._last = -every
        self._dropped = 0

    def warning(self, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._dropped += 1
            return
        log.warning(self.event, left_out=self._dropped, **fields)
        self._last = now
        self._dropped = 0


def limit_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs "socket.accept() out of system resource" up to 100 times per loop pass
    while descriptors are exhausted (and re-arms the listener as often): keep one line per
    ``LOG_EVERY`` seconds, and pass every other problem to the default handler."""
    accept_errors = Throttled("controller.accept_failed")

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            accept_errors.warning(error=repr(context.get("exception")))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def _clear_socket_path(socket_path: str) -> Path:
    path = Path(socket_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return path


def _seq_of(line: bytes) -> int | None:
    """The ``seq`` of a frame we could not decode, if it has a plain one, so the worker can
    drop it instead of re-sending it forever (e.g. a newer worker's frame type)."""
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):
        return None
    seq = raw.get("seq") if isinstance(raw, dict) else None
    return seq if type(seq) is int else None


class WorkerServer:
    def __init__(self, path: str, unit_for_pid: UnitForPid, on_frame: FrameHandler,
                 settings_for: SettingsFor, slots: SlotLedger | None = None) -> None:
        self._path = path
        self.slots = slots  # the host's Claude budget; None: workers use their local limit
        self._unit_for_pid = unit_for_pid
        self._on_frame = on_frame
        self._settings_for = settings_for
        self._server: asyncio.Server | None = None
        self.connections: dict[str, asyncio.StreamWriter] = {}
        self.connected_since: dict[str, float] = {}  # user -> monotonic time of the hello
        self.pending: Counter[int] = Counter()  # uid -> connections not yet past hello
        self._refused = Throttled("link.peer_refused")

    async def start(self) -> None:
        path = _clear_socket_path(self._path)
        self._server = await asyncio.start_unix_server(self._serve, path=str(path),
                                                       limit=protocol.MAX_FRAME)
        # Workers run as per-user dynamic UIDs: anyone may connect, identity comes from
        # SO_PEERCRED + the unit, never from file permissions.
        os.chmod(path, 0o666)  # noqa: PTH101,S103
        log.info("controller.listening", socket=str(path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self.connections.values()):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def send(self, user_id: str, frame: protocol.Frame) -> bool:
        writer = self.connections.get(user_id)
        if writer is None:
            return False
        writer.write(protocol.encode(frame))
        await writer.drain()
        return True

    async def _orders(self, decision: Decision) -> None:
        """Send the budget's grants and reclaims to the workers concerned."""
        orders = [protocol.SlotOrder(chat_id=c, order="grant") for _, c in decision.grant]
        orders += [protocol.SlotOrder(chat_id=c, order="reclaim") for _, c in decision.reclaim]
        users = [u for u, _ in decision.grant] + [u for u, _ in decision.reclaim]
        for user_id, order in zip(users, orders, strict=True):
            with contextlib.suppress(ConnectionError):
                await self.send(user_id, order)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid = peer_cred(writer)
        except OSError:
            writer.close()
            return
        reason = admit(uid, self.pending)
        if reason is not None:
            self._refused.warning(reason=reason, uid=uid, pid=pid)
            writer.close()
            return
        self.pending[uid] += 1
        await self._link(pid, uid, reader, writer)

    def _past_hello(self, uid: int) -> None:
        self.pending[uid] -= 1
        if self.pending[uid] <= 0:
            del self.pending[uid]

    async def _link(self, pid: int, uid: int, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """Serve one admitted connection (counted in ``pending`` until its hello)."""
        user_id: str | None = None
        hello_done = False
        try:
            unit = await self._unit_for_pid(pid)
            owner = user_of_unit(unit) if unit else None
            if owner is None:
                # not a worker at all: refused before anything is read
                self._refused.warning(reason="not_a_worker_unit", uid=uid, pid=pid, unit=unit)
                writer.write(protocol.encode(protocol.Error(
                    code="not_your_unit",
                    message=f"this process ({unit or 'in no unit'}) is not a wabridge worker "
                            "and may not speak for any user")))
                return
            first = protocol.decode(await asyncio.wait_for(reader.readuntil(b"\n"),
                                                           HELLO_TIMEOUT))
            hello_done = True
            self._past_hello(uid)
            if not isinstance(first, protocol.Hello):
                raise ProtocolError(f"expected hello, got {first.TYPE}")  # noqa: TRY301
            if owner != first.user_id:
                log.warning("link.refused", claimed=first.user_id, unit_user=owner)
                writer.write(protocol.encode(protocol.Error(
                    code="not_your_unit",
                    message=f"this process may not speak for {first.user_id!r}")))
                await writer.drain()
                return
            user_id = owner
            old = self.connections.pop(user_id, None)
            if old is not None:
                old.close()
            self.connections[user_id] = writer
            self.connected_since[user_id] = time.monotonic()
            settings = await self._settings_for(user_id)
            writer.write(protocol.encode(protocol.Welcome(settings=settings)))
            await writer.drain()
            log.info("link.worker_connected", user_id=user_id)
            await self._frames(user_id, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except TimeoutError:
            self._refused.warning(reason="no_hello", uid=uid, pid=pid, timeout=HELLO_TIMEOUT)
        except ProtocolError as exc:
            with contextlib.suppress(Exception):
                writer.write(protocol.encode(protocol.Error(code=exc.code, message=str(exc))))
                await writer.drain()
        except Exception as exc:  # a failed write must not kill the server
            # No ack was sent for the frame in hand: the worker keeps it and re-sends it.
            log.exception("link.handler_failed", user_id=user_id, error=repr(exc))
        finally:
            if not hello_done:
                self._past_hello(uid)
            if user_id is not None and self.connections.get(user_id) is writer:
                del self.connections[user_id]
                log.info("link.worker_disconnected", user_id=user_id)
                if self.slots is not None:
                    with contextlib.suppress(Exception):
                        await self._orders(self.slots.drop(user_id))
            writer.close()

    async def _frames(self, user_id: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                writer.write(protocol.encode(protocol.Error(
                    code="bad_frame", message=f"frame exceeds {protocol.MAX_FRAME} bytes")))
                return
            try:
                frame = protocol.decode(line)
            except ProtocolError as exc:
                log.warning("link.bad_frame", user_id=user_id, error=str(exc))
                writer.write(protocol.encode(
                    protocol.Error(code=exc.code, message=str(exc), seq=_seq_of(line))))
                await writer.drain()
                continue
            if isinstance(frame, protocol.Slot) and self.slots is not None:
                await self._orders(self.slots.report(user_id, frame.chat_id, frame.state))
                continue
            if not isinstance(frame, protocol.SequencedFrame):
                writer.write(protocol.encode(protocol.Error(
                    code="bad_frame", message=f"workers may not send {frame.TYPE} frames")))
                await writer.drain()
                continue
            try:
                await self._on_frame(user_id, frame)
            except ForeignRecordError as exc:
                # refused for good: answered with the frame's seq, so the worker drops it
                log.warning("link.write_refused", user_id=user_id, error=str(exc))
                writer.write(protocol.encode(
                    protocol.Error(code=exc.code, message=str(exc), seq=frame.seq)))
                await writer.drain()
                continue
            writer.write(protocol.encode(protocol.Ack(seq=frame.seq)))
            await writer.drain()
