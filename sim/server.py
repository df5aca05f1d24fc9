"""wabridge-sim's aiohttp app: the device WebSocket and the loopback HTTP API.

HTTP API (JSON in and out; errors are ``{"error": code, "message": ..., "field": ...}``):

==========================================  ==============================================
``GET  /api/health``                        ``{"ok": true, ...}``
``GET  /api/qr``                            devices waiting for a scan and their current code
``GET  /api/qr.png?code=...``               that code as a PNG (for the web page)
``POST /api/phones/{phone}/scan``           ``{"code", "push_name"?}``: the phone scans a QR
``POST /api/phones/{phone}/pairing-code``   ``{"code", "push_name"?}``: the phone types a code
``POST /api/messages``                      a contact writes to an account -> ``{"id"}``
``GET  /api/contacts/{phone}/inbox``        what accounts sent to that contact
``GET  /api/groups/{gid}/inbox``            what accounts sent to that group
``GET  /api/accounts``                      every account's state
``GET  /api/accounts/{phone}``              one account: linked, connected, devices, typing…
``POST /api/accounts/{phone}/messages``     the owner's phone writes ``{"text", "to"?,
                                            "group"?, ...}``: no ``to``/``group`` is the self
                                            chat -> ``{"id"}``; devices get it as ``from_me``
``GET  /api/accounts/{phone}/self-chat``    the account's own chat (phone and device lines)
``GET  /api/devices/{phone}/connections``   every interval each device of the account was
                                            connected, and its double connections
``GET  /api/connections``                   the same for every account, with totals
``POST /api/accounts/{phone}/{outcome}``    logout, replace, ban ``{"expires_in"}``,
                                            outdated, disconnect; ``unban`` lifts a ban
==========================================  ==============================================

``GET /`` is the web page for people (:mod:`sim.page`): a phone that scans the QR codes,
contacts who write to the linked accounts, and the owner's phone of each account.

The device WebSocket is ``GET /ws/device`` (protocol in :mod:`sim`). Each connection has one
writer task fed by a queue, so frames leave in exactly the order the world produced them.
The server pings every connection each ``heartbeat`` seconds and drops one whose pong does not
come within half that, as WhatsApp drops a dead client: a frozen host's socket ends instead of
looking connected forever (the interval ends ``ping_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import WSMsgType, web

from sim.page import INDEX_HTML
from sim.world import Action, Close, Send, World, WorldError, bad, check_phone
from wabridge import logs, qr
from wabridge.atomic_write import write_atomically

log = logs.get("wabridge.sim")

MAX_BODY = 24 * 1024 * 1024  # a 16 MB file (tools.file_max_bytes) in base64 plus the rest
SAVE_EVERY = 1.0  # seconds between state-file writes while things change

HEARTBEAT = 30.0  # seconds between pings on a device connection (aiohttp's heartbeat)
QR_PNG_SIZE = 384
MAX_QR_CODE = 512  # characters of a code /api/qr.png renders


@dataclass
class _Link:
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    queue: asyncio.Queue[Action | None] = field(default_factory=asyncio.Queue)


class SimServer:
    """The sim, runnable in-process (tests) or by :mod:`sim.main`.

    ``async with SimServer(port=0) as sim: sim.base_url`` binds a free loopback port.
    """

    def __init__(
        self,
        world: World | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        qr_rotate: float = 20.0,
        qr_max: int = 6,
        state_file: Path | None = None,
        tick: float | None = None,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        if heartbeat <= 0:
            raise ValueError("heartbeat must be positive")
        self.world = world or World(qr_rotate=qr_rotate, qr_max=qr_max)
        self.heartbeat = heartbeat
        self.host = host
        self.port = port
        self.state_file = state_file
        self.tick_interval = tick or min(0.25, self.world.qr_rotate / 5)
        self._links: dict[int, _Link] = {}
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._saved_version = -1
        self.app = self._make_app()

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self.state_file is not None:
            self._load_state(self.state_file)
        self._saved_version = self.world.version
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break
        self._ticker = asyncio.create_task(self._tick_loop(), name="sim-ticker")
        log.info("sim.listening", url=self.base_url, state_file=str(self.state_file or ""))

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for link in list(self._links.values()):
            if link.transport is not None:
                link.transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._save_if_changed()
        log.info("sim.stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ state file

    def _load_state(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        try:
            self.world.load_state(json.loads(text))
        except ValueError as exc:
            raise ValueError(f"{path}: not a wabridge-sim state file ({exc})") from None
        log.info("sim.state_loaded", path=str(path), accounts=len(self.world.accounts))

    def _save_if_changed(self) -> None:
        if self.state_file is None or self.world.version == self._saved_version:
            return
        version = self.world.version
        try:
            write_atomically(self.state_file, json.dumps(self.world.to_state()).encode())
        except OSError as exc:
            log.warning("sim.state_save_failed", path=str(self.state_file), error=str(exc))
            return
        self._saved_version = version

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_save = loop.time() + SAVE_EVERY
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self.dispatch(self.world.tick())
                if loop.time() >= next_save:
                    next_save = loop.time() + SAVE_EVERY
                    self._save_if_changed()
            except Exception:  # the ticker must survive anything
                log.exception("sim.tick_failed")

    # ------------------------------------------------------------------ actions

    def dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            link = self._links.get(action.conn)
            if link is not None:
                link.queue.put_nowait(action)

    async def _writer(self, conn_id: int, link: _Link) -> None:
        while True:
            action = await link.queue.get()
            if action is None:
                return
            if isinstance(action, Send):
                try:
                    await link.ws.send_json(action.frame)
                except (ConnectionError, RuntimeError) as exc:
                    log.debug("sim.send_failed", conn=conn_id, error=str(exc))
                    return
            elif isinstance(action, Close):
                if action.abrupt:
                    if link.transport is not None:
                        link.transport.abort()
                else:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await link.ws.close()
                return

    # ------------------------------------------------------------------ HTTP

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
        app.router.add_get("/", self._index)
        app.router.add_get("/ws/device", self._ws_device)
        app.router.add_get("/api/health", self._health)
        app.router.add_get("/api/qr", self._qr)
        app.router.add_get("/api/qr.png", self._qr_png)
        app.router.add_post("/api/phones/{phone}/scan", self._scan)
        app.router.add_post("/api/phones/{phone}/pairing-code", self._pairing_code)
        app.router.add_post("/api/messages", self._messages)
        app.router.add_get("/api/contacts/{phone}/inbox", self._contact_inbox)
        app.router.add_get("/api/groups/{gid}/inbox", self._group_inbox)
        app.router.add_get("/api/accounts", self._accounts)
        app.router.add_get("/api/accounts/{phone}", self._account)
        # before {outcome}: "messages" is the owner's phone, not an outcome
        app.router.add_post("/api/accounts/{phone}/messages", self._owner_message)
        app.router.add_get("/api/accounts/{phone}/self-chat", self._self_chat)
        app.router.add_post("/api/accounts/{phone}/{outcome}", self._outcome)
        app.router.add_get("/api/devices/{phone}/connections", self._connections)
        app.router.add_get("/api/connections", self._all_connections)
        return app

    async def _index(self, _request: web.Request) -> web.Response:
        return web.Response(text=INDEX_HTML, content_type="text/html")

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"ok": True, "accounts": len(self.world.accounts), "connections": len(self._links)}
        )

    async def _qr(self, _request: web.Request) -> web.Response:
        return web.json_response(self.world.pending_qr())

    async def _qr_png(self, request: web.Request) -> web.Response:
        code = request.query.get("code", "")
        if not code:
            raise bad("code", "is required (?code=...)")
        if len(code) > MAX_QR_CODE:
            raise bad("code", f"is longer than {MAX_QR_CODE} characters")
        png = qr.to_png(code, QR_PNG_SIZE)
        return web.Response(body=png, content_type="image/png",
                            headers={"Cache-Control": "max-age=300"})

    async def _scan(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        actions = self.world.scan(phone, await _body(request))
        self.dispatch(actions)
        log.info("sim.linked", phone=phone, via="qr")
        return web.json_response({"ok": True, "phone": phone})

    async def _pairing_code(self, request: web.Request) -> web.Response:
        phone = request.match_info["phone"]
        actions = self.world.pairing_link(phone, await _body(request))
        self.dispatch(actions)
        log.info("sim.linked", phone=phone, via="pairing_code")
        return web.json_response({"ok": True, "phone": phone})

    async def _messages(self, request: web.Request) -> web.Response:
        msg_id, actions = self.world.post_message(await _body(request))
        self.dispatch(actions)
        return web.json_response({"id": msg_id, "delivered_now": len(actions)})

    async def _owner_message(self, request: web.Request) -> web.Response:
        msg_id, actions = self.world.owner_message(request.match_info["phone"],
                                                   await _body(request))
        self.dispatch(actions)
        return web.json_response({"id": msg_id, "delivered_now": len(actions)})

    async def _self_chat(self, request: web.Request) -> web.Response:
        return web.json_response(self.world.self_chat(request.match_info["phone"]))

    async def _contact_inbox(self, request: web.Request) -> web.Response:
        return web.json_response(self.world.contact_inbox(request.match_info["phone"]))

    async def _group_inbox(self, request: web.Request) -> web.Response:
        return web.json_response(self.world.group_inbox(request.match_info["gid"]))

    async def _accounts(self, _request: web.Request) -> web.Response:
        return web.json_response(self.world.list_accounts())

    async def _account(self, request: web.Request) -> web.Response:
        return web.json_response(self.world.account_state(request.match_info["phone"]))

    async def _connections(self, request: web.Request) -> web.Response:
        return web.json_response(self.world.connections(request.match_info["phone"]))

    async def _all_connections(self, _request: web.Request) -> web.Response:
        return web.json_response(self.world.all_connections())

    async def _outcome(self, request: web.Request) -> web.Response:
        phone, outcome = request.match_info["phone"], request.match_info["outcome"]
        check_phone(phone)
        body = await _body(request)
        if outcome == "unban":
            self.world.unban(phone)
        else:
            self.dispatch(self.world.outcome(phone, outcome, body))
        log.info("sim.outcome", phone=phone, outcome=outcome)
        return web.json_response({"ok": True, "outcome": outcome})

    # ------------------------------------------------------------------ device socket

    async def _ws_device(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=self.heartbeat, max_msg_size=MAX_BODY)
        await ws.prepare(request)
        conn_id = self.world.open_conn()
        transport = request.transport
        link = _Link(ws, transport if isinstance(transport, asyncio.Transport) else None)
        self._links[conn_id] = link
        writer = asyncio.create_task(self._writer(conn_id, link), name=f"sim-conn-{conn_id}")
        log.debug("sim.device_open", conn=conn_id)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    try:
                        frame = json.loads(msg.data)
                    except ValueError:
                        self.dispatch([_error(conn_id, "frames must be JSON text")])
                        continue
                    try:
                        self.dispatch(self.world.device_frame(conn_id, frame))
                    except Exception:  # one bad frame must not kill the sim
                        log.exception("sim.frame_failed", conn=conn_id)
                        self.dispatch([_error(conn_id, "internal error handling this frame")])
                elif msg.type is WSMsgType.BINARY:
                    self.dispatch([_error(conn_id, "binary frames are not supported")])
                else:
                    break
        finally:
            # aiohttp ends a connection whose pong is late with a TimeoutError
            timed_out = isinstance(ws.exception(), TimeoutError)
            self.world.close_conn(conn_id, "ping_timeout" if timed_out else "closed")
            if timed_out:
                log.info("sim.ping_timeout", conn=conn_id)
            link.queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(writer, 1.0)
            self._links.pop(conn_id, None)
            log.debug("sim.device_closed", conn=conn_id)
        return ws


def _error(conn_id: int, message: str) -> Send:
    return Send(conn_id, {"type": "error", "error": message})


async def _body(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise WorldError(400, "invalid_json", "the body is not valid JSON") from None


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except WorldError as exc:
        return web.json_response(exc.to_json(), status=exc.status)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        return web.json_response(
            {"error": exc.reason.lower().replace(" ", "_"), "message": exc.text or exc.reason},
            status=exc.status,
        )
    except Exception:  # answer 500, never crash the sim
        log.exception("sim.request_failed", path=request.path)
        return web.json_response(
            {"error": "internal", "message": "internal error (see the sim's log)"}, status=500
        )
    return response
