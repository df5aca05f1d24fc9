"""What the worker does about each WhatsApp link event."""

from __future__ import annotations

import calendar
import typing

import pytest

from agent.outcomes import Outcome, decide
from agent.whatsapp import events as ev
from wabridge.errors import NO_RESTART_EXIT_CODES, ExitCode
from wabridge.status import WorkerState

BAN_UNTIL = float(calendar.timegm((2030, 1, 2, 3, 4, 0, 0, 0, 0)))

ROWS: list[tuple[ev.Event, WorkerState | None, ExitCode | None, bool, str]] = [
    # event, state, exit code, wipe session, words in the detail
    (ev.QrCode(code="2@abc"), WorkerState.WAITING_QR, None, False, "QR"),
    (ev.PairingCode(code="ABCD-EFGH"), WorkerState.PAIRING, None, False, "ABCD-EFGH"),
    (ev.Connected(jid="4915@s.whatsapp.net", phone="4915", push_name="A"),
     WorkerState.CONNECTED, None, False, "+4915"),
    (ev.Disconnected(reason="socket closed"), WorkerState.DISCONNECTED, None, False,
     "socket closed"),
    (ev.LoggedOut(reason="removed from phone"), WorkerState.LOGGED_OUT, ExitCode.LOGGED_OUT,
     True, "removed from phone"),
    (ev.LoggedOut(), WorkerState.LOGGED_OUT, ExitCode.LOGGED_OUT, True, "new QR scan"),
    (ev.StreamReplaced(), WorkerState.REPLACED, ExitCode.REPLACED, False, "another client"),
    (ev.TemporaryBan(reason="spam", expires_at=BAN_UNTIL), WorkerState.BANNED, ExitCode.BANNED,
     False, "until 2030-01-02 03:04 UTC"),
    (ev.TemporaryBan(reason="spam", expires_at=None), WorkerState.BANNED, ExitCode.BANNED,
     False, "until unknown"),
    (ev.ClientOutdated(), WorkerState.OUTDATED, ExitCode.OUTDATED, False, "upgrade"),
    (ev.ConnectFailure(reason="401 unauthorized", permanent=True), WorkerState.LOGGED_OUT,
     ExitCode.LOGGED_OUT, True, "401 unauthorized"),
    (ev.ConnectFailure(reason="503 unavailable", permanent=False), WorkerState.DISCONNECTED,
     None, False, "503 unavailable"),
    # 409: whatsmeow keeps its store; the session is valid, only the client is refused
    (ev.ConnectFailure(reason="bad_user_agent", permanent=False, code="bad_user_agent"),
     WorkerState.OUTDATED, ExitCode.OUTDATED, False, "upgrade wabridge"),
    (ev.ConnectFailure(reason="client_outdated", permanent=False, code="client_outdated"),
     WorkerState.OUTDATED, ExitCode.OUTDATED, False, "upgrade wabridge"),
    (ev.ConnectFailure(reason="temp_banned", permanent=False, code="temp_banned"),
     WorkerState.BANNED, ExitCode.BANNED, False, "temp_banned"),
    (ev.ConnectFailure(reason="logged_out", permanent=True, code="logged_out"),
     WorkerState.LOGGED_OUT, ExitCode.LOGGED_OUT, True, "logged_out"),
    # neonize's event loop ended on an event Go could not encode: stop, raw text shown
    (ev.ConnectFailure(reason="proto: required field neonize.TemporaryBan.Code not set",
                       permanent=False, code=ev.LIBRARY_STOPPED),
     WorkerState.BANNED, ExitCode.BANNED, False, "neonize.TemporaryBan.Code not set"),
    (ev.QrExpired(), WorkerState.QR_EXPIRED, ExitCode.QR_EXPIRED, False, "in time"),
    (ev.IncomingMessage(wa_id="w", chat_id="c", sender="s", text="hi", timestamp=1.0),
     None, None, False, ""),
    # about chats, not the link (the engine keeps, counts and reports them)
    (ev.ChatExpiration(chat_id="c", seconds=604800), None, None, False, ""),
    (ev.Undecryptable(chat_id="c", sender="s", wa_id="w"), None, None, False, ""),
    (ev.StreamError(code="515"), None, None, False, ""),
]


@pytest.mark.parametrize(("event", "state", "exit_code", "wipe", "words"), ROWS,
                         ids=[type(r[0]).__name__ for r in ROWS])
def test_decide(
    event: ev.Event, state: WorkerState | None, exit_code: ExitCode | None, wipe: bool,
    words: str,
) -> None:
    decision = decide(event)
    assert decision.state is state
    assert decision.exit_code is exit_code
    assert decision.wipe_session is wipe
    assert words in decision.detail


def test_banned_detail_names_the_reason() -> None:
    assert "(spam)" in decide(ev.TemporaryBan(reason="spam", expires_at=None)).detail


def test_incoming_message_is_nothing() -> None:
    msg = ev.IncomingMessage(wa_id="w", chat_id="c", sender="s", text="hi", timestamp=1.0)
    assert decide(msg) == Outcome(None)


def test_no_stopping_outcome_starts_the_reconnect_clock() -> None:
    # a stopped worker must not be re-dialled: neither by the clock nor by systemd
    for event, *_ in ROWS:
        decision = decide(event)
        if decision.exit_code is not None:
            assert not decision.start_reconnect_clock, event


def test_reconnect_clock() -> None:
    assert decide(ev.Disconnected(reason="x")).start_reconnect_clock
    assert decide(ev.ConnectFailure(reason="x", permanent=False)).start_reconnect_clock
    connected = decide(ev.Connected(jid="j", phone="1"))
    assert connected.stop_reconnect_clock
    assert not connected.start_reconnect_clock
    assert not decide(ev.QrCode(code="c")).start_reconnect_clock


def test_every_event_type_has_a_row() -> None:
    assert {type(r[0]) for r in ROWS} == set(typing.get_args(ev.Event))


def test_every_stopping_outcome_is_a_no_restart_exit_code() -> None:
    # systemd must leave the unit stopped for these (RestartPreventExitStatus=)
    for event, *_ in ROWS:
        code = decide(event).exit_code
        if code is not None:
            assert code in NO_RESTART_EXIT_CODES
            assert code >= 10


def test_only_a_lost_session_is_wiped() -> None:
    wiped = {type(r[0]) for r in ROWS if decide(r[0]).wipe_session}
    assert wiped == {ev.LoggedOut, ev.ConnectFailure}
    assert all(decide(r[0]).exit_code == ExitCode.LOGGED_OUT for r in ROWS
               if decide(r[0]).wipe_session)
