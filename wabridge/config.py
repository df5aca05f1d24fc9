"""One typed, validated configuration for the controller, the workers and the simulator.

Over 600 lines because it is the one schema: every key with its default, documentation and
check, from which the reference (docs/configuration.md) and the conffile are generated; split
into modules, both would have to be assembled again from the pieces.

Sources, later ones winning:
1. the embedded defaults below (enough to run a fleet on the local control plane);
2. the TOML file at ``$WABRIDGE_CONFIG`` or ``/etc/wabridge/wabridge.toml`` (a missing file at
   the default path means "defaults"; a missing file at an explicit path is an error);
3. environment variables ``WABRIDGE__<SECTION>__<KEY>`` (e.g. ``WABRIDGE__WORKER__BACKEND=sim``).

Every field carries its documentation and its allowed values in ``metadata`` so the README's
reference is generated from this schema (``python -m wabridge.config --markdown``). A bad value
raises ``ConfigError`` naming the key and what is allowed; processes exit with
``ExitCode.CONFIG`` (78), which the units list in ``RestartPreventExitStatus=``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from wabridge.errors import ConfigError
from wabridge.prices import parse_prices

DEFAULT_PATH = Path("/etc/wabridge/wabridge.toml")
ENV_PREFIX = "WABRIDGE__"

Check = Callable[[Any], str | None]  # returns a problem, or None when the value is fine


def _opt(default: Any, doc: str, *, allowed: str = "", check: Check | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "allowed": allowed, "check": check})


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"{value!r} is not one of {', '.join(choices)}"

    return check


def _at_least(low: float) -> Check:
    def check(value: Any) -> str | None:
        return None if value >= low else f"{value!r} is below {low}"

    return check


def _between(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"{value!r} is not within {low}..{high}"

    return check


def _matches(pattern: str, what: str) -> Check:
    compiled = re.compile(pattern)

    def check(value: Any) -> str | None:
        if value == "" or compiled.fullmatch(str(value)):
            return None
        return f"{value!r} is not {what}"

    return check


def _prices(value: Any) -> str | None:
    try:
        parse_prices(str(value))
    except ValueError as exc:
        return str(exc)
    return None


def _listen_address(value: Any) -> str | None:
    if value == "":
        return None
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{value!r} is not HOST:PORT"
    return None


@dataclass(frozen=True)
class ControllerConfig:
    control_plane: str = _opt(
        "auto",
        "Where accounts are requested and reported. `auto` picks Firestore when Firebase "
        "credentials or an emulator are configured, else the local SQLite store; `postgres` "
        "keeps them in `storage.postgres_url`'s database (a fleet without Firebase).",
        allowed="auto, firestore, local, postgres",
        check=_one_of("auto", "firestore", "local", "postgres"),
    )
    socket: str = _opt(
        "/run/wabridge/controller.sock",
        "Unix socket that workers connect to.",
    )
    admin_socket: str = _opt(
        "/run/wabridge/admin.sock",
        "Unix socket of the admin API that wabridgectl uses (mode 0660, group "
        "`controller.admin_group`; callers must be root or members of that group).",
    )
    local_db: str = _opt(
        "/var/lib/wabridge/control/control.db",
        "SQLite file of the local control plane.",
    )
    host_id: str = _opt("", "Name this host writes on claimed documents (default: hostname).")
    metrics_listen: str = _opt(
        "127.0.0.1:9464",
        "Prometheus text endpoint (`/metrics`); empty to disable.",
        allowed="HOST:PORT or empty",
        check=_listen_address,
    )
    admin_group: str = _opt(
        "wabridge-admin",
        "Unix group whose members may use wabridgectl besides root (owns the admin socket; "
        "ignored if no such group exists).",
    )
    metrics_interval: float = _opt(
        5.0,
        "Seconds between process metric writes per document (Firestore sustains ~1 write/s).",
        check=_at_least(1.0),
    )
    resync_interval: float = _opt(
        30.0,
        "Seconds between checks for client requests (`*_requested`) the change feed did not "
        "deliver; a request seen pending twice is handled and the feed re-opened. Costs one "
        "read per pending request.",
        check=_at_least(1.0),
    )
    max_starting: int = _opt(
        8,
        "Worker units the controller lets start at once (until they are active, i.e. sent "
        "READY=1); the others wait their turn. Keeps a mass start (a reboot with many users) "
        "from starving every worker past TimeoutStartSec= into a restart loop.",
        check=_between(1, 100_000),
    )


@dataclass(frozen=True)
class FirebaseConfig:
    credentials: str = _opt(
        "",
        "Service-account JSON. Empty: `$CREDENTIALS_DIRECTORY/firebase` (LoadCredential=).",
    )
    project_id: str = _opt("", "Firebase project id (required with the emulator).")
    emulator_host: str = _opt(
        "",
        "HOST:PORT of a Firestore emulator; uses anonymous credentials.",
        allowed="HOST:PORT or empty",
        check=_listen_address,
    )
    collection: str = _opt("user_sessions", "Collection of per-user session documents.")


@dataclass(frozen=True)
class WorkerConfig:
    backend: str = _opt(
        "neonize",
        "WhatsApp backend: `neonize` (real WhatsApp, linked device) or `sim` (wabridge-sim).",
        allowed="neonize, sim",
        check=_one_of("neonize", "sim"),
    )
    sim_url: str = _opt("http://127.0.0.1:8765", "Base URL of wabridge-sim for the sim backend.")
    qr_timeout: float = _opt(
        180.0, "Seconds to wait for a QR scan before giving up (status `qr_expired`).",
        check=_at_least(5.0),
    )
    reconnect_timeout: float = _opt(
        120.0,
        "Seconds disconnected before the worker exits so systemd restarts it.",
        check=_at_least(5.0),
    )
    watchdog_stall: float = _opt(
        30.0, "Seconds the event loop may stall before the watchdog stops being fed.",
        check=_at_least(1.0),
    )
    # --- supervision: written by the controller into each worker's runtime drop-in
    memory_max: str = _opt(
        "1G",
        "`MemoryMax=` of each worker unit: past it the kernel kills the worker (its document "
        "then says it ran out of memory) and systemd restarts it. Empty: the unit file's value.",
        allowed="bytes with K/M/G/T suffix, N%, infinity or empty",
        check=_matches(r"\d+[KMGT]?|\d+(\.\d+)?%|infinity", "a size, a percentage or infinity"),
    )
    memory_high: str = _opt(
        "900M",
        "`MemoryHigh=` of each worker unit (throttling before MemoryMax=; cgroup v2 only, "
        "ignored on cgroup v1). Empty: the unit file's value.",
        allowed="bytes with K/M/G/T suffix, N%, infinity or empty",
        check=_matches(r"\d+[KMGT]?|\d+(\.\d+)?%|infinity", "a size, a percentage or infinity"),
    )
    tasks_max: str = _opt(
        "256",
        "`TasksMax=` of each worker unit (threads and processes, Claude included). Empty: the "
        "unit file's value.",
        allowed="a number, N%, infinity or empty",
        check=_matches(r"\d+|\d+(\.\d+)?%|infinity", "a number, a percentage or infinity"),
    )
    cpu_quota: str = _opt(
        "100%",
        "`CPUQuota=` of each worker unit (100% = one core). Empty: no quota beyond the "
        "unit file's.",
        allowed="N% or empty",
        check=_matches(r"\d+%", "a percentage like 100%"),
    )


@dataclass(frozen=True)
class ClaudeConfig:
    cli_path: str = _opt(
        "",
        "Claude Code binary. Empty: the one bundled with claude-agent-sdk.",
    )
    model: str = _opt("", "Model name passed with --model (empty: the CLI's default).")
    system_prompt: str = _opt(
        "You are a helpful assistant answering WhatsApp messages. Reply concisely.",
        "System prompt for every chat.",
    )
    tools: bool = _opt(False, "Let Claude use its tools (off: answer from the conversation only).")
    engine: str = _opt(
        "cli",
        "How chats talk to Claude: `cli`, one Claude Code process per live chat (~140 MB "
        "each); `api`, the Messages API from the worker itself (the conversation kept in the "
        "worker's database; well under 1 MB per live chat, no tools). A user's `engine` "
        "setting overrides it. With `tools = true` only `cli` is allowed.",
        allowed="cli, api",
        check=_one_of("cli", "api"),
    )
    api_model: str = _opt(
        "claude-sonnet-4-5",
        "Model of the `api` engine when `model` is empty (the API, unlike the CLI, has no "
        "default model).",
    )
    api_max_tokens: int = _opt(
        4096, "Most tokens one reply of the `api` engine may have.", check=_between(1, 128_000)
    )
    api_prices: str = _opt(
        "claude-sonnet-4-5=3/15, claude-sonnet-4-0=3/15, claude-opus-4-5=5/25, "
        "claude-opus-4-1=15/75, claude-haiku-4-5=1/5",
        "USD per million input/output tokens per model, for the `api` engine's cost "
        "accounting (the CLI reports its own cost). Cache writes are counted at 1.25x, cache "
        "reads at 0.1x the input price. The `api` engine refuses a model not listed here.",
        allowed="model=input/output, comma separated",
        check=_prices,
    )
    models_allowed: str = _opt(
        "claude-sonnet-4-5, claude-haiku-4-5, claude-opus-4-5",
        "Models a user's `model` setting may name, comma separated (empty: users cannot "
        "choose; every chat runs on `model`). On the `api` engine a model also needs a price "
        "in `api_prices`.",
    )
    turn_timeout: float = _opt(
        120.0, "Seconds a turn may take before its process is killed (`api` engine: before "
        "its request is abandoned).", check=_at_least(1.0)
    )
    max_processes: int = _opt(
        2, "Live Claude processes per worker (each ~190 MB; the `api` engine has none).",
        check=_between(1, 64)
    )
    idle_timeout: float = _opt(
        600.0, "Seconds before an idle chat's process is closed.", check=_at_least(1.0)
    )
    host_max_processes: int = _opt(
        0,
        "Live Claude CLI processes on the whole host, handed out by the controller to chats "
        "(the account holding the fewest first); when all are taken, the least recently used "
        "idle process on the host is closed for a waiting chat. 0: derived, and kept current "
        "as accounts start and stop: 85 % of the fleet slice's memory, less ~50 MB per "
        "running worker (~80 MB on the `api` engine: its SDK), divided by ~110 MB per "
        "process (the costs `make bench` measures; the 15 % is for the controller and CLIs "
        "that grow in long conversations). A 24 GB "
        "host: 170 with no account running, 125 beside 100 accounts, 34 beside 300, none "
        "from 376. Workers are counted rather than the slice's used memory, which includes "
        "page cache and the very CLIs being budgeted. While the controller is unreachable "
        "each worker keeps to `max_processes` alone.",
        check=_between(0, 100_000),
    )
    slot_wait: float = _opt(
        60.0,
        "Seconds a chat waits for a host slot (`host_max_processes`) while every process is "
        "in a turn, before it is answered with `conversation.apology`.",
        check=_at_least(1.0),
    )
    max_retries: int = _opt(
        0, "Retries of a failed API request: CLAUDE_CODE_MAX_RETRIES for the CLI, the SDK's "
        "max_retries for the `api` engine (0: fail fast).", check=_between(0, 10)
    )
    max_tool_calls: int = _opt(
        10, "Tool calls one turn may make (the user's `tools` setting); later calls are "
        "refused and Claude answers with what it has.", check=_between(1, 100)
    )
    # --- conversation engine ---
    context_window: int = _opt(
        200_000,
        "Context window of the model in tokens; context rotation is measured against it.",
        check=_between(1000, 10_000_000),
    )


@dataclass(frozen=True)
class ConversationConfig:
    debounce: float = _opt(
        1.5,
        "Most seconds a turn waits for more messages of a burst (while they keep coming "
        "within `settle` of each other) before one turn answers them all.",
        check=_between(0.0, 30.0),
    )
    settle: float = _opt(
        0.2,
        "Seconds without a new message after which a chat's turn starts. A lone message in a "
        "quiet chat is answered after `settle`, not the whole `debounce`; messages pasted, "
        "forwarded or delivered together arrive milliseconds apart and still make one turn. "
        "The trade-off: messages typed one by one (seconds apart) are answered by more turns "
        "(those arriving during a turn go to the next one together); raise `settle` towards "
        "`debounce` to merge them, at the cost of that much delay on every reply.",
        check=_between(0.0, 30.0),
    )
    max_batch: int = _opt(20, "Most messages answered in one turn.", check=_between(1, 200))
    reply_limit: int = _opt(
        4000, "Longer replies are split into several messages.", check=_between(200, 65000)
    )
    apology: str = _opt(
        "Sorry, I could not answer that just now. Please try again in a moment.",
        "Reply sent when a turn fails for good (timeout, API error).",
    )
    # --- conversation engine ---
    rotate_at: float = _opt(
        0.7,
        "Fraction of `claude.context_window` a chat's last turn may use before its "
        "conversation is summarised and continued in a fresh session.",
        check=_between(0.1, 0.95),
    )
    rotate_after_turns: int = _opt(
        50, "Turns after which a conversation is summarised and continued afresh (0: never).",
        check=_between(0, 100_000),
    )
    recovery_messages: int = _opt(
        10,
        "Stored messages a fresh session is seeded with (besides the latest summary) when "
        "a chat's session cannot be resumed.",
        check=_between(0, 200),
    )
    resume_max_bytes: int = _opt(
        10_000_000,
        "A chat's Claude transcript larger than this is not resumed; a fresh session seeded "
        "with the summary and recent messages starts instead.",
        check=_at_least(1000),
    )
    # --- delivery and loops ---
    send_attempts: int = _opt(
        5,
        "Times a reply WhatsApp refuses is tried (waiting `send_retry_base` seconds, doubling "
        "up to 5 minutes, between tries) before it is marked failed and reported; later "
        "replies are not held up by it.",
        check=_between(1, 100),
    )
    send_retry_base: float = _opt(
        5.0, "Seconds before the second try of a refused reply (doubles each time).",
        check=_between(0.0, 3600.0),
    )
    uncertain_replies: str = _opt(
        "resend",
        "A reply the worker was sending when it crashed may or may not have reached WhatsApp "
        "(neonize cannot resend with the same message id). `resend`: send it again (at least "
        "once: maybe twice); `drop`: do not (at most once: maybe never). Either way it is "
        "logged and counted. The simulator resends with the same id: exactly once.",
        allowed="resend, drop",
        check=_one_of("resend", "drop"),
    )
    loop_max_turns: int = _opt(
        30,
        "A chat with more turns than this within `loop_window` seconds (a bot answering the "
        "bot) is no longer answered, until it has been quiet for `loop_window` seconds; "
        "logged and shown on the document as `bot_loop`. 0: off.",
        check=_between(0, 100_000),
    )
    loop_window: float = _opt(
        600.0, "Seconds of the loop guard's window (see `loop_max_turns`).",
        check=_between(1.0, 86_400.0),
    )


@dataclass(frozen=True)
class LimitsConfig:
    """Budgets and rate limits."""

    daily_budget_usd: float = _opt(
        5.0,
        "Claude spend per user per UTC day; once reached, chats get one notice a day and no "
        "turns. Per user: `daily_budget_usd` in the document's settings. 0: no cap.",
        check=_at_least(0.0),
    )
    inbound_per_minute: float = _opt(
        10.0,
        "Messages per minute one sender may have answered (token bucket refill); excess "
        "messages are kept, not answered, and the sender is asked once to slow down. 0: off.",
        check=_at_least(0.0),
    )
    inbound_burst: int = _opt(
        5, "Messages one sender may send at once before the per-minute rate applies.",
        check=_between(1, 1000),
    )
    send_gap: float = _opt(
        1.0, "Minimum seconds between two messages this account sends (reduces ban risk).",
        check=_between(0.0, 60.0),
    )
    send_jitter: float = _opt(
        0.5, "Up to this many random seconds added to `send_gap`.", check=_between(0.0, 60.0)
    )


@dataclass(frozen=True)
class ToolsConfig:
    """Claude's wabridge tools, for users whose `tools` setting is `wabridge`."""

    scheduled_per_chat: int = _opt(
        20, "Scheduled messages one chat may have pending.", check=_between(1, 1000)
    )
    scheduled_per_day: int = _opt(
        50, "Messages a user's chats may schedule per UTC day.", check=_between(1, 10000)
    )
    scheduled_chars: int = _opt(
        2000, "Longest text of a scheduled message.", check=_between(1, 65536)
    )
    notes_per_chat: int = _opt(
        30, "Notes Claude may keep about one contact (`remember`).", check=_between(1, 1000)
    )
    note_chars: int = _opt(500, "Longest note.", check=_between(10, 10000))
    file_max_bytes: int = _opt(
        16_000_000, "Largest file `send_file`/`send_image` send from a chat's workspace.",
        check=_between(1, 100_000_000),
    )


