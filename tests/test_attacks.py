import copy

import pytest
import torch
from conftest import cnn_encoder, linear_encoder, mlp_encoder
from torch import nn

from robust_transfer import ThreatModel, attack_classifier, attack_representation


def _inside_box_and_ball(x: torch.Tensor, x_adv: torch.Tensor, threat: ThreatModel) -> None:
    assert x_adv.min() >= 0.0
    assert x_adv.max() <= 1.0
    assert (threat.norms(x_adv - x) <= threat.eps * (1 + 1e-5)).all()


def test_linear_encoder_l2_oracle() -> None:
    """f(x) = A x under L2, ball inside the box: shift = eps * sigma_max(A) exactly."""
    matrix = torch.randn(20, 50)
    encoder = linear_encoder(matrix)
    x = 0.3 + 0.4 * torch.rand(64, 50)
    threat = ThreatModel("L2", 0.05)  # 0.05 < 0.3: the ball never leaves the box
    result = attack_representation(encoder, x, threat, steps=50, restarts=2, seed=1)
    exact = threat.eps * torch.linalg.matrix_norm(matrix, ord=2)
    assert (result.shift >= 0.99 * exact).all()
    assert (result.shift <= exact * (1 + 1e-5)).all()
    _inside_box_and_ball(x, result.x_adv, threat)


def test_linear_encoder_linf_oracle() -> None:
    """One output row a under Linf: shift = eps * ||a||_1."""
    row = torch.randn(1, 40)
    encoder = linear_encoder(row)
    x = 0.2 + 0.6 * torch.rand(32, 40)
    threat = ThreatModel("Linf", 0.1)
    result = attack_representation(encoder, x, threat, steps=20, seed=0)
    exact = threat.eps * row.abs().sum()
    assert (result.shift >= 0.99 * exact).all()
    assert (result.shift <= exact * (1 + 1e-5)).all()
    _inside_box_and_ball(x, result.x_adv, threat)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_representation_attack_beats_random_search(norm: str) -> None:
    encoder = cnn_encoder()
    x = torch.rand(32, 1, 12, 12)
    threat = ThreatModel(norm, 0.1 if norm == "Linf" else 0.5)
    result = attack_representation(encoder, x, threat, steps=30, seed=0)
    _inside_box_and_ball(x, result.x_adv, threat)
    with torch.no_grad():
        clean = encoder(x)
        random_best = torch.zeros(32)
        generator = torch.Generator().manual_seed(3)
        for _ in range(50):
            moved = encoder(threat.random_start(x, generator))
            random_best = torch.maximum(random_best, (moved - clean).norm(dim=1))
    assert (result.shift >= random_best).float().mean() > 0.95
    assert result.shift.mean() > 1.2 * random_best.mean()
    # The reported shift is the distance of the returned point, recomputed.
    torch.testing.assert_close(result.features_adv, encoder(result.x_adv).detach())
    torch.testing.assert_close(result.delta, result.x_adv - x)


def test_attack_leaves_model_untouched_and_restores_mode() -> None:
    encoder = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4))
    encoder.train()
    before = copy.deepcopy(encoder.state_dict())
    x = torch.rand(16, 10)
    with pytest.warns(UserWarning, match="training mode"):
        result = attack_representation(encoder, x, ThreatModel("L2", 0.5), steps=5)
    assert encoder.training
    assert all(m.training for m in encoder.modules())
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in encoder.parameters())
    # Eval mode during the attack: dropout off, so the shift is reproducible.
    encoder.eval()
    torch.testing.assert_close(result.features_adv, encoder(result.x_adv).detach())


def test_seeded_and_batch_independent_of_progress() -> None:
    encoder = mlp_encoder()
    x = torch.rand(40, 30)
    threat = ThreatModel("Linf", 0.05)
    a = attack_representation(encoder, x, threat, steps=10, seed=7, batch_size=16)
    b = attack_representation(encoder, x, threat, steps=10, seed=7, batch_size=16, progress=True)
    assert torch.equal(a.x_adv, b.x_adv)
    c = attack_representation(encoder, x, threat, steps=10, seed=8, batch_size=16)
    assert not torch.equal(a.x_adv, c.x_adv)


def test_restarts_never_hurt() -> None:
    encoder = mlp_encoder()
    x = torch.rand(50, 30)
    threat = ThreatModel("L2", 1.0)
    one = attack_representation(encoder, x, threat, steps=10, restarts=1, seed=0)
    three = attack_representation(encoder, x, threat, steps=10, restarts=3, seed=0)
    # Restart 0 is identical; later restarts can only raise the per-sample best.
    assert (three.shift >= one.shift - 1e-6).all()


def _linear_classifier(classes: int = 3, dim: int = 12) -> nn.Linear:
    torch.manual_seed(5)
    return nn.Linear(dim, classes).eval()


def test_classifier_attack_linear_oracle() -> None:
    """Binary linear classifier under Linf, box not binding: a point can be flipped
    exactly when its margin is below eps * ||w_y - w_j||_1."""
    model = _linear_classifier(classes=2, dim=12)
    x = 0.3 + 0.4 * torch.rand(400, 12)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    w = model.weight.detach()
    margin = (logits[:, 0] - logits[:, 1]).abs()
    dual = (w[0] - w[1]).abs().sum()
    # Half the points breakable, so the test says something either way; eps stays
    # below 0.3 so the box never binds.
    threat = ThreatModel("Linf", float(margin.median() / dual))
    assert threat.eps < 0.3
    breakable = margin < threat.eps * dual
    result = attack_classifier(model, x, y, threat, steps=10, seed=0)
    assert torch.equal(result.robust, ~breakable)
    _inside_box_and_ball(x, result.x_adv, threat)


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_classifier_attack_result_is_consistent(loss: str) -> None:
    model = nn.Sequential(cnn_encoder(), nn.Linear(12, 4)).eval()
    x = torch.rand(48, 1, 12, 12)
    y = torch.randint(0, 4, (48,))
    threat = ThreatModel("L2", 0.3)
    result = attack_classifier(model, x, y, threat, steps=10, restarts=2, loss=loss)
    with torch.no_grad():
        assert torch.equal(result.clean_correct, model(x).argmax(1) == y)
        adv_pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.robust, result.clean_correct & (adv_pred == y))
    assert not (result.robust & ~result.clean_correct).any()
    _inside_box_and_ball(x, result.x_adv, threat)
    assert result.robust_accuracy <= result.clean_accuracy


