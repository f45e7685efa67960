"""The theory (``docs/theory.md`` derives each result) on tensors: no training, no I/O.

A linear head ``h(z) = W z + b`` on a representation ``f``; ``shift`` is a per-sample
value of ``||f(x') - f(x)||_2``: from an attack it makes the bounds estimates, from a
certificate it makes them guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_features, check_labels, check_per_sample, check_tensor
from ..core.errors import InputError, InputTypeError


def _check_head(head: object) -> nn.Linear:
    if not isinstance(head, nn.Linear):
        raise InputTypeError(f"head must be a torch.nn.Linear, got {type(head).__name__}")
    return head


def _check_head_features(
    head: object, features: object, name: str = "features"
) -> tuple[nn.Linear, Tensor]:
    head = _check_head(head)
    features = check_features(features, name)
    if features.shape[1] != head.in_features:
        raise InputError(
            f"{name} have dimension {features.shape[1]} but the head expects {head.in_features}"
        )
    return head, features


def _logits(head: nn.Linear, features: Tensor) -> Tensor:
    return F.linear(
        features, head.weight.detach(), None if head.bias is None else head.bias.detach()
    )


def _pairwise_row_distances(weight: Tensor) -> Tensor:
    """``||w_i - w_j||_2`` for all pairs, exactly zero on the diagonal and for equal rows."""
    diff = weight[:, None, :] - weight[None, :, :]
    distances: Tensor = torch.linalg.vector_norm(diff, dim=2)
    return distances


def weight_gap(head: nn.Linear) -> Tensor:
    """``D(W) = max_{i,j} ||w_i - w_j||_2``, the head's only entry in the loss bound."""
    weight = _check_head(head).weight.detach()
    return _pairwise_row_distances(weight).max()


def class_weight_gap(head: nn.Linear, labels: Tensor) -> Tensor:
    """``max_j ||w_y - w_j||_2`` per sample: a per-label ``D(W)``, never larger than it."""
    head = _check_head(head)
    labels = check_labels(
        labels, check_tensor(labels, "labels").shape[0], num_classes=head.out_features
    )
    distances = _pairwise_row_distances(head.weight.detach())
    return distances.amax(dim=1)[labels]


def class_gaps(weight: Tensor, labels: Tensor) -> Tensor:
    """``||w_y - w_j||_2`` for every sample and class, differentiable in ``weight``.

    The training-side twin of :func:`class_weight_gap`: the tiny constant keeps the
    gradient finite where the distance is zero (``j = y``), and rows are picked by a
    one-hot product rather than by indexing, whose backward pass accumulates in a
    thread-dependent order, so that training stays bit-for-bit repeatable.
    """
    distances = (weight[:, None, :] - weight[None, :, :]).pow(2).sum(dim=2).add(1e-12).sqrt()
    return F.one_hot(labels, weight.shape[0]).to(weight.dtype) @ distances


def worst_case_logits(
    logits: Tensor, weight: Tensor, labels: Tensor, radius: float | Tensor
) -> Tensor:
    """``ztilde_j = z_j + r ||w_j - w_y||_2`` (``ztilde_y = z_y``): cross-entropy at these
    logits upper-bounds the cross-entropy at every representation within ``r`` of the
    clean one, and is convex in the head. ``radius`` is a scalar or per-sample tensor."""
    radii = radius[:, None] if isinstance(radius, Tensor) and radius.dim() == 1 else radius
    return logits + radii * class_gaps(weight, labels)


def worst_case_cross_entropy(
    logits: Tensor,
    weight: Tensor,
    labels: Tensor,
    radius: float | Tensor,
    reduction: str = "mean",
) -> Tensor:
    """``CE(ztilde, y)`` at :func:`worst_case_logits`: an upper bound on the cross-entropy
    at every representation within ``radius``, convex in the head; differentiable."""
    worst = worst_case_logits(logits, weight, labels, radius)
    return F.cross_entropy(worst, labels, reduction=reduction)


