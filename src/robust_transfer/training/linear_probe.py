"""The linear probe: multinomial logistic regression on cached, frozen features."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_features, check_labels, check_positive_int, check_two_classes
from ..core.errors import InputError


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
    features = check_features(features)
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
