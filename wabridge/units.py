"""User ids <-> systemd unit names.

A user id becomes the instance of ``wabridge-worker@.service`` by systemd's own escaping
(``systemd-escape``): ASCII letters, digits, ``:``, ``_`` and ``.`` (not leading) stay as they
are and every other byte becomes ``\\xNN`` (systemd writes ``/`` as ``-``, but a user id never
contains ``/``, so an instance with ``-`` names no user). The mapping is reversible, so the
controller can always tell which user a unit belongs to, and simple ids read naturally:
``alice`` -> ``wabridge-worker@alice.service``.

Accepted user ids: 1 to 128 characters, printable ASCII, no whitespace and no ``/`` (Firestore
document ids cannot contain ``/`` either), whose escaped form fits a unit name (at most 255
characters in all). Anything else raises ``UserIdError`` naming the problem; the controller
writes that onto the document as its ``error`` field.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping

from wabridge.errors import UserIdError

WORKER_PREFIX = "wabridge-worker@"
WORKER_SUFFIX = ".service"
MAX_USER_ID = 128
# systemd refuses unit names of 256 characters or more (UNIT_NAME_MAX); escaping can grow an
# id fourfold, so the escaped instance has its own budget.
UNIT_NAME_MAX = 255
MAX_INSTANCE = UNIT_NAME_MAX - len(WORKER_PREFIX) - len(WORKER_SUFFIX)
_KEEP = frozenset(string.ascii_letters + string.digits + ":_.")
#: systemd's range for ``DynamicUser=`` UIDs (DYNAMIC_UID_MIN..DYNAMIC_UID_MAX); every worker
#: runs as one of these, under a name ``system_user_name`` gives.
DYNAMIC_UIDS = range(61184, 65520)
SYSTEM_USER_PREFIX = "wab-"


def validate_user_id(user_id: object) -> str:
    """Return ``user_id`` if it can name a worker, else raise ``UserIdError``."""
    if not isinstance(user_id, str):
        raise UserIdError(f"user id must be a string, got {type(user_id).__name__}")
    if not user_id:
        raise UserIdError("user id is empty")
    if len(user_id) > MAX_USER_ID:
        raise UserIdError(f"user id is {len(user_id)} characters long; at most {MAX_USER_ID}")
    bad = sorted({c for c in user_id if not (c.isascii() and c.isprintable()) or c.isspace()})
    if bad:
        raise UserIdError(
            f"user id {user_id!r} contains {', '.join(repr(c) for c in bad)}",
            explanation="use printable ASCII without spaces",
        )
    if "/" in user_id:
        raise UserIdError(f"user id {user_id!r} contains '/'")
    if user_id in (".", "..") or (len(user_id) >= 4 and user_id.startswith("__")
                                  and user_id.endswith("__")):
        # Firestore's rule for document ids; both control planes keep to it
        raise UserIdError(f"user id {user_id!r} cannot name a control-plane document",
                          explanation="'.', '..' and ids like '__x__' are reserved")
    escaped = sum(1 if _kept(i, c) else 4 for i, c in enumerate(user_id))
    if escaped > MAX_INSTANCE:
        raise UserIdError(
            f"user id {user_id!r} escapes to {escaped} characters; a unit name allows "
            f"{MAX_INSTANCE}",
            explanation="use fewer characters other than letters, digits, '_', '.' and ':'",
        )
    return user_id


def _kept(index: int, ch: str) -> bool:
    return ch in _KEEP and not (index == 0 and ch == ".")


def escape_instance(user_id: str) -> str:
    """systemd-escape a validated user id into a unit instance string."""
    validate_user_id(user_id)
    out: list[str] = []
    for i, ch in enumerate(user_id):
        if _kept(i, ch):
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}")
    return "".join(out)


def unescape_instance(instance: str) -> str:
    """Reverse :func:`escape_instance`; raises ``UserIdError`` on malformed escapes."""
    out: list[str] = []
    i = 0
    while i < len(instance):
        ch = instance[i]
        if ch == "\\":
            if instance[i + 1 : i + 2] != "x" or len(instance) < i + 4:
                raise UserIdError(f"malformed escape in unit instance {instance!r}")
            try:
                out.append(chr(int(instance[i + 2 : i + 4], 16)))
            except ValueError as exc:
                raise UserIdError(f"malformed escape in unit instance {instance!r}") from exc
            i += 4
        elif ch == "-":
            out.append("/")
            i += 1
        else:
            out.append(ch)
            i += 1
    return validate_user_id("".join(out))


def worker_unit(user_id: str) -> str:
    """The worker unit name for a user id."""
    return f"{WORKER_PREFIX}{escape_instance(user_id)}{WORKER_SUFFIX}"


def user_of_unit(unit: str) -> str | None:
    """The user id a worker unit belongs to, or None if ``unit`` is not a worker unit."""
    if not (unit.startswith(WORKER_PREFIX) and unit.endswith(WORKER_SUFFIX)):
        return None
    instance = unit[len(WORKER_PREFIX) : -len(WORKER_SUFFIX)]
    if not instance:
        return None
    try:
        user_id = unescape_instance(instance)
    except UserIdError:
        return None
    # Only the canonical spelling names a user: ``a\\x61`` unescapes to ``aa`` too, but is a
    # different unit than ``wabridge-worker@aa.service``.
    return user_id if escape_instance(user_id) == instance else None


def system_user_name(user_id: str) -> str:
    """A short, stable Unix user name for a user's dynamic user (at most 31 characters).

    ``wab-`` + up to 16 safe characters of the id + ``-`` + 10 hex digits of its SHA-256, so
    two ids that share a prefix still get different names; collisions need a 40-bit hash clash.
    """
    validate_user_id(user_id)
    safe = "".join(c for c in user_id.lower() if c.isascii() and c.isalnum())[:16]
    digest = hashlib.sha256(user_id.encode()).hexdigest()[:10]
    return (f"{SYSTEM_USER_PREFIX}{safe}-{digest}" if safe
            else f"{SYSTEM_USER_PREFIX}{digest}")


#: Fleet mode: which host's lease, and which epoch of it, a worker unit runs under. The
#: controller writes both as ``Environment=`` lines into the unit's runtime drop-in before
#: every start (after winning the lease, ``wabridge.fleet_db.acquire``); the worker fences
#: every write with them and exits "lease lost" without them.
HOST_ID_ENV = "WABRIDGE_HOST_ID"
LEASE_EPOCH_ENV = "WABRIDGE_LEASE_EPOCH"


def lease_environment(host_id: str, epoch: int) -> dict[str, str]:
    """The drop-in's environment for a worker started under ``host_id``'s lease ``epoch``
    (merge it into ``controller.systemd.worker_dropin``'s ``environment``)."""
    return {HOST_ID_ENV: host_id, LEASE_EPOCH_ENV: str(int(epoch))}


def lease_from_environment(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """``(host_id, epoch)`` from a worker's environment, or None when either is missing or
    malformed (the worker then owns nothing and must not connect)."""
    host_id = environ.get(HOST_ID_ENV, "")
    epoch = environ.get(LEASE_EPOCH_ENV, "")
    if not host_id or not epoch.isdigit():
        return None
    return host_id, int(epoch)
