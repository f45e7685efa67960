"""The Lipschitz certificate: a proven l2 Lipschitz constant times the threat's l2 radius."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.errors import InputError
from ..theory.threat import Norm, ThreatModel
from .base import Refusal
from .layers import decompose
from .ops import SAFETY, chain_lipschitz


def lipschitz_shift(lipschitz_l2: float, threat: ThreatModel, input_numel: int) -> float:
    """``sup ||f(x') - f(x)||_2`` over the ball for an encoder that is ``L``-Lipschitz in l2.

    ``L * eps`` under ``L2``; under ``Linf`` the ball lies inside the l2 ball of radius
    ``sqrt(n) * eps``, so ``L * sqrt(n) * eps``.
    """
    if not math.isfinite(lipschitz_l2) or lipschitz_l2 < 0:
        raise InputError(f"lipschitz_l2 must be finite and non-negative, got {lipschitz_l2}")
    if input_numel < 1:
        raise InputError(f"input_numel must be positive, got {input_numel}")
    radius = threat.eps if threat.norm is Norm.L2 else math.sqrt(input_numel) * threat.eps
    return lipschitz_l2 * radius


def proven_lipschitz(encoder: nn.Module) -> float | None:
    """The l2 Lipschitz constant ``encoder`` proves by construction (its ``lipschitz_l2``
    attribute, see :class:`robust_transfer.models.Encoder`), or None."""
    constant = getattr(encoder, "lipschitz_l2", None)
    return None if constant is None else float(constant)


class LipschitzCertifier:
    """``L * eps`` (L2) or ``L * sqrt(n) * eps`` (Linf), the same bound for every sample.

    ``L`` is the smaller of two proven l2 Lipschitz constants, whichever exist: the one
    the encoder states (``lipschitz_l2``, as :class:`~robust_transfer.models.LipschitzCNN`
    does by construction), and the product of its layers' operator norms (exact spectral
    norms of linear maps, a Fourier bound for convolutions, the actual norms of AOL
    layers; see :mod:`.ops`), exact for an affine encoder.
    """

    name = "lipschitz"
    by_default = True

    def certify(self, encoder: nn.Module, x: Tensor, threat: ThreatModel) -> Tensor | Refusal:
        constants = []
        stated = proven_lipschitz(encoder)
        if stated is not None:
            constants.append(stated)
        net = decompose(encoder, x)
        if not isinstance(net, Refusal):
            constants.append(chain_lipschitz(net.ops, tuple(x.shape[1:])) * (1 + SAFETY))
        if not constants:
            reason = net.reason if isinstance(net, Refusal) else ""
            return Refusal(f"no proven Lipschitz constant: {reason}")
        bound = lipschitz_shift(min(constants), threat, x[0].numel())
        return torch.full((x.shape[0],), bound, dtype=torch.float32, device=x.device)
