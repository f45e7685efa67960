"""The layer-wise Lipschitz and IBP certifiers against independent computations: explicit
Jacobian matrices and their SVD, closed forms for affine maps, and many sampled points."""

import pytest
import torch
from test_contracts import ENCODERS
from torch import Tensor, nn

from robust_transfer import ThreatModel, attack_representation
from robust_transfer.certify import Refusal, get_certifier
from robust_transfer.certify.layers import decompose
from robust_transfer.certify.ops import Residual, chain_interval, chain_lipschitz, run
from robust_transfer.models import LipschitzCNN, ResNet18, SmallCNN
from robust_transfer.models.encoders import _BasicBlock
from robust_transfer.models.lipschitz import MaxMin


def _jacobian_norm(module: nn.Module, x: Tensor) -> float:
    """The exact l2 norm of a linear module's matrix, from its explicit Jacobian."""
    jacobian = torch.autograd.functional.jacobian(lambda t: module(t).flatten(), x)
    return float(torch.linalg.matrix_norm(jacobian.reshape(jacobian.shape[0], -1).double(), 2))


def _layer_bound(module: nn.Module, x: Tensor) -> float:
    net = decompose(nn.Sequential(module).eval(), x)
    assert not isinstance(net, Refusal)
    return chain_lipschitz(net.ops, tuple(x.shape[1:]))


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Conv2d(3, 2, 5, padding=0),
        nn.Conv2d(2, 2, 1, stride=2, bias=False),
        nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=1),
        nn.AdaptiveAvgPool2d(1),
    ],
    ids=str,
)
def test_linear_layer_norms_bound_the_exact_norm(module: nn.Module) -> None:
    torch.manual_seed(0)
    channels = module.in_channels if isinstance(module, nn.Conv2d) else 2
    x = torch.rand(1, channels, 7, 7)
    exact = _jacobian_norm(module, x)
    bound = _layer_bound(module, x)
    assert exact <= bound * (1 + 1e-6)
    assert bound <= 2.5 * exact  # a bound, but not a vacuous one


def test_affine_encoder_is_certified_exactly() -> None:
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(20, 6)).eval()
    x = 0.3 + 0.4 * torch.rand(16, 20)
    threat = ThreatModel("L2", 0.05)
    bound = get_certifier("lipschitz").certify(encoder, x, threat)
    assert not isinstance(bound, Refusal)
    sigma = float(torch.linalg.matrix_norm(encoder[1].weight.detach(), ord=2))
    assert torch.allclose(bound, torch.full((16,), sigma * threat.eps), rtol=1e-4)
    attacked = attack_representation(encoder, x, threat, steps=100, restarts=2)
    assert (attacked.shift >= 0.99 * bound).all()
    # IBP of an affine map under Linf, the box inside [0, 1]: eps times the rows' l1 norms.
    linf = ThreatModel("Linf", 0.01)
    ibp = get_certifier("ibp").certify(encoder, x, linf)
    assert not isinstance(ibp, Refusal)
    exact = (linf.eps * encoder[1].weight.detach().abs().sum(dim=1)).norm()
    assert torch.allclose(ibp, exact.expand(16), rtol=3e-4)
    assert (ibp >= exact).all()


def test_lipschitz_cnn_constant_uses_the_actual_layer_norms() -> None:
    """Below the stated 1 (AOL layers' actual norms), and above every local Jacobian norm
    found by power iteration at sampled points (an independent lower bound on L)."""
    torch.manual_seed(2)
    encoder = LipschitzCNN(image_shape=(1, 12, 12), feature_dim=8).eval()
    x = torch.rand(4, 1, 12, 12)
    net = decompose(encoder, x)
    assert not isinstance(net, Refusal)
    constant = chain_lipschitz(net.ops, (1, 12, 12))
    assert constant < 1.0
    for point in x:
        jacobian = torch.autograd.functional.jacobian(
            lambda t: encoder(t[None]).flatten(), point
        ).reshape(8, -1)
        assert float(torch.linalg.matrix_norm(jacobian, 2)) <= constant * (1 + 1e-5)
    bound = get_certifier("lipschitz").certify(encoder, x, ThreatModel("L2", 0.5))
    assert not isinstance(bound, Refusal)
    assert float(bound[0]) == pytest.approx(0.5 * constant, rel=1e-4)


