"""An encoder as a chain of operations that certifiers can reason about.

:func:`decompose` turns an encoder into :class:`Op` objects (affine maps, ReLU, MaxMin,
max pooling, residual blocks) or refuses with the first module it cannot read, by name.
Each op knows its forward pass, a proven upper bound on its l2 Lipschitz constant, and
how an interval ``[lower, upper]`` of inputs maps to an interval of outputs (IBP). The
decomposition is checked against the encoder itself on the inputs it is given, so a
certificate is never computed for a network other than the one that runs.

Supported: ``nn.Sequential`` trees of Linear, Conv2d (any stride and padding, no
dilation or groups), BatchNorm1d/2d and Dropout in eval mode, ReLU, MaxPool2d, AvgPool2d,
AdaptiveAvgPool2d to 1x1, Flatten, Identity, PixelUnshuffle, and the project's
MaxMin, AOL and SLL layers and normalisation, and the project's encoders (SmallCNN,
LipschitzCNN, SLLNet, ResNet18 with its residual blocks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.encoders import ResNet18, SmallCNN, _BasicBlock, _Normalize
from ..models.lipschitz import (
    AOLConv2d,
    AOLLinear,
    LipschitzCNN,
    MaxMin,
    SLLConv2d,
    SLLNet,
    _padded,
)
from .base import Refusal

Interval = tuple[Tensor, Tensor]

# Float32 arithmetic of the encoder against float64 arithmetic of the bounds: a bound is
# widened by this relative margin so that rounding can never make it too small.
SAFETY = 1e-5
# Rounding of float32 layers, about 1e-7 of the values' size per layer: interval and
# linear bounds are widened by this share of the sizes involved, well above it.
ROUNDING = 2e-6


class Op:
    """One operation of a decomposed encoder."""

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def lipschitz(self, shape: tuple[int, ...]) -> float:
        """A proven upper bound on the l2 Lipschitz constant for inputs of ``shape``
        (one sample, no batch dimension)."""
        raise NotImplementedError

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        raise NotImplementedError


@dataclass
class Affine(Op):
    """``x -> A x + b``: ``apply`` computes it, ``magnitude`` applies ``|A|`` to a
    non-negative input (for intervals), ``norm`` bounds ``||A||_2`` for an input shape,
    and ``transpose``, where given, applies ``A^T`` to a batch of output-shaped rows for
    inputs of a shape (CROWN's backward pass; without it, autograd does, at the price of
    a forward pass)."""

    apply: Callable[[Tensor], Tensor]
    magnitude: Callable[[Tensor], Tensor]
    norm: Callable[[tuple[int, ...]], float]
    transpose: Callable[[Tensor, torch.Size], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def lipschitz(self, shape: tuple[int, ...]) -> float:
        return self.norm(shape)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        centre, radius = self.apply((lower + upper) / 2), self.magnitude((upper - lower) / 2)
        return centre - radius, centre + radius


class ReLU(Op):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def lipschitz(self, shape: tuple[int, ...]) -> float:
        return 1.0

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return torch.relu(lower), torch.relu(upper)


class PairSort(Op):
    """MaxMin: ``(max(a, b), min(a, b))`` of the two channel halves; 1-Lipschitz."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def lipschitz(self, shape: tuple[int, ...]) -> float:
        return 1.0

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        (la, lb), (ua, ub) = lower.chunk(2, dim=1), upper.chunk(2, dim=1)
        low = torch.cat([torch.maximum(la, lb), torch.minimum(la, lb)], dim=1)
        high = torch.cat([torch.maximum(ua, ub), torch.minimum(ua, ub)], dim=1)
        return low, high


@dataclass
class MaxPool(Op):
    module: nn.MaxPool2d

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.module(x)
        return out

    def lipschitz(self, shape: tuple[int, ...]) -> float:
        # |max(a) - max(b)| <= ||a - b||_inf per window; an input lies in at most
        # ceil(k / s) windows per dimension, so the squares add up at most that often.
        kernel, stride = _pair(self.module.kernel_size), _pair(self.module.stride)
        return math.sqrt(math.prod(math.ceil(k / s) for k, s in zip(kernel, stride, strict=True)))

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return self.module(lower), self.module(upper)


