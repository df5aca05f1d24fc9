"""Blocking calls awaited from the event loop on daemon threads.

Not ``asyncio.to_thread``: the default executor's threads are joined when ``asyncio.run``
ends, so one call that never returns (a Go call of neonize's, a statement to an unreachable
PostgreSQL) would hang the worker's exit. A daemon thread is abandoned instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def await_thread(fn: Callable[[], T], limit: float, name: str) -> T:
    """Await ``fn()`` run on a daemon thread, giving up after ``limit`` seconds (TimeoutError).

    Not ``asyncio.to_thread``: the default executor's threads are joined when ``asyncio.run``
    ends, so one Go call that never returns would hang the worker's exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await asyncio.wait_for(future, limit)
