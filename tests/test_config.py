"""Configuration: defaults, file, environment, validation, generated docs."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from wabridge import config
from wabridge.config import Config, load
from wabridge.errors import ConfigError, ExitCode
from wabridge.prices import Price, parse_prices


@pytest.fixture
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    absent = tmp_path / "etc" / "wabridge.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", absent)
    return absent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wabridge.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _all_keys() -> list[str]:
    return [
        f"{section.name}.{f.name}"
        for section in fields(Config)
        for f in fields(section.default_factory)  # type: ignore[arg-type]
    ]


def test_defaults_when_the_default_file_is_absent(no_default_file: Path) -> None:
    assert not no_default_file.exists()
    cfg = load(environ={})
    assert cfg == Config()
    assert cfg.worker.backend == "neonize"
    assert cfg.controller.control_plane == "auto"
    assert cfg.claude.max_processes == 2


def test_the_default_path_is_read_when_present(no_default_file: Path) -> None:
    no_default_file.parent.mkdir()
    no_default_file.write_text('[worker]\nbackend = "sim"\n')
    assert load(environ={}).worker.backend == "sim"


def test_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load(missing, environ={})
    assert str(missing) in str(info.value)
    assert info.value.exit_code is ExitCode.CONFIG
    assert int(info.value.exit_code) == 78


def test_missing_path_from_wabridge_config_env_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load(environ={"WABRIDGE_CONFIG": str(missing)})


def test_wabridge_config_env_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[log]\nlevel = 'debug'\n")
    assert load(environ={"WABRIDGE_CONFIG": str(path)}).log.level == "debug"


def test_unreadable_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load(tmp_path, environ={})  # a directory


def test_bad_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, "[worker\nbackend = \n")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        load(path, environ={})
    assert str(path) in str(info.value)


def test_file_values_are_loaded(tmp_path: Path) -> None:
    path = _write(tmp_path, """