@dataclass
class Residual(Op):
    """``relu(body(x) + shortcut(x))`` (``after_relu``) or without the ReLU. ``proven``
    is a Lipschitz constant the block has by construction (an SLL layer's 1), which the
    triangle inequality over body and shortcut cannot see."""

    body: list[Op]
    shortcut: list[Op]
    after_relu: bool
    proven: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = run(self.body, x) + run(self.shortcut, x)
        return torch.relu(out) if self.after_relu else out

    def lipschitz(self, shape: tuple[int, ...]) -> float:
        triangle = chain_lipschitz(self.body, shape) + chain_lipschitz(self.shortcut, shape)
        return triangle if self.proven is None else min(triangle, self.proven)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        body_low, body_high = chain_interval(self.body, lower, upper)
        short_low, short_high = chain_interval(self.shortcut, lower, upper)
        low, high = body_low + short_low, body_high + short_high
        return (torch.relu(low), torch.relu(high)) if self.after_relu else (low, high)


def shift_bound(clean: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Per sample, ``|| max(upper - f(x), f(x) - lower) ||_2``: a bound on the shift from
    per-feature bounds ``[lower, upper]`` on ``f(x')``, widened against rounding."""
    reach = torch.maximum(upper - clean, clean - lower).clamp_min(0.0)
    size = clean.norm(dim=1) + upper.abs().amax(dim=1) + lower.abs().amax(dim=1)
    bound: Tensor = reach.norm(dim=1) * (1 + SAFETY) + ROUNDING * size
    return bound.float()


def run(ops: Sequence[Op], x: Tensor) -> Tensor:
    for op in ops:
        x = op.forward(x)
    return x


def chain_lipschitz(ops: Sequence[Op], shape: tuple[int, ...]) -> float:
    """The product of the ops' bounds, following the shapes through the chain."""
    constant = 1.0
    probe = torch.zeros(1, *shape)
    for op in ops:
        constant *= op.lipschitz(tuple(probe.shape[1:]))
        with torch.no_grad():
            probe = op.forward(probe)
    return constant


def chain_interval(ops: Sequence[Op], lower: Tensor, upper: Tensor) -> Interval:
    for op in ops:
        lower, upper = op.interval(lower, upper)
    return lower, upper


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _matrix_norm(weight: Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))


def _conv_norm(weight: Tensor, padding: tuple[int, int], shape: tuple[int, ...]) -> float:
    """A proven upper bound on the l2 norm of a zero-padded 2-D convolution (any stride)
    on inputs of ``shape``: the padded "valid" convolution is a compression of the
    circular convolution on a grid of the padded size, whose singular values are those
    of the kernel's Fourier transform at each frequency (Sedghi et al., 2019); a stride
    only keeps some outputs, which cannot raise the norm."""
    _, height, width = shape
    grid = (height + 2 * padding[0], width + 2 * padding[1])
    grid = (max(grid[0], weight.shape[2]), max(grid[1], weight.shape[3]))
    spectrum = torch.fft.fft2(weight.detach().double(), s=grid)  # (out, in, H, W)
    per_frequency = spectrum.permute(2, 3, 0, 1).reshape(-1, *spectrum.shape[:2])
    return float(torch.linalg.matrix_norm(per_frequency, ord=2).max())


def _linear(weight: Tensor, bias: Tensor | None) -> Affine:
    return Affine(
        apply=lambda x: F.linear(x, weight, bias),
        magnitude=lambda r: F.linear(r, weight.abs()),
        norm=lambda shape: _matrix_norm(weight),
        transpose=lambda rows, shape: rows @ weight,
    )


def _conv(
    weight: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
) -> Affine:
    return Affine(
        apply=lambda x: F.conv2d(x, weight, bias, stride=stride, padding=padding),
        magnitude=lambda r: F.conv2d(r, weight.abs(), stride=stride, padding=padding),
        norm=lambda shape: _conv_norm(weight, padding, shape),
        transpose=lambda rows, shape: _conv_transpose(rows, weight, stride, padding, shape),
    )


def _conv_transpose(
    rows: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    shape: torch.Size,
) -> Tensor:
    """``A^T`` of a convolution: the transposed convolution, padded out to the input's
    size (a stride can leave the last input rows outside every window; the padding is
    ``(size + 2 pad - kernel) mod stride``, always below the stride)."""
    extra = tuple(
        size - ((out - 1) * step - 2 * pad + kernel)
        for size, out, step, pad, kernel in zip(
            shape[1:], rows.shape[2:], stride, padding, weight.shape[2:], strict=True
        )
    )
    return F.conv_transpose2d(rows, weight, stride=stride, padding=padding, output_padding=extra)


def _sll(module: SLLConv2d) -> Residual:
    """``x - C^T relu(W^T x + b)`` with ``C`` the branch weight: the shortcut is the
    identity (no ops) and the block is 1-Lipschitz by construction."""
    padding = (module.padding, module.padding)
    branch = module.branch_weight()
    back = Affine(
        apply=lambda z: -F.conv_transpose2d(z, branch, padding=padding),
        magnitude=lambda r: F.conv_transpose2d(r, branch.abs(), padding=padding),
        # A transposed convolution has the singular values of the convolution.
        norm=lambda shape: _conv_norm(branch, padding, shape),
        transpose=lambda rows, shape: -F.conv2d(rows, branch, padding=padding),
    )
    body = [_conv(module.weight, module.bias, (1, 1), padding), ReLU(), back]
    return Residual(body, [], after_relu=False, proven=1.0)


def _scale(scale: Tensor, shift: Tensor) -> Affine:
    """``x * scale + shift`` with per-channel (broadcast) scale and shift."""
    return Affine(
        apply=lambda x: x * scale + shift,
        magnitude=lambda r: r * scale.abs(),
        norm=lambda shape: float(scale.detach().abs().max()),
        transpose=lambda rows, shape: rows * scale,
    )


def _reshape(function: Callable[[Tensor], Tensor], norm: float = 1.0) -> Affine:
    """A linear map that only moves, keeps or zero-pads entries (norm 1), or a
    non-negative one of a known norm: ``|A| = A``."""
    return Affine(apply=function, magnitude=function, norm=lambda shape: norm)


def _batchnorm(module: nn.BatchNorm1d | nn.BatchNorm2d) -> Affine | Refusal:
    if module.training or module.running_var is None or module.running_mean is None:
        return Refusal(f"{type(module).__name__} must be in eval mode with running statistics")
    weight = module.weight if module.weight is not None else torch.ones_like(module.running_var)
    bias = module.bias if module.bias is not None else torch.zeros_like(module.running_mean)
    scale = weight / torch.sqrt(module.running_var + module.eps)
    shift = bias - module.running_mean * scale
    view = (1, -1, 1, 1) if isinstance(module, nn.BatchNorm2d) else (1, -1)
    return _scale(scale.view(view), shift.view(view))


def _avg_pool(module: nn.AvgPool2d) -> Affine | Refusal:
    if (
        module.ceil_mode
        or module.divisor_override is not None
        or (not module.count_include_pad and module.padding != 0)
    ):
        return Refusal("AvgPool2d with ceil_mode, a divisor override or padding not counted")
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    # ||A||_2 <= sqrt(||A||_1 ||A||_inf): rows sum to at most 1, columns to at most
    # ceil(k / s)^2 / k^2 (the windows an input falls in, each weighing 1 / k^2).
    columns = math.prod(math.ceil(k / s) / k for k, s in zip(kernel, stride, strict=True))
    norm = math.sqrt(columns)
    return _reshape(module, norm)


def _global_pool(module: nn.AdaptiveAvgPool2d) -> Affine | Refusal:
    if _pair(module.output_size) != (1, 1):  # type: ignore[arg-type]
        return Refusal("AdaptiveAvgPool2d to an output other than 1x1")
    return Affine(
        apply=module,
        magnitude=module,
        norm=lambda shape: 1.0 / math.sqrt(shape[1] * shape[2]),
    )


def _leaf(module: nn.Module) -> list[Op] | Refusal:
    """The ops of one module that is not a container."""
    if isinstance(module, nn.Linear):
        return [_linear(module.weight, module.bias)]
    if isinstance(module, AOLLinear):
        return [_linear(module.scaled_weight(), module.bias)]
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or _pair(module.dilation) != (1, 1):
            return Refusal("Conv2d with groups or dilation")
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return Refusal("Conv2d with padding other than explicit zeros")
        return [_conv(module.weight, module.bias, _pair(module.stride), _pair(module.padding))]
    if isinstance(module, AOLConv2d):
        return [
            _conv(module.scaled_weight(), module.bias, (1, 1), (module.padding, module.padding))
        ]
    if isinstance(module, SLLConv2d):
        return [_sll(module)]
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        op = _batchnorm(module)
        return op if isinstance(op, Refusal) else [op]
    if isinstance(module, _Normalize):
        return [_scale(1.0 / module.std, -module.mean / module.std)]
    if isinstance(module, nn.ReLU):
        return [ReLU()]
    if isinstance(module, MaxMin):
        return [PairSort()]
    if isinstance(module, nn.MaxPool2d):
        if module.ceil_mode or _pair(module.dilation) != (1, 1):
            return Refusal("MaxPool2d with ceil_mode or dilation")
        return [MaxPool(module)]
    if isinstance(module, nn.AvgPool2d):
        op = _avg_pool(module)
        return op if isinstance(op, Refusal) else [op]
    if isinstance(module, nn.AdaptiveAvgPool2d):
        op = _global_pool(module)
        return op if isinstance(op, Refusal) else [op]
    if isinstance(module, nn.Flatten | nn.PixelUnshuffle):
        return [_reshape(module)]
    if isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training):
        return []
    return Refusal(f"unsupported layer {type(module).__name__}")


