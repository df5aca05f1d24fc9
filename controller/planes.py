"""Which control plane this host uses: ``controller.control_plane`` (``postgres`` only when
named), or for ``auto`` Firestore when any Firebase setting, ``$FIRESTORE_EMULATOR_HOST`` or a
``firebase`` credential (``$CREDENTIALS_DIRECTORY``, systemd's ``LoadCredential=``) is there,
else the local store.

One rule for the controller (``choose_plane``) and ``wabridgectl doctor`` (``plane_kind``).
The implementations are imported only once chosen: the CLI never loads the Firestore SDK.
The PostgreSQL plane connects to ``storage.postgres_url`` as the controller's role, with the
password the storage backend uses (the ``postgres-password`` credential).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from wabridge import config

if TYPE_CHECKING:
    from controller.plane import ControlPlane


def plane_kind(cfg: config.Config, environ: Mapping[str, str] = os.environ) -> str:
    """``"firestore"``, ``"local"`` or ``"postgres"``."""
    choice = cfg.controller.control_plane
    if choice != "auto":
        return choice
    creds_dir = environ.get("CREDENTIALS_DIRECTORY", "")
    has_firebase = bool(
        cfg.firebase.emulator_host or cfg.firebase.credentials
        or environ.get("FIRESTORE_EMULATOR_HOST")
        or (creds_dir and (Path(creds_dir) / "firebase").exists())
    )
    return "firestore" if has_firebase else "local"


def emulator_host(cfg: config.Config, environ: Mapping[str, str] = os.environ) -> str:
    """The Firestore emulator to use ("" for none): ``firebase.emulator_host``, else the
    SDK's own ``$FIRESTORE_EMULATOR_HOST``."""
    return cfg.firebase.emulator_host or environ.get("FIRESTORE_EMULATOR_HOST", "")


def choose_plane(cfg: config.Config) -> ControlPlane:
    kind = plane_kind(cfg)
    if kind == "postgres":
        from controller.pg_roles import controller_password  # noqa: PLC0415 - only once chosen
        from controller.pgplane import PostgresPlane  # noqa: PLC0415 - only once chosen

        return PostgresPlane(cfg.storage.postgres_url, password=controller_password())
    if kind == "firestore":
        from controller.firestore import FirestorePlane  # noqa: PLC0415 - only once chosen

        firebase = dataclasses.replace(cfg.firebase, emulator_host=emulator_host(cfg))
        return FirestorePlane(firebase)
    from controller.local import LocalPlane  # noqa: PLC0415 - only once chosen

    return LocalPlane(Path(cfg.controller.local_db))
