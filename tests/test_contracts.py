"""The contract matrix: every encoder fixture against every attack and every certifier.

Attacks: the returned point lies in the box and the ball, and is never worse than the
attack's own first random start (recomputed here from the per-sample noise). Certifiers:
either a refusal with a reason, or a bound that a strong representation attack never
exceeds, on every sample. Per-sample random starts: the same result whatever the batch
size, and when the points are attacked as two halves.
"""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust_transfer import ThreatModel, attack_classifier, attack_representation
from robust_transfer.attacks.regression import attack_regression
from robust_transfer.certify import (
    Refusal,
    certifier_names,
    certify_all,
    get_certifier,
    register_certifier,
)
from robust_transfer.certify import base as certify_base
from robust_transfer.core.noise import SampleNoise
from robust_transfer.core.runtime import Runtime
from robust_transfer.models import LipschitzCNN, ResNet18, SLLNet

SEED = 5


class _Affine(nn.Module):
    """``A x``: its l2 Lipschitz constant is exactly ``sigma_max(A)``."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.layer = nn.Linear(inputs, outputs, bias=False)
        self.lipschitz_l2 = float(torch.linalg.matrix_norm(self.layer.weight.detach(), ord=2))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layer(x.flatten(1))
        return out


class _Residual(nn.Module):
    """A small ResNet: stem, two residual blocks with BatchNorm, pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1),
            )
            for _ in range(2)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        for block in self.blocks:
            h = F.relu(h + block(h))
        return F.adaptive_avg_pool2d(h, 2).flatten(1)


def _with_running_stats(model: nn.Module) -> nn.Module:
    """BatchNorm in eval mode with non-trivial statistics, as after training."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _linear() -> nn.Module:
    return _Affine(1 * 12 * 12, 10).eval()


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)
    ).eval()


def _cnn_batchnorm() -> nn.Module:
    return _with_running_stats(
        nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 12),
        )
    )


def _cnn_pooling() -> nn.Module:
    return _with_running_stats(
        nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 3 * 3, 10),
        )
    )


def _lipschitz_cnn() -> nn.Module:
    return LipschitzCNN(image_shape=(1, 12, 12), feature_dim=16).eval()


def _sll_net() -> nn.Module:
    encoder = SLLNet(image_shape=(1, 12, 12))
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith("bias"):  # branches on for some inputs, off for others
                parameter.normal_(0.0, 0.5)
    return encoder.eval()


def _small_resnet() -> nn.Module:
    return _with_running_stats(_Residual())


# name -> (builder, input shape of one sample)
ENCODERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (_linear, (1, 12, 12)),
    "mlp": (_mlp, (1, 12, 12)),
    "cnn-batchnorm": (_cnn_batchnorm, (1, 12, 12)),
    "cnn-pooling": (_cnn_pooling, (1, 12, 12)),
    "lipschitz-cnn": (_lipschitz_cnn, (1, 12, 12)),
    "lipschitz-sll": (_sll_net, (1, 12, 12)),
    "small-resnet": (_small_resnet, (1, 12, 12)),
}
THREATS = (ThreatModel("Linf", 0.05), ThreatModel("L2", 0.5))


def _fixture(name: str, n: int = 16) -> tuple[nn.Module, Tensor]:
    build, shape = ENCODERS[name]
    torch.manual_seed(1)
    encoder = build()
    x = torch.rand(n, *shape)
    x[0] = 0.0  # corners of the box: projection must clip there
    x[1] = 1.0
    return encoder, x


def _first_start(x: Tensor, threat: ThreatModel) -> Tensor:
    """The attack's first random start for every sample (restart 0), recomputed."""
    return threat.random_start(x, SampleNoise.first(SEED, len(x)), stream=0)


def _inside(x: Tensor, x_adv: Tensor, threat: ThreatModel) -> None:
    assert float(x_adv.min()) >= 0.0
    assert float(x_adv.max()) <= 1.0
    assert (threat.norms(x_adv - x) <= threat.eps * (1 + 1e-5)).all()


def _shift(encoder: nn.Module, x: Tensor, x_adv: Tensor) -> Tensor:
    with torch.no_grad():
        return (encoder(x_adv).flatten(1) - encoder(x).flatten(1)).norm(dim=1)


@pytest.mark.parametrize("threat", THREATS, ids=str)
@pytest.mark.parametrize("name", list(ENCODERS))
def test_representation_attack_contract(name: str, threat: ThreatModel) -> None:
    encoder, x = _fixture(name)
    result = attack_representation(encoder, x, threat, steps=5, seed=SEED, batch_size=6)
    _inside(x, result.x_adv, threat)
    start = _shift(encoder, x, _first_start(x, threat))
    assert (result.shift >= start - 1e-5).all()
    assert torch.allclose(result.shift, _shift(encoder, x, result.x_adv), atol=1e-5)