def test_sll_net_constant_is_its_proven_one_not_the_triangle_inequality() -> None:
    """Each SLL block is 1-Lipschitz by construction; the triangle inequality over its
    branch and shortcut gives more than 1. The bound is attained: an SLL network whose
    branches are off is the identity, and the attack finds its full eps."""
    torch.manual_seed(2)
    encoder, shape = ENCODERS["lipschitz-sll"][0](), (1, 12, 12)
    x = torch.rand(4, *shape)
    net = decompose(encoder, x)
    assert not isinstance(net, Refusal)
    blocks = [op for op in net.ops if isinstance(op, Residual)]
    assert len(blocks) == 4
    assert chain_lipschitz(net.ops, shape) == pytest.approx(1.0)
    assert chain_lipschitz(blocks[0].body, (4, 6, 6)) + 1.0 > 1.5
    threat = ThreatModel("L2", 0.3)
    bound = get_certifier("lipschitz").certify(encoder, x, threat)
    assert not isinstance(bound, Refusal)
    assert torch.allclose(bound, torch.full((4,), 0.3), rtol=1e-4)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith("bias"):
                parameter.fill_(-1e3)
    x = 0.3 + 0.4 * x  # the ball stays inside the box
    attacked = attack_representation(encoder, x, threat, steps=20)
    assert (attacked.shift >= 0.999 * 0.3).all()


def test_distance_ratio_is_exact_for_scaled_isometries() -> None:
    """An orthogonal map keeps every distance (ratio 1), a scaled one keeps ``c``; a
    non-linear 1-Lipschitz encoder keeps at most its constant."""
    from robust_transfer.core.errors import InputError
    from robust_transfer.models.features import distance_ratio

    torch.manual_seed(3)
    x = torch.rand(40, 1, 6, 6)
    x[1] = x[0]  # a repeated input: no pair of it counts
    orthogonal = torch.linalg.qr(torch.randn(36, 36))[0]
    features = x.flatten(1) @ orthogonal.T
    assert distance_ratio(x, features) == pytest.approx(1.0, rel=1e-6)  # float32 map
    assert distance_ratio(x, 0.3 * features) == pytest.approx(0.3, rel=1e-6)
    encoder = ENCODERS["lipschitz-sll"][0]()
    x = torch.rand(40, 1, 12, 12)
    with torch.no_grad():
        assert 0.0 < distance_ratio(x, encoder(x)) <= 1.0
    with pytest.raises(InputError, match="one feature row per input"):
        distance_ratio(x, encoder(x[:3]))
    with pytest.raises(InputError, match="two distinct inputs"):
        distance_ratio(x[:1].expand(4, -1, -1, -1), torch.rand(4, 5))


def _pooling_cnn() -> nn.Module:
    torch.manual_seed(3)
    return ENCODERS["cnn-pooling"][0]()


@pytest.mark.parametrize(
    "build",
    [
        _pooling_cnn,
        lambda: SmallCNN(image_shape=(1, 12, 12), feature_dim=8),
        lambda: LipschitzCNN(image_shape=(1, 12, 12), feature_dim=8),
        ENCODERS["lipschitz-sll"][0],
    ],
    ids=["pooling-cnn", "small-cnn", "lipschitz-cnn", "lipschitz-sll"],
)
def test_ibp_intervals_hold_every_sampled_point(build: object) -> None:
    """2000 random points of the box per input never leave the propagated interval."""
    torch.manual_seed(4)
    encoder = build().eval()  # type: ignore[operator]
    x = torch.rand(3, 1, 12, 12)
    eps = 0.05
    net = decompose(encoder, x)
    assert not isinstance(net, Refusal)
    lower, upper = chain_interval(net.ops, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    for i in range(len(x)):
        delta = (torch.rand(2000, *x.shape[1:]) * 2 - 1) * eps
        with torch.no_grad():
            features = encoder((x[i] + delta).clamp(0, 1)).flatten(1)
        assert (features >= lower[i] - 1e-5).all()
        assert (features <= upper[i] + 1e-5).all()


def test_resnet_decomposes_and_is_certified() -> None:
    torch.manual_seed(5)
    encoder = ResNet18(image_shape=(3, 8, 8), feature_dim=4).eval()
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 8, 8)
    net = decompose(encoder, x)
    assert not isinstance(net, Refusal)
    with torch.no_grad():
        assert torch.allclose(run(net.ops, x), encoder(x), atol=1e-5)
    threat = ThreatModel("Linf", 1 / 255)
    for method in ("lipschitz", "ibp"):
        bound = get_certifier(method).certify(encoder, x, threat)
        assert not isinstance(bound, Refusal)
        attacked = attack_representation(encoder, x, threat, steps=10, restarts=2)
        assert (attacked.shift <= bound).all()


