"""Threat models: an l_p ball of radius eps intersected with the input box [0, 1]^n."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import InputError, InputTypeError
from ..core.noise import SampleNoise

# Keeps a zero gradient from turning into NaN when it is normalised.
_TINY = 1e-12


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Shape a (N,) tensor to broadcast against a batch shaped like ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def l2_multiplier(size: Tensor, cap: Tensor, eps: float) -> Tensor:
    """The largest ``lambda`` with ``sum_i min(lambda * size_i, cap_i)^2 <= eps^2`` per
    row of ``size`` and ``cap`` (..., d), both non-negative (``inf`` where every
    coordinate reaches its cap within ``eps``), in float64.

    Moving coordinate ``i`` by ``min(lambda * size_i, cap_i)``, with ``cap_i`` its room to
    the box, is how both the ``L2`` projection onto the ball and the box and the
    first-order worst case spend an ``L2`` budget. Sorting the breakpoints
    ``cap_i / size_i`` at which coordinates reach their caps gives the squared norm as
    ``capped^2 + lambda^2 * free^2`` between breakpoints, so ``lambda`` is solved in closed
    form on the segment where the norm reaches ``eps``.
    """
    a = size.double()
    cap = cap.double().expand_as(a)
    breaks = torch.where(a > 0, cap / a.clamp(min=torch.finfo(a.dtype).tiny), torch.inf)
    breaks, order = breaks.sort(dim=-1)
    a_sorted, cap_sorted = a.gather(-1, order), cap.gather(-1, order)
    # After k coordinates are capped: their squared room, and the rest's squared size.
    capped_sq = F.pad(cap_sorted.pow(2).cumsum(-1), (1, 0))
    free_sq = a.pow(2).sum(-1, keepdim=True) - F.pad(a_sorted.pow(2).cumsum(-1), (1, 0))
    free_sq = free_sq.clamp(min=0.0)
    # The squared norm at each breakpoint; the answer caps the coordinates whose
    # breakpoint keeps it within eps^2.
    finite = torch.isfinite(breaks)
    at_break = capped_sq[..., :-1] + torch.where(finite, breaks, 0.0).pow(2) * free_sq[..., :-1]
    at_break = torch.where(finite, at_break, torch.inf)
    k = (at_break <= eps**2).sum(dim=-1, keepdim=True)
    rest = (eps**2 - capped_sq.gather(-1, k)).clamp(min=0.0)
    free = free_sq.gather(-1, k)
    tiny = torch.finfo(a.dtype).tiny
    return torch.where(free > 0, (rest / free.clamp(min=tiny)).sqrt(), torch.inf).squeeze(-1)


def _draw(
    source: torch.Generator | SampleNoise | None,
    shape: torch.Size | tuple[int, ...],
    stream: int,
    like: Tensor,
    *,
    normal: bool,
) -> Tensor:
    """Uniform or normal numbers of ``shape`` (batch first) from a generator or per sample."""
    if isinstance(source, SampleNoise):
        if len(source.ids) != shape[0]:
            raise InputError(f"{len(source.ids)} sample ids for a batch of {shape[0]}")
        tail = tuple(shape[1:])
        if normal:
            return source.normal(tail, stream=stream, like=like)
        return source.uniform(tail, stream=stream, like=like).reshape(shape)
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=source, device=like.device, dtype=like.dtype)


class Norm(StrEnum):
    LINF = "Linf"
    L2 = "L2"

    @classmethod
    def parse(cls, value: str | Norm) -> Norm:
        if isinstance(value, Norm):
            return value
        if isinstance(value, str):
            by_name = {norm.value.lower(): norm for norm in cls}
            norm = by_name.get(value.strip().lower())
            if norm is not None:
                return norm
        valid = ", ".join(repr(n.value) for n in cls)
        raise InputError(f"unknown norm {value!r}: expected one of {valid}")


def _fraction(text: str) -> float:
    """``"0.3"`` or ``"8/255"`` as a float, each part parsed by ``float`` (never
    evaluated; ``Fraction`` would expand ``1e-100000000`` into a number of 10^8 digits)."""
    parts = text.split("/")
    if len(parts) > 2:
        raise ValueError(text)
    values = [float(part) for part in parts]
    if any(math.isnan(v) for v in values):
        raise ValueError(text)
    if any(math.isinf(v) for v in values):
        raise OverflowError(text)
    return values[0] / values[1] if len(values) == 2 else values[0]


# An L2 ball this wide holds the whole box of any image up to 4096 x 4096 x 3 pixels
# (its diagonal is 7,094): a larger eps is a typo, and overflows float32 when squared.
L2_MOST = 1e4


def parse_eps(value: float | int | str) -> float:
    """A positive, finite radius from a number or a string like ``"8/255"`` or ``"0.3"``.

    Strings are parsed with :class:`fractions.Fraction`, never evaluated.
    """
    if isinstance(value, bool):
        raise InputTypeError("eps must be a number or a string such as '8/255', got a bool")
    if not isinstance(value, str | int | float):
        raise InputTypeError(
            f"eps must be a number or a string such as '8/255', got {type(value).__name__}"
        )
    try:
        eps = _fraction(value) if isinstance(value, str) else float(value)
    except OverflowError:
        eps = math.inf  # refused below, with the others that are not finite
    except (ValueError, ZeroDivisionError) as err:
        raise InputError(
            f"cannot parse eps {value!r}: expected a number or a fraction like '8/255'"
        ) from err
    if not math.isfinite(eps) or eps <= 0.0:
        raise InputError(f"eps must be positive and finite, got {value!r}")
    return eps


@dataclass(frozen=True, init=False)
class ThreatModel:
    """``B(x) = {x + d : ||d||_p <= eps, x + d in [0, 1]^n}`` with ``p`` in {inf, 2}.

    ``eps`` is in pixel units of inputs in [0, 1]; models carry their own normalisation.
    """

    norm: Norm
    eps: float

    def __init__(self, norm: str | Norm, eps: float | int | str) -> None:
        object.__setattr__(self, "norm", Norm.parse(norm))
        object.__setattr__(self, "eps", parse_eps(eps))
        if self.norm is Norm.L2 and self.eps > L2_MOST:
            raise InputError(
                f"L2 eps {self.eps:g} exceeds {L2_MOST:g}: such a ball holds the input box of "
                "any image (eps is in pixel units of [0, 1] inputs)"
            )
        if self.norm is Norm.LINF and self.eps > 1.0:
            # Inputs live in [0, 1]: such a ball holds the whole box, a typo for 1/eps or
            # an eps in 0-255 units.
            raise InputError(
                f"Linf eps {self.eps:g} exceeds 1, the width of the input box [0, 1] "
                "(eps is in pixel units of [0, 1] inputs: 8/255, not 8)"
            )

    def __str__(self) -> str:
        return f"{self.norm.value}(eps={self.eps:.6g})"

    def with_eps(self, eps: float | int | str) -> ThreatModel:
        return ThreatModel(self.norm, eps)

    def norms(self, delta: Tensor) -> Tensor:
        """The per-sample norm of a batch of perturbations."""
        flat = delta.flatten(1)
        if self.norm is Norm.LINF:
            return flat.abs().amax(dim=1)
        norms: Tensor = torch.linalg.vector_norm(flat, dim=1)
        return norms

    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """The Euclidean projection of every row of ``x_adv`` onto ``B(x)``.

        For ``Linf`` the set is a box, so coordinates clip independently. For ``L2`` the
        projection onto the ball and the box is ``clip(x + t * delta)`` with the largest
        ``t <= 1`` that keeps it in the ball (the KKT conditions of the projection give
        ``clip(x + delta / (1 + mu))``). Scaling into the ball and then clipping, as is
        common, wastes the budget the clipped coordinates release: on MNIST digits,
        clipping keeps 75% of the norm of a random perturbation on the sphere.
        """
        delta = x_adv - x
        if self.norm is Norm.LINF:
            return (x + delta.clamp(-self.eps, self.eps)).clamp(0.0, 1.0)
        flat, base = delta.flatten(1), x.flatten(1)
        room = torch.where(flat > 0, 1.0 - base, base).clamp(min=0.0)
        scale = l2_multiplier(flat.abs(), room, self.eps).clamp(max=1.0).to(delta.dtype)
        return (x + delta * _per_sample(scale, delta)).clamp(0.0, 1.0)

    def random_start(
        self, x: Tensor, source: torch.Generator | SampleNoise | None = None, *, stream: int = 0
    ) -> Tensor:
        """A point drawn uniformly from the eps-ball around ``x``, then put in the box.

        With :class:`~robust_transfer.core.noise.SampleNoise` each row's point depends only on
        the seed, its sample id and ``stream`` (e.g. the restart), not on the batch.
        """
        n = x[0].numel()
        rows = x.shape[0]
        if self.norm is Norm.LINF:
            u = _draw(source, x.shape, 2 * stream, x, normal=False)
            delta = (2.0 * u - 1.0) * self.eps
        else:
            direction = _draw(source, x.shape, 2 * stream, x, normal=True)
            direction = direction / _per_sample(
                torch.linalg.vector_norm(direction.flatten(1), dim=1).clamp_min(_TINY), x
            )
            radius = _draw(source, (rows,), 2 * stream + 1, x, normal=False) ** (1.0 / n)
            delta = direction * _per_sample(self.eps * radius, x)
        return self.project(x, x + delta)

    def ascent_direction(self, grad: Tensor) -> Tensor:
        """The steepest-ascent direction of unit ``p``-norm for a gradient batch."""
        if self.norm is Norm.LINF:
            return grad.sign()
        norms = torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(_TINY)
        return grad / _per_sample(norms, grad)
