"""agent.outcomes: every event's whole decision, written out (issue 20).

``test_outcomes.py`` checks a word of each detail; the detail is what the document's
``statusDetail`` shows the operator, so here each decision is spelled out in full: a changed
message, a clock flag or a wiped session is a failure, not a survivor.
"""

from __future__ import annotations

import calendar

import pytest

from agent.outcomes import Outcome, decide
from agent.whatsapp import events as ev
from wabridge.errors import ExitCode
from wabridge.status import WorkerState as W

UNTIL = float(calendar.timegm((2030, 1, 2, 3, 4, 0, 0, 0, 0)))

DECISIONS: list[tuple[ev.Event, Outcome]] = [
    (ev.QrCode(code="2@abc"), Outcome(W.WAITING_QR, "waiting for QR scan")),
    (ev.PairingCode(code="ABCD-EFGH"),
     Outcome(W.PAIRING, "enter pairing code ABCD-EFGH on the phone")),
    (ev.Connected(jid="4915@s.whatsapp.net", phone="4915"),
     Outcome(W.CONNECTED, "connected as +4915", stop_reconnect_clock=True)),
    (ev.Disconnected(reason="socket closed"),
     Outcome(W.DISCONNECTED, "reconnecting: socket closed", start_reconnect_clock=True)),
    (ev.LoggedOut(reason="removed"),
     Outcome(W.LOGGED_OUT, "logged out from the phone: removed; link again with a new QR scan",
              ExitCode.LOGGED_OUT, wipe_session=True)),
    (ev.LoggedOut(),
     Outcome(W.LOGGED_OUT, "logged out from the phone; link again with a new QR scan",
              ExitCode.LOGGED_OUT, wipe_session=True)),
    (ev.StreamReplaced(),
     Outcome(W.REPLACED, "another client took over this WhatsApp session; not reconnecting",
              ExitCode.REPLACED)),
    (ev.TemporaryBan(reason="spam", expires_at=UNTIL),
     Outcome(W.BANNED, "temporarily banned by WhatsApp (spam) until 2030-01-02 03:04 UTC",
              ExitCode.BANNED)),
    (ev.TemporaryBan(reason="spam", expires_at=None),
     Outcome(W.BANNED, "temporarily banned by WhatsApp (spam) until unknown", ExitCode.BANNED)),
    (ev.ClientOutdated(),
     Outcome(W.OUTDATED, "WhatsApp rejected this client version (405): upgrade wabridge",
              ExitCode.OUTDATED)),
    (ev.ConnectFailure(reason="401 unauthorized", permanent=True),
     Outcome(W.LOGGED_OUT, "connection refused for good: 401 unauthorized",
              ExitCode.LOGGED_OUT, wipe_session=True)),
    (ev.ConnectFailure(reason="503 unavailable", permanent=False),
     Outcome(W.DISCONNECTED, "connect failed: 503 unavailable", start_reconnect_clock=True)),
    # 405 and 409: the client is too old; the session stays valid, so nothing is wiped
    (ev.ConnectFailure(reason="409 bad user agent", permanent=False, code="bad_user_agent"),
     Outcome(W.OUTDATED, "WhatsApp rejected this client (409 bad user agent): upgrade "
                         "wabridge; the session is kept", ExitCode.OUTDATED)),
    (ev.ConnectFailure(reason="405", permanent=True, code="client_outdated"),
     Outcome(W.OUTDATED, "WhatsApp rejected this client (405): upgrade wabridge; the session "
                         "is kept", ExitCode.OUTDATED)),
    (ev.ConnectFailure(reason="402 temp banned", permanent=False, code="temp_banned"),
     Outcome(W.BANNED, "temporarily banned by WhatsApp (402 temp banned)", ExitCode.BANNED)),
    (ev.ConnectFailure(reason="unknown ban code 418", permanent=False,
                       code=ev.LIBRARY_STOPPED),
     Outcome(W.BANNED, "WhatsApp ended the connection with an event this client cannot read "
                       "(often a ban): unknown ban code 418; not reconnecting: check the phone, "
                       "then restart the account", ExitCode.BANNED)),
    # a code the table does not know falls through to permanent / transient
    (ev.ConnectFailure(reason="500 internal", permanent=False, code="internal_server_error"),
     Outcome(W.DISCONNECTED, "connect failed: 500 internal", start_reconnect_clock=True)),
    (ev.QrExpired(),
     Outcome(W.QR_EXPIRED, "no QR code was scanned in time; request the link again",
              ExitCode.QR_EXPIRED)),
    (ev.IncomingMessage(wa_id="w", chat_id="c", sender="s", text="hi", timestamp=1.0),
     Outcome(None)),
]


@pytest.mark.parametrize(("event", "decision"), DECISIONS,
                         ids=[f"{type(e).__name__}-{k}" for k, (e, _) in enumerate(DECISIONS)])
def test_whole_decision(event: ev.Event, decision: Outcome) -> None:
    assert decide(event) == decision


def test_a_decision_reports_nothing_by_default() -> None:
    assert Outcome(None) == Outcome(None, "", None, wipe_session=False,
                                      start_reconnect_clock=False, stop_reconnect_clock=False)