def _chain(modules: Sequence[nn.Module]) -> list[Op] | Refusal:
    ops: list[Op] = []
    for module in modules:
        part = _ops(module)
        if isinstance(part, Refusal):
            return part
        ops += part
    return ops


def _ops(module: nn.Module) -> list[Op] | Refusal:
    if isinstance(module, nn.Sequential):
        return _chain(list(module))
    if isinstance(module, _BasicBlock):
        body, shortcut = _ops(module.body), _ops(module.shortcut)
        if isinstance(body, Refusal):
            return body
        if isinstance(shortcut, Refusal):
            return shortcut
        return [Residual(body, shortcut, after_relu=True)]
    if isinstance(module, SmallCNN):
        return _chain([module.normalize, module.conv1, module.conv2, module.conv3, module.project])
    if isinstance(module, LipschitzCNN | SLLNet):
        # Both centre and zero-pad their inputs, then run their stages in order.
        centred = _scale(torch.ones(()), torch.tensor(-0.5))
        rest = _chain(module.stages())
        return rest if isinstance(rest, Refusal) else [centred, _reshape(_padded), *rest]
    if isinstance(module, ResNet18):
        return _chain([module.normalize, module.stem, *module.layers, module.pool, module.project])
    return _leaf(module)


# Flattens every sample's output: the features a head reads.
FLATTEN = _reshape(lambda t: t.flatten(1))


