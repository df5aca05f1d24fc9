"""QR strings -> images people scan."""

from __future__ import annotations

import base64
import io

import qrcode
import qrcode.constants

SIZE = 512
MARGIN = 2


def to_data_url(code: str) -> str:
    """A PNG data URL of ``code``: 512 px square, quiet zone of 2 modules (the seed's setting)."""
    qr = qrcode.QRCode(border=MARGIN, error_correction=qrcode.constants.ERROR_CORRECT_L)
    qr.add_data(code)
    qr.make(fit=True)
    modules = qr.modules_count + 2 * MARGIN
    qr.box_size = max(1, SIZE // modules)
    image = qr.make_image().get_image().convert("1")
    image = image.resize((SIZE, SIZE), resample=0)  # nearest: keeps modules crisp
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_terminal(code: str) -> str:
    """The QR drawn with half-block characters, for wabridgectl in a terminal."""
    qr = qrcode.QRCode(border=MARGIN)
    qr.add_data(code)
    qr.make(fit=True)
    matrix = qr.get_matrix()
    lines = []
    for y in range(0, len(matrix), 2):
        top = matrix[y]
        bottom = matrix[y + 1] if y + 1 < len(matrix) else [False] * len(top)
        row = []
        for t, b in zip(top, bottom, strict=True):
            row.append("█" if t and b else "▀" if t else "▄" if b else " ")
        lines.append("".join(row))
    return "\n".join(lines)
