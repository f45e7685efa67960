"""PGD on a classifier: cross-entropy or margin loss, per-sample best iterate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_labels
from ..runtime import eval_mode, model_device
from ..threat import ThreatModel
from .common import batches, check_attack_args, seeded_generator
from .engine import maximize


class ClassifierLoss(StrEnum):
    CE = "ce"
    MARGIN = "margin"


def _cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """``max_{j != y} z_j - z_y`` (Carlini-Wagner): positive exactly when ``y`` is not predicted."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -torch.inf)
    return others.amax(dim=1) - true


_LOSSES: dict[ClassifierLoss, Callable[[Tensor, Tensor], Tensor]] = {
    ClassifierLoss.CE: _cross_entropy,
    ClassifierLoss.MARGIN: _margin,
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
) -> ClassifierAttackResult:
    """Untargeted PGD with random starts; restarts only re-attack points still robust."""
    model, x, threat, settings = check_attack_args(
        model, x, threat, steps=steps, restarts=restarts, batch_size=batch_size, step_size=step_size
    )
    y = check_labels(y, x.shape[0], "y")
    try:
        loss_fn = _LOSSES[ClassifierLoss(loss)]
    except ValueError as err:
        valid = ", ".join(repr(v.value) for v in ClassifierLoss)
        raise ValueError(f"unknown loss {loss!r}: expected one of {valid}") from err
    device = model_device(model, x.device)
    generator = seeded_generator(seed, device)
    x_adv_parts, logit_parts, adv_logit_parts = [], [], []
    with eval_mode(model, purpose="the classifier attack"):
        for part in batches(x.shape[0], batch_size, progress=progress, desc=f"PGD {threat}"):
            xb, yb = x[part].to(device), y[part].to(device)

            def objective(x_adv: Tensor, rows: Tensor, yb: Tensor = yb) -> tuple[Tensor, Tensor]:
                logits = model(x_adv)
                return loss_fn(logits, yb[rows]), logits.detach().argmax(dim=1) != yb[rows]

            best = maximize(objective, xb, threat, settings, generator, rerun_successful=False)
            with torch.no_grad():
                logit_parts.append(model(xb).to(x.device))
                adv_logit_parts.append(model(best.x_adv).to(x.device))
            x_adv_parts.append(best.x_adv.to(x.device))
    x_adv = torch.cat(x_adv_parts)
    logits, logits_adv = torch.cat(logit_parts), torch.cat(adv_logit_parts)
    clean_correct = logits.argmax(dim=1) == y
    return ClassifierAttackResult(
        x_adv=x_adv,
        delta=x_adv - x,
        robust=clean_correct & (logits_adv.argmax(dim=1) == y),
        clean_correct=clean_correct,
        logits=logits,
        logits_adv=logits_adv,
        threat=threat,
    )
