"""The closed sets of states the fleet talks about.

``DocStatus`` is what a control-plane document (Firestore ``user_sessions/{uid}`` or the local
store's row) says; clients write the ``*_requested`` ones, the controller writes the rest.
``WorkerState`` is what a worker reports about its WhatsApp link (modelled on mautrix's
bridge states). ``doc_status_for`` maps one onto the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from wabridge.errors import ExitCode


class DocStatus(StrEnum):
    # written by clients (an app, wabridgectl)
    CREATE_REQUESTED = "create_requested"
    DESTROY_REQUESTED = "destroy_requested"
    RESTART_REQUESTED = "restart_requested"
    PAIRING_REQUESTED = "pairing_requested"
    # written by the controller
    STARTING = "starting"
    WAITING_QR = "waiting_qr"
    PAIRING = "pairing"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    LOGGED_OUT = "logged_out"
    BANNED = "banned"
    REPLACED = "replaced"
    OUTDATED = "outdated"
    QR_EXPIRED = "qr_expired"
    CRASHED = "crashed"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


REQUESTS = frozenset(
    {
        DocStatus.CREATE_REQUESTED,
        DocStatus.DESTROY_REQUESTED,
        DocStatus.RESTART_REQUESTED,
        DocStatus.PAIRING_REQUESTED,
    }
)

# Statuses under which the document expects a running worker.
RUNNING_STATUSES = frozenset(
    {
        DocStatus.STARTING,
        DocStatus.WAITING_QR,
        DocStatus.PAIRING,
        DocStatus.CONNECTED,
        DocStatus.DISCONNECTED,
    }
)


#: The outcomes a worker ends with by itself, and the exit code of each: the one table. The
#: worker exits with the code (``agent.outcomes``); systemd counts it a success and leaves the
#: unit stopped (``SuccessExitStatus=``/``RestartPreventExitStatus=`` of the worker unit,
#: checked against this table by tests/test_exit_codes.py); the controller turns the code
#: back into the document's status (``controller.reconcile``), also for a worker that ended
#: while the controller was down.
EXIT_OUTCOMES: Mapping[ExitCode, DocStatus] = MappingProxyType({
    ExitCode.LOGGED_OUT: DocStatus.LOGGED_OUT,
    ExitCode.BANNED: DocStatus.BANNED,
    ExitCode.REPLACED: DocStatus.REPLACED,
    ExitCode.OUTDATED: DocStatus.OUTDATED,
    ExitCode.QR_EXPIRED: DocStatus.QR_EXPIRED,
})
OUTCOME_STATUSES = frozenset(EXIT_OUTCOMES.values())


class WorkerState(StrEnum):
    STARTING = "starting"
    WAITING_QR = "waiting_qr"
    PAIRING = "pairing"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # transient: the library reconnects by itself
    LOGGED_OUT = "logged_out"
    BANNED = "banned"
    REPLACED = "replaced"
    OUTDATED = "outdated"
    QR_EXPIRED = "qr_expired"
    STOPPING = "stopping"


def doc_status_for(state: WorkerState) -> DocStatus:
    """The document status that mirrors a worker state (same spelling by design)."""
    return DocStatus(state.value)


def parse_doc_status(value: object) -> DocStatus | None:
    """A document's status, or None when it is absent or not one we know."""
    if not isinstance(value, str):
        return None
    try:
        return DocStatus(value)
    except ValueError:
        return None
