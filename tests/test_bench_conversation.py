"""Smoke test of ``bench/conversation.py``: it runs end to end and writes well-formed JSON.

Not a timed assertion: the figures depend on the machine. Only their shape and sign are
checked (every latency a positive number).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import conversation
from wabridge.claude_cli import bundled_cli


def _cli_installed() -> bool:
    path = bundled_cli()
    return path is not None and path.is_file()


pytestmark = [
    pytest.mark.slow,
    pytest.mark.claude,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not _cli_installed(), reason="claude-agent-sdk's bundled CLI missing"),
]


def positive(d: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = d[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, d)


def test_conversation_bench_writes_its_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setattr(conversation, "RESULTS_DIR", tmp_path)
    assert conversation.main(["--chats", "1", "--turns", "3"]) == 0
    [path] = tmp_path.glob("conversation-*.json")
    result = json.loads(path.read_text())
    assert result["benchmark"] == "conversation"

    assert list(result["bridge_latency"]) == ["1"]
    one = result["bridge_latency"]["1"]
    assert one["messages"] == 3 and one["errors"] == 0 and one["unexpected_sends"] == 0
    assert one["bridge_ms"]["n"] == 2  # turns 2 and 3 are warm
    for name in ("bridge_ms", "inbound_ms", "outbound_ms", "bridge_precise_ms",
                 "claude_turn_ms", "end_to_end_ms", "cold_end_to_end_ms"):
        positive(one[name], "p50", "p99", "max")
        assert one[name]["p50"] <= one[name]["p99"] <= one[name]["max"]
    for step in ("persist", "to_pump", "to_turn", "to_commit", "to_send"):
        positive(one["steps_ms"][step], "p50", "p99")
    assert isinstance(one["target_met"], bool)
    assert one["target_p99_ms"] == 10.0
    assert one["store_calls"]["complete_turn@loop"]["n"] == 3

    kinds = result["turn_kinds"]
    for kind in ("cold", "warm", "resumed"):
        assert kinds[kind]["end_to_end_ms"]["n"] > 0, kind
        positive(kinds[kind]["end_to_end_ms"], "p50", "p99")
    positive(kinds["cold"]["open_ms"], "p50")
    positive(kinds["resumed"]["open_ms"], "p50")
    positive(kinds["resumed"]["evict_close_ms"], "p50")
    assert kinds["resume"]["peak_processes"] == 2

    memory = result["memory"]
    assert memory["chats"] == 20 and memory["max_processes"] == 2
    assert memory["errors"] == 0
    pss = memory["pss"]
    assert pss["samples"] > 0
    positive(pss["total_mb"], "max", "mean")
    positive(pss["python_mb"], "max", "mean")
    assert 1 <= pss["claude_processes_max"] <= 2
    assert pss["total_mb"]["mean"] <= pss["total_mb"]["max"]
