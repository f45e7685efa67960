"""torchvision's data sets as :class:`ImageDataset`, for users' machines (they download).

Raw arrays are converted in one vectorised step, with no PIL image per item.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.checks import check_positive_int
from ..core.errors import DataError, InputError, MissingFileError
from ._images import resize, unit_float
from .dataset import ImageDataset


def _datasets() -> Any:
    """torchvision's data sets, imported when one is asked for: importing torchvision
    takes about 2 s, which every command would pay."""
    from torchvision import datasets

    return datasets


def _nchw(pixels: object, layout: str) -> np.ndarray:
    array = np.asarray(pixels, dtype=np.uint8)
    if layout == "NHW":
        return array[:, None]
    if layout == "NHWC":
        return array.transpose(0, 3, 1, 2)
    return array


# name -> (constructor taking (root, train, download), pixel layout, label attribute)
_Builder = Callable[[Path, bool, bool], object]
_SETS: dict[str, tuple[_Builder, str, str]] = {
    "cifar10": (lambda r, t, d: _datasets().CIFAR10(r, train=t, download=d), "NHWC", "targets"),
    "cifar100": (lambda r, t, d: _datasets().CIFAR100(r, train=t, download=d), "NHWC", "targets"),
    "fashion-mnist": (
        lambda r, t, d: _datasets().FashionMNIST(r, train=t, download=d),
        "NHW",
        "targets",
    ),
    "svhn": (
        lambda r, t, d: _datasets().SVHN(r, split="train" if t else "test", download=d),
        "NCHW",
        "labels",
    ),
    "stl10": (
        lambda r, t, d: _datasets().STL10(r, split="train" if t else "test", download=d),
        "NCHW",
        "labels",
    ),
}


# name -> (image shape, training points, test points, classes): what a plan prices a
# study by on a machine the data has not been downloaded to.
SIZES: dict[str, tuple[tuple[int, int, int], int, int, int]] = {
    "cifar10": ((3, 32, 32), 50_000, 10_000, 10),
    "cifar100": ((3, 32, 32), 50_000, 10_000, 100),
    "fashion-mnist": ((1, 28, 28), 60_000, 10_000, 10),
    "svhn": ((3, 32, 32), 73_257, 26_032, 10),
    "stl10": ((3, 96, 96), 5_000, 8_000, 10),
}


def torchvision_names() -> tuple[str, ...]:
    return tuple(_SETS)


def load_torchvision(
    name: str,
    root: str | Path,
    *,
    train: bool,
    download: bool = False,
    size: int | None = None,
    limit: int | None = None,
) -> ImageDataset:
    """A torchvision data set (train or test part), optionally resized and cut to ``limit``."""
    if limit is not None:
        # A negative one would slice from the end: all but the last points, silently.
        try:
            check_positive_int(limit, "limit")
        except InputError as err:
            raise DataError(str(err)) from err
    entry = _SETS.get(name)
    if entry is None:
        raise DataError(
            f"unknown torchvision data set {name!r}: expected one of {', '.join(_SETS)}"
        )
    build, layout, label_attribute = entry
    try:
        source = build(Path(root), train, download)
    except RuntimeError as err:
        raise MissingFileError(
            f"{name} not found under {root} ({err}); pass download=True on a machine with "
            "internet access"
        ) from err
    pixels = _nchw(source.data, layout)  # type: ignore[attr-defined]
    labels = np.asarray(getattr(source, label_attribute), dtype=np.int64)
    if limit is not None:
        pixels, labels = pixels[:limit], labels[:limit]
    x = unit_float(np.ascontiguousarray(pixels))
    if size is not None:
        x = resize(x, size)
    classes = getattr(source, "classes", None) or [str(k) for k in range(int(labels.max()) + 1)]
    return ImageDataset(
        x=x,
        y=torch.from_numpy(labels),
        name=f"{name}/{'train' if train else 'test'}",
        classes=tuple(str(c) for c in classes),
    )
