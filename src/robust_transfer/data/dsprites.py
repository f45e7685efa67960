"""dSprites-like images drawn on the fly: one white shape on a black canvas.

Like dSprites (Matthey et al., 2017) the pictures are binary and fully described by
their latents (shape, scale, orientation, position x, position y), but the continuous
latents are drawn uniformly instead of from a grid, and nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from robust_transfer.data.dataset import ImageDataset

from ..core.errors import DataError

SHAPES = ("square", "ellipse", "heart")
LATENT_NAMES = ("scale", "orientation", "position_x", "position_y")

# dSprites' scale range; a shape of scale 1 reaches _RADIUS * size pixels from its centre.
_MIN_SCALE, _MAX_SCALE = 0.5, 1.0
_RADIUS = 0.16
# The corner of a turned square lies sqrt(2) radii out; keeping centres this far from
# the border keeps every shape whole, so position x and y act on the whole shape.
_MARGIN = math.sqrt(2.0) * _RADIUS * _MAX_SCALE
# Bounds the (chunk, size, size) temporaries to a few tens of MB.
_CHUNK = 1024


def _square(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 1.0


def _ellipse(u: Tensor, v: Tensor) -> Tensor:
    # Twice as long as wide, so that its orientation shows (modulo pi).
    return u.square() + (2.0 * v).square() <= 1.0


def _heart(u: Tensor, v: Tensor) -> Tensor:
    # The curve (x^2 + y^2 - 1)^3 = x^2 y^3, lobes up (image rows grow downwards, hence
    # -v), shrunk and shifted so that it fits in the unit disc like the other two.
    a = 1.2 * u
    b = 0.12 - 1.2 * v
    return (a.square() + b.square() - 1.0).pow(3) <= a.square() * b.pow(3)


# Indexed like SHAPES: each maps rotated, radius-scaled pixel offsets to a mask.
_DRAW: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (_square, _ellipse, _heart)


def render_dsprites(n: int, *, seed: int, size: int = 64) -> ImageDataset:
    """``n`` seeded dSprites-like images, 1 x ``size`` x ``size``, classes balanced.

    ``y`` is the shape index into :data:`SHAPES`; ``targets`` (n, 4) are the continuous
    latents :data:`LATENT_NAMES`, each scaled to [0, 1]: scale from [0.5, 1], orientation
    from [0, 2 pi), positions across the range of centres that keeps the shape whole.
    The square repeats every pi/2 and the ellipse every pi, so their orientation can only
    be read from the picture modulo that symmetry, as in dSprites.
    """
    if n < 1:
        raise DataError(f"n must be positive, got {n}")
    if size < 8:
        raise DataError(f"size must be at least 8 pixels, got {size}")
    generator = torch.Generator().manual_seed(seed)
    # A shuffled 0,1,2,0,1,2,... gives each shape n/3 images, up to one.
    shapes = torch.randperm(n, generator=generator) % len(SHAPES)
    latents = torch.rand(n, len(LATENT_NAMES), generator=generator)
    images = torch.cat(
        [
            _draw(shapes[start : start + _CHUNK], latents[start : start + _CHUNK], size)
            for start in range(0, n, _CHUNK)
        ]
    )
    return ImageDataset(
        x=images,
        y=shapes,
        name="dsprites",
        classes=SHAPES,
        targets=latents,
        target_names=LATENT_NAMES,
    )


def _draw(shapes: Tensor, latents: Tensor, size: int) -> Tensor:
    scale_01, turn_01, x_01, y_01 = latents.unbind(1)
    radius = (_MIN_SCALE + (_MAX_SCALE - _MIN_SCALE) * scale_01) * _RADIUS * size
    angle = 2.0 * math.pi * turn_01
    # Pixel centres sit at half-integers of a canvas that spans [0, size].
    low, span = _MARGIN * size, (1.0 - 2.0 * _MARGIN) * size
    centre_x, centre_y = low + span * x_01, low + span * y_01
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dx = grid.view(1, 1, size) - centre_x.view(-1, 1, 1)
    dy = grid.view(1, size, 1) - centre_y.view(-1, 1, 1)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    r = radius.view(-1, 1, 1)
    # Offsets in the shape's own frame, turned by -angle and measured in radii.
    u = (cos * dx + sin * dy) / r
    v = (cos * dy - sin * dx) / r
    masks = torch.zeros(len(shapes), size, size, dtype=torch.bool)
    for index, draw in enumerate(_DRAW):
        chosen = shapes == index
        masks[chosen] = draw(u[chosen], v[chosen])
    return masks.to(torch.float32).unsqueeze(1)
