"""``wabridgectl``: link, inspect and manage the WhatsApp accounts of a wabridge host.

Over 600 lines because each command's arguments, admin call and rendering sit together, one
place per command, and the exit statuses below are one contract for all of them.

Talks to the controller's admin socket (``controller.admin_socket``, see
:mod:`controller.admin`; root or members of ``controller.admin_group`` only), to journald for
``logs``, and checks the host itself for ``doctor``.

Commands::

    wabridgectl link <user> [--pairing-code PHONE] [--timeout S]
    wabridgectl unlink <user>
    wabridgectl restart <user>
    wabridgectl status [<user>] [--json]
    wabridgectl logs <user> [-f] [-n LINES]
    wabridgectl chats <user> [--json]
    wabridgectl reset <user> <chat>
    wabridgectl pause <user> <chat> [--minutes N]
    wabridgectl usage [<user>] [--days N] [--json]
    wabridgectl resume <user> <chat>
    wabridgectl doctor [--json]
    wabridgectl hosts [--json]                 (fleet.enabled)
    wabridgectl drain <host> | undrain <host>  (fleet.enabled)
    wabridgectl move <user> <host>             (fleet.enabled)

``--json`` is accepted by every command, before or after its name; with it, results are one
JSON document on stdout and errors are ``{"error": {"code": ..., "message": ...}}`` on stdout.
``--socket PATH`` overrides the admin socket's path.

Exit status (stable; scripts may rely on it):

== ======================================================================================
0  success (``link``: the account is connected)
1  the operation failed: an error answer, the account ended in a failed status (logged out,
   QR expired, crashed, error...), ``doctor`` found a failing check
2  usage: unknown command, bad arguments, an invalid user id or phone number
3  the controller is unreachable: no admin socket, nobody listening, no answer, or the
   connection dropped
4  forbidden: not root and not in the admin group (socket permissions or the controller's
   peer-credential check)
5  timed out (``link --timeout``)
== ======================================================================================

Environment: ``WABRIDGE_CONFIG`` (the configuration file), ``WABRIDGE_WORKER_ENV`` (the
workers' environment file ``doctor`` reads; default ``/etc/wabridge/worker.env``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from controller import doctor
from controller.doctor import human_bytes
from wabridge import config, qr
from wabridge.errors import ConfigError, UserIdError, WabridgeError
from wabridge.phone import PHONE_RULE, normalize_phone
from wabridge.status import OUTCOME_STATUSES, DocStatus
from wabridge.units import validate_user_id, worker_unit

OK, FAILED, USAGE, UNREACHABLE, FORBIDDEN, TIMEOUT = 0, 1, 2, 3, 4, 5

CALL_TIMEOUT = 30.0
#: Statuses after which ``link`` has nothing more to wait for.
LINK_FAILED = frozenset(s.value for s in OUTCOME_STATUSES | {
    DocStatus.CRASHED, DocStatus.STOPPING, DocStatus.STOPPED, DocStatus.ERROR,
    DocStatus.DESTROY_REQUESTED})
class CtlError(WabridgeError):
    """A command that did not succeed: ``exit_status`` is wabridgectl's exit status (the table
    above), ``code`` the stable word printed with ``--json``."""

    code = "ctl_error"
    explanation = "the message says what failed; wabridgectl doctor checks the host"

    def __init__(self, exit_status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.code = code
        self.explanation = _CTL_EXPLANATIONS.get(exit_status, type(self).explanation)


_CTL_EXPLANATIONS = {
    USAGE: "wabridgectl --help shows the commands and their arguments",
    UNREACHABLE: "is wabridge-controller running? systemctl status wabridge-controller",
    FORBIDDEN: "run as root or as a member of controller.admin_group",
    TIMEOUT: "nobody scanned in time: run wabridgectl link again",
}


# --------------------------------------------------------------------------- the client


class AdminClient:
    """A blocking JSON-lines client of the admin socket."""

    def __init__(self, path: str, timeout: float = CALL_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    @contextlib.contextmanager
    def _connect(self) -> Iterator[tuple[socket.socket, Any]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except FileNotFoundError:
                raise CtlError(UNREACHABLE, "unreachable", f"no admin socket at {self.path}: "
                               "is wabridge-controller running?") from None
            except PermissionError:
                raise CtlError(FORBIDDEN, "forbidden", f"permission denied on {self.path}: "
                               "run as root or as a member of the admin group "
                               "(controller.admin_group, default wabridge-admin)") from None
            except ConnectionRefusedError:
                raise CtlError(UNREACHABLE, "unreachable", f"nobody listens on {self.path}: "
                               "is wabridge-controller running?") from None
            except OSError as exc:
                raise CtlError(UNREACHABLE, "unreachable",
                               f"cannot connect to {self.path}: {exc.strerror or exc}") from None
            with sock.makefile("rb") as reader:
                yield sock, reader
        finally:
            sock.close()

    @staticmethod
    def _send(sock: socket.socket, request: Mapping[str, Any]) -> None:
        # The controller may have answered (``forbidden``) and closed before we wrote: what it
        # said is still readable; ``_read`` reports it, or the closed connection.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps(request).encode() + b"\n")

    @staticmethod
    def _read(sock: socket.socket, reader: Any, deadline: float | None = None
              ) -> dict[str, Any]:
        """One answer line; raises TimeoutError when ``deadline`` (monotonic) passes."""
        if deadline is not None:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            line = reader.readline()
        except TimeoutError:
            raise
        except OSError as exc:
            raise CtlError(UNREACHABLE, "unreachable",
                           f"connection to the controller failed: {exc}") from None
        if not line:
            raise CtlError(UNREACHABLE, "unreachable",
                           "the controller closed the connection (restarting?)")
        try:
            answer = json.loads(line)
        except ValueError:
            raise CtlError(FAILED, "bad_answer", f"unparsable answer: {line[:200]!r}") from None
        if not isinstance(answer, dict):
            raise CtlError(FAILED, "bad_answer", f"unexpected answer: {line[:200]!r}")
        if not answer.get("ok"):
            code = str(answer.get("code", "error"))
            exit_code = FORBIDDEN if code == "forbidden" else (
                USAGE if code in ("bad_user_id", "bad_request") else FAILED)
            raise CtlError(exit_code, code, str(answer.get("message", "")))
        return answer

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        with self._connect() as (sock, reader):
            self._send(sock, {"op": op, **args})
            try:
                return self._read(sock, reader)
            except TimeoutError:
                raise CtlError(UNREACHABLE, "unreachable", f"the controller did not answer "
                               f"{op} within {self.timeout:g} s") from None

    def stream(self, op: str, deadline: float, **args: Any) -> Iterator[dict[str, Any]]:
        """The answer and then every event of a streaming op; TimeoutError at ``deadline``."""
        with self._connect() as (sock, reader):
            self._send(sock, {"op": op, **args})
            while True:
                yield self._read(sock, reader, deadline)


# --------------------------------------------------------------------------- output


def _out() -> TextIO:
    return sys.stdout


def print_json(obj: Any) -> None:
    _out().write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def print_json_line(obj: Any) -> None:
    _out().write(json.dumps(obj, sort_keys=True, default=str) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _error_text(error: object) -> str:
    if not isinstance(error, Mapping):
        return ""
    code, message = str(error.get("code", "")), str(error.get("message", ""))
    return f"{code}: {message}" if message else code


USER_WIDTH = 40  # valid ids are at most 128 characters; invalid ones can be any length


def elide(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, control characters escaped (a document id
    is anyone's input: it must neither pad a column nor move the terminal's cursor)."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= width else text[:width - 3] + "..."


def status_table(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ("USER", "STATUS", "PHONE", "UNIT", "PID", "RESTARTS", "MEMORY", "CHATS",
               "CLAUDE", "COST TODAY", "ERROR")
    cells = []
    for r in rows:
        cost = r.get("cost_today_usd")
        error = _error_text(r.get("error"))
        cells.append((
            elide(str(r.get("user")), USER_WIDTH), _cell(r.get("status")),
            f"+{r['phone']}" if r.get("phone") else "-",
            _cell(r.get("unit")), _cell(r.get("pid")), _cell(r.get("restarts")),
            human_bytes(r.get("memory_bytes")), _cell(r.get("chats")),
            _cell(r.get("claude_processes")),
            f"${cost:.4f}" if isinstance(cost, int | float) else "-",
            elide(error, 60) if error else "-",
        ))
    if len({r.get("host") for r in rows if r.get("host")}) > 1:  # a fleet: where each runs
        return table((*headers[:2], "HOST", *headers[2:]),
                     [(*c[:2], elide(_cell(r.get("host")), USER_WIDTH), *c[2:])
                      for c, r in zip(cells, rows, strict=True)])
    return table(headers, cells)


def hosts_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``wabridgectl hosts``: one line per host of the fleet."""
    headers = ("HOST", "ALIVE", "DRAINING", "ACCOUNTS", "MAX", "MEMORY", "HEARTBEAT")
    cells = []
    for r in rows:
        age = r.get("heartbeat_age")
        memory = r.get("memory_mb")
        cells.append((
            elide(str(r.get("host")), USER_WIDTH), "yes" if r.get("alive") else "NO",
            "yes" if r.get("draining") else "no", _cell(r.get("accounts")),
            _cell(r.get("max_workers")),
            human_bytes(memory * (1 << 20) if isinstance(memory, int) else None),
            f"{age:.1f}s ago" if isinstance(age, int | float) else "never"))
    return table(headers, cells)


