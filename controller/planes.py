"""Which control plane this host uses: ``controller.control_plane``, or for ``auto`` Firestore
when any Firebase setting, ``$FIRESTORE_EMULATOR_HOST`` or a ``firebase`` credential
(``$CREDENTIALS_DIRECTORY``, systemd's ``LoadCredential=``) is there, else the local store.

One rule for the controller (``choose_plane``) and ``wabridgectl doctor`` (``plane_kind``).
The implementations are imported only once chosen: the CLI never loads the Firestore SDK.
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
    """``"firestore"`` or ``"local"``."""
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
    if plane_kind(cfg) == "firestore":
        from controller.firestore import FirestorePlane  # noqa: PLC0415 - only once chosen

        firebase = dataclasses.replace(cfg.firebase, emulator_host=emulator_host(cfg))
        return FirestorePlane(firebase)
    from controller.local import LocalPlane  # noqa: PLC0415 - only once chosen

    return LocalPlane(Path(cfg.controller.local_db))