class _Gelu(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(x)


class _Skip(nn.Module):
    """A residual block of readable layers, unreadable as a whole."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)


class _Wrapped(nn.Module):
    """A model wrapped as zoo encoders are: its own forward, layers inside."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4), _Skip(), _Gelu())

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def test_unsupported_layers_and_modes_are_refused_by_name() -> None:
    x = torch.rand(2, 1, 6, 6)
    refused = decompose(nn.Sequential(nn.Flatten(), nn.Linear(36, 4), _Gelu()), x)
    assert isinstance(refused, Refusal)
    assert "unsupported layer _Gelu" in refused.reason
    # A wrapper names the first layer inside that has no reader, and where it sits.
    refused = decompose(_Wrapped(), x)
    assert isinstance(refused, Refusal)
    assert refused.reason == "unsupported layer _Wrapped: its _Skip at 'model.2' has no reader"
    train_mode = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    refused = decompose(train_mode, x)
    assert isinstance(refused, Refusal)
    assert "eval mode" in refused.reason
    outcome = get_certifier("ibp").certify(
        nn.Sequential(nn.Flatten(), _Gelu()), x, ThreatModel("L2", 0.1)
    )
    assert isinstance(outcome, Refusal)


def _grid_extremes(encoder: nn.Module, x: Tensor, eps: float, steps: int = 201) -> Tensor:
    """Per feature, the largest deviation from f(x) over a dense grid of the 2-D box."""
    axis = torch.linspace(-eps, eps, steps)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        features = encoder((x + grid).clamp(0, 1))
        return (features - encoder(x)).abs().amax(dim=0)


def _holds_the_grid(method: str, encoder: nn.Module, x: Tensor, threat: ThreatModel) -> Tensor:
    """``method``'s bounds, each checked to hold its point's grid extremes."""
    bound = get_certifier(method).certify(encoder, x, threat)
    assert not isinstance(bound, Refusal)
    for i in range(len(x)):
        worst = _grid_extremes(encoder, x[i : i + 1], threat.eps)
        assert float(worst.norm()) <= float(bound[i])
    return bound


def test_crown_contains_a_dense_grid_and_beats_ibp_on_a_small_relu_network() -> None:
    """An independent oracle: a 2-input ReLU network evaluated on a 201 x 201 grid of the
    Linf box. CROWN's per-sample bound must hold the grid's worst deviation, and with
    these three hidden layers it must be tighter than IBP."""
    torch.manual_seed(6)
    encoder = nn.Sequential(
        nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()
    threat = ThreatModel("Linf", 0.1)
    x = torch.tensor([[0.5, 0.5], [0.3, 0.7], [0.05, 0.9]])
    crown = _holds_the_grid("crown", encoder, x, threat)
    ibp = get_certifier("ibp").certify(encoder, x, threat)
    assert not isinstance(ibp, Refusal)
    assert (crown < ibp).all()


@pytest.mark.parametrize("activation", [nn.ReLU, MaxMin], ids=["relu", "maxmin"])
def test_crown_intermediate_bounds_contain_the_grid_and_tighten_crown(activation: type) -> None:
    """``crown-full`` (CROWN's own intermediate bounds) against the same grid oracle: it
    must hold the grid's worst deviation, never be looser than ``crown`` with IBP
    intermediate bounds, and be tighter somewhere on a network three layers deep."""
    torch.manual_seed(16)
    encoder = nn.Sequential(
        nn.Linear(2, 16),
        activation(),
        nn.Linear(16, 16),
        activation(),
        nn.Linear(16, 16),
        activation(),
        nn.Linear(16, 4),
    ).eval()
    threat = ThreatModel("Linf", 0.1)
    x = torch.tensor([[0.5, 0.5], [0.3, 0.7], [0.05, 0.9], [0.95, 0.02]])
    full = _holds_the_grid("crown-full", encoder, x, threat)
    crown = get_certifier("crown").certify(encoder, x, threat)
    assert not isinstance(crown, Refusal)
    assert (full <= crown * (1 + 1e-6)).all()
    assert (full < 0.9 * crown).any()


def test_crown_intermediate_bounds_are_never_looser_and_read_any_memory_layout() -> None:
    """CROWN's adaptive slopes are not monotone in the intermediate bounds (on this
    network tighter ones once loosened a margin bound by 0.003): ``crown-full`` keeps the
    better of both, for shifts and margins. A channels_last model gives the same bound."""
    from robust_transfer.certify import margin_lower_bounds

    torch.manual_seed(5)
    encoder = nn.Sequential(
        nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 5)
    ).eval()
    head = nn.Linear(5, 3).eval()
    x = torch.rand(4, 3) * 0.8 + 0.1
    threat = ThreatModel("Linf", 0.1)
    plain = margin_lower_bounds(encoder, head, x, threat)
    full = margin_lower_bounds(encoder, head, x, threat, intermediate="crown")
    assert not isinstance(plain, Refusal)
    assert not isinstance(full, Refusal)
    finite = torch.isfinite(plain)
    assert (full[finite] >= plain[finite]).all()

    conv = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).eval()
    images = torch.rand(2, 2, 8, 8)
    contiguous = get_certifier("crown-full").certify(conv, images, threat)
    conv = conv.to(memory_format=torch.channels_last)
    last = images.to(memory_format=torch.channels_last)
    channels_last = get_certifier("crown-full").certify(conv, last, threat)
    assert not isinstance(contiguous, Refusal)
    assert not isinstance(channels_last, Refusal)
    assert torch.allclose(contiguous, channels_last, rtol=1e-4)


