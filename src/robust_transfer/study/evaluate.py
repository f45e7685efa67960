"""One evaluation unit of a study: per-sample arrays for an encoder, a head and a threat.

Everything here works on tensors and models and returns per-sample tensors named by
:mod:`robust_transfer.schema`; the study stores them, and every number of a record or
plot is an aggregation of them. The command line's single steps use the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import ClassifierAttackResult, attack_classifier, attack_representation
from ..attacks.reference import attack_autoattack
from ..attacks.regression import attack_regression
from ..attacks.settings import AttackSettings
from ..bounds import (
    absolute_error_bound,
    adversarial_cross_entropy_bound,
    normalized_margin,
    squared_error_bound,
)
from ..certify import Refusal, certify_all, margin_lower_bounds
from ..expected import EncoderProfile
from ..losses import RegressionLoss, regression_loss
from ..schema import Array, Arrays, certificate_key, methods_in, per_method
from ..threat import ThreatModel


def attacked_shift(
    encoder: nn.Module,
    x: Tensor,
    threat: ThreatModel,
    settings: AttackSettings,
    *,
    seed: int,
    sample_ids: Tensor | None = None,
    progress: bool = False,
) -> Arrays:
    """The representation attack's arrays: ``shift`` (a lower bound on the worst shift),
    ``features`` and ``features_adv`` (the task-agnostic perturbation's representation)."""
    result = attack_representation(
        encoder,
        x,
        threat,
        steps=settings.representation_steps,
        restarts=settings.representation_restarts,
        seed=seed,
        batch_size=settings.batch_size,
        progress=progress,
        sample_ids=sample_ids,
    )
    return {
        Array.SHIFT: result.shift,
        Array.FEATURES: result.features,
        Array.FEATURES_ADV: result.features_adv,
    }


def certified_shifts(
    encoder: nn.Module, x: Tensor, threat: ThreatModel, methods: Sequence[str] | None = None
) -> tuple[Arrays, dict[str, str]]:
    """``certified_shift@METHOD`` for every certifier of ``methods`` (default: all) that
    applies, and ``certified_shift``, the per-sample tightest; and the refusals' reasons."""
    certificates = certify_all(encoder, x, threat, methods)
    arrays = {
        per_method(Array.CERTIFIED_SHIFT, method): bound.float()
        for method, bound in certificates.bounds.items()
    }
    tightest = certificates.tightest()
    if tightest is not None:
        arrays[Array.CERTIFIED_SHIFT] = tightest.float()
    return arrays, dict(certificates.refused)


def measure_shift(
    encoder: nn.Module,
    x: Tensor,
    threat: ThreatModel,
    settings: AttackSettings,
    *,
    seed: int,
    certifiers: Sequence[str] | None = None,
    progress: bool = False,
) -> Arrays:
    """Task-independent arrays: :func:`attacked_shift` and :func:`certified_shifts`."""
    arrays = attacked_shift(encoder, x, threat, settings, seed=seed, progress=progress)
    return arrays | certified_shifts(encoder, x, threat, certifiers)[0]


def _certified_names(shift: Mapping[str, Tensor]) -> list[tuple[str, str, str]]:
    """(certified shift, loss bound, robust) array names of the tightest certificate, if
    there is one, and of each method present."""
    tightest: list[str | None] = [None] if Array.CERTIFIED_SHIFT in shift else []
    methods = [*tightest, *methods_in(shift, Array.CERTIFIED_SHIFT)]
    return [
        (
            certificate_key(Array.CERTIFIED_SHIFT, method),
            certificate_key(Array.CERTIFIED_LOSS_BOUND, method),
            certificate_key(Array.CERTIFIED_ROBUST, method),
        )
        for method in methods
    ]


def classification_theory(
    head: nn.Linear, features: Tensor, y: Tensor, shift: Mapping[str, Tensor]
) -> Arrays:
    """What theory says without attacking the head: margins, Result 1 and the criterion
    with the attacked shift (estimates) and with each certified shift (guarantees)."""
    with torch.no_grad():
        logits = head(features)
    correct = logits.argmax(dim=1) == y
    margin = normalized_margin(head, features)
    attacked = shift[Array.SHIFT]
    arrays: Arrays = {
        Array.LABEL: y,
        Array.PREDICTION: logits.argmax(dim=1),
        Array.CORRECT: correct,
        Array.CLEAN_LOSS: F.cross_entropy(logits, y, reduction="none"),
        Array.MARGIN: margin,
        Array.SHIFT: attacked,
        Array.LOSS_BOUND: adversarial_cross_entropy_bound(head, features, y, attacked),
        Array.PREDICTED_ROBUST: correct & (margin > attacked),
    }
    for shift_name, bound_name, robust_name in _certified_names(shift):
        certified = shift[shift_name]
        arrays[shift_name] = certified
        arrays[bound_name] = adversarial_cross_entropy_bound(head, features, y, certified)
        arrays[robust_name] = correct & (margin > certified)
    return arrays


def study_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    settings: AttackSettings,
    *,
    seed: int,
    sample_ids: Tensor | None = None,
    progress: bool = False,
) -> tuple[ClassifierAttackResult, ClassifierAttackResult]:
    """The study's PGD on one classifier: cross-entropy, then targeted margins (one
    runner-up class per restart)."""
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
            sample_ids=sample_ids,
        )
        for loss, restarts in (("ce", settings.restarts), ("targeted", settings.targeted_restarts))
    )
    return ce, targeted


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
    sample_ids: Tensor | None = None,
    progress: bool = False,
    profile: EncoderProfile | None = None,
) -> Arrays:
    """Per-sample outcome of a classification head, the attacks and Result 1 and 2.

    ``shift`` comes from :func:`measure_shift` (or the study's stored equivalent) for this
    very encoder. ``robust_pgd`` means no PGD attack (cross-entropy, then targeted
    margins) broke the point; ``robust_attacked`` adds the task-agnostic perturbation;
    ``adv_loss`` is the largest cross-entropy seen at any attacked point (and the clean one).
    ``head_certified_robust`` (where CROWN reads the encoder) certifies this head's
    margins directly, or takes the task-agnostic certificate where that is tighter.
    """
    head = head.to(x.device).eval()
    model = nn.Sequential(encoder, head).eval()
    arrays = classification_theory(head, shift[Array.FEATURES], y, shift)
    if profile is not None:
        expected, directional = profile.assess(head, y, threat)
        arrays[Array.EXPECTED_ROBUST], arrays[Array.DIRECTIONAL_SHIFT] = expected, directional
    correct = arrays[Array.CORRECT]
    with torch.no_grad():
        logits_task_agnostic = head(shift[Array.FEATURES_ADV])
    ce, targeted = study_pgd(
        model, x, y, threat, settings, seed=seed, sample_ids=sample_ids, progress=progress
    )
    attacks = [ce, targeted]
    if settings.autoattack:
        attacks.append(
            attack_autoattack(model, x, y, threat, seed=seed, batch_size=settings.batch_size)
        )
    losses = [
        arrays[Array.CLEAN_LOSS],
        *(F.cross_entropy(attack.logits_adv, y, reduction="none") for attack in attacks),
        F.cross_entropy(logits_task_agnostic, y, reduction="none"),
    ]
    robust_task_agnostic = correct & (logits_task_agnostic.argmax(dim=1) == y)
    robust_attacked = robust_task_agnostic
    for attack in attacks:
        robust_attacked = robust_attacked & attack.robust
    arrays |= {
        Array.ADV_LOSS: torch.stack(losses).amax(dim=0),
        Array.ROBUST_PGD: ce.robust & targeted.robust,
        Array.ROBUST_TASK_AGNOSTIC: robust_task_agnostic,
        Array.ROBUST_ATTACKED: robust_attacked,
    }
    if settings.autoattack:
        arrays[Array.ROBUST_AUTOATTACK] = attacks[-1].robust
    margins = margin_lower_bounds(encoder, head, x, threat)
    if not isinstance(margins, Refusal):
        # The union of two sound certificates: never looser than the task-agnostic one.
        head_certified = correct & (margins > 0).all(dim=1)
        if Array.CERTIFIED_ROBUST in arrays:
            head_certified = head_certified | arrays[Array.CERTIFIED_ROBUST]
        arrays[Array.HEAD_CERTIFIED_ROBUST] = head_certified
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
    sample_ids: Tensor | None = None,
    progress: bool = False,
) -> Arrays:
    """Per-sample losses (mean over the targets) of a regression head and their bounds."""
    head = head.to(x.device).eval()
    model = nn.Sequential(encoder, head).eval()
    features = shift[Array.FEATURES]
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
        sample_ids=sample_ids,
    )
    with torch.no_grad():
        task_agnostic = regression_loss(head(shift[Array.FEATURES_ADV]), targets, loss)
    bound = _REGRESSION_BOUNDS[loss]

    def mean_bound(radius: Tensor) -> Tensor:
        return bound(head, features, targets, radius).reshape(len(x), -1).mean(1)

    arrays: Arrays = {
        Array.CLEAN_LOSS: attacked.loss,
        Array.ADV_LOSS: torch.stack([attacked.loss, attacked.loss_adv, task_agnostic]).amax(0),
        Array.SHIFT: shift[Array.SHIFT],
        Array.LOSS_BOUND: mean_bound(shift[Array.SHIFT]),
    }
    for shift_name, bound_name, _ in _certified_names(shift):
        arrays[shift_name] = shift[shift_name]
        arrays[bound_name] = mean_bound(shift[shift_name])
    return arrays
