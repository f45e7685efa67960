"""The expected robust accuracy (``robust_transfer.estimates.expected``) against independent
computations: exact linear programs, a direct solver, exact answers for affine encoders
and a much stronger attack on encoders of several families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cnn_encoder, linear_encoder, random_head
from scipy.optimize import linprog, minimize
from torch import Tensor, nn

from robust_transfer import ThreatModel, attack_classifier
from robust_transfer.core.errors import InputError, InputTypeError
from robust_transfer.estimates import expected
from robust_transfer.estimates.expected import RefineSettings, profile_encoder
from robust_transfer.theory import first_order


def _lp_drop(g: np.ndarray, x: np.ndarray, eps: float) -> float:
    """max -g^T d over |d_i| <= eps, 0 <= x + d <= 1: a linear program."""
    bounds = [(max(-eps, -xi), min(eps, 1 - xi)) for xi in x]
    return -linprog(g, bounds=bounds, method="highs").fun


def _solver_drop(g: np.ndarray, x: np.ndarray, eps: float) -> float:
    """max -g^T d over ||d||_2 <= eps, 0 <= x + d <= 1, by SLSQP: the problem is convex,
    so the optimum it converges to from any feasible start is the global one."""
    start = np.random.default_rng(0).uniform(-x, 1 - x) * 0.1
    result = minimize(
        lambda d: g @ d,
        start,
        jac=lambda d: g,
        bounds=list(zip(-x, 1 - x, strict=True)),
        constraints=[{"type": "ineq", "fun": lambda d: eps**2 - d @ d, "jac": lambda d: -2 * d}],
        method="SLSQP",
        options={"maxiter": 500, "ftol": 1e-12},
    )
    # Its stops at the optimum include "positive directional derivative for linesearch",
    # which it reports as a failure: the comparisons check the value instead.
    return -float(g @ result.x)


@pytest.mark.parametrize("eps", [0.05, 0.3, 2.0])
def test_first_order_drops_match_a_linear_program_and_a_solver(eps: float) -> None:
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(12, 9, generator=gen, dtype=torch.float64)
    # Pixels at the box's faces, as on digit images, and inside it.
    x = torch.rand(12, 9, generator=gen, dtype=torch.float64)
    x[:, :3], x[:, 3:5] = 0.0, 1.0
    g[0, 4] = 0.0
    # A Linf ball of radius 1 holds the whole box: the largest radius there is.
    linf_eps = min(eps, 1.0)
    linf = first_order.drop(g, x, ThreatModel("Linf", linf_eps))
    l2 = first_order.drop(g, x, ThreatModel("L2", eps))
    for i in range(len(g)):
        gi, xi = g[i].numpy(), x[i].numpy()
        assert float(linf[i]) == pytest.approx(_lp_drop(gi, xi, linf_eps), abs=1e-9)
        assert float(l2[i]) == pytest.approx(_solver_drop(gi, xi, eps), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_first_order_optimum_is_feasible_and_reaches_the_drop(norm: str) -> None:
    threat = ThreatModel(norm, 0.4)
    gen = torch.Generator().manual_seed(2)
    g, x = torch.randn(20, 30, generator=gen), torch.rand(20, 30, generator=gen).round()
    value, delta = first_order.optimum(g, x, threat)
    assert torch.all(x + delta >= -1e-7)
    assert torch.all(x + delta <= 1 + 1e-7)
    assert torch.all(threat.norms(delta) <= threat.eps * (1 + 1e-5))
    assert torch.allclose(-(g * delta).sum(1), value, rtol=1e-4, atol=1e-5)


def _digits(n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    from robust_transfer.data.builtin import load_sklearn_digits

    data = load_sklearn_digits(size=12)
    return data.x[:n], data.y[:n]


def _probe(encoder: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> nn.Linear:
    from robust_transfer import train_linear_probe

    with torch.no_grad():
        features = encoder(x).flatten(1)
    return train_linear_probe(features, labels, weight_decay=1e-3)


@pytest.mark.parametrize(("norm", "eps"), [("Linf", 0.05), ("L2", 0.5)])
def test_affine_encoders_get_the_exact_answer(norm: str, eps: float) -> None:
    """For an affine encoder the margins are affine in the input: the exact worst case
    is a linear program per class, solved here without the profile's code."""
    x, y = _digits(30)
    torch.manual_seed(3)
    matrix = torch.randn(10, x[0].numel()) / 12
    encoder = nn.Sequential(nn.Flatten(), linear_encoder(matrix))
    head = _probe(encoder, x, y)
    threat = ThreatModel(norm, eps)
    profile = profile_encoder(encoder, x)
    estimate = profile.expected_robust(head, y, threat)
    # First order is exact here: a refinement can break nothing it calls robust.
    assert torch.equal(estimate, profile.expected_robust(head, y, threat, refine=False))
    composite = (head.weight @ matrix).double().numpy()
    with torch.no_grad():
        logits = head(encoder(x))
    flat = x.flatten(1).double().numpy()
    for i in range(len(x)):
        pred = int(logits[i].argmax())
        robust, on_boundary = pred == int(y[i]), False
        for j in range(logits.shape[1]):
            if j == pred or not robust:
                continue
            margin = float(logits[i, pred] - logits[i, j])
            g = composite[pred] - composite[j]
            worst = _lp_drop(g, flat[i], eps) if norm == "Linf" else _solver_drop(g, flat[i], eps)
            # A margin within rounding of its exact drop may go either way.
            on_boundary = on_boundary or abs(margin - worst) < 1e-4
            robust = robust and margin > worst
        if not on_boundary:
            assert bool(estimate[i]) == robust, i


