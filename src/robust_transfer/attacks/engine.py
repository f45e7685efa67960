"""Batched projected gradient ascent of a per-sample objective over a threat model.

One engine serves every attack: the representation attack maximises a feature
distance, the classifier attack a loss. Each step costs one forward and one backward
pass of the whole batch; the best iterate of every sample is kept across steps and
restarts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..noise import SampleNoise
from ..runtime import search_autocast
from ..threat import ThreatModel

# Maps (x_adv, indices of those rows within the batch, restart number) to a differentiable
# per-sample score to maximise and, optionally, a per-sample success flag that outranks the
# score (a misclassified iterate beats any higher-loss correctly classified one). The restart
# number lets an objective change between restarts, e.g. the target class of a targeted attack.
Objective = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class AscentSettings:
    steps: int
    restarts: int
    step_size: float | None
    """Constant step (Madry et al. PGD) when given; otherwise a cosine-annealed step
    from ``2 * eps`` down to zero, which explores with large steps first and settles
    into a local maximum at the end."""

    def step_at(self, t: int, eps: float) -> float:
        if self.step_size is not None:
            return self.step_size
        return eps * (1.0 + math.cos(math.pi * t / self.steps))


@dataclass(frozen=True)
class AscentResult:
    x_adv: Tensor
    score: Tensor
    success: Tensor


def maximize(
    objective: Objective,
    x: Tensor,
    threat: ThreatModel,
    settings: AscentSettings,
    noise: SampleNoise,
    *,
    rerun_successful: bool,
    start: Tensor | None = None,
) -> AscentResult:
    """Best iterate per row of ``x`` over ``settings.restarts`` random starts.

    Row ``i``'s start at restart ``r`` is drawn from ``noise`` (one id per row) and
    stream ``r``, so it is the same whatever else is in the batch; ``start`` (points of
    ``B(x)``), when given, replaces the first restart's random one. With
    ``rerun_successful=False`` a restart only attacks rows not yet successful.
    """
    n = x.shape[0]
    best_x = x.clone()
    best_score = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
    best_success = torch.zeros(n, dtype=torch.bool, device=x.device)
    zero_grad_rows = 0
    for restart in range(settings.restarts):
        rows = (
            torch.arange(n, device=x.device)
            if rerun_successful
            else (~best_success).nonzero().flatten()
        )
        if rows.numel() == 0:
            break
        x0 = x[rows]
        if start is not None and restart == 0:
            x_adv = threat.project(x0, start[rows])
        else:
            x_adv = threat.random_start(x0, noise.subset(rows), stream=restart)
        for t in range(settings.steps + 1):
            last = t == settings.steps
            with torch.set_grad_enabled(not last), search_autocast(x.device):
                if not last:
                    x_adv.requires_grad_(True)
                score, success = objective(x_adv, rows, restart)
            score = score.to(best_score.dtype)
            if success is None:
                success = torch.zeros_like(score, dtype=torch.bool)
            old_score, old_success = best_score[rows], best_success[rows]
            better = (success & ~old_success) | (
                (success == old_success) & (score.detach() > old_score)
            )
            improved = rows[better]
            best_x[improved] = x_adv.detach()[better]
            best_score[improved] = score.detach()[better]
            best_success[improved] = success[better]
            if last:
                break
            (grad,) = torch.autograd.grad(score.sum(), x_adv)
            if t == 0:
                zero_grad_rows += int((grad.flatten(1).abs().amax(dim=1) == 0).sum())
            step = settings.step_at(t, threat.eps)
            x_adv = threat.project(x0, x_adv.detach() + step * threat.ascent_direction(grad))
    if zero_grad_rows:
        warnings.warn(
            f"the objective's gradient was exactly zero at the start for {zero_grad_rows} "
            "sample(s): the model may mask gradients (saturation, non-differentiable "
            "layers); the attack cannot move those points and its result there is unreliable",
            stacklevel=3,
        )
    return AscentResult(best_x, best_score, best_success)
