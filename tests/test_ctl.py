"""wabridgectl (controller/ctl.py) against the admin server over a fake controller facade."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from fakes.admin_facade import FakeFacade, FakeUnit, ThreadedAdmin, socket_dir
from PIL import Image

from controller import ctl
from controller import doctor as host_checks
from wabridge import config, qr
from wabridge.status import DocStatus

REPO = Path(__file__).resolve().parent.parent
ROW_KEYS = {"host", "user", "status", "detail", "phone", "unit", "sub_state", "pid", "restarts",
            "memory_bytes", "linked", "chats", "claude_processes", "cost_today_usd", "error"}
# A code shaped like WhatsApp's (ref, noise key, identity key, adv secret), ~150 characters.
WA_CODE = ("2@Xq3vH1kz0mJ8pL5aR7sT9uW2yB4cD6eF8gH0iJ2kL4mN6oP8qR0sT2uV4wX6yZ8==,"
           "Qm9pZ2h0LW5vaXNlLWtleS1mb3ItdGVzdHM=,SWRlbnRpdHkta2V5LWZvci10ZXN0cw==,"
           "QWR2LXNlY3JldA==")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with socket_dir() as path:
        yield path


@pytest.fixture
def facade() -> FakeFacade:
    f = FakeFacade()
    f.put("alice", {"status": "connected", "phone": "15550001111",
                    "metrics": {"chats": 3, "claudeProcesses": 1, "costTodayUsd": 0.125}},
          FakeUnit())
    f.put("bob", {"status": "crashed", "error": {"code": "crashed",
                                                 "message": "worker exited with code 1"}},
          FakeUnit(active_state="failed", sub_state="failed", main_pid=0, n_restarts=5,
                   memory_bytes=None))
    f.linked_users.add("alice")
    f.message_log["alice"] = [
        {"chatId": "15550002222@s.whatsapp.net", "direction": "in", "text": "hi", "ts": 100.0},
        {"chatId": "15550002222@s.whatsapp.net", "direction": "out", "text": "hello",
         "ts": 101.0},
    ]
    return f


@pytest.fixture
def served(sockdir: Path, facade: FakeFacade) -> Iterator[ThreadedAdmin]:
    with ThreadedAdmin(sockdir / "admin.sock", facade, group="") as srv:
        yield srv


@pytest.fixture(autouse=True)
def _config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WABRIDGE_CONFIG", "/dev/null")
    for var in list(os.environ):
        if var.startswith("WABRIDGE__"):
            monkeypatch.delenv(var)
    with structlog.testing.capture_logs():  # the server's log lines stay off our stdout
        yield


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = ctl.main(list(argv))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def sock(srv: ThreadedAdmin) -> list[str]:
    return ["--socket", str(srv.path)]


# --- status, chats, simple ops ------------------------------------------------------------------


def test_status_json_shape(served: ThreadedAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *sock(served), "status", "--json")
    assert code == ctl.OK
    doc = json.loads(out)
    assert list(doc) == ["users"]
    assert [r["user"] for r in doc["users"]] == ["alice", "bob"]
    assert all(set(r) == ROW_KEYS for r in doc["users"])
    alice = doc["users"][0]
    assert (alice["status"], alice["phone"], alice["claude_processes"],
            alice["cost_today_usd"]) == ("connected", "15550001111", 1, 0.125)
    # --json before the command name works too
    code, out2, _ = run(capsys, "--json", *sock(served), "status", "bob")
    assert code == ctl.OK
    assert [r["user"] for r in json.loads(out2)["users"]] == ["bob"]


def test_status_table(served: ThreadedAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *sock(served), "status")
    assert code == ctl.OK
    header, alice, bob = out.splitlines()
    assert header.split() == ["USER", "STATUS", "PHONE", "UNIT", "PID", "RESTARTS", "MEMORY",
                              "CHATS", "CLAUDE", "COST", "TODAY", "ERROR"]
    assert alice.split() == ["alice", "connected", "+15550001111", "active", "4242", "0",
                             "150.0M", "3", "1", "$0.1250", "-"]
    assert bob.split()[:4] == ["bob", "crashed", "-", "failed"]
    assert bob.endswith("crashed: worker exited with code 1")
    code, out, _ = run(capsys, *sock(served), "status", "bob")
    assert "last error: crashed: worker exited with code 1" in out


def test_an_invalid_id_neither_pads_the_table_nor_moves_the_cursor(
    facade: FakeFacade, served: ThreadedAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    long_id, escape = "x" * 1400, "evil\x1b[2Jid"
    served.call(lambda: facade.put(long_id, {"status": "error",
                                              "error": {"code": "bad_user_id"}}))
    served.call(lambda: facade.put(escape, {"status": "error"}))
    code, out, _ = run(capsys, *sock(served), "status")
    assert code == ctl.OK
    assert max(len(line) for line in out.splitlines()) < 200
    assert "x" * 37 + "..." in out and "x" * 41 not in out
    assert "\x1b" not in out and "evil\\x1b[2Jid" in out
    # --json keeps the ids as they are
    code, out, _ = run(capsys, *sock(served), "status", "--json")
    assert {r["user"] for r in json.loads(out)["users"]} >= {long_id, escape}


@pytest.mark.parametrize("user", ["..", ".", "__name__", "a b", "a/b", "x" * 129])
def test_link_with_an_id_no_document_can_have_is_a_usage_error(
    served: ThreadedAdmin, capsys: pytest.CaptureFixture[str], user: str
) -> None:
    code, out, err = run(capsys, *sock(served), "link", user)
    assert code == ctl.USAGE, (out, err)
    assert err.startswith("wabridgectl: user id") and "Error" not in err


def test_status_of_an_unknown_user_fails(
    served: ThreadedAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *sock(served), "status", "carol")
    assert code == ctl.FAILED
    assert err == "wabridgectl: no account for user 'carol' (wabridgectl status lists them)\n"
    code, out, err = run(capsys, *sock(served), "status", "carol", "--json")
    assert code == ctl.FAILED
    assert json.loads(out) == {"error": {
        "code": "unknown_user",
        "message": "no account for user 'carol' (wabridgectl status lists them)"}}


def test_unlink_restart_reset_chats(
    served: ThreadedAdmin, facade: FakeFacade, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, *sock(served), "unlink", "bob")[:2] == (
        ctl.OK, "unlink requested for bob (destroy_requested)\n")
    assert run(capsys, *sock(served), "restart", "alice")[0] == ctl.OK
    assert [(u, s) for u, s, _ in facade.requests] == [
        ("bob", DocStatus.DESTROY_REQUESTED), ("alice", DocStatus.RESTART_REQUESTED)]

    code, out, _ = run(capsys, *sock(served), "reset", "alice", "+15550002222")
    assert code == ctl.OK and "15550002222@s.whatsapp.net" in out
    assert facade.commands[0][1].args == {"chat_id": "15550002222@s.whatsapp.net"}
    code, _, err = run(capsys, *sock(served), "reset", "bob", "15550002222")
    assert code == ctl.FAILED and "not connected to the controller" in err

    code, out, _ = run(capsys, *sock(served), "chats", "alice", "--json")
    assert code == ctl.OK
    assert json.loads(out) == {"user": "alice", "source": "message_log", "chats": [
        {"chat": "15550002222@s.whatsapp.net", "messages": 2, "in": 1, "out": 1,
         "last_ts": 101.0, "last_direction": "out", "last_text": "hello"}]}
    code, out, _ = run(capsys, *sock(served), "chats", "alice")
    assert out.splitlines()[0].split() == ["CHAT", "MESSAGES", "IN", "OUT", "LAST", "LAST",
                                           "MESSAGE"]
    assert "> hello" in out


def test_pause_resume_and_usage(
    served: ThreadedAdmin, facade: FakeFacade, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, *sock(served), "pause", "alice", "+15550002222", "--minutes", "30")
    assert (code, out) == (ctl.OK, "paused: 15550002222@s.whatsapp.net of alice is not "
                                   "answered for 30 min\n")
    code, out, _ = run(capsys, *sock(served), "resume", "alice", "15550002222")
    assert code == ctl.OK and out.startswith("resumed: 15550002222@s.whatsapp.net of alice")
    assert [c.name for _, c in facade.commands] == ["pause_chat", "resume_chat"]
    assert facade.commands[0][1].args == {"chat_id": "15550002222@s.whatsapp.net",
                                          "minutes": "30.0"}

    today = time.strftime("%Y-%m-%d", time.gmtime())
    facade.usage_docs = [{"userId": "alice", "day": today, "turns": 3, "inputTokens": 1200,
                          "outputTokens": 80, "cacheCreationTokens": 0, "cacheReadTokens": 5,
                          "costUsd": 0.0123456, "messagesIn": 4, "messagesOut": 3,
                          "transcriptionSeconds": 2.5}]
    code, out, _ = run(capsys, *sock(served), "usage")
    assert code == ctl.OK
    header, row = out.splitlines()
    assert header.split() == ["user", "day", "turns", "in", "out", "cache_w", "cache_r",
                              "cost_usd", "msg_in", "msg_out", "audio_s"]
    assert row.split() == ["alice", today, "3", "1200", "80", "0", "5", "0.0123", "4", "3",
                           "2.5"]
    code, out, _ = run(capsys, *sock(served), "usage", "alice", "--days", "7", "--json")
    assert json.loads(out)["usage"] == facade.usage_docs


# --- exit codes -----------------------------------------------------------------------------------


def test_usage_errors_exit_2(served: ThreadedAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "frobnicate")[0] == ctl.USAGE
    assert run(capsys, *sock(served), "link")[0] == ctl.USAGE
    code, _, err = run(capsys, *sock(served), "status", "a b")
    assert code == ctl.USAGE and "contains ' '" in err
    code, _, err = run(capsys, *sock(served), "link", "erin", "--pairing-code", "12")
    assert code == ctl.USAGE and "7-15 digits" in err


def test_unreachable_controller_exits_3(
    sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = sockdir / "none.sock"
    code, _, err = run(capsys, "--socket", str(missing), "status")
    assert code == ctl.UNREACHABLE
    assert err == f"wabridgectl: no admin socket at {missing}: is wabridge-controller running?\n"
    import socket as socketlib  # noqa: PLC0415

    stale = sockdir / "stale.sock"
    s = socketlib.socket(socketlib.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens
    code, _, err = run(capsys, "--socket", str(stale), "status")
    assert code == ctl.UNREACHABLE and "nobody listens" in err


def ctl_as_nobody(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m controller.ctl`` as uid 65534, from a world-readable copy of the packages it
    imports: the checkout itself may live where other users cannot enter (a clone under
    /root, a ``mktemp -d`` folder)."""
    with socket_dir() as code:
        for package in ("controller", "wabridge"):
            shutil.copytree(REPO / package, code / package,
                            ignore=shutil.ignore_patterns("__pycache__"))
        for path in code.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        return _ctl_as_nobody(code, socket_path, *args)


