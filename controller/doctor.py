"""``wabridgectl doctor``: checks of the host itself, each with what to do when it fails.

Every check is a function returning a ``Check`` (ok, warn, fail, skip; a message; a fix), so
a new one is a function and a line in ``run``. They read the host (systemctl, the
configuration, the control plane's store or endpoint, the Claude Code binary, the workers'
environment file, free disk space) and ping the controller's admin socket; they change
nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from controller.planes import emulator_host, plane_kind
from wabridge import claude_cli, config, database, postgres
from wabridge.errors import ConfigError, WabridgeError

DEFAULT_WORKER_ENV = "/etc/wabridge/worker.env"
STATE_DIR = "/var/lib/wabridge"
MIN_FREE_BYTES = 1 << 30
T = TypeVar("T")
MARKS = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}


@dataclass
class Check:
    name: str
    status: str  # ok, warn, fail, skip
    message: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "message": self.message,
                "fix": self.fix}


def _run(argv: list[str], timeout: float = 10.0, env: Mapping[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          env=None if env is None else dict(env))


def check_systemd() -> Check:
    fix = ("wabridge needs systemd as PID 1 with its D-Bus API (not a container without "
           "systemd); check `systemctl status`")
    try:
        proc = _run(["systemctl", "show", "--property=Version", "--value"])
    except FileNotFoundError:
        return Check("systemd", "fail", "systemctl not found", fix)
    except subprocess.TimeoutExpired:
        return Check("systemd", "fail", "systemctl did not answer within 10 s", fix)
    if proc.returncode != 0 or not proc.stdout.strip():
        why = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        return Check("systemd", "fail", f"systemd unreachable over D-Bus: {why}", fix)
    return Check("systemd", "ok", f"systemd {proc.stdout.strip()} reachable over D-Bus")


def check_controller_unit(systemd_ok: bool) -> Check:
    unit = "wabridge-controller.service"
    if not systemd_ok:
        return Check("controller", "skip", f"cannot tell whether {unit} runs: no systemd")
    fix = (f"systemctl enable --now {unit}; if it keeps failing: "
           f"journalctl -u {unit} -n 50")
    try:
        proc = _run(["systemctl", "is-active", unit])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("controller", "fail", f"systemctl is-active failed: {exc}", fix)
    state = proc.stdout.strip() or "unknown"
    if state != "active":
        return Check("controller", "fail", f"{unit} is {state}", fix)
    return Check("controller", "ok", f"{unit} is active")


def check_config() -> tuple[Check, config.Config]:
    where = os.environ.get("WABRIDGE_CONFIG", str(config.DEFAULT_PATH))
    try:
        cfg = config.load()
    except ConfigError as exc:
        return Check("config", "fail", f"{where}: {exc}",
                     f"fix {where} (`python3 -m wabridge.config` prints every key with its "
                     "default); the other checks use the defaults"), config.Config()
    return Check("config", "ok", f"{where} is valid"), cfg


def check_plane(cfg: config.Config, plane: str | None) -> Check:
    """``plane``: what the controller says it uses (None: unknown, guess from the config)."""
    choice = plane or plane_kind(cfg)
    if choice == "local":
        db = Path(cfg.controller.local_db)
        fix = ("the controller creates it when it starts with the local control plane: "
               "systemctl restart wabridge-controller")
        if not db.exists():
            return Check("control_plane", "fail", f"local store {db} does not exist", fix)
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                    timeout=5)) as conn:
                tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.Error as exc:
            return Check("control_plane", "fail", f"local store {db} unreadable: {exc}",
                         f"move the broken file aside and restart the controller; {fix}")
        return Check("control_plane", "ok", f"local store {db} readable ({tables} tables)")
    if choice == "postgres":
        return check_postgres_plane(cfg)
    target = emulator_host(cfg) or "firestore.googleapis.com:443"
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        return Check("control_plane", "fail", f"Firestore at {target} unreachable: {exc}",
                     "check the network/proxy, or firebase.emulator_host")
    return Check("control_plane", "ok", f"Firestore at {target} reachable (credentials are "
                 "checked by the controller: wabridgectl status shows its errors)")


def _ask_database(cfg: config.Config, name: str, where: str, ask: Callable[[Any], T]
                  ) -> T | Check:
    """``ask`` on the controller's own connection, or the failed check ``name`` saying why
    (``where``: the server, for the message)."""
    from controller import pg_roles  # noqa: PLC0415 (psycopg only when used)

    try:
        with pg_roles.admin_connect(cfg) as admin:
            return ask(admin)
    except Exception as exc:  # noqa: BLE001 (psycopg's errors, shown to the operator)
        return Check(name, "fail", f"{where}: {str(exc).strip()}",
                     "check the server, storage.postgres_url and the controller's password "
                     f"in {pg_roles.CONTROLLER_PASSWORD_FILE}")


def check_postgres_plane(cfg: config.Config) -> Check:
    """``controller.control_plane = postgres``: the controller's role reaches the database and
    the plane's schema is one this wabridge understands."""
    from controller import pgplane  # noqa: PLC0415 (psycopg only when used)

    where = f"PostgreSQL plane {postgres.describe(cfg.storage.postgres_url)} schema " \
            f"{pgplane.SCHEMA}"
    found = _ask_database(cfg, "control_plane", where, pgplane.health)
    if isinstance(found, Check):
        return found
    version, accounts = found
    if version is None:
        return Check("control_plane", "fail", f"{where} does not exist",
                     "the controller creates it when it starts with control_plane = postgres "
                     "(its role needs CREATE on the database): systemctl restart "
                     "wabridge-controller")
    if version > pgplane.SCHEMA_VERSION:
        return Check("control_plane", "fail", f"{where} has version {version}, newer than "
                     f"this wabridge understands ({pgplane.SCHEMA_VERSION})",
                     "upgrade wabridge on this host to the fleet's version")
    return Check("control_plane", "ok", f"{where} version {version}, {accounts} accounts")


