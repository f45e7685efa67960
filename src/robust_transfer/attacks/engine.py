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

from ..core.noise import SampleNoise
from ..core.runtime import search_autocast
from ..theory.threat import ThreatModel

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
    stop_at_success: bool = False
    """PGD drops a row at its first success: for callers that need only whether a
    point breaks (its best point is then the first success, not the highest score)."""
    step_scale: float = 1.0
    """Scales the annealed step (from ``2 * step_scale * eps``): below 1 for a search
    that refines a point already found rather than explores."""

    def step_at(self, t: int, eps: float) -> float:
        if self.step_size is not None:
            return self.step_size
        return self.step_scale * eps * (1.0 + math.cos(math.pi * t / self.steps))


@dataclass(frozen=True)
class AscentResult:
    x_adv: Tensor
    score: Tensor
    success: Tensor


def better(score: Tensor, success: Tensor, best_score: Tensor, best_success: Tensor) -> Tensor:
    """Where a point beats the best so far: success outranks any score."""
    return (success & ~best_success) | ((success == best_success) & (score > best_score))


class Best:
    """The best point found so far for every row of ``x``, across steps and restarts."""

    def __init__(self, x: Tensor) -> None:
        self.x = x.clone()
        self.score = torch.full((len(x),), -math.inf, device=x.device, dtype=x.dtype)
        self.success = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def offer(self, rows: Tensor, x_adv: Tensor, score: Tensor, success: Tensor) -> None:
        """Keep the points of ``rows`` that beat their best so far."""
        wins = better(score, success, self.score[rows], self.success[rows])
        improved = rows[wins]
        self.x[improved] = x_adv[wins]
        self.score[improved] = score[wins]
        self.success[improved] = success[wins]

    def result(self) -> AscentResult:
        return AscentResult(self.x, self.score, self.success)


def keep_better(first: AscentResult, second: AscentResult) -> AscentResult:
    """Per row, the better of two searches' points (success outranks any score)."""
    wins = better(second.score, second.success, first.score, first.success)
    shape = (-1,) + (1,) * (first.x_adv.dim() - 1)
    return AscentResult(
        torch.where(wins.view(shape), second.x_adv, first.x_adv),
        torch.where(wins, second.score, first.score),
        torch.where(wins, second.success, first.success),
    )


# (clean rows x0, the restart's first point, their row numbers, restart number, the best
# so far) -> runs one restart, offering its iterates to the best
Restart = Callable[[Tensor, Tensor, Tensor, int, Best], None]


def over_restarts(
    one_restart: Restart,
    x: Tensor,
    threat: ThreatModel,
    settings: AscentSettings,
    noise: SampleNoise,
    *,
    rerun_successful: bool,
    start: Tensor | None,
    stream: int = 0,
) -> AscentResult:
    """The restarts every ascent shares. Row ``i``'s start at restart ``r`` is drawn from
    ``noise`` (one id per row) and stream ``stream + r``, so it is the same whatever else
    is in the batch; ``start`` (points of ``B(x)``), when given, replaces the first
    restart's random one. With ``rerun_successful=False`` a restart only attacks rows not
    yet successful."""
    best = Best(x)
    for restart in range(settings.restarts):
        rows = (
            torch.arange(len(x), device=x.device)
            if rerun_successful
            else (~best.success).nonzero().flatten()
        )
        if rows.numel() == 0:
            break
        x0 = x[rows]
        if start is not None and restart == 0:
            first = threat.project(x0, start[rows])
        else:
            first = threat.random_start(x0, noise.subset(rows), stream=stream + restart)
        one_restart(x0, first, rows, restart, best)
    return best.result()


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
    """Best iterate per row of ``x`` over ``settings.restarts`` PGD runs (starts and
    restarts as :func:`over_restarts` draws them)."""
    zero_grad_rows = 0

    def pgd(x0: Tensor, x_adv: Tensor, rows: Tensor, restart: int, best: Best) -> None:
        nonlocal zero_grad_rows
        for t in range(settings.steps + 1):
            last = t == settings.steps
            with torch.set_grad_enabled(not last), search_autocast(x.device):
                if not last:
                    x_adv.requires_grad_(True)
                score, success = objective(x_adv, rows, restart)
            score = score.to(x.dtype)
            if success is None:
                success = torch.zeros_like(score, dtype=torch.bool)
            best.offer(rows, x_adv.detach(), score.detach(), success)
            if last:
                break
            (grad,) = torch.autograd.grad(score.sum(), x_adv)
            if t == 0:
                zero_grad_rows += int((grad.flatten(1).abs().amax(dim=1) == 0).sum())
            x_adv = x_adv.detach()
            if settings.stop_at_success and bool(success.any()):
                going = ~success
                if not bool(going.any()):
                    break
                rows, x0, x_adv, grad = rows[going], x0[going], x_adv[going], grad[going]
            step = settings.step_at(t, threat.eps)
            x_adv = threat.project(x0, x_adv + step * threat.ascent_direction(grad))

    result = over_restarts(
        pgd, x, threat, settings, noise, rerun_successful=rerun_successful, start=start
    )
    if zero_grad_rows:
        warnings.warn(
            f"the objective's gradient was exactly zero at the start for {zero_grad_rows} "
            "sample(s): the model may mask gradients (saturation, non-differentiable "
            "layers); the attack cannot move those points and its result there is unreliable",
            stacklevel=3,
        )
    return result
