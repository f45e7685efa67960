"""The per-sample results store: one safetensors file per finished unit of work.

A unit is written to a temporary file in the same folder and renamed into place, so a
run killed at any moment leaves either the whole unit or nothing; a resumed run skips
the units that are there. Metadata (JSON) travels inside the same file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import atomic_write
from .layout import aligned

_SUFFIX = ".safetensors"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


class Store:
    """Per-sample arrays under ``root``, addressed by keys of path-like parts."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: tuple[str, ...]) -> Path:
        if not key:
            raise ValueError("a store key needs at least one part")
        # Parts made only of dots would climb out of the root: they become underscores.
        parts = [_UNSAFE.sub("_", part).lstrip(".") or "_" for part in key]
        # Appended, not with_suffix: a last part like "0.05" would lose its ".05".
        return self.root.joinpath(*parts[:-1], parts[-1] + _SUFFIX)

    def has(self, key: tuple[str, ...]) -> bool:
        return self._read(key) is not None

    def save(
        self, key: tuple[str, ...], arrays: Mapping[str, Tensor], meta: Mapping[str, object]
    ) -> None:
        # Cloned: two names may hold one tensor (a single certifier is also the tightest),
        # which safetensors refuses to write.
        tensors = {str(name): value.detach().cpu().clone() for name, value in arrays.items()}
        metadata = {"meta": json.dumps(dict(meta), sort_keys=True)}
        atomic_write(self._path(key), lambda temp: save_file(tensors, temp, metadata=metadata))

    def load(self, key: tuple[str, ...]) -> tuple[dict[str, Tensor], dict[str, object]] | None:
        """The unit's arrays and metadata, or None when it is missing or unreadable."""
        read = self._read(key)
        if read is None:
            return None
        # safetensors' tensors lie at any byte offset: aligned, a resumed unit computes
        # as a fresh one (core/layout.py).
        return {name: aligned(value) for name, value in read[0].items()}, read[1]

    def _read(self, key: tuple[str, ...]) -> tuple[dict[str, Tensor], dict[str, object]] | None:
        # load_file maps the file and reads only what is touched: checking a unit is cheap.
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            arrays = load_file(path)
            with safe_open(path, framework="pt") as file:
                meta = json.loads((file.metadata() or {}).get("meta", "{}"))
        except (SafetensorError, OSError, ValueError):
            return None
        return arrays, meta

    def keys(self) -> Iterator[tuple[str, ...]]:
        for path in sorted(self.root.rglob(f"*{_SUFFIX}")):
            *folders, name = path.relative_to(self.root).parts
            yield (*folders, name.removesuffix(_SUFFIX))
