"""Upper bounds on the representation shift: the certified side of the criterion."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .threat import Norm, ThreatModel


def lipschitz_shift(lipschitz_l2: float, threat: ThreatModel, input_numel: int) -> float:
    """``sup ||f(x') - f(x)||_2`` over the ball for an encoder that is ``L``-Lipschitz in l2.

    ``L * eps`` under ``L2``; under ``Linf`` the ball lies inside the l2 ball of radius
    ``sqrt(n) * eps``, so ``L * sqrt(n) * eps``.
    """
    if not math.isfinite(lipschitz_l2) or lipschitz_l2 < 0:
        raise ValueError(f"lipschitz_l2 must be finite and non-negative, got {lipschitz_l2}")
    if input_numel < 1:
        raise ValueError(f"input_numel must be positive, got {input_numel}")
    radius = threat.eps if threat.norm is Norm.L2 else math.sqrt(input_numel) * threat.eps
    return lipschitz_l2 * radius


def certified_shift(encoder: nn.Module, threat: ThreatModel, x: Tensor) -> Tensor | None:
    """A per-sample certified shift for ``x``, or None when the encoder proves no bound.

    An encoder proves one through a ``lipschitz_l2`` attribute (see
    :class:`robust_transfer.models.Encoder`).
    """
    constant = getattr(encoder, "lipschitz_l2", None)
    if constant is None:
        return None
    bound = lipschitz_shift(float(constant), threat, x[0].numel())
    return torch.full((x.shape[0],), bound, dtype=torch.float32)
