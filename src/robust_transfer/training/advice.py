"""Which adaptation to try first, said before any fine-tuning from what the frozen
encoder shows: a linear head's robust accuracy is capped by the robustness of the
representation (docs/theory.md), so a cheap adversarial probe measures how much
robustness the features carry.

What the probe keeps is its accuracy above chance (the majority class's share), so a
head collapsed to a constant keeps nothing.

- The probe keeps most of its clean accuracy under attack (``RETAINED``): the
  representation carries the robustness; fine-tuning is predicted to destroy it (clean
  fine-tuning moves the features it lives in) or to add little, so the adversarial probe
  comes first.
- It keeps some (``HOLDS``): the features carry a robust head worth starting from;
  adversarial fine-tuning from it (RoLI) is predicted to add robustness.
- It keeps little: the frozen features cap every linear head low; only adversarial
  fine-tuning can build robustness, with eps ramped from 0 so the features survive the
  first steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..attacks import attack_classifier
from ..core.runtime import model_device
from ..data.dataset import ImageDataset
from ..theory.threat import ThreatModel
from .adapt import adapt
from .protocols import AdaptConfig, AdaptProtocol, Adversary, Recipe
from .wrappers import Joined

# Shares of the adversarial probe's clean accuracy it keeps under attack.
RETAINED = 0.8
HOLDS = 0.5


@dataclass(frozen=True)
class Advice:
    """What the frozen encoder showed on held-out training points, and the advice."""

    probe_clean: float  # the clean linear probe's clean accuracy
    probe_robust: float  # ... and attacked robust accuracy
    adversarial_clean: float  # the cheap adversarial probe's clean accuracy
    reach: float  # ... and attacked robust accuracy: what a linear head reaches
    finetuning: str  # "destroys" or "adds": fine-tuning's predicted effect on robustness
    first: Recipe
    reason: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"first": self.first.value}


def advise(
    probe_clean: float,
    probe_robust: float,
    adversarial_clean: float,
    reach: float,
    chance: float = 0.0,
) -> Advice:
    """The advice from the four measured accuracies (fractions) and ``chance``, the
    accuracy of always answering the majority class: what a head keeps is counted above
    it, so a head that collapsed to a constant (as robust as it is accurate) keeps
    nothing."""
    above = adversarial_clean - chance
    kept = max(0.0, reach - chance) / above if above > 0 else 0.0
    share = (
        f"a linear head keeps {kept:.0%} of its accuracy above chance under attack "
        f"({reach:.3f}, chance {chance:.3f})"
    )
    if kept >= RETAINED:
        first, finetuning = Recipe.ADVERSARIAL_PROBE, "destroys"
        reason = f"{share}: the representation carries the robustness, fine-tuning moves it"
    elif kept >= HOLDS:
        first, finetuning = Recipe.ROLI, "adds"
        reason = f"{share}: a robust head worth starting adversarial fine-tuning from"
    else:
        first, finetuning = Recipe.ADVERSARIAL_FINETUNE, "adds"
        reason = f"{share}: the frozen features cap it, fine-tuning must build robustness"
    return Advice(probe_clean, probe_robust, adversarial_clean, reach, finetuning, first, reason)


# Points per attack batch: what the advice's memory follows on a large encoder.
_BATCH = 128
# The PGD steps of the advice's one-epoch adversarial probe.
ADVICE_PROBE_STEPS = 5


def _accuracies(
    encoder: nn.Module, head: nn.Linear, x: Tensor, y: Tensor, threat: ThreatModel, steps: int
) -> tuple[float, float]:
    training = encoder.training
    model = Joined(encoder, head).eval()
    try:
        result = attack_classifier(model, x, y, threat, steps=steps, seed=1, batch_size=_BATCH)
    finally:
        encoder.train(training)
    return result.clean_accuracy, result.robust_accuracy


def measure_advice(
    encoder: nn.Module,
    train: ImageDataset,
    threat: ThreatModel,
    *,
    points: int = 100,
    attack_steps: int = 10,
    seed: int = 0,
    features: Tensor | None = None,
) -> Advice:
    """Hold out ``points`` training points (drawn with ``seed``), fit a clean and a
    one-epoch PGD-trained linear probe on the rest, attack both on the held-out points,
    and advise. Reads the training data only; the encoder is left as it was."""
    held = min(points, len(train) // 2)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    fit = train.subset(order[held:])
    x, y = train.x[order[:held]], train.y[order[:held]]
    fit_features = None if features is None else features[order[held:]]
    clean = adapt(encoder, fit, AdaptConfig(AdaptProtocol.LINEAR_PROBE), features=fit_features)
    adversarial = adapt(
        encoder,
        fit,
        AdaptConfig(
            AdaptProtocol.LINEAR_PROBE,
            adversary=Adversary.PGD,
            threat=threat,
            attack_steps=ADVICE_PROBE_STEPS,
            probe_epochs=1,
            seed=seed,
        ),
        features=fit_features,
    )
    device = model_device(encoder, torch.device("cpu"))
    x, y = x.to(device), y.to(device)
    probe = _accuracies(encoder, clean.head.to(device), x, y, threat, attack_steps)
    robust = _accuracies(encoder, adversarial.head.to(device), x, y, threat, attack_steps)
    chance = float(torch.bincount(y.cpu()).max()) / len(y)
    return advise(*probe, *robust, chance=chance)
