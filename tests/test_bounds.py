import pytest
import torch
import torch.nn.functional as F
from conftest import cnn_encoder, linear_encoder, mlp_encoder, random_head
from torch import nn

from robust_transfer import (
    ThreatModel,
    absolute_error_bound,
    adversarial_cross_entropy_bound,
    attack_classifier,
    attack_representation,
    certified_accuracy,
    class_weight_gap,
    criterion_holds,
    cross_entropy_increase,
    expected_cross_entropy_bound,
    normalized_margin,
    squared_error_bound,
    weight_gap,
)

TOL = 1e-4


def _encoders() -> list[tuple[str, nn.Module, torch.Tensor]]:
    return [
        ("mlp", mlp_encoder(30, 40, 16), torch.rand(96, 30)),
        ("cnn", cnn_encoder(), torch.rand(96, 1, 12, 12)),
    ]


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("index", [0, 1])
def test_loss_bound_chain_on_every_attacked_sample(norm: str, index: int) -> None:
    """Result 1 on random encoders and heads, for every perturbation both attacks produce."""
    name, encoder, x = _encoders()[index]
    dim = 16 if name == "mlp" else 12
    threat = ThreatModel(norm, 0.1 if norm == "Linf" else 1.0)
    for seed, classes, scale in [(0, 5, 1.0), (1, 3, 4.0), (2, 10, 0.3)]:
        head = random_head(dim, classes, seed=seed, scale=scale)
        y = torch.randint(0, classes, (x.shape[0],))
        representation = attack_representation(encoder, x, threat, steps=15, seed=seed)
        classifier = attack_classifier(
            nn.Sequential(encoder, head).eval(), x, y, threat, steps=15, seed=seed
        )
        with torch.no_grad():
            clean = encoder(x)
            perturbed = [representation.features_adv, encoder(classifier.x_adv)]
        for features_adv in perturbed:
            b = cross_entropy_increase(head, clean, features_adv, y)
            assert (b.increase <= b.first_order + TOL).all()
            assert (b.first_order <= b.effective + TOL).all()
            assert (b.effective <= b.label_worst_case + TOL).all()
            assert (b.label_worst_case <= b.worst_case + TOL).all()
            # The per-sample guarantee with the shift of this very perturbation.
            shift = (features_adv - clean).norm(dim=1)
            adv_ce = F.cross_entropy(head(features_adv), y, reduction="none")
            assert (adv_ce <= adversarial_cross_entropy_bound(head, clean, y, shift) + TOL).all()
        # The task-independent shift dominates the classifier attack's movement on
        # average: it searched for exactly that.
        moved = (perturbed[1] - clean).norm(dim=1)
        assert representation.shift.mean() >= moved.mean()


def test_expected_bound_holds_with_certified_shift() -> None:
    matrix = torch.randn(8, 20)
    encoder = linear_encoder(matrix)
    threat = ThreatModel("L2", 0.1)
    x = 0.3 + 0.4 * torch.rand(200, 20)
    head = random_head(8, 4, seed=3)
    y = torch.randint(0, 4, (200,))
    exact = torch.full((200,), threat.eps * float(torch.linalg.matrix_norm(matrix, ord=2)))
    attacked = attack_classifier(
        nn.Sequential(encoder, head).eval(), x, y, threat, steps=30, restarts=2
    )
    with torch.no_grad():
        adv_ce = F.cross_entropy(head(encoder(attacked.x_adv)), y)
        clean = encoder(x)
    bound = expected_cross_entropy_bound(head, clean, y, exact)
    assert adv_ce <= bound
    torch.testing.assert_close(
        bound, F.cross_entropy(head(clean), y).detach() + weight_gap(head) * exact.mean()
    )


