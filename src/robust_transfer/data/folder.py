"""ImageFolder trees (one folder per class, e.g. Intel Image Classification's seg_train)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..core.checks import check_positive_int
from ..core.errors import DataError, InputError, MissingFileError
from ._images import Size, as_hw, unit_float
from .dataset import ImageDataset

_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_image_folder(
    root: str | Path,
    *,
    size: Size,
    grayscale: bool = False,
    limit_per_class: int | None = None,
) -> ImageDataset:
    """``root/<class>/<image>`` as a data set, classes sorted by name like torchvision's
    ImageFolder, images resized to ``size`` (bilinear, via PIL)."""
    if limit_per_class is not None:
        # A negative one would slice from the end: all but the last images, silently.
        try:
            check_positive_int(limit_per_class, "limit_per_class")
        except InputError as err:
            raise DataError(str(err)) from err
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class folders (expected root/<class>/<image>)")
    height, width = as_hw(size)
    mode = "L" if grayscale else "RGB"
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in _SUFFIXES)
        for path in files[:limit_per_class]:
            try:
                with warnings.catch_warnings():
                    # PIL only warns up to twice its pixel limit: a bomb is refused whole.
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(path) as image:
                        picture = image.convert(mode).resize(
                            (width, height), Image.Resampling.BILINEAR
                        )
            except (
                UnidentifiedImageError,
                OSError,
                Image.DecompressionBombError,
                Image.DecompressionBombWarning,
            ) as err:
                raise DataError(f"cannot read image {path}: {err}") from err
            array = np.asarray(picture, dtype=np.uint8)
            images.append(array[None] if grayscale else array.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"{root} has class folders but no images")
    return ImageDataset(
        x=unit_float(np.stack(images)),
        y=torch.tensor(labels, dtype=torch.int64),
        name=root.name,
        classes=tuple(classes),
    )
