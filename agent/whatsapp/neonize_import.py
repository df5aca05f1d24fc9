"""Importing neonize and opening its session store, without side effects on the process.

Importing neonize costs ~57 MB (the Go runtime) and calls ``logging.basicConfig`` on the root
logger; it happens lazily in :func:`import_neonize`, which restores the root logger afterwards.
neonize's modules also import, at their top, libraries for features this worker never uses
(link previews: linkpreview, bs4, lxml, requests; vCards: phonenumbers; URL downloads: httpx,
requests; the library download's progress bar: tqdm; the terminal QR: segno).
:func:`import_neonize` hands neonize stand-ins for them, which import the real library at
its first use: ~16 MB and ~100 ms less per worker.
``neonize.client.NewClient(name)`` takes the SQLite store path; :func:`ensure_store` has Go
create (or upgrade) the schema before any network traffic, so a broken store fails loudly.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from agent.whatsapp.base import PostgresSessionStore
from wabridge.errors import WabridgeError


class NeonizeStoreError(WabridgeError):
    """The WhatsApp session store could not be opened or created."""

    code = "whatsapp_store"
    explanation = ("check the state directory's permissions and free space; a corrupt store "
                   "must be removed (the account then needs a new QR scan)")


# --------------------------------------------------------------------------------------------
# Lazy, logging-neutral import of neonize


@dataclass(frozen=True)
class NeonizeAPI:
    """The parts of neonize this backend (and the test fake) use."""

    client: ModuleType  # neonize.client (NewClient, ClientFactory)
    proto: ModuleType  # neonize.proto.Neonize_pb2 (events, JID, MessageInfo…)
    e2e: ModuleType  # neonize.proto.waE2E.WAWebProtobufsE2E_pb2 (Message, ExtendedTextMessage…)
    enum: ModuleType  # neonize.utils.enum (ChatPresence, ReceiptType, ClientName…)


_api: NeonizeAPI | None = None
_import_lock = threading.Lock()


def import_neonize(go_log_level: int = logging.INFO) -> NeonizeAPI:
    """Import neonize once, leaving the root logger exactly as it was.

    neonize's ``utils/log.py`` calls ``logging.basicConfig(level=INFO, handlers=[…])`` at
    import time; we snapshot the root logger's handlers and level and put them back.
    ``go_log_level`` sets the ``neonize.utils.log`` logger, whose level neonize passes to Go
    on connect as the minimum whatsmeow level forwarded to Python (NOTSET would forward DEBUG).
    """
    global _api  # noqa: PLW0603 - one import per process, like the library itself
    with _import_lock:
        if _api is not None:
            return _api
        with preserved_root_logging(), _closed_popen(), deferred_imports(DEFERRED):
            import neonize.client as client_module  # noqa: PLC0415 - lazy on purpose
            from neonize.proto import Neonize_pb2  # noqa: PLC0415 - lazy on purpose
            from neonize.proto.waE2E import WAWebProtobufsE2E_pb2  # noqa: PLC0415 - lazy
            from neonize.utils import enum as enum_module  # noqa: PLC0415 - lazy on purpose
        logging.getLogger("neonize.utils.log").setLevel(go_log_level)
        _api = NeonizeAPI(
            client=client_module, proto=Neonize_pb2, e2e=WAWebProtobufsE2E_pb2, enum=enum_module
        )
        return _api


@contextlib.contextmanager
def preserved_root_logging() -> Iterator[None]:
    """Undo whatever the body does to the root logger's handlers and level."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    level = root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


# What neonize imports at its top but a worker calls never, or only in a rare feature (the
# worker sends no link previews, vCards or stickers and downloads no URLs). Each then loads at
# its first use, as if neonize imported it there.
# (PIL stays: neonize.utils.calc reads ``Image.Image`` in an annotation at import.)
DEFERRED = ("linkpreview", "phonenumbers", "requests", "httpx", "tqdm", "segno")


