"""The controller's admin socket (controller/admin.py) over a fake controller facade."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.admin_facade import FakeFacade, FakeUnit, socket_dir

from controller import admin
from controller.admin import AdminServer, ControllerFacade, DocWatchers
from controller.plane import AccountDoc, ControlPlane, parse_account
from controller.server import WorkerServer
from wabridge import protocol
from wabridge.protocol import Usage
from wabridge.status import DocStatus

ROW_KEYS = {"host", "user", "status", "detail", "phone", "unit", "sub_state", "pid", "restarts",
            "memory_bytes", "linked", "chats", "claude_processes", "cost_today_usd", "error"}


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with socket_dir() as path:
        yield path


@pytest.fixture
def facade() -> FakeFacade:
    f = FakeFacade()
    f.put("alice", {"status": "connected", "phone": "15550001111", "statusDetail": "",
                    "metrics": {"chats": 3, "claudeProcesses": 1, "costTodayUsd": 0.25}},
          FakeUnit())
    f.put("bob", {"status": "crashed", "error": {"code": "crashed",
                                                 "message": "worker exited with code 1"}},
          FakeUnit(active_state="failed", sub_state="failed", main_pid=0, n_restarts=5,
                   memory_bytes=None))
    f.linked_users.add("alice")
    return f


@pytest.fixture
async def server(sockdir: Path, facade: FakeFacade) -> AsyncIterator[AdminServer]:
    srv = AdminServer(str(sockdir / "admin.sock"), facade, group="")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()
        for task in list(facade.tasks):
            task.cancel()
        await asyncio.gather(*facade.tasks, return_exceptions=True)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, timeout: float = 5.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert line, "connection closed"
        return dict(json.loads(line))

    async def call(self, **request: Any) -> dict[str, Any]:
        await self.send_raw(json.dumps(request).encode() + b"\n")
        return await self.read()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def client(server: AdminServer, sockdir: Path) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_unix_connection(str(sockdir / "admin.sock"))
    c = Client(reader, writer)
    try:
        yield c
    finally:
        await c.close()


async def connect(sockdir: Path) -> Client:
    reader, writer = await asyncio.open_unix_connection(str(sockdir / "admin.sock"))
    return Client(reader, writer)


# --- the socket ------------------------------------------------------------------------------


async def test_socket_mode_and_cleanup(sockdir: Path, facade: FakeFacade) -> None:
    path = sockdir / "sub" / "admin.sock"
    srv = AdminServer(str(path), facade, group="", admin_gid=4242)
    await srv.start()
    st = path.stat()
    assert oct(st.st_mode & 0o777) == oct(0o660)
    assert st.st_gid == 4242
    await srv.close()
    assert not path.exists()


async def test_unknown_group_means_root_only(sockdir: Path, facade: FakeFacade) -> None:
    srv = AdminServer(str(sockdir / "admin.sock"), facade, group="no-such-group-wabridge")
    await srv.start()
    try:
        assert srv.admin_gid is None
        assert (sockdir / "admin.sock").stat().st_gid == os.getgid()
        assert not srv.allowed(admin.Peer(pid=1, uid=1000, gid=1000))
        assert srv.allowed(admin.Peer(pid=1, uid=0, gid=0))
    finally:
        await srv.close()


# --- ops -------------------------------------------------------------------------------------


async def test_ping(client: Client) -> None:
    assert await client.call(op="ping") == {"ok": True, "host": "testhost", "plane": "local",
                                            "sessions": 2, "linked": 1}


async def test_status_all(client: Client) -> None:
    answer = await client.call(op="status")
    assert answer["ok"] is True
    rows = {r["user"]: r for r in answer["users"]}
    assert list(rows) == ["alice", "bob"]
    assert all(set(r) == ROW_KEYS for r in rows.values())
    assert rows["alice"] | {} == {
        "user": "alice", "status": "connected", "detail": "", "phone": "15550001111",
        "unit": "active", "sub_state": "running", "pid": 4242, "restarts": 0,
        "memory_bytes": 150 * 1024 * 1024, "linked": True, "chats": 3, "claude_processes": 1,
        "cost_today_usd": 0.25, "error": None, "host": None,
    }
    bob = rows["bob"]
    assert (bob["status"], bob["unit"], bob["pid"], bob["restarts"]) == ("crashed", "failed",
                                                                        None, 5)
    assert bob["error"] == {"code": "crashed", "message": "worker exited with code 1"}
    assert bob["linked"] is False


async def test_status_one_and_unknown(client: Client) -> None:
    answer = await client.call(op="status", user="bob")
    assert [r["user"] for r in answer["users"]] == ["bob"]
    assert await client.call(op="status", user="carol") == {
        "ok": False, "code": "unknown_user",
        "message": "no account for user 'carol' (wabridgectl status lists them)"}
    bad = await client.call(op="status", user="a b")
    assert (bad["ok"], bad["code"]) == (False, "bad_user_id")


async def test_live_claude_processes_are_zero_when_the_unit_is_down(facade: FakeFacade) -> None:
    facade.put("dora", {"status": "stopped", "metrics": {"claudeProcesses": 2}},
               FakeUnit(active_state="inactive", main_pid=0))
    row = admin.status_row("dora", facade.doc("dora"), facade.unit("dora"), False)
    assert row["claude_processes"] == 0


async def test_link_requests_create_and_clears_stale_fields(
    client: Client, facade: FakeFacade
) -> None:
    facade.put("carol", {"status": "qr_expired", "qrRaw": "old", "error": {"code": "x"}})
    answer = await client.call(op="link", user="carol")
    assert answer == {"ok": True, "user": "carol", "status": "create_requested",
                      "already_connected": False}
    assert facade.requests == [("carol", DocStatus.CREATE_REQUESTED, {
        "qrRaw": None, "qrCode": None, "pairingCode": None, "error": None})]
    doc = facade.doc("carol")
    assert doc is not None and doc.qr_raw is None and doc.error_code is None


async def test_link_with_phone_requests_pairing(client: Client, facade: FakeFacade) -> None:
    answer = await client.call(op="link", user="carol", phone="15550003333")
    assert answer["status"] == "pairing_requested"
    user, status, fields = facade.requests[0]
    assert (user, status, fields["pairingPhone"]) == ("carol", DocStatus.PAIRING_REQUESTED,
                                                      "15550003333")
    bad = await client.call(op="link", user="carol", phone="+1 555")
    assert (bad["ok"], bad["code"]) == (False, "bad_request")
    assert "7-15 digits" in bad["message"]


async def test_link_of_a_connected_account_does_nothing(
    client: Client, facade: FakeFacade
) -> None:
    answer = await client.call(op="link", user="alice")
    assert answer == {"ok": True, "user": "alice", "status": "connected",
                      "already_connected": True, "phone": "15550001111"}
    assert facade.requests == []


async def test_link_follow_streams_changes_after_the_request(
    client: Client, facade: FakeFacade
) -> None:
    facade.scripts[DocStatus.CREATE_REQUESTED] = [
        (0.01, {"status": "starting"}),
        (0.01, {"status": "waiting_qr", "qrRaw": "sim-qr:1"}),
        (0.01, {"metrics": {"chats": 0}}),  # not a watched field: no event
        (0.01, {"qrRaw": "sim-qr:2"}),
        (0.01, {"status": "connected", "phone": "15550009999", "qrRaw": None}),
    ]
    first = await client.call(op="link", user="erin", follow=True)
    assert first["status"] == "create_requested"
    seen = []
    while True:
        event = await client.read()
        assert event["event"] == "update" and event["user"] == "erin"
        seen.append((event["status"], event["qr"], event["phone"]))
        if event["status"] == "connected":
            break
    assert seen == [
        ("create_requested", None, None),  # the request itself
        ("starting", None, None),
        ("waiting_qr", "sim-qr:1", None),
        ("waiting_qr", "sim-qr:2", None),
        ("connected", None, "15550009999"),
    ]


async def test_unlink_and_restart(client: Client, facade: FakeFacade) -> None:
    assert (await client.call(op="unlink", user="bob"))["status"] == "destroy_requested"
    assert (await client.call(op="restart", user="alice"))["status"] == "restart_requested"
    assert [(u, s) for u, s, _ in facade.requests] == [
        ("bob", DocStatus.DESTROY_REQUESTED), ("alice", DocStatus.RESTART_REQUESTED)]
    for op in ("unlink", "restart"):
        answer = await client.call(op=op, user="nobody")
        assert (answer["ok"], answer["code"]) == (False, "unknown_user")
        answer = await client.call(op=op)
        assert (answer["ok"], answer["code"]) == (False, "bad_request")


async def test_watch_snapshot_updates_and_removal(
    server: AdminServer, sockdir: Path, facade: FakeFacade
) -> None:
    c = await connect(sockdir)
    try:
        snap = await c.call(op="watch", user="alice")
        assert snap == {"ok": True, "event": "snapshot", "user": "alice", "status": "connected",
                        "detail": "", "qr": None, "pairing_code": None,
                        "phone": "15550001111", "error": None}
        facade.change("alice", {"metrics": {"chats": 9}})  # unwatched: no event
        facade.change("alice", {"status": "disconnected", "statusDetail": "network"})
        event = await c.read()
        assert (event["event"], event["status"], event["detail"]) == ("update", "disconnected",
                                                                      "network")
        facade.drop("alice")
        assert await c.read() == {"ok": True, "event": "removed", "user": "alice"}
    finally:
        await c.close()
    await asyncio.sleep(0.05)
    assert facade.watchers.watching() == 0  # the stream unsubscribed when the client left


async def test_chats_from_the_message_log(client: Client, facade: FakeFacade) -> None:
    facade.message_log["alice"] = [
        {"chatId": "111@s.whatsapp.net", "direction": "in", "text": "hi", "ts": 10.0},
        {"chatId": "111@s.whatsapp.net", "direction": "out", "text": "hello!", "ts": 11.0},
        {"chatId": "222@g.us", "direction": "in", "text": "group hi", "ts": 20.0},
    ]
    answer = await client.call(op="chats", user="alice")
    assert answer == {"ok": True, "user": "alice", "source": "message_log", "chats": [
        {"chat": "222@g.us", "messages": 1, "in": 1, "out": 0, "last_ts": 20.0,
         "last_direction": "in", "last_text": "group hi"},
        {"chat": "111@s.whatsapp.net", "messages": 2, "in": 1, "out": 1, "last_ts": 11.0,
         "last_direction": "out", "last_text": "hello!"},
    ]}
    bad = await client.call(op="chats", user="alice", limit=0)
    assert (bad["ok"], bad["code"]) == (False, "bad_request")


async def test_reset_sends_a_command_to_a_linked_worker(
    client: Client, facade: FakeFacade
) -> None:
    answer = await client.call(op="reset", user="alice", chat="+15550002222")
    assert answer == {"ok": True, "user": "alice", "chat": "15550002222@s.whatsapp.net",
                      "sent": True}
    assert facade.commands == [("alice", protocol.Command(
        name="reset_chat", args={"chat_id": "15550002222@s.whatsapp.net"}))]
    group = await client.call(op="reset", user="alice", chat="120363-abc@g.us")
    assert group["chat"] == "120363-abc@g.us"
    down = await client.call(op="reset", user="bob", chat="15550002222")
    assert (down["ok"], down["code"]) == (False, "not_connected")
    bad = await client.call(op="reset", user="alice", chat="not a chat")
    assert (bad["ok"], bad["code"]) == (False, "bad_request")
    missing = await client.call(op="reset", user="alice")
    assert (missing["ok"], missing["code"]) == (False, "bad_request")


async def test_pause_and_resume_send_commands_to_a_linked_worker(
    client: Client, facade: FakeFacade
) -> None:
    answer = await client.call(op="pause", user="alice", chat="+15550002222", minutes=30)
    assert answer == {"ok": True, "user": "alice", "chat": "15550002222@s.whatsapp.net",
                      "sent": True}
    await client.call(op="pause", user="alice", chat="15550002222")
    await client.call(op="resume", user="alice", chat="15550002222")
    chat = "15550002222@s.whatsapp.net"
    assert facade.commands == [
        ("alice", protocol.Command(name="pause_chat", args={"chat_id": chat, "minutes": "30"})),
        ("alice", protocol.Command(name="pause_chat", args={"chat_id": chat})),
        ("alice", protocol.Command(name="resume_chat", args={"chat_id": chat}))]
    for bad in ({"minutes": 0}, {"minutes": "5"}, {"minutes": True}, {"chat": None}):
        got = await client.call(**{"op": "pause", "user": "alice", "chat": "15550002222", **bad})
        assert (got["ok"], got["code"]) == (False, "bad_request"), bad
    down = await client.call(op="resume", user="bob", chat="15550002222")
    assert (down["ok"], down["code"]) == (False, "not_connected")


async def test_usage_reads_the_usage_documents(client: Client, facade: FakeFacade) -> None:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    facade.usage_docs = [{"userId": "alice", "day": "2000-01-01", "turns": 9},
                         {"userId": "alice", "day": today, "turns": 2},
                         {"userId": "bob", "day": today, "turns": 1}]
    answer = await client.call(op="usage")
    assert (answer["since"], [u["userId"] for u in answer["usage"]]) == (today, ["alice", "bob"])
    answer = await client.call(op="usage", user="alice", days=366)
    assert [u["turns"] for u in answer["usage"]] == [2]  # 2000 is older than 366 days
    bad = await client.call(op="usage", days=0)
    assert (bad["ok"], bad["code"]) == (False, "bad_request")


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "code", "fragment"), [
    (b"{not json\n", "bad_request", "not JSON"),
    (b"[1, 2]\n", "bad_request", "JSON object"),
    (b'{"user": "alice"}\n', "bad_request", "needs 'op'"),
    (b'{"op": "explode"}\n', "unknown_op", "unknown op 'explode'"),
    (b"\xff\xfe\n", "bad_request", "not JSON"),
    (b"[" * 100000 + b"\n", "bad_request", "exceeds"),
])
async def test_bad_requests_get_an_error_frame(
    sockdir: Path, server: AdminServer, line: bytes, code: str, fragment: str
) -> None:
    c = await connect(sockdir)
    try:
        await c.send_raw(line)
        answer = await c.read()
        assert (answer["ok"], answer["code"]) == (False, code)
        assert fragment in answer["message"]
        if code != "bad_request" or fragment != "exceeds":
            # the connection stays usable after a bad line
            assert (await c.call(op="ping"))["ok"] is True
    finally:
        await c.close()
    # and the server still serves new connections
    c2 = await connect(sockdir)
    try:
        assert (await c2.call(op="ping"))["ok"] is True
    finally:
        await c2.close()


async def test_a_failing_facade_answers_internal(
    client: Client, facade: FakeFacade, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(*_args: Any, **_kw: Any) -> None:
        raise RuntimeError("plane down")

    monkeypatch.setattr(facade, "request", boom)
    answer = await client.call(op="restart", user="alice")
    assert answer == {"ok": False, "code": "internal", "message": "RuntimeError: plane down"}
    assert (await client.call(op="ping"))["ok"] is True


async def test_last_request_without_newline(sockdir: Path, server: AdminServer) -> None:
    c = await connect(sockdir)
    try:
        await c.send_raw(b'{"op": "ping"}')
        c.writer.write_eof()
        assert (await c.read())["ok"] is True
    finally:
        await c.close()


# --- who may connect ---------------------------------------------------------------------------

CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError as e:
    print(json.dumps({"connect_error": "EACCES"}))
    sys.exit(0)
try:
    s.sendall(b'{"op": "ping"}\n')
except BrokenPipeError:
    pass  # answered (forbidden) and closed before we wrote: the answer is still readable
print(s.makefile("rb").readline().decode().strip())
"""


