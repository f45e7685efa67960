"""APGD, the representation attack's second engine: its checkpoints are the paper's, it
reaches known optima, stays in the threat set, and narrows the tail that PGD's fixed
schedule leaves against a much stronger reference."""

from __future__ import annotations

import pytest
import torch
from conftest import cnn_encoder, linear_encoder
from torch import nn

from robust_transfer import ThreatModel, attack_representation
from robust_transfer.attacks.apgd import checkpoints
from robust_transfer.core.errors import InputError
from robust_transfer.data.tasks import get_task
from robust_transfer.study.config import default_config
from robust_transfer.training.pretrain import PretrainConfig, pretrain

# The target for the tail, and the median the study's attack must keep.
MEDIAN_FLOOR = 0.99
TAIL_FLOOR = 0.97


def test_checkpoints_are_the_papers() -> None:
    # Croce & Hein (2020), section 3.1, for 100 iterations.
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [1]
    assert all(0 < mark <= 30 for mark in checkpoints(30))


def test_apgd_reaches_the_exact_shift_of_a_linear_encoder() -> None:
    torch.manual_seed(1)
    matrix = torch.randn(6, 64) / 8
    encoder = torch.nn.Sequential(torch.nn.Flatten(), linear_encoder(matrix)).eval()
    x = torch.full((12, 1, 8, 8), 0.5)  # the box does not bind at L2 0.3
    threat = ThreatModel("L2", 0.3)
    exact = 0.3 * float(torch.linalg.matrix_norm(matrix, ord=2))
    result = attack_representation(encoder, x, threat, steps=30, method="apgd")
    pgd = attack_representation(encoder, x, threat, steps=30, method="pgd")
    assert (result.shift <= exact * (1 + 1e-5)).all()
    # A slow power iteration (close singular values): PGD's cosine schedule stops at
    # 0.89 of the optimum on the worst point, APGD's adaptive step goes on.
    assert (result.shift >= 0.98 * exact).all()
    assert result.shift.min() > pgd.shift.min()
    assert (threat.norms(result.delta) <= 0.3 + 1e-5).all()


@pytest.mark.parametrize("threat", [ThreatModel("Linf", 0.05), ThreatModel("L2", 0.5)])
def test_apgd_narrows_the_tail_against_a_strong_reference(threat: ThreatModel) -> None:
    encoder, x = cnn_encoder(), torch.rand(64, 1, 12, 12)

    def shift(method: str, steps: int, restarts: int = 1) -> torch.Tensor:
        result = attack_representation(
            encoder, x, threat, steps=steps, restarts=restarts, method=method, seed=3
        )
        assert (result.x_adv >= 0).all()
        assert (result.x_adv <= 1).all()
        assert (threat.norms(result.delta) <= threat.eps * (1 + 1e-5)).all()
        return result.shift

    pgd, apgd = shift("pgd", 30), shift("apgd", 30)
    kept = torch.maximum(pgd, apgd)
    reference = torch.stack([kept, shift("pgd", 200, 3), shift("apgd", 200, 3)]).amax(0)
    ratio = kept / reference
    # Measured on this random CNN: PGD alone 0.905 (Linf) and 0.940 (L2) at the 5th
    # percentile, the larger of both 0.935 and 0.954 (the 0.97 target of the tail is
    # not reached at 30 steps: the objective has many local maxima, restarts help).
    assert float(ratio.median()) >= 0.99
    assert float(ratio.quantile(0.05)) > float((pgd / reference).quantile(0.05))


def test_unknown_method_is_refused() -> None:
    with pytest.raises(InputError, match="unknown representation attack 'fgsm'"):
        attack_representation(
            cnn_encoder(), torch.rand(2, 1, 12, 12), ThreatModel("L2", 0.1), method="fgsm"
        )


@pytest.fixture(scope="module")
def pretrained() -> tuple[dict[str, nn.Module], torch.Tensor]:
    """Three built-in encoders pretrained briefly as the default study pretrains them
    (digits 0-4), and held-out digits 5-9 to attack."""
    task = get_task("mnist-5-9")
    assert task.pretrain is not None
    adversary = ThreatModel("Linf", 0.1)
    configs = {
        "standard": PretrainConfig("standard", epochs=2, limit=600),
        "adversarial": PretrainConfig(
            "adversarial", epochs=2, limit=600, threat=adversary, attack_steps=3
        ),
        "lipschitz": PretrainConfig(
            "lipschitz", epochs=2, limit=600, threat=ThreatModel("L2", 1.0), lr=5e-3
        ),
    }
    encoders = {
        name: pretrain(config, task.pretrain.train).encoder.eval()
        for name, config in configs.items()
    }
    return encoders, task.downstream.test.x[:32]


@pytest.mark.parametrize("name", ["standard", "adversarial", "lipschitz"])
@pytest.mark.parametrize("threat", [ThreatModel("Linf", 0.1), ThreatModel("L2", 1.0)])
def test_the_study_budget_reaches_the_reference_tail(
    pretrained: tuple[dict[str, nn.Module], torch.Tensor], name: str, threat: ThreatModel
) -> None:
    """The default study's representation attack (PGD and APGD, the larger per sample)
    against a stronger one: 2 restarts of 60-step PGD and of 60-step APGD (the full
    10 x 500 figure is in benchmarks/results/bench_tail.md). Measured once on 40 such points
    against 4 restarts of 150 steps: 5th percentile 0.978 or more at the demo's budget (10
    steps x 2 restarts of both), where one 20-step PGD gets 0.82-0.94. Encoders pretrained
    this briefly are easier to attack than the default study's (see the benchmark)."""
    encoders, x = pretrained
    encoder = encoders[name]
    budget = default_config().attack

    def shift(method: str, steps: int, restarts: int) -> torch.Tensor:
        found = attack_representation(
            encoder, x, threat, steps=steps, restarts=restarts, method=method, seed=7
        )
        return found.shift.double()

    study = shift(
        budget.representation_method, budget.representation_steps, budget.representation_restarts
    )
    reference = torch.stack([study, shift("pgd", 60, 2), shift("apgd", 60, 2)]).amax(0)
    ratio = study / reference
    assert float(ratio.median()) >= MEDIAN_FLOOR
    assert float(ratio.quantile(0.05)) >= TAIL_FLOOR
