"""AutoAttack, the reference evaluation, never breaks a certified point."""

import pytest
import torch
from conftest import linear_encoder, random_head
from torch import nn

from robust_transfer import ThreatModel, attack_classifier, criterion_holds, normalized_margin
from robust_transfer.attacks.reference import attack_autoattack, refusal


@pytest.mark.parametrize("norm", ["L2", "Linf"])
def test_autoattack_respects_certificates_and_the_ball(norm: str) -> None:
    torch.manual_seed(11)
    matrix = torch.randn(10, 784)
    encoder = linear_encoder(matrix)
    head = random_head(10, 5, seed=4, scale=3.0)
    model = nn.Sequential(nn.Flatten(), encoder, head).eval()
    x = 0.35 + 0.3 * torch.rand(60, 1, 28, 28)
    with torch.no_grad():
        features = encoder(x.flatten(1))
        y = head(features).argmax(dim=1)
    rho = normalized_margin(head, features)
    if norm == "L2":
        # Exact shift of a linear encoder under L2 (the ball stays inside the box).
        constant = float(torch.linalg.matrix_norm(matrix, ord=2))
    else:
        # ||A d||_2 <= ||A||_{inf->2} eps <= sqrt(sum of squared row l1 norms) eps.
        constant = float(matrix.abs().sum(dim=1).pow(2).sum().sqrt())
    threat = ThreatModel(norm, float(rho.quantile(0.5)) / constant)
    certified = criterion_holds(head, features, torch.full((60,), threat.eps * constant))
    assert 0.2 < certified.float().mean() < 0.8
    found = attack_autoattack(model, x, y, threat)
    result = found.attack
    assert not (certified & ~result.robust).any()
    assert not found.square_only.any()  # nothing masks a linear model's gradient
    assert result.x_adv.min() >= 0
    assert result.x_adv.max() <= 1
    assert (threat.norms(result.delta) <= threat.eps + 1e-6).all()  # float rounding of x + d - x
    # The reference is at least as strong as a short PGD run.
    pgd = attack_classifier(model, x, y, threat, steps=10)
    assert result.robust_accuracy <= pgd.robust_accuracy + 1e-9


def test_autoattack_rejects_what_it_cannot_attack() -> None:
    threat = ThreatModel("L2", 0.1)
    with pytest.raises(ValueError, match="images"):
        attack_autoattack(nn.Linear(6, 5).eval(), torch.rand(4, 6), torch.zeros(4).long(), threat)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 3)).eval()
    with pytest.raises(ValueError, match="at least 4 classes"):
        attack_autoattack(model, torch.rand(4, 1, 28, 28), torch.zeros(4).long(), threat)
    # The package's L2 Square crashes on 12x12 images (its first squares overflow them).
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 5)).eval()
    with pytest.raises(ValueError, match="cannot start on 12x12 images"):
        attack_autoattack(model, torch.rand(4, 1, 12, 12), torch.zeros(4).long(), threat)
    assert refusal((1, 12, 12), 5, ThreatModel("Linf", 0.1)) is None
    assert refusal((3, 32, 32), 10, threat) is None
    assert refusal((3, 224, 224), 10, threat) is None


def test_study_evaluation_folds_autoattack_into_the_attacked_accuracy() -> None:
    from robust_transfer.attacks.settings import AttackSettings
    from robust_transfer.estimates.evaluate import (
        evaluate_classification,
        measure_shift,
    )
    from robust_transfer.estimates.records import aggregate

    torch.manual_seed(3)
    encoder = nn.Sequential(nn.Flatten(), linear_encoder(torch.randn(8, 784))).eval()
    head = random_head(8, 5, seed=1, scale=3.0)
    x = torch.rand(30, 1, 28, 28)
    with torch.no_grad():
        y = head(encoder(x)).argmax(dim=1)
    threat = ThreatModel("Linf", 0.01)
    settings = AttackSettings(steps=5, representation_steps=5)
    shift = measure_shift(encoder, x, threat, settings, seed=0)
    every = torch.ones(30, dtype=torch.bool)
    arrays = evaluate_classification(
        encoder, head, x, y, threat, shift, settings, seed=0, autoattack_rows=every
    )
    # The reference is PGD then AutoAttack; the attacked accuracy adds the task-agnostic
    # perturbations on top.
    assert not (arrays["robust_attacked"] & ~arrays["robust_autoattack"]).any()
    assert not (arrays["robust_autoattack"] & ~arrays["robust_pgd"]).any()
    record = aggregate(arrays)
    assert record["autoattack_points"] == 30
    assert record["attacked_robust_acc"] <= record["autoattack_robust_acc"]  # type: ignore[operator]
    assert record["autoattack_gap"] == pytest.approx(
        record["pgd_robust_acc"] - record["autoattack_robust_acc"]  # type: ignore[operator]
    )
    assert record["autoattack_flag"] == (record["autoattack_gap"] > 0.03)  # type: ignore[operator]
    # A head PGD overstates by more than 3 points is flagged (one point of 30 is 3.3),
    # one it does not overstate is not.
    overstated = dict(arrays)
    overstated["robust_pgd"] = arrays["robust_autoattack"].clone()
    assert aggregate(overstated)["autoattack_flag"] is False
    overstated["robust_pgd"][torch.nonzero(~arrays["robust_autoattack"])[:1, 0]] = True
    flagged = aggregate(overstated)
    assert flagged["autoattack_gap"] == pytest.approx(1 / 30)
    assert flagged["autoattack_flag"] is True