class Later:
    """A name taken from a deferred module (``from phonenumbers import parse``): the real
    object is imported when the name is first called or one of its attributes is read."""

    def __init__(self, module: str, name: str) -> None:
        self._module, self._name = module, name

    def resolve(self) -> Any:
        if isinstance(sys.modules.get(self._module), DeferredModule):
            raise ImportError(  # noqa: TRY004 - an import that cannot be served, not a bad type
                f"neonize used {self._module}.{self._name} while being imported; "
                f"{self._module} cannot be deferred")
        real = importlib.import_module(self._module)
        try:
            return getattr(real, self._name)
        except AttributeError:  # a submodule: ``from PIL import Image``
            return importlib.import_module(f"{self._module}.{self._name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.resolve(), attr)


class DeferredModule(ModuleType):
    """Stands in ``sys.modules`` for a module while neonize imports; ``import requests`` binds
    it. While it stands in, names taken from it are :class:`Later`; afterwards (the real
    module's name is free again) reading an attribute imports the real module."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if sys.modules.get(self.__name__) is self:
            return Later(self.__name__, attr)
        return getattr(importlib.import_module(self.__name__), attr)


@contextlib.contextmanager
def deferred_imports(names: tuple[str, ...]) -> Iterator[None]:
    """While the body runs, importing one of ``names`` (not imported yet) gives a
    :class:`DeferredModule`. The stand-ins leave ``sys.modules`` afterwards, so any later
    import gets the real module. Nothing else imports them meanwhile: neonize is imported
    before the backend starts, and every use of these libraries comes after."""
    placed = {name: DeferredModule(name) for name in names if name not in sys.modules}
    sys.modules.update(placed)
    try:
        yield
    finally:
        for name, stand_in in placed.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


@contextlib.contextmanager
def _closed_popen() -> Iterator[None]:
    """Serve neonize's import-time ``os.popen("uname -a").read()`` without a dangling pipe.

    neonize never closes that pipe nor waits for the child, which leaves a zombie and an
    unclosed file behind (ResourceWarnings that surface at some later, random point). While
    neonize is imported, read-mode ``os.popen`` runs the command to completion instead.
    """
    original = os.popen

    def popen(cmd: str, mode: str = "r", buffering: int = -1) -> Any:
        if mode != "r":
            return original(cmd, mode, buffering)
        done = subprocess.run(  # noqa: S602 - the very command neonize asked a shell for
            cmd, shell=True, capture_output=True, text=True, check=False
        )
        return io.StringIO(done.stdout)

    os.popen = cast(Any, popen)  # the module attribute neonize calls, for the import only
    try:
        yield
    finally:
        os.popen = original


def ensure_store(db_path: Path | PostgresSessionStore) -> int:
    """Create (or upgrade) the whatsmeow schema in ``db_path`` (a file, or the account's own
    schema on PostgreSQL); returns the stored sessions.

    Uses ``ClientFactory.get_all_devices_from_db``: Go opens the store with ``sqlstore.New``,
    which runs the schema upgrades, then lists the devices. Purely local; no network (bar
    the database server). On PostgreSQL the tables land in the account's schema: its role's
    default ``search_path`` (``"$user"``) names it, and it can create nowhere else.
    """
    api = import_neonize()
    if isinstance(db_path, Path):
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    address = db_path.url if isinstance(db_path, PostgresSessionStore) else str(db_path)
    try:
        with preserved_root_logging():
            devices = api.client.ClientFactory.get_all_devices_from_db(address)
    except Exception as exc:  # noqa: BLE001 (Go reports "error: …", which neonize fails to parse; not chained: it may quote the URL)
        said = db_path.redact(str(exc)) if isinstance(db_path, PostgresSessionStore) else exc
        raise NeonizeStoreError(
            f"cannot open the WhatsApp store {db_path}: {said}",
            explanation=NeonizeStoreError.explanation if isinstance(db_path, Path) else
            "check the database server, the 'postgres-password' credential the controller "
            "handed over, and the URL's sslmode (Go's driver defaults to require)",
        ) from None
    if isinstance(db_path, Path) and not db_path.exists():
        raise NeonizeStoreError(f"the WhatsApp store {db_path} was not created")
    return len(devices)


def default_client_factory(db_path: Path | PostgresSessionStore) -> Any:
    """A real ``neonize.client.NewClient`` whose session store is ``db_path`` (schema ready)."""
    api = import_neonize()
    ensure_store(db_path)
    address = db_path.url if isinstance(db_path, PostgresSessionStore) else str(db_path)
    with preserved_root_logging():
        return api.client.NewClient(address)


ClientFactory = Callable[[Path | PostgresSessionStore], Any]
