"""The plan's pass counts against the passes the real functions make (counted by hooks
on the encoder), and the plan, budget and dry run from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import cnn_encoder, random_head
from torch import nn

from robust_transfer import ThreatModel, cli
from robust_transfer.attacks import attack_representation
from robust_transfer.attacks.sanity import margin_score, sanity_arrays
from robust_transfer.attacks.settings import AttackSettings
from robust_transfer.certify import crown as crown_module
from robust_transfer.certify import get_certifier, margin_lower_bounds
from robust_transfer.core.schema import STORE_DIR, StoreKind
from robust_transfer.core.store import Store
from robust_transfer.data.dataset import ImageDataset
from robust_transfer.estimates import expected
from robust_transfer.estimates.curves import RINGS
from robust_transfer.estimates.evaluate import study_pgd
from robust_transfer.estimates.expected import RefineSettings, profile_encoder
from robust_transfer.models.checkpoint import save_checkpoint
from robust_transfer.models.encoders import SmallCNN
from robust_transfer.study import calibration, cost
from robust_transfer.study.forecast import (
    BudgetError,
    Forecast,
    Stage,
    check_budget,
    parse_budget,
)
from robust_transfer.training.adapt import adapt
from robust_transfer.training.advice import measure_advice
from robust_transfer.training.protocols import AdaptConfig
from robust_transfer.training.wrappers import Passes

THREAT = ThreatModel("Linf", 0.1)


def _counted(encoder: nn.Module, run: object, points: int) -> cost.Passes:
    passes = Passes()
    passes.watch(encoder)
    try:
        run()  # type: ignore[operator]
    finally:
        passes.close()
    return cost.Passes(passes.forward / points, passes.backward / points)


@pytest.mark.parametrize("method", ["pgd", "apgd", "pgd+apgd"])
@pytest.mark.parametrize(("steps", "restarts"), [(3, 1), (4, 2)])
def test_representation_passes_are_counted_exactly(method: str, steps: int, restarts: int) -> None:
    encoder, x = cnn_encoder(), torch.rand(6, 1, 12, 12)
    settings = AttackSettings(
        representation_steps=steps, representation_restarts=restarts, representation_method=method
    )

    def run() -> None:
        attack_representation(encoder, x, THREAT, steps=steps, restarts=restarts, method=method)

    assert _counted(encoder, run, len(x)) == cost.representation(settings)


def test_study_pgd_passes_bound_the_count_and_meet_it_when_nothing_breaks() -> None:
    encoder, x = cnn_encoder(), torch.rand(6, 1, 12, 12)
    head = random_head(12, 3)
    model = nn.Sequential(encoder, head).eval()
    y = head(encoder(x)).argmax(1).detach()
    settings = AttackSettings(steps=3, restarts=2, targeted_restarts=2)
    for eps, exact in ((1e-6, True), (0.5, False)):
        threat = ThreatModel("Linf", eps)

        def run(threat: ThreatModel = threat) -> None:
            study_pgd(model, x, y, threat, settings, seed=0)

        counted, planned = _counted(encoder, run, len(x)), cost.study_pgd(settings)
        if exact:  # no point broken: every restart re-attacks every point
            assert counted == planned
        else:
            assert counted.forward <= planned.forward
            assert counted.backward <= planned.backward
            assert counted.backward < planned.backward  # the strong attack broke points


def test_sanity_and_profile_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder, x = cnn_encoder(), torch.rand(5, 1, 12, 12)
    head = random_head(12, 4)
    model = nn.Sequential(encoder, head).eval()
    y = torch.zeros(5, dtype=torch.long)
    sanity = _counted(encoder, lambda: sanity_arrays(model, x, margin_score(y), batch_size=8), 5)
    assert sanity == cost.SANITY
    assert _counted(encoder, lambda: profile_encoder(encoder, x), 5) == cost.profile(12)
    monkeypatch.setattr(expected, "FULL_JACOBIAN_FEATURES", 4)
    lazy = profile_encoder(encoder, x)
    # A head of 4 classes adds its 3 class differences: the plan's (classes - 1).
    assert _counted(encoder, lambda: lazy.head_drops(head, THREAT), 5) == cost.Passes(1, 3)


def test_the_profile_of_a_wide_encoder_waits_for_the_heads() -> None:
    assert expected.full_jacobian(100, 64, 784)
    assert not expected.full_jacobian(10, 2048, 784)  # a ResNet-50: heads' spans instead
    assert not expected.full_jacobian(10**5, 64, 784)  # too many numbers to store


def _digits(n: int = 40) -> ImageDataset:
    torch.manual_seed(0)
    return ImageDataset(torch.rand(n, 1, 12, 12), torch.arange(n) % 3, "t", ("a", "b", "c"))


@pytest.mark.parametrize(
    ("protocol", "adversary"),
    [
        ("linear-probe", "none"),
        ("linear-probe", "pgd"),
        ("linear-probe", "trades"),
        ("certified-probe", "none"),
        ("finetune", "none"),
        ("finetune", "pgd"),
        ("finetune", "trades"),
        ("lp-ft", "pgd"),
        ("bitfit", "pgd"),
        ("anchored-finetune", "none"),
        ("partial-finetune", "none"),
    ],
)
def test_adaptation_passes_are_what_training_counts(protocol: str, adversary: str) -> None:
    data = _digits()
    extra: dict[str, object] = {} if adversary == "none" else {"threat": THREAT}
    if protocol == "certified-probe":
        extra["radius"] = 0.1
    config = AdaptConfig(
        protocol,  # type: ignore[arg-type]
        adversary=adversary,  # type: ignore[arg-type]
        epochs=2,
        probe_epochs=2,
        attack_steps=3,
        batch_size=16,
        **extra,  # type: ignore[arg-type]
    )
    metrics = adapt(cnn_encoder(), data, config).metrics
    planned = cost.adaptation(config, len(data), features_cached=False)
    assert (metrics["encoder_forwards"], metrics["encoder_backwards"]) == (
        planned.forward,
        planned.backward,
    )


def test_advice_passes_are_counted_exactly() -> None:
    data, encoder = _digits(), cnn_encoder()
    features = encoder(data.x).detach()

    def run() -> None:
        measure_advice(encoder, data, THREAT, points=10, attack_steps=4, features=features)

    counted = _counted(encoder, run, 1)
    assert counted == cost.advice(len(data), 10, 4)


def test_crown_refuses_work_that_would_take_hours(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder, x = cnn_encoder(), torch.rand(4, 1, 12, 12)
    assert isinstance(get_certifier("crown-full").certify(encoder, x, THREAT), torch.Tensor)
    monkeypatch.setattr(crown_module, "WORK_LIMIT", 1e3)
    refused = get_certifier("crown-full").certify(encoder, x, THREAT)
    assert "would carry" in refused.reason  # type: ignore[union-attr]
    assert "\n" not in refused.reason  # type: ignore[union-attr]
    head = margin_lower_bounds(encoder, random_head(12, 3), x, THREAT)
    assert "head-crown would carry 3 linear bounds" in head.reason  # type: ignore[union-attr]


def test_budget_parsing_and_refusal() -> None:
    assert parse_budget("90") == 90
    assert parse_budget("15m") == 900
    assert parse_budget("2h") == 7200
    for bad in ("", "m", "-3s", "inf", "10 min"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    plan = Forecast(units=1, stages=[], calibrations={}, baseline=0.0, device="cpu")
    check_budget(plan, 1.0)  # no work is within any budget
    plan.stages.append(Stage("heads", "e", 10, cost.NONE, 100.0, 0.0, 100.0))
    assert plan.seconds == 100.0
    with pytest.raises(BudgetError, match="over the budget of 50 s"):
        check_budget(plan, 50.0)


@pytest.fixture
def where(tmp_path: Path) -> Path:
    save_checkpoint(tmp_path / "enc.safetensors", SmallCNN(feature_dim=8).eval(), {})
    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "pts.npz", x=x, y=np.arange(30) % 3)
    return tmp_path


def _transfer(where: Path, *extra: str) -> list[str]:
    return [
        "transfer",
        "--encoder",
        str(where / "enc.safetensors"),
        "--data",
        str(where / "pts.npz"),
        "--out",
        str(where / "out"),
        "--n",
        "6",
        "--train-points",
        "20",
        "--steps",
        "2",
        "--linf",
        "0.05",
        "--l2",
        "--quiet",
        *extra,
    ]


def test_dry_run_prints_the_plan_and_runs_nothing(
    where: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(_transfer(where, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "representation attack" in out
    assert "plan: 2 units, about" in out
    assert not (where / "out").exists()


def test_budget_refuses_in_one_line_and_force_runs(
    where: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(_transfer(where, "--budget", "0.001s")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "over the budget of 0 s" in err[0]
    assert not (where / "out").exists()
    # A dry run with a budget says, by its exit code, whether the run would start.
    assert cli.main(_transfer(where, "--budget", "0.001s", "--dry-run")) == 3
    assert "over the budget" in capsys.readouterr().err
    assert cli.main(_transfer(where, "--budget", "1h", "--dry-run")) == 0
    assert not (where / "out").exists()
    assert cli.main(_transfer(where, "--budget", "0.001s", "--force")) == 0
    assert (where / "out" / "results.json").is_file()
    capsys.readouterr()
    # A finished study costs nothing more: its plan prices only what is not stored.
    assert cli.main(_transfer(where, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "2 of 2 units already stored" in out
    assert "plan: 0 units, about 0 s" in out


def test_plan_command_writes_json(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = where / "study.toml"
    config.write_text(
        f"""
