"""Linear heads fitted on cached, frozen features: the linear probe (multinomial logistic
regression), the certified probe and the regression probe."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import (
    check_features,
    check_labels,
    check_per_sample,
    check_positive_int,
    check_two_classes,
)
from ..core.errors import InputError, InputTypeError
from ..core.layout import aligned
from ..theory.bounds import worst_case_cross_entropy
from ..theory.losses import RegressionLoss


def train_linear_probe(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> nn.Linear:
    """Fit ``h(z) = W z + b`` by full-batch L-BFGS on mean cross-entropy plus
    ``weight_decay / 2 * ||W||_F^2``.

    The objective is convex and the start is zero, so the result is deterministic and
    needs no seed; full-batch second-order steps make it fast on cached features. The
    penalty keeps ``D(W)``, the head's factor in the loss bound, in check.
    """
    features = aligned(check_features(features))  # as in train_certified_probe
    n, dim = features.shape
    labels = check_labels(labels, n)
    classes = (
        int(labels.max()) + 1
        if num_classes is None
        else check_positive_int(num_classes, "num_classes")
    )
    labels = check_labels(labels, n, num_classes=classes)
    check_positive_int(max_iter, "max_iter")
    if weight_decay < 0:
        raise InputError(f"weight_decay must be non-negative, got {weight_decay}")
    check_two_classes(labels, "labels")
    # L-BFGS from zero starts with a step of unit length: on features far from unit scale
    # it overshoots (1e4 already costs accuracy) or crawls. Training V on z / s, penalised
    # by ||V||^2 / s^2, minimises the same objective in W = V / s; features of a usual
    # scale keep s = 1, and so exactly the heads they had.
    typical = float(features.abs().mean())
    scale = typical if typical > 0 and not _WELL_SCALED[0] <= typical <= _WELL_SCALED[1] else 1.0
    scaled = features / scale
    head = nn.Linear(dim, classes).to(features.device, features.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )
    penalty = 0.5 * weight_decay / scale**2

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(scaled), labels) + penalty * head.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    head.requires_grad_(False)
    head.weight.div_(scale)
    warn_if_chance(head(features).argmax(1), labels, "the linear probe")
    return head


_WELL_SCALED = (1e-3, 1e3)


def warn_if_chance(predictions: Tensor, labels: Tensor, what: str) -> None:
    """Say so when a trained head does no better on its own training points than
    always naming their most common class: it learned nothing, and every robust accuracy
    measured on it says nothing of the encoder."""
    accuracy = float((predictions == labels).float().mean())
    majority = float(torch.bincount(labels).max()) / len(labels)
    if accuracy <= majority:
        warnings.warn(
            f"{what} reaches {accuracy:.3f} training accuracy, no better than always "
            f"naming the most common class ({majority:.3f}): check the features' scale "
            "and the weight decay",
            stacklevel=3,
        )


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
    # L-BFGS on a flat objective turns a kernel's last bit into another head, and kernels
    # round by the data's layout: a view into a buffer must not change the head.
    features = aligned(check_features(features))
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