def _head_model(encoder: nn.Module, x: Tensor, outputs: int) -> nn.Module:
    torch.manual_seed(2)
    with torch.no_grad():
        dim = encoder(x[:1]).flatten(1).shape[1]
    return nn.Sequential(encoder, nn.Flatten(), nn.Linear(dim, outputs)).eval()


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    return logits.scatter(1, y[:, None], -torch.inf).amax(dim=1) - true


@pytest.mark.parametrize("loss", ["ce", "margin", "targeted"])
@pytest.mark.parametrize("threat", THREATS, ids=str)
@pytest.mark.parametrize("name", list(ENCODERS))
def test_classifier_attack_contract(name: str, threat: ThreatModel, loss: str) -> None:
    encoder, x = _fixture(name)
    model = _head_model(encoder, x, 4)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[:3] = (y[:3] + 1) % 4  # a few misclassified points
    result = attack_classifier(model, x, y, threat, steps=5, loss=loss, seed=SEED, batch_size=6)
    _inside(x, result.x_adv, threat)
    assert not (result.robust & ~result.clean_correct).any()
    with torch.no_grad():
        start_logits = model(_first_start(x, threat))
        adv_logits = model(result.x_adv)
    assert torch.equal(result.robust, result.clean_correct & (adv_logits.argmax(1) == y))
    # A start that misclassifies is never lost; otherwise the loss never drops below it.
    broken_at_start = start_logits.argmax(dim=1) != y
    assert not (result.robust & broken_at_start).any()
    if loss != "targeted":
        score = {
            "ce": lambda z: F.cross_entropy(z, y, reduction="none"),
            "margin": lambda z: _margin(z, y),
        }
        kept = ~broken_at_start & result.robust
        assert (score[loss](adv_logits)[kept] >= score[loss](start_logits)[kept] - 1e-5).all()


@pytest.mark.parametrize("threat", THREATS, ids=str)
@pytest.mark.parametrize("name", list(ENCODERS))
def test_regression_attack_contract(name: str, threat: ThreatModel) -> None:
    encoder, x = _fixture(name)
    model = _head_model(encoder, x, 2)
    targets = torch.randn(len(x), 2)
    result = attack_regression(model, x, targets, threat, steps=5, seed=SEED, batch_size=6)
    _inside(x, result.x_adv, threat)
    with torch.no_grad():
        start = (model(_first_start(x, threat)) - targets).abs().mean(dim=1)
    assert (result.loss_adv >= start - 1e-5).all()
    assert (result.loss_adv >= result.loss - 1e-5).all()


def test_every_certifier_is_in_the_matrix() -> None:
    assert "lipschitz" in certifier_names()


@pytest.mark.parametrize("threat", THREATS, ids=str)
@pytest.mark.parametrize("method", certifier_names())
def test_certifier_contract(method: str, threat: ThreatModel) -> None:
    """On every fixture a certifier refuses with a reason or bounds every sample's
    strongly attacked shift; the fixtures it must certify are named, so the check cannot
    pass vacuously."""
    certified = []
    for name in ENCODERS:
        encoder, x = _fixture(name, n=12)
        outcome = get_certifier(method).certify(encoder, x, threat)
        if isinstance(outcome, Refusal):
            assert outcome.reason
            continue
        assert outcome.shape == (len(x),)
        attacked = attack_representation(encoder, x, threat, steps=40, restarts=3, seed=SEED)
        assert (attacked.shift <= outcome * (1 + 1e-5) + 1e-6).all(), name
        certified.append(name)
    # Every fixture made of supported layers is certified (the small ResNet's forward is
    # its own code, which no certifier reads); the affine one by its stated constant.
    expected = {"mlp", "cnn-batchnorm", "cnn-pooling", "lipschitz-cnn", "lipschitz-sll"}
    if method == "lipschitz":
        expected.add("linear")
    if method in ("crown", "crown-full"):
        expected.remove("cnn-pooling")  # max pooling: IBP only
    assert set(certified) == expected


def test_lipschitz_certificate_is_exact_for_an_affine_encoder_under_l2() -> None:
    encoder, x = _fixture("linear")
    x = 0.3 + 0.4 * x  # the ball stays inside the box
    threat = ThreatModel("L2", 0.05)
    bound = get_certifier("lipschitz").certify(encoder, x, threat)
    assert not isinstance(bound, Refusal)
    attacked = attack_representation(encoder, x, threat, steps=100, restarts=3, seed=SEED)
    assert (attacked.shift >= 0.99 * bound).all()


def test_resnet18_runs_through_the_attacks() -> None:
    encoder = ResNet18(image_shape=(3, 32, 32), feature_dim=16).eval()
    x = torch.rand(3, 3, 32, 32)
    threat = ThreatModel("Linf", 2 / 255)
    result = attack_representation(encoder, x, threat, steps=2, seed=SEED)
    _inside(x, result.x_adv, threat)
    assert (result.shift >= _shift(encoder, x, _first_start(x, threat)) - 1e-5).all()


