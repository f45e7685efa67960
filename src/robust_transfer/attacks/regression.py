"""PGD on a regression model: push each prediction as far from its target as the ball allows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.checks import check_tensor
from ..core.errors import InputError, InputTypeError
from ..theory.losses import RegressionLoss, regression_loss
from ..theory.threat import ThreatModel
from .common import ascend_in_batches, check_attack_args
from .engine import Objective


@dataclass(frozen=True)
class RegressionAttackResult:
    """``loss_adv[i]``: the loss at the returned point, a lower bound on the worst case."""

    x_adv: Tensor
    delta: Tensor
    loss: Tensor
    loss_adv: Tensor
    predictions: Tensor
    predictions_adv: Tensor
    threat: ThreatModel


def _check_targets(targets: object, n: int) -> Tensor:
    targets = check_tensor(targets, "targets")
    if not targets.is_floating_point():
        raise InputTypeError(f"targets must be a floating point tensor, got {targets.dtype}")
    if targets.dim() not in (1, 2) or targets.shape[0] != n:
        raise InputError(f"targets must have shape ({n},) or ({n}, K), got {tuple(targets.shape)}")
    if not bool(torch.isfinite(targets).all()):
        raise InputError("targets contains NaN or infinite values")
    return targets


def attack_regression(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    threat: ThreatModel,
    *,
    loss: str | RegressionLoss = RegressionLoss.ABSOLUTE,
    steps: int = 50,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    step_size: float | None = None,
    progress: bool = False,
    sample_ids: Tensor | None = None,
) -> RegressionAttackResult:
    """Maximise the per-sample loss (mean over outputs) with the shared PGD engine.

    Even restarts push every output away from its target on the side of the clean
    residual, odd restarts on the other side: for an affine model under ``L2`` the first
    restart alone reaches the exact worst case ``|r| + eps ||w||``.
    """
    args = check_attack_args(
        model,
        x,
        threat,
        steps=steps,
        restarts=restarts,
        batch_size=batch_size,
        step_size=step_size,
        seed=seed,
        sample_ids=sample_ids,
    )
    targets = _check_targets(targets, args.x.shape[0])
    kind = RegressionLoss.parse(loss)
    net = args.model

    def make_objective(clean: Tensor, extras: tuple[Tensor, ...]) -> Objective:
        (tb,) = extras
        side = torch.where(clean.reshape(tb.shape) >= tb, 1.0, -1.0)

        def objective(x_adv: Tensor, rows: Tensor, restart: int) -> tuple[Tensor, None]:
            predictions = net(x_adv).reshape(tb[rows].shape)
            loss_value = regression_loss(predictions, tb[rows], kind)
            # The loss of a prediction near its target has two local maxima, one on
            # each side; a random start may climb the wrong one. Ascend instead along
            # the signed residual, away from the target on the clean point's side
            # (the other side on odd restarts), while ranking iterates by the loss.
            direction = side[rows] * (1.0 if restart % 2 == 0 else -1.0)
            surrogate = (direction * (predictions - tb[rows])).reshape(len(rows), -1).sum(1)
            return loss_value.detach() + surrogate - surrogate.detach(), None

        return objective

    best = ascend_in_batches(
        args,
        (targets,),
        make_objective,
        batch_size=batch_size,
        rerun_successful=True,
        progress=progress,
        desc=f"PGD {args.threat}",
        purpose="the regression attack",
    )
    predictions = best.outputs.reshape(targets.shape)
    predictions_adv = best.outputs_adv.reshape(targets.shape)
    return RegressionAttackResult(
        x_adv=best.x_adv,
        delta=best.x_adv - args.x,
        loss=regression_loss(predictions, targets, kind),
        loss_adv=regression_loss(predictions_adv, targets, kind),
        predictions=predictions,
        predictions_adv=predictions_adv,
        threat=args.threat,
    )
