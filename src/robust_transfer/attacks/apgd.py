"""APGD (Croce & Hein, 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): projected gradient ascent with momentum
and a per-sample step size that halves at checkpoints where the ascent stalls, each
halving restarting from the sample's best point.

It serves the same :data:`~.engine.Objective` as :func:`~.engine.maximize` and runs the
same number of forward and backward passes (the last iterate only forward); where PGD's
fixed schedule leaves a sample stuck (the tail of the attacked shift), the adaptive step
keeps moving.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.noise import SampleNoise
from ..core.runtime import search_autocast
from ..theory.threat import ThreatModel
from .engine import AscentResult, AscentSettings, Best, Objective, better, over_restarts

# The paper's constants: momentum, the share of steps that must raise the objective
# since the last checkpoint for the step size to stay, and the checkpoint spacing.
_MOMENTUM = 0.75
_RHO = 0.75
_FIRST_CHECKPOINT, _SHRINK, _MIN_GAP = 0.22, 0.03, 0.06
# Random starts of APGD use other noise streams than PGD's, so that running both on a
# point explores two starts.
_STREAM = 1000


def checkpoints(steps: int) -> list[int]:
    """The steps at which APGD may halve a step size: the first after ``0.22 * steps``,
    each next gap ``0.03 * steps`` shorter than the last, never below ``0.06 * steps``
    (the paper's ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` in whole steps, as
    its authors' code counts them)."""
    gap = max(int(_FIRST_CHECKPOINT * steps), 1)
    shrink, least = max(int(_SHRINK * steps), 1), max(int(_MIN_GAP * steps), 1)
    marks, mark = [], gap
    while mark <= steps:
        marks.append(mark)
        gap = max(gap - shrink, least)
        mark += gap
    return marks


def _score(
    objective: Objective, x_adv: Tensor, rows: Tensor, restart: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The objective and success at ``x_adv`` (with a graph when grad mode is on)."""
    with search_autocast(x_adv.device):
        score, success = objective(x_adv, rows, restart)
    if success is None:
        success = torch.zeros_like(score, dtype=torch.bool)
    return score.to(dtype), success


def _score_and_grad(
    objective: Objective, x_adv: Tensor, rows: Tensor, restart: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        score, success = _score(objective, x_adv, rows, restart, dtype)
    (grad,) = torch.autograd.grad(score.sum(), x_adv)
    return score.detach(), success, grad


def maximize_apgd(
    objective: Objective,
    x: Tensor,
    threat: ThreatModel,
    settings: AscentSettings,
    noise: SampleNoise,
    *,
    rerun_successful: bool,
    start: Tensor | None = None,
) -> AscentResult:
    """Best iterate per row of ``x`` over ``settings.restarts`` APGD runs of
    ``settings.steps`` steps (``settings.step_size`` is not used: the step adapts).
    Arguments as for :func:`~.engine.maximize`."""
    marks = set(checkpoints(settings.steps))
    shape = (-1,) + (1,) * (x.dim() - 1)

    def apgd(x0: Tensor, x_k: Tensor, rows: Tensor, restart: int, best: Best) -> None:
        score_k, success_k, grad_k = _score_and_grad(objective, x_k, rows, restart, x.dtype)
        best.offer(rows, x_k, score_k, success_k)
        # This run's best point (where a halving resumes) and its gradient.
        run_x, run_score, run_success, run_grad = x_k, score_k, success_k, grad_k
        eta = torch.full((len(rows),), 2.0 * threat.eps, device=x.device, dtype=x.dtype)
        x_prev = x_k
        raised = torch.zeros(len(rows), device=x.device)
        halved_last = torch.zeros(len(rows), dtype=torch.bool, device=x.device)
        best_at_mark, last_mark = run_score.clone(), 0
        for k in range(settings.steps):
            z = threat.project(x0, x_k + eta.view(shape) * threat.ascent_direction(grad_k))
            if k > 0:
                z = threat.project(
                    x0, x_k + _MOMENTUM * (z - x_k) + (1 - _MOMENTUM) * (x_k - x_prev)
                )
            if k == settings.steps - 1:
                # Nothing steps from the last iterate: it needs no gradient.
                with torch.no_grad():
                    best.offer(rows, z, *_score(objective, z, rows, restart, x.dtype))
                break
            score, success, grad = _score_and_grad(objective, z, rows, restart, x.dtype)
            best.offer(rows, z, score, success)
            raised += (score > score_k).float()
            wins = better(score, success, run_score, run_success)
            run_x = torch.where(wins.view(shape), z, run_x)
            run_grad = torch.where(wins.view(shape), grad, run_grad)
            run_score = torch.where(wins, score, run_score)
            run_success = torch.where(wins, success, run_success)
            x_prev, x_k, score_k, grad_k = x_k, z, score, grad
            if k + 1 in marks:
                stalled = raised < _RHO * (k + 1 - last_mark)
                unchanged = ~halved_last & (run_score <= best_at_mark)
                halve = stalled | unchanged
                eta = torch.where(halve, eta / 2, eta)
                # A halving restarts from the best point, without momentum.
                x_k = torch.where(halve.view(shape), run_x, x_k)
                x_prev = torch.where(halve.view(shape), run_x, x_prev)
                grad_k = torch.where(halve.view(shape), run_grad, grad_k)
                score_k = torch.where(halve, run_score, score_k)
                halved_last, best_at_mark, last_mark = halve, run_score.clone(), k + 1
                raised.zero_()

    return over_restarts(
        apgd,
        x,
        threat,
        settings,
        noise,
        rerun_successful=rerun_successful,
        start=start,
        stream=_STREAM,
    )
