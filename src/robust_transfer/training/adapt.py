"""Adaptation protocols: put a head on a pretrained encoder, with or without moving it.

- ``linear-probe``: encoder frozen, logistic regression on cached features;
- ``certified-probe``: encoder frozen, the head minimises the bound (docs/theory.md) on the
  worst-case cross-entropy over a feature ball of radius ``r``;
- ``finetune``: everything trained, from a fresh head;
- ``lp-ft``: probe first, then fine-tune from the probe's head (Kumar et al., 2022);
- ``anchored-finetune``: fine-tuning plus ``lambda * ||f_theta(x) - f_0(x)||_2``
  (LwF-style feature anchoring);
- ``partial-finetune``: only the last ``trainable_stages`` stages and the head train.

Probes return the very encoder they were given, untouched; fine-tuning returns a copy.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import (
    EPOCHS,
    check_features,
    check_labels,
    check_number,
    check_per_sample,
    check_positive_int,
    check_seed,
    check_two_classes,
    parse_choice,
)
from ..core.errors import InputError, InputTypeError
from ..core.runtime import model_device
from ..data.dataset import ImageDataset
from ..models.features import extract_features
from ..theory.bounds import worst_case_cross_entropy
from ..theory.losses import RegressionLoss
from .linear_probe import train_linear_probe
from .loop import train_epochs


class AdaptProtocol(StrEnum):
    LINEAR_PROBE = "linear-probe"
    CERTIFIED_PROBE = "certified-probe"
    FINETUNE = "finetune"
    LP_FT = "lp-ft"
    ANCHORED_FINETUNE = "anchored-finetune"
    PARTIAL_FINETUNE = "partial-finetune"


@dataclass(frozen=True)
class AdaptConfig:
    """One adaptation. ``weight_decay`` is the probes' penalty on ``||W||_F^2``;
    ``anchor_weight`` is the lambda of feature-anchored fine-tuning; ``radius`` the
    certified probe's feature-space radius."""

    protocol: AdaptProtocol
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    weight_decay: float = 1e-4
    anchor_weight: float = 1.0
    trainable_stages: int = 1
    radius: float | None = None
    robust_weight: float = 0.5

    def __post_init__(self) -> None:
        protocol = parse_choice(AdaptProtocol, self.protocol, "protocol")
        object.__setattr__(self, "protocol", protocol)
        check_positive_int(self.epochs, "epochs", EPOCHS)
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.trainable_stages, "trainable_stages")
        check_seed(self.seed)
        check_number(self.lr, "lr")
        for name in ("weight_decay", "anchor_weight"):
            check_number(getattr(self, name), name, inclusive=True)
        if not check_number(self.robust_weight, "robust_weight") <= 1.0:
            raise InputError(f"robust_weight must lie in (0, 1], got {self.robust_weight!r}")
        if self.protocol is AdaptProtocol.CERTIFIED_PROBE:
            if self.radius is None:
                raise InputError("the certified probe needs a radius")
            check_number(self.radius, "radius", inclusive=True)

    def to_dict(self) -> dict[str, object]:
        values = dataclasses.asdict(self)
        values["protocol"] = self.protocol.value
        return values


@dataclass(frozen=True)
class Adapted:
    encoder: nn.Module
    head: nn.Linear
    metrics: dict[str, float]