name = "p"
eval_points = 6
train_points = 20
certifiers = ["ibp"]
[attack]
steps = 2
[encoders.e]
spec = "{where / "enc.safetensors"}"
[adaptations.linear-probe]
protocol = "linear-probe"
[[tasks]]
name = "t"
data = "{where / "pts.npz"}"
threats = {{ Linf = [0.05, 0.1] }}
"""
    )
    assert cli.main(["plan", str(config), "--json", str(where / "plan.json")]) == 0
    plan = json.loads((where / "plan.json").read_text())
    stages = {row["stage"] for row in plan["stages"]}
    assert {"train features", "representation attack", "certificates", "PGD on heads"} <= stages
    # Named certifiers only: no head certificate without head-crown.
    assert "head certificates" not in stages
    assert plan["units"] == 2
    assert plan["seconds"] > 0
    attack = next(row for row in plan["stages"] if row["stage"] == "representation attack")
    assert attack["points"] == 12  # 6 points at each of 2 threats
    assert plan["most_seconds"] >= plan["seconds"]
    assert any(note.startswith("task t, e: a pilot probe's refinement") for note in plan["notes"])
    # A stand-in's weights are not the encoder's: no pilot, and the plan says so.
    stand_in = ["--stand-in", "e=robust_transfer.models:SmallCNN"]
    assert cli.main(["plan", str(config), *stand_in, "--json", str(where / "plan.json")]) == 0
    notes = json.loads((where / "plan.json").read_text())["notes"]
    assert "refinement priced at 10% of the points, no pilot (timed on a stand-in): t/e" in notes
    assert not any("pilot probe" in note for note in notes)


def test_the_pilot_prices_the_refinement_the_run_makes(
    where: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How many points the expected robust accuracy and its curve attack depends on the
    encoder and the head: the plan's pilot measures it. With the study's few training
    points and no more evaluation points than the pilot takes, its probe is the study's
    and it attacks exactly the points the run attacks, refinement and curve, with the
    same passes through the encoder (attacks stop at success)."""
    attacked: list[int] = []
    passes = Passes()
    attack = expected.EncoderProfile._attack

    def counted(self: expected.EncoderProfile, *args: Any) -> torch.Tensor:
        attacked.append(len(args[-1]))
        passes.watch(self.encoder)
        try:
            return attack(self, *args)
        finally:
            passes.close()

    monkeypatch.setattr(expected.EncoderProfile, "_attack", counted)
    # Noise labelled by which half is brighter, and small radii: of a seeded encoder's
    # heads, the refinement takes a few points, the curve (at the largest eps) more.
    rng = np.random.default_rng(1)
    x = rng.random((150, 1, 28, 28)).astype(np.float32)
    y = x[:, 0, :, :14].mean(axis=(1, 2)) > x[:, 0, :, 14:].mean(axis=(1, 2))
    np.savez(where / "halves.npz", x=x, y=y.astype(np.int64))
    torch.manual_seed(0)
    save_checkpoint(where / "seeded.safetensors", SmallCNN(feature_dim=8).eval(), {})
    config = where / "study.toml"
    config.write_text(
        f"""
name = "p"
eval_points = 30
train_points = 40
curve_points = 5
certifiers = ["ibp"]
[attack]
steps = 2
[encoders.e]
spec = "{where / "seeded.safetensors"}"
[adaptations.linear-probe]
protocol = "linear-probe"
[[tasks]]
name = "t"
data = "{where / "halves.npz"}"
threats = {{ Linf = [0.003, 0.005, 0.008] }}
"""
    )
    assert cli.main(["plan", str(config), "--json", str(where / "plan.json")]) == 0
    plan = json.loads((where / "plan.json").read_text())
    piloted, attacked[:] = sum(attacked), []
    planned = (passes.forward, passes.backward)
    passes.forward = passes.backward = 0
    assert cli.main(["run", str(config), "--out", str(where / "out"), "--quiet"]) == 0
    assert sum(attacked) == piloted > 0
    assert (passes.forward, passes.backward) == planned
    row = next(row for row in plan["stages"] if row["stage"] == "refinement")
    assert (row["forward"], row["backward"]) == planned
    # At most, every point of the 3 threats is refined, and the curve's checks each of
    # its 30 points at every ring: 7 steps of PGD, the clean and final outputs each.
    most = cost.attack(RefineSettings().steps, 1) * (3 * 30 + RINGS * 30)
    calibrated = plan["calibrations"]["e"]
    every = most.forward * calibrated["forward"] + most.backward * calibrated["backward"]
    assert plan["most_seconds"] == pytest.approx(plan["seconds"] - row["seconds"] + every)
    assert any("pilot probe's refinement on 30 points" in note for note in plan["notes"])


