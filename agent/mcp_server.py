"""The wabridge MCP server: Claude's tools for one chat, run by the Claude Code CLI.

The worker gives each chat's CLI process ``--mcp-config`` naming this module (same venv, same
hardened unit, same UID): ``python -m agent.mcp_server <socket>``. It speaks MCP over stdio to
the CLI and forwards every call, as one JSON line, to the worker over ``<socket>``, a unix
socket the worker opened for that one chat (:mod:`agent.tools`). The socket *is* the chat:
nothing a tool call carries can name another one, and the worker does the work (its store,
its WhatsApp link, its workspace checks). This process holds no state and no secrets.

Wire: request ``{"tool": name, "args": {...}}``; answer ``{"ok": true, "text": ...}`` or
``{"ok": false, "error": ...}`` (a refusal the model reads as a tool error).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

_MAX_ANSWER = 1 << 20


async def _call(socket_path: str, tool: str, args: dict[str, Any]) -> str:
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=_MAX_ANSWER)
    except OSError as exc:
        raise ToolError(f"the wabridge worker cannot be reached ({exc.strerror})") from exc
    try:
        writer.write(json.dumps({"tool": tool, "args": args}).encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    try:
        answer = json.loads(line)
    except ValueError as exc:
        raise ToolError("the wabridge worker gave no answer") from exc
    if not answer.get("ok"):
        raise ToolError(str(answer.get("error") or "refused"))
    return str(answer.get("text", ""))


def build(socket_path: str) -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer("wabridge", instructions=(
        "Tools that act in the WhatsApp chat you are answering, and only in it."))

    _Fn = Callable[..., Awaitable[str]]

    def tool(description: str) -> Callable[[_Fn], _Fn]:
        # plain text results: the model reads the sentence, not {"result": ...}
        return server.tool(description=description, structured_output=False)

    @tool(description=(
        "Send `text` to this chat later. `when`: an ISO 8601 time (without an offset it is "
        "the user's local time), or a delay such as 'in 10 minutes', 'in 2 hours', "
        "'in 30 seconds'. Returns the scheduled message's id."))
    async def schedule_message(when: str, text: str) -> str:
        return await _call(socket_path, "schedule_message", {"when": when, "text": text})

    @tool(description="The messages scheduled for this chat that are not sent yet.")
    async def list_scheduled() -> str:
        return await _call(socket_path, "list_scheduled", {})

    @tool(description="Cancel a scheduled message of this chat by its id.")
    async def cancel_scheduled(id: int) -> str:
        return await _call(socket_path, "cancel_scheduled", {"id": id})

    @tool(description="React with one emoji to the message you are answering.")
    async def react(emoji: str) -> str:
        return await _call(socket_path, "react", {"emoji": emoji})

    @tool(description=(
        "Send a file from your working directory to this chat as a document. `path` is "
        "relative to the working directory."))
    async def send_file(path: str, caption: str = "") -> str:
        return await _call(socket_path, "send_file", {"path": path, "caption": caption})

    @tool(description=(
        "Send an image (PNG, JPEG, WebP) from your working directory to this chat."))
    async def send_image(path: str, caption: str = "") -> str:
        return await _call(socket_path, "send_image", {"path": path, "caption": caption})

    @tool(description=(
        "Remember a short note about this contact; notes are shown to you at the start of "
        "every new conversation with them. Returns the note's id."))
    async def remember(note: str) -> str:
        return await _call(socket_path, "remember", {"note": note})

    @tool(description="Forget one of this contact's notes by its id.")
    async def forget(id: int) -> str:
        return await _call(socket_path, "forget", {"id": id})

    @tool(description="This contact's notes, with their ids.")
    async def recall() -> str:
        return await _call(socket_path, "recall", {})

    return server


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m agent.mcp_server <socket>", file=sys.stderr)
        return 2
    asyncio.run(build(argv[0]).run_stdio_async())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
