"""The Firestore control plane (``controller.control_plane = "firestore"``).

Over 600 lines because it is the one adapter of the Firestore SDK: the error mapping, the
listener's workarounds and their supervisor change together with the SDK, and the notes
below record what each works around.

Client: ``google.cloud.firestore.Client`` directly, not ``firebase_admin``. firebase-admin only
wraps that same client (``firebase_admin.firestore.client`` builds one from the app's
credential), but its credential classes cannot express "anonymous", which the emulator needs,
and every app needs a process-unique name. Building the client ourselves keeps one code path:

- ``firebase.emulator_host`` set: ``AnonymousCredentials`` and ``firebase.project_id`` (required);
  the client is pointed at the emulator through its ``_emulator_host`` attribute, which is what
  the SDK itself derives from ``$FIRESTORE_EMULATOR_HOST`` in its constructor (checked below, so
  an SDK that renames it fails loudly). The configuration is the only source of truth: a
  ``$FIRESTORE_EMULATOR_HOST`` in the environment is ignored (overridden both ways), so a
  stray variable can never divert a production controller.
- otherwise: a service-account JSON key from ``firebase.credentials``, or from
  ``$CREDENTIALS_DIRECTORY/firebase`` when that is empty (systemd ``LoadCredential=firebase:...``);
  the project is ``firebase.project_id`` or the key's ``project_id``. Nothing ever calls
  ``google.auth.default()``, so the SDK never probes the GCE metadata server.

A missing, unreadable or malformed key raises ``ConfigError`` naming ``firebase.credentials``.

Errors: every blocking client call runs in ``asyncio.to_thread`` through ``_call``, which maps
google-api-core / google-auth exceptions in ONE place, :func:`map_error`:

- :class:`PlaneUnavailable` (``plane_unavailable``): the backend could not be reached or was
  overloaded (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, ABORTED after the
  transaction's own retries, retries exhausted, token endpoint unreachable). Transient: retry
  later with backoff.
- :class:`PlaneDenied` (``plane_denied``): credentials rejected or rules/IAM deny access
  (UNAUTHENTICATED, PERMISSION_DENIED, token refresh refused). Retrying will not help.
- :class:`PlaneError` (``plane_error``): any other backend answer (e.g. FAILED_PRECONDITION for
  a missing composite index, whose message carries the console link to create it).

Unary calls retry transient errors with backoff for at most ``deadline`` seconds (default
30 s; the SDK's defaults are 60-300 s per call). Transaction begin/commit use the SDK's own
60 s deadline, which it does not let callers change.

Watching: a query snapshot listener on the collection. Its callback runs on the SDK's consumer
thread; it parses the documents there and hands them to the event loop with
``loop.call_soon_threadsafe``. Adjustments to the SDK's ``Watch`` (``_Listener``): a
stream may re-open itself in place only a few times in 10 s (the SDK alone re-opens in a busy
loop, burning a whole core, while the backend is unreachable), and a terminal stream error is
recorded instead of being raised in a throw-away thread (the stock SDK also treats a server's
RST_STREAM/CANCELLED as terminal: its listener silently stops for good). And it keeps up with
a busy collection: the SDK spends ~30 ms of one core per snapshot on 100 documents (it sorts
the whole result with a comparator that builds protobuf messages on every call, and decodes
and deep-copies every document it is sent), and the emulator sends every document of the
query again after every commit, so a burst of requests plus the controller's own writes
(claims, unit facts, ``process``, ``metrics``) once put the feed tens of seconds behind,
until the resync handled the requests instead. ``_Listener`` orders by path directly and
keeps the snapshot it holds for a document sent again unchanged: ~1 ms per commit. A supervisor
task checks the listener twice a second; a dead listener is logged and replaced with
exponential backoff (0.5 s .. 30 s, jittered). The first snapshot of a new listener is
compared with the documents known so far, so documents deleted while it was down arrive as
``Removed``.

Indexes: ``messages()`` queries ``userId ==`` ordered by ``ts`` descending, which production
Firestore serves only with a composite index on ``messages`` (``userId`` ASC, ``ts`` DESC);
the emulator does not need it. Without it the call raises ``PlaneError`` whose message
contains the link that creates it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import google.auth.exceptions as auth_exceptions
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.api_core.bidi import BackgroundConsumer, ResumableBidiRpc
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import firestore
from google.cloud.firestore_v1 import watch as watch_module
from google.cloud.firestore_v1.base_query import FieldFilter
from google.oauth2 import service_account

from controller.plane import (
    AccountDoc,
    Change,
    ChangeCallback,
    ControlPlane,
    PlaneDenied,
    PlaneError,
    PlaneUnavailable,
    Removed,
    check_doc_id,
    message_doc_id,
    message_fields,
    parse_account,
    summary_doc_id,
    summary_fields,
    usage_doc_id,
    usage_fields,
)
from wabridge import logs
from wabridge.config import FirebaseConfig
from wabridge.errors import ConfigError, ForeignRecordError, WabridgeError
from wabridge.protocol import MessageEvent, Usage
from wabridge.status import REQUESTS, DocStatus, parse_doc_status

log = logs.get("controller.firestore")

LINK_RECORDS = "sessions"  # the link records (see controller.plane); the name is the contract
MESSAGES = "messages"
SUMMARIES = "summaries"
USAGE = "usage"
DEFAULT_DEADLINE = 30.0
WATCH_CHECK_INTERVAL = 0.5
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
RECOVER_BUDGET = 6
RECOVER_WINDOW = 10.0

T = TypeVar("T")


_UNAVAILABLE = (
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.ResourceExhausted,
    api_exceptions.TooManyRequests,
    api_exceptions.Aborted,
    api_exceptions.RetryError,
    auth_exceptions.TransportError,
)
_DENIED = (
    api_exceptions.Unauthenticated,
    api_exceptions.PermissionDenied,
    auth_exceptions.RefreshError,
    auth_exceptions.DefaultCredentialsError,
)
_TRANSIENT = (
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.ResourceExhausted,
    api_exceptions.TooManyRequests,
)


def map_error(exc: BaseException) -> PlaneError | None:
    """The one place where google exceptions become wabridge errors.

    Walks the exception chain, because the SDK wraps errors: a failed transaction raises
    ``ValueError`` from its rollback with the real error as context, and an exhausted
    transaction retry raises ``ValueError`` from ``Aborted``. Returns None for exceptions
    that are not backend errors (programming errors stay what they are).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, PlaneError):
            return current
        if isinstance(current, WabridgeError):  # ours already (ForeignRecordError)
            return None
        if isinstance(current, _UNAVAILABLE):
            return PlaneUnavailable(
                f"Firestore unavailable: {current}",
                explanation="check the network path to Firestore; the call is retried later",
            )
        if isinstance(current, _DENIED):
            return PlaneDenied(
                f"Firestore denied access: {current}",
                explanation="check firebase.credentials, the project id and the IAM roles",
            )
        if isinstance(current, api_exceptions.GoogleAPIError | auth_exceptions.GoogleAuthError):
            return PlaneError(f"Firestore error: {current}")
        current = current.__cause__ or current.__context__
    return None


