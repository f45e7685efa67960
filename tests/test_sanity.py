"""Sanity flags: each trips on a model built to trip it and stays quiet on a plain one."""

import pytest
import torch
from conftest import cnn_encoder, linear_encoder, random_head
from torch import Tensor, nn

from robust_transfer import ThreatModel
from robust_transfer.attacks.reference import attack_autoattack
from robust_transfer.attacks.sanity import margin_score, sanity_arrays
from robust_transfer.attacks.settings import AttackSettings
from robust_transfer.core.schema import Array
from robust_transfer.estimates.evaluate import evaluate_classification, measure_shift
from robust_transfer.estimates.records import aggregate


class Quantize(nn.Module):
    """Rounds pixels to a few levels: outputs move under a perturbation, gradients are 0."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * self.levels) / self.levels


class Noisy(nn.Module):
    """Adds fresh noise on every call, in eval mode too: a randomised defence."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.05 * torch.randn_like(x)


class Root(nn.Module):
    """sqrt has an infinite derivative at 0: black pixels give non-finite gradients."""

    def forward(self, x: Tensor) -> Tensor:
        return x.sqrt()


def classifier(*front: nn.Module) -> nn.Module:
    return nn.Sequential(*front, cnn_encoder(), random_head(12, 5, seed=2, scale=3.0)).eval()


def images(n: int = 24) -> Tensor:
    torch.manual_seed(5)
    return torch.rand(n, 1, 12, 12).clamp_min(0.02)


def flags(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return sanity_arrays(model, x, margin_score(y), batch_size=7)


def test_a_plain_model_trips_nothing() -> None:
    found = flags(classifier(), images())
    assert set(found) == {Array.ZERO_GRADIENT, Array.NONFINITE_GRADIENT, Array.RANDOM_OUTPUT}
    for name, tripped in found.items():
        assert not tripped.any(), name


def test_a_quantising_layer_trips_zero_gradients() -> None:
    found = flags(classifier(Quantize(4)), images())
    assert found[Array.ZERO_GRADIENT].all()
    assert not found[Array.RANDOM_OUTPUT].any()


def test_an_infinite_derivative_trips_nonfinite_gradients() -> None:
    x = images()
    x[::2, :, :3, :3] = 0.0  # black corners on every other image
    found = flags(classifier(Root()), x)
    assert found[Array.NONFINITE_GRADIENT][::2].all()
    assert not found[Array.NONFINITE_GRADIENT][1::2].any()
    assert not found[Array.ZERO_GRADIENT].any()


def test_a_random_layer_trips_randomness() -> None:
    found = flags(classifier(Noisy()), images())
    assert found[Array.RANDOM_OUTPUT].all()


def _quantised_linear(levels: int) -> tuple[nn.Module, Tensor, Tensor]:
    """A linear classifier behind a quantiser, and points it classifies by small margins."""
    torch.manual_seed(0)
    model = nn.Sequential(Quantize(levels), nn.Flatten(), random_head(144, 5, seed=3, scale=0.5))
    x = torch.rand(40, 1, 12, 12)
    with torch.no_grad():
        y = model.eval()(x).argmax(dim=1)
    return model, x, y


def test_square_beating_the_white_box_attacks_is_flagged() -> None:
    model, x, y = _quantised_linear(2)
    result = attack_autoattack(model, x, y, ThreatModel("Linf", 0.3), batch_size=40)
    # Every gradient is zero: whatever APGD and FAB break, they break by their random
    # starts; Square searches the quantised steps and breaks more.
    assert result.square_only.any()
    assert not (result.square_only & result.attack.robust).any()


def test_square_cannot_beat_the_white_box_attacks_on_a_linear_model() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), linear_encoder(torch.randn(8, 784)), random_head(8, 5))
    x = 0.3 + 0.4 * torch.rand(20, 1, 28, 28)
    with torch.no_grad():
        y = model.eval()(x).argmax(dim=1)
    result = attack_autoattack(model, x, y, ThreatModel("L2", 0.05), batch_size=20)
    assert 0 < result.attack.robust_accuracy < 1
    assert not result.square_only.any()


@pytest.mark.parametrize("masked", [False, True])
def test_a_study_unit_records_its_flags(masked: bool) -> None:
    torch.manual_seed(2)
    layers: list[nn.Module] = [Quantize(2)] if masked else []
    encoder = nn.Sequential(*layers, nn.Flatten(), linear_encoder(torch.randn(8, 144))).eval()
    head = random_head(8, 5, seed=1, scale=0.3)
    x = torch.rand(30, 1, 12, 12)
    with torch.no_grad():
        y = head(encoder(x)).argmax(dim=1)
    threat = ThreatModel("Linf", 0.3 if masked else 0.02)
    settings = AttackSettings(steps=5, representation_steps=5, batch_size=30)
    shift = measure_shift(encoder, x, threat, settings, seed=0)
    rows = torch.arange(30) < 20
    arrays = evaluate_classification(
        encoder, head, x, y, threat, shift, settings, seed=0, autoattack_rows=rows
    )
    record = aggregate(arrays)
    assert record["autoattack_points"] == 20
    assert not (arrays[Array.ROBUST_AUTOATTACK] & ~rows).any()
    flagged = record["sanity_flags"]
    assert isinstance(flagged, dict)
    if masked:
        assert flagged["zero_gradient"] == 30
        assert flagged.get("square_only", 0) > 0
    else:
        assert flagged == {}
