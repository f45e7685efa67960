"""Adversarial adaptation: each recipe learns and is seeded, probes leave the encoder bit
for bit, the eps schedule and TWINS' two losses are what they say (checked against
independent computations), BitFit and LoRA move only what they own, the cost counts are
exact, and the advice follows its rule."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import pretrained_on_digits
from torch import nn

from robust_transfer.attacks import attack_classifier
from robust_transfer.cli import commands as cli
from robust_transfer.core.errors import InputError
from robust_transfer.data import ImageDataset, get_task
from robust_transfer.data.sources import load_split
from robust_transfer.data.tasks import stratified_sample
from robust_transfer.models import SmallCNN, load_encoder, load_head
from robust_transfer.models.features import extract_features
from robust_transfer.theory.threat import ThreatModel
from robust_transfer.training import AdaptConfig, Adapted, Recipe, adapt, objectives, wrappers
from robust_transfer.training.advice import HOLDS, RETAINED, advise, measure_advice
from robust_transfer.training.objectives import EpsSchedule

LINF = ThreatModel("Linf", 0.1)


@cache
def _data() -> tuple[ImageDataset, ImageDataset]:
    split = get_task("mnist-5-9").downstream
    return split.train.subset(torch.arange(400)), split.test.subset(torch.arange(200))


@cache
def _pretrained(norm: bool) -> nn.Module:
    """A small CNN (with batch norm when ``norm``) trained briefly on digits 0-4."""
    torch.manual_seed(0)
    if not norm:
        return pretrained_on_digits(SmallCNN(feature_dim=32))
    return pretrained_on_digits(
        nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 7 * 7, 32),
        )
    )


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _accuracies(adapted: Adapted, steps: int = 20) -> tuple[float, float]:
    """Clean and robust accuracy on held-out points under a PGD stronger than training's
    (four times the steps, two restarts)."""
    test = _data()[1]
    model = nn.Sequential(adapted.encoder, nn.Flatten(), adapted.head).eval()
    result = attack_classifier(model, test.x, test.y, LINF, steps=steps, restarts=2, seed=7)
    return result.clean_accuracy, result.robust_accuracy


RECIPES: dict[str, dict[str, Any]] = {
    "adversarial-probe-pgd": {"protocol": "linear-probe", "adversary": "pgd"},
    "adversarial-probe-trades": {"protocol": "linear-probe", "adversary": "trades"},
    "roli": {"protocol": "lp-ft", "adversary": "pgd", "epochs": 2},
    "adversarial-finetune": {
        "protocol": "finetune",
        "adversary": "pgd",
        "epochs": 3,
        "lr": 2e-3,
        "eps_warmup": 0.3,
    },
    "bitfit": {"protocol": "bitfit", "adversary": "pgd", "epochs": 2},
    "lora": {"protocol": "lora", "adversary": "trades", "epochs": 2},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_adversarial_recipes_learn_and_beat_the_clean_probe_under_attack(name: str) -> None:
    encoder = _pretrained(norm=False)
    before = _state(encoder)
    config = AdaptConfig(**RECIPES[name], threat=LINF)
    adapted = adapt(encoder, _data()[0], config)
    clean, robust = _accuracies(adapted)
    assert clean > 0.5  # chance: 0.2
    plain = adapt(encoder, _data()[0], AdaptConfig("linear-probe"))
    assert robust > _accuracies(plain)[1]
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert config.recipe == {
        "adversarial-probe-pgd": Recipe.ADVERSARIAL_PROBE,
        "adversarial-probe-trades": Recipe.ADVERSARIAL_PROBE,
        "roli": Recipe.ROLI,
        "adversarial-finetune": Recipe.ADVERSARIAL_FINETUNE,
    }.get(name)
    assert adapted.metrics["encoder_backwards"] > 0
    assert config.to_dict()["threat"] == {"norm": "Linf", "eps": 0.1}


def test_adversarial_probe_leaves_the_encoder_bit_for_bit() -> None:
    encoder = _pretrained(norm=True)
    before = _state(encoder)
    flags = [p.requires_grad for p in encoder.parameters()]
    config = AdaptConfig("linear-probe", adversary="trades", threat=LINF, probe_epochs=1)
    adapted = adapt(encoder, _data()[0], config)
    assert adapted.encoder is encoder
    # Weights and batch-norm statistics alike; no gradient left behind, flags restored.
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters())
    assert [p.requires_grad for p in encoder.parameters()] == flags
    assert not encoder.training


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    encoder = _pretrained(norm=True)
    data = _data()[0]

    def weights(seed: int) -> list[torch.Tensor]:
        config = AdaptConfig(
            "lp-ft", adversary="trades", threat=LINF, epochs=1, eps_warmup=0.5, seed=seed
        )
        adapted = adapt(encoder, data, config)
        return [*adapted.encoder.state_dict().values(), adapted.head.weight]

    first, again, other = weights(3), weights(3), weights(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_eps_schedule_ramps_linearly_then_holds() -> None:
    schedule = EpsSchedule(ThreatModel("L2", 1.0), steps=10, warmup=0.5)
    eps = [None if (t := schedule.next()) is None else t.eps for _ in range(12)]
    assert eps == [None, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    constant = EpsSchedule(LINF)
    assert all(constant.next() == LINF for _ in range(3))


def test_twins_loss_is_the_mean_of_batch_and_pretrained_statistics() -> None:
    encoder = copy.deepcopy(_pretrained(norm=True))
    head = nn.Linear(32, 5)
    norms = wrappers.batch_norms(encoder)
    model = wrappers.Joined(encoder, head).train()
    x, y = _data()[0].x[:64], _data()[0].y[:64]
    pretrained = copy.deepcopy(model).eval()
    batch_stats = copy.deepcopy(model).train()
    expected = (F.cross_entropy(batch_stats(x), y) + F.cross_entropy(pretrained(x), y)) / 2
    loss = wrappers.twins(lambda m, x, y, g: F.cross_entropy(m(x), y), norms)
    value = loss(model, x, y, torch.Generator())
    torch.testing.assert_close(value, expected)
    # The running statistics moved once (the batch branch), not twice, and the model
    # trains on.
    torch.testing.assert_close(norms[0].running_mean, batch_stats.encoder[1].running_mean)
    assert model.training
    assert all(m.training for m in norms)


def test_twins_advances_the_eps_schedule_once_per_step() -> None:
    schedule = EpsSchedule(ThreatModel("L2", 1.0), steps=4, warmup=0.5)
    seen: list[float | None] = []

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> Any:
        threat = schedule.next()
        seen.append(None if threat is None else threat.eps)
        return F.cross_entropy(model(x), y)

    encoder = copy.deepcopy(_pretrained(norm=True))
    model = wrappers.Joined(encoder, nn.Linear(32, 5)).train()
    loss = wrappers.twins(objective, wrappers.batch_norms(encoder), schedule)
    x, y = _data()[0].x[:16], _data()[0].y[:16]
    for _ in range(3):
        loss(model, x, y, torch.Generator())
    # Both branches of a step at the step's eps: steps 0, 1, 2 of a 2-step ramp.
    assert seen == [None, None, 0.5, 0.5, 1.0, 1.0]


def test_frozen_statistics_stay_the_pretrained_ones() -> None:
    encoder = _pretrained(norm=True)
    config = AdaptConfig("lp-ft", adversary="pgd", threat=LINF, epochs=1, norm_stats="frozen")
    adapted = adapt(encoder, _data()[0], config).encoder
    for old, new in zip(wrappers.batch_norms(encoder), wrappers.batch_norms(adapted), strict=True):
        assert torch.equal(old.running_mean, new.running_mean)
        assert torch.equal(old.running_var, new.running_var)
        assert not torch.equal(old.weight, new.weight)  # the affine parameters train
    twins = AdaptConfig("lp-ft", adversary="pgd", threat=LINF, epochs=1, norm_stats="twins")
    assert _accuracies(adapt(encoder, _data()[0], twins))[0] > 0.5
    with pytest.raises(InputError, match="batch-norm"):
        adapt(_pretrained(norm=False), _data()[0], twins)


def test_bitfit_moves_only_biases_and_lora_only_low_rank() -> None:
    encoder = _pretrained(norm=False)
    bitfit = adapt(encoder, _data()[0], AdaptConfig("bitfit", epochs=1, lr=1e-2)).encoder
    moved = {
        name
        for name, value in bitfit.state_dict().items()
        if not torch.equal(value, encoder.state_dict()[name])
    }
    assert moved
    assert all(name.endswith("bias") for name in moved)
    rank = 2
    lora = adapt(encoder, _data()[0], AdaptConfig("lora", epochs=1, lr=1e-2, lora_rank=rank))
    state = lora.encoder.state_dict()
    assert sorted(state) == sorted(encoder.state_dict())  # merged back into plain layers
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            delta = (state[f"{name}.weight"] - module.weight).flatten(1)
            # float32 rounding of the merge aside (rtol), the update has rank <= r
            assert 0 < int(torch.linalg.matrix_rank(delta.double(), rtol=1e-4)) <= rank
            assert torch.equal(state[f"{name}.bias"], module.bias)


def test_cost_counts_every_image_through_the_encoder() -> None:
    encoder, data = _pretrained(norm=False), _data()[0]
    epochs, n = 2, len(data)
    metrics = adapt(encoder, data, AdaptConfig("finetune", epochs=epochs)).metrics
    # Training only: the diagnostics after it (feature movement, training accuracy) are
    # not the protocol's cost.
    assert metrics["encoder_forwards"] == epochs * n
    assert metrics["encoder_backwards"] == epochs * n
    probe = adapt(encoder, data, AdaptConfig("linear-probe")).metrics
    assert (probe["encoder_forwards"], probe["encoder_backwards"]) == (n, 0)  # its features
    given = adapt(encoder, data, AdaptConfig("linear-probe"), features=torch.randn(n, 32))
    assert given.metrics["encoder_forwards"] == 0
    # PGD through the frozen encoder: per epoch, each point's attack steps backward and
    # at least as many forwards, plus the training forward; the head learns without one.
    steps = 3
    adversarial = adapt(
        encoder,
        data,
        AdaptConfig(
            "linear-probe", adversary="pgd", threat=LINF, attack_steps=steps, probe_epochs=1
        ),
        features=torch.randn(n, 32),
    ).metrics
    assert adversarial["encoder_backwards"] == steps * n
    assert adversarial["encoder_forwards"] >= (steps + 1) * n


def test_training_attacks_never_touch_evaluation_points_or_seeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[torch.Tensor, int]] = []
    original = objectives.attack_classifier

    def recording(model: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((x.clone(), kwargs["seed"]))
        return original(model, x, *args, **kwargs)

    monkeypatch.setattr(objectives, "attack_classifier", recording)
    train, test = _data()
    config = AdaptConfig("lp-ft", adversary="pgd", threat=LINF, epochs=1, seed=0)
    adapt(_pretrained(norm=False), train, config)
    assert seen
    evaluation = test.x.flatten(1)
    for x, seed in seen:
        # Every attacked row is a training point, none an evaluation point ...
        rows = x.flatten(1)[:, None, :]
        assert bool((rows == train.x.flatten(1)[None]).all(dim=2).any(dim=1).all())
        assert not bool((rows == evaluation[None]).all(dim=2).any())
        # ... and its random start comes from the training generator, not the study's
        # evaluation seed.
        assert seed != config.seed


@pytest.mark.parametrize(
    ("robust", "first", "finetuning"),
    [
        (0.9 * RETAINED, Recipe.ROLI, "adds"),
        (RETAINED, Recipe.ADVERSARIAL_PROBE, "destroys"),
        (0.99, Recipe.ADVERSARIAL_PROBE, "destroys"),
        (HOLDS, Recipe.ROLI, "adds"),
        (0.9 * HOLDS, Recipe.ADVERSARIAL_FINETUNE, "adds"),
        (0.0, Recipe.ADVERSARIAL_FINETUNE, "adds"),
    ],
)
def test_advice_rule(robust: float, first: Recipe, finetuning: str) -> None:
    advice = advise(0.9, 0.0, 1.0, robust)
    assert (advice.first, advice.finetuning) == (first, finetuning)
    assert advice.reach == robust
    # Measured above chance: with chance 0.5, keeping 0.5 + share * 0.5 is keeping share.
    above = advise(0.9, 0.0, 1.0, 0.5 + robust * 0.5, chance=0.5)
    assert above.first == first


def test_a_collapsed_probe_is_not_a_robust_representation() -> None:
    # A constant head on two balanced classes: as accurate under attack as clean.
    advice = advise(0.5, 0.5, 0.5, 0.5, chance=0.5)
    assert advice.first is Recipe.ADVERSARIAL_FINETUNE
    assert advice.finetuning == "adds"


def test_advice_reads_training_points_only_and_leaves_the_encoder() -> None:
    encoder = _pretrained(norm=True)
    before = _state(encoder)
    train = _data()[0]
    advice = measure_advice(encoder, train, LINF, points=100)
    again = measure_advice(encoder, train, LINF, points=100)
    assert advice == again
    assert 0.0 <= advice.reach <= advice.adversarial_clean <= 1.0
    assert advice.probe_clean > 0.5
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"protocol": "finetune", "adversary": "pgd"}, "give threat"),
        ({"protocol": "finetune", "threat": LINF}, "only by adversarial"),
        (
            {"protocol": "certified-probe", "radius": 0.1, "adversary": "pgd", "threat": LINF},
            "bound",
        ),
        ({"protocol": "linear-probe", "norm_stats": "twins"}, "fine-tuning setting"),
        (
            {"protocol": "finetune", "eps_warmup": 1.0, "adversary": "pgd", "threat": LINF},
            "eps_warmup",
        ),
        ({"protocol": "finetune", "adversary": "fgsm", "threat": LINF}, "adversary"),
        ({"protocol": "lora", "lora_rank": 0}, "lora_rank"),
        ({"protocol": "finetune", "eps_warmup": 0.5}, "give adversary"),
    ],
)
def test_bad_adversarial_configs(values: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        AdaptConfig(**values)


def test_adapt_command_writes_what_it_trained_and_reloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "roli"
    factory = "robust_transfer.models:SmallCNN"
    args = ["adapt", "--encoder", factory, "--data", "task:mnist-5-9", "--n", "300"]
    args += ["--protocol", "lp-ft", "--adversary", "pgd", "--eps", "1/10", "--epochs", "1"]
    args += ["--attack-steps", "2", "--eval-points", "60", "--advise", "--quiet"]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "advice (Linf(eps=0.1)): try " in printed
    record = json.loads((out / "adapt.json").read_text())
    assert record["config"]["adversary"] == "pgd"
    assert record["config"]["threat"] == {"norm": "Linf", "eps": 0.1}
    assert record["advice"]["first"] in {r.value for r in Recipe}
    assert record["metrics"]["encoder_backwards"] > 0
    # The saved encoder and head alone give the held-out clean accuracy it reported.
    encoder = load_encoder(factory, out / "encoder.safetensors")
    head = load_head(out / "head.safetensors")
    test = stratified_sample(load_split("task:mnist-5-9", None).test, 60, seed=0)
    predicted = head(extract_features(encoder, test.x)).argmax(dim=1)
    assert float((predicted == test.y).float().mean()) == pytest.approx(record["test_acc"])
    assert record["test_robust_acc"] <= record["test_acc"]
    # A clean protocol with an eps warm-up is refused before any work, in one line.
    clean = [*args[:7], "--eps-warmup", "0.5", "--out", str(tmp_path / "clean")]
    assert cli.main(clean) == 2
    assert "give adversary" in capsys.readouterr().err
    assert not (tmp_path / "clean").exists()
