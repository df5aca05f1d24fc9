"""The controller's admin socket: what ``wabridgectl`` (``controller/ctl.py``) talks to.

Over 600 lines because the admin protocol is one contract: the table below, the server that
enforces who may connect, and the answers it gives (status rows, watch events) change
together; about a tenth is this documentation.

Socket and access
-----------------
A Unix stream socket at ``controller.admin_socket`` (``/run/wabridge/admin.sock``), mode
0660, group ``controller.admin_group`` (``wabridge-admin``) when that group exists. Every
connection is checked by its peer credentials (``SO_PEERCRED``): uid 0, or the group as
primary gid or among the supplementary groups (``Groups:`` of ``/proc/<pid>/status``);
anyone else gets one ``forbidden`` error frame and the connection is closed. File
permissions already keep others out; the check is what holds if the mode is loosened.

Wire format
-----------
JSON lines (UTF-8, ``\\n``-terminated, at most ``MAX_REQUEST`` bytes per request). A request
is ``{"op": "...", ...}``; the answer is ``{"ok": true, ...}`` or
``{"ok": false, "code": "...", "message": "..."}``. A connection may carry several requests
one after the other; a bad line is answered with an error frame and the connection stays up.

======================================  ==================================================
``{"op": "ping"}``                      ``{"ok", "host", "plane", "sessions", "linked"}``
``{"op": "link", "user", "phone"?,      request a worker: ``create_requested``, or
``"follow"?}``                          ``pairing_requested`` with ``pairingPhone``
                                        (``wabridge.phone``). Clears a stale ``qrRaw``/
                                        ``pairingCode``/``error`` first.
                                        ``"already_connected": true`` when the account is
                                        connected and its unit active.
                                        With ``follow``, the answer is followed by ``watch``
                                        events (subscribed before the request: none missed).
``{"op": "unlink", "user"}``            ``destroy_requested``
``{"op": "restart", "user"}``           ``restart_requested``
``{"op": "status", "user"?}``           ``{"ok", "users": [row, ...]}`` (see ``status_row``)
``{"op": "watch", "user"}``             a ``snapshot`` event, then one ``update`` event per
                                        change of status/detail/qr/pairing_code/phone/error
                                        (``removed`` when the document is deleted), until
                                        the client closes the connection
``{"op": "chats", "user", "limit"?}``   ``{"ok", "chats": [...], "source": "message_log"}``
``{"op": "pause"|"resume", "user",    sends ``Command(pause_chat|resume_chat, {"chat_id",
"chat"[, "minutes"]}``                 "minutes"})``: the chat is not answered (until resumed)
``{"op": "usage"[, "user"][, "days"]}`` usage documents (billing) of the last ``days`` UTC
                                       days (default 1: today), one user or all
``{"op": "reset", "user", "chat"}``     sends ``Command(reset_chat, {"chat_id"})`` to the
                                        user's worker; ``not_connected`` if it is not linked
``{"op": "hosts"}``                     fleet: ``{"ok", "hosts": [row, ...]}`` (see
                                        ``controller.fleet.Fleet.host_rows``)
``{"op": "drain"|"undrain", "host"}``   fleet: its accounts move away one at a time / it
                                        takes new accounts again (nothing is pulled back)
``{"op": "move", "user", "host"}``      fleet: pin the account to that host; the worker
                                        here finishes its turn, commits, releases its lease
======================================  ==================================================

Error codes: ``bad_request``, ``bad_user_id``, ``unknown_op``, ``unknown_user``,
``not_connected``, ``forbidden``, ``fleet_off``, ``unknown_host``, ``fleet_unavailable``,
``internal``.

Where the answers come from
---------------------------
:class:`AdminServer` only sees an :class:`AdminFacade` (tests use a fake one).
:class:`ControllerFacade` is the real one: the controller's own view of each document
(``AccountDoc``: status, detail, raw QR, pairing code, phone, error, metrics; the change
feed's copy with the controller's own writes merged in), its units, its worker link, and its
:class:`DocWatchers`. Nothing wraps the control plane.

``chats`` is answered from the control plane's message log (``ControlPlane.messages``): chats
that had messages mirrored there, with counts and the last message. It cannot tell which chats
have a live Claude process; that needs a request/response on the worker link (see the
agent-side notes in the lead's report).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from controller.fleet import Fleet, FleetUnavailable
from controller.plane import AccountDoc, ControlPlane
from controller.server import WorkerServer
from controller.unit_manager import RUNNING_UNIT_STATES
from wabridge import fleet_db, logs, protocol
from wabridge.errors import UserIdError, WabridgeError
from wabridge.phone import PHONE_RULE, is_phone
from wabridge.status import DocStatus
from wabridge.units import validate_user_id

log = logs.get("controller.admin")

MAX_REQUEST = 64 * 1024
MAX_CHAT_MESSAGES = 1000  # messages read from the log to build the chat list
_CHAT_SUFFIXES = ("@s.whatsapp.net", "@g.us", "@lid")

Watcher = Callable[[AccountDoc | None], None]  # None: the document was deleted


#: What an operator does about each answer code of the admin socket.
ADMIN_EXPLANATIONS = {
    "bad_request": "the request is malformed: wabridgectl --help shows the commands",
    "bad_user_id": "use a user id of printable ASCII without spaces",
    "unknown_op": "the controller does not know this operation: same wabridge version?",
    "unknown_user": "no account document for this user: wabridgectl status lists them",
    "not_connected": "the user's worker is not running or not linked: wabridgectl restart",
    "fleet_off": "this host runs alone: set fleet.enabled = true (with storage.backend = "
                 "\"postgresql\") on every host of the fleet",
    "unknown_host": "no such host in the fleet: wabridgectl hosts lists them",
    "fleet_unavailable": "the fleet's tables in PostgreSQL cannot be reached: check "
                         "storage.postgres_url (wabridgectl doctor)",
    "internal": "the controller failed the request; its journal says why",
}


class AdminError(WabridgeError):
    """A request the admin socket answers with an error frame (``code``: one of
    ``ADMIN_EXPLANATIONS``); the connection stays open."""

    code = "admin_error"
    explanation = "the controller refused the request; the message says why"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.explanation = ADMIN_EXPLANATIONS.get(code, type(self).explanation)


def error_frame(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}


def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str).encode() + b"\n"


# --------------------------------------------------------------------------- watchers


class DocWatchers:
    """Who follows a user's document on this socket (``watch``, ``link --follow``). The
    controller calls ``changed`` whenever its view of a document changes (the change feed,
    and its own writes, see ``Controller.set_doc``); a watcher hears of a change only when
    a field it reports (``WATCHED``) changed."""

    def __init__(self) -> None:
        self._watchers: dict[str, list[Watcher]] = {}

    def watch(self, user_id: str, callback: Watcher) -> Callable[[], None]:
        """Call ``callback`` after every change of a watched field; returns an unsubscriber."""
        self._watchers.setdefault(user_id, []).append(callback)

        def unsubscribe() -> None:
            callbacks = self._watchers.get(user_id, [])
            with contextlib.suppress(ValueError):
                callbacks.remove(callback)
            if not callbacks:
                self._watchers.pop(user_id, None)

        return unsubscribe

    def watching(self) -> int:
        return sum(len(c) for c in self._watchers.values())

    def changed(self, user_id: str, old: AccountDoc | None, new: AccountDoc | None) -> None:
        if user_id not in self._watchers:
            return
        if (old is None) == (new is None) and watched(old) == watched(new):
            return
        for callback in list(self._watchers.get(user_id, [])):
            try:
                callback(new)
            except Exception as exc:  # noqa: BLE001 - one watcher must not break a write
                log.error("admin.watcher_failed", user_id=user_id, error=repr(exc))


def watched(doc: AccountDoc | None) -> dict[str, Any]:
    """The fields a ``watch`` reports, under the names it reports them."""
    if doc is None:
        return {}
    error = ({"code": doc.error_code, "message": doc.error_message}
             if doc.error_code is not None else None)
    return {"status": doc.raw_status if isinstance(doc.raw_status, str) else None,
            "detail": doc.status_detail, "qr": doc.qr_raw, "pairing_code": doc.pairing_code,
            "phone": doc.phone, "error": error}


# --------------------------------------------------------------------------- the facade


class UnitInfo(Protocol):
    """What the admin API reads of a unit (``controller.systemd.UnitState`` has it)."""

    @property
    def active_state(self) -> str: ...
    @property
    def sub_state(self) -> str: ...
    @property
    def main_pid(self) -> int: ...
    @property
    def n_restarts(self) -> int: ...
    @property
    def memory_bytes(self) -> int | None: ...


class AdminFacade(Protocol):
    """What the admin server needs of the controller."""

    def user_ids(self) -> Iterable[str]:
        """Every user with a document or a loaded worker unit."""

    def doc(self, user_id: str) -> AccountDoc | None: ...

    def unit(self, user_id: str) -> UnitInfo | None: ...

    def linked(self, user_id: str) -> bool:
        """Whether the user's worker is connected to the controller's worker socket."""

    def watch(self, user_id: str, callback: Watcher) -> Callable[[], None]: ...

    async def request(self, user_id: str, status: DocStatus, **fields: Any) -> None: ...

    async def command(self, user_id: str, command: protocol.Command) -> bool:
        """Send a command to the user's worker; False if it is not linked."""

    async def messages(self, user_id: str, limit: int) -> list[dict[str, Any]]: ...

    async def usage(self, user_id: str | None, since_day: str) -> list[dict[str, Any]]: ...

    def info(self) -> dict[str, Any]:
        """Host-wide facts for ``ping``: host, plane, sessions (how many account documents;
        the key is the admin protocol's), linked."""

    async def hosts(self) -> list[dict[str, Any]]:
        """The fleet's hosts; raises ``AdminError`` (``fleet_off``...)."""

    async def set_draining(self, host: str, draining: bool) -> None:
        """Raises ``AdminError`` (``fleet_off``, ``unknown_host``...)."""

    async def move(self, user_id: str, host: str) -> None:
        """Pin the account to ``host``; raises ``AdminError``."""


