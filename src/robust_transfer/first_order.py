"""The largest first-order drop of a linear function over a threat set intersected with
the box ``[0, 1]``: ``max_delta -g^T delta`` subject to ``||delta||_p <= eps`` and
``0 <= x + delta <= 1``.

Pure tensor arithmetic, exact for both threat models (see ``theory.md``, "Expected
robust accuracy"). A pixel can only move in the direction that lowers ``g^T delta``
by as much as its room to the box allows: ``x_i`` when ``g_i > 0`` (lower it),
``1 - x_i`` otherwise (raise it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .threat import Norm, ThreatModel


def room(g: Tensor, x: Tensor) -> Tensor:
    """How far each pixel may move in the direction that lowers ``g^T delta``; ``x``
    (..., d) broadcasts against ``g`` (..., d)."""
    return torch.where(g > 0, x, 1.0 - x).clamp(min=0.0)


def linf_drop(g: Tensor, x: Tensor, eps: float) -> Tensor:
    """``sum_i |g_i| * min(eps, room_i)``: the exact largest drop under ``Linf``."""
    return (g.abs() * room(g, x).clamp(max=eps)).sum(dim=-1)


def _l2_solution(g: Tensor, x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The drop, ``lambda`` (inf where every coordinate is capped) and ``room`` of the
    ``L2`` optimum ``t_i = min(lambda |g_i|, room_i)``.

    Sorting the breakpoints ``room_i / |g_i|`` at which coordinates hit their room gives
    ``||t(lambda)||^2`` as ``capped_room^2 + lambda^2 * free_g^2`` between breakpoints,
    so ``lambda`` is solved in closed form on the segment where the norm reaches ``eps``.
    """
    a = g.abs().double()
    cap = room(g, x).double().expand_as(a)
    breaks = torch.where(a > 0, cap / a.clamp(min=torch.finfo(a.dtype).tiny), torch.inf)
    breaks, order = breaks.sort(dim=-1)
    a_sorted, cap_sorted = a.gather(-1, order), cap.gather(-1, order)
    # After k coordinates are capped: their squared room and their gain; the rest's
    # squared gradient.
    capped_sq = F.pad(cap_sorted.pow(2).cumsum(-1), (1, 0))
    capped_gain = F.pad((a_sorted * cap_sorted).cumsum(-1), (1, 0))
    free_sq = a.pow(2).sum(-1, keepdim=True) - F.pad(a_sorted.pow(2).cumsum(-1), (1, 0))
    free_sq = free_sq.clamp(min=0.0)
    # ||t||^2 at each breakpoint; the optimum caps the coordinates whose breakpoint
    # keeps it within eps^2.
    finite = torch.isfinite(breaks)
    at_break = capped_sq[..., :-1] + torch.where(finite, breaks, 0.0).pow(2) * free_sq[..., :-1]
    at_break = torch.where(finite, at_break, torch.inf)
    k = (at_break <= eps**2).sum(dim=-1, keepdim=True)
    rest = (eps**2 - capped_sq.gather(-1, k)).clamp(min=0.0)
    free = free_sq.gather(-1, k)
    lam = torch.where(
        free > 0, (rest / free.clamp(min=torch.finfo(a.dtype).tiny)).sqrt(), torch.inf
    )
    drop = capped_gain.gather(-1, k) + torch.where(free > 0, (rest * free).sqrt(), 0.0)
    return drop.squeeze(-1), lam, cap


def l2_drop(g: Tensor, x: Tensor, eps: float) -> Tensor:
    """The exact largest drop under ``L2``: maximise ``sum_i |g_i| t_i`` over
    ``0 <= t_i <= room_i``, ``||t||_2 <= eps`` (KKT: ``t_i = min(lambda |g_i|, room_i)``)."""
    return _l2_solution(g, x, eps)[0].to(g.dtype)


def optimum(g: Tensor, x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
    """The largest first-order drop per row of ``g`` (..., d) and the perturbation
    ``delta`` (..., d) of ``B(x)`` that reaches it."""
    if threat.norm is Norm.LINF:
        step = room(g, x).clamp(max=threat.eps).expand_as(g)
        value = linf_drop(g, x, threat.eps)
    else:
        solution, lam, cap = _l2_solution(g, x, threat.eps)
        a = g.abs().double()
        step = torch.where(a > 0, torch.minimum(lam * a, cap), 0.0).to(g.dtype)
        value = solution.to(g.dtype)
    return value, -torch.sign(g) * step


def drop(g: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """The largest first-order drop of ``g^T delta`` over ``B(x)``, per row of ``g``
    (..., d); ``x`` (..., d) broadcasts against it."""
    if threat.norm is Norm.LINF:
        return linf_drop(g, x, threat.eps)
    return l2_drop(g, x, threat.eps)
