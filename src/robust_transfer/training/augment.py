"""Batched, seeded image augmentations for contrastive pretraining (no PIL, no loops)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_ROTATION = math.radians(15)
SCALE_RANGE = (0.85, 1.15)
MAX_SHIFT = 0.15  # of half the image side, in affine_grid's [-1, 1] coordinates
BRIGHTNESS_RANGE = (0.7, 1.3)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """A random rotation, zoom and translation, then a brightness change, per image.

    Random numbers come from ``generator`` on the CPU, so a seed fixes them on any device.
    """
    n = len(x)
    angle = _uniform(n, -MAX_ROTATION, MAX_ROTATION, generator)
    scale = _uniform(n, *SCALE_RANGE, generator)
    shift = _uniform(2 * n, -MAX_SHIFT, MAX_SHIFT, generator).view(n, 2)
    brightness = _uniform(n, *BRIGHTNESS_RANGE, generator)
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    return (moved * brightness.to(x.device, x.dtype).view(n, 1, 1, 1)).clamp(0.0, 1.0)
