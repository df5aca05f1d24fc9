"""Operator documentation generated from code must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from wabridge import config

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_reference_is_current() -> None:
    text = (DOCS / "configuration.md").read_text()
    assert config.reference_markdown() in text, (
        "docs/configuration.md is out of date: regenerate it with "
        "`python -m wabridge.config --markdown` (see the file's header)"
    )


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for line in config.reference_markdown().splitlines()[2:]:
        key = line.split("|")[1].strip()
        assert key in text


def test_the_architecture_page_names_files_that_exist() -> None:
    """docs/architecture.md matches the code: every module, test and unit file it names is
    there (a rename that forgets the page fails here)."""
    text = (DOCS / "architecture.md").read_text()
    root = DOCS.parent
    named = set(re.findall(r"`((?:agent|controller|wabridge|sim|tests)/[\w/]+\.py)", text))
    assert len(named) > 20
    missing = sorted(p for p in named if not (root / p).exists())
    assert missing == []
    for symbol, module in [("AccountDoc", "controller/plane.py"),
                           ("UnitManager", "controller/unit_manager.py"),
                           ("UserState", "controller/users.py"),
                           ("WhatsAppBackend", "agent/whatsapp/base.py"),
                           ("ClaudePool", "agent/pool.py"),
                           ("EXIT_OUTCOMES", "wabridge/status.py"),
                           ("put_link_record", "controller/plane.py")]:
        assert symbol in text and symbol in (root / module).read_text(), symbol
