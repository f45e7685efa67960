"""Adaptation protocols learn and show their defining property."""

from collections.abc import Callable
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from conftest import pretrained_on_digits
from torch import Tensor, nn

from robust_transfer import criterion_holds
from robust_transfer.core.layout import aligned
from robust_transfer.data import ImageDataset, get_task
from robust_transfer.models import SmallCNN
from robust_transfer.models.features import extract_features
from robust_transfer.theory.bounds import certified_probe_objective
from robust_transfer.training import (
    AdaptConfig,
    AdaptProtocol,
    adapt,
    train_certified_probe,
    train_linear_probe,
    train_regression_probe,
)


@cache
def _data() -> tuple[ImageDataset, ImageDataset]:
    split = get_task("mnist-5-9").downstream
    return split.train.subset(torch.arange(500)), split.test.subset(torch.arange(300))


@cache
def _encoder() -> nn.Module:
    """A small CNN pretrained for a few steps on digits 0-4."""
    torch.manual_seed(0)
    return pretrained_on_digits(SmallCNN(feature_dim=32))


def _test_accuracy(encoder: nn.Module, head: nn.Linear) -> float:
    test = _data()[1]
    return float((head(extract_features(encoder, test.x)).argmax(1) == test.y).float().mean())


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("protocol", list(AdaptProtocol))
def test_every_protocol_learns(protocol: AdaptProtocol) -> None:
    encoder = _encoder()
    before = _state(encoder)
    config = AdaptConfig(protocol, epochs=3, radius=0.5)
    adapted = adapt(encoder, _data()[0], config)
    assert _test_accuracy(adapted.encoder, adapted.head) > 0.6  # chance: 0.2
    # The pretrained encoder is never changed, whatever the protocol.
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    probe = protocol in (AdaptProtocol.LINEAR_PROBE, AdaptProtocol.CERTIFIED_PROBE)
    assert (adapted.encoder is encoder) == probe
    assert not adapted.encoder.training


def test_partial_finetuning_trains_only_the_last_stages() -> None:
    encoder = _encoder()
    adapted = adapt(
        encoder, _data()[0], AdaptConfig("partial-finetune", epochs=1, trainable_stages=2)
    )
    stages_before, stages_after = encoder.stages(), adapted.encoder.stages()  # type: ignore[operator]
    for index, (old, new) in enumerate(zip(stages_before, stages_after, strict=True)):
        same = all(
            torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters(), strict=True)
        )
        assert same == (index < len(stages_before) - 2), index


def test_anchoring_moves_features_less_than_full_finetuning() -> None:
    data = _data()[0]
    full = adapt(_encoder(), data, AdaptConfig("finetune", epochs=2))
    anchored = adapt(_encoder(), data, AdaptConfig("anchored-finetune", epochs=2))
    assert anchored.metrics["feature_movement"] < 0.5 * full.metrics["feature_movement"]


def test_same_seed_same_finetuned_weights() -> None:
    data = _data()[0].subset(torch.arange(200))
    first = adapt(_encoder(), data, AdaptConfig("lp-ft", epochs=1))
    second = adapt(_encoder(), data, AdaptConfig("lp-ft", epochs=1))
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.encoder.parameters(), second.encoder.parameters(), strict=True)
    )
    assert torch.equal(first.head.weight, second.head.weight)


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    train = _data()[0]
    return extract_features(_encoder(), train.x), train.y


def test_certified_probe_raises_the_certified_share() -> None:
    features, labels = _features()
    radius = float(features.norm(dim=1).median()) * 0.05
    plain = train_linear_probe(features, labels, num_classes=5)
    certified = train_certified_probe(features, labels, radius, num_classes=5)
    shift = torch.full((len(features),), radius)

    def share(head: nn.Linear) -> float:
        correct = head(features).argmax(1) == labels
        return float((correct & criterion_holds(head, features, shift)).float().mean())

    assert share(certified) > share(plain)
    # Far beyond what the features separate, the pure worst-case head degrades towards
    # the constant predictor; the mixed objective keeps it useful.
    large = 8 * radius

    def accuracy(head: nn.Linear) -> float:
        return float((head(features).argmax(1) == labels).float().mean())

    pure = train_certified_probe(features, labels, large, num_classes=5, robust_weight=1.0)
    mixed = train_certified_probe(features, labels, large, num_classes=5)
    assert accuracy(mixed) > accuracy(pure) + 0.1


