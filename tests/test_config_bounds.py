"""Every checked config key at its bounds, with the whole message an operator reads (issue 20).

Each row writes out the value, and for a refused one the message: the key, the problem and
what is allowed. A rule switched off, a bound moved by one or a message changed fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wabridge import config
from wabridge.config import load
from wabridge.errors import ConfigError

LISTEN = "HOST:PORT or empty"
SIZE = "bytes with K/M/G/T suffix, N%, infinity or empty"
TASKS = "a number, N%, infinity or empty"


def _toml(key: str, value: Any) -> str:
    section, name = key.split(".")
    literal = json.dumps(value) if isinstance(value, str) else (
        ("true" if value else "false") if isinstance(value, bool) else repr(value))
    return f"[{section}]\n{name} = {literal}\n"


def _load(tmp_path: Path, key: str, value: Any) -> Any:
    path = tmp_path / "wabridge.toml"
    path.write_text(_toml(key, value), encoding="utf-8")
    section, name = key.split(".")
    return getattr(getattr(load(path, environ={}), section), name)


# (key, value, problem, allowed): refused, with "config key '<key>': <problem> (allowed: ...)"
REFUSED: list[tuple[str, Any, str, str]] = [
    ("controller.control_plane", "sqlite",
     "'sqlite' is not one of auto, firestore, local, postgres", "auto, firestore, local, postgres"),
    ("controller.metrics_listen", "h:65536", "'h:65536' is not HOST:PORT", LISTEN),
    ("controller.metrics_listen", "h:0", "'h:0' is not HOST:PORT", LISTEN),
    ("controller.metrics_listen", "h:", "'h:' is not HOST:PORT", LISTEN),
    ("controller.metrics_listen", ":80", "':80' is not HOST:PORT", LISTEN),
    ("controller.metrics_listen", "h:-1", "'h:-1' is not HOST:PORT", LISTEN),
    ("controller.metrics_listen", "9464", "'9464' is not HOST:PORT", LISTEN),
    ("controller.metrics_interval", 0.99, "0.99 is below 1.0", ""),
    ("controller.resync_interval", 0.99, "0.99 is below 1.0", ""),
    ("controller.max_starting", 0, "0 is not within 1..100000", ""),
    ("controller.max_starting", 100_001, "100001 is not within 1..100000", ""),
    ("firebase.emulator_host", "localhost", "'localhost' is not HOST:PORT", LISTEN),
    ("worker.backend", "baileys", "'baileys' is not one of neonize, sim", "neonize, sim"),
    ("worker.qr_timeout", 4.99, "4.99 is below 5.0", ""),
    ("worker.reconnect_timeout", 4.99, "4.99 is below 5.0", ""),
    ("worker.watchdog_stall", 0.99, "0.99 is below 1.0", ""),
    ("worker.memory_max", "lots", "'lots' is not a size, a percentage or infinity", SIZE),
    ("worker.memory_max", "1GB", "'1GB' is not a size, a percentage or infinity", SIZE),
    ("worker.memory_max", "1.5G", "'1.5G' is not a size, a percentage or infinity", SIZE),
    ("worker.memory_max", "G", "'G' is not a size, a percentage or infinity", SIZE),
    ("worker.memory_max", "%", "'%' is not a size, a percentage or infinity", SIZE),
    ("worker.memory_max", "1.%", "'1.%' is not a size, a percentage or infinity", SIZE),
    ("worker.memory_max", "infinite", "'infinite' is not a size, a percentage or infinity",
     SIZE),
    ("worker.memory_high", "lots", "'lots' is not a size, a percentage or infinity", SIZE),
    ("worker.memory_high", "12.%", "'12.%' is not a size, a percentage or infinity", SIZE),
    ("worker.tasks_max", "256K", "'256K' is not a number, a percentage or infinity", TASKS),
    ("worker.tasks_max", "many", "'many' is not a number, a percentage or infinity", TASKS),
    ("worker.tasks_max", "1.%", "'1.%' is not a number, a percentage or infinity", TASKS),
    ("worker.cpu_quota", "100", "'100' is not a percentage like 100%", "N% or empty"),
    ("worker.cpu_quota", "%", "'%' is not a percentage like 100%", "N% or empty"),
    ("claude.turn_timeout", 0.99, "0.99 is below 1.0", ""),
    ("claude.max_processes", 0, "0 is not within 1..64", ""),
    ("claude.max_processes", 65, "65 is not within 1..64", ""),
    ("claude.idle_timeout", 0.99, "0.99 is below 1.0", ""),
    ("claude.max_retries", -1, "-1 is not within 0..10", ""),
    ("claude.max_retries", 11, "11 is not within 0..10", ""),
    ("claude.context_window", 0, "0 is not within 1000..10000000", ""),
    ("claude.context_window", 999, "999 is not within 1000..10000000", ""),
    ("claude.context_window", 10_000_001, "10000001 is not within 1000..10000000", ""),
    ("conversation.debounce", -0.01, "-0.01 is not within 0.0..30.0", ""),
    ("conversation.debounce", 30.01, "30.01 is not within 0.0..30.0", ""),
    ("conversation.max_batch", 0, "0 is not within 1..200", ""),
    ("conversation.max_batch", 201, "201 is not within 1..200", ""),
    ("conversation.reply_limit", 199, "199 is not within 200..65000", ""),
    ("conversation.reply_limit", 65001, "65001 is not within 200..65000", ""),
    ("conversation.rotate_at", 1.0, "1.0 is not within 0.1..0.95", ""),
    ("conversation.rotate_at", 1, "1.0 is not within 0.1..0.95", ""),  # an int is a float
    ("conversation.rotate_at", 0.96, "0.96 is not within 0.1..0.95", ""),
    ("conversation.rotate_at", 0.09, "0.09 is not within 0.1..0.95", ""),
    ("conversation.rotate_after_turns", -1, "-1 is not within 0..100000", ""),
    ("conversation.rotate_after_turns", 100_001, "100001 is not within 0..100000", ""),
    ("conversation.recovery_messages", -1, "-1 is not within 0..200", ""),
    ("conversation.recovery_messages", 201, "201 is not within 0..200", ""),
    ("conversation.resume_max_bytes", 999, "999 is below 1000", ""),
    ("limits.daily_budget_usd", -0.01, "-0.01 is below 0.0", ""),
    ("limits.inbound_per_minute", -1.0, "-1.0 is below 0.0", ""),
    ("limits.inbound_burst", 0, "0 is not within 1..1000", ""),
    ("limits.inbound_burst", 1001, "1001 is not within 1..1000", ""),
    ("limits.send_gap", -0.01, "-0.01 is not within 0.0..60.0", ""),
    ("limits.send_gap", 60.01, "60.01 is not within 0.0..60.0", ""),
    ("limits.send_jitter", -0.01, "-0.01 is not within 0.0..60.0", ""),
    ("limits.send_jitter", 60.01, "60.01 is not within 0.0..60.0", ""),
    ("log.level", "trace", "'trace' is not one of debug, info, warning, error",
     "debug, info, warning, error"),
    ("log.format", "xml", "'xml' is not one of auto, journal, json, console",
     "auto, journal, json, console"),
    ("sim.listen", "127.0.0.1:99999", "'127.0.0.1:99999' is not HOST:PORT", ""),
    ("sim.qr_rotate", 0.49, "0.49 is below 0.5", ""),
    ("claude.max_tool_calls", 0, "0 is not within 1..100", ""),
    ("claude.max_tool_calls", 101, "101 is not within 1..100", ""),
    ("conversation.send_attempts", 0, "0 is not within 1..100", ""),
    ("conversation.send_attempts", 101, "101 is not within 1..100", ""),
    ("conversation.send_retry_base", -0.01, "-0.01 is not within 0.0..3600.0", ""),
    ("conversation.send_retry_base", 3600.01, "3600.01 is not within 0.0..3600.0", ""),
    ("conversation.uncertain_replies", "twice", "'twice' is not one of resend, drop",
     "resend, drop"),
    ("conversation.loop_max_turns", -1, "-1 is not within 0..100000", ""),
    ("conversation.loop_max_turns", 100_001, "100001 is not within 0..100000", ""),
    ("conversation.loop_window", 0.99, "0.99 is not within 1.0..86400.0", ""),
    ("conversation.loop_window", 86_400.01, "86400.01 is not within 1.0..86400.0", ""),
    ("tools.scheduled_per_chat", 0, "0 is not within 1..1000", ""),
    ("tools.scheduled_per_chat", 1001, "1001 is not within 1..1000", ""),
    ("tools.scheduled_per_day", 0, "0 is not within 1..10000", ""),
    ("tools.scheduled_per_day", 10_001, "10001 is not within 1..10000", ""),
    ("tools.scheduled_chars", 0, "0 is not within 1..65536", ""),
    ("tools.scheduled_chars", 65_537, "65537 is not within 1..65536", ""),
    ("tools.notes_per_chat", 0, "0 is not within 1..1000", ""),
    ("tools.notes_per_chat", 1001, "1001 is not within 1..1000", ""),
    ("tools.note_chars", 9, "9 is not within 10..10000", ""),
    ("tools.note_chars", 10_001, "10001 is not within 10..10000", ""),
    ("tools.file_max_bytes", 0, "0 is not within 1..100000000", ""),
    ("tools.file_max_bytes", 100_000_001, "100000001 is not within 1..100000000", ""),
    # wrong types name the expected type, and what is allowed where the key says
    ("worker.memory_max", 1024, "expected str, got int 1024", SIZE),
    ("claude.tools", "yes", "expected bool, got str 'yes'", ""),
    ("limits.daily_budget_usd", True, "expected float, got bool True", ""),
]


@pytest.mark.parametrize(("key", "value", "problem", "allowed"), REFUSED,
                         ids=[f"{r[0]}={r[1]!r}" for r in REFUSED])
def test_refused_with_the_whole_message(tmp_path: Path, key: str, value: Any, problem: str,
                                        allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, key, value)
    expected = f"config key {key!r}: {problem}" + (f" (allowed: {allowed})" if allowed else "")
    assert str(info.value) == expected
    assert (info.value.key, info.value.problem, info.value.allowed) == (key, problem, allowed)


ACCEPTED: list[tuple[str, Any, Any]] = [
    ("controller.control_plane", "firestore", "firestore"),
    ("controller.control_plane", "local", "local"),
    ("controller.metrics_listen", "h:1", "h:1"),
    ("controller.metrics_listen", "h:65535", "h:65535"),
    ("controller.metrics_listen", "", ""),
    ("controller.metrics_interval", 1.0, 1.0),
    ("controller.resync_interval", 1, 1.0),
    ("controller.max_starting", 1, 1),
    ("controller.max_starting", 100_000, 100_000),
    ("firebase.emulator_host", "127.0.0.1:8080", "127.0.0.1:8080"),
    ("worker.qr_timeout", 5.0, 5.0),
    ("worker.reconnect_timeout", 5.0, 5.0),
    ("worker.watchdog_stall", 1.0, 1.0),
    ("worker.memory_max", "512", "512"),
    ("worker.memory_max", "512K", "512K"),
    ("worker.memory_max", "2T", "2T"),
    ("worker.memory_max", "80%", "80%"),
    ("worker.memory_max", "12.5%", "12.5%"),
    ("worker.memory_max", "infinity", "infinity"),
    ("worker.memory_max", "", ""),
    ("worker.memory_high", "10.25%", "10.25%"),
    ("worker.memory_high", "infinity", "infinity"),
    ("worker.tasks_max", "4096", "4096"),
    ("worker.tasks_max", "12.5%", "12.5%"),
    ("worker.tasks_max", "infinity", "infinity"),
    ("worker.cpu_quota", "250%", "250%"),
    ("worker.cpu_quota", "", ""),
    ("claude.turn_timeout", 1.0, 1.0),
    ("claude.idle_timeout", 1.0, 1.0),
    ("claude.max_retries", 0, 0),
    ("claude.max_retries", 10, 10),
    ("claude.context_window", 1000, 1000),
    ("claude.context_window", 10_000_000, 10_000_000),
    ("conversation.debounce", 0.0, 0.0),
    ("conversation.debounce", 30.0, 30.0),
    ("conversation.max_batch", 1, 1),
    ("conversation.max_batch", 200, 200),
    ("conversation.reply_limit", 200, 200),
    ("conversation.reply_limit", 65000, 65000),
    ("conversation.rotate_at", 0.1, 0.1),
    ("conversation.rotate_at", 0.95, 0.95),
    ("conversation.rotate_after_turns", 0, 0),
    ("conversation.rotate_after_turns", 100_000, 100_000),
    ("conversation.recovery_messages", 0, 0),
    ("conversation.recovery_messages", 200, 200),
    ("conversation.resume_max_bytes", 1000, 1000),
    ("limits.daily_budget_usd", 0.0, 0.0),
    ("limits.daily_budget_usd", 0.5, 0.5),
    ("limits.inbound_per_minute", 0.0, 0.0),
    ("limits.inbound_burst", 1, 1),
    ("limits.inbound_burst", 1000, 1000),
    ("limits.send_gap", 0.0, 0.0),
    ("limits.send_gap", 60.0, 60.0),
    ("limits.send_jitter", 60.0, 60.0),
    ("claude.max_tool_calls", 1, 1),
    ("claude.max_tool_calls", 100, 100),
    ("conversation.send_attempts", 1, 1),
    ("conversation.send_attempts", 100, 100),
    ("conversation.send_retry_base", 0.0, 0.0),
    ("conversation.send_retry_base", 3600.0, 3600.0),
    ("conversation.uncertain_replies", "resend", "resend"),
    ("conversation.uncertain_replies", "drop", "drop"),
    ("conversation.loop_max_turns", 0, 0),
    ("conversation.loop_max_turns", 100_000, 100_000),
    ("conversation.loop_window", 1.0, 1.0),
    ("conversation.loop_window", 86_400.0, 86_400.0),
    ("tools.scheduled_per_chat", 1, 1),
    ("tools.scheduled_per_chat", 1000, 1000),
    ("tools.scheduled_per_day", 1, 1),
    ("tools.scheduled_per_day", 10_000, 10_000),
    ("tools.scheduled_chars", 1, 1),
    ("tools.scheduled_chars", 65_536, 65_536),
    ("tools.notes_per_chat", 1, 1),
    ("tools.notes_per_chat", 1000, 1000),
    ("tools.note_chars", 10, 10),
    ("tools.note_chars", 10_000, 10_000),
    ("tools.file_max_bytes", 1, 1),
    ("tools.file_max_bytes", 100_000_000, 100_000_000),
    ("log.level", "debug", "debug"),
    ("log.level", "error", "error"),
    ("log.format", "journal", "journal"),
    ("log.format", "console", "console"),
    ("sim.listen", "127.0.0.1:1", "127.0.0.1:1"),
    ("sim.qr_rotate", 0.5, 0.5),
]


@pytest.mark.parametrize(("key", "value", "loaded"), ACCEPTED,
                         ids=[f"{r[0]}={r[1]!r}" for r in ACCEPTED])
def test_accepted_at_the_bounds(tmp_path: Path, key: str, value: Any, loaded: Any) -> None:
    got = _load(tmp_path, key, value)
    assert got == loaded
    assert type(got) is type(loaded)


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" On ", True),
    ("0", False), ("false", False), ("no", False), ("NO", False), ("off", False),
    (" no ", False),
])
def test_env_booleans(text: str, value: bool) -> None:
    cfg = config.load(environ={"WABRIDGE_CONFIG": "/dev/null", "WABRIDGE__CLAUDE__TOOLS": text})
    assert cfg.claude.tools is value


@pytest.mark.parametrize(("var", "text", "message"), [
    ("WABRIDGE__CLAUDE__TOOLS", "nope",
     "config key 'claude.tools': 'nope' is not a boolean (allowed: true, false)"),
    ("WABRIDGE__CLAUDE__TOOLS", "",
     "config key 'claude.tools': '' is not a boolean (allowed: true, false)"),
    ("WABRIDGE__CLAUDE__MAX_PROCESSES", "2.5",
     "config key 'claude.max_processes': '2.5' is not an integer"),
    ("WABRIDGE__WORKER__QR_TIMEOUT", "soon",
     "config key 'worker.qr_timeout': 'soon' is not a number"),
    ("WABRIDGE__WORKER__NOPE", "1",
     "config key 'worker.nope': unknown key (from environment) (allowed: backend, cpu_quota, "
     "memory_high, memory_max, qr_timeout, reconnect_timeout, sim_url, tasks_max, "
     "watchdog_stall)"),
    ("WABRIDGE__NOPE__X", "1",
     "config key 'WABRIDGE__NOPE__X': does not name a config key "
     "(allowed: WABRIDGE__SECTION__KEY)"),
    ("WABRIDGE__WORKER", "1",
     "config key 'WABRIDGE__WORKER': does not name a config key "
     "(allowed: WABRIDGE__SECTION__KEY)"),
])
def test_env_messages(var: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(environ={"WABRIDGE_CONFIG": "/dev/null", var: text})
    assert str(info.value) == message


def test_env_values_are_read_as_the_field_type() -> None:
    cfg = config.load(environ={"WABRIDGE_CONFIG": "/dev/null",
                               "WABRIDGE__LIMITS__INBOUND_BURST": "7",
                               "WABRIDGE__LIMITS__SEND_GAP": "2",
                               "WABRIDGE__WORKER__MEMORY_MAX": "2G",
                               "OTHER__VAR": "ignored"})
    assert (cfg.limits.inbound_burst, cfg.limits.send_gap, cfg.worker.memory_max) == (7, 2.0, "2G")
    assert type(cfg.limits.send_gap) is float


@pytest.mark.parametrize(("text", "message"), [
    ("[nope]\nx = 1\n",
     "config key 'nope': unknown section (allowed: controller, firebase, worker, claude, "
     "conversation, limits, tools, log, sim, transcription, storage, fleet)"),
    ("worker = 1\n", "config key 'worker': must be a table"),
    ("[sim]\nlisten = '127.0.0.1:1'\nqr = 1\n",
     "config key 'sim.qr': unknown key (allowed: listen, qr_rotate)"),
    # keys checked together
    ("[claude]\nengine = 'api'\ntools = true\n",
     "config key 'claude.engine': api has no tools but claude.tools is true "
     "(allowed: cli (with tools), or tools = false)"),
    ("[claude]\nengine = 'api'\nmodel = 'claude-new'\n",
     "config key 'claude.api_prices': has no price for the model 'claude-new' the api engine "
     "uses (allowed: model=input/output, comma separated)"),
])
def test_file_messages(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "wabridge.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(info.value) == message


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(missing, environ={})
    assert str(info.value) == f"config key '(file)': {missing} does not exist"
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(latin, environ={})
    assert str(info.value) == (f"config key '(file)': {latin} is not UTF-8 text: "
                               "invalid continuation byte at byte 5")
    a_dir = tmp_path / "dir.toml"
    a_dir.mkdir()
    with pytest.raises(ConfigError) as info:
        load(a_dir, environ={})
    assert str(info.value) == f"config key '(file)': {a_dir} cannot be read: Is a directory"


def test_the_postgres_control_plane_needs_the_database(tmp_path: Path) -> None:
    path = tmp_path / "wabridge.toml"
    path.write_text('[controller]\ncontrol_plane = "postgres"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert info.value.key == "storage.postgres_url"
    assert "controller.control_plane is postgres" in info.value.problem
    path.write_text('[controller]\ncontrol_plane = "postgres"\n[storage]\n'
                    'postgres_url = "postgresql://wabridge@db/wabridge"\n', encoding="utf-8")
    cfg = load(path, environ={})
    assert cfg.controller.control_plane == "postgres"
    assert cfg.storage.backend == "sqlite"  # the accounts' stores may stay files


def test_the_default_file() -> None:
    assert Path("/etc/wabridge/wabridge.toml") == config.DEFAULT_PATH


def test_the_reference_table_starts_with_its_header() -> None:
    lines = config.reference_markdown().splitlines()
    assert lines[:3] == [
        "| key | default | allowed | meaning |",
        "|---|---|---|---|",
        "| `controller.control_plane` | `'auto'` | auto, firestore, local, postgres | Where "
        "accounts are requested and reported. `auto` picks Firestore when Firebase credentials "
        "or an emulator are configured, else the local SQLite store; `postgres` keeps them in "
        "`storage.postgres_url`'s database (a fleet without Firebase). |",
    ]


def test_the_example_file_layout() -> None:
    lines = config.example_toml().splitlines()
    assert lines[:7] == [
        "# wabridge configuration. Every option is shown with its default, commented out.",
        "# Environment variables WABRIDGE__SECTION__KEY override this file.",
        "",
        "[controller]",
        "# Where accounts are requested and reported. `auto` picks Firestore when "
        "Firebase credentials or an emulator are configured, else the local SQLite store; "
        "`postgres` keeps them in `storage.postgres_url`'s database (a fleet without Firebase).",
        "# allowed: auto, firestore, local, postgres",
        '#control_plane = "auto"',
    ]
    # each section ends with a blank line before the next one
    assert lines[lines.index("[firebase]") - 1] == ""
    assert config.example_toml().endswith("\n#tick_seconds = 2.0\n")  # [fleet] is last
    assert "#tools = false" in lines
    assert "#max_starting = 8" in lines


_SIZE_KEYS = ("worker.memory_max", "worker.memory_high")
_RULES: list[tuple[tuple[str, ...], list[str], list[str], str]] = [
    # keys, accepted, refused, what the message says a value must be
    (_SIZE_KEYS, ["0", "512", "512K", "1M", "100G", "2T", "80%", "12.5%", "0.25%", "infinity", ""],
     ["lots", "K", "1KB", "1k", "1.5G", "x%", "1.%", "1.x%", ".5%", "%", "12.5", "infinity%",
      "infinit", "-1G", " 1G"],
     "a size, a percentage or infinity"),
    (("worker.tasks_max",), ["0", "4096", "10%", "12.5%", "infinity", ""],
     ["many", "K", "256K", "x%", "1.%", "1.x%", "%", "12.5", "-1"],
     "a number, a percentage or infinity"),
    (("worker.cpu_quota",), ["1%", "100%", "250%", ""],
     ["100", "%", "x%", "1.5%", "infinity", "100%%"], "a percentage like 100%"),
]


@pytest.mark.parametrize(("key", "value"), [
    (key, value) for keys, good, _, _ in _RULES for key in keys for value in good])
def test_systemd_values_accepted(tmp_path: Path, key: str, value: str) -> None:
    assert _load(tmp_path, key, value) == value


@pytest.mark.parametrize(("key", "value", "what"), [
    (key, value, what) for keys, _, bad, what in _RULES for key in keys for value in bad])
def test_systemd_values_refused(tmp_path: Path, key: str, value: str, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, key, value)
    assert info.value.key == key
    assert info.value.problem == f"{value!r} is not {what}"


@pytest.mark.parametrize(("value", "literal"), [
    (True, "true"), (False, "false"), (8, "8"), (0.7, "0.7"), ("a\"b", '"a\\"b"'), ("", '""')])
def test_defaults_as_toml_literals(value: Any, literal: str) -> None:
    assert config._toml_literal(value) == literal


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "wabridge.toml"
    path.write_text("[worker\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(info.value).startswith(f"config key '(file)': {path} is not valid TOML: ")
    assert info.value.key == "(file)"
