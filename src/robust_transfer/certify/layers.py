"""Reading an encoder into the chain of :mod:`.ops` its certifiers reason about.

:func:`decompose` reads an encoder with the reader registered for each module type
(:func:`register_layer`; a module whose type has none is refused, by name) and checks
the chain against the encoder itself on the inputs it is given, so a certificate is
never computed for a network other than the one that runs.

Read out of the box: ``nn.Sequential`` trees of Linear, Conv2d (any stride and padding,
no dilation or groups), BatchNorm1d/2d and Dropout in eval mode, ReLU, MaxPool2d,
AvgPool2d, AdaptiveAvgPool2d to 1x1, Flatten, Identity, PixelUnshuffle, and the
project's MaxMin, AOL and SLL layers and normalisation, and the project's encoders
(SmallCNN, LipschitzCNN, SLLNet, ResNet18 with its residual blocks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import InputTypeError
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
from .ops import Affine, MaxPool, Op, PairSort, ReLU, Residual, as_pair, run


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


def linear_op(weight: Tensor, bias: Tensor | None) -> Affine:
    return Affine(
        apply=lambda x: F.linear(x, weight, bias),
        magnitude=lambda r: F.linear(r, weight.abs()),
        norm=lambda shape: _matrix_norm(weight),
        transpose=lambda rows, shape: rows @ weight,
    )


def conv_op(
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
    body = [conv_op(module.weight, module.bias, (1, 1), padding), ReLU(), back]
    return Residual(body, [], after_relu=False, proven=1.0)


def scale_op(scale: Tensor, shift: Tensor) -> Affine:
    """``x * scale + shift`` with per-channel (broadcast) scale and shift."""
    return Affine(
        apply=lambda x: x * scale + shift,
        magnitude=lambda r: r * scale.abs(),
        norm=lambda shape: float(scale.detach().abs().max()),
        transpose=lambda rows, shape: rows * scale,
    )


def reshape_op(function: Callable[[Tensor], Tensor], norm: float = 1.0) -> Affine:
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
    return scale_op(scale.view(view), shift.view(view))


def _avg_pool(module: nn.AvgPool2d) -> Affine | Refusal:
    if (
        module.ceil_mode
        or module.divisor_override is not None
        or (not module.count_include_pad and module.padding != 0)
    ):
        return Refusal("AvgPool2d with ceil_mode, a divisor override or padding not counted")
    kernel, stride = as_pair(module.kernel_size), as_pair(module.stride or module.kernel_size)
    # ||A||_2 <= sqrt(||A||_1 ||A||_inf): rows sum to at most 1, columns to at most
    # ceil(k / s)^2 / k^2 (the windows an input falls in, each weighing 1 / k^2).
    columns = math.prod(math.ceil(k / s) / k for k, s in zip(kernel, stride, strict=True))
    norm = math.sqrt(columns)
    return reshape_op(module, norm)


def _global_pool(module: nn.AdaptiveAvgPool2d) -> Affine | Refusal:
    if as_pair(module.output_size) != (1, 1):  # type: ignore[arg-type]
        return Refusal("AdaptiveAvgPool2d to an output other than 1x1")
    return Affine(
        apply=module,
        magnitude=module,
        norm=lambda shape: 1.0 / math.sqrt(shape[1] * shape[2]),
    )


LayerReader = Callable[[Any], list[Op] | Refusal]

_READERS: dict[type[nn.Module], LayerReader] = {}


def register_layer(kind: type[nn.Module], reader: LayerReader) -> None:
    """Teach every certifier to read modules of ``kind`` (and its subclasses, unless
    they have their own reader): ``reader(module)`` returns the module's computation as
    ops on its live parameters (built from :func:`linear_op`, :func:`conv_op`,
    :func:`scale_op`, :func:`reshape_op`, the classes of :mod:`.ops`, and :func:`ops_of`
    for child modules), or a :class:`Refusal` saying why this instance cannot be read.
    :func:`decompose` checks the result against the module's own output on the points
    certified, so a wrong reader gives refusals, not wrong certificates."""
    if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
        raise InputTypeError(f"kind must be an nn.Module subclass, got {kind!r}")
    if not callable(reader):
        raise InputTypeError(f"reader must be callable, got {type(reader).__name__}")
    _READERS[kind] = reader


def _one(op: Op | Refusal) -> list[Op] | Refusal:
    return op if isinstance(op, Refusal) else [op]


def _conv2d(module: nn.Conv2d) -> list[Op] | Refusal:
    if module.groups != 1 or as_pair(module.dilation) != (1, 1):
        return Refusal("Conv2d with groups or dilation")
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return Refusal("Conv2d with padding other than explicit zeros")
    return [conv_op(module.weight, module.bias, as_pair(module.stride), as_pair(module.padding))]


def _max_pool(module: nn.MaxPool2d) -> list[Op] | Refusal:
    if module.ceil_mode or as_pair(module.dilation) != (1, 1):
        return Refusal("MaxPool2d with ceil_mode or dilation")
    return [MaxPool(module)]


def _dropout(module: nn.Dropout) -> list[Op] | Refusal:
    return Refusal("Dropout in training mode") if module.training else []


def _basic_block(module: _BasicBlock) -> list[Op] | Refusal:
    body, shortcut = ops_of(module.body), ops_of(module.shortcut)
    if isinstance(body, Refusal):
        return body
    if isinstance(shortcut, Refusal):
        return shortcut
    return [Residual(body, shortcut, after_relu=True)]


def _lipschitz_net(module: LipschitzCNN | SLLNet) -> list[Op] | Refusal:
    # Both centre and zero-pad their inputs, then run their stages in order.
    centred = scale_op(torch.ones(()), torch.tensor(-0.5))
    rest = _chain(module.stages())
    return rest if isinstance(rest, Refusal) else [centred, reshape_op(_padded), *rest]


def _chain(modules: Sequence[nn.Module]) -> list[Op] | Refusal:
    ops: list[Op] = []
    for module in modules:
        part = ops_of(module)
        if isinstance(part, Refusal):
            return part
        ops += part
    return ops


_BUILT_IN: dict[type[nn.Module], LayerReader] = {
    nn.Linear: lambda m: [linear_op(m.weight, m.bias)],
    AOLLinear: lambda m: [linear_op(m.scaled_weight(), m.bias)],
    nn.Conv2d: _conv2d,
    AOLConv2d: lambda m: [conv_op(m.scaled_weight(), m.bias, (1, 1), (m.padding, m.padding))],
    SLLConv2d: lambda m: [_sll(m)],
    nn.BatchNorm1d: lambda m: _one(_batchnorm(m)),
    nn.BatchNorm2d: lambda m: _one(_batchnorm(m)),
    _Normalize: lambda m: [scale_op(1.0 / m.std, -m.mean / m.std)],
    nn.ReLU: lambda m: [ReLU()],
    MaxMin: lambda m: [PairSort()],
    nn.MaxPool2d: _max_pool,
    nn.AvgPool2d: lambda m: _one(_avg_pool(m)),
    nn.AdaptiveAvgPool2d: lambda m: _one(_global_pool(m)),
    nn.Flatten: lambda m: [reshape_op(m)],
    nn.PixelUnshuffle: lambda m: [reshape_op(m)],
    nn.Identity: lambda m: [],
    nn.Dropout: _dropout,
    nn.Sequential: lambda m: _chain(list(m)),
    _BasicBlock: _basic_block,
    SmallCNN: lambda m: _chain([m.normalize, m.conv1, m.conv2, m.conv3, m.project]),
    LipschitzCNN: _lipschitz_net,
    SLLNet: _lipschitz_net,
    ResNet18: lambda m: _chain([m.normalize, m.stem, *m.layers, m.pool, m.project]),
}
for _kind, _reader in _BUILT_IN.items():
    register_layer(_kind, _reader)


def ops_of(module: nn.Module) -> list[Op] | Refusal:
    """``module`` as a chain of ops on its live parameters (intervals through them are
    differentiable: certified training uses them), or why it cannot be read: the reader
    registered for its type, or its nearest base class's. Unchecked: :func:`decompose`
    also checks the chain against the module's output."""
    reader = _reader_of(module)
    if reader is not None:
        return reader(module)
    inner = _innermost_unreadable(module)
    where = (
        "" if inner is None else f": its {type(inner[1]).__name__} at {inner[0]!r} has no reader"
    )
    return Refusal(f"unsupported layer {type(module).__name__}{where}")


