"""The worker's side of the host's Claude budget (``controller.slots``): before a chat's Claude
CLI process starts, the controller must grant it a slot; when it closes, the slot goes back.

While the controller is unreachable the worker does not wait for it: it keeps answering within
its local ``claude.max_processes`` and tells the controller what runs once the link is back
(``held``), and the controller then reclaims idle processes until the host is within budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agent.claude import ClaudeError
from wabridge import logs, protocol

log = logs.get("agent.host_slots")

POLL = 0.2  # seconds between checks that the link is still up while a chat waits


class HostSlots:
    """Slot requests and returns of one worker, over its controller link."""

    def __init__(self, send: Callable[[protocol.Frame], bool], connected: Callable[[], bool],
                 wait: float, reclaim: Callable[[str], None]) -> None:
        self._send = send
        self._connected = connected
        self._wait = wait
        self._reclaim = reclaim  # close the chat's process if idle (the pool answers)
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self.held: dict[str, bool] = {}  # chat -> busy, for the processes this worker runs

    def _tell(self, chat_id: str, state: protocol.SlotState) -> None:
        self._send(protocol.Slot(chat_id=chat_id, state=state))

    async def take(self, chat_id: str) -> None:
        """Wait for the controller's grant (at most ``wait`` seconds, then ClaudeError
        ``no_slot``); returns at once while the controller is unreachable."""
        if not self._connected():
            self.held[chat_id] = True
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[chat_id] = future
        self._tell(chat_id, "want")
        deadline = time.monotonic() + self._wait
        try:
            while not future.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    self._tell(chat_id, "gone")
                    log.warning("claude.no_slot", chat_id=chat_id, waited=self._wait)
                    raise ClaudeError("no_slot", f"no Claude slot on this host within "
                                                 f"{self._wait:g} s")
                if not self._connected():
                    break  # the controller is gone: the local limit applies
                await asyncio.wait({future}, timeout=min(POLL, left))
        finally:
            self._waiting.pop(chat_id, None)
        self.held[chat_id] = True

    def busy(self, chat_id: str) -> None:
        self.held[chat_id] = True
        self._tell(chat_id, "busy")

    def idle(self, chat_id: str) -> None:
        if chat_id in self.held:
            self.held[chat_id] = False
            self._tell(chat_id, "idle")

    def gone(self, chat_id: str) -> None:
        self.held.pop(chat_id, None)
        self._tell(chat_id, "gone")

    def on_order(self, order: protocol.SlotOrder) -> None:
        if order.order == "grant":
            future = self._waiting.get(order.chat_id)
            if future is not None and not future.done():
                future.set_result(None)
            elif order.chat_id not in self.held:
                self._tell(order.chat_id, "gone")  # the wait was abandoned meanwhile
        else:
            self._reclaim(order.chat_id)

    def on_connected(self) -> list[protocol.Frame]:
        """What this worker holds and wants, for a controller that has just (re)connected."""
        frames: list[protocol.Frame] = [
            protocol.Slot(chat_id=c, state="busy" if busy else "idle")
            for c, busy in self.held.items()]
        frames += [protocol.Slot(chat_id=c, state="want") for c in self._waiting]
        return frames
