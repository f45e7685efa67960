"""Adaptation protocols: put a head on a pretrained encoder, with or without moving it.

- ``linear-probe``: encoder frozen, logistic regression on cached features;
- ``certified-probe``: encoder frozen, the head minimises the bound (docs/theory.md) on the
  worst-case cross-entropy over a feature ball of radius ``r``;
- ``finetune``: everything trained, from a fresh head;
- ``lp-ft``: probe first, then fine-tune from the probe's head (Kumar et al., 2022);
- ``anchored-finetune``: fine-tuning plus ``lambda * ||f_theta(x) - f_0(x)||_2``
  (LwF-style feature anchoring);
- ``partial-finetune``: only the last ``trainable_stages`` stages and the head train;
- ``bitfit``: only the biases and the head train (Ben Zaken et al., 2022);
- ``lora``: low-rank adapters on every linear and convolution layer (through ``peft``),
  merged back into the layers after training.

Each is also a setting of how it trains: ``adversary`` ``"pgd"`` (PGD adversarial
training) or ``"trades"`` against ``threat``, with eps ramped from 0 over the first
``eps_warmup`` share of the steps; ``norm_stats`` ``"frozen"`` (the pretrained batch-norm
statistics throughout) or ``"twins"`` (the mean of the losses with the pretrained and
with the batch statistics, after TWINS, Liu et al., 2023). An adversarial linear probe is
``linear-probe`` with an adversary; RoLI (Hua et al., 2024) is ``lp-ft`` with one: the
adversarial probe initialises adversarial fine-tuning.

Probes return the very encoder they were given, untouched; fine-tuning returns a copy.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_features, check_two_classes
from ..core.errors import InputError, InputTypeError
from ..core.runtime import model_device
from ..data.dataset import ImageDataset
from ..models.features import extract_features
from .linear_probe import train_certified_probe, train_linear_probe
from .loop import BatchLoss, train_epochs
from .objectives import EpsSchedule, ModelLoss, adversarial_loss, trades_loss
from .protocols import PROBES, AdaptConfig, AdaptProtocol, Adversary, NormStats
from .wrappers import (
    Joined,
    KeepEval,
    Passes,
    batch_norms,
    merged_lora,
    no_grad_on,
    twins,
    with_lora,
)

# Training points a fine-tuned encoder's feature movement is measured on.
MOVEMENT_POINTS = 1000


@dataclass(frozen=True)
class Adapted:
    encoder: nn.Module
    head: nn.Linear
    metrics: dict[str, float]


def _stages(encoder: nn.Module) -> list[nn.Module]:
    stages = getattr(encoder, "stages", None)
    if callable(stages):
        found = list(stages())
    else:
        found = [child for child in encoder.children() if any(True for _ in child.parameters())]
    if not found:
        raise InputError("the encoder has no parameterised stages to fine-tune")
    return found


def _steps(data: ImageDataset, epochs: int, batch_size: int) -> int:
    return epochs * -(-len(data) // batch_size)


def _objective(config: AdaptConfig, steps: int) -> tuple[ModelLoss, EpsSchedule | None]:
    """The training loss of the config's adversary, and its eps schedule (None: clean)."""
    if not config.adversarial:
        return lambda model, x, y, generator: F.cross_entropy(model(x), y), None
    assert config.threat is not None  # AdaptConfig checks it
    schedule = EpsSchedule(config.threat, steps, config.eps_warmup)
    if config.adversary is Adversary.PGD:
        return adversarial_loss(schedule, config.attack_steps), schedule
    return trades_loss(schedule, config.attack_steps, config.trades_beta), schedule


def _train(
    model: nn.Module,
    parameters: list[nn.Parameter],
    data: ImageDataset,
    loss: BatchLoss,
    config: AdaptConfig,
    *,
    epochs: int,
    lr: float,
    desc: str,
    progress: bool,
) -> float:
    """The one training loop, with the config's batches and seed (no one-cycle schedule)."""
    return train_epochs(
        model,
        parameters,
        data,
        loss,
        epochs=epochs,
        batch_size=config.batch_size,
        lr=lr,
        seed=config.seed,
        device=model_device(model, torch.device("cpu")),
        one_cycle=False,
        desc=f"{desc} ({len(data)} points)",
        progress=progress,
    )


