"""One error tree for the whole fleet.

    WabridgeError                 code, explanation, exit_code
    ├── ConfigError               a bad configuration value           exit 78 (EX_CONFIG)
    ├── UserIdError               a user id that cannot name a unit   (reported on the document)
    ├── ProtocolError             a malformed worker<->controller frame (error frame back)
    ├── PolicyError               a bad per-user setting (shown on the document)
    ├── SchemaTooNew              a database newer than this code     exit 16 (no restart)
    └── ForeignRecordError        a write that would replace another user's record

Every error carries a stable ``code`` (what scripts and documents match on) and an
``explanation`` telling the operator what to do. Foreign exceptions are mapped into this tree
in one place per adapter, never in the core.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of wabridge processes.

    Codes from 10 up are "do not restart" outcomes: the worker unit lists them in
    ``RestartPreventExitStatus=`` (``NO_RESTART_EXIT_CODES``) so systemd leaves the unit
    stopped, like an OTP transient child that ended normally; the account outcomes among
    them (10-14) and their document statuses are ``wabridge.status.EXIT_OUTCOMES``.
    tests/test_exit_codes.py checks both unit files against these tables.
    """

    OK = 0
    FAILURE = 1  # unexpected: systemd restarts (Restart=on-failure)
    RECONNECT = 75  # EX_TEMPFAIL: the WhatsApp link could not be kept; a fresh process retries
    CONFIG = 78  # EX_CONFIG: bad configuration, restarting cannot help
    LOGGED_OUT = 10  # the phone removed this linked device; a new QR scan is needed
    BANNED = 11  # WhatsApp banned the number (temporarily or for good)
    REPLACED = 12  # another client took over this session (stream replaced)
    OUTDATED = 13  # WhatsApp says this client version is too old: upgrade wabridge
    QR_EXPIRED = 14  # nobody scanned the QR codes in time
    BAD_USER = 15  # the unit instance does not name a valid user
    SCHEMA_TOO_NEW = 16  # a database was written by a newer wabridge: downgrading cannot read it


NO_RESTART_EXIT_CODES = (
    ExitCode.CONFIG,
    ExitCode.LOGGED_OUT,
    ExitCode.BANNED,
    ExitCode.REPLACED,
    ExitCode.OUTDATED,
    ExitCode.QR_EXPIRED,
    ExitCode.BAD_USER,
    ExitCode.SCHEMA_TOO_NEW,
)

#: What an operator does about a do-not-restart exit (shown in the document's ``error``).
EXIT_EXPLANATIONS = {
    ExitCode.CONFIG: "a configuration value is invalid; the journal names the key",
    ExitCode.BAD_USER: "the unit instance does not name a valid user id",
    ExitCode.SCHEMA_TOO_NEW: "its state database was written by a newer wabridge; install "
                             "that version (or a newer one) again; the data is left untouched",
}


class WabridgeError(Exception):
    """Base of every error wabridge raises on purpose."""

    code: str = "wabridge_error"
    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, explanation: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.explanation = explanation

    def __str__(self) -> str:
        if self.explanation:
            return f"{self.message} ({self.explanation})"
        return self.message


class ConfigError(WabridgeError):
    """A configuration value is missing, of the wrong type, or out of range."""

    code = "bad_config"
    exit_code = ExitCode.CONFIG

    def __init__(self, key: str, problem: str, *, allowed: str = "") -> None:
        message = f"config key {key!r}: {problem}"
        super().__init__(message, explanation=f"allowed: {allowed}" if allowed else "")
        self.key = key
        self.problem = problem
        self.allowed = allowed


class UserIdError(WabridgeError):
    """A user id that cannot be mapped to a systemd unit instance name."""

    code = "bad_user_id"
    exit_code = ExitCode.BAD_USER


class ProtocolError(WabridgeError):
    """A frame on the worker<->controller socket that does not parse."""

    code = "bad_frame"


class PolicyError(WabridgeError):
    """A per-user setting on a control-plane document that does not validate."""

    code = "bad_setting"


class SchemaTooNew(WabridgeError):
    """A SQLite database (the worker's state, the local control plane) has a schema version
    newer than this code: a downgrade. Restarting cannot help, so it is a do-not-restart
    exit in both units."""

    code = "schema_too_new"
    exit_code = ExitCode.SCHEMA_TOO_NEW


class ForeignRecordError(WabridgeError):
    """A control-plane write whose record belongs to another user. Never carried out: the
    worker's frame is answered with this code (and its ``seq``), so it is not re-sent."""

    code = "not_your_record"
