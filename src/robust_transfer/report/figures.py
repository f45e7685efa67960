"""The report's figures: each drawn once, written as a PNG beside ``report.md`` and kept
for inlining into ``report.html``."""

from __future__ import annotations

import re
from pathlib import Path

from matplotlib.figure import Figure

from ..core.atomic import atomic_write_bytes
from . import plots


class Figures:
    """Collects figures: PNG files for Markdown, base64 for HTML."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.items: list[tuple[str, str, bytes]] = []

    def add(self, name: str, caption: str, figure: Figure) -> None:
        payload = plots.png(figure)
        atomic_write_bytes(self.folder / file_name(name), payload)
        self.items.append((name, caption, payload))


def file_name(figure: str) -> str:
    """A figure's file in ``figures/``: names come from records, which may hold any
    text; no separator or leading dot may take the file out of the folder."""
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", figure).lstrip(".")[:150] + ".png"