def _ctl_as_nobody(code: Path, socket_path: Path, *args: str
                   ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(code), "WABRIDGE_CONFIG": "/dev/null",
           "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable,
         "-m", "controller.ctl", "--socket", str(socket_path), *args],
        capture_output=True, text=True, env=env, cwd="/", timeout=60, check=False)


needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to run wabridgectl as another uid")


@needs_setpriv
def test_forbidden_exits_4(sockdir: Path, facade: FakeFacade) -> None:
    # socket permissions (0660, root's group): connect() is refused
    with ThreadedAdmin(sockdir / "admin.sock", facade, admin_gid=4242) as srv:
        proc = ctl_as_nobody(srv.path, "status")
        assert proc.returncode == ctl.FORBIDDEN, proc.stderr
        assert "permission denied" in proc.stderr and "admin group" in proc.stderr
    # a world-writable socket: the controller's peer-credential check answers forbidden
    with ThreadedAdmin(sockdir / "admin.sock", facade, admin_gid=4242, mode=0o666) as srv:
        proc = ctl_as_nobody(srv.path, "status", "--json")
        assert proc.returncode == ctl.FORBIDDEN, proc.stderr
        assert json.loads(proc.stdout)["error"]["code"] == "forbidden"


# --- link ----------------------------------------------------------------------------------------


