"""The operations certifiers reason about, each with what every certifier needs of it.

An :class:`Op` knows its forward pass, a proven upper bound on its l2 Lipschitz constant
(the ``lipschitz`` certifier), how an interval of inputs maps to an interval of outputs
(IBP) and how a linear bound on its output becomes one on its input (CROWN's backward
step). A new kind of operation is a new subclass; :mod:`.layers` reads modules into
chains of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Interval = tuple[Tensor, Tensor]
# Each op's input interval under ``id(op)``; a residual sum's under ``("sum", id(op))``
# and CROWN's interval of MaxMin's gap under ``("gap", id(op))``.
Bounds = dict[object, Interval]


class NotBoundable(Exception):
    """An op CROWN's backward pass cannot cross; the message names it."""


def as_pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


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

    def backward(self, coef: Tensor, const: Tensor, bounds: Bounds) -> tuple[Tensor, Tensor]:
        """CROWN's step back through this op: from ``<coef, out> + const`` bounding a
        quantity from above, a ``(coef', const')`` with ``<coef', in> + const'`` bounding
        it from above for every input in the op's input interval ``bounds[id(self)]``
        (rows: ``coef`` has shape (N, R, *output shape))."""
        raise NotBoundable(type(self).__name__)


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

    def backward(self, coef: Tensor, const: Tensor, bounds: Bounds) -> tuple[Tensor, Tensor]:
        shape = bounds[id(self)][0].shape[1:]
        batch, rows = coef.shape[:2]
        flat = coef.reshape(batch * rows, *coef.shape[2:])
        if self.transpose is not None:
            back = self.transpose(flat, shape)
        else:
            # Certified training differentiates through this product: keep its graph then.
            training = torch.is_grad_enabled()
            with torch.enable_grad():
                point = torch.zeros(batch * rows, *shape, dtype=coef.dtype, device=coef.device)
                point.requires_grad_(True)
                out = self.apply(point)
                (back,) = torch.autograd.grad(
                    out, point, grad_outputs=flat.reshape(out.shape), create_graph=training
                )
        offset = self.apply(torch.zeros(1, *shape, dtype=coef.dtype, device=coef.device))
        const = const + (coef * offset.unsqueeze(1)).flatten(2).sum(-1)
        return back.reshape(batch, rows, *shape), const


class ReLU(Op):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def lipschitz(self, shape: tuple[int, ...]) -> float:
        return 1.0

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return torch.relu(lower), torch.relu(upper)

    def backward(self, coef: Tensor, const: Tensor, bounds: Bounds) -> tuple[Tensor, Tensor]:
        return relu_backward(coef, const, *bounds[id(self)])


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

    def backward(self, coef: Tensor, const: Tensor, bounds: Bounds) -> tuple[Tensor, Tensor]:
        """``<A_max, b + r> + <A_min, a - r>`` with ``r = relu(a - b)``, ``a - b`` in the
        interval of the channel halves' gap (CROWN's own, where it computed one)."""
        gap = bounds.get(("gap", id(self))) or pair_gap(*bounds[id(self)])
        a_max, a_min = coef.chunk(2, dim=2)
        through, const = relu_backward(a_max - a_min, const, *gap)
        return torch.cat([a_min + through, a_max - through], dim=2), const


@dataclass
class MaxPool(Op):
    module: nn.MaxPool2d

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.module(x)
        return out

    def lipschitz(self, shape: tuple[int, ...]) -> float:
        # |max(a) - max(b)| <= ||a - b||_inf per window; an input lies in at most
        # ceil(k / s) windows per dimension, so the squares add up at most that often.
        kernel, stride = as_pair(self.module.kernel_size), as_pair(self.module.stride)
        return math.sqrt(math.prod(math.ceil(k / s) for k, s in zip(kernel, stride, strict=True)))

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return self.module(lower), self.module(upper)

    def backward(self, coef: Tensor, const: Tensor, bounds: Bounds) -> tuple[Tensor, Tensor]:
        raise NotBoundable("max pooling (the ibp certifier handles it)")


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

    def backward(self, coef: Tensor, const: Tensor, bounds: Bounds) -> tuple[Tensor, Tensor]:
        """Through the final ReLU (on the sum's interval ``bounds[("sum", id)]``), then
        both branches from the same rows, their constants added."""
        if self.after_relu:
            coef, const = relu_backward(coef, const, *bounds[("sum", id(self))])
        zero = torch.zeros_like(const)
        body, body_const = chain_backward(self.body, coef, zero, bounds)
        short, short_const = chain_backward(self.shortcut, coef, zero, bounds)
        return body + short, const + body_const + short_const


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


def chain_backward(
    ops: Sequence[Op], coef: Tensor, const: Tensor, bounds: Bounds
) -> tuple[Tensor, Tensor]:
    """CROWN's backward pass through a chain: each op's own :meth:`Op.backward`."""
    for op in reversed(ops):
        coef, const = op.backward(coef, const, bounds)
    return coef, const


def relu_relaxation(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU between ``lower`` and ``upper``: upper line ``a_up z + b_up`` and lower line
    ``a_low z`` (slope 1 or 0, whichever is closer: CROWN's adaptive choice)."""
    unstable = (lower < 0) & (upper > 0)
    width = (upper - lower).clamp_min(1e-12)
    a_up = torch.where(unstable, upper / width, (lower >= 0).to(lower.dtype))
    b_up = torch.where(unstable, -lower * upper / width, torch.zeros_like(lower))
    a_low = torch.where(unstable, (upper >= -lower).to(lower.dtype), (lower >= 0).to(lower.dtype))
    return a_up, b_up, a_low


def relu_backward(
    coef: Tensor, const: Tensor, lower: Tensor, upper: Tensor
) -> tuple[Tensor, Tensor]:
    """Bound ``<coef, relu(z)>`` from above by ``<coef', z> + const'``."""
    a_up, b_up, a_low = (t.unsqueeze(1) for t in relu_relaxation(lower, upper))
    positive, negative = coef.clamp_min(0), coef.clamp_max(0)
    new = positive * a_up + negative * a_low
    return new, const + (positive * b_up).flatten(2).sum(-1)


def pair_gap(lower: Tensor, upper: Tensor) -> Interval:
    """Interval of ``a - b`` for MaxMin's channel halves ``a`` and ``b``."""
    (low_a, low_b), (up_a, up_b) = lower.chunk(2, dim=1), upper.chunk(2, dim=1)
    return low_a - up_b, up_a - low_b