def _credentials_path(config: FirebaseConfig) -> Path:
    if config.credentials:
        return Path(config.credentials)
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        raise ConfigError(
            "firebase.credentials",
            "is empty and $CREDENTIALS_DIRECTORY is not set (no LoadCredential=firebase:...)",
            allowed="path to a service-account JSON key, or empty with LoadCredential=",
        )
    return Path(directory) / "firebase"


def _load_key(path: Path) -> dict[str, Any]:
    key = "firebase.credentials"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(key, f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(key, f"{path} cannot be read: {reason}") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(key, f"{path} is not JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ConfigError(
            key,
            f'{path} is not a service-account key ("type": "service_account")',
            allowed="a key file from the Firebase console: Project settings > Service accounts",
        )
    return info


@dataclass(frozen=True)
class _Connection:
    credentials: Credentials
    project: str
    emulator: str | None


def _connection(config: FirebaseConfig) -> _Connection:
    if config.emulator_host:
        if not config.project_id:
            raise ConfigError("firebase.project_id", "is required with firebase.emulator_host")
        return _Connection(AnonymousCredentials(), config.project_id, config.emulator_host)  # type: ignore[no-untyped-call]
    path = _credentials_path(config)
    info = _load_key(path)
    try:
        credentials = service_account.Credentials.from_service_account_info(info)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            "firebase.credentials", f"{path} is not a usable service-account key: {exc}"
        ) from None
    project = config.project_id or info.get("project_id")
    if not isinstance(project, str) or not project:
        raise ConfigError("firebase.project_id", f"is empty and {path} names no project_id")
    return _Connection(credentials, project, None)


