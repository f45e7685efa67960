"""One evaluation unit of a study: per-sample arrays for an encoder, a head and a threat.

Everything here works on tensors and models and returns per-sample tensors named by
:mod:`robust_transfer.core.schema`; the study stores them, and every number of a record or
plot is an aggregation of them. The command line's single steps use the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import ClassifierAttackResult, attack_classifier, attack_representation
from ..attacks.reference import AutoAttackResult, attack_autoattack
from ..attacks.regression import attack_regression
from ..attacks.sanity import margin_score, sanity_arrays
from ..attacks.settings import AttackSettings
from ..certify import (
    DEFAULT_HEAD_CERTIFIER,
    HEAD_CERTIFIERS,
    Refusal,
    certify_all,
    margin_lower_bounds,
    split_certifiers,
)
from ..core.schema import Array, Arrays, certificate_key, methods_in, per_method
from ..theory.bounds import (
    absolute_error_bound,
    adversarial_cross_entropy_bound,
    normalized_margin,
    squared_error_bound,
)
from ..theory.losses import RegressionLoss, regression_loss
from ..theory.threat import ThreatModel
from .curves import robust_on_grid
from .expected import EncoderProfile


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
        method=settings.representation_method,
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
    """``certified_shift@METHOD`` for every certifier of ``methods`` (default: all run by
    default; head certifiers among them are left to the heads) that applies, and
    ``certified_shift``, the per-sample tightest; and the refusals' reasons."""
    certificates = certify_all(encoder, x, threat, split_certifiers(methods)[0])
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


def _autoattack(
    model: nn.Module,
    clean: ClassifierAttackResult,
    x: Tensor,
    y: Tensor,
    chosen: Tensor,
    settings: AttackSettings,
    seed: int,
) -> AutoAttackResult:
    """AutoAttack on the ``chosen`` rows; the others come back as their clean points
    (``clean`` gives their logits)."""
    x_adv, logits_adv = x.clone(), clean.logits.clone()
    square_only = torch.zeros_like(chosen)
    rows = chosen.nonzero().flatten()
    if len(rows):
        found = attack_autoattack(
            model, x[rows], y[rows], clean.threat, seed=seed, batch_size=settings.batch_size
        )
        x_adv[rows], logits_adv[rows] = found.attack.x_adv, found.attack.logits_adv
        square_only[rows] = found.square_only
    attack = ClassifierAttackResult.of(x, x_adv, y, clean.logits, logits_adv, clean.threat)
    return AutoAttackResult(attack, square_only)