@dataclass(frozen=True)
class LogConfig:
    level: str = _opt(
        "info", "Log level.", allowed="debug, info, warning, error",
        check=_one_of("debug", "info", "warning", "error"),
    )
    format: str = _opt(
        "auto",
        "`auto`: native journald fields under systemd, console on a TTY, JSON otherwise.",
        allowed="auto, journal, json, console",
        check=_one_of("auto", "journal", "json", "console"),
    )


@dataclass(frozen=True)
class TranscriptionConfig:
    url: str = _opt(
        "",
        "OpenAI-compatible transcription endpoint for voice notes, e.g. "
        "`http://127.0.0.1:8000/v1/audio/transcriptions` (a local whisper server) or a hosted "
        "one; its key, if any, is TRANSCRIPTION_API_KEY in worker.env. Empty: voice notes are "
        "answered as not supported.",
    )
    model: str = _opt("whisper-1", "The `model` field of the transcription request.")
    max_seconds: float = _opt(
        600.0, "Longest voice note transcribed, in seconds (longer: not supported).",
        check=_at_least(1.0))
    max_bytes: int = _opt(
        16_000_000, "Largest audio file transcribed, in bytes (WhatsApp's own limit is 16 MB).",
        check=_between(1000, 100_000_000))
    timeout: float = _opt(
        60.0, "Seconds a transcription may take before the voice note is answered as not "
        "supported.", check=_at_least(1.0))


