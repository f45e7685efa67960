"""AutoAttack (Croce & Hein, 2020) through its authors' package: the reference evaluation.

"standard" runs APGD-CE, APGD-T, FAB-T and Square (5000 queries) with fixed
hyper-parameters; robust accuracy from it is what robustness papers report. It is far
slower than PGD on a CPU, so studies run it on a subset. The white-box attacks and
Square run as two calls of the package (Square on what the others left robust, as
"standard" does), so that a point only the black-box attack broke is known: a sign of
gradient masking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from pyautoattack import AutoAttack
from torch import Tensor, nn

from ..core.checks import check_labels
from ..core.errors import InputError
from ..core.runtime import eval_mode, model_device
from ..theory.threat import Norm, ThreatModel
from .classifier import ClassifierAttackResult
from .common import check_attack_args

# DLR-targeted, the loss of APGD-T, compares the 1st, 3rd and 4th largest logits.
MIN_CLASSES = 4
_WHITE_BOX = ("apgd-ce", "apgd-t", "fab-t")
_BLACK_BOX = ("square",)


def refusal(image_shape: tuple[int, ...], classes: int, threat: ThreatModel) -> str | None:
    """Why AutoAttack cannot run on ``(C, H, W)`` images and ``classes`` classes, if so."""
    if len(image_shape) != 3:
        return f"AutoAttack's Square attack needs images (N, C, H, W), got (N, *{image_shape})"
    if classes < MIN_CLASSES:
        return f"AutoAttack's targeted attacks need at least {MIN_CLASSES} classes, got {classes}"
    _, height, width = image_shape
    if threat.norm is Norm.L2:
        # The package's L2 Square starts from a grid of (H // 5)-pixel squares that must
        # fit its margins; where they do not it fails with a shape error.
        side = height // 5
        start = (height - 5 * side) // 2
        if (
            side == 0
            or start + (height // side) * side > height
            or (start + (width // side) * side > width)
        ):
            return f"AutoAttack's L2 Square attack cannot start on {height}x{width} images"
    return None


@dataclass(frozen=True)
class AutoAttackResult:
    """``attack``: all four attacks together; ``square_only``: points the white-box
    attacks left robust and Square, the black-box one, broke."""

    attack: ClassifierAttackResult
    square_only: Tensor


def attack_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    seed: int = 0,
    batch_size: int = 250,
) -> AutoAttackResult:
    """AutoAttack's robust accuracy; every returned point is projected onto ``B(x)`` again
    (the package works in float arithmetic of its own) and re-classified here."""
    args = check_attack_args(
        model,
        x,
        threat,
        steps=1,
        restarts=1,
        batch_size=batch_size,
        step_size=None,
        seed=seed,
        sample_ids=None,
    )
    model, x, threat = args.model, args.x, args.threat
    y = check_labels(y, x.shape[0], "y")
    device = model_device(model, x.device)
    with eval_mode(model, purpose="AutoAttack"), torch.no_grad():
        logits = model(x.to(device)).to(x.device)
    classes = logits.shape[1]
    refused = refusal(tuple(x.shape[1:]), classes, threat)
    if refused is not None:
        raise InputError(refused)
    adversary = AutoAttack(
        model, norm=threat.norm.value, eps=threat.eps, version="standard", seed=seed, device=device
    )
    adversary.verbose = False
    adversary.logger.setLevel(logging.WARNING)
    # The package assumes ten classes; it may target only the classes that exist.
    adversary.apgd_targeted.n_target_classes = min(9, classes - 1)
    adversary.fab.n_target_classes = min(9, classes - 1)
    with eval_mode(model, purpose="AutoAttack"):
        white_box = _run(adversary, _WHITE_BOX, model, x, y, logits, threat, batch_size, device)
        left = white_box.robust.nonzero().flatten()
        x_adv, logits_adv = white_box.x_adv.clone(), white_box.logits_adv.clone()
        if len(left):
            black_box = _run(
                adversary,
                _BLACK_BOX,
                model,
                x[left],
                y[left],
                logits[left],
                threat,
                batch_size,
                device,
            )
            x_adv[left], logits_adv[left] = black_box.x_adv, black_box.logits_adv
    both = ClassifierAttackResult.of(x, x_adv, y, logits, logits_adv, threat)
    return AutoAttackResult(both, white_box.robust & ~both.robust)


def _run(
    adversary: AutoAttack,
    attacks: tuple[str, ...],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    logits: Tensor,
    threat: ThreatModel,
    batch_size: int,
    device: torch.device,
) -> ClassifierAttackResult:
    """``attacks`` of the package's "standard" settings, one after another on the points
    still robust."""
    adversary.attacks_to_run = list(attacks)
    found = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
    x_adv = threat.project(x, found[0].to(x.device))
    with torch.no_grad():
        logits_adv = model(x_adv.to(device)).to(x.device)
    return ClassifierAttackResult.of(x, x_adv, y, logits, logits_adv, threat)
