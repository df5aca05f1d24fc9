"""One persistent Claude Code process per WhatsApp chat.

Over 600 lines because it is one adapter around one child process and its stream-JSON
protocol: start-up, turns, timeouts and exit all read the same stdout state.

Driver
======
The bundled Claude Code CLI (``claude_agent_sdk/_bundled/claude``, 2.1.331) is driven
directly, no SDK in between::

    claude -p --input-format stream-json --output-format stream-json --verbose --bare
           --setting-sources "" --strict-mcp-config --disable-slash-commands
           --system-prompt-snapshot off --permission-prompts none --tools ""
           [--model M] [--system-prompt P] (--session-id <new uuid4> | --resume=<uuid>)
           [--mcp-config <json> --allowedTools mcp__wabridge__...]   (the user's tools)

``open`` spawns it (own process group, clean env, ``cwd=workdir``,
``CLAUDE_CONFIG_DIR=config_dir``, ``TMPDIR=config_dir/tmp``, ``HOME=config_dir.parent``) and
does the stream-json control handshake (``control_request``/``initialize`` ->
``control_response``), so a dead binary or a failed ``--resume`` surfaces in ``open``. Each
``turn`` writes one ``{"type":"user","message":{"role":"user","content":[...]}}`` line and
reads JSON lines until ``{"type":"result"}``.

Measurements (2 vCPU VM, Debian python3.11, CLI 2.1.331, fake API on 127.0.0.1; 4 chats open
at once in one Python process, each after 6 turns; 3 runs; PSS = Pss of
``/proc/PID/smaps_rollup`` summed over the CLI's process tree, which is a single process):

====================================  ===========================  ===========================
                                      (b) direct CLI (this file)   (a) ``ClaudeSDKClient``
====================================  ===========================  ===========================
PSS per chat, CLI tree (4 open)       132-147 MB, mean 140 MB      132-147 MB, mean 143 MB
  same, 1 chat alone / 8 open         214 MB / mean 128 MB         213 MB / mean 123 MB
  of which private (USS, marginal)    ~106 MB per extra chat       same CLI, same
Python side                           ~0.1 MB per chat             +36 MB once (SDK import)
                                                                   + ~0.3 MB per client
open -> ready (handshake done)        0.25-0.29 s                  0.25-0.26 s (connect)
open -> first result (cold start)     0.32-0.38 s                  0.31-0.33 s
warm turn latency (fake API)          18-21 ms                     16-19 ms
resume: open(--resume) -> 1st result  0.30-0.35 s                  (not measured)
====================================  ===========================  ===========================

The CLI dominates: ~84 MB of shared, clean binary text once per machine plus ~106 MB of
private heap per chat; start-up is the CLI's own ~0.25 s. (b) is implemented: same CLI cost
and latency within noise, but no 36 MB SDK/anyio import in every worker, no per-client task
group, one less layer between us and the stream (we need ``is_error`` vs ``subtype``,
``--resume`` failures and timeouts precisely), and no SDK defaults to undo (the SDK passes
``--setting-sources user,project`` and ``--system-prompt ""`` unless told otherwise; with those
defaults and without ``--bare`` a chat costs ~5 MB more and starts ~0.05 s slower).

CLI 2.1.331 facts this module relies on (verified against tests/fakes/anthropic_api.py)
======================================================================================
* Tools: ``--tools ""`` disables every built-in tool: the request carries ``"tools": []``
  and the ``system/init`` line says ``"tools": []``. Default set otherwise (Agent, Bash,
  Edit, Read, Write, Skill, ToolSearch, Workflow, ...). ``tools_enabled=True`` gives
  ``--tools default``; with ``--permission-prompts none`` anything that would ask for
  permission is denied automatically (nothing ever waits for a human; ``--permission-mode``
  is left at its default). ``--setting-sources ""`` + ``--strict-mcp-config``: no user,
  project or local settings and no MCP servers from the chat's directory. With
  ``--mcp-config`` (:class:`ToolFlags`) the request lists every tool of that server as
  ``mcp__<server>__<tool>`` even under ``--tools ""``; ``--allowedTools`` lets them run without
  a permission prompt; the CLI starts the server before the first request.
* ``--system-prompt`` REPLACES Claude Code's ~7 kB coding-agent prompt (chosen: a WhatsApp
  bot needs none of it). ``system`` then is ``[billing header, "You are a Claude agent, built
  on Anthropic's Claude Agent SDK.", <our prompt>]``. ``None`` = the CLI's default prompt.
  ``--system-prompt-snapshot off`` (default under ``--bare`` anyway, passed explicitly): a
  resumed chat gets the *current* prompt, not the one recorded at its first turn.
* ``--bare``: no hooks, LSP, plugin sync, auto-memory, CLAUDE.md discovery, keychain/OAuth
  (``--help``: auth "strictly ANTHROPIC_API_KEY"; observed: an ``ANTHROPIC_AUTH_TOKEN`` is
  still sent as ``Authorization: Bearer`` -- we never inherit it, only extra_env can set
  it, and ``open`` demands ``ANTHROPIC_API_KEY`` regardless). Without ``--bare`` the CLI
  adds a ``role: "system"`` environment message (cwd, OS, date) inside ``messages``; with it
  that entry is empty.
* Slash commands: user text whose LAST text block starts with ``/`` is run as a CLI command
  (``/clear`` even starts a new session id, ``/cost`` answers locally, skills expand).
  ``--disable-slash-commands`` turns them into "isn't available in this environment" replies
  that never reach the model, so ``turn`` also prefixes such blocks with one space, which
  the CLI does not treat as a command: the model sees `` /clear``.
* API errors (401/429/500/529...) come back as ``result`` with ``subtype: "success"``,
  ``is_error: true``, ``api_error_status`` and ``result: "API Error: 529 ..."``; the process
  stays usable. Retries: ``CLAUDE_CODE_MAX_RETRIES`` (we default it to 0, extra_env can
  override); a 400 is retried 3 times regardless. The failed user text is kept and merged
  into the next user message.
* ``--resume <unknown uuid>``: at start-up, before reading stdin, the CLI prints a
  ``result`` line ``subtype: "error_during_execution"``, ``errors: ["No conversation found
  with session ID: ..."]`` and exits 1 -> ``ClaudeError("resume_failed")``. A non-UUID value
  would be looked up as a session *title*; ``open`` refuses it before spawning.
* Images: base64 image blocks reach the API as image blocks. The CLI would store a copy at
  ``realpath($TMPDIR)/claude-<uid>/<cwd with every non-alphanumeric character as "->/
  <session id>/images/<n>.png`` and append a text block ``[Image: source: <that path>]``: a
  path of the worker's host the model could repeat to a contact. When it cannot store the
  copy it adds nothing, so ``open`` puts a regular file where that ``images`` directory would
  go (:func:`seal_image_store`; tests/test_claude_session.py checks the API never gets a
  worker path). Undecodable images are replaced by a text block ``[Image could not be
  processed: ...]``.
* ``total_cost_usd`` (and ``modelUsage``) in ``result`` are cumulative for the conversation:
  a process started with ``--resume`` continues from the total recorded in the transcript,
  it does NOT restart at 0. ``usage`` is per turn; the per-turn cost is
  ``model_usage_since_last_result[*].costUSD`` -> ``TurnResult.turn_cost_usd``.
* ``--session-id <uuid4>`` is passed on a fresh open, so ``session_id`` is known at once;
  the transcript only exists after the first turn, so resuming an id that never had a turn
  gives ``resume_failed`` (start a fresh session then).
* Auto-compaction: when usage nears the context window the CLI sends a summarisation request
  before the turn (``system/compact_boundary`` and a replayed ``user`` line on stdout); the
  turn still ends in one ``result``, whose cost includes the summary.
* Without a key the CLI answers every turn with ``is_error`` "Not logged in · Please run
  /login"; ``open`` refuses earlier with ``not_configured``.
* Extra HTTP: with ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` only ``POST
  /v1/messages?beta=true`` (one per turn); without it also ``HEAD /api/hello`` at start.
* Stdout: ``system/ui_invalidate`` at start, ``system/init`` before every turn (with
  ``session_id``), ``assistant`` messages, sometimes ``system/status``, then ``result``;
  unknown lines are logged at debug. A ``control_request`` from the CLI (none expected) is
  answered with an error so it never blocks. Closing stdin makes the CLI exit 0 within ~30 ms.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from wabridge import claude_cli, logs
from wabridge.errors import WabridgeError

log = logs.get("agent.claude")

ErrorCode = Literal["timeout", "process_exited", "protocol", "not_configured", "resume_failed",
                    "no_slot"]

#: The CLI's longest cwd part of a temp path before it appends a hash (CLI 2.1.331).
_MAX_SLUG: Final = 200

#: stdout line limit for the asyncio reader (init/control lines are a few kB, but assistant
#: messages can be large).
STREAM_LIMIT: Final = 64 * 1024 * 1024

#: Always set in the child's env (``wabridge.claude_cli``); ``settings.extra_env`` may
#: override any of them.
OFFLINE_ENV: Final[Mapping[str, str]] = claude_cli.OFFLINE_ENV

#: Inherited from our own environment when set (and not given in extra_env). Nothing else is:
#: in particular no other auth variable (OAuth tokens, Bedrock/Vertex switches).
PASSTHROUGH_ENV: Final = (
    "ANTHROPIC_API_KEY",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "TZ",
)

_STDERR_TAIL = 40


@dataclass(frozen=True)
class ToolFlags:
    """A chat's own tools (:mod:`agent.tools`): ``--mcp-config`` and ``--allowedTools``.
    ``--tools`` stays ``""``: no built-in tool comes with them (under ``--bare`` CLI 2.1.331
    offers only Bash, Edit and Read anyway; ``WebSearch``/``WebFetch`` are not offered)."""

    mcp_config: str  # JSON
    allowed: tuple[str, ...]
    #: ``--max-turns``: model requests per turn (tool rounds + the answer). At the limit the
    #: CLI ends the turn with ``is_error`` "Reached maximum number of turns (N)" and stays
    #: usable; without it a model that keeps calling tools runs until ``turn_timeout``.
    max_turns: int = 11


@dataclass(frozen=True)
class ClaudeSettings:
    cli_path: Path  # the claude binary
    model: str | None  # --model
    system_prompt: str | None  # --system-prompt (replaces the CLI prompt); None: CLI default
    tools_enabled: bool = False  # False: --tools "" (request carries "tools": [])
    turn_timeout: float = 120.0  # seconds; also bounds the start-up handshake in open()
    extra_env: Mapping[str, str] = field(default_factory=dict)  # ANTHROPIC_BASE_URL, ..._KEY
    tool_flags: ToolFlags | None = None  # the chat's own tools (set per chat by the pool)


@dataclass(frozen=True)
class TurnResult:
    text: str
    is_error: bool  # result.is_error (API errors arrive with subtype "success")
    error: str | None  # human text when is_error
    session_id: str
    total_cost_usd: float  # as reported: cumulative for the CONVERSATION, restored on --resume
    usage: Mapping[str, int]  # this turn: input_tokens, output_tokens, cache_*
    duration_ms: int
    turn_cost_usd: float = 0.0  # this turn only (compaction included); use this for accounting


#: What an operator does about each :class:`ClaudeError` code.
EXPLANATIONS: Final[Mapping[ErrorCode, str]] = {
    "timeout": "the turn took longer than claude.turn_timeout; the process was stopped and "
    "the sender got conversation.apology",
    "process_exited": "the Claude Code CLI ended; its last stderr lines are in the worker's "
    "journal (an API key or network problem shows there)",
    "protocol": "the CLI wrote output this wabridge cannot read; use the Claude Code version "
    "wabridge was released with (claude.cli_path)",
    "not_configured": "set claude.cli_path to an executable Claude Code CLI, and "
    "ANTHROPIC_API_KEY in /etc/wabridge/worker.env",
    "resume_failed": "the chat's stored conversation could not be resumed; a fresh one is "
    "started, seeded with the chat's recent messages",
    "no_slot": "every Claude process the host allows (claude.host_max_processes) stayed busy "
    "for claude.slot_wait seconds; the sender got conversation.apology",
}


class ClaudeError(WabridgeError):
    """A turn or a session could not be run. ``code`` (one of :data:`ErrorCode`, stable)
    says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.explanation = EXPLANATIONS[code]

    def __str__(self) -> str:
        return f"[{self.code}] {self.args[0]}"


