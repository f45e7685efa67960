"""Whole robustness curves from one profile: a head's expected robust accuracy as a
function of eps, per point the grid eps at which its prediction first changes, at about
the cost of a few eps of the expected robust accuracy rather than one per grid point."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.runtime import model_device
from ..theory.threat import Norm, ThreatModel
from .expected import EncoderProfile


@dataclass(frozen=True)
class GridRobustness:
    """Per point (rows) and grid eps (columns), expected robust or not; each point's
    bracket of its robust radius on the grid; how many point-attacks it took."""

    robust: Tensor
    radius_low: Tensor
    radius_high: Tensor
    attacked_points: int


@dataclass(frozen=True)
class RobustnessCurve:
    """A head's expected robust accuracy over ``eps`` (a grid from 0), from one profile.

    ``radius_low`` / ``radius_high`` bracket each point's robust radius on the grid (the
    largest grid eps at which it is expected robust, the smallest at which it is not;
    ``inf`` past the grid, 0 and 0 for a misclassified point). ``area`` is the mean
    expected robust accuracy over ``[0, eps[-1]]`` (trapezoids): the "expected
    robustness" over an eps range."""

    threat: Norm
    eps: Tensor
    accuracy: Tensor
    radius_low: Tensor
    radius_high: Tensor
    attacked_points: int

    @property
    def area(self) -> float:
        return curve_area(self.accuracy, self.eps)

    def at(self, eps: float) -> float:
        """The curve's value at a grid eps (the nearest grid point)."""
        return float(self.accuracy[int((self.eps - eps).abs().argmin())])


# How many grid steps the bracket of a point may move past first order's answer.
RINGS = 4


def robust_on_grid(
    profile: EncoderProfile,
    head: nn.Linear,
    y: Tensor,
    norm: Norm,
    grid: Tensor,
    top: Tensor | None = None,
) -> GridRobustness:
    """Per point and grid eps (increasing, from 0), whether ``head`` is expected robust:
    first order gives every point the grid eps at which its prediction first changes;
    then a short attack from the first-order worst point checks the grid eps on each
    side of it, moving the bracket ring by ring while the attack disagrees with first
    order (as :meth:`EncoderProfile.expected_robust` does at one eps). Each point is
    attacked at a few eps near its own radius, not at every eps of the grid.

    ``top``, the expected robust accuracy's verdict per point at the last grid eps
    (:meth:`EncoderProfile.assess`, which also attacks the points that first order keeps
    but curvature may not), settles that eps: a point it keeps is robust on the whole
    grid, a point it breaks is searched downward from there. The curve then ends where
    the single-eps estimate stands."""
    k = len(grid)
    drops = [profile.head_drops(head, ThreatModel(norm, float(eps))) for eps in grid[1:]]
    prediction = drops[0].prediction
    correct = prediction == y
    own = nn.functional.one_hot(prediction, drops[0].margins.shape[1]).bool()
    grid = grid.to(correct.device)  # indexed by per-point brackets on the profile's device
    # First order's verdict per grid eps (eps 0: every correct point).
    first_order = torch.stack(
        [correct, *(correct & ((d.margins > d.drops) | own).all(dim=1) for d in drops)]
    )
    # The first grid index first order calls broken (k: none on the grid).
    broken = ~first_order
    first_broken = torch.where(broken.any(0), broken.float().argmax(0), k)
    low, high = first_broken - 1, first_broken.clone()  # robust at low, broken at high
    settled = torch.zeros_like(correct)  # broken at the last eps by the estimate there
    if top is not None:
        top = top.to(correct.device).bool() & correct
        settled = correct & ~top
        low, high = torch.where(top, k - 1, low), torch.where(top, k, high)
        high = torch.where(settled, high.clamp(max=k - 1), high)
        low = torch.where(settled, torch.minimum(low, high - 1), low)
        first_order[-1] = top
    # Checking the last eps is moot where the estimate there settled it.
    todo_low = settled & (high == k - 1) & (low >= 1)
    todo_high = correct & (high < k) & ~(settled & (high == k - 1))
    device = model_device(profile.encoder, profile.x.device)
    model = nn.Sequential(profile.encoder, head.to(device)).eval()
    attacked = 0
    for _ in range(RINGS):
        if not bool((todo_high | todo_low).any()):
            break
        target = torch.where(todo_high, high, low)
        active = todo_high | todo_low
        survived = torch.zeros_like(correct)
        for index in torch.unique(target[active]).tolist():
            rows = (active & (target == index)).nonzero().flatten()
            threat = ThreatModel(norm, float(grid[index]))
            survived[rows] = profile._attack(model, drops[index - 1], y, threat, rows)
            attacked += len(rows)
        # Checked high and survived: the bracket moves up. Broken there: check low next.
        up = todo_high & survived
        low, high = torch.where(up, high, low), torch.where(up, high + 1, high)
        down = todo_low & ~survived
        low, high = torch.where(down, low - 1, low), torch.where(down, low, high)
        todo_low = (todo_high & ~survived & (low >= 1)) | (down & (low >= 1))
        todo_high = up & (high < k) & ~(settled & (high >= k - 1))
    robust = torch.stack([correct & ((i <= low) | ((i < high) & first_order[i])) for i in range(k)])
    inf = torch.tensor(float("inf"))
    radius_low = torch.where(correct, grid[low.clamp(0, k - 1)], 0.0)
    radius_high = torch.where(correct & (high < k), grid[high.clamp(0, k - 1)], inf)
    return GridRobustness(
        robust.T.contiguous(), radius_low, torch.where(correct, radius_high, 0.0), attacked
    )


def robustness_curve(
    profile: EncoderProfile, head: nn.Linear, y: Tensor, norm: Norm, grid: Tensor
) -> RobustnessCurve:
    """``head``'s expected robust accuracy over ``grid`` (see :func:`robust_on_grid`),
    ending at the expected robust accuracy of the last eps."""
    top, _ = profile.assess(head, y, ThreatModel(norm, float(grid[-1])))
    found = robust_on_grid(profile, head, y, norm, grid, top)
    accuracy = found.robust.float().mean(dim=0)
    return RobustnessCurve(
        norm, grid, accuracy, found.radius_low, found.radius_high, found.attacked_points
    )


def curve_area(accuracy: Tensor, eps: Tensor) -> float:
    """The mean of a curve over ``[eps[0], eps[-1]]`` (trapezoids)."""
    width = float(eps[-1] - eps[0])
    return float(torch.trapezoid(accuracy.double(), eps.double())) / width