@dataclass(frozen=True)
class SimConfig:
    listen: str = _opt(
        "127.0.0.1:8765", "Where wabridge-sim serves its API and web page.",
        check=_listen_address,
    )
    qr_rotate: float = _opt(20.0, "Seconds between QR rotations.", check=_at_least(0.5))


def _postgres_url(value: Any) -> str | None:
    text = str(value)
    if text == "":
        return None
    if not text.startswith(("postgresql://", "postgres://")):
        return f"{text!r} is not a postgresql:// URL"
    if re.match(r"^[a-z]+://[^/@]*:[^/@]*@", text) or "password=" in text:
        return ("carries a password: give it as the systemd credential "
                "'postgres-password' instead (it must not reach a unit file or a log)")
    return None


@dataclass(frozen=True)
class StorageConfig:
    backend: str = _opt(
        "sqlite",
        "Where each account's conversation store lives: `sqlite` (a file in its state "
        "directory) or `postgresql` (its own schema and role in `postgres_url`'s database).",
        allowed="sqlite, postgresql",
        check=_one_of("sqlite", "postgresql"),
    )
    postgres_url: str = _opt(
        "",
        "The shared database, e.g. `postgresql://wabridge@db.example:5432/wabridge`, without "
        "a password: the controller's comes from the credential `postgres-password`, each "
        "worker gets its own role's the same way.",
        allowed="postgresql:// URL without a password, or empty",
        check=_postgres_url,
    )


