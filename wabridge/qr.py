"""QR strings -> images people scan: PNG (apps, the simulator's page) and terminal text.

Shared by the agent (which puts a PNG data URL on the control plane), the controller's
``wabridgectl link`` (which draws the code in a terminal) and ``wabridge-sim``'s web page.
"""

from __future__ import annotations

import base64
import io
from typing import Any

# qrcode (and the PIL it renders with) is imported at the first QR, not with this module: a
# worker imports this at start-up and most starts (a linked account) never draw one.

SIZE = 512
MARGIN = 2
#: Terminal rendering: each character is one module wide and two modules tall.
FULL, UPPER, LOWER, EMPTY = "█", "▀", "▄", " "


def _qrcode() -> Any:
    import qrcode  # noqa: PLC0415
    import qrcode.constants  # noqa: PLC0415

    return qrcode


def to_png(code: str, size: int = SIZE) -> bytes:
    """``code`` as a PNG: ``size`` px square, quiet zone of ``MARGIN`` modules, 1-bit."""
    qrcode = _qrcode()
    qr = qrcode.QRCode(border=MARGIN, error_correction=qrcode.constants.ERROR_CORRECT_L)
    qr.add_data(code)
    qr.make(fit=True)
    modules = qr.modules_count + 2 * MARGIN
    qr.box_size = max(1, size // modules)
    image = qr.make_image().get_image().convert("1")
    image = image.resize((size, size), resample=0)  # nearest: keeps modules crisp
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def to_data_url(code: str) -> str:
    """A PNG data URL of ``code``: 512 px square, quiet zone of 2 modules (the seed's setting)."""
    return "data:image/png;base64," + base64.b64encode(to_png(code)).decode()


def to_terminal(code: str) -> str:
    """The QR drawn with half-block characters, for wabridgectl in a terminal.

    A block stands for a dark module, so the text must be shown dark on light: wabridgectl
    wraps it in ANSI black-on-white when it writes to a terminal.
    """
    qr = _qrcode().QRCode(border=MARGIN)
    qr.add_data(code)
    qr.make(fit=True)
    matrix = qr.get_matrix()
    lines = []
    for y in range(0, len(matrix), 2):
        top = matrix[y]
        bottom = matrix[y + 1] if y + 1 < len(matrix) else [False] * len(top)
        row = []
        for t, b in zip(top, bottom, strict=True):
            row.append(FULL if t and b else UPPER if t else LOWER if b else EMPTY)
        lines.append("".join(row))
    return "\n".join(lines)