def ops_of(module: nn.Module) -> list[Op] | Refusal:
    """``module`` as a chain of ops on its live parameters (intervals through them are
    differentiable: certified training uses them), or why it cannot be read. Unchecked:
    :func:`decompose` also checks the chain against the module's output."""
    return _ops(module)


@dataclass(frozen=True)
class Decomposed:
    """An encoder as ops, and its flattened output on the points it was checked on (the
    clean features every certifier needs: no second forward pass)."""

    ops: list[Op]
    clean: Tensor


def decompose(encoder: nn.Module, x: Tensor) -> Decomposed | Refusal:
    """The ops of ``encoder``, checked to reproduce ``encoder(x)`` (flattened), or why not."""
    ops = _ops(encoder)
    if isinstance(ops, Refusal):
        return ops
    with torch.no_grad():
        expected = encoder(x).flatten(1)
        try:
            got = run(ops, x).flatten(1)
        except RuntimeError as err:  # e.g. a layer used on inputs of a shape it does not read
            return Refusal(f"the decomposition of {type(encoder).__name__} fails: {err}")
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        return Refusal(
            f"the decomposition of {type(encoder).__name__} does not reproduce its output "
            "(a forward pass that is not a plain chain of its layers?)"
        )
    # The centre of every bound is what the ops give (a compiled forward may differ from
    # them in the last bits).
    return Decomposed([*ops, FLATTEN], got)
