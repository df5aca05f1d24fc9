"""Logging: journald native protocol, JSON lines, stdlib routing."""

from __future__ import annotations

import functools
import json
import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from wabridge import logs
from wabridge.logs import JournalRenderer, encode_journal


def parse_journal(data: bytes) -> dict[str, bytes]:
    """A reader of journald's native datagram format, written from its documentation."""
    fields: dict[str, bytes] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            start = nl + 9
            fields[line.decode()] = data[start : start + size]
            assert data[start + size : start + size + 1] == b"\n"
            i = start + size + 1
    return fields


def test_encode_journal_simple_fields() -> None:
    data = encode_journal({"MESSAGE": "hello", "PRIORITY": 6, "USER_ID": "alice"})
    assert data == b"MESSAGE=hello\nPRIORITY=6\nUSER_ID=alice\n"


def test_encode_journal_multiline_value_uses_binary_length_framing() -> None:
    value = "line one\nline two\n"
    data = encode_journal({"MESSAGE": value, "EVENT": "x"})
    raw = value.encode()
    assert data == (
        b"MESSAGE\n" + struct.pack("<Q", len(raw)) + raw + b"\n" + b"EVENT=x\n"
    )
    assert parse_journal(data) == {"MESSAGE": raw, "EVENT": b"x"}


def test_encode_journal_counts_bytes_not_characters() -> None:
    value = "caf\u00e9\n\U0001f600"
    data = encode_journal({"MESSAGE": value})
    assert struct.unpack("<Q", data[8:16])[0] == len(value.encode()) == 10
    assert parse_journal(data)["MESSAGE"].decode() == value


def test_encode_journal_passes_bytes_through() -> None:
    assert parse_journal(encode_journal({"BLOB": b"\x00\xff\n"}))["BLOB"] == b"\x00\xff\n"


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("user_id", "USER_ID"),
        ("chat-id", "CHAT_ID"),
        ("_private", "PRIVATE"),
        ("2fa", "F_2FA"),
        ("caf\u00e9", "CAF_"),
        ("___", "FIELD"),
        ("x" * 100, "X" * 64),
    ],
)
def test_journal_field_names_are_valid(name: str, field: str) -> None:
    assert logs._journal_field(name) == field


# --- the renderer against a real datagram socket ----------------------------------------


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def clean_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for processor in structlog.get_config()["processors"]:
        if isinstance(processor, JournalRenderer):
            processor._sock.close()
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _receive(sock: socket.socket) -> dict[str, bytes]:
    return parse_journal(sock.recv(1 << 20))


