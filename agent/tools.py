"""The worker's side of Claude's tools: one private unix socket per chat, and what each tool
does (:class:`Toolbox`).

A chat's Claude process is started with ``--mcp-config`` naming :mod:`agent.mcp_server` and
the chat's socket (:meth:`Toolbox.launch`); the MCP server forwards each call here. The socket
is created for one chat (mode 0600, in the worker's private state directory, under the
worker's UID): every call on it acts on that chat and no other, whatever its arguments say.

Rules every tool keeps:

- files are read from the chat's workspace (the CLI's working directory) only: an absolute
  path, ``..``, or a symlink leading out is refused (:func:`workspace_file`);
- a turn makes at most ``claude.max_tool_calls`` calls; later ones are refused, and the CLI
  makes at most that many tool rounds (``--max-turns``): a model that keeps calling tools
  gets its turn ended (the contact gets the apology) instead of running until the timeout;
- scheduled messages and notes are bounded (``[tools]`` limits);
- every call is logged (``tool.call``, with the chat; the worker binds ``user_id``) and
  counted (``tool_calls``); refusals are the model's to read, as a tool error.

Cost (2 vCPU VM shared with other jobs, CLI 2.1.331, fake API; 3 runs each with and without
tools of: open, a turn, a second turn; PSS from ``/proc/PID/smaps_rollup``): the MCP
server is a second process per live chat, 55-58 MB PSS (the ``mcp`` package and pydantic),
and the CLI waits for it, so a chat's first answer takes 1.9-3.7 s instead of 0.5-1.5 s;
later turns are unchanged (a tool round adds one API request and ~50 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from agent import scheduling
from agent.claude import ToolFlags
from agent.store import Store
from agent.whatsapp.base import SendError, WhatsAppBackend
from agent.whatsapp.events import IncomingMessage
from wabridge import logs
from wabridge.config import ToolsConfig

log = logs.get("agent.tools")

#: Where ``agent`` is imported from: the MCP server (``python -m agent.mcp_server``) must
#: import the same code, whatever the CLI's working directory.
_SOURCE_ROOT: Final = Path(__file__).resolve().parent.parent

#: coreutils' env(1), to start the MCP server with a clean environment.
_ENV: Final = shutil.which("env") or "/usr/bin/env"

#: Our tools, as the MCP server names them (``mcp__wabridge__<name>`` for the CLI).
NAMES: Final = ("schedule_message", "list_scheduled", "cancel_scheduled", "react", "send_file",
                "send_image", "remember", "forget", "recall")

#: What ``send_file`` sends, by file name extension.
DOCUMENT_TYPES: Final = {
    ".pdf": "application/pdf", ".txt": "text/plain", ".md": "text/markdown",
    ".csv": "text/csv", ".json": "application/json", ".ics": "text/calendar",
    ".vcf": "text/vcard", ".html": "text/html", ".xml": "application/xml",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text", ".zip": "application/zip",
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
}
#: What ``send_image`` sends, by the file's first bytes (never by its name).
_IMAGE_MAGIC: Final = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


class ToolRefused(Exception):
    """A tool call that is not carried out; the text tells the model why."""


def workspace_file(workspace: Path, path: str) -> Path:
    """The regular file ``path`` names inside ``workspace``, or :class:`ToolRefused`.

    Refused: empty or absolute paths, any ``..`` part, and paths that resolve (through
    symlinks) outside the workspace."""
    if not path.strip() or "\0" in path:
        raise ToolRefused("give the path of a file in your working directory")
    rel = Path(path)
    if rel.is_absolute():
        raise ToolRefused(f"{path!r} is absolute: only files in your working directory "
                          "can be sent; give a path relative to it")
    if ".." in rel.parts:
        raise ToolRefused(f"{path!r} contains '..': only files in your working directory "
                          "can be sent")
    root = workspace.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise ToolRefused(f"{path!r} leads outside your working directory (a symlink): "
                          "refused")
    if not target.is_file():
        raise ToolRefused(f"{path!r}: no such file in your working directory")
    return target


Handler = Callable[[str, Path, dict[str, Any]], Awaitable[str]]


def _clear_socket(path: Path) -> None:
    """The private directory of the sockets, without a stale socket of a previous run."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.unlink(missing_ok=True)