@pytest.mark.parametrize("threat", THREATS, ids=str)
def test_random_starts_do_not_depend_on_the_batch(threat: ThreatModel) -> None:
    """Per-sample starts: batch size 7 or 200, or two halves attacked apart with their
    sample ids, give the same perturbations (float64, so batching cannot round apart)."""
    encoder, x = _fixture("mlp", n=30)
    encoder, x = encoder.double(), x.double()
    model = _head_model(encoder, x, 4).double()
    with torch.no_grad():
        y = model(x).argmax(dim=1)

    def representation(rows: slice, batch_size: int) -> Tensor:
        ids = torch.arange(30)[rows]
        kwargs = {"steps": 4, "restarts": 2, "seed": SEED, "batch_size": batch_size}
        return attack_representation(encoder, x[rows], threat, sample_ids=ids, **kwargs).x_adv

    def classifier(rows: slice, batch_size: int) -> Tensor:
        ids = torch.arange(30)[rows]
        kwargs = {"steps": 3, "restarts": 3, "seed": SEED, "batch_size": batch_size}
        return attack_classifier(model, x[rows], y[rows], threat, sample_ids=ids, **kwargs).x_adv

    for attack in (representation, classifier):
        whole = attack(slice(0, 30), 200)
        assert torch.allclose(attack(slice(0, 30), 7), whole, atol=1e-10)
        halves = torch.cat([attack(slice(0, 15), 200), attack(slice(15, 30), 4)])
        assert torch.allclose(halves, whole, atol=1e-10)
    other_seed = attack_representation(encoder, x, threat, steps=4, seed=SEED + 1).x_adv
    assert not torch.allclose(other_seed, representation(slice(0, 30), 200))


def test_sample_ids_are_checked() -> None:
    encoder, x = _fixture("mlp", n=4)
    threat = THREATS[0]
    with pytest.raises(ValueError, match="must not repeat"):
        attack_representation(encoder, x, threat, sample_ids=torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        attack_representation(encoder, x, threat, sample_ids=torch.arange(3))
    with pytest.raises(TypeError, match="integer"):
        attack_representation(encoder, x, threat, sample_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="seed"):
        attack_representation(encoder, x, threat, seed=-1)


class _Broken:
    """A certifier whose bound is of the wrong shape: a bug the registry must catch."""

    name = "broken-for-test"

    def certify(self, encoder: nn.Module, x: Tensor, threat: ThreatModel) -> Tensor:
        return torch.ones(len(x) + 1)


def test_a_certifier_bound_is_checked_and_registration_is_guarded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoder, x = _fixture("linear", n=4)
    # Registered for this test only: the registry is global.
    monkeypatch.setitem(certify_base._REGISTRY, _Broken.name, _Broken())
    with pytest.raises(ValueError, match=r"certifier 'broken-for-test'.* shape"):
        certify_all(encoder, x, THREATS[1], ["broken-for-test"])
    with pytest.raises(ValueError, match="already registered"):
        register_certifier(_Broken())
    with pytest.raises(ValueError, match="unknown certifier 'nope'"):
        certify_all(encoder, x, THREATS[1], ["nope"])


def test_runtime_is_checked() -> None:
    assert Runtime.detect("cpu").to_dict() == {
        "device": "cpu",
        "precision": "fp32",
        "compile": False,
        "rank": 0,
        "world_size": 1,
    }
    with pytest.raises(ValueError, match="rank must lie"):
        Runtime(torch.device("cpu"), rank=2, world_size=2)
    with pytest.raises(TypeError, match="rank must be an integer"):
        Runtime(torch.device("cpu"), rank=1.5, world_size=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown device"):
        Runtime.detect("tpu:0")


def test_feature_extraction_checks_every_input_once_by_either_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch.utils.data import TensorDataset

    from robust_transfer import extract_features
    from robust_transfer.core.errors import InputError
    from robust_transfer.models import features

    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(10, 3, 2, 2)
    labels = torch.zeros(10, dtype=torch.long)
    checked: list[int] = []
    check = features.check_images

    def counting(value: object, name: str = "x") -> Tensor:
        checked.append(len(value))  # type: ignore[arg-type]
        return check(value, name)

    monkeypatch.setattr(features, "check_images", counting)
    by_tensor = extract_features(encoder, x, batch_size=4)
    assert checked == [10]  # the whole tensor, once
    by_dataset = extract_features(encoder, TensorDataset(x, labels), batch_size=4)
    assert checked == [10, 4, 4, 2]  # then each batch of the data set as it comes
    assert torch.equal(by_tensor, by_dataset)
    for bad, match in ((float("nan"), "NaN"), (1.5, r"\[0, 1\]")):
        broken = x.clone()
        broken[9, 0, 0, 0] = bad  # in the last batch only
        with pytest.raises(InputError, match=match):
            extract_features(encoder, broken, batch_size=4)
        with pytest.raises(InputError, match=match):
            extract_features(encoder, TensorDataset(broken, labels), batch_size=4)
