"""The controller's end of the worker link (see ``wabridge.protocol``).

A connection is authenticated by its peer credentials: ``SO_PEERCRED`` gives the PID (already
translated into our PID namespace by the kernel), systemd maps it to a unit (``GetUnitByPID``),
and the unit names the one user this connection may speak for. What ``hello`` claims is only
checked against that. A malformed frame is answered with an ``error`` frame; the connection
stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from wabridge import logs, protocol
from wabridge.errors import ForeignRecordError, ProtocolError
from wabridge.units import user_of_unit

log = logs.get("controller.server")

UnitForPid = Callable[[int], Awaitable[str | None]]
FrameHandler = Callable[[str, protocol.SequencedFrame], Awaitable[None]]
SettingsFor = Callable[[str], Awaitable[dict[str, Any]]]


def peer_pid(writer: asyncio.StreamWriter) -> int:
    sock: socket.socket = writer.get_extra_info("socket")
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", data)
    return int(pid)


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
                 settings_for: SettingsFor) -> None:
        self._path = path
        self._unit_for_pid = unit_for_pid
        self._on_frame = on_frame
        self._settings_for = settings_for
        self._server: asyncio.Server | None = None
        self.connections: dict[str, asyncio.StreamWriter] = {}
        self.connected_since: dict[str, float] = {}  # user -> monotonic time of the hello

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

    async def _identify(self, writer: asyncio.StreamWriter) -> str | None:
        pid = peer_pid(writer)
        unit = await self._unit_for_pid(pid)
        return user_of_unit(unit) if unit else None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        user_id: str | None = None
        try:
            owner = await self._identify(writer)
            first = protocol.decode(await reader.readuntil(b"\n"))
            if not isinstance(first, protocol.Hello):
                raise ProtocolError(f"expected hello, got {first.TYPE}")  # noqa: TRY301
            if owner is None or owner != first.user_id:
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
        except ProtocolError as exc:
            with contextlib.suppress(Exception):
                writer.write(protocol.encode(protocol.Error(code=exc.code, message=str(exc))))
                await writer.drain()
        except Exception as exc:  # a failed write must not kill the server
            # No ack was sent for the frame in hand: the worker keeps it and re-sends it.
            log.exception("link.handler_failed", user_id=user_id, error=repr(exc))
        finally:
            if user_id is not None and self.connections.get(user_id) is writer:
                del self.connections[user_id]
                log.info("link.worker_disconnected", user_id=user_id)
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
            if not isinstance(frame, protocol.State | protocol.Qr | protocol.PairingCode
                              | protocol.MessageEvent | protocol.Metrics | protocol.Summary
                              | protocol.Problem):
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
