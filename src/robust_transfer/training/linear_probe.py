"""The linear probe: multinomial logistic regression on cached, frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_features, check_labels, check_positive_int
from ..errors import InputError


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
    head = nn.Linear(dim, classes).to(features.device, features.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (
            F.cross_entropy(head(features), labels) + 0.5 * weight_decay * head.weight.pow(2).sum()
        )
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    head.requires_grad_(False)
    return head
