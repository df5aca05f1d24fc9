"""The Claude Code CLI as both sides see it: where it is and the environment it runs with.

The worker drives it (``agent/claude.py``); ``wabridgectl check`` runs ``--version`` on it
(``controller/ctl.py``). Both take the same binary and the same offline settings from here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Final

#: Always set in the CLI's environment: no telemetry, no update checks, no error reports,
#: no non-essential requests, and no retries inside the CLI (a failed turn is the worker's
#: to handle; the CLI's own retries take ~3 minutes per error).
OFFLINE_ENV: Final[Mapping[str, str]] = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_MAX_RETRIES": "0",
}


def bundled_cli() -> Path | None:
    """The native CLI inside the installed ``claude-agent-sdk`` wheel, or None if that is not
    installed. Found without importing the SDK (importing it costs ~0.4 s of start-up)."""
    spec = importlib.util.find_spec("claude_agent_sdk")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "_bundled" / "claude"


def cli_path(configured: str) -> Path | None:
    """``claude.cli_path`` if set, else the bundled CLI (None: neither)."""
    return Path(configured) if configured else bundled_cli()
