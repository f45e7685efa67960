"""Hostile input at the Python API: what would give a silent wrong result is refused in
one clear error, and what is only unusual (float64, inputs with gradients, features far
from unit scale) gives the same answer as the usual input."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from robust_transfer.attacks import attack_classifier, attack_representation
from robust_transfer.core.errors import InputError, InputTypeError
from robust_transfer.estimates.expected import profile_encoder
from robust_transfer.models.features import extract_features
from robust_transfer.theory.threat import ThreatModel
from robust_transfer.training.linear_probe import train_linear_probe


class _Nan(nn.Module):
    """Features that are NaN on some inputs only (a division by a zero norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        return self.linear(flat) / (flat[:, :1] > 0.5).float()  # 0/0 or x/0 on some rows


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.linear(x.flatten(1))
        return z, z.relu()


def _inputs(n: int = 20) -> Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def test_nan_features_are_refused_everywhere() -> None:
    torch.manual_seed(0)
    encoder, x = _Nan().eval(), _inputs()
    threat = ThreatModel("L2", 0.5)
    with pytest.raises(InputError, match="NaN or infinite features for"):
        extract_features(encoder, x)
    with pytest.raises(InputError, match="NaN or infinite features for"):
        profile_encoder(encoder, x)
    with pytest.raises(InputError, match="NaN or infinite on clean points"):
        attack_representation(encoder, x, threat, steps=2)
    model = nn.Sequential(encoder, nn.Linear(4, 3)).eval()
    with pytest.raises(InputError, match="NaN or infinite on clean points"):
        attack_classifier(model, x, torch.zeros(20, dtype=torch.long), threat, steps=2)


def test_nan_heads_are_refused_by_the_expected_accuracy() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    x, y = _inputs(), torch.arange(20) % 3
    profile = profile_encoder(encoder, x)
    for poison in ("weight", "bias"):
        head = nn.Linear(4, 3)
        with torch.no_grad():
            getattr(head, poison)[0] = float("nan") if poison == "weight" else float("inf")
        with pytest.raises(InputError, match="NaN or infinite"):
            profile.expected_robust(head, y, ThreatModel("Linf", 0.1))


def test_tuple_outputs_are_refused() -> None:
    encoder, x = _Pair().eval(), _inputs()
    with pytest.raises(InputTypeError, match="returned a tuple, not a tensor"):
        extract_features(encoder, x)
    with pytest.raises(InputTypeError, match="returned a tuple, not a tensor"):
        attack_representation(encoder, x, ThreatModel("L2", 0.5), steps=2)


def test_float64_and_grad_inputs_give_the_float32_answer() -> None:
    """Oracle: the same images in float32, without gradients."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = _inputs()
    threat = ThreatModel("Linf", 0.1)
    plain = attack_representation(encoder, x, threat, steps=5, seed=1)
    for odd in (x.double(), x.clone().requires_grad_(True), x.double().requires_grad_(True)):
        result = attack_representation(encoder, odd, threat, steps=5, seed=1)
        assert torch.equal(result.shift, plain.shift)
        for value in (result.shift, result.features, result.x_adv, result.delta):
            assert value.grad_fn is None
            assert not value.requires_grad
        features = extract_features(encoder, odd)
        assert features.grad_fn is None
        assert torch.equal(features, extract_features(encoder, x))


def test_features_far_from_unit_scale_train_the_same_probe() -> None:
    """Oracle: the probe on the same features at unit scale (the objective, hence the
    predictions, is the same at every scale); beyond what float32 can square, refused."""
    torch.manual_seed(0)
    z = torch.randn(300, 16)
    y = (z[:, 0] > 0).long() + (z[:, 1] > 0).long()
    reference = train_linear_probe(z, y, weight_decay=0.0)(z).argmax(1)
    for scale in (1e4, 1e8, 1e12, 1e17):
        head = train_linear_probe(z * scale, y, weight_decay=0.0)
        agree = (head(z * scale).argmax(1) == reference).float().mean()
        assert agree >= 0.97, (scale, agree)
    with pytest.raises(InputError, match="overflow float32"):
        train_linear_probe(z * 1e30, y)


def test_a_probe_that_learns_nothing_says_so() -> None:
    z = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(200) % 2
    with pytest.warns(UserWarning, match="no better than always naming the most common class"):
        train_linear_probe(z * 1e-6, y)  # the penalty wins: the optimum is a constant
    with pytest.raises(InputError, match="only class 1"):
        train_linear_probe(z, torch.ones(200, dtype=torch.long))


def test_an_encoder_made_for_other_inputs_is_one_clear_error() -> None:
    """A layer sized for other data fails inside the model: the error names the input
    shape, and stays an input error (one line on the command line), not a traceback."""
    import robust_transfer as rt

    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8)).eval()
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(rt.RobustTransferError, match=r"fails on inputs of shape \(1, 28, 28\)"):
        rt.extract_features(encoder, x)
    with pytest.raises(rt.RobustTransferError, match=r"fails on inputs of shape \(1, 28, 28\)"):
        rt.attack_representation(encoder, x, rt.ThreatModel("L2", 0.5), steps=2)


def test_only_shape_errors_become_input_errors() -> None:
    import robust_transfer as rt

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    with pytest.raises(rt.RobustTransferError, match=r"shape \(1, 8, 8\).*3 channels"):
        rt.extract_features(conv, torch.rand(2, 1, 8, 8))

    class Broken(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("a failure of the model's own")

    with pytest.raises(RuntimeError, match="of the model's own") as caught:
        rt.extract_features(Broken(), torch.rand(2, 1, 8, 8))
    assert not isinstance(caught.value, rt.RobustTransferError)