@dataclass(frozen=True)
class _ProtocolIssue:
    detail: str


@dataclass(frozen=True)
class _Eof:
    pass


_Item = dict[str, Any] | _ProtocolIssue | _Eof


def build_command(
    settings: ClaudeSettings, resume_session_id: str | None, new_session_id: str | None = None
) -> list[str]:
    """The argv ``open`` runs (exposed for tests and diagnostics).

    ``new_session_id`` (a UUID, only without ``resume_session_id``) becomes ``--session-id``.
    """
    cmd = [
        str(settings.cli_path),
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--bare",
        "--setting-sources",
        "",
        "--strict-mcp-config",
        "--disable-slash-commands",
        "--system-prompt-snapshot",
        "off",
        "--permission-prompts",
        "none",
        "--tools",
        "default" if settings.tools_enabled else "",
    ]
    if settings.tool_flags is not None:
        cmd += ["--mcp-config", settings.tool_flags.mcp_config,
                "--allowedTools", ",".join(settings.tool_flags.allowed),
                "--max-turns", str(settings.tool_flags.max_turns)]
    if settings.model:
        cmd += ["--model", settings.model]
    if settings.system_prompt is not None:
        cmd += ["--system-prompt", settings.system_prompt]
    if resume_session_id is not None:
        cmd.append(f"--resume={resume_session_id}")
    elif new_session_id is not None:
        cmd.append(f"--session-id={new_session_id}")
    return cmd


