"""AutoAttack (Croce & Hein, 2020) through its authors' package: the reference evaluation.

"standard" runs APGD-CE, APGD-T, FAB-T and Square (5000 queries) with fixed
hyper-parameters; robust accuracy from it is what robustness papers report. It is far
slower than PGD on a CPU, so studies run it only when asked.
"""

from __future__ import annotations

import logging

import torch
from pyautoattack import AutoAttack
from torch import Tensor, nn

from ..checks import check_labels
from ..errors import InputError
from ..runtime import eval_mode, model_device
from ..threat import ThreatModel
from .classifier import ClassifierAttackResult
from .common import check_attack_args

# DLR-targeted, the loss of APGD-T, compares the 1st, 3rd and 4th largest logits.
_MIN_CLASSES = 4


def attack_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 250,
) -> ClassifierAttackResult:
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
    if x.dim() != 4:
        raise InputError(
            f"AutoAttack's Square attack needs images (N, C, H, W), got {tuple(x.shape)}"
        )
    device = model_device(model, x.device)
    with eval_mode(model, purpose="AutoAttack"), torch.no_grad():
        logits = model(x.to(device)).to(x.device)
    classes = logits.shape[1]
    if classes < _MIN_CLASSES:
        raise InputError(f"AutoAttack's targeted attacks need at least 4 classes, got {classes}")
    adversary = AutoAttack(
        model, norm=threat.norm.value, eps=threat.eps, version=version, seed=seed, device=device
    )
    adversary.verbose = False
    adversary.logger.setLevel(logging.WARNING)
    # The package assumes ten classes; it may target only the classes that exist.
    adversary.apgd_targeted.n_target_classes = min(9, classes - 1)
    adversary.fab.n_target_classes = min(9, classes - 1)
    with eval_mode(model, purpose="AutoAttack"):
        found = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
        x_adv = threat.project(x, found[0].to(x.device))
        with torch.no_grad():
            logits_adv = model(x_adv.to(device)).to(x.device)
    return ClassifierAttackResult.of(x, x_adv, y, logits, logits_adv, threat)