def cmd_hosts(ctx: Ctx) -> int:
    rows = ctx.client.call("hosts").get("hosts", [])
    if ctx.json:
        print_json({"hosts": rows})
    elif not rows:
        _out().write("no hosts registered\n")
    else:
        _out().write(hosts_table(rows) + "\n")
    return OK


def cmd_drain(ctx: Ctx) -> int:
    op, host = ctx.args.command, ctx.args.host
    answer = ctx.client.call(op, host=host)
    if ctx.json:
        print_json(answer)
    elif op == "drain":
        _out().write(f"draining {host}: its accounts move to other hosts one at a time, each "
                     "after its turn in flight (wabridgectl hosts shows the count)\n")
    else:
        _out().write(f"{host} takes accounts again: new ones, and those moved to it "
                     "(wabridgectl move); none are pulled back\n")
    return OK


def cmd_move(ctx: Ctx) -> int:
    user = _user(ctx.args.user)
    answer = ctx.client.call("move", user=user, host=ctx.args.host)
    if ctx.json:
        print_json(answer)
    else:
        _out().write(f"moving {user} to {ctx.args.host}: its worker finishes its turn and "
                     "stops, then starts there (wabridgectl status shows the host)\n")
    return OK


def chats_table(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ("CHAT", "MESSAGES", "IN", "OUT", "LAST", "LAST MESSAGE")
    cells = []
    for r in rows:
        ts = r.get("last_ts")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if isinstance(
            ts, int | float) else "-"
        text = " ".join(str(r.get("last_text") or "").split())
        arrow = "<" if r.get("last_direction") == "in" else ">"
        cells.append((str(r.get("chat")), str(r.get("messages", 0)), str(r.get("in", 0)),
                      str(r.get("out", 0)), when,
                      f"{arrow} {text[:47] + '...' if len(text) > 50 else text}"))
    return table(headers, cells)


def qr_block(code: str, *, color: bool) -> str:
    """The QR for a terminal; dark modules are blocks, so force black on white on a TTY."""
    text = qr.to_terminal(code)
    if not color:
        return text
    return "\n".join(f"\x1b[30;107m{line}\x1b[0m" for line in text.splitlines())


# --------------------------------------------------------------------------- commands


@dataclass
class Ctx:
    args: argparse.Namespace
    client: AdminClient
    json: bool


def cmd_link(ctx: Ctx) -> int:
    args = ctx.args
    user = _user(args.user)
    phone = args.pairing_code
    if phone is not None:
        phone = normalize_phone(phone)
        if phone is None:
            raise CtlError(USAGE, "bad_request", f"--pairing-code {args.pairing_code!r}: a "
                           f"phone number, {PHONE_RULE}")
    deadline = time.monotonic() + args.timeout
    tty = _out().isatty() and not ctx.json
    request: dict[str, Any] = {"user": user, "follow": True}
    if phone:
        request["phone"] = phone
    shown_qr, shown_code = None, None
    try:
        events = ctx.client.stream("link", deadline, **request)
        first = next(events)
        if first.get("already_connected"):
            phone_now = first.get("phone")
            if ctx.json:
                print_json_line({"user": user, "connected": True, "already": True,
                                 "phone": phone_now})
            else:
                _out().write(f"already connected as +{phone_now}\n" if phone_now
                             else "already connected\n")
            return OK
        if not ctx.json:
            _out().write(f"requested {first.get('status')} for {user}; waiting for the "
                         "worker...\n")
            _out().flush()
        for event in events:
            if event.get("event") == "removed":
                raise CtlError(FAILED, "removed", f"the account document of {user} was deleted")
            status, code, pairing = event.get("status"), event.get("qr"), event.get(
                "pairing_code")
            if ctx.json:
                print_json_line(event)
            if pairing and pairing != shown_code:
                shown_code = pairing
                if not ctx.json:
                    _out().write(f"\nOn the phone ({'+' + phone if phone else ''}): WhatsApp > "
                                 f"Linked devices > Link a device > Link with phone number "
                                 f"instead, and enter:\n\n    {pairing}\n\n")
            elif code and code != shown_qr and not phone:
                shown_qr = code
                if not ctx.json:
                    if tty:
                        _out().write("\x1b[H\x1b[2J")
                    _out().write(qr_block(code, color=tty) + "\n")
                    _out().write("Scan with WhatsApp > Linked devices > Link a device "
                                 "(the code rotates).\n")
            _out().flush()
            if status == "connected":
                phone_now = event.get("phone")
                if ctx.json:
                    print_json_line({"user": user, "connected": True, "phone": phone_now})
                else:
                    _out().write(f"connected as +{phone_now}\n" if phone_now else "connected\n")
                return OK
            if status in LINK_FAILED:
                error = _error_text(event.get("error"))
                detail = event.get("detail")
                why = "; ".join(x for x in (error, detail) if x)
                raise CtlError(FAILED, str(status), f"link failed: status {status}"
                               + (f" ({why})" if why else ""))
    except TimeoutError:
        raise CtlError(TIMEOUT, "timeout", f"not connected after {args.timeout:g} s "
                       f"(see wabridgectl status {user})") from None
    raise CtlError(UNREACHABLE, "unreachable", "the controller closed the connection")


def cmd_simple(op: str, done: str) -> Callable[[Ctx], int]:
    def run(ctx: Ctx) -> int:
        user = _user(ctx.args.user)
        answer = ctx.client.call(op, user=user)
        if ctx.json:
            print_json(answer)
        else:
            _out().write(f"{done} {user} ({answer.get('status')})\n")
        return OK

    return run


def cmd_status(ctx: Ctx) -> int:
    user = ctx.args.user
    answer = ctx.client.call("status", **({"user": _user(user)} if user else {}))
    rows = answer.get("users", [])
    if ctx.json:
        print_json({"users": rows})
        return OK
    if not rows:
        _out().write("no accounts\n")
        return OK
    _out().write(status_table(rows) + "\n")
    if user:
        for row in rows:
            if row.get("detail"):
                _out().write(f"\ndetail: {row['detail']}\n")
            if row.get("error"):
                _out().write(f"\nlast error: {_error_text(row['error'])}\n")
    return OK


def cmd_chats(ctx: Ctx) -> int:
    user = _user(ctx.args.user)
    answer = ctx.client.call("chats", user=user)
    chats = answer.get("chats", [])
    if ctx.json:
        print_json({"user": user, "source": answer.get("source"), "chats": chats})
    elif not chats:
        _out().write(f"no chats recorded for {user}\n")
    else:
        _out().write(chats_table(chats) + "\n")
    return OK


def cmd_reset(ctx: Ctx) -> int:
    user = _user(ctx.args.user)
    answer = ctx.client.call("reset", user=user, chat=ctx.args.chat)
    if ctx.json:
        print_json(answer)
    else:
        _out().write(f"reset sent: {answer.get('chat')} of {user} starts a fresh Claude "
                     "conversation with its next message\n")
    return OK


def cmd_pause(ctx: Ctx) -> int:
    user = _user(ctx.args.user)
    op = ctx.args.command
    extra = {"minutes": ctx.args.minutes} if op == "pause" and ctx.args.minutes else {}
    answer = ctx.client.call(op, user=user, chat=ctx.args.chat, **extra)
    if ctx.json:
        print_json(answer)
    elif op == "pause":
        until = f"for {ctx.args.minutes:g} min" if ctx.args.minutes else "until resumed"
        _out().write(f"paused: {answer.get('chat')} of {user} is not answered {until}\n")
    else:
        _out().write(f"resumed: {answer.get('chat')} of {user} is answered from its next "
                     "message\n")
    return OK


USAGE_COLUMNS = (("user", "userId"), ("day", "day"), ("turns", "turns"),
                 ("in", "inputTokens"), ("out", "outputTokens"),
                 ("cache_w", "cacheCreationTokens"), ("cache_r", "cacheReadTokens"),
                 ("cost_usd", "costUsd"), ("msg_in", "messagesIn"), ("msg_out", "messagesOut"),
                 ("audio_s", "transcriptionSeconds"))


def usage_table(rows: list[dict[str, Any]]) -> str:
    """``wabridgectl usage``: one line per user and UTC day."""
    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key, "")
        if key == "costUsd" and isinstance(value, int | float):
            return f"{value:.4f}"
        if key == "transcriptionSeconds" and isinstance(value, int | float):
            return f"{value:g}"
        return str(value)

    table = [[name for name, _ in USAGE_COLUMNS],
             *([cell(r, key) for _, key in USAGE_COLUMNS] for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(USAGE_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in table)


def cmd_usage(ctx: Ctx) -> int:
    extra: dict[str, Any] = {"days": ctx.args.days}
    if ctx.args.user:
        extra["user"] = _user(ctx.args.user)
    answer = ctx.client.call("usage", **extra)
    rows = list(answer.get("usage", []))
    if ctx.json:
        print_json({"since": answer.get("since"), "usage": rows})
    elif not rows:
        _out().write(f"no usage recorded since {answer.get('since')}\n")
    else:
        _out().write(usage_table(rows) + "\n")
    return OK


def journal_argv(user_id: str, follow: bool = False, lines: int | None = None) -> list[str]:
    """``journalctl`` for one user: its worker unit's lines OR any line tagged USER_ID.

    Matches of different fields AND, ``+`` ORs the groups around it; ``-u`` cannot be ORed
    with a match, so the unit is spelled out as ``-u`` would (minus coredumps): the unit's
    own lines, and PID 1's lines about it.
    """
    unit = worker_unit(user_id)
    argv = ["journalctl", "--no-hostname", f"_SYSTEMD_UNIT={unit}", "+",
            f"UNIT={unit}", "_PID=1", "+", f"USER_ID={user_id}"]
    if follow:
        argv.insert(1, "--follow")
    if lines is not None:
        argv.insert(1, f"--lines={lines}")
    return argv


def cmd_logs(ctx: Ctx) -> int:
    argv = journal_argv(_user(ctx.args.user), ctx.args.follow, ctx.args.lines)
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - argv built from a validated user id
    except FileNotFoundError:
        raise CtlError(FAILED, "no_journalctl", "journalctl not found") from None
    except OSError as exc:
        raise CtlError(FAILED, "exec_failed", f"cannot run journalctl: {exc}") from None
    return FAILED  # pragma: no cover - exec does not return


# --------------------------------------------------------------------------- doctor


def cmd_doctor(ctx: Ctx) -> int:
    checks = doctor.run(ctx.client, configured_socket=ctx.args.socket is None)
    failed = any(c.status == "fail" for c in checks)
    if ctx.json:
        print_json({"ok": not failed, "checks": [c.as_json() for c in checks]})
    else:
        _out().write(doctor.text(checks))
    return FAILED if failed else OK


# --------------------------------------------------------------------------- main


def _user(value: str) -> str:
    try:
        return validate_user_id(value)
    except UserIdError as exc:
        raise CtlError(USAGE, "bad_user_id", str(exc)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of text")
    parser = _Parser(
        prog="wabridgectl", parents=[common],
        description="Link, inspect and manage the WhatsApp accounts of a wabridge host.",
        epilog="exit status: 0 ok, 1 failed, 2 usage, 3 controller unreachable, "
               "4 forbidden, 5 timeout")
    parser.add_argument("--socket", default=None,
                        help="admin socket (default: controller.admin_socket from the config)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = sub.add_parser("link", parents=[common], help="link a WhatsApp account (QR code)")
    p.add_argument("user")
    p.add_argument("--pairing-code", "--phone", metavar="PHONE", default=None,
                   help="show a pairing code for this phone number instead of QR codes")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the link (default 300)")
    p.set_defaults(run=cmd_link)
    p = sub.add_parser("unlink", parents=[common], help="stop an account's worker for good")
    p.add_argument("user")
    p.set_defaults(run=cmd_simple("unlink", "unlink requested for"))
    p = sub.add_parser("restart", parents=[common], help="restart an account's worker")
    p.add_argument("user")
    p.set_defaults(run=cmd_simple("restart", "restart requested for"))
    p = sub.add_parser("status", parents=[common], help="accounts, units and metrics")
    p.add_argument("user", nargs="?")
    p.set_defaults(run=cmd_status)
    p = sub.add_parser("logs", parents=[common], help="an account's journal")
    p.add_argument("user")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=int, default=None)
    p.set_defaults(run=cmd_logs)
    p = sub.add_parser("chats", parents=[common], help="an account's chats")
    p.add_argument("user")
    p.set_defaults(run=cmd_chats)
    one_chat = _Parser(add_help=False)  # <user> <chat>
    one_chat.add_argument("user")
    one_chat.add_argument("chat", help="the contact's phone number or the chat JID")
    p = sub.add_parser("reset", parents=[common, one_chat],
                       help="forget one chat's Claude conversation")
    p.set_defaults(run=cmd_reset)
    p = sub.add_parser("pause", parents=[common, one_chat],
                       help="stop answering one chat (the owner answers it)")
    p.add_argument("--minutes", type=float, default=None, help="for N minutes (default: "
                   "until wabridgectl resume or /resume)")
    p.set_defaults(run=cmd_pause)
    p = sub.add_parser("resume", parents=[common, one_chat], help="answer a paused chat again")
    p.set_defaults(run=cmd_pause)
    p = sub.add_parser("usage", parents=[common],
                       help="usage per user and UTC day (tokens, cost, turns, messages)")
    p.add_argument("user", nargs="?", default=None)
    p.add_argument("--days", type=int, default=1, help="the last N UTC days (default 1: today)")
    p.set_defaults(run=cmd_usage)
    p = sub.add_parser("doctor", parents=[common], help="check this host")
    p.set_defaults(run=cmd_doctor)
    p = sub.add_parser("hosts", parents=[common], help="the fleet's hosts (fleet.enabled)")
    p.set_defaults(run=cmd_hosts)
    p = sub.add_parser("drain", parents=[common],
                       help="move every account off a host, one at a time")
    p.add_argument("host")
    p.set_defaults(run=cmd_drain)
    p = sub.add_parser("undrain", parents=[common], help="let a drained host take accounts")
    p.add_argument("host")
    p.set_defaults(run=cmd_drain)
    p = sub.add_parser("move", parents=[common], help="run an account on another host")
    p.add_argument("user")
    p.add_argument("host")
    p.set_defaults(run=cmd_move)
    return parser


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    try:
        return config.load().controller.admin_socket
    except ConfigError as exc:
        if args.command != "doctor":
            sys.stderr.write(f"wabridgectl: warning: {exc}; using the default admin socket\n")
        return config.ControllerConfig().admin_socket


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    ctx = Ctx(args=args, client=AdminClient(socket_path(args)), json=as_json)
    try:
        return int(args.run(ctx))
    except CtlError as exc:
        if as_json:
            print_json({"error": {"code": exc.code, "message": exc.message}})
        else:
            sys.stderr.write(f"wabridgectl: {exc.message}\n")
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return OK


if __name__ == "__main__":
    raise SystemExit(main())
