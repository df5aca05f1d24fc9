"""What the worker does about each WhatsApp link event: a pure table.

``decide(event)`` returns the state to report and, for outcomes that end the process, the exit
code systemd sees. Exit codes >= 10 are in ``RestartPreventExitStatus=``: systemd leaves the
unit stopped (a logout is a normal end, not a crash). ``ExitCode.RECONNECT`` is a failure on
purpose: systemd restarts the worker, because neonize must never ``connect()`` twice in one
process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.whatsapp import events as ev
from wabridge.errors import ExitCode
from wabridge.status import WorkerState


@dataclass(frozen=True)
class Outcome:
    state: WorkerState | None  # None: nothing to report
    detail: str = ""
    exit_code: ExitCode | None = None  # set: stop the worker with this code
    wipe_session: bool = False  # the WhatsApp store is void (logged out)
    start_reconnect_clock: bool = False
    stop_reconnect_clock: bool = False


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


# ConnectFailure codes (whatsmeow's ConnectFailureReason, lower case) that mean "this client
# is too old": 405 CLIENT_OUTDATED and 409 BAD_USER_AGENT. whatsmeow deletes its store only for
# 401/403/406, so the session stays valid: stop, keep the store, tell the operator to upgrade.
OUTDATED_CODES = frozenset({"client_outdated", "bad_user_agent"})
BANNED_CODES = frozenset({"temp_banned"})
# ev.LIBRARY_STOPPED: the library's event loop ended by itself (neonize cannot encode an event
# Go received, e.g. a ban code it does not map). A new process would be refused the same way,
# so the worker stops instead of re-dialling WhatsApp in a loop.


def decide(event: ev.Event) -> Outcome:
    match event:
        case ev.QrCode():
            return Outcome(WorkerState.WAITING_QR, "waiting for QR scan")
        case ev.PairingCode(code=code):
            return Outcome(WorkerState.PAIRING, f"enter pairing code {code} on the phone")
        case ev.Connected(phone=phone):
            return Outcome(WorkerState.CONNECTED, f"connected as +{phone}",
                            stop_reconnect_clock=True)
        case ev.Disconnected(reason=reason):
            return Outcome(WorkerState.DISCONNECTED, f"reconnecting: {reason}",
                            start_reconnect_clock=True)
        case ev.LoggedOut(reason=reason):
            return Outcome(
                WorkerState.LOGGED_OUT,
                "logged out from the phone" + (f": {reason}" if reason else "")
                + "; link again with a new QR scan",
                ExitCode.LOGGED_OUT,
                wipe_session=True,
            )
        case ev.StreamReplaced():
            return Outcome(
                WorkerState.REPLACED,
                "another client took over this WhatsApp session; not reconnecting",
                ExitCode.REPLACED,
            )
        case ev.TemporaryBan(reason=reason, expires_at=expires):
            return Outcome(
                WorkerState.BANNED,
                f"temporarily banned by WhatsApp ({reason}) until {_when(expires)}",
                ExitCode.BANNED,
            )
        case ev.ClientOutdated():
            return Outcome(
                WorkerState.OUTDATED,
                "WhatsApp rejected this client version (405): upgrade wabridge",
                ExitCode.OUTDATED,
            )
        case ev.ConnectFailure(reason=reason, code=code) if code in OUTDATED_CODES:
            return Outcome(
                WorkerState.OUTDATED,
                f"WhatsApp rejected this client ({reason}): upgrade wabridge; the session is "
                "kept",
                ExitCode.OUTDATED,
            )
        case ev.ConnectFailure(reason=reason, code=code) if code in BANNED_CODES:
            return Outcome(WorkerState.BANNED, f"temporarily banned by WhatsApp ({reason})",
                            ExitCode.BANNED)
        case ev.ConnectFailure(reason=reason, code=code) if code == ev.LIBRARY_STOPPED:
            return Outcome(
                WorkerState.BANNED,
                "WhatsApp ended the connection with an event this client cannot read "
                f"(often a ban): {reason}; not reconnecting: check the phone, then restart "
                "the account",
                ExitCode.BANNED,
            )
        case ev.ConnectFailure(reason=reason, permanent=True):
            return Outcome(WorkerState.LOGGED_OUT, f"connection refused for good: {reason}",
                            ExitCode.LOGGED_OUT, wipe_session=True)
        case ev.ConnectFailure(reason=reason):
            return Outcome(WorkerState.DISCONNECTED, f"connect failed: {reason}",
                            start_reconnect_clock=True)
        case ev.QrExpired():
            return Outcome(WorkerState.QR_EXPIRED,
                            "no QR code was scanned in time; request the link again",
                            ExitCode.QR_EXPIRED)
        case ev.IncomingMessage():
            return Outcome(None)
    return Outcome(None)
