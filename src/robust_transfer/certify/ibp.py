"""Interval bound propagation (Gowal et al., 2018): the box of inputs the threat model
allows, pushed through every layer as an interval, bounds each feature of ``f(x')``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..theory.threat import ThreatModel
from .base import Refusal
from .layers import decompose
from .ops import chain_interval, shift_bound


class IBPCertifier:
    """Per sample, ``|| max(u - f(x), f(x) - l) ||_2`` for the feature interval ``[l, u]``
    of the input box ``[x - eps, x + eps] ∩ [0, 1]`` (which holds the L2 ball too, so
    under L2 the bound is looser than it needs to be). Cheap (two passes per layer) and
    tight for small eps on small networks; far from tight on deep ones."""

    name = "ibp"
    by_default = True

    def certify(self, encoder: nn.Module, x: Tensor, threat: ThreatModel) -> Tensor | Refusal:
        net = decompose(encoder, x)
        if isinstance(net, Refusal):
            return net
        with torch.no_grad():
            lower, upper = chain_interval(
                net.ops, (x - threat.eps).clamp(0.0, 1.0), (x + threat.eps).clamp(0.0, 1.0)
            )
        return shift_bound(net.clean, lower, upper)