def build_env(settings: ClaudeSettings, workdir: Path, config_dir: Path) -> dict[str, str]:
    """The child's whole environment: clean, never our own beyond ``PASSTHROUGH_ENV``."""
    env: dict[str, str] = {
        "PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(config_dir.parent if config_dir.parent != config_dir else workdir),
        "LANG": os.environ.get("LANG") or "C.UTF-8",
    }
    for name in PASSTHROUGH_ENV:
        value = os.environ.get(name)
        if value:
            env[name] = value
    env.update(OFFLINE_ENV)
    env.update(settings.extra_env)
    env["CLAUDE_CONFIG_DIR"] = str(config_dir)
    env["TMPDIR"] = str(config_dir / "tmp")
    return env


def image_store(tmp_dir: Path, workdir: Path, session_id: str) -> Path | None:
    """Where the CLI would keep copies of the session's input images (see the module
    docstring), or None when the CLI would shorten the cwd part with a hash we cannot
    reproduce (a cwd of more than 200 characters)."""
    slug = re.sub(r"[^a-zA-Z0-9]", "-", os.path.realpath(workdir))
    if len(slug) > _MAX_SLUG:
        return None
    return (Path(os.path.realpath(tmp_dir)) / f"claude-{os.getuid()}" / slug / session_id
            / "images")


