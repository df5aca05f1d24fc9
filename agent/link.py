"""The worker's side of the controller link.

Reports are queued in the store first (``Store.queue_frame``) and sent in order; the controller
acks each ``seq`` once it has written it, and only then is it deleted. While the controller is
down the worker keeps answering WhatsApp and the queue grows; on reconnect the queue is sent
again. Latest-wins reports (``state``, ``qr``, ``metrics``) are compacted before sending: only
the newest unacked one of each kind goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from agent.host_slots import HostSlots
from agent.store import Store
from wabridge import logs, protocol
from wabridge.errors import ProtocolError

log = logs.get("agent.link")

LATEST_WINS = frozenset({"state", "qr", "metrics", "pairing_code"})
ACK_TIMEOUT = 10.0


def link_error(exc: BaseException, socket_path: str) -> str:
    """Why the link to the controller is down, in an operator's words (asyncio's own text for
    a closed stream is "0 bytes read on a total of undefined expected bytes")."""
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return "the controller closed the connection (restarting or stopped?)"
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return (f"the controller is not listening on {socket_path} "
                "(is wabridge-controller running?)")
    if isinstance(exc, PermissionError):
        return f"no permission to connect to {socket_path}"
    if isinstance(exc, ConnectionError):
        return f"the connection to the controller broke ({exc.strerror or exc})"
    if isinstance(exc, asyncio.LimitOverrunError):
        return f"the controller sent a frame over {protocol.MAX_FRAME} bytes"
    if isinstance(exc, OSError):
        return f"cannot reach the controller at {socket_path}: {exc.strerror or exc}"
    return str(exc)


class ControllerLink:
    def __init__(
        self,
        socket_path: str,
        user_id: str,
        store: Store,
        version: str,
        on_settings: Callable[[dict[str, Any]], None],
        on_command: Callable[[protocol.Command], None],
        *,
        slots: HostSlots | None = None,
    ) -> None:
        self._path = socket_path
        self._user_id = user_id
        self._store = store
        self._version = version
        self._on_settings = on_settings
        self._on_command = on_command
        self._slots = slots  # the host's Claude budget: its frames are live facts, not queued
        self._writer: asyncio.StreamWriter | None = None
        self._wake = asyncio.Event()
        self.connected = False
        self.last_error = ""
        # fleet mode: whether this process still owns the account (``LeaseKeeper.holds``).
        # The queue is the account's own, in its schema: a latest-wins report queued after
        # the lease was lost would be delivered by the next owner's link, to its controller,
        # as the account's state ("stopping" on a running account).
        self.owns_account: Callable[[], bool] = lambda: True

    def forget_stale(self) -> int:
        """Drop queued latest-wins reports of a previous process: they describe a past state
        (an old QR, "stopping") and must not reach the document after this start. Message
        reports stay: they are facts, delivered whatever happened since."""
        stale = [seq for seq, data in self._store.unacked_frames()
                 if json.loads(data).get("type") in LATEST_WINS]
        if stale:
            self._store.drop_frames(stale)
        return len(stale)

    def report(self, build: Callable[[int], protocol.Frame]) -> None:
        """Queue a sequenced frame durably and wake the sender. Safe from the loop thread.
        Once the account is another host's (fleet), only facts (messages, usage) are queued:
        a latest-wins report then describes a process that no longer speaks for it."""
        if not self.owns_account():
            kind = build(0).TYPE
            if kind in LATEST_WINS:
                log.info("link.report_dropped", type=kind, reason="lease_lost")
                return
        self._store.queue_frame(lambda seq: protocol.encode(build(seq)))
        self._wake.set()

    def send_now(self, frame: protocol.Frame) -> bool:
        """Send an unsequenced frame (a live fact, not queued: lost with the link, and told
        again by ``HostSlots.on_connected`` after a reconnect). False when the link is down."""
        if not self.connected or self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(protocol.encode(frame))
        return True

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            try:
                await self._session(stop)
                delay = 0.1
            except (OSError, EOFError, ProtocolError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as exc:
                error = link_error(exc, self._path)
                if self.connected or self.last_error != error:
                    log.warning("link.controller_disconnected", error=error)
                self.last_error = error
            finally:
                self.connected = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 3.0)

    async def _session(self, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_unix_connection(self._path, limit=protocol.MAX_FRAME)
        try:
            writer.write(protocol.encode(
                protocol.Hello(user_id=self._user_id, pid=os.getpid(), version=self._version)))
            await writer.drain()
            first = protocol.decode(await reader.readuntil(b"\n"))
            if isinstance(first, protocol.Error):
                raise ProtocolError(f"controller refused us: {first.code}: {first.message}")
            if not isinstance(first, protocol.Welcome):
                raise ProtocolError(f"expected welcome, got {first.TYPE}")
            self.connected = True
            self._writer = writer
            self.last_error = ""
            log.info("link.controller_connected")
            self._on_settings(first.settings)
            for frame in self._slots.on_connected() if self._slots is not None else []:
                writer.write(protocol.encode(frame))
            receiver = asyncio.create_task(self._receive(reader))
            try:
                while not stop.is_set() and not receiver.done():
                    # Clear before flushing: a report queued while the flush awaits sets the
                    # event again and is sent on the next round, not left until another one.
                    self._wake.clear()
                    await self._flush(writer, lambda: stop.is_set() or receiver.done())
                    waiter = asyncio.create_task(self._wake.wait())
                    stopper = asyncio.create_task(stop.wait())
                    await asyncio.wait(
                        {waiter, stopper, receiver}, return_when=asyncio.FIRST_COMPLETED
                    )
                    waiter.cancel()
                    stopper.cancel()
                if receiver.done() and receiver.exception():
                    raise receiver.exception()  # type: ignore[misc]
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receiver
        finally:
            self._writer = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _flush(self, writer: asyncio.StreamWriter, gone: Callable[[], bool]) -> None:
        frames = self._store.unacked_frames()
        newest: dict[str, int] = {}
        kinds: dict[int, str] = {}
        for seq, data in frames:
            kind = str(json.loads(data).get("type", ""))
            kinds[seq] = kind
            if kind in LATEST_WINS:
                newest[kind] = seq
        stale = [s for s, k in kinds.items() if k in LATEST_WINS and newest[k] != s]
        if stale:
            self._store.drop_frames(stale)
        sent = 0
        for seq, data in frames:
            if seq in stale:
                continue
            writer.write(data)
            sent += 1
        if sent:
            await writer.drain()
            # Wait for acks before resending: the receiver deletes acked frames. Frames are
            # re-sent only after a reconnect, so the controller never sees a flood.
            await self._acks_settled(frames[-1][0], gone)

    async def _acks_settled(self, last_seq: int, gone: Callable[[], bool]) -> None:
        """Wait until every frame up to ``last_seq`` is acked, the link is gone (the caller
        then reconnects and re-sends), or ``ACK_TIMEOUT`` passes."""
        try:
            async with asyncio.timeout(ACK_TIMEOUT):
                while True:
                    pending = self._store.unacked_frames()
                    if not pending or pending[0][0] > last_seq or gone():
                        return
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise ProtocolError(f"controller did not ack within {ACK_TIMEOUT:g} s") from None

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readuntil(b"\n")
            try:
                frame = protocol.decode(line)
            except ProtocolError as exc:
                log.warning("controller.bad_frame", error=str(exc))
                continue
            if isinstance(frame, protocol.Ack):
                self._store.ack_frame(frame.seq)
            elif isinstance(frame, protocol.Error):
                log.error("controller.rejected", code=frame.code, message=frame.message,
                          seq=frame.seq)
                if frame.seq is not None:  # rejected for good: do not resend forever
                    self._store.ack_frame(frame.seq)
            elif isinstance(frame, protocol.Settings):
                self._on_settings(frame.settings)
            elif isinstance(frame, protocol.Command):
                self._on_command(frame)
            elif isinstance(frame, protocol.SlotOrder) and self._slots is not None:
                self._slots.on_order(frame)