def _reader_of(module: nn.Module) -> LayerReader | None:
    """The reader registered for ``module``'s type, or for its nearest base class."""
    return next((_READERS[kind] for kind in type(module).__mro__ if kind in _READERS), None)


def _readable(module: nn.Module) -> bool:
    return _reader_of(module) is not None


def _innermost_unreadable(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The first layer inside ``module`` with no reader and none below it: what a wrapped
    model (a zoo encoder, a user's network) would need read first (a ResNet-50's first
    Bottleneck, a ViT's patch embedding); None when ``module`` is that layer itself."""
    for name, inner in module.named_modules():
        if (
            name
            and not _readable(inner)
            and all(_readable(m) for m in inner.modules() if m is not inner)
        ):
            return name, inner
    return None


# Flattens every sample's output: the features a head reads.
FLATTEN = reshape_op(lambda t: t.flatten(1))


@dataclass(frozen=True)
class Decomposed:
    """An encoder as ops, and its flattened output on the points it was checked on (the
    clean features every certifier needs: no second forward pass)."""

    ops: list[Op]
    clean: Tensor


def decompose(encoder: nn.Module, x: Tensor) -> Decomposed | Refusal:
    """The ops of ``encoder``, checked to reproduce ``encoder(x)`` (flattened), or why not."""
    ops = ops_of(encoder)
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
