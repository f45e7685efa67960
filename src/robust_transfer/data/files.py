"""Users' own arrays: ``.npz`` (numpy) or ``.pt`` (a dict of tensors, loaded weights-only)."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError, InputTypeError, MissingFileError
from .dataset import ImageDataset


def _npz(path: Path) -> dict[str, object]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"cannot read {path} as .npz: {err}") from err


def _pt(path: Path) -> dict[str, object]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise DataError(f"cannot read {path} as a weights-only .pt file: {err}") from err
    if not isinstance(content, Mapping):
        raise DataError(f"{path} must hold a dict with 'x' and 'y', got {type(content).__name__}")
    return dict(content)


_READERS = {".npz": _npz, ".pt": _pt}


def _tensor(value: object) -> Tensor:
    return value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))


def load_array_file(path: str | Path) -> ImageDataset:
    """``x`` (N, C, H, W) as float in [0, 1] or uint8, ``y`` (N,) integer labels; optional
    ``classes`` (names) and ``targets`` (N, K) floats for regression heads."""
    path = Path(path)
    reader = _READERS.get(path.suffix)
    if reader is None:
        raise DataError(f"{path}: expected a .npz or .pt file")
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path}")
    content = reader(path)
    missing = [key for key in ("x", "y") if key not in content]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (needs 'x' and 'y')")
    x, y = _tensor(content["x"]), _tensor(content["y"])
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if not x.is_floating_point():
        raise InputTypeError(f"{path}: x must be float in [0, 1] or uint8, got {x.dtype}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputTypeError(f"{path}: y must hold integer class labels, got {y.dtype}")
    y = y.long()
    if "classes" in content:
        classes = tuple(str(c) for c in np.asarray(content["classes"]).tolist())
    else:
        classes = tuple(str(k) for k in range(int(y.max()) + 1 if len(y) else 1))
    targets = None
    if "targets" in content:
        targets = _tensor(content["targets"]).float()
        if targets.dim() == 1:
            targets = targets[:, None]
    names = tuple(f"target{k}" for k in range(targets.shape[1])) if targets is not None else ()
    return ImageDataset(
        x=x.float().contiguous(),
        y=y,
        name=path.stem,
        classes=classes,
        targets=targets,
        target_names=names,
    )
