"""Encoders, the 1-Lipschitz guarantee, and checkpoints."""

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from robust_transfer import ThreatModel, attack_representation
from robust_transfer.models import (
    ARCHITECTURES,
    AOLConv2d,
    AOLLinear,
    CheckpointError,
    Classifier,
    LipschitzCNN,
    SLLConv2d,
    SLLNet,
    SmallCNN,
    build_encoder,
    load_checkpoint,
    load_encoder,
    save_checkpoint,
)

SHAPES = {
    "small-cnn": (1, 28, 28),
    "lipschitz-cnn": (1, 28, 28),
    "lipschitz-sll": (1, 12, 12),
    "resnet18": (3, 32, 32),
}
# lipschitz-sll keeps every (padded) input dimension.
FEATURES = {"lipschitz-sll": 144}


def tiny_factory(width: int = 4) -> nn.Module:
    """Used through the 'module:factory' spec by the tests."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, width))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shapes_config_round_trip_and_stages(arch: str) -> None:
    torch.manual_seed(0)
    dim = FEATURES.get(arch, 16)
    encoder = build_encoder(arch, image_shape=SHAPES[arch], feature_dim=dim).eval()
    x = torch.rand(3, *SHAPES[arch])
    features = encoder(x)
    assert features.shape == (3, dim)
    rebuilt = build_encoder(arch, **encoder.config()).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    assert torch.equal(rebuilt(x), features)
    staged = {id(p) for stage in encoder.stages() for p in stage.parameters()}
    assert staged == {id(p) for p in encoder.parameters()}
    with pytest.raises(ValueError, match="expects inputs of shape"):
        encoder(torch.rand(3, 2, 28, 28))


def test_small_cnn_reads_64_pixel_images() -> None:
    assert SmallCNN(image_shape=(1, 64, 64))(torch.rand(2, 1, 64, 64)).shape == (2, 64)
    assert LipschitzCNN(image_shape=(1, 30, 30))(torch.rand(2, 1, 30, 30)).shape == (2, 64)


def _operator_norm(layer: nn.Module, shape: tuple[int, ...]) -> float:
    """The exact l2 operator norm of a (linear part of a) layer, from its explicit matrix."""
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n).view(n, *shape)
    with torch.no_grad():
        zero = layer(torch.zeros(1, *shape))
        matrix = (layer(basis) - zero).flatten(1)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def test_aol_layers_have_operator_norm_at_most_one() -> None:
    torch.manual_seed(0)
    for _ in range(3):
        conv = AOLConv2d(3, 5)
        with torch.no_grad():
            conv.weight.mul_(torch.rand_like(conv.weight) * 4)
        assert _operator_norm(conv, (3, 6, 6)) <= 1.0 + 1e-5
        linear = AOLLinear(20, 7)
        assert _operator_norm(linear, (20,)) <= 1.0 + 1e-5
    # The bound is not vacuous: the layers keep a sizeable part of their input.
    assert _operator_norm(AOLLinear(20, 7), (20,)) > 0.3


def test_sll_layer_is_one_lipschitz_and_the_identity_with_its_branch_off() -> None:
    """Exact Jacobians (autograd) at random points of random layers never exceed norm 1;
    with every branch unit off the layer is the identity, so the bound is attained."""
    torch.manual_seed(0)
    for _ in range(3):
        layer = SLLConv2d(2, 6)
        with torch.no_grad():
            layer.weight.mul_(torch.rand_like(layer.weight) * 4)
            layer.bias.normal_(0.0, 1.0)
        for _ in range(5):
            x = torch.randn(2, 5, 5)
            jacobian = torch.autograd.functional.jacobian(layer, x[None])
            assert float(torch.linalg.matrix_norm(jacobian.reshape(50, 50), 2)) <= 1 + 1e-5
    with torch.no_grad():
        layer.bias.fill_(-1e3)
        x = torch.rand(4, 2, 5, 5)
        assert torch.equal(layer(x), x)


def test_sll_net_keeps_every_input_dimension() -> None:
    encoder = SLLNet(image_shape=(1, 10, 10))
    assert encoder.feature_dim == 16 * 3 * 3  # padded to 12 x 12
    assert encoder(torch.rand(2, 1, 10, 10)).shape == (2, 144)
    with pytest.raises(ValueError, match="feature_dim must be 144"):
        SLLNet(image_shape=(1, 10, 10), feature_dim=64)
    with pytest.raises(ValueError, match="depth"):
        SLLNet(depth=0)


def _lipschitz_encoder(cls: type[LipschitzCNN | SLLNet]) -> nn.Module:
    return SLLNet() if cls is SLLNet else LipschitzCNN(feature_dim=16)


def _trained_lipschitz(cls: type[LipschitzCNN | SLLNet] = LipschitzCNN) -> nn.Module:
    torch.manual_seed(1)
    encoder = _lipschitz_encoder(cls)
    model = Classifier(encoder, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 3, (64,))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return encoder.eval()


@pytest.mark.parametrize("cls", [LipschitzCNN, SLLNet])
@pytest.mark.parametrize("trained", [False, True])
def test_lipschitz_encoder_never_exceeds_its_constant(
    trained: bool, cls: type[LipschitzCNN | SLLNet]
) -> None:
    torch.manual_seed(2)
    encoder = _trained_lipschitz(cls) if trained else _lipschitz_encoder(cls).eval()
    constant = encoder.lipschitz_l2
    x, other = torch.rand(200, 1, 28, 28), torch.rand(200, 1, 28, 28)
    with torch.no_grad():
        ratio = (encoder(x) - encoder(other)).norm(dim=1) / (x - other).flatten(1).norm(dim=1)
    assert (ratio <= constant * (1 + 1e-5)).all()
    threat = ThreatModel("L2", 0.5)
    attacked = attack_representation(encoder, x[:32], threat, steps=30, seed=0)
    assert (attacked.shift <= constant * threat.eps * (1 + 1e-5)).all()
    with torch.no_grad():
        random = (encoder(threat.random_start(x[:32])) - encoder(x[:32])).norm(dim=1)
    # Not vacuous: the attack moves the features much further than random noise does, or,
    # on the SLL network (near the identity, so noise moves them almost as far), nearly
    # as far as the constant allows.
    if cls is SLLNet:
        assert attacked.shift.mean() > 0.85 * constant * threat.eps
        assert attacked.shift.mean() > random.mean()
    else:
        assert attacked.shift.mean() > 2 * random.mean()


def test_checkpoint_round_trip_and_sidecar(tmp_path: Path) -> None:
    encoder = LipschitzCNN(feature_dim=8).eval()
    path = tmp_path / "enc.safetensors"
    save_checkpoint(path, encoder, {"protocol": "lipschitz", "seed": 3})
    loaded, sidecar = load_checkpoint(path, arch="lipschitz-cnn")
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), encoder(x))
    assert sidecar["lipschitz_l2"] == 1.0
    assert sidecar["metadata"] == {"protocol": "lipschitz", "seed": 3}
    assert set(sidecar["versions"]) >= {"torch", "robust_transfer"}  # type: ignore[arg-type]
    assert not list(tmp_path.glob("*.tmp"))
    assert isinstance(load_encoder(str(path)), LipschitzCNN)


def test_damaged_checkpoints_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "enc.safetensors"
    save_checkpoint(path, SmallCNN(feature_dim=8), {})
    with pytest.raises(CheckpointError, match="'small-cnn' encoder, expected 'resnet18'"):
        load_checkpoint(path, arch="resnet18")
    payload = bytearray(path.read_bytes())
    payload[-20] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)
    path.write_bytes(bytes(payload[: len(payload) // 2]))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)
    sidecar = path.with_suffix(".json")
    sidecar.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable sidecar"):
        load_checkpoint(path)
    sidecar.unlink()
    with pytest.raises(CheckpointError, match=r"sidecar enc\.json is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_sidecar_config_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "enc.safetensors"
    save_checkpoint(path, SmallCNN(feature_dim=8), {})
    sidecar = json.loads(path.with_suffix(".json").read_text())
    sidecar["config"]["feature_dim"] = 9
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(
        CheckpointError, match=r"do not fit the SmallCNN architecture: 2 of another shape"
    ):
        load_checkpoint(path)
    # A sidecar naming another architecture: one line that counts the mismatches.
    sidecar["config"]["feature_dim"], sidecar["arch"] = 8, "lipschitz-cnn"
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    assert "LipschitzCNN architecture" in message
    assert re.search(r"\d+ weights missing \(.*\); .*; \d+ not in the model", message)


def nan_factory() -> nn.Module:
    model = tiny_factory(width=3)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    return model


def test_encoders_with_nan_weights_are_refused() -> None:
    with pytest.raises(CheckpointError, match="NaN or infinite weights in 1 tensors"):
        load_encoder("test_models:nan_factory")


def test_load_encoder_specs() -> None:
    model = load_encoder("test_models:tiny_factory", width=5)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 5)
    with pytest.raises(ValueError, match="cannot import"):
        load_encoder("no_such_module_xyz:make")
    with pytest.raises(ValueError, match="no callable 'nonexistent'"):
        load_encoder("os:nonexistent")
    with pytest.raises(ValueError, match=r"expected a \.safetensors"):
        load_encoder("no_colon")
    with pytest.raises(ValueError, match=r"refused: getcwd is neither an nn\.Module class"):
        load_encoder("os:getcwd")
    with pytest.raises(TypeError, match="returned str"):
        load_encoder("os:getcwd", trust_code=True)


def unannotated_factory(width=4):  # type: ignore[no-untyped-def]
    """A factory that says nothing of what it returns."""
    return tiny_factory(width)


def lying_factory(command: str = "") -> nn.Module:
    """Annotated to build a module: called, so the annotation is all that guards it."""
    return tiny_factory()


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        ("os:system", {"command": "touch {marker}"}),
        ("subprocess:call", {"args": ["touch", "{marker}"]}),
        ("builtins:exec", {"source": "open('{marker}', 'w')"}),
        ("pathlib:Path", {}),
        ("test_models:unannotated_factory", {}),
        ("functools:partial", {}),
    ],
)
def test_factories_that_could_run_anything_are_refused(
    spec: str, options: dict[str, object], tmp_path: Path
) -> None:
    """A shared config's factory runs only when it can be seen to build a module: a
    payload never runs, and the same spec loads once the user vouches for it."""
    marker = tmp_path / "ran"
    given = {
        key: [str(v).format(marker=marker) for v in value]
        if isinstance(value, list)
        else str(value).format(marker=marker)
        for key, value in options.items()
    }
    with pytest.raises(ValueError, match=r"refused: .* trust_code=True"):
        load_encoder(spec, **given)
    assert not marker.exists()


def test_factories_that_build_modules_need_no_trust() -> None:
    assert isinstance(load_encoder("torch.nn:Flatten"), nn.Flatten)
    assert load_encoder("test_models:unannotated_factory", trust_code=True)(
        torch.rand(2, 1, 28, 28)
    ).shape == (2, 4)
    with pytest.raises(ValueError, match="an absolute module path"):
        load_encoder(".models:SmallCNN")
    with pytest.raises(ValueError, match="an absolute module path"):
        load_encoder("os:path.join")


def test_bad_architecture_arguments() -> None:
    with pytest.raises(ValueError, match="unknown encoder architecture 'vit'"):
        build_encoder("vit")
    with pytest.raises(ValueError, match="image_shape"):
        SmallCNN(image_shape=(28, 28))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="feature_dim"):
        SmallCNN(feature_dim=0)
    with pytest.raises(ValueError, match="bad arguments"):
        build_encoder("small-cnn", depth=3)


def pickle_factory(path: str = "") -> nn.Module:
    """Annotated to build a module, and loads whatever file a config names with a full
    unpickling, as some zoo functions do with their own options."""
    model = tiny_factory()
    if path:
        torch.load(path, weights_only=False)
    return model


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_factory_cannot_unpickle_code_a_config_names(tmp_path: Path) -> None:
    """Every torch.load under an encoder's loading is weights-only unless the user trusts
    the checkpoints: the payload runs only with trust_checkpoint."""
    marker, weights = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"w": _Payload(marker)}, weights)
    with pytest.raises(ValueError, match="refused: it is a pickle that needs code execution"):
        load_encoder("test_models:pickle_factory", path=str(weights))
    assert not marker.exists()
    load_encoder("test_models:pickle_factory", path=str(weights), trust_checkpoint=True)
    assert marker.exists()


def test_random_weights_come_from_the_seed_and_leave_the_caller_generator_alone() -> None:
    # A factory's random weights are the same in every run and every process of a run
    # (torchrun ranks build their encoders apart), and differ between seeds.
    from robust_transfer.models import load_encoder

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_encoder("robust_transfer.models:SmallCNN", seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    second = load_encoder("robust_transfer.models:SmallCNN", seed=5)
    other = load_encoder("robust_transfer.models:SmallCNN", seed=6)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not all(
        torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters(), strict=True)
    )