def test_certified_points_survive_strong_attacks() -> None:
    """Exact shift of a linear encoder: no point that certify accepts is broken."""
    torch.manual_seed(11)
    matrix = torch.randn(10, 24)
    encoder = linear_encoder(matrix)
    head = random_head(10, 4, seed=4, scale=3.0)
    model = nn.Sequential(encoder, head).eval()
    x = 0.35 + 0.3 * torch.rand(300, 24)
    with torch.no_grad():
        features = encoder(x)
        y = head(features).argmax(dim=1)
    sigma = float(torch.linalg.matrix_norm(matrix, ord=2))
    rho = normalized_margin(head, features)
    # Choose eps so that a fair share of points is certified and many are not.
    eps = min(0.3, float(rho.quantile(0.5)) / sigma)
    threat = ThreatModel("L2", eps)
    shift = torch.full((300,), eps * sigma)
    certified = criterion_holds(head, features, shift)
    assert 0.2 < certified.float().mean() < 0.8
    attacked = attack_classifier(model, x, y, threat, steps=100, restarts=3, loss="targeted")
    assert not (certified & ~attacked.robust).any()
    # Exact robustness of an affine classifier (the ball stays inside the box):
    # margin_j / ||A^T (w_yhat - w_j)||_2 > eps for every j. Certified implies it.
    w = head.weight.detach()
    logits = head(features).detach()
    rows = w[y][:, None, :] - w[None, :, :]
    distances = (rows @ matrix).norm(dim=2)
    gaps = logits.gather(1, y[:, None]) - logits
    exact_radius = torch.where(distances > 0, gaps / distances.clamp_min(1e-12), torch.inf)
    exact_radius = exact_radius.scatter(1, y[:, None], torch.inf).amin(dim=1)
    assert (exact_radius[certified] > eps).all()
    # And the attack finds nearly all exactly non-robust points: the oracle is not vacuous.
    breakable = exact_radius < eps * 0.99
    assert (~attacked.robust[breakable]).float().mean() > 0.95
    assert certified_accuracy(head, features, y, shift) == pytest.approx(
        float(certified.float().mean())
    )


def test_normalized_margin_is_distance_to_boundary() -> None:
    head = random_head(6, 5, seed=2, scale=2.0)
    features = torch.randn(300, 6)
    rho = normalized_margin(head, features)
    logits = head(features).detach()
    predicted = logits.argmax(dim=1)
    w = head.weight.detach()
    # The nearest boundary is reached along w_j - w_yhat for the minimising j.
    ratios = (logits.gather(1, predicted[:, None]) - logits) / (
        w[predicted][:, None, :] - w[None]
    ).norm(dim=2)
    ratios = ratios.scatter(1, predicted[:, None], torch.inf)
    nearest = ratios.argmin(dim=1)
    direction = w[nearest] - w[predicted]
    direction = direction / direction.norm(dim=1, keepdim=True)
    beyond = head(features + (rho * 1.001)[:, None] * direction).argmax(dim=1)
    short = head(features + (rho * 0.999)[:, None] * direction).argmax(dim=1)
    assert (beyond != predicted).all()
    assert (short == predicted).all()
    # No perturbation shorter than rho changes the prediction: random directions.
    for _ in range(20):
        u = torch.randn_like(features)
        u = u / u.norm(dim=1, keepdim=True)
        assert (head(features + (rho * 0.999)[:, None] * u).argmax(dim=1) == predicted).all()