def test_a_new_head_costs_no_encoder_pass() -> None:
    x, y = _digits(50)
    calls: list[int] = []
    encoder = nn.Sequential(cnn_encoder(), nn.Tanh())
    encoder[0][0] = nn.Conv2d(1, 8, 3, padding=1)
    encoder.register_forward_hook(lambda _module, inputs, _out: calls.append(len(inputs[0])))
    profile = profile_encoder(encoder, x)
    threat = ThreatModel("Linf", 0.1)
    before = len(calls)
    for seed in range(5):
        head = random_head(12, 4, seed=seed)
        profile.expected_robust(head, y % 4, threat, refine=False)
        profile.directional_shift(head, threat)
    assert len(calls) == before
    # The refinement: each refined point is attacked once, at most steps + 3 passes
    # (clean, iterates, final); every point of the first band is refined, and no point
    # beyond the limits is.
    settings = RefineSettings()
    (low, high), (lowest, highest) = settings.band, settings.limits
    first_band, threat = 0, ThreatModel("Linf", 0.3)
    reachable = 0
    for seed in range(5):
        head = random_head(12, 4, seed=seed)
        drops = profile.head_drops(head, threat)
        estimate = profile.expected_robust(head, y % 4, threat)
        unrefined = profile.expected_robust(head, y % 4, threat, refine=False)
        own = nn.functional.one_hot(drops.prediction, 4).bool()
        share = torch.where(own, 0.0, drops.drops / drops.margins.clamp(min=1e-30)).amax(1)
        correct = drops.prediction == y % 4
        within = correct & (share >= lowest) & (share <= highest)
        assert torch.equal(estimate[~within], unrefined[~within])
        first_band += int((correct & (share >= low) & (share <= high)).sum())
        reachable += int(within.sum())
    assert first_band > 0
    passes = sum(calls[before:])
    assert first_band * 3 <= passes <= reachable * (settings.steps + 3)
    assert profile.backward_passes == 12