[worker]
backend = "sim"
qr_timeout = 30          # an int is fine for a float key
[claude]
tools = true
max_processes = 4
[conversation]
debounce = 0.0
""")
    cfg = load(path, environ={})
    assert cfg.worker.backend == "sim"
    assert cfg.worker.qr_timeout == 30.0
    assert isinstance(cfg.worker.qr_timeout, float)
    assert cfg.claude.tools is True
    assert cfg.claude.max_processes == 4
    assert cfg.conversation.debounce == 0.0
    # untouched keys keep their defaults
    assert cfg.worker.sim_url == Config().worker.sim_url


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[wokrer]\nbackend = 'sim'\n", "'wokrer': unknown section"),
        ("[worker]\nbakend = 'sim'\n", "'worker.bakend': unknown key"),
        ("top = 1\n", "'top': unknown section"),
        ("worker = 5\n", "'worker': must be a table"),
    ],
)
def test_unknown_names_are_named(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, text), environ={})
    assert named in str(info.value)


def test_unknown_key_lists_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, "[worker]\nbakend = 'sim'\n"), environ={})
    assert "backend" in info.value.allowed
    assert "qr_timeout" in info.value.allowed


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[worker]\nbackend = 5", "worker.backend", "expected str, got int"),
        ("[worker]\nqr_timeout = 'long'", "worker.qr_timeout", "expected float, got str"),
        ("[worker]\nqr_timeout = true", "worker.qr_timeout", "expected float, got bool"),
        ("[claude]\ntools = 1", "claude.tools", "expected bool, got int"),
        ("[claude]\ntools = 'yes'", "claude.tools", "expected bool, got str"),
        ("[claude]\nmax_processes = 2.0", "claude.max_processes", "expected int, got float"),
        ("[claude]\nmax_processes = true", "claude.max_processes", "expected int, got bool"),
        ("[worker]\nbackend = ['sim']", "worker.backend", "expected str, got list"),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, text), environ={})
    assert info.value.key == key
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[worker]\nbackend = 'baileys'", "worker.backend", "is not one of neonize, sim"),
        ("[worker]\nqr_timeout = 4.9", "worker.qr_timeout", "below 5.0"),
        ("[worker]\nqr_timeout = nan", "worker.qr_timeout", "below 5.0"),
        ("[claude]\nmax_processes = 0", "claude.max_processes", "not within 1..64"),
        ("[claude]\nmax_processes = 65", "claude.max_processes", "not within 1..64"),
        ("[claude]\nmax_retries = -1", "claude.max_retries", "not within 0..10"),
        ("[conversation]\nreply_limit = 199", "conversation.reply_limit", "not within 200..65000"),
        ("[conversation]\ndebounce = 30.5", "conversation.debounce", "not within 0.0..30.0"),
        ("[controller]\nmetrics_listen = 'localhost'", "controller.metrics_listen",
         "is not HOST:PORT"),
        ("[controller]\nmetrics_listen = ':9464'", "controller.metrics_listen",
         "is not HOST:PORT"),
        ("[controller]\nmetrics_listen = 'h:70000'", "controller.metrics_listen",
         "is not HOST:PORT"),
        ("[controller]\nmetrics_listen = 'h:0'", "controller.metrics_listen", "is not HOST:PORT"),
        ("[log]\nlevel = 'trace'", "log.level", "is not one of debug"),
        ("[claude]\nengine = 'sdk'", "claude.engine", "'sdk' is not one of cli, api"),
        ("[claude]\nengine = 'api'\ntools = true", "claude.engine", "api has no tools"),
        ("[claude]\nengine = 'api'\nmodel = 'claude-new'", "claude.api_prices",
         "no price for the model 'claude-new'"),
        ("[claude]\napi_prices = 'm=3'", "claude.api_prices", "'m=3' is not model=input/output"),
        ("[claude]\napi_prices = 'm=3/x'", "claude.api_prices", "is not model=input/output"),
        ("[claude]\napi_prices = '=3/15'", "claude.api_prices", "is not model=input/output"),
        ("[claude]\napi_prices = 'm=-1/15'", "claude.api_prices", "is not model=input/output"),
        ("[claude]\napi_max_tokens = 0", "claude.api_max_tokens", "not within 1..128000"),
    ],
)
def test_out_of_range(tmp_path: Path, text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, text), environ={})
    assert info.value.key == key
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("[claude]\nmax_processes = 1", lambda c: c.claude.max_processes == 1),
        ("[claude]\nmax_processes = 64", lambda c: c.claude.max_processes == 64),
        ("[worker]\nqr_timeout = 5", lambda c: c.worker.qr_timeout == 5.0),
        ("[controller]\nmetrics_listen = ''", lambda c: c.controller.metrics_listen == ""),
        ("[controller]\nmetrics_listen = '[::1]:9464'",
         lambda c: c.controller.metrics_listen == "[::1]:9464"),
    ],
)
def test_boundaries_are_accepted(tmp_path: Path, text: str, check: object) -> None:
    cfg = load(_write(tmp_path, text), environ={})
    assert callable(check) and check(cfg)


# --- environment ---------------------------------------------------------------------------


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[worker]\nbackend = 'neonize'\nqr_timeout = 60\n")
    cfg = load(path, environ={"WABRIDGE__WORKER__BACKEND": "sim"})
    assert cfg.worker.backend == "sim"
    assert cfg.worker.qr_timeout == 60.0  # the file still counts for other keys


@pytest.mark.parametrize(
    ("var", "text", "get", "expected"),
    [
        ("WABRIDGE__CLAUDE__TOOLS", "true", lambda c: c.claude.tools, True),
        ("WABRIDGE__CLAUDE__TOOLS", "1", lambda c: c.claude.tools, True),
        ("WABRIDGE__CLAUDE__TOOLS", " Yes ", lambda c: c.claude.tools, True),
        ("WABRIDGE__CLAUDE__TOOLS", "on", lambda c: c.claude.tools, True),
        ("WABRIDGE__CLAUDE__TOOLS", "false", lambda c: c.claude.tools, False),
        ("WABRIDGE__CLAUDE__TOOLS", "0", lambda c: c.claude.tools, False),
        ("WABRIDGE__CLAUDE__TOOLS", "OFF", lambda c: c.claude.tools, False),
        ("WABRIDGE__CLAUDE__MAX_PROCESSES", "7", lambda c: c.claude.max_processes, 7),
        ("WABRIDGE__WORKER__QR_TIMEOUT", "12.5", lambda c: c.worker.qr_timeout, 12.5),
        ("WABRIDGE__WORKER__QR_TIMEOUT", "30", lambda c: c.worker.qr_timeout, 30.0),
        ("WABRIDGE__CLAUDE__MODEL", "claude-x", lambda c: c.claude.model, "claude-x"),
        ("wabridge__claude__model", "ignored: the prefix is case-sensitive",
         lambda c: c.claude.model, ""),
        ("WABRIDGE__claude__Model", "keys are case-insensitive", lambda c: c.claude.model,
         "keys are case-insensitive"),
    ],
)
def test_env_coercion(
    no_default_file: Path, var: str, text: str, get: object, expected: object
) -> None:
    cfg = load(environ={var: text})
    assert callable(get)
    value = get(cfg)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("var", "text", "named"),
    [
        ("WABRIDGE__CLAUDE__TOOLS", "maybe", "'maybe' is not a boolean"),
        ("WABRIDGE__CLAUDE__MAX_PROCESSES", "2.5", "'2.5' is not an integer"),
        ("WABRIDGE__CLAUDE__MAX_PROCESSES", "many", "'many' is not an integer"),
        ("WABRIDGE__WORKER__QR_TIMEOUT", "soon", "'soon' is not a number"),
        ("WABRIDGE__CLAUDE__MAX_PROCESSES", "100", "not within 1..64"),
        ("WABRIDGE__WORKER__BACKEND", "telegram", "is not one of neonize, sim"),
        ("WABRIDGE__WORKER", "sim", "'WABRIDGE__WORKER': does not name a config key"),
        ("WABRIDGE__", "x", "does not name a config key"),
        ("WABRIDGE__NOPE__BACKEND", "x", "'WABRIDGE__NOPE__BACKEND': does not name"),
        ("WABRIDGE__WORKER__BAKEND", "sim", "'worker.bakend': unknown key (from environment)"),
    ],
)
def test_bad_env(no_default_file: Path, var: str, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={var: text})
    assert named in str(info.value)


def test_env_override_of_a_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = _write(tmp_path, "worker = 5\n")
    with pytest.raises(ConfigError, match="must be a table"):
        load(path, environ={"WABRIDGE__WORKER__BACKEND": "sim"})


def test_os_environ_is_the_default_source(
    no_default_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WABRIDGE__WORKER__BACKEND", "sim")
    assert load().worker.backend == "sim"


def test_with_overrides() -> None:
    base = Config()
    changed = config.with_overrides(base, "claude", model="m", max_processes=3)
    assert changed.claude.model == "m"
    assert changed.claude.max_processes == 3
    assert base.claude.model == ""  # frozen original untouched
    assert changed.worker == base.worker


# --- generated documentation -------------------------------------------------------------

_OPTION_LINE = re.compile(r"^#([a-z_]+) = (.*)$")


def test_example_toml_parses_and_is_all_commented() -> None:
    text = config.example_toml()
    assert tomllib.loads(text) == {
        section.name: {} for section in fields(Config)
    }  # only headers are live


def test_uncommented_example_toml_loads_to_the_defaults(tmp_path: Path) -> None:
    lines = []
    uncommented = set()
    current = ""
    for line in config.example_toml().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        m = _OPTION_LINE.match(line)
        if m:
            uncommented.add(f"{current}.{m.group(1)}")
        lines.append(line[1:] if m else line)
    text = "\n".join(lines)
    parsed = tomllib.loads(text)
    assert uncommented == set(_all_keys())
    assert sum(len(v) for v in parsed.values()) == len(_all_keys())
    assert load(_write(tmp_path, text), environ={}) == Config()


def test_example_toml_escapes_strings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tricky = 'say "hi" \\ then\tgo'
    monkeypatch.setattr(
        config.ClaudeConfig.__dataclass_fields__["system_prompt"], "default", tricky
    )
    lines = [
        line[1:] if _OPTION_LINE.match(line) else line
        for line in config.example_toml().splitlines()
    ]
    assert tomllib.loads("\n".join(lines))["claude"]["system_prompt"] == tricky


def test_reference_markdown_lists_every_key() -> None:
    text = config.reference_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    listed = [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]  # type: ignore[union-attr]
    assert listed == _all_keys()
    assert "| `worker.backend` | `'neonize'` | neonize, sim |" in text
    for row in rows:
        assert row.count("|") == 5, row  # no doc string breaks the table


def test_api_prices_are_parsed_per_model() -> None:
    prices = parse_prices(" claude-a=3/15, claude-b = 0.8/4 ,")
    assert prices == {"claude-a": Price(3.0, 15.0), "claude-b": Price(0.8, 4.0)}
    assert prices["claude-a"].cache_write == pytest.approx(3.75)
    assert prices["claude-a"].cache_read == pytest.approx(0.3)
    default = Config().claude
    assert config.api_model(default) in parse_prices(default.api_prices)


def test_the_api_engine_uses_claude_model_when_set(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, "[claude]\nengine = 'api'\nmodel = 'x'\n"
                                "api_prices = 'x=1/2'"), environ={})
    assert config.api_model(cfg.claude) == "x"


# --- [fleet] -------------------------------------------------------------------------------
_PG = "[storage]\nbackend = 'postgresql'\npostgres_url = 'postgresql://wabridge@db/wabridge'\n"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[fleet]\nenabled = true", "fleet.enabled", "storage.backend is 'sqlite'"),
        (_PG + "[fleet]\nenabled = true\nlease_seconds = 10\nmargin_seconds = 10",
         "fleet.margin_seconds", "not below fleet.lease_seconds"),
        (_PG + "[fleet]\nenabled = true\nrenew_seconds = 25", "fleet.renew_seconds",
         "before its first renewal"),
        ("[fleet]\nlease_seconds = 12\nmargin_seconds = 2\nrenew_seconds = 10",
         "fleet.renew_seconds", "not below fleet.lease_seconds - fleet.margin_seconds (10.0)"),
        ("[fleet]\nheartbeat_seconds = 20", "fleet.host_dead_seconds", "every host would look"),
        ("[fleet]\nlease_seconds = 1", "fleet.lease_seconds", "not within 3.0..3600.0"),
        ("[fleet]\nlease_seconds = 7200", "fleet.lease_seconds", "not within 3.0..3600.0"),
        ("[fleet]\nmax_workers = -1", "fleet.max_workers", "below 0"),
        ("[fleet]\ntick_seconds = 0", "fleet.tick_seconds", "below 0.1"),
    ],
)
def test_fleet_settings_that_cannot_work_are_named(tmp_path: Path, text: str, key: str,
                                                   problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, text), environ={})
    assert info.value.key == key
    assert problem in str(info.value)


def test_fleet_defaults_and_a_valid_fleet(tmp_path: Path) -> None:
    fleet = load(_write(tmp_path, ""), environ={}).fleet
    assert not fleet.enabled
    assert (fleet.lease_seconds, fleet.renew_seconds, fleet.grace_seconds,
            fleet.margin_seconds) == (30.0, 10.0, 10.0, 5.0)
    assert (fleet.heartbeat_seconds, fleet.host_dead_seconds, fleet.max_workers,
            fleet.tick_seconds) == (5.0, 20.0, 0, 2.0)
    cfg = load(_write(tmp_path, _PG + "[fleet]\nenabled = true\nlease_seconds = 6\n"
                                      "margin_seconds = 2\nrenew_seconds = 1"), environ={})
    assert cfg.fleet.enabled and cfg.fleet.lease_seconds == 6.0
