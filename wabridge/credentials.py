"""Secrets systemd hands a process (``LoadCredential=``/``SetCredential=``): files in
``$CREDENTIALS_DIRECTORY``, readable by that unit only, never in a unit file, the environment
or a log."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

#: A PostgreSQL password (``storage.backend = postgresql``): the controller's own (its unit's
#: ``LoadCredential=``), or a worker's role's (the controller hands it over per start).
POSTGRES_PASSWORD: Final = "postgres-password"  # noqa: S105 (a credential's name, no secret)


def read(name: str, env: Mapping[str, str] = os.environ) -> str | None:
    """The credential ``name`` (stripped), or None when this process was given none."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        value = (Path(directory) / name).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return value or None
