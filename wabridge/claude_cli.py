"""The Claude Code CLI as both sides see it: where it is and the environment it runs with.

The worker drives it (``agent/claude.py``); ``wabridgectl doctor`` runs ``--version`` on it
(``controller/doctor.py``). Both take the same binary and the same offline settings from here.

A user's own Anthropic API key (``settings.apiKeyRef``) travels from the controller to that
user's worker only as a systemd credential named ``API_KEY_CREDENTIAL``: the controller puts
``LoadCredential=`` in the worker's runtime drop-in (``controller/systemd.py``), the worker
reads it from ``$CREDENTIALS_DIRECTORY`` (``credential_api_key``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from wabridge import credentials

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


#: The systemd credential that carries a user's own Anthropic API key to their worker.
API_KEY_CREDENTIAL: Final = "anthropic-api-key"
#: Where the controller finds the keys ``settings.apiKeyRef`` names (one file per key).
API_KEYS_DIR: Final = Path("/etc/wabridge/keys")
#: What ``apiKeyRef`` may be: a plain file name, never a path.
API_KEY_REF: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def credential_api_key(env: Mapping[str, str] = os.environ) -> str | None:
    """The user's own API key handed to this process by systemd, or None (then the shared
    ``ANTHROPIC_API_KEY`` of ``worker.env`` applies, if any)."""
    return credentials.read(API_KEY_CREDENTIAL, env)