def test_edge_cases_identical_rows_one_class_ties() -> None:
    head = nn.Linear(3, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        head.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    features = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    # Class 1 has class 0's weights and a lower bias: it can never overtake class 0.
    # Only class 2 matters for the first point: gap 3 - 0 = ... (3 - 0) / sqrt(2).
    rho = normalized_margin(head, features)
    torch.testing.assert_close(rho[0], torch.tensor(3.0 / 2**0.5))
    assert torch.isfinite(rho).all()
    assert weight_gap(head) == pytest.approx(2**0.5)
    torch.testing.assert_close(
        class_weight_gap(head, torch.tensor([0, 1])), torch.tensor([2**0.5, 2**0.5])
    )

    # Identical rows and equal biases: a tie nothing can resolve, never certified.
    with torch.no_grad():
        head.bias.zero_()
    tied = normalized_margin(head, torch.tensor([[2.0, 0.0, 0.0]]))
    assert tied.item() == 0.0
    assert not criterion_holds(head, torch.tensor([[2.0, 0.0, 0.0]]), torch.zeros(1)).item()

    # A tie between distinct rows.
    assert normalized_margin(head, torch.tensor([[1.0, 1.0, 0.0]])).item() == 0.0

    # One class: the prediction cannot change and the loss is always zero.
    single = nn.Linear(3, 1)
    assert normalized_margin(single, torch.randn(4, 3)).isinf().all()
    assert weight_gap(single).item() == 0.0
    labels = torch.zeros(4, dtype=torch.long)
    bound = adversarial_cross_entropy_bound(single, torch.randn(4, 3), labels, torch.ones(4))
    torch.testing.assert_close(bound, torch.zeros(4))


@pytest.mark.parametrize("outputs", [1, 3])
def test_regression_bounds(outputs: int) -> None:
    torch.manual_seed(outputs)
    head = nn.Linear(8, outputs)
    features = torch.randn(500, 8)
    targets = torch.randn(500) if outputs == 1 else torch.randn(500, outputs)
    shift = torch.rand(500) * 2
    direction = torch.randn(500, 8)
    moved = features + direction / direction.norm(dim=1, keepdim=True) * shift[
        :, None
    ] * torch.rand(500, 1)
    with torch.no_grad():
        clean = head(features).reshape(targets.shape)
        adv = head(moved).reshape(targets.shape)
    abs_bound = absolute_error_bound(head, features, targets, shift)
    sq_bound = squared_error_bound(head, features, targets, shift)
    assert ((adv - targets).abs() <= abs_bound + TOL).all()
    assert ((adv - targets).pow(2) <= sq_bound + TOL).all()
    # The squared bound is the clean loss plus u (2 |r| + u).
    u = head.weight.detach().norm(dim=1) * shift[:, None]
    u = u.reshape(targets.shape)
    residual = (clean - targets).abs()
    torch.testing.assert_close(sq_bound, residual.pow(2) + u * (2 * residual + u))
    # Tight: moving along w reaches the absolute bound when the residual has that sign.
    if outputs == 1:
        w = head.weight.detach()[0]
        sign = torch.sign(clean - targets)
        worst = features + (sign * shift)[:, None] * w / w.norm()
        reached = (head(worst).reshape(-1) - targets).abs().detach()
        torch.testing.assert_close(reached, abs_bound, rtol=1e-4, atol=1e-4)


def test_bounds_reject_bad_input() -> None:
    head = nn.Linear(4, 3)
    features = torch.randn(5, 4)
    labels = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="dimension 3 but the head expects 4"):
        normalized_margin(head, torch.randn(5, 3))
    with pytest.raises(ValueError, match="shape \\(N, m\\)"):
        normalized_margin(head, torch.randn(5))
    with pytest.raises(ValueError, match="labels must have shape \\(5,\\)"):
        adversarial_cross_entropy_bound(
            head, features, torch.zeros(4, dtype=torch.long), torch.ones(5)
        )
    with pytest.raises(ValueError, match="class index 3"):
        adversarial_cross_entropy_bound(head, features, torch.full((5,), 3), torch.ones(5))
    with pytest.raises(ValueError, match="shift must be non-negative"):
        criterion_holds(head, features, -torch.ones(5))
    with pytest.raises(ValueError, match="one value per sample"):
        criterion_holds(head, features, torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        criterion_holds(head, features, torch.full((5,), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        normalized_margin(head, torch.full((5, 4), float("nan")))
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        weight_gap(nn.Sequential(head))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="features_adv has shape"):
        cross_entropy_increase(head, features, torch.randn(4, 4), labels)
    with pytest.raises(ValueError, match="targets must have shape \\(5,\\)"):
        absolute_error_bound(nn.Linear(4, 1), features, torch.randn(5, 2), torch.ones(5))
    with pytest.raises(TypeError, match="targets must be a floating point"):
        squared_error_bound(
            nn.Linear(4, 1), features, torch.ones(5, dtype=torch.long), torch.ones(5)
        )