def seal_image_store(tmp_dir: Path, workdir: Path, session_id: str) -> None:
    """Keep the CLI from storing image copies for this session, so it never tells the model
    their path: a regular file stands where its ``images`` directory would be. Copies stored
    before (by an older wabridge) are removed; the transcript holds the images themselves."""
    path = image_store(tmp_dir, workdir, session_id)
    if path is None:
        log.warning("claude.image_store_not_sealed", workdir=str(workdir),
                    why="working directory path too long")
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600, exist_ok=True)


def _neutralize_slash(block: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(block)
    text = out.get("text")
    if out.get("type") == "text" and isinstance(text, str) and text.startswith("/"):
        out["text"] = " " + text
    return out


def normalize_content(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        blocks: list[dict[str, Any]] = [{"type": "text", "text": content}]
    else:
        blocks = [dict(b) for b in content]
    if not blocks or all(
        b.get("type") == "text" and not str(b.get("text", "")).strip() for b in blocks
    ):
        raise ValueError("a turn needs non-empty content")
    return [_neutralize_slash(b) for b in blocks]


def _int_usage(raw: Any) -> dict[str, int]:
    if not isinstance(raw, Mapping):
        return {}
    return {k: int(v) for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float, else None (NaN, infinities, ints beyond float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _turn_cost(raw: Any) -> float | None:
    """Sum of ``costUSD`` in the result's ``model_usage_since_last_result``."""
    if not isinstance(raw, Mapping):
        return None
    total = 0.0
    for usage in raw.values():
        cost = _finite(usage.get("costUSD")) if isinstance(usage, Mapping) else None
        if cost is not None:
            total += cost
    return total


def _check_and_prepare(
    settings: ClaudeSettings, workdir: Path, config_dir: Path, resume_session_id: str | None
) -> None:
    cli = Path(settings.cli_path)
    if not cli.is_file() or not os.access(cli, os.X_OK):
        raise ClaudeError("not_configured", f"Claude Code CLI not found or not executable: {cli}")
    if resume_session_id is not None:
        try:
            uuid.UUID(resume_session_id)
        except ValueError:
            raise ClaudeError(
                "resume_failed", f"not a session id (UUID): {resume_session_id!r}"
            ) from None
    workdir.mkdir(parents=True, exist_ok=True)
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (config_dir / "tmp").mkdir(exist_ok=True, mode=0o700)


class ClaudeSession:
    """A running ``claude -p`` process for one chat. Create with :meth:`open`."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        settings: ClaudeSettings,
        session_id: str | None,
    ) -> None:
        self._proc = proc
        self._settings = settings
        self._session_id: str | None = session_id
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        self._lock = asyncio.Lock()
        self._last_total_cost = 0.0
        self._group_gone = False
        self._dead = False  # killed by us or seen exiting
        self._closing = False
        self._sealed: tuple[Path, Path, str] | None = None  # see seal_image_store
        self._reader = asyncio.create_task(self._read_stdout(), name=f"claude-out-{proc.pid}")
        self._err_reader = asyncio.create_task(self._read_stderr(), name=f"claude-err-{proc.pid}")

    # ---- public -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def alive(self) -> bool:
        return not self._dead and not self._closing and self._proc.returncode is None

    @classmethod
    async def open(
        cls,
        *,
        settings: ClaudeSettings,
        workdir: Path,
        config_dir: Path,
        resume_session_id: str | None,
    ) -> ClaudeSession:
        key = settings.extra_env.get("ANTHROPIC_API_KEY")
        if key is None:
            key = os.environ.get("ANTHROPIC_API_KEY")
        if not key or not key.strip():
            raise ClaudeError(
                "not_configured",
                "no Anthropic API key configured: put ANTHROPIC_API_KEY=sk-ant-... in "
                "/etc/wabridge/worker.env (mode 0600) and restart the account",
            )
        _check_and_prepare(settings, workdir, config_dir, resume_session_id)
        new_session_id = None if resume_session_id is not None else str(uuid.uuid4())
        tmp_dir = config_dir / "tmp"
        seal_image_store(tmp_dir, workdir, resume_session_id or str(new_session_id))
        cmd = build_command(settings, resume_session_id, new_session_id)
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workdir,
                env=build_env(settings, workdir, config_dir),
                limit=STREAM_LIMIT,
                start_new_session=True,  # own process group: close() kills the whole tree
            )
        except OSError as e:
            raise ClaudeError("not_configured", f"cannot start {settings.cli_path}: {e}") from e
        session = cls(proc, settings, resume_session_id or new_session_id)
        session._sealed = (tmp_dir, workdir, resume_session_id or str(new_session_id))
        try:
            await session._handshake(resume_session_id)
        except BaseException:
            await session.close(timeout=1.0)  # a failed --resume exits by itself at once
            raise
        log.debug(
            "claude.opened",
            pid=proc.pid,
            resume=resume_session_id,
            ms=round((time.monotonic() - started) * 1000),
        )
        return session

    async def turn(self, content: str | list[dict[str, Any]]) -> TurnResult:
        """Send one user message; return the CLI's ``result`` for it.

        Raises ``ClaudeError``: ``timeout`` (process killed), ``process_exited``,
        ``protocol`` (unparseable output during the turn; the process stays usable).
        """
        blocks = normalize_content(content)
        sealed = self._sealed
        if sealed is not None and self._session_id and self._session_id != sealed[2]:
            # the CLI moved to another session id: its image copies would go elsewhere
            self._sealed = (sealed[0], sealed[1], self._session_id)
            seal_image_store(*self._sealed)
        async with self._lock:
            if not self.alive:
                raise ClaudeError(
                    "process_exited", self._exit_text("Claude process is not running")
                )
            self._drain_stale()
            line = {
                "type": "user",
                "message": {"role": "user", "content": blocks},
                "parent_tool_use_id": None,
            }
            try:
                return await asyncio.wait_for(
                    self._run_turn(json.dumps(line) + "\n"),
                    timeout=self._settings.turn_timeout,
                )
            except TimeoutError:
                await self._terminate(grace=0.5)
                raise ClaudeError(
                    "timeout", f"no result within {self._settings.turn_timeout:g}s; process killed"
                ) from None
            except asyncio.CancelledError:
                # the stream would be out of step with the next turn: never reuse it
                self._kill_nowait()
                raise

    async def close(self, timeout: float = 3.0) -> None:
        """Close stdin, wait up to ``timeout``, then SIGTERM/SIGKILL the process group."""
        self._closing = True
        proc = self._proc
        if proc.returncode is None and proc.stdin is not None and not self._dead:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout=timeout)
            except TimeoutError:
                await self._terminate(grace=1.0)
        await self._kill()
        for task in (self._reader, self._err_reader):
            if not task.done():
                try:
                    await asyncio.wait_for(task, timeout=1.0)
                except (TimeoutError, asyncio.CancelledError):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.close()
            with contextlib.suppress(OSError, RuntimeError, ConnectionError):
                await proc.stdin.wait_closed()
        if proc.returncode is not None:
            self._group_gone = True  # swept with SIGKILL above; never signal this number again
        log.debug("claude.closed", pid=proc.pid, returncode=proc.returncode)

    # ---- internals ----------------------------------------------------------------------

    async def _write(self, data: str) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing():
            raise ClaudeError(
                "process_exited", self._exit_text("stdin of Claude process is closed")
            )
        try:
            stdin.write(data.encode())
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            self._dead = True
            raise ClaudeError("process_exited", self._exit_text(f"write failed: {e}")) from e

    async def _handshake(self, resume_session_id: str | None) -> None:
        request_id = f"init_{uuid.uuid4().hex[:12]}"
        req = {
            "type": "control_request",
            "request_id": request_id,
            "request": {"subtype": "initialize", "hooks": None},
        }

        async def wait_ready() -> None:
            await self._write(json.dumps(req) + "\n")
            while True:
                item = await self._queue.get()
                if isinstance(item, _Eof):
                    await self._reap(1.0)
                    text = self._exit_text("Claude process exited during start-up")
                    if resume_session_id is not None and "No conversation found" in text:
                        raise ClaudeError("resume_failed", text)
                    raise ClaudeError("process_exited", text)
                if isinstance(item, _ProtocolIssue):
                    log.warning("claude.protocol_issue", phase="start", detail=item.detail)
                    continue
                kind = item.get("type")
                if kind == "control_response":
                    resp = item.get("response")
                    if not isinstance(resp, Mapping):
                        resp = {}
                    if resp.get("request_id") != request_id:
                        continue
                    if resp.get("subtype") != "success":
                        raise ClaudeError(
                            "protocol", f"initialize refused: {resp.get('error') or resp}"
                        )
                    return
                if kind == "result":
                    errors = item.get("errors")
                    errors = errors if isinstance(errors, list) else []
                    text = "; ".join(str(e) for e in errors) or str(item.get("result") or "")
                    if resume_session_id is not None:
                        raise ClaudeError(
                            "resume_failed", text or f"cannot resume {resume_session_id}"
                        )
                    raise ClaudeError("process_exited", text or "Claude ended during start-up")
                self._note(item)

        try:
            await asyncio.wait_for(wait_ready(), timeout=self._settings.turn_timeout)
        except TimeoutError:
            raise ClaudeError(
                "timeout", f"Claude CLI not ready within {self._settings.turn_timeout:g}s"
            ) from None

    async def _run_turn(self, line: str) -> TurnResult:
        started = time.monotonic()
        await self._write(line)
        texts: list[str] = []
        issues: list[str] = []
        while True:
            item = await self._queue.get()
            if isinstance(item, _Eof):
                await self._reap(1.0)
                self._dead = True
                raise ClaudeError(
                    "process_exited", self._exit_text("Claude process exited mid-turn")
                )
            if isinstance(item, _ProtocolIssue):
                log.warning("claude.protocol_issue", phase="turn", detail=item.detail)
                issues.append(item.detail)
                continue
            kind = item.get("type")
            if kind == "assistant":
                msg = item.get("message")
                content = msg.get("content") if isinstance(msg, Mapping) else None
                for block in content if isinstance(content, list) else []:
                    if isinstance(block, dict) and block.get("type") == "text":
                        texts.append(str(block.get("text") or ""))
                sid = item.get("session_id")
                if isinstance(sid, str):
                    self._session_id = sid
                continue
            if kind != "result":
                self._note(item)
                continue
            if issues:
                raise ClaudeError("protocol", f"unparseable output during the turn: {issues[0]}")
            return self._to_result(item, texts, started)

    def _to_result(self, item: Mapping[str, Any], texts: list[str], started: float) -> TurnResult:
        sid = item.get("session_id")
        if isinstance(sid, str) and sid:
            self._session_id = sid
        is_error = bool(item.get("is_error"))
        raw = item.get("result")
        text = raw if isinstance(raw, str) else "\n".join(t for t in texts if t)
        error: str | None = None
        if is_error:
            errors = item.get("errors")
            error = text or (
                "; ".join(str(e) for e in errors) if isinstance(errors, list) and errors else ""
            )
            error = error or f"Claude turn failed ({item.get('subtype')})"
        total = _finite(item.get("total_cost_usd")) or 0.0
        turn_cost = _turn_cost(item.get("model_usage_since_last_result"))
        if turn_cost is None:  # older CLI: difference to the last total this process reported
            turn_cost = max(0.0, total - self._last_total_cost)
        self._last_total_cost = total
        duration = _finite(item.get("duration_ms"))
        return TurnResult(
            text=text,
            is_error=is_error,
            error=error,
            session_id=self._session_id or "",
            total_cost_usd=total,
            usage=_int_usage(item.get("usage")),
            duration_ms=(
                int(duration)
                if duration is not None
                else round((time.monotonic() - started) * 1000)
            ),
            turn_cost_usd=turn_cost,
        )

    def _note(self, item: Mapping[str, Any]) -> None:
        """Lines that are not part of a turn's answer."""
        kind = item.get("type")
        if kind == "system" and item.get("subtype") == "init":
            sid = item.get("session_id")
            if isinstance(sid, str) and sid:
                self._session_id = sid
            return
        log.debug("claude.line_ignored", type=kind, subtype=item.get("subtype"))

    def _drain_stale(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if isinstance(item, _Eof):
                self._dead = True
                self._queue.put_nowait(item)  # _run_turn reports it
                return
            if isinstance(item, dict):
                if item.get("type") == "result":
                    log.warning("claude.stale_result", session_id=item.get("session_id"))
                else:
                    self._note(item)

    async def _read_stdout(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None  # noqa: S101 - PIPE was requested
        try:
            while True:
                try:
                    raw = await stdout.readline()
                except ValueError as e:  # longer than STREAM_LIMIT: the line was dropped
                    self._queue.put_nowait(_ProtocolIssue(f"line too long: {e}"))
                    continue
                if not raw:
                    break
                text = raw.decode("utf-8", "replace").strip()
                if not text:
                    continue
                try:
                    item = json.loads(text)
                except (ValueError, RecursionError):  # RecursionError: nested too deep
                    self._queue.put_nowait(_ProtocolIssue(f"not JSON: {text[:200]!r}"))
                    continue
                if not isinstance(item, dict):
                    self._queue.put_nowait(_ProtocolIssue(f"not an object: {text[:200]!r}"))
                    continue
                if item.get("type") == "control_request":
                    await self._refuse_control_request(item)
                    continue
                self._queue.put_nowait(item)
        except (OSError, asyncio.IncompleteReadError) as e:
            log.debug("claude.stdout_error", error=str(e))
        finally:
            self._queue.put_nowait(_Eof())

    async def _refuse_control_request(self, item: Mapping[str, Any]) -> None:
        # Nothing should ask (tools off, --permission-prompts none); never leave the CLI waiting.
        request = item.get("request")
        log.debug("claude.control_request_refused",
                  subtype=request.get("subtype") if isinstance(request, Mapping) else None)
        resp = {
            "type": "control_response",
            "response": {
                "subtype": "error",
                "request_id": item.get("request_id"),
                "error": "not supported by wabridge",
            },
        }
        with contextlib.suppress(ClaudeError):
            await self._write(json.dumps(resp) + "\n")

    async def _read_stderr(self) -> None:
        stderr = self._proc.stderr
        assert stderr is not None  # noqa: S101 - PIPE was requested
        try:
            while True:
                try:
                    raw = await stderr.readline()
                except ValueError:
                    continue
                if not raw:
                    return
                text = raw.decode("utf-8", "replace").rstrip()
                if text:
                    self._stderr_tail.append(text)
                    log.debug("claude.stderr", pid=self._proc.pid, line=text[:500])
        except OSError:
            return

    def _exit_text(self, prefix: str) -> str:
        rc = self._proc.returncode
        tail = " | ".join(self._stderr_tail)
        parts = [prefix]
        if rc is not None:
            parts.append(f"exit code {rc}")
        if tail:
            parts.append(f"stderr: {tail[-1000:]}")
        return "; ".join(parts)

    async def _reap(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), timeout=seconds)
        # let the stderr reader catch the last lines
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._err_reader), timeout=0.5)

    def _signal_group(self, sig: signal.Signals) -> None:
        # pgid == pid (start_new_session). Linux does not reuse a pid while it names a live
        # group, but once our group is empty and the leader reaped, the number is free: stop
        # signalling it then, so we can never hit another chat's new process group.
        if self._group_gone:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            if self._proc.returncode is not None:
                self._group_gone = True
        except PermissionError:
            pass
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def _kill_nowait(self) -> None:
        self._dead = True
        self._signal_group(signal.SIGKILL)

    async def _terminate(self, grace: float) -> None:
        """SIGTERM the process group (the CLI then removes its sessions/<pid>.json), SIGKILL
        after ``grace`` seconds."""
        self._dead = True
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), timeout=grace)
        await self._kill()

    async def _kill(self) -> None:
        """SIGKILL the whole process group and reap the CLI."""
        self._kill_nowait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), timeout=5.0)
