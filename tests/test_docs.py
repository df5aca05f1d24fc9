"""Operator documentation generated from code must match the code."""

from __future__ import annotations

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
