"""Where both sides find the Claude Code CLI (wabridge/claude_cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from wabridge import claude_cli


def test_the_bundled_cli_is_found_and_runs_offline(tmp_path: Path) -> None:
    path = claude_cli.bundled_cli()
    assert path is not None and path.name == "claude" and os.access(path, os.X_OK)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **claude_cli.OFFLINE_ENV}
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    assert "Claude Code" in out


def test_a_configured_path_wins() -> None:
    assert claude_cli.cli_path("/opt/claude/bin/claude") == Path("/opt/claude/bin/claude")
    assert claude_cli.cli_path("") == claude_cli.bundled_cli()


def test_finding_the_cli_does_not_import_the_sdk() -> None:
    """Importing claude_agent_sdk costs ~0.4 s of every worker's start; it is not needed."""
    code = ("import sys, agent.main; agent.main.default_cli_path();"
            " print('claude_agent_sdk' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).parent.parent).stdout
    assert out.strip() == "False"