@dataclass(frozen=True)
class FleetConfig:
    enabled: bool = _opt(
        False,
        "Run accounts across several hosts sharing `storage.postgres_url`: each account is "
        "owned by one host at a time through a lease in the database (needs "
        "`storage.backend = \"postgresql\"`). Off: every account runs on this host.",
    )
    lease_seconds: float = _opt(
        30.0, "How long an account's lease lasts from its last renewal (database time).",
        check=_between(3.0, 3600.0))
    renew_seconds: float = _opt(
        10.0, "How often a worker renews its lease; must be below `lease_seconds - "
        "margin_seconds`.", check=_at_least(0.2))
    grace_seconds: float = _opt(
        10.0, "How long after a lease expired another host waits before taking the account "
        "(covers clock rates and a worker finishing its stop).", check=_at_least(0.0))
    margin_seconds: float = _opt(
        5.0, "A worker that has not renewed for `lease_seconds - margin_seconds` (its own "
        "monotonic clock) disconnects WhatsApp and exits with \"lease lost\".",
        check=_at_least(0.5))
    heartbeat_seconds: float = _opt(
        5.0, "How often a controller writes its host's heartbeat.", check=_at_least(0.2))
    host_dead_seconds: float = _opt(
        20.0, "A host whose heartbeat is older than this (database time) is dead; must be "
        "above `heartbeat_seconds`.", check=_at_least(1.0))
    max_workers: int = _opt(
        0, "Accounts this host runs at most; 0 derives it from the worker slice's memory "
        "(about 60 MB per worker).", check=_at_least(0))
    tick_seconds: float = _opt(
        2.0, "How often a controller re-plans which host runs each account.",
        check=_at_least(0.1))


