"""Conversions shared by the loaders: 8-bit pixels to [0, 1] floats, resizing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from ..errors import DataError, InputTypeError

Size = int | tuple[int, int]


def unit_float(images: NDArray[np.uint8] | Tensor) -> Tensor:
    """uint8 images (N, C, H, W) as float32 in [0, 1]."""
    pixels = torch.as_tensor(images)
    if pixels.dtype != torch.uint8:
        raise InputTypeError(f"expected uint8 pixels, got {pixels.dtype}")
    return pixels.to(torch.float32).div_(255.0)


def as_hw(size: Size) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height <= 0 or width <= 0:
        raise DataError(f"size must be positive, got {size!r}")
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