def _make_client(conn: _Connection) -> Any:
    client = firestore.Client(project=conn.project, credentials=conn.credentials)
    if not hasattr(client, "_emulator_host"):
        raise RuntimeError(
            "google-cloud-firestore no longer has Client._emulator_host; "
            "controller/firestore.py needs updating"
        )
    client._emulator_host = conn.emulator
    return client


def _delete_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: firestore.DELETE_FIELD if v is None else v for k, v in fields.items()}


REQUEST_VALUES = frozenset(status.value for status in REQUESTS)  # at most 30 for "in"


class _Listener(watch_module.Watch):
    """The SDK's ``Watch``, with a budget for in-place stream recoveries and quiet endings.

    The SDK re-opens a failed listen stream at once and forever when the error is retryable
    (UNAVAILABLE, ...): with the backend unreachable that is a busy loop burning a core. Its
    own remedy (``throttle_reopen``) sleeps inside gRPC's callback thread, which stalls every
    other call on the channel for seconds. Here a stream may recover in place (keeping its
    resume token) ``RECOVER_BUDGET`` times per ``RECOVER_WINDOW`` seconds (each failure may
    count twice: gRPC's thread and the consumer both see it); beyond that the failure counts
    as terminal, the stream ends, and the plane's supervisor re-subscribes with exponential
    backoff. Endings are quiet: the SDK raises a terminal error in a throw-away thread (an
    unhandled-exception traceback) and closes from inside its consumer thread; here the error
    is recorded in ``terminal_error`` for the supervisor's log line and closing happens in a
    helper thread.

    Overrides private methods of google-cloud-firestore 2.x's ``Watch`` (``_init_stream``,
    ``_on_rpc_done``, ``on_snapshot`` for the end-of-stream ``None`` and for documents sent
    again unchanged), replaces its comparator (``_by_path``) and reads its ``doc_map`` /
    ``change_map``; the rest of the class (snapshot assembly, resume tokens, resets) is used
    as is.
    """

    terminal_error: BaseException | None = None

    def __init__(self, query: Any, client: Any, target: Any, comparator: Any,
                 snapshot_callback: Any, document_snapshot_cls: Any) -> None:
        if query._orders:
            raise ValueError("_Listener orders documents by path: its query has no order_by")
        del comparator  # the SDK's builds protobuf messages on each call; see _by_path
        super().__init__(query, client, target, _by_path, snapshot_callback,  # type: ignore[no-untyped-call]
                         document_snapshot_cls)

    def _init_stream(self) -> None:
        self._recoveries: list[float] = []
        self._rpc = ResumableBidiRpc(  # type: ignore[no-untyped-call]
            start_rpc=self._api._transport.listen,
            should_recover=watch_module._should_recover,
            should_terminate=self._should_terminate,
            initial_request=self._get_rpc_request,
            metadata=self._firestore._rpc_metadata,
        )
        self._rpc.add_done_callback(self._on_rpc_done)  # type: ignore[no-untyped-call]
        self._consumer = BackgroundConsumer(self._rpc, self.on_snapshot)  # type: ignore[no-untyped-call]
        self._consumer.start()  # type: ignore[no-untyped-call]

    def _should_terminate(self, exc: BaseException) -> bool:
        # Called under the stream's operational lock, before ``should_recover``.
        terminate = bool(watch_module._should_terminate(exc))  # type: ignore[no-untyped-call]
        if not terminate and watch_module._should_recover(exc):  # type: ignore[no-untyped-call]
            now = time.monotonic()
            self._recoveries = [t for t in self._recoveries if now - t < RECOVER_WINDOW]
            self._recoveries.append(now)
            terminate = len(self._recoveries) > RECOVER_BUDGET
        if terminate and self.terminal_error is None:
            self.terminal_error = watch_module._maybe_wrap_exception(exc)  # type: ignore[no-untyped-call]
        return terminate

    def _on_rpc_done(self, future: Any) -> None:
        if future is not None and self.terminal_error is None:
            self.terminal_error = watch_module._maybe_wrap_exception(future)  # type: ignore[no-untyped-call]
        self._close_soon()

    def on_snapshot(self, proto: Any) -> None:
        if proto is None:  # the stream ended: the SDK would close from this very thread
            self._close_soon()
            return
        if not self._closing.locked() and self._known_version(proto._pb):
            return
        super().on_snapshot(proto)  # type: ignore[no-untyped-call]

    def _known_version(self, pb: Any) -> bool:
        """A document sent again unchanged (same update time as the one we hold): keep the
        snapshot we hold instead of decoding and deep-copying a new one. The emulator resends
        every document of the query after every commit (a RESET), so this is most of its
        stream; the SDK's ``push`` finds the same update time and reports no change."""
        if pb.WhichOneof("response_type") != "document_change":
            return False
        change = pb.document_change
        if watch_module.WATCH_TARGET_ID not in change.target_ids:
            return False
        held = self.doc_map.get(change.document.name)
        if held is None or held.update_time is None:
            return False
        if held.update_time.timestamp_pb() != change.document.update_time:
            return False
        self.change_map[change.document.name] = held
        return True

    def _close_soon(self) -> None:
        threading.Thread(
            name=watch_module._RPC_ERROR_THREAD_NAME, target=self.close, daemon=True
        ).start()