def qr_blocks(out: str) -> list[str]:
    """The terminal QR codes in wabridgectl's output (each ends before a "Scan with" line)."""
    lines = out.split("\n")
    blocks = []
    for i, line in enumerate(lines):
        if not line.startswith("Scan with"):
            continue
        j = i
        while j > 0 and lines[j - 1] and set(lines[j - 1]) <= set(" █▀▄"):
            j -= 1
        blocks.append("\n".join(lines[j:i]))
    return blocks


def decode_terminal_qr(block: str, tmp_path: Path, name: str) -> str:
    """Half blocks -> module bitmap -> PNG (pillow) -> zbarimg."""
    rows = block.split("\n")
    width = max(len(r) for r in rows)
    matrix: list[list[bool]] = []
    for row in rows:
        cells = row.ljust(width)
        matrix.append([c in "█▀" for c in cells])  # upper half of the character
        matrix.append([c in "█▄" for c in cells])  # lower half
    scale, border = 8, 4
    image = Image.new("L", ((width + 2 * border) * scale, (len(matrix) + 2 * border) * scale),
                      255)
    for y, line in enumerate(matrix):
        for x, dark in enumerate(line):
            if dark:
                image.paste(0, ((x + border) * scale, (y + border) * scale,
                                (x + border + 1) * scale, (y + border + 1) * scale))
    path = tmp_path / f"{name}.png"
    image.save(path)
    proc = subprocess.run(["zbarimg", "--raw", "-q", str(path)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0, f"zbarimg could not decode {path}: {proc.stderr}"
    return proc.stdout.rstrip("\n")


needs_zbar = pytest.mark.skipif(shutil.which("zbarimg") is None,
                                reason="zbarimg missing: apt-get install zbar-tools")


@needs_zbar
def test_link_prints_rotating_qr_codes_that_decode(
    served: ThreadedAdmin, facade: FakeFacade, capsys: pytest.CaptureFixture[str],
    tmp_path: Path
) -> None:
    facade.scripts[DocStatus.CREATE_REQUESTED] = [
        (0.02, {"status": "starting"}),
        (0.02, {"status": "waiting_qr", "qrRaw": "sim-qr:0123456789abcdef01234567"}),
        (0.05, {"qrRaw": WA_CODE}),
        (0.05, {"status": "connected", "phone": "15550009999", "qrRaw": None}),
    ]
    code, out, err = run(capsys, *sock(served), "link", "erin", "--timeout", "20")
    assert code == ctl.OK, err
    assert out.rstrip().endswith("connected as +15550009999")
    blocks = qr_blocks(out)
    assert len(blocks) == 2
    assert blocks[0] == qr.to_terminal("sim-qr:0123456789abcdef01234567")
    decoded = [decode_terminal_qr(b, tmp_path, f"qr{i}") for i, b in enumerate(blocks)]
    assert decoded == ["sim-qr:0123456789abcdef01234567", WA_CODE]
    assert "\x1b[" not in out  # no colours when stdout is not a terminal
    assert facade.requests[0][1] is DocStatus.CREATE_REQUESTED


def test_qr_block_is_black_on_white_on_a_terminal() -> None:
    text = ctl.qr_block("x", color=True)
    assert all(line.startswith("\x1b[30;107m") and line.endswith("\x1b[0m")
               for line in text.splitlines())


def test_link_with_a_pairing_code(
    served: ThreadedAdmin, facade: FakeFacade, capsys: pytest.CaptureFixture[str]
) -> None:
    facade.scripts[DocStatus.PAIRING_REQUESTED] = [
        (0.02, {"status": "pairing", "qrRaw": "sim-qr:ignored"}),
        (0.02, {"pairingCode": "ABCD-EFGH"}),
        (0.02, {"status": "connected", "phone": "15550003333"}),
    ]
    code, out, err = run(capsys, *sock(served), "link", "erin", "--pairing-code",
                         "+1 555 000 3333", "--timeout", "20")
    assert code == ctl.OK, err
    assert "    ABCD-EFGH\n" in out and "connected as +15550003333" in out
    assert "Scan with" not in out  # no QR when pairing by phone number
    assert facade.requests[0][2]["pairingPhone"] == "15550003333"


def test_link_json_lines(
    served: ThreadedAdmin, facade: FakeFacade, capsys: pytest.CaptureFixture[str]
) -> None:
    facade.scripts[DocStatus.CREATE_REQUESTED] = [
        (0.02, {"status": "waiting_qr", "qrRaw": "sim-qr:1"}),
        (0.02, {"status": "connected", "phone": "15550009999"}),
    ]
    code, out, _ = run(capsys, *sock(served), "link", "erin", "--json")
    assert code == ctl.OK
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1] == {"user": "erin", "connected": True, "phone": "15550009999"}
    assert any(e.get("qr") == "sim-qr:1" for e in lines)


def test_link_of_a_connected_account(
    served: ThreadedAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, *sock(served), "link", "alice")[:2] == (
        ctl.OK, "already connected as +15550001111\n")


def test_link_failure_exits_1(
    served: ThreadedAdmin, facade: FakeFacade, capsys: pytest.CaptureFixture[str]
) -> None:
    facade.scripts[DocStatus.CREATE_REQUESTED] = [
        (0.02, {"status": "waiting_qr", "qrRaw": "sim-qr:1"}),
        (0.02, {"status": "qr_expired", "statusDetail": "nobody scanned the QR codes"}),
    ]
    code, _, err = run(capsys, *sock(served), "link", "erin", "--timeout", "20")
    assert code == ctl.FAILED
    assert err == ("wabridgectl: link failed: status qr_expired "
                   "(nobody scanned the QR codes)\n")


def test_link_timeout_exits_5(
    served: ThreadedAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, *sock(served), "link", "erin", "--timeout", "0.3")
    assert code == ctl.TIMEOUT
    assert "not connected after 0.3 s" in err


def test_link_when_the_controller_goes_away_exits_3(
    sockdir: Path, facade: FakeFacade, capsys: pytest.CaptureFixture[str]
) -> None:
    with ThreadedAdmin(sockdir / "admin.sock", facade, group="") as srv:
        facade.scripts[DocStatus.CREATE_REQUESTED] = [(0.02, {"status": "starting"})]
        srv.call(lambda: srv.loop.call_later(0.3, lambda: srv.loop.create_task(
            srv.server.close())))
        code, _, err = run(capsys, *sock(srv), "link", "erin", "--timeout", "20")
    assert code == ctl.UNREACHABLE, err
    assert "closed the connection" in err


# --- logs ----------------------------------------------------------------------------------------


def test_journal_argv_ors_the_unit_and_the_user_field() -> None:
    assert ctl.journal_argv("alice", follow=True, lines=50) == [
        "journalctl", "--lines=50", "--follow", "--no-hostname",
        "_SYSTEMD_UNIT=wabridge-worker@alice.service", "+",
        "UNIT=wabridge-worker@alice.service", "_PID=1", "+", "USER_ID=alice"]
    assert ctl.journal_argv("a:b")[2] == "_SYSTEMD_UNIT=wabridge-worker@a:b.service"


def test_logs_execs_journalctl(tmp_path: Path) -> None:
    fake = tmp_path / "journalctl"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "WABRIDGE_CONFIG": "/dev/null"}
    proc = subprocess.run([sys.executable, "-m", "controller.ctl", "logs", "alice", "-f"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ctl.journal_argv("alice", follow=True)[1:]


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="no journalctl")
def test_journalctl_accepts_the_match_expression() -> None:
    proc = subprocess.run([*ctl.journal_argv("alice", lines=1), "--no-pager", "-q"],
                          capture_output=True, text=True, timeout=60, check=False)
    for complaint in ("Invalid", "Failed to add", "can only be used between terms"):
        assert complaint not in proc.stderr, proc.stderr


# --- doctor --------------------------------------------------------------------------------------


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A healthy host as far as files go: valid config, API key, local store."""
    db = tmp_path / "control.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
    config = tmp_path / "wabridge.toml"
    config.write_text(f'[controller]\ncontrol_plane = "local"\nlocal_db = "{db}"\n')
    env = tmp_path / "worker.env"
    env.write_text("# workers\nANTHROPIC_BASE_URL=http://127.0.0.1:1\n"
                   "ANTHROPIC_API_KEY='sk-ant-test'\n")
    monkeypatch.setenv("WABRIDGE_CONFIG", str(config))
    monkeypatch.setenv("WABRIDGE_WORKER_ENV", str(env))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    return {"config": config, "env": env, "db": db}


def doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *argv, "doctor", "--json")
    doc = json.loads(out)
    assert [c["name"] for c in doc["checks"]] == [
        "systemd", "controller", "config", "control_plane", "database", "claude", "api_key",
        "disk", "admin_socket"]
    assert doc["ok"] is (code == ctl.OK)
    return code, {c["name"]: c for c in doc["checks"]}


def test_doctor_on_a_healthy_host(
    served: ThreadedAdmin, host: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, checks = doctor(capsys, *sock(served))
    assert checks["config"] == {"name": "config", "status": "ok", "fix": "",
                                "message": f"{host['config']} is valid"}
    assert checks["control_plane"]["status"] == "ok"
    assert checks["control_plane"]["message"] == f"local store {host['db']} readable (1 tables)"
    assert checks["api_key"]["message"] == f"ANTHROPIC_API_KEY set in {host['env']}"
    assert checks["admin_socket"]["status"] == "ok"
    assert "controller on testhost, 2 accounts, 1 workers linked" in checks[
        "admin_socket"]["message"]
    assert checks["disk"]["status"] in ("ok", "warn")
    claude = host_checks.claude_path(config.load())
    if claude is not None and claude.is_file():
        assert checks["claude"]["status"] == "ok", checks["claude"]
        assert "(Claude Code)" in checks["claude"]["message"]
    if checks["systemd"]["status"] != "ok":  # no systemd here (CI): said precisely
        assert checks["systemd"]["message"].startswith("systemd unreachable over D-Bus")
        assert checks["controller"]["status"] == "skip"


def test_doctor_text_output(
    served: ThreadedAdmin, host: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    host["env"].write_text("")
    code, out, _ = run(capsys, *sock(served), "doctor")
    assert code == ctl.FAILED
    lines = out.splitlines()
    assert any(line.startswith("[FAIL] api_key") for line in lines)
    assert any("fix: add ANTHROPIC_API_KEY=sk-ant-..." in line for line in lines)
    assert any(line.startswith("[ ok ] config") for line in lines)


def test_doctor_invalid_config(
    served: ThreadedAdmin, host: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    host["config"].write_text('[controller]\ncontrol_plane = "nope"\n')
    code, checks = doctor(capsys, *sock(served))
    assert code == ctl.FAILED
    assert checks["config"]["status"] == "fail"
    assert checks["config"]["message"] == (
        f"{host['config']}: config key 'controller.control_plane': 'nope' is not one of "
        "auto, firestore, local, postgres (allowed: auto, firestore, local, postgres)")
    assert "python3 -m wabridge.config" in checks["config"]["fix"]


def test_doctor_without_an_api_key(
    served: ThreadedAdmin, host: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    host["env"].write_text("# no key\nANTHROPIC_API_KEY=\n")
    code, checks = doctor(capsys, *sock(served))
    assert code == ctl.FAILED
    assert checks["api_key"] == {
        "name": "api_key", "status": "fail",
        "message": f"no ANTHROPIC_API_KEY: {host['env']} has none and the environment has none",
        "fix": f"add ANTHROPIC_API_KEY=sk-ant-... to {host['env']} (mode 0600), then "
               "wabridgectl restart <user> for running workers"}
    host["env"].unlink()
    _, checks = doctor(capsys, *sock(served))
    assert checks["api_key"]["message"] == (
        f"no ANTHROPIC_API_KEY: {host['env']} does not exist and the environment has none")


def test_doctor_with_the_admin_socket_unreachable(
    host: dict[str, Path], sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = sockdir / "admin.sock"
    code, checks = doctor(capsys, "--socket", str(missing))
    assert code == ctl.FAILED
    assert checks["admin_socket"]["status"] == "fail"
    assert checks["admin_socket"]["message"] == (
        f"no admin socket at {missing}: is wabridge-controller running?")
    assert "systemctl start wabridge-controller" in checks["admin_socket"]["fix"]
    # the control plane is then checked from the configuration alone
    assert checks["control_plane"]["status"] == "ok"


def test_doctor_uses_the_configured_admin_socket(
    served: ThreadedAdmin, host: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    host["config"].write_text(host["config"].read_text()
                              + f'admin_socket = "{served.path}"\n')
    _, checks = doctor(capsys)
    assert checks["admin_socket"]["status"] == "ok"


@pytest.mark.parametrize("kind", ["missing", "not_executable", "broken"])
def test_doctor_with_a_bad_claude_binary(
    served: ThreadedAdmin, host: dict[str, Path], capsys: pytest.CaptureFixture[str],
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "claude"
    if kind == "not_executable":
        path.write_text("#!/bin/sh\necho 1.0\n")
    elif kind == "broken":
        path.write_text("#!/bin/sh\necho 'error: cannot find module' >&2\nexit 3\n")
        path.chmod(0o755)
    host["config"].write_text(host["config"].read_text().replace(
        "[controller]", f'[claude]\ncli_path = "{path}"\n[controller]'))
    code, checks = doctor(capsys, *sock(served))
    assert code == ctl.FAILED
    claude = checks["claude"]
    assert claude["status"] == "fail"
    expected = {
        "missing": f"Claude Code binary {path} does not exist",
        "not_executable": f"Claude Code binary {path} is not executable",
        "broken": f"{path} --version failed: error: cannot find module",
    }[kind]
    assert claude["message"] == expected
    assert "claude.cli_path" in claude["fix"]


def test_doctor_claude_runs_with_the_offline_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "claude"
    path.write_text('#!/bin/sh\necho "9.9.9 (Claude Code) $DISABLE_AUTOUPDATER '
                    '$CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC ${ANTHROPIC_API_KEY:-nokey}"\n')
    path.chmod(0o755)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "must-not-leak")
    check = host_checks.check_claude(config.Config(claude=config.ClaudeConfig(cli_path=str(path))))
    assert check.status == "ok"
    assert check.message == f"{path}: 9.9.9 (Claude Code) 1 1 nokey"


def test_doctor_missing_local_store(
    served: ThreadedAdmin, host: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    host["db"].unlink()
    code, checks = doctor(capsys, *sock(served))
    assert code == ctl.FAILED
    assert checks["control_plane"]["message"] == f"local store {host['db']} does not exist"


def test_doctor_guesses_the_plane_as_the_controller_chooses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the controller unreachable, ``doctor`` checks the plane the controller would
    choose: a ``firebase`` credential (systemd's ``LoadCredential=``) means Firestore."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "firebase").write_text("{}")
    for name in ("FIRESTORE_EMULATOR_HOST", "WABRIDGE__FIREBASE__EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    dialled: list[Any] = []

    def no_network(address: Any, timeout: float) -> None:
        dialled.append(address)
        raise OSError("not in tests")

    monkeypatch.setattr(host_checks.socket, "create_connection", no_network)
    check = host_checks.check_plane(config.Config(), None)
    assert dialled == [("firestore.googleapis.com", 443)]
    assert check.message.startswith("Firestore at firestore.googleapis.com:443 unreachable")


def test_doctor_disk_space_below_a_gigabyte_is_a_warning(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_checks, "MIN_FREE_BYTES", 1 << 62)
    check = host_checks.check_disk("/var/lib/wabridge-does-not-exist/x")
    assert check.status == "warn" and check.message.startswith("only ")
    assert check.message.endswith("free for /var/lib/wabridge-does-not-exist/x")


def test_read_env_file(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text('# c\n; c\nexport A=1\nB="two words"\nC=\'3\'\nbroken\n\nD = 4\n')
    assert host_checks.read_env_file(path) == {"A": "1", "B": "two words", "C": "3", "D": "4"}


# --- fleet: hosts, drain, undrain, move ---------------------------------------------------------


@pytest.mark.parametrize("argv", [["hosts"], ["drain", "host-b"], ["undrain", "host-b"],
                                  ["move", "alice", "host-b"]])
def test_fleet_commands_say_fleet_mode_is_off(served: ThreadedAdmin, argv: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *sock(served), *argv)
    assert code == ctl.FAILED
    assert "fleet mode is off" in err and out == ""
    code, out, _ = run(capsys, *sock(served), "--json", *argv)
    assert code == ctl.FAILED
    assert json.loads(out)["error"]["code"] == "fleet_off"


FLEET_HOSTS = [
    {"host": "host-a", "alive": True, "draining": False, "accounts": 2, "max_workers": 40,
     "memory_mb": 2048, "heartbeat_age": 1.25, "started_at": None},
    {"host": "host-b", "alive": False, "draining": True, "accounts": 0, "max_workers": 40,
     "memory_mb": 2048, "heartbeat_age": 75.0, "started_at": None},
]


def test_hosts_table(served: ThreadedAdmin, facade: FakeFacade,
                     capsys: pytest.CaptureFixture[str]) -> None:
    facade.fleet_hosts = [dict(r) for r in FLEET_HOSTS]
    code, out, _ = run(capsys, *sock(served), "hosts")
    assert code == ctl.OK
    lines = out.splitlines()
    assert lines[0].split() == ["HOST", "ALIVE", "DRAINING", "ACCOUNTS", "MAX", "MEMORY",
                                "HEARTBEAT"]
    assert lines[1].split() == ["host-a", "yes", "no", "2", "40", "2.0G", "1.2s", "ago"]
    assert lines[2].split() == ["host-b", "NO", "yes", "0", "40", "2.0G", "75.0s", "ago"]
    code, out, _ = run(capsys, *sock(served), "hosts", "--json")
    assert json.loads(out) == {"hosts": FLEET_HOSTS}


def test_drain_undrain_and_move(served: ThreadedAdmin, facade: FakeFacade,
                                capsys: pytest.CaptureFixture[str]) -> None:
    facade.fleet_hosts = [dict(r) for r in FLEET_HOSTS]
    code, out, _ = run(capsys, *sock(served), "drain", "host-a")
    assert code == ctl.OK and "draining host-a" in out
    assert facade.fleet_hosts[0]["draining"] is True
    code, out, _ = run(capsys, *sock(served), "undrain", "host-a")
    assert code == ctl.OK and "none are pulled back" in out
    assert facade.fleet_hosts[0]["draining"] is False
    code, out, _ = run(capsys, *sock(served), "move", "alice", "host-a")
    assert code == ctl.OK and "moving alice to host-a" in out
    assert facade.pins == {"alice": "host-a"}


@pytest.mark.parametrize(("argv", "code", "word"), [
    (["drain", "host-z"], ctl.FAILED, "unknown_host"),
    (["move", "alice", "host-z"], ctl.FAILED, "unknown_host"),
    (["move", "nobody", "host-a"], ctl.FAILED, "unknown_user"),
    (["move", "bad user", "host-a"], ctl.USAGE, "bad_user_id"),
])
def test_fleet_commands_name_what_is_wrong(served: ThreadedAdmin, facade: FakeFacade,
                                           argv: list[str], code: int, word: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    facade.fleet_hosts = [dict(r) for r in FLEET_HOSTS]
    got, out, _ = run(capsys, *sock(served), "--json", *argv)
    assert got == code
    assert json.loads(out)["error"]["code"] == word
    assert facade.pins == {}


def test_status_shows_the_host_in_a_fleet(served: ThreadedAdmin, facade: FakeFacade,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    facade.change("alice", {"host": "host-a"})
    code, out, _ = run(capsys, *sock(served), "status")
    assert code == ctl.OK and "HOST" not in out  # one host (as without a fleet): no column
    facade.change("bob", {"host": "host-b"})
    code, out, _ = run(capsys, *sock(served), "status")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["USER", "STATUS", "HOST"]
    assert lines[1].split()[:3] == ["alice", "connected", "host-a"]
    assert lines[2].split()[:3] == ["bob", "crashed", "host-b"]
