"""QR strings -> images people scan.

The rendering lives in the shared kernel (:mod:`wabridge.qr`) so that ``wabridgectl``
(controller side) and ``wabridge-sim`` draw codes exactly as the agent does; this module keeps
the agent's import path.
"""

from __future__ import annotations

from wabridge.qr import MARGIN, SIZE, to_data_url, to_png, to_terminal

__all__ = ["MARGIN", "SIZE", "to_data_url", "to_png", "to_terminal"]