def _probe(
    encoder: nn.Module,
    features: Tensor,
    data: ImageDataset,
    config: AdaptConfig,
    progress: bool,
) -> nn.Linear:
    """The linear probe: L-BFGS on the clean features; with an adversary, then Adam
    through the frozen encoder against it (``probe_epochs`` at ``probe_lr``)."""
    head = train_linear_probe(
        features, data.y, num_classes=data.num_classes, weight_decay=config.weight_decay
    )
    if not config.adversarial:
        return head
    device = model_device(encoder, torch.device("cpu"))
    head = head.to(device).requires_grad_(True)
    model = KeepEval(Joined(encoder, head), [encoder])
    objective, _ = _objective(config, _steps(data, config.probe_epochs, config.batch_size))
    with no_grad_on(encoder):
        _train(
            model,
            list(head.parameters()),
            data,
            lambda x, y, generator: objective(model, x, y, generator),
            config,
            epochs=config.probe_epochs,
            lr=config.probe_lr,
            desc="adversarial probe",
            progress=progress,
        )
    return head.requires_grad_(False).eval()


def _trainable(adapted: nn.Module, config: AdaptConfig) -> list[nn.Parameter]:
    """The parameters the protocol moves, marked as such (the rest frozen)."""
    adapted.requires_grad_(False)
    protocol = config.protocol
    if protocol is AdaptProtocol.PARTIAL_FINETUNE:
        stages = _stages(adapted)
        if config.trainable_stages > len(stages):
            raise InputError(
                f"trainable_stages={config.trainable_stages} but the encoder has "
                f"{len(stages)} stages"
            )
        for stage in stages[-config.trainable_stages :]:
            stage.requires_grad_(True)
    elif protocol is AdaptProtocol.BITFIT:
        for name, parameter in adapted.named_parameters():
            parameter.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    else:
        adapted.requires_grad_(True)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    if not trainable:
        raise InputError(f"protocol {protocol.value!r} found nothing to train in the encoder")
    return trainable


