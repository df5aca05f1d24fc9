"""Retiring the host: what the controller does last when the package is removed.

``dpkg -r`` stops the controller and then the workers; nothing would be left to tell the
control plane, and the documents of the accounts that ran here would keep saying
``connected`` (with their process figures) while nothing runs. So the package's prerm first
leaves a request at :data:`REQUEST` (the reason, one line) and then stops the controller. The
controller, once its own shutdown is done (it no longer reacts to documents or units), sees
the request and retires the host: it stops every worker unit, waits for them to end, and
writes ``stopped`` with the reason on every document this host owned that still claims a
running worker. The request is consumed, so the next stop of a controller is an ordinary one.

An upgrade leaves no request: controller and workers restart one at a time and no document
is touched by this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.plane import AccountDoc, ControlPlane
from controller.systemd import Systemd
from controller.unit_manager import SystemdError, UnitManager, UnitState
from wabridge import config, logs
from wabridge.errors import WabridgeError
from wabridge.status import RUNNING_STATUSES, DocStatus

log = logs.get("controller.retire")

REQUEST = Path("/run/wabridge/retire")  # written by packaging/debian/prerm on removal
STOP_WAIT = 8.0  # seconds for the workers to end (each has TimeoutStopSec=5)
MAX_REASON = 200
#: Statuses that claim a worker is (or is about to be) running: wrong once the host retired.
CLAIMS_RUNNING = frozenset(RUNNING_STATUSES | {DocStatus.STOPPING})
_GONE = frozenset({"inactive", "failed"})


def host_of(cfg: config.Config) -> str:
    """The name this host writes into the documents it claims (``controller.host_id``)."""
    return cfg.controller.host_id or socket.gethostname()


def take_request(path: Path = REQUEST) -> str | None:
    """The reason left by prerm (the request is removed), or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("retire.request_unreadable", path=str(path), error=str(exc))
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    reason = " ".join(text.split())[:MAX_REASON]
    return reason or "wabridge was removed from this host"


@dataclass(frozen=True)
class Retirement:
    user_id: str
    fields: dict[str, Any]  # merged after the status is claimed


def plan(docs: Iterable[AccountDoc], host: str, units: Iterable[str],
         reason: str) -> list[Retirement]:
    """Which documents to mark ``stopped`` (pure): those this host owned (its name as their
    ``host``, or a worker unit here) whose status still claims a running worker. Documents
    of other hosts, requests and outcomes (logged_out, banned...) are left as they are."""
    here = set(units)
    return [
        Retirement(doc.user_id, {
            "statusDetail": f"{reason} ({host})",
            "process": {"pid": 0, "state": "inactive", "memoryBytes": 0, "status": ""},
        })
        for doc in docs
        if (doc.host == host or doc.user_id in here) and doc.status in CLAIMS_RUNNING
    ]


async def stop_workers(systemd: UnitManager, timeout: float = STOP_WAIT) -> list[UnitState]:
    """Stop every worker unit and wait (up to ``timeout``) until none runs; returns the
    worker units systemd knew before."""
    known = await systemd.list_workers()
    running = [s for s in known if s.active_state not in _GONE]
    for state in running:
        try:
            await systemd.stop(state.unit)
        except SystemdError as exc:
            log.warning("retire.stop_failed", unit=state.unit, error=str(exc))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while running and loop.time() < deadline:
        await asyncio.sleep(0.2)
        running = [s for s in await systemd.list_workers() if s.active_state not in _GONE]
    if running:
        log.warning("retire.workers_still_running", units=[s.unit for s in running])
    return known


async def mark_stopped(plane: ControlPlane, host: str, todo: list[Retirement]) -> int:
    """Claim ``stopped`` on each document (only while it still claims a running worker: a
    client's request that got there first is kept) and write the reason; returns how many."""
    done = 0
    for item in todo:
        try:
            if await plane.claim(item.user_id, CLAIMS_RUNNING, DocStatus.STOPPED, host):
                await plane.update(item.user_id, item.fields)
                done += 1
        except WabridgeError as exc:
            log.warning("retire.write_failed", user_id=item.user_id, error=str(exc))
    return done


async def retire(systemd: UnitManager, plane: ControlPlane, host: str, reason: str) -> int:
    """Stop the host's workers, then mark their documents ``stopped``; returns how many
    documents were marked."""
    units = await stop_workers(systemd)
    todo = plan(await plane.list_accounts(), host, (s.user_id for s in units if s.user_id),
                reason)
    done = await mark_stopped(plane, host, todo)
    log.info("retire.done", host=host, reason=reason, workers=len(units), documents=done)
    return done


async def retire_if_requested(cfg: config.Config, make_plane: Callable[[], ControlPlane],
                              make_systemd: Callable[[], UnitManager] = Systemd,
                              request: Path = REQUEST) -> bool:
    """The controller's last step, after its own shutdown (it no longer reacts to documents
    or units; its clients are closed, so fresh ones are made): retire the host when prerm
    asked for it. True when it did."""
    reason = take_request(request)
    if reason is None:
        return False
    systemd, plane = make_systemd(), make_plane()
    try:
        await systemd.open()
        await retire(systemd, plane, host_of(cfg), reason)
    except WabridgeError as exc:
        log.error("retire.failed", error=str(exc))
    finally:
        await systemd.close()
        await plane.close()
    return True