class ControllerView(Protocol):
    """The parts of ``controller.main.Controller`` that :class:`ControllerFacade` reads."""

    @property
    def docs(self) -> Mapping[str, AccountDoc]: ...
    @property
    def units(self) -> Mapping[str, UnitInfo]: ...
    @property
    def server(self) -> WorkerServer: ...
    @property
    def plane(self) -> ControlPlane: ...
    @property
    def host(self) -> str: ...
    @property
    def watchers(self) -> DocWatchers: ...
    @property
    def fleet(self) -> Fleet | None: ...


class ControllerFacade:
    def __init__(self, controller: ControllerView) -> None:
        self._c = controller

    def user_ids(self) -> Iterable[str]:
        return set(self._c.docs) | set(self._c.units)

    def doc(self, user_id: str) -> AccountDoc | None:
        return self._c.docs.get(user_id)

    def unit(self, user_id: str) -> UnitInfo | None:
        return self._c.units.get(user_id)

    def linked(self, user_id: str) -> bool:
        return user_id in self._c.server.connections

    def watch(self, user_id: str, callback: Watcher) -> Callable[[], None]:
        return self._c.watchers.watch(user_id, callback)

    async def request(self, user_id: str, status: DocStatus, **fields: Any) -> None:
        await self._c.plane.request(user_id, status, **fields)

    async def command(self, user_id: str, command: protocol.Command) -> bool:
        return await self._c.server.send(user_id, command)

    async def messages(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        return await self._c.plane.messages(user_id, limit)

    async def usage(self, user_id: str | None, since_day: str) -> list[dict[str, Any]]:
        return await self._c.plane.usage(user_id, since_day)

    def info(self) -> dict[str, Any]:
        return {"host": self._c.host, "plane": self._c.plane.name,
                "sessions": len(self._c.docs), "linked": len(self._c.server.connections)}

    def _fleet(self) -> Fleet:
        if self._c.fleet is None:
            raise AdminError("fleet_off", f"fleet mode is off on {self._c.host} "
                             "(fleet.enabled = false): there are no other hosts")
        return self._c.fleet

    async def _fresh(self) -> Fleet:
        fleet = self._fleet()
        try:
            await fleet.refresh()
        except FleetUnavailable as exc:
            raise AdminError("fleet_unavailable", str(exc)) from None
        return fleet

    def _known_host(self, fleet: Fleet, host: str) -> None:
        if not fleet.known_host(host):
            known = ", ".join(r["host"] for r in fleet.host_rows()) or "none"
            raise AdminError("unknown_host", f"no host {host!r} in the fleet (known: {known})")

    async def hosts(self) -> list[dict[str, Any]]:
        return (await self._fresh()).host_rows()

    async def set_draining(self, host: str, draining: bool) -> None:
        fleet = await self._fresh()
        self._known_host(fleet, host)
        try:
            await fleet.db.run(fleet_db.set_draining, host, draining)
        except FleetUnavailable as exc:
            raise AdminError("fleet_unavailable", str(exc)) from None

    async def move(self, user_id: str, host: str) -> None:
        fleet = await self._fresh()
        self._known_host(fleet, host)
        row = next(r for r in fleet.host_rows() if r["host"] == host)
        if not row["alive"] or row["draining"]:
            raise AdminError("bad_request", f"host {host!r} is "
                             f"{'draining' if row['draining'] else 'not alive'}: move the "
                             "account to a live host that is not draining")
        try:
            await fleet.db.run(fleet_db.pin, user_id, host)
        except FleetUnavailable as exc:
            raise AdminError("fleet_unavailable", str(exc)) from None


# --------------------------------------------------------------------------- answers


def status_row(
    user_id: str, doc: AccountDoc | None, unit: UnitInfo | None, linked: bool
) -> dict[str, Any]:
    """One user's line of ``status`` (keys are stable: wabridgectl --json prints them)."""
    shown = watched(doc)
    metrics = doc.metrics if doc is not None else {}
    running = unit is not None and unit.active_state in RUNNING_UNIT_STATES
    live = metrics.get("claudeProcesses")
    return {
        "user": user_id,
        "status": shown.get("status"),
        "detail": shown.get("detail", ""),
        "phone": shown.get("phone"),
        "unit": unit.active_state if unit is not None else None,
        "sub_state": unit.sub_state if unit is not None else None,
        "pid": (unit.main_pid or None) if unit is not None else None,
        "restarts": unit.n_restarts if unit is not None else None,
        "memory_bytes": unit.memory_bytes if unit is not None else None,
        "linked": linked,
        "chats": metrics.get("chats"),
        "claude_processes": (live if running else 0) if live is not None else None,
        "cost_today_usd": metrics.get("costTodayUsd"),
        "error": shown.get("error"),
        "host": doc.host if doc is not None else None,
    }


def chat_rows(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group a message log (oldest first) into chats, most recently active first."""
    chats: dict[str, dict[str, Any]] = {}
    for msg in messages:
        chat = msg.get("chatId") or msg.get("chat_id")
        if not isinstance(chat, str):
            continue
        row = chats.setdefault(chat, {"chat": chat, "messages": 0, "in": 0, "out": 0,
                                      "last_ts": None, "last_direction": None, "last_text": ""})
        row["messages"] += 1
        direction = msg.get("direction")
        if direction in ("in", "out"):
            row[direction] += 1
        ts = msg.get("ts")
        if isinstance(ts, int | float) and (row["last_ts"] is None or ts >= row["last_ts"]):
            row["last_ts"] = float(ts)
            row["last_direction"] = direction
            row["last_text"] = str(msg.get("text") or "")[:200]
    return sorted(chats.values(), key=lambda r: r["last_ts"] or 0.0, reverse=True)


def watch_event(kind: str, user_id: str, doc: AccountDoc | None) -> dict[str, Any]:
    if doc is None:
        return {"ok": True, "event": "removed", "user": user_id}
    return {"ok": True, "event": kind, "user": user_id, **watched(doc)}


def normalize_chat(chat: str) -> str:
    """A chat as wabridgectl users type it: a phone number becomes its JID."""
    chat = chat.strip().removeprefix("+")
    if chat.isascii() and chat.isdigit():
        return chat + "@s.whatsapp.net"
    if not chat or not chat.endswith(_CHAT_SUFFIXES) or any(c.isspace() for c in chat):
        raise AdminError("bad_request", f"chat {chat!r} is not a phone number or a chat JID "
                         f"(…{', …'.join(_CHAT_SUFFIXES)})")
    return chat


def pairing_phone(value: object) -> str:
    if not is_phone(value):
        raise AdminError("bad_request", f"phone {value!r} must be {PHONE_RULE}")
    return value


# --------------------------------------------------------------------------- the server


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Peer(pid, uid, gid)


def supplementary_groups(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """The ``Groups:`` of a process, or an empty set if it cannot be read."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:] if g.isdigit()}
    return set()


def resolve_group(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class AdminServer:
    """Serves the admin API on ``path`` for callers allowed by ``admin_gid``.

    ``group`` names the admin group (looked up at ``start``); ``admin_gid`` gives it by number
    instead (tests). ``mode`` is the socket's file mode.
    """

    def __init__(
        self,
        path: str,
        facade: AdminFacade,
        *,
        group: str = "wabridge-admin",
        admin_gid: int | None = None,
        mode: int = 0o660,
        proc: Path = Path("/proc"),
    ) -> None:
        self._path = Path(path)
        self._facade = facade
        self._group = group
        self.admin_gid = admin_gid
        self._mode = mode
        self._proc = proc
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        if self.admin_gid is None:
            self.admin_gid = resolve_group(self._group)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self._path), limit=MAX_REQUEST)
        if self.admin_gid is not None:
            os.chown(self._path, -1, self.admin_gid)
        self._path.chmod(self._mode)
        log.info("admin.listening", socket=str(self._path), gid=self.admin_gid,
                 mode=oct(self._mode))

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def allowed(self, peer: Peer) -> bool:
        if peer.uid == 0:
            return True
        if self.admin_gid is None:
            return False
        return peer.gid == self.admin_gid or self.admin_gid in supplementary_groups(
            peer.pid, self._proc)

    # --- connections --------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
            if not self.allowed(peer):
                log.warning("admin.forbidden", uid=peer.uid, gid=peer.gid, pid=peer.pid)
                await self._send(writer, error_frame(
                    "forbidden", f"uid {peer.uid} may not use the admin socket: run as root "
                    f"or as a member of group {self._group!r}"))
                return
            await self._requests(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # noqa: BLE001 - one connection must not kill the server
            log.error("admin.connection_failed", error=repr(exc))
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial.strip():
                    return
                line = exc.partial  # a last request without its newline
            except asyncio.LimitOverrunError:
                await self._send(writer, error_frame(
                    "bad_request", f"request exceeds {MAX_REQUEST} bytes"))
                return
            if not line.strip():
                continue
            try:
                request = parse_request(line)
                op = request["op"]
                if op == "watch" or (op == "link" and request.get("follow")):
                    await self._stream(op, request, reader, writer)
                    return
                response = await self.handle(request)
            except AdminError as exc:
                response = error_frame(exc.code, exc.message)
            except UserIdError as exc:  # a control plane's own check of the id
                response = error_frame(exc.code, str(exc))
            except ConnectionError:
                # the client left (wabridgectl link exits once connected): nothing to answer
                log.debug("admin.client_gone")
                return
            except Exception as exc:  # noqa: BLE001 - answer, never crash the connection
                log.error("admin.op_failed", error=repr(exc))
                response = error_frame("internal", f"{type(exc).__name__}: {exc}")
            await self._send(writer, response)
            if not line.endswith(b"\n"):
                return  # that was the last request

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: Mapping[str, Any]) -> None:
        writer.write(encode(obj))
        await writer.drain()

    # --- ops ------------------------------------------------------------------------------
    async def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one non-streaming request; raises ``AdminError``."""
        op = request["op"]
        f = self._facade
        if op == "ping":
            return {"ok": True, **f.info()}
        if op == "status":
            if request.get("user") is None:
                users = sorted(set(f.user_ids()))
            else:
                users = [self._known(request)]
            return {"ok": True, "users": [
                status_row(u, f.doc(u), f.unit(u), f.linked(u)) for u in users]}
        if op == "link":
            return await self._link(request)
        if op == "unlink":
            user = self._known(request)
            await f.request(user, DocStatus.DESTROY_REQUESTED)
            log.info("admin.unlink", user_id=user)
            return {"ok": True, "user": user, "status": DocStatus.DESTROY_REQUESTED.value}
        if op == "restart":
            user = self._known(request)
            await f.request(user, DocStatus.RESTART_REQUESTED)
            log.info("admin.restart", user_id=user)
            return {"ok": True, "user": user, "status": DocStatus.RESTART_REQUESTED.value}
        if op == "chats":
            user = self._known(request)
            limit = request.get("limit", MAX_CHAT_MESSAGES)
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise AdminError("bad_request", "limit must be a positive integer")
            messages = await f.messages(user, min(limit, 10 * MAX_CHAT_MESSAGES))
            return {"ok": True, "user": user, "source": "message_log",
                    "chats": chat_rows(messages)}
        if op == "reset":
            user = self._known(request)
            chat = request.get("chat")
            if not isinstance(chat, str):
                raise AdminError("bad_request", "reset needs 'chat' (a phone number or JID)")
            chat_id = normalize_chat(chat)
            command = protocol.Command(name="reset_chat", args={"chat_id": chat_id})
            if not f.linked(user) or not await f.command(user, command):
                raise AdminError("not_connected", f"the worker of {user!r} is not connected "
                                 "to the controller (is it running? see wabridgectl status)")
            log.info("admin.reset_chat", user_id=user, chat_id=chat_id)
            return {"ok": True, "user": user, "chat": chat_id, "sent": True}
        if op in ("pause", "resume"):
            return await self._pause(op, request)
        if op == "hosts":
            return {"ok": True, "hosts": await f.hosts()}
        if op in ("drain", "undrain"):
            host = _host(request)
            await f.set_draining(host, op == "drain")
            log.info(f"admin.{op}", host=host)
            return {"ok": True, "host": host, "draining": op == "drain"}
        if op == "move":
            user, host = self._known(request), _host(request)
            await f.move(user, host)
            log.info("admin.move", user_id=user, host=host)
            return {"ok": True, "user": user, "host": host}
        if op == "usage":
            who = self._known(request) if request.get("user") is not None else None
            days = request.get("days", 1)
            if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 366:
                raise AdminError("bad_request", f"days must be 1 to 366, not {days!r}")
            since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - (days - 1) * 86_400))
            return {"ok": True, "user": who, "since": since,
                    "usage": await f.usage(who, since)}
        raise AdminError("unknown_op", f"unknown op {op!r}; known: {', '.join(OPS)}")

    async def _pause(self, op: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """``pause``/``resume``: the worker stops (or starts again) answering one chat, as the
        owner's ``/pause``/``/resume`` from the self chat do."""
        f = self._facade
        user = self._known(request)
        chat = request.get("chat")
        if not isinstance(chat, str):
            raise AdminError("bad_request", f"{op} needs 'chat' (a phone number or JID)")
        chat_id = normalize_chat(chat)
        args = {"chat_id": chat_id}
        minutes = request.get("minutes")
        if op == "pause" and minutes is not None:
            if (isinstance(minutes, bool) or not isinstance(minutes, int | float)
                    or not 0 < minutes < float("inf")):
                raise AdminError("bad_request", f"minutes must be a positive number, not "
                                 f"{minutes!r}")
            args["minutes"] = str(minutes)
        command = protocol.Command(name="pause_chat" if op == "pause" else "resume_chat",
                                   args=args)
        if not f.linked(user) or not await f.command(user, command):
            raise AdminError("not_connected", f"the worker of {user!r} is not connected "
                             "to the controller (is it running? see wabridgectl status)")
        log.info(f"admin.{op}_chat", user_id=user, chat_id=chat_id)
        return {"ok": True, "user": user, "chat": chat_id, "sent": True}

    async def _link(self, request: Mapping[str, Any]) -> dict[str, Any]:
        f = self._facade
        user = _user(request)
        phone = request.get("phone")
        if phone is not None:
            phone = pairing_phone(phone)
        doc, unit = f.doc(user), f.unit(user)
        if (doc is not None and doc.status is DocStatus.CONNECTED and unit is not None
                and unit.active_state in RUNNING_UNIT_STATES):
            return {"ok": True, "user": user, "status": DocStatus.CONNECTED.value,
                    "already_connected": True, "phone": doc.phone}
        new = DocStatus.PAIRING_REQUESTED if phone else DocStatus.CREATE_REQUESTED
        extra: dict[str, Any] = {"qrRaw": None, "qrCode": None, "pairingCode": None,
                                 "error": None}
        if phone:
            extra["pairingPhone"] = phone
        await f.request(user, new, **extra)
        log.info("admin.link", user_id=user, pairing=bool(phone))
        return {"ok": True, "user": user, "status": new.value, "already_connected": False}

    async def _stream(self, op: str, request: Mapping[str, Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        user = _user(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        unsubscribe = self._facade.watch(
            user, lambda doc: queue.put_nowait(watch_event("update", user, doc)))
        eof = asyncio.ensure_future(reader.read(1))
        try:
            if op == "link":
                first = await self._link(request)
                await self._send(writer, first)
                if first.get("already_connected"):
                    return
            else:
                await self._send(writer, watch_event("snapshot", user, self._facade.doc(user)))
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, eof}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return  # the client closed (or wrote, which a stream does not expect)
                await self._send(writer, get.result())
        finally:
            unsubscribe()
            eof.cancel()

    def _known(self, request: Mapping[str, Any]) -> str:
        user = _user(request)
        f = self._facade
        if f.doc(user) is None and f.unit(user) is None:
            raise AdminError("unknown_user", f"no account for user {user!r} "
                             "(wabridgectl status lists them)")
        return user


OPS = ("ping", "status", "link", "unlink", "restart", "watch", "chats", "reset", "pause",
       "resume", "usage", "hosts", "drain", "undrain", "move")


def _host(request: Mapping[str, Any]) -> str:
    host = request.get("host")
    if not isinstance(host, str) or not host.strip() or len(host) > 255:
        raise AdminError("bad_request", f"{request.get('op')} needs 'host' (a host id, as "
                         "wabridgectl hosts lists them)")
    return host


def _user(request: Mapping[str, Any]) -> str:
    user = request.get("user")
    if user is None:
        raise AdminError("bad_request", f"{request.get('op')} needs 'user'")
    try:
        return validate_user_id(user)
    except UserIdError as exc:
        raise AdminError("bad_user_id", str(exc)) from None


def parse_request(line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise AdminError("bad_request", f"request is not JSON: {str(exc)[:200]}") from None
    if not isinstance(request, dict):
        raise AdminError("bad_request", "a request must be a JSON object")
    op = request.get("op")
    if not isinstance(op, str):
        raise AdminError("bad_request", "a request needs 'op' (a string)")
    if op not in OPS:
        raise AdminError("unknown_op", f"unknown op {op!r}; known: {', '.join(OPS)}")
    return request