def test_journal_renderer_sends_fields(
    journal: tuple[socket.socket, str], clean_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = journal
    monkeypatch.setattr(logs, "JournalRenderer", functools.partial(JournalRenderer, path=path))
    logs.setup("wabridge-worker", level="info", fmt="journal")
    logs.bind(user_id="alice", chat_id="4915@s.whatsapp.net")
    logs.get("test").warning("outbox.delivered", wa_id="3EB0", message="would clobber")
    fields = _receive(sock)
    assert fields["USER_ID"] == b"alice"
    assert fields["CHAT_ID"] == b"4915@s.whatsapp.net"
    assert fields["PRIORITY"] == b"4"
    assert fields["EVENT"] == b"outbox.delivered"
    assert fields["SYSLOG_IDENTIFIER"] == b"wabridge-worker"
    assert fields["WA_ID"] == b"3EB0"
    assert fields["LOGGER"] == b"test"
    message = fields["MESSAGE"].decode()
    assert message.startswith("outbox.delivered ")
    assert "user_id=alice" in message
    assert "wa_id=3EB0" in message
    assert "message=would clobber" in message
    assert "TIMESTAMP" not in fields
    assert "LEVEL" not in fields


def test_journal_renderer_levels_and_filtering(
    journal: tuple[socket.socket, str], clean_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = journal
    monkeypatch.setattr(logs, "JournalRenderer", functools.partial(JournalRenderer, path=path))
    logs.setup("wabridge-worker", level="info", fmt="journal")
    log = logs.get("test")
    log.debug("dropped")  # below the level: never sent
    log.error("e1")
    log.info("i1")
    assert _receive(sock)["PRIORITY"] == b"3"
    assert _receive(sock)["PRIORITY"] == b"6"


def test_journal_renderer_sends_tracebacks_as_one_multiline_message(
    journal: tuple[socket.socket, str], clean_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = journal
    monkeypatch.setattr(logs, "JournalRenderer", functools.partial(JournalRenderer, path=path))
    logs.setup("wabridge-worker", fmt="journal")
    try:
        raise ValueError("boom")
    except ValueError:
        logs.get("test").exception("turn.failed")
    fields = _receive(sock)
    assert fields["PRIORITY"] == b"3"
    message = fields["MESSAGE"].decode()
    assert message.startswith("turn.failed\nTraceback")
    assert "ValueError: boom" in message
    assert "EXCEPTION" not in fields


def test_journal_renderer_direct_call(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    renderer = JournalRenderer("ident", path=path)
    with pytest.raises(structlog.DropEvent):
        renderer(None, "info", {"event": "e", "level": "info", "user_id": "bob", "n": 3})
    renderer._sock.close()
    fields = _receive(sock)
    assert fields == {
        "MESSAGE": b"e user_id=bob n=3",
        "PRIORITY": b"6",
        "SYSLOG_IDENTIFIER": b"ident",
        "EVENT": b"e",
        "USER_ID": b"bob",
        "N": b"3",
    }


def test_journal_renderer_falls_back_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    renderer = JournalRenderer("ident", path=str(tmp_path / "absent.sock"))
    with pytest.raises(structlog.DropEvent):
        renderer(None, "info", {"event": "e", "k": "v"})
    renderer._sock.close()
    assert capsys.readouterr().err == "e k=v\n"


# --- JSON and console --------------------------------------------------------------------


def _json_lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_json_mode_includes_bound_user_id(
    clean_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("wabridge-controller", level="info", fmt="json")
    logs.bind(user_id="alice")
    logs.get("test").info("link.worker_connected", n=1, obj=object())
    logs.unbind("user_id")
    logs.get("test").info("after")
    first, second = _json_lines(capsys.readouterr().err)
    assert first["event"] == "link.worker_connected"
    assert first["logger"] == "test"  # which part logged it
    assert first["user_id"] == "alice"
    assert first["level"] == "info"
    assert first["n"] == 1
    assert str(first["obj"]).startswith("<object object")  # default=str
    assert "timestamp" in first
    assert "user_id" not in second


def test_stdlib_logging_is_routed(
    clean_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.getLogger().addHandler(logging.StreamHandler())  # neonize's basicConfig
    logs.setup("wabridge-worker", level="info", fmt="json")
    logs.bind(user_id="alice")
    logging.getLogger("neonize.client").warning("socket %s closed", "ws1")
    logging.getLogger("grpc").debug("noise")
    lines = _json_lines(capsys.readouterr().err)
    assert len(lines) == 1  # exactly once: the old handler is gone, debug filtered
    (line,) = lines
    assert line["event"] == "library.log"
    assert line["library"] == "neonize.client"
    assert line["text"] == "socket ws1 closed"
    assert line["level"] == "warning"
    assert line["user_id"] == "alice"


def test_console_mode(clean_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("x", level="debug", fmt="console")
    logs.get("t").debug("hello.there", k="v")
    err = capsys.readouterr().err
    assert "hello.there" in err
    assert "k=v" in err


def test_auto_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert logs._format("json") == "json"
    assert logs._format("auto") in ("console", "json")
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", "/nonexistent/journal.sock")
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    assert logs._format("auto") != "journal"  # no journald socket: do not pick journal