def train_certified_probe(
    features: Tensor,
    labels: Tensor,
    radius: float | Tensor,
    *,
    num_classes: int | None = None,
    robust_weight: float = 0.5,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> nn.Linear:
    """Minimise ``mean[(1 - k) CE(z, y) + k CE(ztilde, y)] + weight_decay / 2 ||W||^2``
    with ``ztilde_j = z_j + r ||w_j - w_y||_2`` for ``j != y``, ``ztilde_y = z_y`` and
    ``k = robust_weight``.

    ``CE(ztilde, y)`` upper-bounds the cross-entropy at every representation within
    ``r`` of ``f(x)`` and is convex in ``(W, b)``, so the mixture is convex too. With
    ``k = 1`` it is the head that is best in the worst case; when ``r`` exceeds what the
    features can separate, that head is ``W = 0`` (a constant, trivially robust
    predictor), and the clean term (as in IBP training's mixed loss) keeps the head
    useful while the robust term widens its normalised margins. Full-batch L-BFGS from
    the plain probe's solution; deterministic.
    """
    features = check_features(features)
    n = features.shape[0]
    classes = num_classes if num_classes is not None else int(check_labels(labels, n).max()) + 1
    labels = check_labels(labels, n, num_classes=classes)
    radii = (
        torch.full((n,), float(radius), dtype=features.dtype, device=features.device)
        if not isinstance(radius, Tensor)
        else check_per_sample(radius, n, "radius").to(features)
    )
    if not bool((radii >= 0).all()) or not bool(torch.isfinite(radii).all()):
        raise InputError(f"radius must be finite and non-negative, got {radius!r}")
    if not 0.0 < robust_weight <= 1.0:
        raise InputError(f"robust_weight must lie in (0, 1], got {robust_weight!r}")
    head = train_linear_probe(
        features, labels, num_classes=classes, weight_decay=weight_decay, max_iter=max_iter
    )
    head.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = head(features)
        mixed = (1.0 - robust_weight) * F.cross_entropy(logits, labels) + (
            robust_weight * worst_case_cross_entropy(logits, head.weight, labels, radii)
        )
        loss = mixed + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    return head.requires_grad_(False)


def _ridge(design: Tensor, targets: Tensor, weight_decay: float, weights: Tensor) -> Tensor:
    """Weighted ridge regression; the last column (the bias) is not penalised."""
    penalty = torch.full((design.shape[1],), weight_decay * len(design), dtype=design.dtype)
    penalty[-1] = 0.0
    gram = design.T @ (weights[:, None] * design) + torch.diag(penalty)
    solution: Tensor = torch.linalg.solve(gram, design.T @ (weights * targets))
    return solution


# Iteratively reweighted least squares for absolute error converges in a few tens of steps
# on probe-sized problems; residuals below the floor count as that size, which keeps the
# weights finite.
_IRLS_STEPS = 50
_IRLS_FLOOR = 1e-4


def train_regression_probe(
    features: Tensor,
    targets: Tensor,
    loss: RegressionLoss | str,
    *,
    weight_decay: float = 1e-4,
) -> nn.Linear:
    """A linear head with one output per target column: closed-form ridge for squared
    error, iteratively reweighted least squares for absolute error. Deterministic."""
    features = check_features(features)
    kind = RegressionLoss.parse(loss)
    if not isinstance(targets, Tensor) or not targets.is_floating_point():
        raise InputTypeError("targets must be a floating point tensor")
    if targets.dim() == 1:
        targets = targets[:, None]
    if targets.dim() != 2 or targets.shape[0] != features.shape[0]:
        raise InputError(
            f"targets must have shape ({features.shape[0]}, K), got {tuple(targets.shape)}"
        )
    if weight_decay < 0:
        raise InputError(f"weight_decay must be non-negative, got {weight_decay}")
    design = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
    goal = targets.double()
    columns = []
    for k in range(goal.shape[1]):
        weights = torch.ones(len(design), dtype=torch.float64)
        solution = _ridge(design, goal[:, k], weight_decay, weights)
        if kind is RegressionLoss.ABSOLUTE:
            for _ in range(_IRLS_STEPS):
                residual = (design @ solution - goal[:, k]).abs().clamp_min(_IRLS_FLOOR)
                solution = _ridge(design, goal[:, k], weight_decay, 1.0 / residual)
        columns.append(solution)
    solution = torch.stack(columns, dim=1).to(features.dtype)
    head = nn.Linear(features.shape[1], goal.shape[1])
    with torch.no_grad():
        head.weight.copy_(solution[:-1].T)
        head.bias.copy_(solution[-1])
    return head.requires_grad_(False).eval()


def _stages(encoder: nn.Module) -> list[nn.Module]:
    stages = getattr(encoder, "stages", None)
    if callable(stages):
        found = list(stages())
    else:
        found = [child for child in encoder.children() if any(True for _ in child.parameters())]
    if not found:
        raise InputError("the encoder has no parameterised stages to fine-tune")
    return found


def _probe(features: Tensor, data: ImageDataset, config: AdaptConfig) -> nn.Linear:
    return train_linear_probe(
        features, data.y, num_classes=data.num_classes, weight_decay=config.weight_decay
    )


def _fine_tune(
    encoder: nn.Module,
    head: nn.Linear,
    data: ImageDataset,
    config: AdaptConfig,
    *,
    trainable: list[nn.Parameter],
    anchor: nn.Module | None,
    progress: bool,
) -> float:
    device = model_device(encoder, torch.device("cpu"))
    head = head.to(device).requires_grad_(True)

    def loss(x: Tensor, y: Tensor, _: torch.Generator) -> Tensor:
        features = encoder(x).flatten(1)
        value = F.cross_entropy(head(features), y)
        if anchor is not None:
            with torch.no_grad():
                reference = anchor(x).flatten(1)
            moved = (features - reference).pow(2).sum(dim=1).add(1e-12).sqrt()
            value = value + config.anchor_weight * moved.mean()
        return value

    last = train_epochs(
        encoder,
        [*trainable, *head.parameters()],
        data,
        loss,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        device=device,
        one_cycle=False,
        desc=f"{config.protocol.value} ({len(data)} points)",
        progress=progress,
    )
    head.requires_grad_(False).eval()
    return last


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
    them once per encoder and training set, and every probe on it reads them)."""
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
    # Every protocol but plain fine-tuning starts from a probe on the clean features.
    clean = features
    if clean is None and config.protocol is not AdaptProtocol.FINETUNE:
        clean = extract_features(encoder, data.x, progress=progress)
    probes: dict[AdaptProtocol, Callable[[], nn.Linear]] = {
        AdaptProtocol.LINEAR_PROBE: lambda: _probe(_given(clean), data, config),
        AdaptProtocol.CERTIFIED_PROBE: lambda: train_certified_probe(
            _given(clean),
            data.y,
            float(config.radius or 0.0),
            num_classes=data.num_classes,
            robust_weight=config.robust_weight,
            weight_decay=config.weight_decay,
        ),
    }
    metrics: dict[str, float] = {}
    if config.protocol in probes:
        head = probes[config.protocol]()
        adapted = encoder
    else:
        adapted = copy.deepcopy(encoder)
        stages = _stages(adapted)
        if config.protocol is AdaptProtocol.PARTIAL_FINETUNE:
            if config.trainable_stages > len(stages):
                raise InputError(
                    f"trainable_stages={config.trainable_stages} but the encoder has "
                    f"{len(stages)} stages"
                )
            adapted.requires_grad_(False)
            for stage in stages[-config.trainable_stages :]:
                stage.requires_grad_(True)
        else:
            adapted.requires_grad_(True)
        trainable = [p for p in adapted.parameters() if p.requires_grad]
        if config.protocol is AdaptProtocol.FINETUNE:
            dim = extract_features(encoder, data.x[:1]).shape[1]
            head = nn.Linear(dim, data.num_classes).to(model_device(encoder, torch.device("cpu")))
        else:
            head = _probe(_given(clean), data, config)
        anchor = encoder if config.protocol is AdaptProtocol.ANCHORED_FINETUNE else None
        metrics["final_loss"] = _fine_tune(
            adapted, head, data, config, trainable=trainable, anchor=anchor, progress=progress
        )
        adapted.requires_grad_(False)
        metrics["feature_movement"] = _feature_movement(encoder, adapted, data.x[:1000])
    metrics["train_acc"] = head_accuracy(adapted, head, data, clean if adapted is encoder else None)
    metrics["seconds"] = time.perf_counter() - start
    return Adapted(adapted, head, metrics)