def test_crown_ibp_margins_hold_the_grid_and_carry_gradients() -> None:
    """CROWN-IBP's bounds on ``z_j - z_y`` (certified training's) against the grid
    oracle of a 2-input network, 0 at the label, tighter than IBP's on a deep one, and
    differentiable in every parameter."""
    from robust_transfer.certify.crown import crown_ibp_margins
    from robust_transfer.certify.layers import FLATTEN, ops_of
    from robust_transfer.models.encoders import Classifier
    from robust_transfer.training.objectives import ibp_margins

    torch.manual_seed(19)
    encoder = nn.Sequential(
        nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6)
    )
    encoder.feature_dim = 6
    model = Classifier(encoder, 3)
    x = torch.tensor([[0.5, 0.5], [0.3, 0.7], [0.05, 0.9]])
    y = torch.tensor([0, 1, 2])
    threat = ThreatModel("Linf", 0.1)
    ops = ops_of(encoder)
    assert not isinstance(ops, Refusal)
    bound = crown_ibp_margins([*ops, FLATTEN], model.head, x, y, threat)
    axis = torch.linspace(-threat.eps, threat.eps, 101)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        for i in range(len(x)):
            logits = model.head(encoder((x[i] + grid).clamp(0, 1)))
            worst = (logits - logits[:, y[i], None]).amax(dim=0)
            assert (worst <= bound[i] + 1e-5).all()
            assert float(bound[i, y[i]]) == 0.0
    ibp = ibp_margins([*ops, FLATTEN], model.head, x, y, threat.eps)
    assert (bound.sum(dim=1) < ibp.sum(dim=1)).all()
    (bound * torch.rand(bound.shape)).sum().backward()
    for parameter in model.parameters():
        assert parameter.grad is not None
        assert bool(parameter.grad.abs().sum() > 0)
    # Through a flatten (an op without its own transpose): the gradient of the layer after
    # it against central differences, in float64.
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)).double()
    conv.feature_dim = 4
    model = Classifier(conv, 3).double()
    images, labels = torch.rand(2, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 2])
    weights = torch.rand(2, 3, dtype=torch.float64)
    ops = ops_of(conv)
    assert not isinstance(ops, Refusal)

    def objective() -> Tensor:
        bound = crown_ibp_margins([*ops, FLATTEN], model.head, images, labels, threat)
        return (bound * weights).sum()

    objective().backward()
    layer = conv[3].weight
    assert layer.grad is not None
    for index in [(0, 0), (1, 17), (3, 40)]:
        with torch.no_grad():
            layer[index] += 1e-6
            up = objective()
            layer[index] -= 2e-6
            down = objective()
            layer[index] += 1e-6
        assert float(layer.grad[index]) == pytest.approx(float(up - down) / 2e-6, abs=1e-5)


