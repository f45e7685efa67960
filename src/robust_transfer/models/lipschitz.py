"""An encoder that is 1-Lipschitz in l2 by construction, so its shift has a free certificate.

Every layer is 1-Lipschitz: AOL-rescaled convolutions and linear maps (Prach & Lampert,
"Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks", ECCV 2022),
MaxMin activations, pixel-unshuffle downsampling (a permutation of pixels, norm
preserving) and centring by a constant (a translation). Composition multiplies the
constants, so ``||f(x) - f(x')||_2 <= ||x - x'||_2``.

AOL: for a matrix ``W`` and ``d_i = (sum_j |W^T W|_ij)^(-1/2)``, ``W diag(d)`` has spectral
norm at most 1, because ``diag(d) W^T W diag(d) <= I`` (Gershgorin after the similarity
by ``diag(d)^{-1}``; Prach & Lampert, Theorem 1). A convolution is a matrix whose Gram
matrix is the convolution by the kernel's self-correlation; with zero padding each row of
``|W^T W|`` sums to at most the sum of that self-correlation's absolute values, so the
same per-input-channel ``d`` works.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .encoders import Encoder, ImageShape

# Keeps 1/sqrt(.) finite for an all-zero input channel (whose scale then does not matter).
_TINY = 1e-12


class AOLConv2d(nn.Module):
    """A stride-1, same-padded convolution rescaled per input channel to be 1-Lipschitz."""

    def __init__(self, inputs: int, outputs: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise InputError(f"kernel_size must be odd, got {kernel_size}")
        self.weight = nn.Parameter(torch.empty(outputs, inputs, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(outputs))
        self.padding = kernel_size // 2

    def scaled_weight(self) -> Tensor:
        kernel = self.weight.transpose(0, 1)  # (in, out, k, k): one "image" per input channel
        gram = F.conv2d(kernel, kernel, padding=kernel.shape[-1] - 1)  # (in, in, 2k-1, 2k-1)
        scale = gram.abs().sum(dim=(1, 2, 3)).clamp_min(_TINY).rsqrt()
        return self.weight * scale.view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.scaled_weight(), self.bias, padding=self.padding)


class AOLLinear(nn.Module):
    """A linear map rescaled per input coordinate to be 1-Lipschitz."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, inputs))
        nn.init.kaiming_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(outputs))

    def scaled_weight(self) -> Tensor:
        gram = self.weight.T @ self.weight
        scale = gram.abs().sum(dim=1).clamp_min(_TINY).rsqrt()
        return self.weight * scale.view(1, -1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.scaled_weight(), self.bias)


class MaxMin(nn.Module):
    """Sorts channel pairs: (max, min) is a permutation of its input, hence 1-Lipschitz."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class LipschitzCNN(Encoder):
    """AOL conv -> MaxMin -> pixel-unshuffle, twice, an AOL conv, then an AOL linear map."""

    arch = "lipschitz-cnn"
    lipschitz_l2 = 1.0

    def __init__(self, image_shape: ImageShape = (1, 28, 28), feature_dim: int = 64) -> None:
        super().__init__(image_shape, feature_dim)
        channels, height, width = self.image_shape
        self.block1 = nn.Sequential(AOLConv2d(channels, 16), MaxMin(), nn.PixelUnshuffle(2))
        self.block2 = nn.Sequential(AOLConv2d(64, 32), MaxMin(), nn.PixelUnshuffle(2))
        self.block3 = nn.Sequential(AOLConv2d(128, 32), MaxMin())
        flat = 32 * math.ceil(height / 4) * math.ceil(width / 4)
        self.project = nn.Sequential(nn.Flatten(), AOLLinear(flat, feature_dim))

    def _padded(self, x: Tensor) -> Tensor:
        # Zero padding to a multiple of 4 pixels keeps distances, so it keeps the constant.
        pad_h, pad_w = (-x.shape[2]) % 4, (-x.shape[3]) % 4
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def stages(self) -> list[nn.Module]:
        return [self.block1, self.block2, self.block3, self.project]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        centred = self._padded(x - 0.5)
        out: Tensor = self.project(self.block3(self.block2(self.block1(centred))))
        return out
