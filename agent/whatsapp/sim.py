"""The ``sim`` backend: a linked-device client of ``wabridge-sim`` (see :mod:`sim`).

It speaks the sim's device WebSocket (``GET /ws/device``, JSON frames) and translates frames
into :mod:`agent.whatsapp.events`. The device token the sim hands out on ``paired`` is kept in
``<state_dir>/sim-device.json`` (mode 0600, written atomically), or, with ``storage.backend =
postgresql``, in the table ``sim_device`` of the account's own schema (beside whatsmeow's
tables for neonize), so a restarted worker, or one started on another host, reconnects
without a new QR; ``logged_out`` deletes it. A token that cannot be read (the database is
down) is retried like an unreachable sim: never a QR for an account that is linked.

**Reconnects differ from neonize.** :mod:`agent.whatsapp.base` says a backend never reconnects
in the same process, because neonize leaks when it does. Nothing leaks here, so when the socket
drops (or the sim is not up yet) this backend reports ``Disconnected`` once and keeps
reconnecting by itself with exponential backoff (0.25 s doubling to 10 s, with jitter). The
agent's ``reconnect_timeout`` still applies: if the link stays down that long, the worker
exits and systemd starts a fresh one. After a terminal outcome (``LoggedOut``,
``StreamReplaced``, ``TemporaryBan``, ``ClientOutdated``, ``QrExpired``) it stops trying.

Messages: the sink is called first (it persists the message), then the message is acked to the
sim. Unacked messages are re-delivered by the sim on the next connect, so the agent must
deduplicate (it does, by chat, sender and id). Test hook: with ``WABRIDGE_TEST_HOOKS=1`` and
``WABRIDGE_TEST_SIM_ACK=receipt`` the message is acked *before* the sink sees it, as neonize
does (whatsmeow acks on receipt): then the worker's own hold (``agent.inbound_hold``) is the
only copy of a message its store refused, as in production.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import importlib
import itertools
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.whatsapp.base import (
    BackendContext,
    PostgresSessionStore,
    SendError,
    Sink,
    WhatsAppBackend,
)
from agent.whatsapp.events import (
    Audio,
    ClientOutdated,
    Connected,
    Disconnected,
    Event,
    Image,
    IncomingMessage,
    LoggedOut,
    PairingCode,
    QrCode,
    QrExpired,
    StreamReplaced,
    TemporaryBan,
)
from wabridge import logs
from wabridge.atomic_write import write_atomically

if TYPE_CHECKING:
    import aiohttp

log = logs.get("wabridge.whatsapp.sim")

TOKEN_FILE = "sim-device.json"  # noqa: S105 - a file name, not a secret
BACKOFF_MIN = 0.25
BACKOFF_MAX = 10.0
SEND_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
MAX_FRAME = 16 * 1024 * 1024
HOST_ID_ENV = "WABRIDGE_HOST_ID"  # set by a fleet's controller in the unit's drop-in


def ack_on_receipt(environ: dict[str, str] | None = None) -> bool:
    """The test hook of the module docstring (neonize's ack order)."""
    env = os.environ if environ is None else environ
    return env.get("WABRIDGE_TEST_HOOKS") == "1" and env.get("WABRIDGE_TEST_SIM_ACK") == "receipt"


class _Terminal(Exception):
    """The sim ended this session for good (logged out, replaced, banned...)."""


class _TokenUnavailable(Exception):
    """Where the device token lives cannot be read now (retried; never taken as "no token",
    which would show a QR for a linked account)."""


class _FileDevice:
    """The device record in ``<state_dir>/sim-device.json`` (one host's SQLite layout)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> str | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("whatsapp.sim_token_unreadable", path=str(self.path), error=str(exc))
            return None
        token = data.get("token") if isinstance(data, dict) else None
        return token if isinstance(token, str) else None

    def write(self, record: dict[str, Any]) -> None:
        try:
            write_atomically(self.path, json.dumps(record).encode())
        except OSError as exc:
            # The link works for this process; the next start will need a new QR.
            log.error("whatsapp.sim_token_write_failed", path=str(self.path), error=str(exc))

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _PostgresDevice:
    """The device record in the account's own schema (``storage.backend = postgresql``): the
    role's default ``search_path`` (``"$user"``) is that schema, which only it can read."""

    def __init__(self, store: PostgresSessionStore) -> None:
        self.store = store

    def _run(self, query: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        """One statement after making the table; the first row, if the statement has rows."""
        import psycopg  # noqa: PLC0415 - only on this backend

        try:
            with psycopg.connect(self.store.url, autocommit=True, connect_timeout=5) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS sim_device "
                             "(id int PRIMARY KEY CHECK (id = 1), record jsonb NOT NULL)")
                cursor = conn.execute(query, params)
                return cursor.fetchone() if cursor.description is not None else None
        except psycopg.Error as exc:
            raise _TokenUnavailable(f"{self.store}: {self.store.redact(str(exc).strip())}"
                                    ) from None

    def read(self) -> str | None:
        row = self._run("SELECT record->>'token' FROM sim_device WHERE id = 1")
        return str(row[0]) if row and row[0] else None

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._run("INSERT INTO sim_device (id, record) VALUES (1, %s) ON CONFLICT (id) "
                      "DO UPDATE SET record = EXCLUDED.record", (json.dumps(record),))
        except _TokenUnavailable as exc:
            log.error("whatsapp.sim_token_write_failed", error=str(exc))

    def delete(self) -> None:
        try:
            self._run("DELETE FROM sim_device")
        except _TokenUnavailable as exc:
            log.error("whatsapp.sim_token_delete_failed", error=str(exc))


class SimBackend(WhatsAppBackend):
    name = "sim"
    honours_message_id = True  # the simulator keeps the id the outbox chose

    def __init__(
        self,
        ctx: BackendContext,
        base_url: str,
        *,
        send_timeout: float = SEND_TIMEOUT,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self._ctx = ctx
        self._url = base_url.rstrip("/") + "/ws/device"
        self._device: _FileDevice | _PostgresDevice = (
            _PostgresDevice(ctx.session_store) if ctx.session_store is not None
            else _FileDevice(ctx.state_dir / TOKEN_FILE))
        # the sim keeps this label with each connection's interval: in a fleet, the host
        self._client = os.environ.get(HOST_ID_ENV, "")
        self._send_timeout = send_timeout
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._sink: Sink | None = None
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = False
        self._stopping = False
        self._reqs = itertools.count(1)
        self._pending: dict[int, asyncio.Future[str]] = {}
        self._pair_phone: str | None = None
        self._pair_sent = False  # on the current connection
        self._ack_first = ack_on_receipt()

    # ------------------------------------------------------------------ interface

    def start(self, sink: Sink) -> None:
        if self._task is not None:
            raise RuntimeError("SimBackend.start called twice")
        loop = asyncio.get_running_loop()  # raises RuntimeError outside the event loop
        self._sink = sink
        self._task = loop.create_task(self._run(), name=f"sim-backend-{self._ctx.user_id}")

    async def send_text(
        self, chat_id: str, text: str, *, quote: IncomingMessage | None, msg_id: str | None = None,
        expiration: int = 0,
    ) -> str:
        del expiration  # the simulator has no disappearing messages
        return await self._request({
            "type": "send",
            "to": chat_id,
            "text": text,
            "quote_id": quote.wa_id if quote is not None else None,
            "id": msg_id,
        })

    async def send_reaction(self, chat_id: str, message: IncomingMessage, emoji: str) -> None:
        await self._request({"type": "send", "to": chat_id, "text": "",
                             "reaction": {"target_id": message.wa_id, "emoji": emoji}})

    async def send_media(self, chat_id: str, kind: str, data: bytes, filename: str, mime: str,
                         caption: str) -> str:
        return await self._request({
            "type": "send", "to": chat_id, "text": caption,
            "media": {"kind": kind, "filename": filename, "mime": mime,
                      "data": base64.b64encode(data).decode()},
        })

    async def _request(self, frame: dict[str, Any]) -> str:
        """Send one ``send`` frame; the id the simulator gave the message."""
        ws = self._ws
        if ws is None or ws.closed or not self._connected:
            raise SendError("not connected to wabridge-sim")
        req = next(self._reqs)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        frame = {**frame, "req": req}
        import aiohttp  # noqa: PLC0415 - loaded by _run (off the start-up path)

        try:
            await ws.send_json(frame)
            return await asyncio.wait_for(future, self._send_timeout)
        except TimeoutError:
            raise SendError(
                f"wabridge-sim did not answer within {self._send_timeout:g} s"
            ) from None
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise SendError(f"sending to wabridge-sim failed: {exc}") from exc
        finally:
            self._pending.pop(req, None)

    async def set_typing(self, chat_id: str, typing: bool) -> None:
        await self._send_quietly({"type": "typing", "to": chat_id, "on": typing})

    async def pair_phone(self, phone: str) -> None:
        self._pair_phone = phone
        self._pair_sent = False
        ws = self._ws
        if ws is not None and not ws.closed and not self._connected:
            self._pair_sent = await self._send_quietly({"type": "pair_phone", "phone": phone})

    async def stop(self, timeout: float = 3.0) -> None:
        self._stopping = True
        task, self._task = self._task, None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), max(0.0, timeout / 2))
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
        self._fail_pending("backend stopped")
        self._connected = False

    def is_connected(self) -> bool:
        return self._connected

    def healthy(self) -> bool:
        task = self._task
        return task is None or not task.done() or task.cancelled() or task.exception() is None

    # ------------------------------------------------------------------ connection loop

    async def _run(self) -> None:
        delay = self._backoff_min
        outage_reported = False
        # aiohttp (its connector, ssl, ...) costs ~0.1-0.2 s of CPU to import: loaded in a
        # thread after READY=1 rather than before it, and without stalling the event loop
        await asyncio.to_thread(importlib.import_module, "aiohttp")
        import aiohttp  # noqa: PLC0415

        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_connect=None)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while not self._stopping:
                    try:
                        token = await asyncio.to_thread(self._device.read)
                        ws = await session.ws_connect(
                            self._url, heartbeat=15.0, max_msg_size=MAX_FRAME,
                            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                        )
                    except (aiohttp.ClientError, OSError, TimeoutError,
                            _TokenUnavailable) as exc:
                        if not outage_reported:
                            why = str(exc) or type(exc).__name__
                            where = ("device token unreadable" if isinstance(
                                exc, _TokenUnavailable) else "sim unreachable")
                            self._emit(Disconnected(f"{where}: {why}"))
                            outage_reported = True
                        log.debug("whatsapp.sim_connect_failed", error=str(exc), retry_in=delay)
                        await asyncio.sleep(self._jitter(delay))
                        delay = min(delay * 2, self._backoff_max)
                        continue
                    try:
                        reason, healthy = await self._session(ws, token)
                    except _Terminal:
                        return
                    except (aiohttp.ClientError, ConnectionError) as exc:
                        # e.g. a pong or an ack written as the sim closes the socket (it
                        # dropped us after a late pong): a lost connection like any other
                        reason, healthy = f"connection lost: {exc or type(exc).__name__}", True
                    finally:
                        self._ws = None
                        self._connected = False
                        self._fail_pending("connection to wabridge-sim lost")
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(ws.close(), 1.0)
                    if self._stopping:
                        return
                    if healthy:
                        delay = self._backoff_min
                    self._emit(Disconnected(reason))
                    outage_reported = True
                    log.info("whatsapp.disconnected", reason=reason, retry_in=delay)
                    await asyncio.sleep(self._jitter(delay))
                    delay = min(delay * 2, self._backoff_max)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("whatsapp.sim_backend_crashed")
            self._emit(Disconnected("sim backend failed unexpectedly (see log)"))

    async def _session(self, ws: aiohttp.ClientWebSocketResponse,
                       token: str | None) -> tuple[str, bool]:
        """Run one connection; returns (why it ended, whether the sim answered the hello)."""
        import aiohttp  # noqa: PLC0415 - loaded by _run (off the start-up path)

        self._ws = ws
        self._pair_sent = False
        healthy = False
        await ws.send_json({"type": "hello", "token": token,
                            "client": self._client})
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    log.warning("whatsapp.sim_bad_frame", data=str(msg.data)[:200])
                    continue
                if not isinstance(frame, dict):
                    log.warning("whatsapp.sim_bad_frame", data=str(msg.data)[:200])
                    continue
                healthy = True
                await self._handle(ws, frame)
            elif msg.type is aiohttp.WSMsgType.ERROR:
                return f"connection to wabridge-sim failed: {ws.exception()}", healthy
            else:
                break
        code = ws.close_code
        return f"connection to wabridge-sim closed (code {code})", healthy

    async def _handle(self, ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            message = self._to_message(frame)
            if self._ack_first:  # neonize's order: from here on the worker holds the only copy
                await ws.send_json({"type": "ack", "id": frame.get("id")})
            if message is not None:
                try:
                    self._deliver(message)
                except Exception:
                    # Not acked (unless on receipt): the sim re-delivers it on the next connect.
                    log.exception("whatsapp.sink_failed", wa_id=message.wa_id)
                    return
            if not self._ack_first:
                await ws.send_json({"type": "ack", "id": frame.get("id")})
        elif kind == "qr":
            self._emit(QrCode(str(frame.get("code", ""))))
            if self._pair_phone is not None and not self._pair_sent:
                self._pair_sent = True
                await ws.send_json({"type": "pair_phone", "phone": self._pair_phone})
        elif kind == "pairing_code":
            self._emit(PairingCode(str(frame.get("code", ""))))
        elif kind == "paired":
            record = {k: frame.get(k) for k in ("token", "jid", "phone", "push_name",
                                                "device_id")}
            await asyncio.to_thread(self._device.write, record)
        elif kind == "connected":
            self._connected = True
            self._emit(
                Connected(
                    jid=str(frame.get("jid", "")),
                    phone=str(frame.get("phone", "")),
                    push_name=str(frame.get("push_name") or ""),
                )
            )
        elif kind in ("sent", "send_error"):
            self._resolve(frame)
        elif kind == "logged_out":
            await asyncio.to_thread(self._device.delete)
            self._finish(LoggedOut(str(frame.get("reason") or "")))
        elif kind == "stream_replaced":
            self._finish(StreamReplaced())
        elif kind == "temporary_ban":
            expires = frame.get("expires_at")
            self._finish(
                TemporaryBan(
                    reason=str(frame.get("reason") or ""),
                    expires_at=float(expires) if isinstance(expires, int | float) else None,
                )
            )
        elif kind == "client_outdated":
            self._finish(ClientOutdated())
        elif kind == "qr_expired":
            self._finish(QrExpired())
        elif kind == "error":
            log.warning("whatsapp.sim_error", error=str(frame.get("error")))
        else:
            log.debug("whatsapp.sim_unknown_frame", kind=str(kind))

    def _finish(self, event: Event) -> None:
        self._connected = False
        self._emit(event)
        raise _Terminal

    # ------------------------------------------------------------------ translation

    @staticmethod
    def _to_message(frame: dict[str, Any]) -> IncomingMessage | None:
        try:
            images: tuple[Image, ...] = ()
            raw_image = frame.get("image")
            if isinstance(raw_image, dict):
                try:
                    data = base64.b64decode(str(raw_image["data_b64"]), validate=True)
                except (binascii.Error, ValueError, KeyError):
                    log.warning("whatsapp.sim_bad_image", wa_id=str(frame.get("id")))
                else:
                    images = (
                        Image(
                            mime_type=str(raw_image.get("mime_type") or "image/jpeg"),
                            data=data,
                            caption=str(raw_image.get("caption") or ""),
                        ),
                    )
            audio = _audio(frame)
            return IncomingMessage(
                wa_id=str(frame["id"]),
                chat_id=str(frame["chat"]),
                sender=str(frame["sender"]),
                text=str(frame.get("text") or ""),
                timestamp=float(frame.get("ts") or 0.0),
                sender_name=str(frame.get("sender_name") or ""),
                is_group=bool(frame.get("is_group")),
                from_me=bool(frame.get("from_me")),
                mentioned=bool(frame.get("mentioned")),
                quoted_text=str(frame.get("quoted_text") or ""),
                images=images,
                unsupported_media=str(frame.get("media") or "")
                or ("" if audio is None else "voice" if audio.voice else "audio"),
                audio=audio,
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("whatsapp.sim_bad_message", error=repr(exc), wa_id=str(frame.get("id")))
            return None

    # ------------------------------------------------------------------ helpers

    def _emit(self, event: Event) -> None:
        if self._sink is None:
            return
        try:
            self._sink(event)
        except Exception:
            log.exception("whatsapp.sink_failed", event=type(event).__name__)

    def _deliver(self, message: IncomingMessage) -> None:
        if self._sink is not None:
            self._sink(message)  # may raise: then the message is not acked

    def _resolve(self, frame: dict[str, Any]) -> None:
        req = frame.get("req")
        future = self._pending.get(req) if isinstance(req, int) else None
        if future is None or future.done():
            return
        if frame.get("type") == "sent":
            future.set_result(str(frame.get("id", "")))
        else:
            future.set_exception(SendError(f"wabridge-sim refused: {frame.get('error')}"))

    def _fail_pending(self, why: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SendError(why))
        self._pending.clear()

    async def _send_quietly(self, frame: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        import aiohttp  # noqa: PLC0415 - loaded by _run (off the start-up path)

        try:
            await ws.send_json(frame)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            log.debug("whatsapp.sim_send_failed", kind=str(frame.get("type")), error=str(exc))
            return False
        return True

    def _jitter(self, delay: float) -> float:
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 - not security relevant


def _audio(frame: dict[str, Any]) -> Audio | None:
    """A sim frame's voice note or audio file (``audio``: mime_type, data_b64, seconds,
    voice), as neonize's audioMessage is translated."""
    raw = frame.get("audio")
    if not isinstance(raw, dict):
        return None
    try:
        data = base64.b64decode(str(raw["data_b64"]), validate=True)
    except (binascii.Error, ValueError, KeyError):
        log.warning("whatsapp.sim_bad_audio", wa_id=str(frame.get("id")))
        return None
    return Audio(mime_type=str(raw.get("mime_type") or "audio/ogg; codecs=opus"), data=data,
                 seconds=float(raw.get("seconds") or 0.0), voice=bool(raw.get("voice", True)))