@pytest.mark.parametrize("side", [7, 8])
def test_the_transposed_convolution_is_autograd_s_vector_jacobian_product(side: int) -> None:
    """CROWN's backward pass through a convolution (a transposed convolution, padded to
    the input's size) against autograd's, on strides and sizes that leave input rows
    outside every window."""
    torch.manual_seed(17)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.rand(1, 3, side, side)
    net = decompose(nn.Sequential(conv).eval(), x)
    assert not isinstance(net, Refusal)
    op = net.ops[0]
    assert op.transpose is not None
    rows = torch.randn(4, *conv(x).shape[1:])
    point = x.expand(4, -1, -1, -1).clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(conv(point), point, grad_outputs=rows)
    assert torch.allclose(op.transpose(rows, x.shape[1:]), expected, atol=1e-5)


def _holds_attacks_and_samples(
    encoder: nn.Module, x: Tensor, threat: ThreatModel, bound: Tensor
) -> None:
    """No attacked shift and none of 500 sampled points per input exceeds ``bound``."""
    attacked = attack_representation(encoder, x, threat, steps=20, restarts=2)
    assert (attacked.shift <= bound).all()
    for i in range(len(x)):
        delta = (torch.rand(500, *x.shape[1:]) * 2 - 1) * threat.eps
        with torch.no_grad():
            shifts = (encoder((x[i] + delta).clamp(0, 1)) - encoder(x[i : i + 1])).norm(dim=1)
        assert (shifts <= bound[i]).all()


def test_crown_intermediate_bounds_are_sound_on_the_lipschitz_cnn_and_residual_blocks() -> None:
    torch.manual_seed(18)
    residual = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        _BasicBlock(4, 8, 2),
        _BasicBlock(8, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for encoder, shape in (
        (LipschitzCNN(image_shape=(1, 8, 8), feature_dim=6).eval(), (1, 8, 8)),
        (residual.eval(), (3, 8, 8)),
        (ENCODERS["lipschitz-sll"][0](), (1, 12, 12)),
    ):
        x = torch.rand(2, *shape)
        threat = ThreatModel("Linf", 2 / 255)
        full = get_certifier("crown-full").certify(encoder, x, threat)
        crown = get_certifier("crown").certify(encoder, x, threat)
        assert not isinstance(full, Refusal)
        assert not isinstance(crown, Refusal)
        assert (full <= crown * (1 + 1e-6)).all()
        _holds_attacks_and_samples(encoder, x, threat, full)


def test_crown_is_exact_for_an_affine_encoder() -> None:
    torch.manual_seed(7)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    x = 0.3 + 0.4 * torch.rand(6, 12)
    weight = encoder[1].weight.detach()
    linf = get_certifier("crown").certify(encoder, x, ThreatModel("Linf", 0.02))
    assert not isinstance(linf, Refusal)
    exact = (0.02 * weight.abs().sum(dim=1)).norm()
    assert torch.allclose(linf, exact.expand(6), rtol=3e-4)
    # Under L2 each feature's bound is eps ||w_j||_2: exact per feature.
    l2 = get_certifier("crown").certify(encoder, x, ThreatModel("L2", 0.05))
    assert not isinstance(l2, Refusal)
    assert torch.allclose(l2, (0.05 * weight.norm(dim=1)).norm().expand(6), rtol=3e-4)


def test_crown_is_sound_on_the_lipschitz_cnn_and_resnet() -> None:
    torch.manual_seed(8)
    for encoder, shape in (
        (LipschitzCNN(image_shape=(1, 8, 8), feature_dim=6).eval(), (1, 8, 8)),
        (ResNet18(image_shape=(3, 8, 8), feature_dim=4).eval(), (3, 8, 8)),
        (ENCODERS["lipschitz-sll"][0](), (1, 12, 12)),
    ):
        x = torch.rand(3, *shape)
        threat = ThreatModel("Linf", 2 / 255)
        bound = get_certifier("crown").certify(encoder, x, threat)
        assert not isinstance(bound, Refusal)
        _holds_attacks_and_samples(encoder, x, threat, bound)
        # Not vacuous: CROWN is tighter than IBP's intervals, which it starts from.
        ibp = get_certifier("ibp").certify(encoder, x, threat)
        assert not isinstance(ibp, Refusal)
        assert (bound <= ibp * (1 + 1e-5)).all()


def test_crown_runs_only_when_named() -> None:
    from robust_transfer.certify import CROWNCertifier, certify_all, default_certifier_names
    from robust_transfer.core.errors import InputError

    assert "crown" not in default_certifier_names()
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.rand(2, 4)
    assert "crown" not in certify_all(encoder, x, ThreatModel("L2", 0.1)).bounds
    assert "crown" in certify_all(encoder, x, ThreatModel("L2", 0.1), ["crown"]).bounds
    assert "crown-full" not in default_certifier_names()
    with pytest.raises(InputError, match="intermediate"):
        CROWNCertifier(intermediate="exact")  # type: ignore[arg-type]


def test_head_specific_margins_are_sound_and_never_looser() -> None:
    """CROWN's margin bounds hold on a dense grid (independent oracle), and the study's
    head-specific certificate contains the task-agnostic one."""
    from robust_transfer.attacks.settings import AttackSettings
    from robust_transfer.certify import margin_lower_bounds
    from robust_transfer.estimates.evaluate import evaluate_classification, measure_shift

    torch.manual_seed(9)
    encoder = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 6)).eval()
    head = nn.Linear(6, 4).eval()
    threat = ThreatModel("Linf", 0.05)
    x = torch.rand(20, 2) * 0.8 + 0.1
    margins = margin_lower_bounds(encoder, head, x, threat)
    full = margin_lower_bounds(encoder, head, x, threat, intermediate="crown")
    assert not isinstance(margins, Refusal)
    assert not isinstance(full, Refusal)
    axis = torch.linspace(-threat.eps, threat.eps, 101)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        predicted = head(encoder(x)).argmax(dim=1)
        for i in range(len(x)):
            logits = head(encoder((x[i] + grid).clamp(0, 1)))
            true_margins = logits[:, predicted[i], None] - logits  # (grid, K)
            others = torch.arange(4) != predicted[i]
            for bound in (margins, full):
                assert (true_margins.amin(dim=0)[others] >= bound[i][others] - 1e-6).all()
                assert torch.isinf(bound[i][predicted[i]])
    finite = torch.isfinite(margins)
    assert (full[finite] >= margins[finite] - 1e-6).all()
    settings = AttackSettings(steps=10, targeted_restarts=3, representation_steps=10)
    y = predicted.clone()
    shift = measure_shift(encoder, x, threat, settings, seed=0)
    arrays = evaluate_classification(encoder, head, x, y, threat, shift, settings, seed=0)
    head_certified = arrays["head_certified_robust"]
    assert not (arrays["certified_robust"] & ~head_certified).any()
    assert not (head_certified & ~arrays["robust_attacked"]).any()
    assert int(head_certified.sum()) > int(arrays["certified_robust"].sum())