def certified_probe_objective(
    head: nn.Linear, features: Tensor, labels: Tensor, radius: float
) -> Tensor:
    """Per-sample ``CE(ztilde, y)``: an upper bound on the cross-entropy at any
    representation within ``radius`` of ``features``."""
    with torch.no_grad():
        return worst_case_cross_entropy(
            head(features), head.weight, labels, radius, reduction="none"
        )


@dataclass(frozen=True)
class CrossEntropyIncrease:
    """For a pair ``x, x'`` the increase of cross-entropy and Result 1's chain of bounds on it.

    Per sample: ``increase <= first_order <= effective <= label_worst_case <= worst_case``.
    """

    increase: Tensor
    first_order: Tensor
    effective: Tensor
    label_worst_case: Tensor
    worst_case: Tensor


def cross_entropy_increase(
    head: nn.Linear, features: Tensor, features_adv: Tensor, labels: Tensor
) -> CrossEntropyIncrease:
    """Result 1 evaluated at given representations ``f(x)`` and ``f(x')``.

    ``first_order`` is convexity of CE in the logits, ``(W^T p' - w_y)^T (f(x') - f(x))``
    with ``p' = softmax(g(x'))``; ``effective`` applies Cauchy-Schwarz to it;
    ``label_worst_case`` and ``worst_case`` replace ``||w_y - W^T p'||`` by
    ``max_j ||w_y - w_j||`` and by ``D(W)``.
    """
    head, features = _check_head_features(head, features)
    features_adv = check_features(features_adv, "features_adv")
    if features_adv.shape != features.shape:
        raise InputError(
            f"features_adv has shape {tuple(features_adv.shape)}, features {tuple(features.shape)}"
        )
    labels = check_labels(labels, features.shape[0], num_classes=head.out_features)
    weight = head.weight.detach()
    logits, logits_adv = _logits(head, features), _logits(head, features_adv)
    increase = F.cross_entropy(logits_adv, labels, reduction="none") - F.cross_entropy(
        logits, labels, reduction="none"
    )
    moved = features_adv - features
    distance = torch.linalg.vector_norm(moved, dim=1)
    # w_y - W^T p' = sum_j p'_j (w_y - w_j): the CE gradient in feature space, negated.
    pull = weight[labels] - logits_adv.softmax(dim=1) @ weight
    return CrossEntropyIncrease(
        increase=increase,
        first_order=-(pull * moved).sum(dim=1),
        effective=torch.linalg.vector_norm(pull, dim=1) * distance,
        label_worst_case=class_weight_gap(head, labels) * distance,
        worst_case=weight_gap(head) * distance,
    )


def adversarial_cross_entropy_bound(
    head: nn.Linear, features: Tensor, labels: Tensor, shift: Tensor
) -> Tensor:
    """Per-sample upper bound on ``max_{x' in B(x)} CE(g(x'), y)``.

    ``CE(g(x), y) + max_j ||w_y - w_j||_2 * shift(x)``: valid for every ``x'`` whose
    representation moves at most ``shift(x)``, hence a guarantee with a certified shift.
    """
    head, features = _check_head_features(head, features)
    labels = check_labels(labels, features.shape[0], num_classes=head.out_features)
    shift = check_per_sample(shift, features.shape[0], "shift")
    clean = F.cross_entropy(_logits(head, features), labels, reduction="none")
    return clean + class_weight_gap(head, labels) * shift


def expected_cross_entropy_bound(
    head: nn.Linear, features: Tensor, labels: Tensor, shift: Tensor
) -> Tensor:
    """Result 1 in expectation: ``E[CE(g(x), y)] + D(W) * E[shift]`` (a scalar)."""
    head, features = _check_head_features(head, features)
    labels = check_labels(labels, features.shape[0], num_classes=head.out_features)
    shift = check_per_sample(shift, features.shape[0], "shift")
    clean = F.cross_entropy(_logits(head, features), labels)
    return clean + weight_gap(head) * shift.mean()