def test_classifier_attack_margin_finds_what_ce_finds() -> None:
    model = _linear_classifier(classes=5)
    x = 0.3 + 0.4 * torch.rand(200, 12)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    threat = ThreatModel("Linf", 0.03)
    ce = attack_classifier(model, x, y, threat, steps=20, loss="ce")
    margin = attack_classifier(model, x, y, threat, steps=20, loss="margin")
    # Both attacks are sound (robust <= clean) and see comparable vulnerability.
    assert abs(ce.robust_accuracy - margin.robust_accuracy) < 0.05


def test_stopping_at_success_and_given_starts() -> None:
    """Stopping a point at its first success changes which broken point is kept, never
    whether it broke; a given start is where the first restart begins."""
    model = nn.Sequential(cnn_encoder(), nn.Linear(12, 4)).eval()
    x = torch.rand(64, 1, 12, 12)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = ThreatModel("Linf", 0.05)
    full = attack_classifier(model, x, y, threat, steps=10, loss="margin")
    stopped = attack_classifier(model, x, y, threat, steps=10, loss="margin", stop_at_success=True)
    assert torch.equal(full.robust, stopped.robust)
    assert 0 < int(full.robust.sum()) < len(x)
    _inside_box_and_ball(x, stopped.x_adv, threat)
    # Starting every point at a point already broken: one iterate decides it.
    starts = (x + threat.eps * torch.sign(torch.randn_like(x))).clamp(0, 1)
    with torch.no_grad():
        broken_at_start = model(starts).argmax(1) != y
    started = attack_classifier(
        model, x, y, threat, steps=1, loss="margin", starts=starts, stop_at_success=True
    )
    assert not bool((started.robust & broken_at_start).any())
    with pytest.raises(ValueError, match="starts"):
        attack_classifier(model, x, y, threat, starts=starts[:3])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.rand(4, 3) * 2}, ValueError, r"\[0, 1\]"),
        ({"x": torch.full((4, 3), float("nan"))}, ValueError, "NaN"),
        ({"x": torch.rand(3)}, ValueError, "batch dimension"),
        ({"x": torch.zeros(4, 3, dtype=torch.int64)}, TypeError, "floating point"),
        ({"x": [[0.5]]}, TypeError, "torch.Tensor"),
        ({"steps": 0}, ValueError, "steps"),
        ({"restarts": -1}, ValueError, "restarts"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"threat": "Linf"}, TypeError, "ThreatModel"),
        ({"step_size": -0.1}, ValueError, "step_size"),
    ],
)
def test_attack_rejects_bad_input(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"x": torch.rand(4, 3), "threat": ThreatModel("Linf", 0.1)}
    args.update(kwargs)
    x, threat = args.pop("x"), args.pop("threat")
    with pytest.raises(error, match=match):
        attack_representation(nn.Linear(3, 2).eval(), x, threat, **args)  # type: ignore[arg-type]


def test_classifier_attack_rejects_bad_labels() -> None:
    model = nn.Linear(3, 2).eval()
    threat = ThreatModel("Linf", 0.1)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        attack_classifier(model, torch.rand(4, 3), torch.zeros(5, dtype=torch.long), threat)
    with pytest.raises(TypeError, match="integer"):
        attack_classifier(model, torch.rand(4, 3), torch.zeros(4), threat)
    for scale in (0.0, float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="step_scale"):
            attack_classifier(
                model, torch.rand(4, 3), torch.zeros(4, dtype=torch.long), threat, step_scale=scale
            )
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        attack_classifier(
            model, torch.rand(4, 3), torch.zeros(4, dtype=torch.long), threat, loss="hinge"
        )
    with pytest.raises(TypeError, match=r"nn\.Module"):
        attack_classifier(lambda v: v, torch.rand(4, 3), torch.zeros(4, dtype=torch.long), threat)  # type: ignore[arg-type]


def test_zero_gradient_is_reported() -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 0).flatten(1)

    with pytest.warns(UserWarning, match="exactly zero"):
        attack_representation(Flat().eval(), torch.rand(4, 3), ThreatModel("L2", 0.1), steps=2)


def test_one_default_attack_everywhere() -> None:
    """The function's defaults are the settings studies and ``measure`` use."""
    import inspect

    from robust_transfer import AttackSettings

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(attack_representation).parameters.items()
    }
    settings = AttackSettings()
    assert defaults["method"] == settings.representation_method == "pgd+apgd"
    assert defaults["steps"] == settings.representation_steps
    assert defaults["restarts"] == settings.representation_restarts


def test_progress_bars_name_the_points_each_stage_takes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from robust_transfer import extract_features

    encoder = mlp_encoder(n_in=30)
    x = torch.rand(12, 30)
    extract_features(encoder, x, progress=True)
    attack_representation(encoder, x, ThreatModel("L2", 0.5), steps=2, progress=True)
    shown = capsys.readouterr().err
    assert "features (12 points)" in shown
    assert "representation attack L2(eps=0.5) (12 points)" in shown
