"""PGD on a classifier: cross-entropy or margin loss, per-sample best iterate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_labels, parse_choice
from ..core.errors import InputError
from ..theory.threat import ThreatModel
from .common import ascend_in_batches, check_attack_args
from .engine import Objective


class ClassifierLoss(StrEnum):
    CE = "ce"
    MARGIN = "margin"
    TARGETED = "targeted"


def _cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``max_{j != y} z_j - z_y`` (Carlini-Wagner): positive exactly when ``y`` is not predicted."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -torch.inf)
    return others.amax(dim=1) - true


def _targeted_margin(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """``z_t - z_y`` for a target class ``t``: positive when ``t`` beats the true class."""
    return (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).squeeze(1)


def _runner_up_targets(logits: Tensor, y: Tensor, restart: int) -> Tensor:
    """The class ranked ``restart + 1``-th among the wrong classes by clean logit, cycling.

    The untargeted losses climb towards whichever wrong class leads now, which on a
    piecewise-linear model can be a local maximum while another class is closer; one
    target per restart (as APGD-T does) reaches each of them in turn.
    """
    others = logits.scatter(1, y[:, None], -torch.inf)
    order = others.argsort(dim=1, descending=True)
    wrong_classes = logits.shape[1] - 1
    return order[:, restart % max(wrong_classes, 1)]


_LOSSES: dict[ClassifierLoss, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    ClassifierLoss.CE: lambda logits, y, _target: _cross_entropy(logits, y),
    ClassifierLoss.MARGIN: lambda logits, y, _target: margin_loss(logits, y),
    ClassifierLoss.TARGETED: _targeted_margin,
}


@dataclass(frozen=True)
class ClassifierAttackResult:
    """``robust[i]``: clean input classified correctly and no iterate misclassified.

    ``x_adv`` holds a misclassified point where one was found, otherwise the
    highest-loss iterate.
    """

    x_adv: Tensor
    delta: Tensor
    robust: Tensor
    clean_correct: Tensor
    logits: Tensor
    logits_adv: Tensor
    threat: ThreatModel

    @classmethod
    def of(
        cls,
        x: Tensor,
        x_adv: Tensor,
        y: Tensor,
        logits: Tensor,
        logits_adv: Tensor,
        threat: ThreatModel,
    ) -> ClassifierAttackResult:
        """The result for clean and attacked inputs and the model's logits on both."""
        clean_correct = logits.argmax(dim=1) == y
        return cls(
            x_adv=x_adv,
            delta=x_adv - x,
            robust=clean_correct & (logits_adv.argmax(dim=1) == y),
            clean_correct=clean_correct,
            logits=logits,
            logits_adv=logits_adv,
            threat=threat,
        )

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean())

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean())


def attack_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 50,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    loss: str | ClassifierLoss = ClassifierLoss.CE,
    step_size: float | None = None,
    progress: bool = False,
    sample_ids: Tensor | None = None,
    starts: Tensor | None = None,
    stop_at_success: bool = False,
    step_scale: float = 1.0,
) -> ClassifierAttackResult:
    """PGD with random starts (or, for the first restart, ``starts``: points of the
    threat set, e.g. a first-order worst case); restarts only re-attack points still robust.

    ``loss`` is cross-entropy (``"ce"``), the Carlini-Wagner margin (``"margin"``) or the
    targeted margin ``z_t - z_y`` (``"targeted"``) whose target ``t`` is, at restart ``r``,
    the wrong class with the ``r+1``-th highest clean logit: give it as many restarts as
    there are wrong classes worth trying. With ``stop_at_success`` a point stops at its
    first misclassified iterate (``robust`` is the same answer, for less work; ``x_adv``
    is then that first success). ``step_scale`` below 1 shrinks the annealed step (from
    ``2 * step_scale * eps``) for a search that refines a good start rather than explores.
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
        stop_at_success=stop_at_success,
        step_scale=step_scale,
    )
    y = check_labels(y, args.x.shape[0], "y")
    if starts is not None and (not isinstance(starts, Tensor) or starts.shape != args.x.shape):
        raise InputError(f"starts must be a tensor shaped like x {tuple(args.x.shape)}")
    loss_fn = _LOSSES[parse_choice(ClassifierLoss, loss, "loss")]
    net = args.model

    def make_objective(clean_logits: Tensor, extras: tuple[Tensor, ...]) -> Objective:
        (yb,) = extras

        def objective(x_adv: Tensor, rows: Tensor, restart: int) -> tuple[Tensor, Tensor]:
            logits = net(x_adv)
            target = _runner_up_targets(clean_logits[rows], yb[rows], restart)
            misclassified = logits.detach().argmax(dim=1) != yb[rows]
            return loss_fn(logits, yb[rows], target), misclassified

        return objective

    best = ascend_in_batches(
        args,
        (y,),
        make_objective,
        batch_size=batch_size,
        rerun_successful=False,
        progress=progress,
        desc=f"PGD {args.threat}",
        purpose="the classifier attack",
        starts=starts,
    )
    return ClassifierAttackResult.of(
        args.x, best.x_adv, y, best.outputs, best.outputs_adv, args.threat
    )
