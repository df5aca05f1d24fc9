"""A fake of what ``controller.admin.AdminServer`` needs of the controller, plus a helper
that serves it on a socket from a background thread (for the blocking ``wabridgectl``).

``FakeFacade`` keeps documents (the controller's view) and units in memory. ``script`` lets a
test say what "the fleet" does after a request: a list of ``(delay, fields)`` merged into the
user's document one after the other, as the controller would after worker frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.admin import AdminError, AdminServer, DocWatchers, Watcher
from controller.plane import AccountDoc, parse_account
from wabridge import protocol
from wabridge.status import DocStatus


@dataclass(frozen=True)
class FakeUnit:
    active_state: str = "active"
    sub_state: str = "running"
    main_pid: int = 4242
    n_restarts: int = 0
    memory_bytes: int | None = 150 * 1024 * 1024


Script = list[tuple[float, dict[str, Any]]]


@dataclass
class FakeFacade:
    watchers: DocWatchers = field(default_factory=DocWatchers)
    docs: dict[str, AccountDoc] = field(default_factory=dict)
    units: dict[str, FakeUnit] = field(default_factory=dict)
    linked_users: set[str] = field(default_factory=set)
    requests: list[tuple[str, DocStatus, dict[str, Any]]] = field(default_factory=list)
    commands: list[tuple[str, protocol.Command]] = field(default_factory=list)
    message_log: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    usage_docs: list[dict[str, Any]] = field(default_factory=list)
    #: what happens after a request of that status (see module doc)
    scripts: dict[DocStatus, Script] = field(default_factory=dict)
    host: str = "testhost"
    #: ``hosts`` rows when fleet mode is on (None: off), and the pins ``move`` made
    fleet_hosts: list[dict[str, Any]] | None = None
    pins: dict[str, str] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # --- test set-up ---------------------------------------------------------------------
    def put(self, user: str, fields: dict[str, Any], unit: FakeUnit | None = None) -> None:
        """A document as the controller knows it (raw fields) and, optionally, its unit."""
        self.docs[user] = parse_account(user, fields)
        if unit is not None:
            self.units[user] = unit

    def change(self, user: str, fields: dict[str, Any]) -> None:
        """The controller's view changes (a write merged, as ``Controller.write`` does)."""
        old = self.docs.get(user)
        self.docs[user] = (old or parse_account(user, {})).merged(fields)
        self.watchers.changed(user, old, self.docs[user])

    def drop(self, user: str) -> None:
        """The document was deleted."""
        self.watchers.changed(user, self.docs.pop(user, None), None)

    # --- AdminFacade ---------------------------------------------------------------------
    def user_ids(self) -> set[str]:
        return set(self.docs) | set(self.units)

    def doc(self, user_id: str) -> AccountDoc | None:
        return self.docs.get(user_id)

    def unit(self, user_id: str) -> FakeUnit | None:
        return self.units.get(user_id)

    def linked(self, user_id: str) -> bool:
        return user_id in self.linked_users

    def watch(self, user_id: str, callback: Watcher) -> Callable[[], None]:
        return self.watchers.watch(user_id, callback)

    async def request(self, user_id: str, status: DocStatus, **fields: Any) -> None:
        self.requests.append((user_id, status, dict(fields)))
        self.change(user_id, {**fields, "status": status.value})
        script = self.scripts.get(status)
        if script:
            task = asyncio.create_task(self._play(user_id, script))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _play(self, user_id: str, script: Script) -> None:
        for delay, fields in script:
            await asyncio.sleep(delay)
            self.change(user_id, fields)

    async def command(self, user_id: str, command: protocol.Command) -> bool:
        if user_id not in self.linked_users:
            return False
        self.commands.append((user_id, command))
        return True

    async def messages(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        return self.message_log.get(user_id, [])[-limit:]

    async def usage(self, user_id: str | None, since_day: str) -> list[dict[str, Any]]:
        return [u for u in self.usage_docs if (user_id is None or u["userId"] == user_id)
                and u["day"] >= since_day]

    def _fleet(self, host: str | None = None) -> list[dict[str, Any]]:
        if self.fleet_hosts is None:
            raise AdminError("fleet_off", "fleet mode is off on testhost")
        if host is not None and all(r["host"] != host for r in self.fleet_hosts):
            raise AdminError("unknown_host", f"no host {host!r} in the fleet")
        return self.fleet_hosts

    async def hosts(self) -> list[dict[str, Any]]:
        return self._fleet()

    async def set_draining(self, host: str, draining: bool) -> None:
        for row in self._fleet(host):
            if row["host"] == host:
                row["draining"] = draining

    async def move(self, user_id: str, host: str) -> None:
        self._fleet(host)
        self.pins[user_id] = host

    def info(self) -> dict[str, Any]:
        return {"host": self.host, "plane": "local", "sessions": len(self.docs),
                "linked": len(self.linked_users)}


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A directory every uid may traverse (pytest's tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="wabridge-admin-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class ThreadedAdmin:
    """An AdminServer over a FakeFacade on its own event loop thread."""

    def __init__(self, path: Path, facade: FakeFacade, **kwargs: Any) -> None:
        self.path = path
        self.facade = facade
        self.loop = asyncio.new_event_loop()
        self.server = AdminServer(str(path), facade, **kwargs)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedAdmin:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)

        async def cancel_tasks() -> None:
            for task in list(self.facade.tasks):
                task.cancel()
            await asyncio.gather(*self.facade.tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_tasks(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (the facade is not thread-safe)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


def nobody_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WABRIDGE")}
    env["WABRIDGE_CONFIG"] = "/dev/null"
    return env
