"""One error tree for the whole fleet, drawn as it is (module, then ``code``).

    WabridgeError                 wabridge.errors       code, explanation, exit_code
    ├── ConfigError               wabridge.errors       bad_config: a bad configuration value,
    │                                                   exit 78 (EX_CONFIG, not restarted)
    ├── UserIdError               wabridge.errors       bad_user_id: a user id that cannot name
    │                                                   a unit, exit 15 (not restarted)
    ├── ProtocolError             wabridge.errors       bad_frame: a malformed worker<->controller
    │                                                   frame (an error frame goes back)
    ├── SchemaTooNew              wabridge.errors       schema_too_new: a state file a newer
    │                                                   wabridge wrote, exit 16 (not restarted)
    ├── LeaseLost                 wabridge.errors       lease_lost: fleet mode, this host no
    │                                                   longer owns the account, exit 17 (not
    │                                                   restarted)
    ├── SchemaMissing             wabridge.postgres     postgres_schema_missing: the account's
    │                                                   schema is not made yet (controller's job)
    ├── StoreUnavailable          controller.pg_roles   store_unavailable: the account's role
    │                                                   could not be prepared (start refused)
    ├── FleetUnavailable          controller.fleet      fleet_unavailable: the fleet's tables
    │                                                   cannot be reached (nothing is started;
    │                                                   running workers keep their leases)
    ├── ForeignRecordError        wabridge.errors       not_your_record: a write that would
    │                                                   replace another user's record (refused)
    ├── TranscriptionError        wabridge.errors       not_transcribed: a voice note the
    │                                                   endpoint did not transcribe (answered
    │                                                   as not supported, the reason logged)
    ├── PolicyError               wabridge.errors       bad_setting: a bad per-user setting
    │   └── InvalidSetting        agent.policy          (shown on the user's document)
    ├── ClaudeError               agent.claude          code per instance: timeout,
    │                                                   process_exited, protocol, not_configured,
    │                                                   resume_failed (answered with the apology)
    ├── SendError                 agent.whatsapp.base   send_failed: a reply WhatsApp did not
    │                                                   take (kept in the outbox, retried)
    ├── NeonizeStoreError         agent.whatsapp.neonize_import
    │                                                   whatsapp_store: the session store cannot
    │                                                   be opened or created
    ├── SpillUnreadable           agent.inbound_spill   spill_unreadable: the file of messages a
    │                                                   stop could not commit does not parse
    │                                                   (moved aside as *.bad, the worker goes on)
    ├── SystemdError              controller.unit_manager
    │                                                   code per instance: no_such_unit,
    │                                                   unavailable, failed
    ├── PlaneError                controller.plane      plane_error
    │   ├── PlaneUnavailable      controller.plane      plane_unavailable (retry later)
    │   └── PlaneDenied           controller.plane      plane_denied (credentials; no retry)
    ├── AdminError                controller.admin      code per instance (ADMIN_EXPLANATIONS):
    │                                                   an admin-socket error answer
    └── CtlError                  controller.ctl        code per instance; exit_status is
                                                        wabridgectl's exit status (0-5)

Not yet under ``WabridgeError``: ``sim.world.WorldError`` (the simulator's HTTP errors).
``agent.whatsapp.sim._Terminal`` is internal control flow, never seen outside its module.

Every error carries a stable ``code`` (what scripts and documents match on) and an
``explanation`` telling the operator what to do: a class states the usual one, a raise may
state a more precise one (which then also shows in ``str()``). Foreign exceptions are mapped
into this tree in one place per adapter, never in the core.
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
    LEASE_LOST = 17  # fleet: this host no longer owns the account (another may run it now)


NO_RESTART_EXIT_CODES = (
    ExitCode.CONFIG,
    ExitCode.LOGGED_OUT,
    ExitCode.BANNED,
    ExitCode.REPLACED,
    ExitCode.OUTDATED,
    ExitCode.QR_EXPIRED,
    ExitCode.BAD_USER,
    ExitCode.SCHEMA_TOO_NEW,
    ExitCode.LEASE_LOST,
)

#: What an operator does about a do-not-restart exit (shown in the document's ``error``).
EXIT_EXPLANATIONS = {
    ExitCode.CONFIG: "a configuration value is invalid; the journal names the key",
    ExitCode.BAD_USER: "the unit instance does not name a valid user id",
    ExitCode.SCHEMA_TOO_NEW: "its state database was written by a newer wabridge; install "
                             "that version (or a newer one) again; the data is left untouched",
    ExitCode.LEASE_LOST: "this host lost the account's lease (it could not renew it in time, "
                         "or another host took it over); the fleet runs it where the lease is",
}


class WabridgeError(Exception):
    """Base of every error wabridge raises on purpose."""

    code: str = "wabridge_error"
    exit_code: ExitCode = ExitCode.FAILURE
    #: what an operator does about this kind of error; a raise may say more precisely
    explanation: str = ""

    def __init__(self, message: str, *, explanation: str = "") -> None:
        super().__init__(message)
        self.message = message
        self._stated = explanation
        self.explanation = explanation or type(self).explanation

    def __str__(self) -> str:
        if self._stated:
            return f"{self.message} ({self._stated})"
        return self.message


class ConfigError(WabridgeError):
    """A configuration value is missing, of the wrong type, or out of range."""

    code = "bad_config"
    exit_code = ExitCode.CONFIG
    explanation = ("fix the key in /etc/wabridge/wabridge.toml (docs/configuration.md lists "
                   "every key), then start the unit again")

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
    explanation = "use a user id of printable ASCII without spaces, short enough for a unit name"


class ProtocolError(WabridgeError):
    """A frame on the worker<->controller socket that does not parse."""

    code = "bad_frame"
    explanation = ("the worker and the controller speak different protocol versions: run the "
                   "same wabridge version on both sides")


class SchemaTooNew(WabridgeError):
    """A state file written by a newer wabridge (its schema version is higher than this code
    knows): the worker's state, the local control plane. Not restarted (one do-not-restart exit
    in both units): only an upgrade helps, and an older wabridge must not guess."""

    code = "schema_too_new"
    exit_code = ExitCode.SCHEMA_TOO_NEW
    explanation = "a newer wabridge wrote this state; upgrade instead of downgrading"


class LeaseLost(WabridgeError):
    """Fleet mode: this worker's lease on its account is gone (another host's epoch, released,
    or not renewed in time). Raised inside a fenced write transaction (which then rolls back:
    a stale owner neither sends nor acknowledges) or by the renewal; the worker disconnects
    WhatsApp and exits with ``ExitCode.LEASE_LOST``, which systemd does not restart."""

    code = "lease_lost"
    exit_code = ExitCode.LEASE_LOST
    explanation = ("another host owns this account now, or this one could not renew its "
                   "lease in time (PostgreSQL unreachable, the host frozen); nothing to do")


class PolicyError(WabridgeError):
    """A per-user setting on a control-plane document that does not validate."""

    code = "bad_setting"
    explanation = "fix the setting on the user's document; the previous settings stay in force"


class ForeignRecordError(WabridgeError):
    """A control-plane write whose record belongs to another user. Never carried out: the
    worker's frame is answered with this code (and its ``seq``), so it is not re-sent."""

    code = "not_your_record"
    explanation = "a worker wrote under another user's id; its frame was dropped"


class TranscriptionError(WabridgeError):
    """A voice note that could not be transcribed; the message says why. The note is then
    answered as not supported (the reason in the worker's log)."""

    code = "not_transcribed"
    explanation = "check transcription.url and the endpoint's log"