def _private(path: Path) -> None:
    path.chmod(0o600)  # the directory is 0700 already; belt and braces


def socket_path(root: Path, chat_id: str) -> Path:
    """Short (a unix socket path has at most 107 bytes) and one per chat."""
    return root / "tools" / (hashlib.sha256(chat_id.encode()).hexdigest()[:16] + ".sock")


class Toolbox:
    """The tools of one worker's chats. Loop thread only."""

    def __init__(self, store: Store, backend: WhatsAppBackend, root: Path, cfg: ToolsConfig,
                 max_tool_calls: int, *,
                 restart_idle: Callable[[], Coroutine[Any, Any, None]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._backend = backend
        #: fleet mode: raises LeaseLost unless the lease is surely still ours (agent.lease)
        self.lease_check: Callable[[], None] = lambda: None
        self._root = root
        self._cfg = cfg
        self._max_calls = max_tool_calls
        self._clock = clock
        self.enabled = False  # the user's ``tools`` setting is ``wabridge``
        self.timezone = "UTC"  # the user's ``timezone`` setting
        # closes the idle Claude processes when the tools are switched (a process keeps the
        # tools it was started with; its chat's next turn starts one with the new ones)
        self._restart = restart_idle
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: dict[str, asyncio.Server] = {}
        self._answering: dict[str, IncomingMessage] = {}
        self._calls: dict[str, int] = {}

    # --- the user's settings ---------------------------------------------------------------
    def configure(self, *, enabled: bool, timezone: str) -> None:
        """The user's ``tools`` and ``timezone`` settings (loop thread)."""
        self.timezone = timezone
        if enabled == self.enabled:
            return
        self.enabled = enabled
        log.info("tools.switched", enabled=enabled)
        if self._restart is not None:
            task = asyncio.create_task(self._restart())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # --- the CLI's side ------------------------------------------------------------------
    def allowed(self) -> list[str]:
        """The tool names a chat's CLI may use (``--allowedTools``); empty: no tools."""
        if not self.enabled:
            return []
        return [f"mcp__wabridge__{n}" for n in NAMES]

    async def launch(self, chat_id: str, workdir: Path) -> ToolFlags | None:
        """The CLI flags that give ``chat_id``'s process its tools (None: no tools at all);
        the chat's socket is listening when this returns."""
        if not self.enabled:
            return None
        path = socket_path(self._root, chat_id)
        if chat_id not in self._servers:
            _clear_socket(path)

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await self._serve(chat_id, workdir, reader, writer)

            self._servers[chat_id] = await asyncio.start_unix_server(serve, path=str(path))
            _private(path)
        config = {"mcpServers": {"wabridge": {
            # The CLI hands a server its own whole environment (the API key included):
            # ``env -i`` starts ours with only what it needs.
            "type": "stdio", "command": _ENV,
            "args": ["-i", f"PYTHONPATH={_SOURCE_ROOT}", "PYTHONDONTWRITEBYTECODE=1",
                     "LANG=C.UTF-8", sys.executable, "-m", "agent.mcp_server", str(path)],
        }}}
        return ToolFlags(mcp_config=json.dumps(config), allowed=tuple(self.allowed()),
                         max_turns=self._max_calls + 1)

    async def close(self) -> None:
        for server in self._servers.values():
            server.close()
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()

    # --- turns ---------------------------------------------------------------------------
    def begin_turn(self, chat_id: str, message: IncomingMessage) -> None:
        self._answering[chat_id] = message
        self._calls[chat_id] = 0

    def end_turn(self, chat_id: str) -> None:
        self._answering.pop(chat_id, None)

    async def _serve(self, chat_id: str, workdir: Path, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                tool, args = str(request["tool"]), dict(request.get("args") or {})
            except (ValueError, KeyError, TypeError):
                answer: dict[str, Any] = {"ok": False, "error": "malformed tool request"}
            else:
                answer = await self.call(chat_id, workdir, tool, args)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def call(self, chat_id: str, workdir: Path, tool: str, args: dict[str, Any]
                   ) -> dict[str, Any]:
        """Run one tool call for ``chat_id``; the answer the MCP server passes on."""
        self._store.bump("tool_calls")
        count = self._calls.get(chat_id, 0) + 1
        self._calls[chat_id] = count
        try:
            text = await self._handler(tool, count)(chat_id, workdir, args)
        except ToolRefused as exc:
            log.warning("tool.call", chat_id=chat_id, tool=tool, ok=False, error=str(exc))
            return {"ok": False, "error": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("tool.call", chat_id=chat_id, tool=tool, ok=False, error=repr(exc))
            return {"ok": False, "error": f"bad arguments for {tool}: {exc}"}
        log.info("tool.call", chat_id=chat_id, tool=tool, ok=True)
        return {"ok": True, "text": text}

    def _handler(self, tool: str, count: int) -> Handler:
        """The handler of ``tool``, unless the call is refused."""
        if not self.enabled:
            raise ToolRefused("tools are off for this account")
        if count > self._max_calls:
            raise ToolRefused(f"at most {self._max_calls} tool calls per message; answer "
                              "with what you have")
        handler = self._handlers().get(tool)
        if handler is None:
            raise ToolRefused(f"unknown tool {tool!r}")
        return handler

    def _handlers(self) -> dict[str, Handler]:
        return {
            "schedule_message": self._schedule, "list_scheduled": self._list_scheduled,
            "cancel_scheduled": self._cancel, "react": self._react,
            "send_file": self._send_file, "send_image": self._send_image,
            "remember": self._remember, "forget": self._forget, "recall": self._recall,
        }

    # --- scheduled messages --------------------------------------------------------------
    async def _schedule(self, chat_id: str, _: Path, args: dict[str, Any]) -> str:
        text = str(args["text"]).strip()
        if not text:
            raise ToolRefused("text is empty")
        if len(text) > self._cfg.scheduled_chars:
            raise ToolRefused(f"text is longer than {self._cfg.scheduled_chars} characters")
        now = self._clock()
        try:
            at = scheduling.due_at(str(args["when"]), now, self.timezone)
        except scheduling.BadWhen as exc:
            raise ToolRefused(str(exc)) from None
        day = scheduling.utc_day_of(now)
        why = scheduling.refusal(len(self._store.scheduled(chat_id)),
                                 self._store.scheduled_on(day),
                                 per_chat=self._cfg.scheduled_per_chat,
                                 per_day=self._cfg.scheduled_per_day)
        if why:
            raise ToolRefused(why)
        number = self._store.schedule(chat_id, at, text, day)
        log.info("scheduled.added", chat_id=chat_id, id=number, due_in=round(at - now, 1))
        return f"scheduled #{number} for {scheduling.local_time(at, self.timezone)}"

    async def _list_scheduled(self, chat_id: str, _: Path, args: dict[str, Any]) -> str:
        del args
        items = self._store.scheduled(chat_id)
        if not items:
            return "nothing scheduled"
        return "\n".join(f"#{s.id} {scheduling.local_time(s.due_at, self.timezone)}: {s.text}"
                         for s in items)

    async def _cancel(self, chat_id: str, _: Path, args: dict[str, Any]) -> str:
        number = int(args["id"])
        if not self._store.cancel_scheduled(number, chat_id):
            raise ToolRefused(f"no scheduled message #{number} pending in this chat")
        return f"cancelled #{number}"

    # --- WhatsApp actions ----------------------------------------------------------------
    async def _react(self, chat_id: str, _: Path, args: dict[str, Any]) -> str:
        emoji = str(args["emoji"]).strip()
        if not emoji or len(emoji) > 8 or any(c.isalnum() for c in emoji):
            raise ToolRefused(f"{emoji!r} is not one emoji")
        message = self._answering.get(chat_id)
        if message is None:
            raise ToolRefused("there is no message to react to")
        self.lease_check()
        try:
            await self._backend.send_reaction(chat_id, message, emoji)
        except SendError as exc:
            raise ToolRefused(f"the reaction was not sent: {exc}") from None
        return f"reacted {emoji}"

    async def _send_file(self, chat_id: str, workdir: Path, args: dict[str, Any]) -> str:
        target = workspace_file(workdir, str(args["path"]))
        mime = DOCUMENT_TYPES.get(target.suffix.lower())
        if mime is None:
            raise ToolRefused(f"{target.suffix or 'files without an extension'}: not a type "
                              f"that can be sent ({', '.join(sorted(DOCUMENT_TYPES))})")
        return await self._send_media(chat_id, target, mime, "document", str(args.get("caption")
                                                                              or ""))

    async def _send_image(self, chat_id: str, workdir: Path, args: dict[str, Any]) -> str:
        target = workspace_file(workdir, str(args["path"]))
        with target.open("rb") as fh:
            head = fh.read(16)
        mime = next((m for magic, m in _IMAGE_MAGIC if head.startswith(magic)), None)
        if mime is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            mime = "image/webp"
        if mime is None:
            raise ToolRefused(f"{args['path']!r} is not a PNG, JPEG or WebP image")
        return await self._send_media(chat_id, target, mime, "image",
                                      str(args.get("caption") or ""))

    async def _send_media(self, chat_id: str, target: Path, mime: str, kind: str,
                          caption: str) -> str:
        size = (await asyncio.to_thread(target.stat)).st_size
        if size > self._cfg.file_max_bytes:
            raise ToolRefused(f"{target.name} has {size} bytes (at most "
                              f"{self._cfg.file_max_bytes})")
        if size == 0:
            raise ToolRefused(f"{target.name} is empty")
        data = await asyncio.to_thread(target.read_bytes)
        self.lease_check()
        try:
            wa_id = await self._backend.send_media(chat_id, kind, data, target.name, mime,
                                                   caption[:1024])
        except SendError as exc:
            raise ToolRefused(f"{target.name} was not sent: {exc}") from None
        log.info("tool.media_sent", chat_id=chat_id, kind=kind, bytes=size, mime=mime,
                 wa_id=wa_id)
        return f"sent {target.name}"

    # --- notes -----------------------------------------------------------------------------
    async def _remember(self, chat_id: str, _: Path, args: dict[str, Any]) -> str:
        note = " ".join(str(args["note"]).split())
        if not note:
            raise ToolRefused("the note is empty")
        if len(note) > self._cfg.note_chars:
            raise ToolRefused(f"a note has at most {self._cfg.note_chars} characters")
        if len(self._store.notes(chat_id)) >= self._cfg.notes_per_chat:
            raise ToolRefused(f"this contact already has {self._cfg.notes_per_chat} notes; "
                              "forget one first")
        return f"remembered as note #{self._store.add_note(chat_id, note)}"

    async def _forget(self, chat_id: str, _: Path, args: dict[str, Any]) -> str:
        number = int(args["id"])
        if not self._store.forget_note(number, chat_id):
            raise ToolRefused(f"no note #{number} for this contact")
        return f"forgot note #{number}"

    async def _recall(self, chat_id: str, _: Path, args: dict[str, Any]) -> str:
        del args
        notes = self._store.notes(chat_id)
        return "\n".join(f"#{n.id}: {n.text}" for n in notes) if notes else "no notes"


def notes_seed(notes: list[str]) -> str:
    """What a fresh session is told first about its contact (empty without notes)."""
    if not notes:
        return ""
    lines = "\n".join(f"- {n}" for n in notes)
    return f"Your notes about this contact (from the remember tool):\n{lines}"
