"""What a worker imports before ``READY=1``: libraries it needs only later stay out of the
start-up path (aiohttp's client for the sim backend, loaded in a thread once the connection
loop runs; qrcode and PIL, loaded for the first QR only). Each costs tens of milliseconds of
CPU per unit start (``python -X importtime``), times every unit of a host starting at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_worker_start_up_path_leaves_late_libraries_out() -> None:
    script = ("import sys, agent.main, agent.whatsapp.sim; "
              "print(' '.join(m for m in ('aiohttp', 'qrcode', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(REPO)}).stdout
    assert out.split() == []
