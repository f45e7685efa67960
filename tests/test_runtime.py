"""The runtime's options for the attacks: bfloat16 search (what is reported stays
float32, so it can weaken an attack but never make a number wrong) and torch.compile
(a compiled copy that certifiers still read)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import cnn_encoder, linear_encoder

from robust_transfer.attacks import attack_representation
from robust_transfer.certify import certify_all
from robust_transfer.core.runtime import Precision, Runtime
from robust_transfer.core.schema import RESULTS_FILE
from robust_transfer.pipeline import run_study
from robust_transfer.study.config import parse_config
from robust_transfer.theory.threat import ThreatModel

CPU = torch.device("cpu")
BF16 = Runtime(CPU, Precision.BF16)


def _attack(encoder: torch.nn.Module, x: torch.Tensor, threat: ThreatModel):  # type: ignore[no-untyped-def]
    return attack_representation(encoder, x, threat, steps=20, restarts=1, seed=0, batch_size=16)


def test_bf16_search_reports_float32_and_reaches_the_known_optimum() -> None:
    torch.manual_seed(1)
    matrix = torch.randn(6, 1 * 8 * 8) / 8
    encoder = torch.nn.Sequential(torch.nn.Flatten(), linear_encoder(matrix)).eval()
    # Mid-grey inputs: the box [0, 1] does not bind at eps 0.3, so the optimum of a
    # linear encoder under L2 is exactly eps * sigma_max.
    x = torch.full((12, 1, 8, 8), 0.5)
    threat = ThreatModel("L2", 0.3)
    exact = 0.3 * float(torch.linalg.matrix_norm(matrix, ord=2))
    plain = _attack(encoder, x, threat)
    with BF16.search_precision():
        reduced = _attack(encoder, x, threat)
    assert torch.equal(reduced.features, plain.features)
    with torch.no_grad():
        recomputed = (encoder(reduced.x_adv) - encoder(x)).norm(dim=1)
    assert torch.equal(reduced.shift, recomputed)  # the reported shift is float32's
    assert (reduced.shift <= exact * (1 + 1e-5)).all()
    # bfloat16 keeps 8 bits of mantissa: the search may be a little weaker, never wrong.
    assert reduced.shift.mean() >= 0.98 * plain.shift.mean()
    assert reduced.shift.mean() >= 0.95 * exact
    # The option is live: the search ran in another arithmetic.
    assert not torch.equal(reduced.x_adv, plain.x_adv)


def test_bf16_leaves_the_search_alone_outside_its_context() -> None:
    encoder, x = cnn_encoder(), torch.rand(8, 1, 12, 12)
    threat = ThreatModel("Linf", 0.05)
    before = _attack(encoder, x, threat).x_adv
    with BF16.search_precision():
        inside = _attack(encoder, x, threat).x_adv
    assert not torch.equal(inside, before)
    assert torch.equal(_attack(encoder, x, threat).x_adv, before)


STUDY = """
name = "bf16"
eval_points = 24
radius_points = 24
[attack]
steps = 3
targeted_restarts = 1
representation_steps = 4
batch_size = 12
[threats]
Linf = ["1/40"]
[encoders.random]
protocol = "random"
pretrain_task = "mnist-5-9"
[adaptations.lp]
protocol = "linear-probe"
[[tasks]]
name = "mnist-5-9"
"""


def test_a_bf16_study_changes_no_clean_or_certified_number(tmp_path: Path) -> None:
    config = parse_config(tomllib.loads(STUDY))
    records = {}
    for precision in Precision:
        out = tmp_path / precision.value
        runtime = Runtime(CPU, precision)
        run_study(config, out, cache_dir=tmp_path / "cache", runtime=runtime, progress=False)
        results = json.loads((out / RESULTS_FILE).read_text())
        assert results["runtime"]["precision"] == precision.value
        (records[precision],) = results["records"]
    fp32, bf16 = records[Precision.FP32], records[Precision.BF16]
    for key in ("clean_acc", "certified_robust_acc", "median_margin", "weight_gap"):
        assert bf16[key] == fp32[key], key
    # The attacks searched in bfloat16 (they found other points), a little weaker or
    # stronger, never by much on this small CNN.
    assert bf16["mean_shift"] != fp32["mean_shift"]
    assert bf16["pgd_robust_acc"] == pytest.approx(fp32["pgd_robust_acc"], abs=0.1)
    assert bf16["mean_shift"] == pytest.approx(fp32["mean_shift"], rel=0.05)


def test_compiled_encoder_attacks_alike_and_is_still_certified() -> None:
    encoder, x = cnn_encoder(), torch.rand(16, 1, 12, 12)
    threat = ThreatModel("Linf", 0.05)
    compiled = Runtime(CPU, compile=True).prepared(encoder)
    assert compiled is not encoder
    assert type(compiled) is type(encoder)
    assert compiled._compiled_call_impl is not None
    assert encoder._compiled_call_impl is None
    plain, fast = _attack(encoder, x, threat), _attack(compiled, x, threat)
    torch.testing.assert_close(fast.shift, plain.shift, rtol=1e-4, atol=1e-5)
    for method in ("ibp", "crown"):
        (bound,) = certify_all(compiled, x, threat, [method]).bounds.values()
        (reference,) = certify_all(encoder, x, threat, [method]).bounds.values()
        torch.testing.assert_close(bound, reference)
        assert (bound >= fast.shift - 1e-5).all()
