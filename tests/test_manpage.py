"""wabridgectl(1), written by hand in packaging/man/, stays in step with controller/ctl.py."""

from __future__ import annotations

import re
from pathlib import Path

from controller import ctl

PAGE = Path(__file__).resolve().parent.parent / "packaging" / "man" / "wabridgectl.1"


def _section(text: str, name: str) -> str:
    match = re.search(rf"^\.SH {name}\n(.*?)(?=^\.SH )", text, re.M | re.S)
    assert match, f"no {name} section"
    return match.group(1)


def _subcommands() -> set[str]:
    parser = ctl.build_parser()
    for action in parser._actions:  # argparse has no public accessor
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return set(action.choices)
    raise AssertionError("wabridgectl has no subcommands")


def test_every_command_is_documented() -> None:
    commands = _section(PAGE.read_text(), "COMMANDS")
    documented = set(re.findall(r"^\.TP\n\.B[IR]? (\w+)", commands, re.M))
    assert documented == _subcommands()


def test_exit_statuses_match() -> None:
    statuses = _section(PAGE.read_text(), "EXIT STATUS")
    documented = {int(n) for n in re.findall(r"^\.TP\n\.B (\d+)$", statuses, re.M)}
    assert documented == {ctl.OK, ctl.FAILED, ctl.USAGE, ctl.UNREACHABLE, ctl.FORBIDDEN,
                          ctl.TIMEOUT}


def test_options_are_documented() -> None:
    text = PAGE.read_text()
    for option in ("--json", "--socket", "--pairing-code", "--timeout"):
        assert option.replace("-", r"\-") in text, option
