"""An in-memory unit manager (``controller.unit_manager.UnitManager``, as the pystemd adapter
``controller.systemd.Systemd`` is one): the calls the controller makes (recorded, with hooks
that run inside them, at the moments a real D-Bus round trip lets other tasks run) and what
``Controller.run()`` needs besides (open, subscribe, list, liveness)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from controller.unit_manager import UnitState


class ScriptedSystemd:
    """An in-memory ``controller.unit_manager.UnitManager``."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.on_call: dict[str, Callable[[], Awaitable[None]]] = {}
        self.callbacks: list[Callable[[UnitState], None]] = []
        self.dropins: dict[str, str] = {}
        self.pid_units: dict[int, str] = {}  # GetUnitByPID
        self.workers: list[UnitState] = []  # what ListUnits says at start-up
        self.signals_alive = True

    async def _call(self, name: str) -> None:
        self.calls.append(name)
        await asyncio.sleep(0)  # a D-Bus round trip: other tasks run meanwhile
        hook = self.on_call.pop(name, None)
        if hook is not None:
            await hook()
        await asyncio.sleep(0)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def subscribe(self, callback: Callable[[UnitState], None]) -> None:
        self.callbacks.append(callback)

    def deliver(self, state: UnitState) -> None:
        """A unit's state changed (what a PropertiesChanged signal leads to)."""
        for callback in self.callbacks:
            callback(state)

    async def list_workers(self) -> list[UnitState]:
        return list(self.workers)

    async def loaded_state(self, unit: str) -> UnitState | None:
        await self._call("loaded_state")
        return None

    async def reset_failed(self, unit: str) -> None:
        await self._call("reset_failed")

    async def install_dropin(self, unit: str, text: str) -> bool:
        self.dropins[unit] = text
        await self._call("install_dropin")
        return True

    async def start(self, unit: str) -> None:
        await self._call("start")

    async def restart(self, unit: str) -> None:
        await self._call("restart")

    async def stop(self, unit: str) -> None:
        await self._call("stop")

    async def unit_for_pid(self, pid: int) -> str | None:
        return self.pid_units.get(pid)
