"""Users' own arrays: ``.npz`` (numpy) or ``.pt`` (a dict of tensors, loaded weights-only)."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.checks import CLASSES
from ..core.errors import DataError, InputTypeError, MissingFileError
from ..core.layout import aligned
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


def _tensor(value: object, path: Path, key: str) -> Tensor:
    """An array of the file as a tensor: numbers only, in this machine's byte order."""
    if isinstance(value, Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: {key} must hold numbers, got numpy dtype {array.dtype} "
            f"({'text' if array.dtype.kind in 'SU' else 'not a number'})"
        )
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))


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
    x, y = _tensor(content["x"], path, "x"), _tensor(content["y"], path, "y")
    if x.dim() == 0 or x.numel() == 0:
        raise DataError(f"{path} holds no points or no pixels (x must be (N, C, H, W))")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if not x.is_floating_point():
        raise InputTypeError(f"{path}: x must be float in [0, 1] or uint8, got {x.dtype}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputTypeError(f"{path}: y must hold integer class labels, got {y.dtype}")
    if y.dim() != 1 or len(y) != len(x):
        raise DataError(f"{path}: y must have shape ({len(x)},) to match x, got {tuple(y.shape)}")
    y = y.long()
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= CLASSES.most:
        # Checked before anything is sized by the labels: a label of 1e9 would make a
        # billion class names.
        raise DataError(
            f"{path}: labels must be class indices from 0 to {CLASSES.most - 1}, got values "
            f"in [{low}, {high}]"
        )
    if "classes" in content:
        class_names = np.asarray(content["classes"])
        if class_names.ndim != 1 or len(class_names) > CLASSES.most:
            raise DataError(f"{path}: classes must be a list of names, one per class")
        classes = tuple(str(c) for c in class_names.tolist())
    else:
        classes = tuple(str(k) for k in range(high + 1))
    targets = None
    if "targets" in content:
        targets = _tensor(content["targets"], path, "targets").float()
        if targets.dim() == 1:
            targets = targets[:, None]
    names = tuple(f"target{k}" for k in range(targets.shape[1])) if targets is not None else ()
    return ImageDataset(
        # numpy's buffer starts anywhere: kernels would round by where it lies.
        x=aligned(x.float()),
        y=y,
        name=path.stem,
        classes=classes,
        targets=targets,
        target_names=names,
    )