def _fine_tune(
    encoder: nn.Module,
    head: nn.Linear,
    data: ImageDataset,
    config: AdaptConfig,
    *,
    anchor: nn.Module | None,
    progress: bool,
) -> tuple[nn.Module, float]:
    """Train ``encoder`` (a copy of the given one) and ``head`` by the protocol; the
    trained encoder (LoRA's merged back into plain layers) and the last batch's loss."""
    device = model_device(encoder, torch.device("cpu"))
    head = head.to(device).requires_grad_(True)
    norms = batch_norms(encoder)
    if config.norm_stats is not NormStats.ADAPTIVE and not norms:
        raise InputError(
            f"norm_stats {config.norm_stats.value!r} needs batch-norm layers with running "
            "statistics; the encoder has none"
        )
    if config.protocol is AdaptProtocol.LORA:
        trained = with_lora(encoder, config.lora_rank)
        trainable = [p for p in trained.parameters() if p.requires_grad]
    else:
        trained, trainable = encoder, _trainable(encoder, config)
    joined = Joined(trained, head)
    model: nn.Module = (
        KeepEval(joined, list(norms)) if config.norm_stats is NormStats.FROZEN else joined
    )
    objective, schedule = _objective(config, _steps(data, config.epochs, config.batch_size))
    if config.norm_stats is NormStats.TWINS:
        objective = twins(objective, norms, schedule)

    def moved(features: Tensor, x: Tensor) -> Tensor:
        assert anchor is not None
        with torch.no_grad():
            reference: Tensor = anchor(x).flatten(1)
        return (features - reference).pow(2).sum(dim=1).add(1e-12).sqrt().mean()

    def loss(x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        if anchor is not None and schedule is None and config.norm_stats is NormStats.ADAPTIVE:
            # Clean anchored fine-tuning: one forward gives the loss and the anchor term.
            features = trained(x).flatten(1)
            anchored: Tensor = F.cross_entropy(head(features), y)
            return anchored + config.anchor_weight * moved(features, x)
        value = objective(model, x, y, generator)
        if anchor is not None:
            value = value + config.anchor_weight * moved(trained(x).flatten(1), x)
        return value

    last = _train(
        model,
        [*trainable, *head.parameters()],
        data,
        loss,
        config,
        epochs=config.epochs,
        lr=config.lr,
        desc=config.protocol.value,
        progress=progress,
    )
    head.requires_grad_(False).eval()
    if config.protocol is AdaptProtocol.LORA:
        encoder = merged_lora(trained)
    return encoder.requires_grad_(False).eval(), last


def _feature_movement(before: nn.Module, after: nn.Module, x: Tensor) -> float:
    return float((extract_features(after, x) - extract_features(before, x)).norm(dim=1).mean())


def head_accuracy(
    encoder: nn.Module, head: nn.Linear, data: ImageDataset, features: Tensor | None = None
) -> float:
    """The clean accuracy of ``head`` on ``encoder``'s features of ``data``."""
    if features is None:
        features = extract_features(encoder, data.x)
    features = features.to(head.weight.device)
    with torch.no_grad():
        return float((head(features).argmax(dim=1).cpu() == data.y).float().mean())


def _given(features: Tensor | None) -> Tensor:
    assert features is not None  # every protocol that reads them has them
    return features


def adapt(
    encoder: nn.Module,
    data: ImageDataset,
    config: AdaptConfig,
    *,
    progress: bool = False,
    features: Tensor | None = None,
) -> Adapted:
    """Adapt ``encoder`` to the labelled ``data`` with ``config.protocol``. ``features``
    are ``encoder``'s features of ``data.x`` where already computed (a study computes
    them once per encoder and training set, and every probe on it reads them).

    ``metrics`` holds the training accuracy, the seconds it took and its cost in images
    through the encoder while training (``encoder_forwards``, ``encoder_backwards``:
    features given by the caller are not counted, the clean features a probe computes
    are); fine-tuning adds the last batch's loss and how far the features of the first
    1,000 training points moved. The head comes back on the encoder's device."""
    if not isinstance(encoder, nn.Module):
        raise InputTypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    if not isinstance(data, ImageDataset):
        raise InputTypeError(f"data must be an ImageDataset, got {type(data).__name__}")
    check_two_classes(data.y, f"the training labels of {data.name}")
    if features is not None:
        features = check_features(features)
        if len(features) != len(data):
            raise InputError(f"features has {len(features)} rows for {len(data)} training points")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    protocol = config.protocol
    adapted = encoder if protocol in PROBES else copy.deepcopy(encoder)
    device = model_device(encoder, torch.device("cpu"))
    # Plain fine-tuning's fresh head, made before the cost counter starts.
    fresh = None
    if protocol is AdaptProtocol.FINETUNE:
        width = extract_features(encoder, data.x[:1]).shape[1]
        fresh = nn.Linear(width, data.num_classes).to(device)
    # The cost is what training passes through the encoder, diagnostics after it aside.
    passes = Passes()
    passes.watch(encoder)
    if adapted is not encoder:
        passes.watch(adapted)
    try:
        # Every protocol but plain fine-tuning starts from a probe on the clean features.
        clean = features
        if clean is None and protocol is not AdaptProtocol.FINETUNE:
            clean = extract_features(encoder, data.x, progress=progress)
        metrics: dict[str, float] = {}
        if protocol is AdaptProtocol.CERTIFIED_PROBE:
            head = train_certified_probe(
                _given(clean),
                data.y,
                float(config.radius or 0.0),
                num_classes=data.num_classes,
                robust_weight=config.robust_weight,
                weight_decay=config.weight_decay,
            )
        elif fresh is not None:
            head = fresh
        else:
            head = _probe(encoder, _given(clean), data, config, progress)
        if adapted is not encoder:
            anchor = encoder if protocol is AdaptProtocol.ANCHORED_FINETUNE else None
            adapted, metrics["final_loss"] = _fine_tune(
                adapted, head, data, config, anchor=anchor, progress=progress
            )
    finally:
        passes.close()
    # Heads come back on the encoder's device, whichever protocol trained them.
    head = head.to(model_device(adapted, device))
    if adapted is not encoder:
        metrics["feature_movement"] = _feature_movement(encoder, adapted, data.x[:MOVEMENT_POINTS])
    train_features = clean if adapted is encoder else None
    metrics["train_acc"] = head_accuracy(adapted, head, data, train_features)
    metrics |= {
        "seconds": time.perf_counter() - start,
        "encoder_forwards": float(passes.forward),
        "encoder_backwards": float(passes.backward),
    }
    return Adapted(adapted, head, metrics)