def test_the_span_route_for_wide_encoders_agrees_with_the_full_jacobian(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = _digits(40)
    encoder = nn.Sequential(cnn_encoder(), nn.ReLU())
    encoder[0][0] = nn.Conv2d(1, 8, 3, padding=1)
    head = random_head(12, 5, seed=4, scale=3.0)
    threat = ThreatModel("L2", 0.5)
    full = profile_encoder(encoder, x)
    assert full.backward_passes == 12
    monkeypatch.setattr(expected, "FULL_JACOBIAN_LIMIT", 0)
    lazy = profile_encoder(encoder, x)
    assert lazy.backward_passes == 0
    assert torch.equal(
        lazy.expected_robust(head, y % 5, threat), full.expected_robust(head, y % 5, threat)
    )
    # The head's 4 class differences, once.
    assert lazy.backward_passes == 4
    lazy.expected_robust(head, y % 5, threat)
    assert lazy.backward_passes == 4


def _families() -> dict[str, nn.Module]:
    """Encoders unlike the built-in CNNs: saturating activations, width, normalisation
    layers, residual blocks. Trained briefly so that their features carry the task."""

    class Residual(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z + self.inner(z)

    torch.manual_seed(5)
    return {
        "tanh-mlp": nn.Sequential(
            nn.Flatten(), nn.Linear(144, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh()
        ),
        "wide-bn-cnn": nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 48),
        ),
        "residual-gelu": nn.Sequential(nn.Flatten(), nn.Linear(144, 48), Residual(48), nn.ELU()),
    }


def _pretrain(encoder: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    features = encoder(x[:2]).flatten(1).shape[1]
    model = nn.Sequential(encoder, nn.Linear(features, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return encoder.eval().requires_grad_(False)


@pytest.mark.slow
def test_held_out_heads_on_unseen_encoder_families() -> None:
    """The held-out protocol: encoders pretrained on digits 0-4, heads fit on digits 5-9
    for label sets the estimator never saw (5 classes, parity, 3 bins), compared with a
    strong attack (50 steps, cross-entropy then targeted at every other class)."""
    from robust_transfer.data.builtin import load_sklearn_digits

    data = load_sklearn_digits(size=12)
    low, high = data.y < 5, data.y >= 5
    x_pre, y_pre = data.x[low][:600], data.y[low][:600]
    x_high, y_high = data.x[high], data.y[high] - 5
    x_fit, y_fit, x_eval, y_eval = x_high[:500], y_high[:500], x_high[500:580], y_high[500:580]
    label_sets = {
        "five": lambda v: v,
        "parity": lambda v: v % 2,
        "bins": lambda v: torch.tensor([0, 0, 1, 2, 2])[v],
    }
    errors = []
    for name, encoder in _families().items():
        encoder = _pretrain(encoder, x_pre, y_pre)
        profile = profile_encoder(encoder, x_eval)
        heads = {
            label: _probe(encoder, x_fit, relabel(y_fit)) for label, relabel in label_sets.items()
        }
        for threat in (ThreatModel("Linf", 0.02), ThreatModel("L2", 0.2)):
            for label, relabel in label_sets.items():
                head = heads[label]
                y = relabel(y_eval)
                estimate = float(profile.expected_robust(head, y, threat).float().mean())
                model = nn.Sequential(encoder, head).eval()
                robust = torch.ones(len(y), dtype=torch.bool)
                for loss, restarts in (("ce", 1), ("targeted", int(head.out_features) - 1)):
                    result = attack_classifier(
                        model, x_eval, y, threat, loss=loss, steps=50, restarts=restarts, seed=1
                    )
                    robust &= result.robust
                errors.append(
                    (name, str(threat), label, 100 * (estimate - float(robust.float().mean())))
                )
    worst = max(abs(e[3]) for e in errors)
    mean = sum(abs(e[3]) for e in errors) / len(errors)
    # The targets are 2 and 8 points; measured here: within 0.8 everywhere.
    assert mean <= 2.0, errors
    assert worst <= 5.0, errors


def test_bad_input_is_refused() -> None:
    x, y = _digits(10)
    profile = profile_encoder(nn.Sequential(nn.Flatten(), nn.Linear(144, 6)), x)
    threat = ThreatModel("Linf", 0.1)
    with pytest.raises(InputTypeError, match=r"torch\.nn\.Linear"):
        profile.expected_robust(nn.Sequential(nn.Linear(6, 3)), y % 3, threat)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="6 features"):
        profile.expected_robust(nn.Linear(5, 3), y % 3, threat)
    with pytest.raises(InputError):
        profile.expected_robust(nn.Linear(6, 3), y[:4] % 3, threat)
    with pytest.raises(InputTypeError, match="ThreatModel"):
        profile.expected_robust(nn.Linear(6, 3), y % 3, "Linf")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        profile_encoder(nn.Linear(144, 6), x * 2)
    with pytest.raises(InputError):
        RefineSettings(steps=-1)
    with pytest.raises(InputError):
        RefineSettings(band=(0.5, 0.9))
    with pytest.raises(InputError, match="limits"):
        RefineSettings(band=(0.5, 1.5), limits=(0.6, 3.0))
    with pytest.raises(InputError, match="widen"):
        RefineSettings(widen=0.0)
    with pytest.raises(InputError, match="step_scale"):
        RefineSettings(step_scale=0.0)


class _Quadratic(nn.Module):
    """Features ``[u, u^2]`` of ``u = w^T x - c``: an encoder that bends everywhere, whose
    heads' exact robustness is a one-dimensional problem."""

    def __init__(self, w: Tensor, c: float) -> None:
        super().__init__()
        self.register_buffer("w", w)
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        u = x.flatten(1) @ self.w - self.c
        return torch.stack([u, u * u], dim=1)


def test_the_refinement_widens_as_far_as_the_encoder_bends() -> None:
    """On ``q(u) = u^2 - 0.04`` as class 0 against class 1, first order is wrong both ways
    far from the margin (too optimistic for points between the roots, too pessimistic
    outside them). Exact answer: ``u`` sweeps an interval under ``Linf`` and the box, and
    the point is robust when ``q`` keeps its sign on it (a convex ``q``'s minimum is at
    its clamped vertex, its maximum at an end)."""
    d, eps = 16, 0.1
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(400, d, generator=generator).clamp(0.05, 0.95)
    x[:, :4] = (x[:, :4] > 0.5).float()  # pixels on the box, as in digits
    w = torch.randn(d, generator=generator) / 4
    encoder = _Quadratic(w, float(w.sum()) / 2).eval()
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        head.bias.copy_(torch.tensor([-0.04, 0.0]))
    u = encoder(x)[:, 0].double()
    w64, x64 = w.double(), x.double()
    up = torch.where(w64 > 0, 1 - x64, x64).clamp(max=eps) @ w64.abs()
    down = torch.where(w64 > 0, x64, 1 - x64).clamp(max=eps) @ w64.abs()
    low, high = u - down, u + up
    q = lambda v: v * v - 0.04  # noqa: E731
    y = (q(u) <= 0).long()
    lowest_q = q(torch.clamp(torch.zeros_like(u), low, high))
    highest_q = torch.maximum(q(low), q(high))
    exact = torch.where(y == 0, lowest_q > 0, highest_q <= 0)
    threat = ThreatModel("Linf", eps)

    first_order_only = profile_encoder(encoder, x).expected_robust(head, y, threat, refine=False)
    fixed_band = profile_encoder(
        encoder, x, refine=RefineSettings(band=(0.9, 1.1), limits=(0.9, 1.1))
    ).expected_robust(head, y, threat)
    widening = profile_encoder(encoder, x).expected_robust(head, y, threat)
    # First order and the fixed band miss points far from the margin; widening finds them.
    # Measured: 89, 74 and 0 of 400.
    assert int((first_order_only != exact).sum()) >= 60
    assert int((fixed_band != exact).sum()) >= 40
    assert int((widening != exact).sum()) <= 2