async def run_as(uid_args: list[str], path: Path) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "setpriv", *uid_args, sys.executable, "-I", "-c", CLIENT, str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/")
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return dict(json.loads(out))


needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to run a client as another uid")


@needs_setpriv
async def test_forbidden_for_a_non_root_non_member(sockdir: Path, facade: FakeFacade) -> None:
    # 0666 so the connection reaches the peer-credential check
    srv = AdminServer(str(sockdir / "admin.sock"), facade, admin_gid=4242, mode=0o666)
    await srv.start()
    try:
        answer = await run_as(["--reuid", "65534", "--regid", "65534", "--clear-groups"],
                              sockdir / "admin.sock")
        assert answer["ok"] is False and answer["code"] == "forbidden"
        assert "uid 65534" in answer["message"]
        # a member through a supplementary group is let in
        member = await run_as(["--reuid", "65534", "--regid", "65534", "--groups", "4242"],
                              sockdir / "admin.sock")
        assert member["ok"] is True and member["host"] == "testhost"
        # and through its primary group
        primary = await run_as(["--reuid", "65534", "--regid", "4242", "--clear-groups"],
                               sockdir / "admin.sock")
        assert primary["ok"] is True
    finally:
        await srv.close()


@needs_setpriv
async def test_socket_permissions_keep_others_out(sockdir: Path, facade: FakeFacade) -> None:
    srv = AdminServer(str(sockdir / "admin.sock"), facade, admin_gid=4242)  # 0660
    await srv.start()
    try:
        answer = await run_as(["--reuid", "65534", "--regid", "65534", "--clear-groups"],
                              sockdir / "admin.sock")
        assert answer == {"connect_error": "EACCES"}
    finally:
        await srv.close()


