"""Conversions shared by the loaders: 8-bit pixels to [0, 1] floats, resizing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from ..core.errors import DataError, InputTypeError

Size = int | tuple[int, int]


def unit_float(images: NDArray[np.uint8] | Tensor) -> Tensor:
    """uint8 images (N, C, H, W) as float32 in [0, 1]."""
    pixels = torch.as_tensor(images)
    if pixels.dtype != torch.uint8:
        raise InputTypeError(f"expected uint8 pixels, got {pixels.dtype}")
    return pixels.to(torch.float32).div_(255.0)


# Beyond any encoder's input (ViTs take 224 to 518 px): a larger size is a typo that
# would allocate gigabytes per image.
_MOST_PIXELS_A_SIDE = 4096


def as_hw(size: Size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else size
    if (
        not isinstance(pair, tuple | list)
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        or not all(0 < v <= _MOST_PIXELS_A_SIDE for v in pair)
    ):
        raise DataError(
            f"size must be a positive integer or (height, width), at most "
            f"{_MOST_PIXELS_A_SIDE} pixels a side, got {size!r}"
        )
    height, width = pair
    return height, width


def resize(x: Tensor, size: Size) -> Tensor:
    """Bilinear resize of a (N, C, H, W) batch in [0, 1], staying in [0, 1].

    Antialiasing matters when shrinking (e.g. STL-10's 96 px to 32 px); the clamp
    removes float rounding just outside the box, which ImageDataset would reject.
    """
    height, width = as_hw(size)
    if x.shape[-2:] == (height, width):
        return x
    resized = F.interpolate(
        x, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.clamp_(0.0, 1.0)