def test_fewer_points_give_the_same_answers_for_the_points_they_share(where: Path) -> None:
    """``--n`` bounds the work, not the answers: every per-sample array of a unit on the
    first points equals the run over more points (heads train on the same points). Each
    run is its own process, as a user's are, on one thread."""
    small, large = where / "small", where / "large"
    for out, n in ((small, "4"), (large, "6")):
        args = _transfer(where)
        args[args.index("--out") + 1], args[args.index("--n") + 1] = str(out), n
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "robust_transfer.cli", *args], check=True, env=env)
    few, many = Store(small / STORE_DIR), Store(large / STORE_DIR)
    keys = [key for key in few.keys() if key[0] == StoreKind.UNITS]  # noqa: SIM118
    assert len(keys) == 2
    for key in keys:
        loaded_few, loaded_many = few.load(key), many.load(key)
        assert loaded_few is not None
        assert loaded_many is not None
        for name, values in loaded_few[0].items():
            torch.testing.assert_close(
                values, loaded_many[0][name][:4], rtol=1e-5, atol=1e-6, equal_nan=True
            )


def test_activations_grow_with_the_image_and_bound_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoder = cnn_encoder()
    small, _, _ = calibration.activations(encoder, torch.rand(2, 1, 12, 12))
    large, _, _ = calibration.activations(
        nn.Sequential(nn.Upsample(scale_factor=2), encoder[:-2], nn.Flatten()),
        torch.rand(2, 1, 12, 12),
    )
    # Four times the pixels: about four times what a backward pass keeps per image.
    assert 3.0 < large / small < 5.0
    monkeypatch.setattr(calibration, "ACTIVATION_BUDGET", small * 5.5)
    assert calibration.bounded_batch(encoder, torch.rand(2, 1, 12, 12), 250) == 5
    assert calibration.bounded_batch(encoder, torch.rand(2, 1, 12, 12), 3) == 3