def test_supplementary_groups_parses_proc_status(tmp_path: Path) -> None:
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "status").write_text("Name:\tx\nGroups:\t4 24 4242 \nNSpid:\t77\n")
    assert admin.supplementary_groups(77, tmp_path) == {4, 24, 4242}
    assert admin.supplementary_groups(78, tmp_path) == set()  # gone: no groups


# --- the real facade ------------------------------------------------------------------------


class RecordingPlane(ControlPlane):
    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def watch(self, on_change: Any) -> None:
        return None

    async def list_accounts(self) -> list[AccountDoc]:
        return []

    async def get(self, user_id: str) -> AccountDoc | None:
        return None

    async def claim(self, user_id: str, expect: frozenset[DocStatus], new: DocStatus,
                    host: str) -> bool:
        return True

    async def update(self, user_id: str, fields: Any) -> None:
        self.calls.append(("update", dict(fields)))

    async def request(self, user_id: str, status: DocStatus, **fields: Any) -> None:
        self.calls.append(("request", status))

    async def delete(self, user_id: str) -> None:
        return None

    async def add_message(self, user_id: str, event: protocol.MessageEvent) -> None:
        return None

    async def messages(self, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
        return [{"chatId": "c", "limit": limit}]

    async def put_link_record(self, user_id: str, fields: Any) -> None:
        return None

    async def add_summary(self, user_id: str, chat_id: str, number: int, text: str) -> None:
        return None

    async def summaries(self, user_id: str, chat_id: str) -> list[dict[str, Any]]:
        return []

    async def put_usage(self, user_id: str, usage: Usage) -> None:
        return None

    async def usage(self, user_id: str | None, since_day: str) -> list[dict[str, Any]]:
        return [{"userId": user_id, "day": since_day}]

    async def close(self) -> None:
        return None


async def test_controller_facade_reads_the_controller(tmp_path: Path) -> None:
    async def no_unit(_pid: int) -> str | None:
        return None

    async def no_frames(_u: str, _f: Any) -> None:
        return None

    async def no_settings(_u: str) -> dict[str, Any]:
        return {}

    class Ctl:
        def __init__(self) -> None:
            self.docs = {"alice": parse_account("alice", {"status": "connected"})}
            self.units = {"bob": FakeUnit()}
            self.server = WorkerServer(str(tmp_path / "w.sock"), no_unit, no_frames, no_settings)
            self.plane: ControlPlane = RecordingPlane()
            self.host = "h"
            self.watchers = DocWatchers()

    ctl = Ctl()
    f = ControllerFacade(ctl)
    assert set(f.user_ids()) == {"alice", "bob"}
    assert f.doc("alice") is ctl.docs["alice"] and f.unit("bob") is ctl.units["bob"]
    assert f.linked("alice") is False
    assert await f.command("alice", protocol.Command(name="reset_chat")) is False
    await f.request("alice", DocStatus.RESTART_REQUESTED)
    assert ctl.plane.calls == [("request", DocStatus.RESTART_REQUESTED)]  # type: ignore[attr-defined]
    assert f.info() == {"host": "h", "plane": "recording", "sessions": 1, "linked": 0}
    assert await f.messages("alice", 3) == [{"chatId": "c", "limit": 3}]
    seen: list[Any] = []
    f.watch("alice", seen.append)
    old = ctl.docs["alice"]
    ctl.watchers.changed("alice", old, old.merged({"metrics": {"chats": 2}}))  # not watched
    ctl.watchers.changed("alice", old, old.merged({"qrRaw": "q"}))
    assert [d.qr_raw for d in seen] == ["q"]


def test_a_document_merges_like_the_planes() -> None:
    doc = parse_account("u", {"status": "connected"})
    doc = doc.merged({"metrics": {"chats": 1, "turns": 2}, "qrRaw": "a"})
    doc = doc.merged({"metrics": {"chats": 3}, "qrRaw": None})
    assert (dict(doc.metrics), doc.qr_raw) == ({"chats": 3, "turns": 2}, None)
    assert dict(doc.merged({"metrics": {}}).metrics) == {}  # an empty map replaces
    err = doc.merged({"error": {"code": "bad_setting", "message": "m", "source": "worker"}})
    assert (err.error_code, err.error_message, err.error_source) == ("bad_setting", "m", "worker")
    assert doc.status is DocStatus.CONNECTED and "error" not in doc.data  # unchanged
