"""The largest first-order drop of a linear function over a threat set intersected with
the box ``[0, 1]``: ``max_delta -g^T delta`` subject to ``||delta||_p <= eps`` and
``0 <= x + delta <= 1``.

Pure tensor arithmetic, exact for both threat models (see ``docs/theory.md``, "Expected
robust accuracy"). A pixel can only move in the direction that lowers ``g^T delta``
by as much as its room to the box allows: ``x_i`` when ``g_i > 0`` (lower it),
``1 - x_i`` otherwise (raise it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .threat import Norm, ThreatModel, l2_multiplier


def room(g: Tensor, x: Tensor) -> Tensor:
    """How far each pixel may move in the direction that lowers ``g^T delta``; ``x``
    (..., d) broadcasts against ``g`` (..., d)."""
    return torch.where(g > 0, x, 1.0 - x).clamp(min=0.0)


def linf_drop(g: Tensor, x: Tensor, eps: float) -> Tensor:
    """``sum_i |g_i| * min(eps, room_i)``: the exact largest drop under ``Linf``."""
    return (g.abs() * room(g, x).clamp(max=eps)).sum(dim=-1)


def _l2_step(g: Tensor, x: Tensor, eps: float) -> Tensor:
    """The ``L2`` optimum's move per coordinate, ``t_i = min(lambda |g_i|, room_i)`` (KKT
    of maximising ``sum_i |g_i| t_i`` over ``0 <= t_i <= room_i``, ``||t||_2 <= eps``),
    in float64."""
    a = g.abs().double()
    cap = room(g, x).double().expand_as(a)
    lam = l2_multiplier(a, cap, eps).unsqueeze(-1)
    return torch.where(a > 0, torch.minimum(lam * a, cap), 0.0)


def _gain(g: Tensor, step: Tensor) -> Tensor:
    """``sum_i |g_i| step_i``, the drop a move of ``step`` per coordinate buys."""
    return (g.abs().double() * step).sum(dim=-1).to(g.dtype)


def l2_drop(g: Tensor, x: Tensor, eps: float) -> Tensor:
    """The exact largest drop under ``L2``."""
    return _gain(g, _l2_step(g, x, eps))


def optimum(g: Tensor, x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
    """The largest first-order drop per row of ``g`` (..., d) and the perturbation
    ``delta`` (..., d) of ``B(x)`` that reaches it."""
    if threat.norm is Norm.LINF:
        step = room(g, x).clamp(max=threat.eps).expand_as(g)
        value = linf_drop(g, x, threat.eps)
    else:
        step64 = _l2_step(g, x, threat.eps)
        value, step = _gain(g, step64), step64.to(g.dtype)
    return value, -torch.sign(g) * step


def drop(g: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """The largest first-order drop of ``g^T delta`` over ``B(x)``, per row of ``g``
    (..., d); ``x`` (..., d) broadcasts against it."""
    if threat.norm is Norm.LINF:
        return linf_drop(g, x, threat.eps)
    return l2_drop(g, x, threat.eps)