@dataclass(frozen=True)
class Config:
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    firebase: FirebaseConfig = field(default_factory=FirebaseConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    claude: ClaudeConfig = field(default_factory=ClaudeConfig)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    transcription: TranscriptionConfig = field(default_factory=TranscriptionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)


SectionT = TypeVar("SectionT")


def _coerce(key: str, text: str, kind: type) -> Any:
    """Environment values are strings; turn them into the field's type."""
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"{text!r} is not a boolean", allowed="true, false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(key, f"{text!r} is not an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(key, f"{text!r} is not a number") from None
    return text


_KINDS: dict[str, type] = {"str": str, "bool": bool, "int": int, "float": float}


def _build_section(name: str, cls: type[SectionT], raw: Mapping[str, Any]) -> SectionT:
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{name}.{key}", "unknown key", allowed=", ".join(sorted(known))
            )
    values: dict[str, Any] = {}
    for fname, fdef in known.items():
        if fname not in raw:
            continue
        key = f"{name}.{fname}"
        kind = _KINDS[str(fdef.type)]
        value = raw[fname]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(
                key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}",
                allowed=fdef.metadata.get("allowed", ""),
            )
        check: Check | None = fdef.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(key, problem, allowed=fdef.metadata.get("allowed", ""))
        values[fname] = value
    return cls(**values)


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration; raises ``ConfigError``."""
    env = os.environ if environ is None else environ
    explicit = path is not None or "WABRIDGE_CONFIG" in env
    file = path or Path(env.get("WABRIDGE_CONFIG", str(DEFAULT_PATH)))
    data: dict[str, Any] = {}
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if explicit:
            raise ConfigError("(file)", f"{file} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"{file} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # a ValueError, not an OSError
        raise ConfigError("(file)", f"{file} is not UTF-8 text: {exc.reason} at byte "
                          f"{exc.start}") from None
    except OSError as exc:
        raise ConfigError("(file)", f"{file} cannot be read: {exc.strerror}") from None

    sections = {f.name: cast("type[Any]", f.default_factory) for f in fields(Config)}
    for name in data:
        if name not in sections:
            raise ConfigError(name, "unknown section", allowed=", ".join(sections))
        if not isinstance(data[name], dict):  # before env values are merged into it
            raise ConfigError(name, "must be a table")
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("__")
        if section not in sections or not key:
            raise ConfigError(var, "does not name a config key", allowed="WABRIDGE__SECTION__KEY")
        kinds = {f.name: _KINDS[str(f.type)] for f in fields(sections[section])}
        if key not in kinds:
            raise ConfigError(f"{section}.{key}", "unknown key (from environment)",
                              allowed=", ".join(sorted(kinds)))
        data.setdefault(section, {})[key] = _coerce(f"{section}.{key}", text, kinds[key])

    built: dict[str, Any] = {}
    for name, cls in sections.items():
        built[name] = _build_section(name, cls, data.get(name, {}))
    cfg = Config(**built)
    claude = cfg.claude
    if claude.engine == "api" and claude.tools:
        raise ConfigError("claude.engine", "api has no tools but claude.tools is true",
                          allowed="cli (with tools), or tools = false")
    if claude.engine == "api" and api_model(claude) not in parse_prices(claude.api_prices):
        raise ConfigError("claude.api_prices", f"has no price for the model {api_model(claude)!r}"
                          " the api engine uses", allowed="model=input/output, comma separated")
    if cfg.controller.control_plane == "postgres" and not cfg.storage.postgres_url:
        raise ConfigError("storage.postgres_url", "is empty but controller.control_plane is "
                          "postgres", allowed="postgresql:// URL without a password")
    if cfg.storage.backend == "postgresql" and not cfg.storage.postgres_url:
        raise ConfigError("storage.postgres_url", "is empty but storage.backend is postgresql",
                          allowed="postgresql:// URL without a password")
    _check_fleet(cfg)
    return cfg


def _check_fleet(cfg: Config) -> None:
    """The ``[fleet]`` keys that only make sense together (the timings are checked even
    while the fleet is off, so turning it on never meets a surprise)."""
    fleet = cfg.fleet
    if fleet.enabled and cfg.storage.backend != "postgresql":
        raise ConfigError("fleet.enabled", "is true but storage.backend is "
                          f"{cfg.storage.backend!r}: the leases live in PostgreSQL",
                          allowed='storage.backend = "postgresql", or fleet.enabled = false')
    if fleet.margin_seconds >= fleet.lease_seconds:
        raise ConfigError("fleet.margin_seconds", f"{fleet.margin_seconds} is not below "
                          f"fleet.lease_seconds ({fleet.lease_seconds})",
                          allowed="less than fleet.lease_seconds")
    if fleet.renew_seconds >= fleet.lease_seconds - fleet.margin_seconds:
        raise ConfigError("fleet.renew_seconds", f"{fleet.renew_seconds} is not below "
                          f"fleet.lease_seconds - fleet.margin_seconds "
                          f"({fleet.lease_seconds - fleet.margin_seconds}): a worker would "
                          "stop before its first renewal", allowed="renew < lease - margin")
    if fleet.host_dead_seconds <= fleet.heartbeat_seconds:
        raise ConfigError("fleet.host_dead_seconds", f"{fleet.host_dead_seconds} is not above "
                          f"fleet.heartbeat_seconds ({fleet.heartbeat_seconds}): every host "
                          "would look dead between heartbeats",
                          allowed="more than fleet.heartbeat_seconds")


def models_allowed(claude: ClaudeConfig) -> tuple[str, ...]:
    """``claude.models_allowed`` as names."""
    return tuple(m.strip() for m in claude.models_allowed.split(",") if m.strip())


def api_model(claude: ClaudeConfig) -> str:
    """The model the ``api`` engine asks for."""
    return claude.model or claude.api_model


def with_overrides(config: Config, section: str, **values: Any) -> Config:
    """A copy of ``config`` with some values of one section replaced (tests, per-user settings)."""
    return replace(config, **{section: replace(getattr(config, section), **values)})


def reference_markdown() -> str:
    """The configuration reference, generated from this schema (used by README)."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for section in fields(Config):
        for fdef in fields(section.default_factory):  # type: ignore[arg-type]
            default = fdef.default if fdef.default is not MISSING else ""
            lines.append(
                f"| `{section.name}.{fdef.name}` | `{default!r}` | "
                f"{fdef.metadata.get('allowed', '') or str(fdef.type)} | {fdef.metadata['doc']} |"
            )
    return "\n".join(lines)


def _toml_literal(value: Any) -> str:
    """A default as TOML writes it: a JSON string is a valid TOML basic string, escapes
    included; booleans are lower case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def example_toml() -> str:
    """A fully commented config file (the Debian package's conffile)."""
    out = ["# wabridge configuration. Every option is shown with its default, commented out.",
           "# Environment variables WABRIDGE__SECTION__KEY override this file.", ""]
    for section in fields(Config):
        out.append(f"[{section.name}]")
        for fdef in fields(section.default_factory):  # type: ignore[arg-type]
            out.append(f"# {fdef.metadata['doc']}")
            if fdef.metadata.get("allowed"):
                out.append(f"# allowed: {fdef.metadata['allowed']}")
            out.append(f"#{fdef.name} = {_toml_literal(fdef.default)}")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write((reference_markdown() if "--markdown" in sys.argv else example_toml()) + "\n")
