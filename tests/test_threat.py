import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from robust_transfer import Norm, ThreatModel, parse_eps


@pytest.mark.parametrize(
    ("text", "value"),
    [("8/255", 8 / 255), ("0.3", 0.3), (" 1/2 ", 0.5), ("1e-3", 1e-3), (0.1, 0.1), (2, 2.0)],
)
def test_parse_eps(text: str | float, value: float) -> None:
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize(
    "bad", ["0", "-1/255", "nan", "inf", "__import__('os')", "8/0", "", "1/", 0.0, -0.1]
)
def test_parse_eps_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="eps"):
        parse_eps(bad)  # type: ignore[arg-type]


def test_parse_eps_types() -> None:
    with pytest.raises(TypeError):
        parse_eps(True)
    with pytest.raises(TypeError):
        parse_eps([1])  # type: ignore[arg-type]


def test_norm_names() -> None:
    assert ThreatModel("linf", "8/255").norm is Norm.LINF
    assert ThreatModel("L2", 0.5).norm is Norm.L2
    with pytest.raises(ValueError, match="unknown norm 'L1'"):
        ThreatModel("L1", 0.1)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_projection_is_feasible(norm: str) -> None:
    threat = ThreatModel(norm, 0.1)
    x = torch.rand(64, 3, 8, 8)
    x[:8] = 0.0  # corners of the box, where clipping binds
    far = x + 3.0 * torch.randn_like(x)
    projected = threat.project(x, far)
    assert projected.min() >= 0.0
    assert projected.max() <= 1.0
    assert (threat.norms(projected - x) <= threat.eps * (1 + 1e-6)).all()
    # A point already feasible is left where it is.
    inside = threat.project(x, projected)
    torch.testing.assert_close(inside, projected)


def test_linf_projection_is_euclidean() -> None:
    threat = ThreatModel("Linf", 0.2)
    x = torch.full((1, 5), 0.5)
    v = torch.tensor([[0.0, 0.45, 0.9, 2.0, -1.0]])
    expected = torch.tensor([[0.3, 0.45, 0.7, 0.7, 0.3]])
    torch.testing.assert_close(threat.project(x, v), expected)


@pytest.mark.parametrize("eps", [0.05, 0.4, 1.5])
def test_l2_projection_is_euclidean_onto_the_ball_and_the_box(eps: float) -> None:
    """Against a general solver (SLSQP, nearest point of the ball and the box) on points
    half of whose pixels sit on the box, as in digits: clipping after scaling into the ball
    would fall short of the ball and be farther from the target."""
    threat = ThreatModel("L2", eps)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(6, 10, generator=generator, dtype=torch.float64)
    x[:, :5] = (x[:, :5] > 0.5).double()
    v = x + 0.6 * torch.randn(6, 10, generator=generator, dtype=torch.float64)
    projected = threat.project(x, v)
    for xi, vi, pi in zip(x.numpy(), v.numpy(), projected.numpy(), strict=True):
        best = minimize(
            lambda z, vi=vi: ((z - vi) ** 2).sum(),
            np.clip(xi, 0, 1),
            jac=lambda z, vi=vi: 2 * (z - vi),
            bounds=[(0.0, 1.0)] * len(xi),
            constraints=[
                {
                    "type": "ineq",
                    "fun": lambda z, xi=xi: eps**2 - ((z - xi) ** 2).sum(),
                    "jac": lambda z, xi=xi: -2 * (z - xi),
                }
            ],
            method="SLSQP",
            options={"maxiter": 500, "ftol": 1e-14},
        )
        np.testing.assert_allclose(pi, best.x, atol=1e-5)
    # The naive projection (scale into the ball, then clip) is feasible but farther away.
    delta = v - x
    scale = (eps / delta.norm(dim=1, keepdim=True)).clamp(max=1.0)
    naive = (x + delta * scale).clamp(0.0, 1.0)
    assert ((projected - v).norm(dim=1) <= (naive - v).norm(dim=1) + 1e-9).all()
    assert ((projected - v).norm(dim=1) < (naive - v).norm(dim=1) - 1e-3).any()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_random_start_inside_ball_and_box(norm: str) -> None:
    threat = ThreatModel(norm, 0.3)
    x = torch.rand(200, 10)
    generator = torch.Generator().manual_seed(1)
    start = threat.random_start(x, generator)
    assert ((start >= 0) & (start <= 1)).all()
    assert (threat.norms(start - x) <= 0.3 * (1 + 1e-6)).all()
    # Uniform in the ball: radii spread out instead of collapsing to the centre.
    assert threat.norms(start - x).std() > 0.01
    again = threat.random_start(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(start, again)


def test_ascent_direction_unit_norm() -> None:
    grad = torch.randn(4, 7)
    grad[0] = 0.0
    for norm in ("Linf", "L2"):
        threat = ThreatModel(norm, 1.0)
        direction = threat.ascent_direction(grad)
        assert torch.isfinite(direction).all()
        torch.testing.assert_close(threat.norms(direction[1:]), torch.ones(3))


def test_threat_model_is_a_value() -> None:
    assert ThreatModel("Linf", "8/255") == ThreatModel("LINF", 8 / 255)
    assert str(ThreatModel("L2", 0.5)) == "L2(eps=0.5)"
    assert ThreatModel("L2", 0.5).with_eps("1/4").eps == 0.25