def check_database(cfg: config.Config) -> Check:
    """``storage.backend = postgresql``: the server answers the controller's role, which may
    make roles and schemas; no account role has more than its schema; the accounts' schema
    versions (each worker migrates its own at start)."""
    if cfg.storage.backend != "postgresql":
        return Check("database", "skip", "storage.backend = sqlite (a file per account)")
    from controller import pg_roles  # noqa: PLC0415 (psycopg only when used)

    target = postgres.describe(cfg.storage.postgres_url)
    answer = _ask_database(cfg, "database", target, pg_roles.health)
    if isinstance(answer, Check):
        return answer
    problems, versions = answer
    known = database.STORE_SCHEMA_VERSION
    newer = pg_roles.newer_schemas(versions, known)
    if problems or newer:
        return Check("database", "fail", f"{target}: " + "; ".join(problems + newer),
                     "README, PostgreSQL: ALTER ROLE <controller> CREATEROLE; GRANT CREATE "
                     "ON DATABASE <db> TO <controller>; ALTER ROLE <account> NOSUPERUSER ...; "
                     "REVOKE ... FROM <grantee> for a grant on an account's schema")
    found = sorted(set(versions.values()))
    older = sum(1 for v in versions.values() if 0 <= v < known)
    return Check("database", "ok", f"{target}: {len(versions)} account schemas"
                 + (f", schema versions {', '.join(map(str, found))}" if found else "")
                 + f" (this wabridge: {known}"
                 + (f"; {older} older, migrated when their worker starts" if older else "")
                 + "); account roles hold nothing beyond their own schema")


def claude_path(cfg: config.Config) -> Path | None:
    return claude_cli.cli_path(cfg.claude.cli_path)