class _Softplus2(nn.Module):
    """A user's own layer type: ``2 x + 1``, which no certifier reads until told how."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * x + 1


def test_a_registered_layer_type_is_read_by_every_certifier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from robust_transfer.certify import certify_all, layers, register_layer, scale_op

    monkeypatch.setattr(layers, "_READERS", dict(layers._READERS))
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 8), _Softplus2(), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.rand(12, 6)
    threat = ThreatModel("L2", 0.3)
    methods = ["lipschitz", "ibp", "crown", "crown-full"]
    before = certify_all(encoder, x, threat, methods)
    assert set(before.refused) == set(methods)
    assert all(r.endswith("unsupported layer _Softplus2") for r in before.refused.values())
    # A reader that gets the layer wrong is caught by the check against the encoder.
    register_layer(_Softplus2, lambda m: [scale_op(torch.tensor(1.0), torch.tensor(1.0))])
    wrong = certify_all(encoder, x, threat, methods)
    assert all("does not reproduce" in reason for reason in wrong.refused.values())
    register_layer(_Softplus2, lambda m: [scale_op(torch.tensor(2.0), torch.tensor(1.0))])
    after = certify_all(encoder, x, threat, methods)
    assert after.refused == {}
    # The exact Lipschitz bound: 2 * ||A1|| * ||A2||; every bound holds against PGD.
    norms = [torch.linalg.matrix_norm(m.weight.detach(), ord=2) for m in (encoder[0], encoder[3])]
    constant = float(2 * norms[0] * norms[1])
    assert after.bounds["lipschitz"] == pytest.approx(torch.full((12,), 0.3 * constant), rel=1e-4)
    attacked = attack_representation(encoder, x, threat).shift
    for method in methods:
        assert (after.bounds[method] >= attacked).all(), method
    assert (after.bounds["crown"] <= after.bounds["ibp"] + 1e-6).all()
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_layer(int, lambda m: [])  # type: ignore[arg-type]
