"""One evaluation unit of a study: per-sample arrays for an encoder, a head and a threat.

Everything here works on tensors and models and returns per-sample tensors; the study
stores them, and every number of a record or plot is an aggregation of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import attack_classifier, attack_representation
from ..attacks.reference import attack_autoattack
from ..attacks.regression import attack_regression
from ..attacks.settings import AttackSettings
from ..bounds import (
    absolute_error_bound,
    adversarial_cross_entropy_bound,
    normalized_margin,
    squared_error_bound,
)
from ..certificates import certified_shift
from ..losses import RegressionLoss, regression_loss
from ..threat import ThreatModel

Arrays = dict[str, Tensor]


def measure_shift(
    encoder: nn.Module,
    x: Tensor,
    threat: ThreatModel,
    settings: AttackSettings,
    *,
    seed: int,
    progress: bool = False,
) -> Arrays:
    """Task-independent arrays: ``shift`` (attacked, a lower bound), ``features``,
    ``features_adv`` (the task-agnostic perturbation's representation) and, where the
    encoder proves one, ``certified_shift`` (an upper bound)."""
    result = attack_representation(
        encoder,
        x,
        threat,
        steps=settings.representation_steps,
        restarts=settings.representation_restarts,
        seed=seed,
        batch_size=settings.batch_size,
        progress=progress,
    )
    arrays = {
        "shift": result.shift,
        "features": result.features,
        "features_adv": result.features_adv,
    }
    certified = certified_shift(encoder, threat, x)
    if certified is not None:
        arrays["certified_shift"] = certified
    return arrays


def _ce(head: nn.Linear, features: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return F.cross_entropy(head(features), y, reduction="none")


def evaluate_classification(
    encoder: nn.Module,
    head: nn.Linear,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    shift: Arrays,
    settings: AttackSettings,
    *,
    seed: int,
    progress: bool = False,
) -> Arrays:
    """Per-sample outcome of a classification head, the attacks and Result 1 and 2.

    ``shift`` comes from :func:`measure_shift` for this very encoder. ``robust_pgd``
    means no PGD attack (cross-entropy, then targeted margins) broke the point;
    ``robust_attacked`` adds the task-agnostic perturbation; ``adv_loss`` is the
    largest cross-entropy seen at any attacked point (and the clean one).
    """
    head = head.to(x.device).eval()
    model = nn.Sequential(encoder, head).eval()
    features, features_adv = shift["features"], shift["features_adv"]
    with torch.no_grad():
        logits = head(features)
        logits_task_agnostic = head(features_adv)
    correct = logits.argmax(dim=1) == y
    ce, targeted = (
        attack_classifier(
            model,
            x,
            y,
            threat,
            loss=loss,
            steps=settings.steps,
            restarts=restarts,
            seed=seed,
            batch_size=settings.batch_size,
            progress=progress,
        )
        for loss, restarts in (("ce", settings.restarts), ("targeted", settings.targeted_restarts))
    )
    attacks = [ce, targeted]
    if settings.autoattack:
        attacks.append(
            attack_autoattack(model, x, y, threat, seed=seed, batch_size=settings.batch_size)
        )
    losses = [
        F.cross_entropy(logits, y, reduction="none"),
        *(F.cross_entropy(attack.logits_adv, y, reduction="none") for attack in attacks),
        _ce(head, features_adv, y),
    ]
    robust_task_agnostic = correct & (logits_task_agnostic.argmax(dim=1) == y)
    robust_pgd = ce.robust & targeted.robust
    robust_attacked = robust_task_agnostic
    for attack in attacks:
        robust_attacked = robust_attacked & attack.robust
    margin = normalized_margin(head, features)
    arrays = {
        "label": y,
        "prediction": logits.argmax(dim=1),
        "correct": correct,
        "clean_loss": losses[0],
        "adv_loss": torch.stack(losses).amax(dim=0),
        "margin": margin,
        "shift": shift["shift"],
        "loss_bound": adversarial_cross_entropy_bound(head, features, y, shift["shift"]),
        "robust_pgd": robust_pgd,
        "robust_task_agnostic": robust_task_agnostic,
        "robust_attacked": robust_attacked,
        "predicted_robust": correct & (margin > shift["shift"]),
    }
    if settings.autoattack:
        arrays["robust_autoattack"] = attacks[-1].robust
    if "certified_shift" in shift:
        certified = shift["certified_shift"]
        arrays["certified_shift"] = certified
        arrays["certified_loss_bound"] = adversarial_cross_entropy_bound(
            head, features, y, certified
        )
        arrays["certified_robust"] = correct & (margin > certified)
    return arrays


_REGRESSION_BOUNDS = {
    RegressionLoss.ABSOLUTE: absolute_error_bound,
    RegressionLoss.SQUARED: squared_error_bound,
}


def evaluate_regression(
    encoder: nn.Module,
    head: nn.Linear,
    x: Tensor,
    targets: Tensor,
    loss: RegressionLoss,
    threat: ThreatModel,
    shift: Arrays,
    settings: AttackSettings,
    *,
    seed: int,
    progress: bool = False,
) -> Arrays:
    """Per-sample losses (mean over the targets) of a regression head and their bounds."""
    head = head.to(x.device).eval()
    model = nn.Sequential(encoder, head).eval()
    features, features_adv = shift["features"], shift["features_adv"]
    attacked = attack_regression(
        model,
        x,
        targets,
        threat,
        loss=loss,
        steps=settings.steps,
        restarts=settings.restarts,
        seed=seed,
        batch_size=settings.batch_size,
        progress=progress,
    )
    with torch.no_grad():
        task_agnostic = regression_loss(head(features_adv), targets, loss)
    bound = _REGRESSION_BOUNDS[loss]
    arrays = {
        "clean_loss": attacked.loss,
        "adv_loss": torch.stack([attacked.loss, attacked.loss_adv, task_agnostic]).amax(dim=0),
        "shift": shift["shift"],
        "loss_bound": bound(head, features, targets, shift["shift"]).reshape(len(x), -1).mean(1),
    }
    if "certified_shift" in shift:
        certified = shift["certified_shift"]
        arrays["certified_shift"] = certified
        arrays["certified_loss_bound"] = (
            bound(head, features, targets, certified).reshape(len(x), -1).mean(1)
        )
    return arrays