def check_claude(cfg: config.Config) -> Check:
    path = claude_path(cfg)
    fix = "set claude.cli_path to the Claude Code binary, or empty for the bundled one"
    if path is None:
        return Check("claude", "fail", "claude_agent_sdk is not installed and "
                     "claude.cli_path is empty", f"reinstall wabridge, or {fix}")
    if not path.is_file():
        return Check("claude", "fail", f"Claude Code binary {path} does not exist", fix)
    if not os.access(path, os.X_OK):
        return Check("claude", "fail", f"Claude Code binary {path} is not executable",
                     f"chmod a+rx {path}, or {fix}")
    with tempfile.TemporaryDirectory(prefix="wabridgectl-claude-") as home:
        env = {"PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
               "HOME": home, "LANG": "C.UTF-8", **claude_cli.OFFLINE_ENV,
               "CLAUDE_CONFIG_DIR": home, "TMPDIR": home}
        try:
            proc = _run([str(path), "--version"], timeout=30, env=env)
        except subprocess.TimeoutExpired:
            return Check("claude", "fail", f"{path} --version did not finish in 30 s", fix)
        except OSError as exc:
            return Check("claude", "fail", f"{path} cannot run: {exc.strerror or exc}", fix)
    version = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not version[:1].isdigit():
        why = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")[:200]
        return Check("claude", "fail", f"{path} --version failed: {why}", fix)
    return Check("claude", "ok", f"{path}: {version}")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments, quotes)."""
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def check_api_key() -> Check:
    path = Path(os.environ.get("WABRIDGE_WORKER_ENV", DEFAULT_WORKER_ENV))
    fix = (f"add ANTHROPIC_API_KEY=sk-ant-... to {path} (mode 0600), then "
           "wabridgectl restart <user> for running workers")
    try:
        values = read_env_file(path)
    except FileNotFoundError:
        values, where = {}, f"{path} does not exist"
    except OSError as exc:
        return Check("api_key", "fail", f"{path} unreadable: {exc.strerror}", fix)
    else:
        where = f"{path} has none"
    if values.get("ANTHROPIC_API_KEY", "").strip():
        return Check("api_key", "ok", f"ANTHROPIC_API_KEY set in {path}")
    if os.environ.get("ANTHROPIC_API_KEY", "").strip():
        return Check("api_key", "ok", f"ANTHROPIC_API_KEY set in the environment ({where}; "
                     "workers only see it if their unit passes it on)")
    return Check("api_key", "fail", f"no ANTHROPIC_API_KEY: {where} and the environment has "
                 "none", fix)


def check_disk(path: str = STATE_DIR) -> Check:
    target = Path(path)
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        free = shutil.disk_usage(target).free
    except OSError as exc:
        return Check("disk", "fail", f"cannot stat {target}: {exc.strerror}", "")
    text = f"{human_bytes(free)} free for {path}"
    if free < MIN_FREE_BYTES:
        return Check("disk", "warn", f"only {text}",
                     "free space there: every account keeps its WhatsApp keys and "
                     "conversations under it")
    return Check("disk", "ok", text)


def human_bytes(value: object) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return "-"
    size = float(value)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return "-"  # pragma: no cover


class AdminPing(Protocol):
    """The admin-socket client as far as ``doctor`` uses it (``controller.ctl.AdminClient``)."""

    path: str

    def call(self, op: str, **args: Any) -> dict[str, Any]: ...


def check_admin(client: AdminPing) -> tuple[Check, dict[str, Any] | None]:
    try:
        info = client.call("ping")
    except WabridgeError as exc:  # controller.ctl.CtlError
        fix = ("run as root or join the admin group: usermod -aG wabridge-admin $USER, "
               "then log in again") if exc.code == "forbidden" else (
            "systemctl start wabridge-controller; see journalctl -u wabridge-controller")
        return Check("admin_socket", "fail", exc.message, fix), None
    return Check("admin_socket", "ok", f"{client.path}: controller on {info.get('host')}, "
                 f"{info.get('sessions')} accounts, {info.get('linked')} workers linked, "
                 f"plane {info.get('plane')}"), info


def run(client: AdminPing, *, configured_socket: bool) -> list[Check]:
    """Every check, in the order shown. ``configured_socket``: ping the admin socket the
    configuration names (no ``--socket`` was given)."""
    systemd = check_systemd()
    controller = check_controller_unit(systemd.status == "ok")
    conf, cfg = check_config()
    if configured_socket:
        client.path = cfg.controller.admin_socket
    admin, info = check_admin(client)
    plane = check_plane(cfg, str(info["plane"]) if info and info.get("plane") else None)
    return [systemd, controller, conf, plane, check_database(cfg), check_claude(cfg),
            check_api_key(), check_disk(), admin]


def text(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{MARKS[c.status]} {c.name.ljust(width)}  {c.message}\n")
        if c.fix and c.status in ("fail", "warn"):
            lines.append(f"       {' ' * width}  fix: {c.fix}\n")
    return "".join(lines)