def classification_estimates(
    encoder: nn.Module,
    head: nn.Linear,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    shift: Arrays,
    *,
    profile: EncoderProfile | None = None,
    head_certifier: str | None = DEFAULT_HEAD_CERTIFIER,
    curve_points: int | None = None,
) -> Arrays:
    """What is known of a classification head without attacking it: margins, Result 1
    and 2 (:func:`classification_theory`), the expected robust accuracy from the
    encoder's ``profile`` (with ``curve_points``, also at that many eps evenly from 0 to
    ``threat.eps``: the robustness curve), and, with a ``head_certifier`` (one of
    :data:`~robust_transfer.certify.HEAD_CERTIFIERS`) that reads the encoder,
    ``head_certified_robust``: this head's margins certified directly (``head-crown-full``
    is tighter and costs what the ``crown-full`` certifier does, per head), or the
    task-agnostic certificate where that is tighter."""
    head = head.to(x.device).eval()
    arrays = classification_theory(head, shift[Array.FEATURES], y, shift)
    if profile is not None:
        expected, directional = profile.assess(head, y, threat)
        arrays[Array.EXPECTED_ROBUST], arrays[Array.DIRECTIONAL_SHIFT] = expected, directional
        if curve_points:
            grid = torch.linspace(0.0, threat.eps, curve_points, dtype=torch.float64)
            found = robust_on_grid(profile, head, y, threat.norm, grid, expected)
            arrays[Array.CURVE_ROBUST] = found.robust
    if head_certifier is None:
        return arrays
    margins = margin_lower_bounds(encoder, head, x, threat, HEAD_CERTIFIERS[head_certifier])
    if not isinstance(margins, Refusal):
        # The union of two sound certificates: never looser than the task-agnostic one.
        head_certified = arrays[Array.CORRECT] & (margins > 0).all(dim=1)
        if Array.CERTIFIED_ROBUST in arrays:
            head_certified = head_certified | arrays[Array.CERTIFIED_ROBUST]
        arrays[Array.HEAD_CERTIFIED_ROBUST] = head_certified
    return arrays


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
    autoattack_rows: Tensor | None = None,
    head_certifier: str | None = DEFAULT_HEAD_CERTIFIER,
    curve_points: int | None = None,
) -> Arrays:
    """Per-sample outcome of a classification head: :func:`classification_estimates`,
    then the attacks.

    ``shift`` comes from :func:`measure_shift` (or the study's stored equivalent) for this
    very encoder. ``robust_pgd`` means no PGD attack (cross-entropy, then targeted
    margins) broke the point; ``robust_attacked`` adds the task-agnostic perturbation;
    ``adv_loss`` is the largest cross-entropy seen at any attacked point (and the clean one).
    AutoAttack runs on the ``autoattack_rows`` (a mask) that PGD left robust:
    ``robust_autoattack`` marks the subset's points neither PGD nor AutoAttack broke,
    ``square_only`` those only Square did. The sanity arrays
    (:func:`~robust_transfer.attacks.sanity.sanity_arrays`) come with it.
    """
    arrays = classification_estimates(
        encoder,
        head,
        x,
        y,
        threat,
        shift,
        profile=profile,
        head_certifier=head_certifier,
        curve_points=curve_points,
    )
    head = head.to(x.device).eval()
    model = nn.Sequential(encoder, head).eval()
    correct = arrays[Array.CORRECT]
    with torch.no_grad():
        logits_task_agnostic = head(shift[Array.FEATURES_ADV])
    ce, targeted = study_pgd(
        model, x, y, threat, settings, seed=seed, sample_ids=sample_ids, progress=progress
    )
    robust_pgd = ce.robust & targeted.robust
    robust_task_agnostic = correct & (logits_task_agnostic.argmax(dim=1) == y)
    logits_adv = [ce.logits_adv, targeted.logits_adv, logits_task_agnostic]
    robust_attacked = robust_task_agnostic & robust_pgd
    if autoattack_rows is not None:
        reference = _autoattack(model, ce, x, y, autoattack_rows & robust_pgd, settings, seed)
        logits_adv.append(reference.attack.logits_adv)
        robust_attacked = robust_attacked & reference.attack.robust
        arrays |= {
            Array.AUTOATTACKED: autoattack_rows,
            # PGD, then AutoAttack: what the reference leaves of PGD's robust points.
            Array.ROBUST_AUTOATTACK: autoattack_rows & robust_pgd & reference.attack.robust,
            Array.SQUARE_ONLY: reference.square_only,
        }
    losses = [F.cross_entropy(logits, y, reduction="none") for logits in logits_adv]
    return (
        arrays
        | sanity_arrays(model, x, margin_score(y), batch_size=settings.batch_size)
        | {
            Array.ADV_LOSS: torch.stack([arrays[Array.CLEAN_LOSS], *losses]).amax(dim=0),
            Array.ROBUST_PGD: robust_pgd,
            Array.ROBUST_TASK_AGNOSTIC: robust_task_agnostic,
            Array.ROBUST_ATTACKED: robust_attacked,
        }
    )


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

    def loss_score(outputs: Tensor, rows: Tensor) -> Tensor:
        per_target = regression_loss(outputs, targets[rows].to(outputs.device), loss)
        return per_target.reshape(len(outputs), -1).sum(dim=1)

    arrays: Arrays = sanity_arrays(model, x, loss_score, batch_size=settings.batch_size) | {
        Array.CLEAN_LOSS: attacked.loss,
        Array.ADV_LOSS: torch.stack([attacked.loss, attacked.loss_adv, task_agnostic]).amax(0),
        Array.SHIFT: shift[Array.SHIFT],
        Array.LOSS_BOUND: mean_bound(shift[Array.SHIFT]),
    }
    for shift_name, bound_name, _ in _certified_names(shift):
        arrays[shift_name] = shift[shift_name]
        arrays[bound_name] = mean_bound(shift[shift_name])
    return arrays