def normalized_margin(head: nn.Linear, features: Tensor) -> Tensor:
    """``rho(x)``: the l2 distance in representation space from ``f(x)`` to the decision boundary.

    ``min_{j != yhat} (g_yhat - g_j) / ||w_yhat - w_j||``. A class whose weight row equals
    the predicted one can never overtake it if its logit is lower (``+inf``) and never
    be told apart from it if tied (``0``); a tie with any class gives ``0``; a single
    class gives ``+inf``.
    """
    head, features = _check_head_features(head, features)
    logits = _logits(head, features)
    predicted = logits.argmax(dim=1)
    gaps = logits.gather(1, predicted[:, None]) - logits
    distances = _pairwise_row_distances(head.weight.detach())[predicted]
    ratio = torch.where(
        distances > 0, gaps / distances.clamp_min(torch.finfo(distances.dtype).tiny), torch.inf
    )
    ratio = torch.where(gaps <= 0, torch.zeros_like(ratio), ratio)
    ratio = ratio.scatter(1, predicted[:, None], torch.inf)
    return ratio.amin(dim=1)


def criterion_holds(head: nn.Linear, features: Tensor, shift: Tensor) -> Tensor:
    """Result 2 per sample: ``rho(x) > shift(x)`` means no ``x' in B(x)`` changes the prediction.

    A guarantee when ``shift`` is an upper bound (certificate) on the true shift; with an
    attacked shift it is a prediction.
    """
    features = check_features(features)
    shift = check_per_sample(shift, features.shape[0], "shift")
    return normalized_margin(head, features) > shift


def certified_accuracy(head: nn.Linear, features: Tensor, labels: Tensor, shift: Tensor) -> float:
    """Share of samples that are correctly classified and pass :func:`criterion_holds`."""
    head, features = _check_head_features(head, features)
    labels = check_labels(labels, features.shape[0], num_classes=head.out_features)
    correct = _logits(head, features).argmax(dim=1) == labels
    return float((correct & criterion_holds(head, features, shift)).float().mean())


def _regression_terms(
    head: nn.Linear, features: Tensor, targets: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Absolute clean residuals and the largest prediction change ``||w||_2 * shift``."""
    head, features = _check_head_features(head, features)
    n = features.shape[0]
    targets = check_tensor(targets, "targets")
    if not targets.is_floating_point():
        raise InputTypeError(f"targets must be a floating point tensor, got {targets.dtype}")
    k = head.out_features
    allowed = [(n, k), (n,)] if k == 1 else [(n, k)]
    if tuple(targets.shape) not in allowed:
        shapes = " or ".join(str(shape) for shape in reversed(allowed))
        raise InputError(
            f"targets must have shape {shapes} for a head with {k} output(s), "
            f"got {tuple(targets.shape)}"
        )
    shift = check_per_sample(shift, n, "shift")
    predictions = _logits(head, features).reshape(targets.shape)
    change = torch.linalg.vector_norm(head.weight.detach(), dim=1) * shift[:, None]
    return (predictions - targets).abs(), change.reshape(targets.shape)


def absolute_error_bound(
    head: nn.Linear, features: Tensor, targets: Tensor, shift: Tensor
) -> Tensor:
    """Upper bound on ``|yhat(x') - y|`` per sample and output: ``|yhat(x) - y| + ||w|| shift``."""
    residual, change = _regression_terms(head, features, targets, shift)
    return residual + change


def squared_error_bound(
    head: nn.Linear, features: Tensor, targets: Tensor, shift: Tensor
) -> Tensor:
    """Upper bound on ``(yhat(x') - y)^2``: ``(|yhat(x) - y| + ||w|| shift)^2``.

    Equals the clean loss plus ``u (2 |yhat(x) - y| + u)``: squared error is not
    Lipschitz, so the bound carries the clean residual.
    """
    residual, change = _regression_terms(head, features, targets, shift)
    return (residual + change).pow(2)
