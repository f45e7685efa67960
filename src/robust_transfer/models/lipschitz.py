"""Encoders that are 1-Lipschitz in l2 by construction, so their shift has a free certificate.

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

SLL (Araujo et al., "A Unified Algebraic Perspective on Lipschitz Neural Networks",
ICLR 2023): the residual layer ``h(x) = x - 2 W T^{-1} relu(W^T x + b)`` with
``T = diag(sum_j |W^T W|_ij)`` is 1-Lipschitz. Its Jacobian is ``J = I - 2 W S W^T`` with
``S = T^{-1} D`` and ``D`` the ReLU's 0/1 slopes, so ``J^T J = I - 4 W S^{1/2} (I - S^{1/2}
W^T W S^{1/2}) S^{1/2} W^T``; ``T >= W^T W`` and ``D <= I`` give ``S^{1/2} W^T W S^{1/2} <= I``,
hence ``J^T J <= I``. ``T >= W^T W`` is Gershgorin for the convolution on the whole plane
(its Gram rows sum to the filters' absolute self-correlations); zero padding restricts
it to the image, which can only lower the Gram matrix in the semidefinite order. With
the branch off it is the identity: a stack of them loses no distance it is not trained
to lose, where AOL layers that narrow the channels contract every distance from the start.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import Limit, check_positive_int
from ..core.errors import InputError
from .encoders import Encoder, ImageShape, _image_shape

# Keeps 1/sqrt(.) finite for an all-zero input channel (whose scale then does not matter).
_TINY = 1e-12


def _padded(x: Tensor) -> Tensor:
    # Zero padding to a multiple of 4 pixels keeps distances, so it keeps the constant.
    pad_h, pad_w = (-x.shape[2]) % 4, (-x.shape[3]) % 4
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


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


class SLLConv2d(nn.Module):
    """An SLL residual layer on ``channels`` channels with an ``inner``-channel branch."""

    def __init__(self, channels: int, inner: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise InputError(f"kernel_size must be odd, got {kernel_size}")
        self.weight = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(inner))
        self.padding = kernel_size // 2

    def branch_weight(self) -> Tensor:
        """``2 W T^{-1}`` as the weight of the transposed convolution back to ``channels``."""
        # W^T W over the inner channels: the self-correlation of the kernel's filters.
        gram = F.conv2d(self.weight, self.weight, padding=self.weight.shape[-1] - 1)
        t = gram.abs().sum(dim=(1, 2, 3)).clamp_min(_TINY)
        return self.weight * (2.0 / t).view(-1, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        inner = torch.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        return x - F.conv_transpose2d(inner, self.branch_weight(), padding=self.padding)


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

    def stages(self) -> list[nn.Module]:
        return [self.block1, self.block2, self.block3, self.project]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        centred = _padded(x - 0.5)
        out: Tensor = self.project(self.block3(self.block2(self.block1(centred))))
        return out


class SLLNet(Encoder):
    """Pixel-unshuffle, ``depth`` SLL layers, pixel-unshuffle, ``depth`` SLL layers: an
    encoder that keeps every input dimension (its features are its last map, flattened;
    a narrowing projection would contract them), so ``feature_dim`` is the padded
    input's size. It starts as the identity and learns only what its loss asks for."""

    arch = "lipschitz-sll"
    lipschitz_l2 = 1.0

    def __init__(
        self, image_shape: ImageShape = (1, 28, 28), feature_dim: int | None = None, depth: int = 2
    ) -> None:
        channels, height, width = _image_shape(image_shape)
        natural = channels * 16 * math.ceil(height / 4) * math.ceil(width / 4)
        if feature_dim is not None and feature_dim != natural:
            raise InputError(
                f"lipschitz-sll keeps every input dimension: feature_dim must be {natural} "
                f"for images of shape {tuple(image_shape)} (or left unset), got {feature_dim!r}"
            )
        super().__init__(image_shape, natural)
        # Deeper SLL stacks than this are not trained anywhere; past it, a typo.
        self.depth = check_positive_int(depth, "depth", Limit(1_000, "layers a stage"))
        wide = 4 * self.image_shape[0]
        self.block1 = nn.Sequential(
            nn.PixelUnshuffle(2), *(SLLConv2d(wide, 4 * wide) for _ in range(depth))
        )
        self.block2 = nn.Sequential(
            nn.PixelUnshuffle(2),
            *(SLLConv2d(4 * wide, 8 * wide) for _ in range(depth)),
            nn.Flatten(),
        )

    def config(self) -> dict[str, object]:
        return {**super().config(), "depth": self.depth}

    def stages(self) -> list[nn.Module]:
        return [self.block1, self.block2]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        out: Tensor = self.block2(self.block1(_padded(x - 0.5)))
        return out