def test_certified_probe_does_not_depend_on_where_its_features_lie_in_memory() -> None:
    """CPU kernels round by the data's alignment, and L-BFGS on a flat objective (here
    the radius exceeds the features' spread) turns the last bit into another head: a
    stored unit's features, which lie at any byte offset, once gave other heads in a
    long-running process than fresh ones."""
    features = torch.randn(20, 8, generator=torch.Generator().manual_seed(0)) * 0.05
    labels = torch.arange(20) % 3
    layouts = [features, features.T.contiguous().T]  # row- and column-major
    for offset in range(1, 8):
        buffer = torch.zeros(features.numel() + offset)
        view = buffer[offset:].view(features.shape)
        view.copy_(features)
        layouts.append(view)
    fits: list[Callable[[Tensor], nn.Linear]] = [
        lambda z: train_certified_probe(z, labels, 0.076),
        lambda z: train_linear_probe(z, labels),
    ]
    for fit in fits:
        heads = [fit(z) for z in layouts]
        for head in heads[1:]:
            assert torch.equal(head.weight, heads[0].weight)
            assert torch.equal(head.bias, heads[0].bias)
    # What is laid out as torch allocates is not copied.
    assert aligned(features) is features
    assert aligned(layouts[1]).is_contiguous()


def test_certified_probe_objective_bounds_the_worst_case_loss() -> None:
    """PGD in feature space within the radius never exceeds CE(ztilde, y)."""
    features, labels = _features()
    radius = 0.5
    head = train_certified_probe(features, labels, radius, num_classes=5, robust_weight=1.0)
    bound = certified_probe_objective(head, features, labels, radius)
    delta = torch.zeros_like(features, requires_grad=True)
    worst = torch.zeros(len(features))
    for _ in range(30):
        loss = F.cross_entropy(head(features + delta), labels, reduction="none")
        worst = torch.maximum(worst, loss.detach())
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            delta += 0.1 * radius * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
            delta *= (radius / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    assert (worst <= bound + 1e-5).all()
    assert (worst > bound - 5.0).any()  # and the search went somewhere


@pytest.mark.parametrize("loss", ["absolute", "squared"])
def test_regression_probe(loss: str) -> None:
    torch.manual_seed(0)
    features = torch.randn(300, 8)
    truth = torch.randn(8, 2)
    targets = features @ truth + 0.5 + 0.1 * torch.randn(300, 2)
    head = train_regression_probe(features, targets, loss, weight_decay=0.0)
    error = (head(features) - targets).abs().mean()
    baseline = (targets - targets.mean(dim=0)).abs().mean()
    assert error < 0.2 * baseline
    if loss == "squared":
        design = torch.cat([features, torch.ones(300, 1)], dim=1)
        solution = torch.linalg.lstsq(design, targets).solution
        torch.testing.assert_close(head.weight.T, solution[:-1], atol=1e-4, rtol=1e-4)
    first = train_regression_probe(features, targets, loss)
    assert torch.equal(first.weight, train_regression_probe(features, targets, loss).weight)


def test_absolute_probe_resists_outliers_better_than_squared() -> None:
    torch.manual_seed(1)
    features = torch.randn(200, 3)
    targets = features @ torch.tensor([[1.0], [-2.0], [0.5]])
    targets[:10] += 50.0
    l1 = train_regression_probe(features, targets, "absolute", weight_decay=0.0)
    l2 = train_regression_probe(features, targets, "squared", weight_decay=0.0)
    clean = targets[10:]
    assert (l1(features[10:]) - clean).abs().mean() < (l2(features[10:]) - clean).abs().mean()


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"protocol": "certified-probe"}, "needs a radius"),
        ({"protocol": "certified-probe", "radius": -1.0}, "radius must be a finite number"),
        ({"protocol": "certified-probe", "radius": float("inf")}, "radius must be a finite"),
        ({"protocol": "finetune", "lr": float("nan")}, "lr must be a finite number above 0"),
        ({"protocol": "finetune", "epochs": 2**63 - 1}, "epochs 9223372036854775807 exceeds"),
        ({"protocol": "finetune", "seed": 2**64}, "seed must be an integer from 0"),
        ({"protocol": "anchored-finetune", "anchor_weight": -0.1}, "anchor_weight"),
        ({"protocol": "prompt-tuning"}, "unknown protocol"),
        ({"protocol": "finetune", "epochs": 0}, "epochs"),
        ({"protocol": "certified-probe", "radius": 1.0, "robust_weight": 0.0}, "robust_weight"),
    ],
)
def test_bad_configs(values: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptConfig(**values)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="trainable_stages=9"):
        adapt(_encoder(), _data()[0], AdaptConfig("partial-finetune", trainable_stages=9))
    with pytest.raises(TypeError, match="ImageDataset"):
        adapt(_encoder(), torch.rand(4, 1, 28, 28), AdaptConfig("linear-probe"))  # type: ignore[arg-type]
    features, labels = _features()
    with pytest.raises(ValueError, match="shape"):
        train_certified_probe(features, labels[:-1], 0.1)
    with pytest.raises(ValueError, match="targets must have shape"):
        train_regression_probe(features, torch.randn(3, 2), "absolute")
    with pytest.raises(ValueError, match="unknown regression loss"):
        train_regression_probe(features, torch.randn(len(features)), "huber")