def _by_path(first: Any, second: Any) -> int:
    """The order of a query without ``order_by``: by document path. The SDK's
    ``Query._comparator`` computes the same, but builds protobuf messages on every call, and
    ``Watch`` sorts the whole result with it on every snapshot with a change: with 100
    documents, ~30 ms of one core per snapshot."""
    a: tuple[str, ...] = first.reference._path
    b: tuple[str, ...] = second.reference._path
    return (a > b) - (a < b)


@dataclass
class _Subscription:
    generation: int
    first: bool = True
    got_snapshot: bool = False


class FirestorePlane(ControlPlane):
    name = "firestore"

    def __init__(self, config: FirebaseConfig, *, deadline: float = DEFAULT_DEADLINE) -> None:
        self._config = config
        self._conn = _connection(config)
        self._client = _make_client(self._conn)
        self._col = self._client.collection(config.collection)
        self._deadline = deadline
        self._retry = api_retry.Retry(
            predicate=api_retry.if_exception_type(*_TRANSIENT),
            initial=0.2,
            maximum=5.0,
            multiplier=2.0,
            timeout=deadline,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_change: ChangeCallback | None = None
        self._listener: _Listener | None = None
        self._subscription: _Subscription | None = None
        self._generation = 0
        self._known: set[str] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def project(self) -> str:
        return self._conn.project

    # -- plumbing ------------------------------------------------------------------------

    def _rpc(self) -> dict[str, Any]:
        return {"retry": self._retry, "timeout": self._deadline}

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise RuntimeError("FirestorePlane is closed")
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            mapped = map_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    # -- watching ------------------------------------------------------------------------

    async def watch(self, on_change: ChangeCallback) -> None:
        if self._on_change is not None:
            raise RuntimeError("watch() was already called on this plane")
        self._loop = asyncio.get_running_loop()
        self._on_change = on_change  # set first: the first snapshot may beat our resumption
        try:
            self._listener = await self._call(self._subscribe, self._new_subscription())
        except BaseException:
            self._on_change = self._subscription = None
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="firestore-watch")

    def feed_alive(self) -> bool:
        return self._supervisor is None or not self._supervisor.done()

    def _new_subscription(self) -> _Subscription:
        """On the loop: from now on, only snapshots of this subscription are delivered."""
        self._generation += 1
        self._subscription = _Subscription(self._generation)
        return self._subscription

    def _subscribe(self, sub: _Subscription) -> _Listener:
        """Runs in a worker thread: start a listener on the whole collection."""

        def callback(docs: list[Any], changes: list[Any], _read_time: Any) -> None:
            self._on_snapshot(sub, docs, changes)

        query = firestore.Query(self._col)
        listener: _Listener = _Listener.for_query(  # type: ignore[no-untyped-call]
            query, callback, firestore.DocumentSnapshot
        )
        return listener

    def _on_snapshot(self, sub: _Subscription, docs: list[Any], changes: list[Any]) -> None:
        """The SDK's consumer thread: parse, then hand over to the loop. Never raises."""
        try:
            full = sub.first
            sub.first = False
            items: list[Change]
            if full:
                items = [parse_account(d.id, d.to_dict() or {}) for d in docs]
            else:
                items = []
                for change in changes:
                    snap = change.document
                    if change.type == watch_module.ChangeType.REMOVED:
                        items.append(Removed(snap.id))
                    else:
                        items.append(parse_account(snap.id, snap.to_dict() or {}))
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._deliver, sub, full, items)
        except RuntimeError:
            pass  # the loop closed between the check and the call
        except Exception as exc:  # pragma: no cover - defensive: keep the SDK thread alive
            log.exception("plane.watch_callback_failed", backend=self.name, error=str(exc))

    def _deliver(self, sub: _Subscription, full: bool, items: list[Change]) -> None:
        """The event loop: drop stale listeners' snapshots, track known ids, call back."""
        if self._closed or sub is not self._subscription or self._on_change is None:
            return
        sub.got_snapshot = True
        if full:
            present = {item.user_id for item in items}
            items = [*items, *(Removed(uid) for uid in sorted(self._known - present))]
        for item in items:
            if isinstance(item, Removed):
                if item.user_id not in self._known:
                    continue
                self._known.discard(item.user_id)
            else:
                self._known.add(item.user_id)
            try:
                self._on_change(item)
            except Exception as exc:
                log.exception("plane.watch_consumer_failed", backend=self.name, error=str(exc))

    async def _supervise(self) -> None:
        delay = BACKOFF_MIN
        while not self._closed:
            await asyncio.sleep(WATCH_CHECK_INTERVAL)
            listener = self._listener
            if listener is not None and listener.is_active:
                sub = self._subscription
                if sub is not None and sub.got_snapshot:
                    delay = BACKOFF_MIN
                continue
            if listener is not None:
                error = listener.terminal_error
                log.warning(
                    "plane.watch_lost",
                    backend=self.name,
                    error=str(map_error(error) or error) if error else "listener stopped",
                    retry_in=round(delay, 2),
                )
                self._listener = None
                await asyncio.to_thread(listener.close)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311
            delay = min(delay * 2, BACKOFF_MAX)
            if self._closed:
                return
            try:
                self._listener = await self._call(self._subscribe, self._new_subscription())
                log.info("plane.watch_resubscribed", backend=self.name)
            except Exception as exc:  # noqa: BLE001 - the supervisor must outlive any error
                log.warning(
                    "plane.watch_subscribe_failed",
                    backend=self.name,
                    error=str(exc),
                    retry_in=round(delay, 2),
                )

    # -- reads ---------------------------------------------------------------------------

    async def list_accounts(self) -> list[AccountDoc]:
        snaps = await self._call(self._col.get, **self._rpc())
        return [parse_account(s.id, s.to_dict() or {}) for s in snaps]

    async def pending_requests(self) -> list[AccountDoc]:
        query = self._col.where(filter=FieldFilter("status", "in", sorted(REQUEST_VALUES)))
        snaps = await self._call(query.get, **self._rpc())
        return [parse_account(s.id, s.to_dict() or {}) for s in snaps]

    async def rewatch(self) -> None:
        """Close the listener; the supervisor sees it inactive and subscribes afresh."""
        listener = self._listener
        if listener is not None and not self._closed:
            log.warning("plane.watch_reopened", backend=self.name,
                        reason="a pending request was not delivered")
            await asyncio.to_thread(listener.close)

    async def get(self, user_id: str) -> AccountDoc | None:
        ref = self._col.document(check_doc_id(user_id))
        snap = await self._call(ref.get, **self._rpc())
        return parse_account(snap.id, snap.to_dict() or {}) if snap.exists else None

    async def link_record(self, user_id: str) -> dict[str, Any] | None:
        """The link record ``sessions/{userId}`` as stored, or None (tests)."""
        ref = self._client.collection(LINK_RECORDS).document(check_doc_id(user_id))
        snap = await self._call(ref.get, **self._rpc())
        return dict(snap.to_dict() or {}) if snap.exists else None

    async def messages(self, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
        query = (
            self._client.collection(MESSAGES)
            .where(filter=FieldFilter("userId", "==", user_id))
            .order_by("ts", direction=firestore.Query.DESCENDING)
            .limit(limit)
        )
        snaps = await self._call(query.get, **self._rpc())
        return [dict(s.to_dict() or {}) for s in reversed(snaps)]

    # -- writes --------------------------------------------------------------------------

    async def claim(
        self, user_id: str, expect: frozenset[DocStatus], new: DocStatus, host: str
    ) -> bool:
        ref = self._col.document(check_doc_id(user_id))
        transaction = self._client.transaction()
        rpc = self._rpc()

        @firestore.transactional
        def attempt(txn: Any) -> bool:
            snap = ref.get(transaction=txn, **rpc)
            if not snap.exists:
                return False
            if parse_doc_status((snap.to_dict() or {}).get("status")) not in expect:
                return False
            txn.update(
                ref,
                {
                    "status": new.value,
                    "host": host,
                    "claimedAt": firestore.SERVER_TIMESTAMP,
                    "updatedAt": firestore.SERVER_TIMESTAMP,
                },
            )
            return True

        won: bool = await self._call(attempt, transaction)
        return won

    async def update(self, user_id: str, fields: Mapping[str, Any]) -> None:
        ref = self._col.document(check_doc_id(user_id))
        data = _delete_none(fields)
        data["updatedAt"] = firestore.SERVER_TIMESTAMP
        await self._call(ref.set, data, merge=True, **self._rpc())

    async def request(self, user_id: str, status: DocStatus, **fields: Any) -> None:
        await self.update(user_id, {**fields, "status": status.value})

    async def delete(self, user_id: str) -> None:
        ref = self._col.document(check_doc_id(user_id))
        await self._call(ref.delete, **self._rpc())

    def _put_owned(self, ref: Any, user_id: str, fields: Mapping[str, Any]) -> None:
        """Write a record of ``user_id`` (messages, summaries), never one of another user.

        Ids are injective (``message_doc_id``), so a foreign owner only appears under data
        written before they were, or written by hand; it is refused all the same. The usual
        path is one ``create``; a re-sent record is read, checked and rewritten with the read's
        update time as a precondition (a concurrent change fails instead of being replaced).
        Runs in a worker thread (``_call``)."""
        try:
            ref.create(dict(fields), **self._rpc())
        except api_exceptions.AlreadyExists:
            snap = ref.get(**self._rpc())
            owner = (snap.to_dict() or {}).get("userId") if snap.exists else user_id
            if owner != user_id:
                raise ForeignRecordError(
                    f"{ref.parent.id}/{ref.id} belongs to user {owner!r}, not {user_id!r}",
                    explanation="the record was kept; this write was refused") from None
            option = (self._client.write_option(last_update_time=snap.update_time)
                      if snap.exists else None)
            if option is None:
                ref.set(dict(fields), **self._rpc())
            else:
                ref.update(dict(fields), option=option, **self._rpc())

    async def add_message(self, user_id: str, event: MessageEvent) -> None:
        check_doc_id(user_id)
        ref = self._client.collection(MESSAGES).document(message_doc_id(user_id, event.event_id))
        await self._call(self._put_owned, ref, user_id, message_fields(user_id, event))

    async def put_link_record(self, user_id: str, fields: Mapping[str, Any]) -> None:
        ref = self._client.collection(LINK_RECORDS).document(check_doc_id(user_id))
        await self._call(ref.set, _delete_none(fields), merge=True, **self._rpc())

    async def add_summary(self, user_id: str, chat_id: str, number: int, text: str) -> None:
        check_doc_id(user_id)
        ref = self._client.collection(SUMMARIES).document(
            summary_doc_id(user_id, chat_id, number))
        await self._call(self._put_owned, ref, user_id,
                         summary_fields(user_id, chat_id, number, text))

    async def summaries(self, user_id: str, chat_id: str) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            query = self._client.collection(SUMMARIES).where(
                filter=FieldFilter("userId", "==", user_id))
            found = [d.to_dict() or {} for d in query.stream(**self._rpc())]
            return sorted((f for f in found if f.get("chatId") == chat_id),
                          key=lambda f: int(f.get("number", 0)))

        return await self._call(read)

    async def put_usage(self, user_id: str, usage: Usage) -> None:
        check_doc_id(user_id)
        ref = self._client.collection(USAGE).document(usage_doc_id(user_id, usage.day))
        await self._call(self._put_owned, ref, user_id, usage_fields(user_id, usage))

    async def usage(self, user_id: str | None, since_day: str) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            query = self._client.collection(USAGE).where(
                filter=FieldFilter("day", ">=", since_day))
            found = [d.to_dict() or {} for d in query.stream(**self._rpc())]
            return sorted((f for f in found if user_id is None or f.get("userId") == user_id),
                          key=lambda f: (str(f.get("userId")), str(f.get("day"))))

        return await self._call(read)

    # -- shutdown ------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._subscription = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        listener, self._listener = self._listener, None
        if listener is not None:
            await asyncio.to_thread(listener.close)
        await asyncio.to_thread(self._close_channel)

    def _close_channel(self) -> None:
        api = getattr(self._client, "_firestore_api_internal", None)
        if api is not None:
            api.transport.close()
