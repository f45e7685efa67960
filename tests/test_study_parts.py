"""The study's building blocks that need no trained encoder: regression attack, certificates,
the store, records, findings and tables."""

import math
from pathlib import Path

import pytest
import torch
from conftest import linear_encoder, mlp_encoder, random_head
from torch import nn

from robust_transfer import ThreatModel
from robust_transfer.attacks.regression import attack_regression
from robust_transfer.attacks.settings import AttackSettings
from robust_transfer.certify import NoCertificate, certified_shift, lipschitz_shift
from robust_transfer.core.store import Store
from robust_transfer.estimates.evaluate import (
    evaluate_classification,
    evaluate_regression,
    measure_shift,
)
from robust_transfer.estimates.records import aggregate
from robust_transfer.report import tables
from robust_transfer.study import findings
from robust_transfer.theory.losses import RegressionLoss

FAST = AttackSettings(steps=10, restarts=1, targeted_restarts=1, representation_steps=10)


@pytest.mark.parametrize("loss", ["absolute", "squared"])
def test_regression_attack_linear_oracle(loss: str) -> None:
    """w^T x + b under L2, ball inside the box: the worst residual is |r| + eps ||w||."""
    torch.manual_seed(0)
    model = nn.Linear(30, 1).eval()
    x = 0.3 + 0.4 * torch.rand(64, 30)
    targets = torch.randn(64)
    threat = ThreatModel("L2", 0.1)
    result = attack_regression(model, x, targets, threat, loss=loss, steps=20)
    with torch.no_grad():
        residual = (model(x).squeeze(1) - targets).abs()
    worst = residual + threat.eps * model.weight.norm()
    exact = worst if loss == "absolute" else worst.pow(2)
    assert (result.loss_adv >= 0.99 * exact).all()
    assert (result.loss_adv <= exact * (1 + 1e-5)).all()
    assert (threat.norms(result.delta) <= threat.eps * (1 + 1e-5)).all()


def test_regression_attack_rejects_bad_targets() -> None:
    model = nn.Linear(3, 1).eval()
    threat = ThreatModel("L2", 0.1)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        attack_regression(model, torch.rand(4, 3), torch.zeros(5), threat)
    with pytest.raises(TypeError, match="floating point"):
        attack_regression(model, torch.rand(4, 3), torch.zeros(4, dtype=torch.long), threat)
    with pytest.raises(ValueError, match="unknown regression loss"):
        attack_regression(model, torch.rand(4, 3), torch.zeros(4), threat, loss="huber")


def test_lipschitz_shift_is_an_upper_bound_that_attacks_respect() -> None:
    """A linear map scaled to spectral norm L is L-Lipschitz: the certified shift holds
    on every attacked point, and under L2 it is reached (the certificate is tight)."""
    matrix = torch.randn(8, 20)
    matrix = 1.5 * matrix / torch.linalg.matrix_norm(matrix, ord=2)
    encoder = linear_encoder(matrix)
    encoder.lipschitz_l2 = 1.5  # type: ignore[assignment]
    x = 0.3 + 0.4 * torch.rand(32, 20)
    for threat in (ThreatModel("L2", 0.1), ThreatModel("Linf", 0.02)):
        arrays = measure_shift(encoder, x, threat, FAST, seed=0)
        assert (arrays["shift"] <= arrays["certified_shift"] * (1 + 1e-5)).all()
    strong = AttackSettings(representation_steps=50, representation_restarts=2)
    l2 = measure_shift(encoder, x, ThreatModel("L2", 0.1), strong, seed=0)
    assert (l2["shift"] >= 0.99 * l2["certified_shift"]).all()
    assert lipschitz_shift(2.0, ThreatModel("Linf", 0.1), 100) == pytest.approx(2.0)
    with pytest.raises(NoCertificate, match=r"lipschitz: .*unsupported layer _Opaque.*; ibp: "):
        certified_shift(_Opaque(mlp_encoder(20)).eval(), x, ThreatModel("L2", 0.1))
    with pytest.raises(ValueError, match="lipschitz_l2"):
        lipschitz_shift(math.nan, ThreatModel("L2", 0.1), 10)


class _Opaque(nn.Module):
    """A module whose forward no certifier can read."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


def _classification_arrays(lipschitz: bool) -> dict[str, torch.Tensor]:
    matrix = torch.randn(6, 12)
    encoder: nn.Module = linear_encoder(matrix)
    if not lipschitz:
        encoder = _Opaque(encoder).eval()
    else:
        encoder.lipschitz_l2 = float(torch.linalg.matrix_norm(matrix, ord=2))  # type: ignore[assignment]
    head = random_head(6, 3, seed=1, scale=3.0)
    x = 0.35 + 0.3 * torch.rand(80, 12)
    with torch.no_grad():
        y = head(encoder(x)).argmax(dim=1)
    y[:8] = (y[:8] + 1) % 3  # some misclassified points
    threat = ThreatModel("L2", 0.05)
    shift = measure_shift(encoder, x, threat, FAST, seed=0)
    return evaluate_classification(encoder, head, x, y, threat, shift, FAST, seed=0)


def test_evaluation_arrays_are_consistent_and_certificates_sound() -> None:
    arrays = _classification_arrays(lipschitz=True)
    correct = arrays["correct"]
    assert not (arrays["robust_attacked"] & ~correct).any()
    assert not (arrays["certified_robust"] & ~arrays["robust_attacked"]).any()
    assert (arrays["adv_loss"] >= arrays["clean_loss"]).all()
    # With the exact (certified) shift of a linear encoder Result 1 is a guarantee.
    assert (arrays["adv_loss"] <= arrays["certified_loss_bound"] + 1e-4).all()
    record = aggregate(arrays)
    assert record["certified_but_broken"] == 0
    assert record["certified_loss_bound_exceeded"] == 0.0
    assert record["clean_acc"] == pytest.approx(float(correct.float().mean()))
    assert record["certified_robust_acc"] <= record["attacked_robust_acc"]  # type: ignore[operator]
    assert record["attacked_robust_acc"] <= record["pgd_robust_acc"]  # type: ignore[operator]


def test_record_without_certificate_has_nulls() -> None:
    record = aggregate(_classification_arrays(lipschitz=False))
    assert record["certified_robust_acc"] is None
    assert record["certified_loss_bound"] is None
    assert "certified_but_broken" not in record
    assert 0.0 <= record["predicted_robust_acc"] <= 1.0  # type: ignore[operator]


@pytest.mark.parametrize("loss", list(RegressionLoss))
def test_regression_evaluation_bound_holds_with_certified_shift(loss: RegressionLoss) -> None:
    matrix = torch.randn(5, 16)
    encoder = linear_encoder(matrix)
    encoder.lipschitz_l2 = float(torch.linalg.matrix_norm(matrix, ord=2))  # type: ignore[assignment]
    head = nn.Linear(5, 2).eval()
    x = 0.3 + 0.4 * torch.rand(40, 16)
    targets = torch.randn(40, 2)
    threat = ThreatModel("L2", 0.1)
    shift = measure_shift(encoder, x, threat, FAST, seed=0)
    arrays = evaluate_regression(encoder, head, x, targets, loss, threat, shift, FAST, seed=0)
    assert (arrays["adv_loss"] <= arrays["certified_loss_bound"] + 1e-4).all()
    assert (arrays["adv_loss"] >= arrays["clean_loss"]).all()
    record = aggregate(arrays)
    assert record["clean_acc"] is None
    assert record["certified_loss_bound_exceeded"] == 0.0


def test_store_round_trip_atomic_and_resumable(tmp_path: Path) -> None:
    store = Store(tmp_path)
    key = ("units", "mnist-5-9", "std", "linear-probe", "Linf", "0.1")
    arrays = {"shift": torch.rand(5), "correct": torch.tensor([True, False, True, True, False])}
    assert not store.has(key)
    store.save(key, arrays, {"seconds": 1.5})
    loaded = store.load(key)
    assert loaded is not None
    assert torch.equal(loaded[0]["correct"], arrays["correct"])
    assert loaded[1] == {"seconds": 1.5}
    # Aligned as torch allocates (safetensors' own tensors lie at any byte offset, and
    # CPU kernels round by alignment): a resumed unit computes as a fresh one.
    assert all(value.data_ptr() % 64 == 0 for value in loaded[0].values())
    assert not list(tmp_path.rglob("*.tmp"))
    # A half-written unit (as after a kill mid-write without the rename) is not taken.
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:40])
    assert store.load(key) is None
    assert not store.has(key)


def test_store_keys_that_differ_after_a_dot_do_not_collide(tmp_path: Path) -> None:
    store = Store(tmp_path)
    keys = [("units", "Linf", eps) for eps in ("0.025", "0.05", "0.1", "1")]
    for index, key in enumerate(keys):
        store.save(key, {"x": torch.tensor([float(index)])}, {})
    for index, key in enumerate(keys):
        loaded = store.load(key)
        assert loaded is not None
        assert float(loaded[0]["x"]) == index
    assert sorted(store.keys()) == sorted(keys)


def test_store_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.save(("..", "a/b"), {"x": torch.zeros(1)}, {})
    written = list(tmp_path.rglob("*.safetensors"))
    assert len(written) == 1
    assert tmp_path / "store" in written[0].parents


def _record(**values: object) -> dict[str, object]:
    base: dict[str, object] = {
        "task": "t",
        "threat": "Linf",
        "eps": 0.1,
        "adaptation": "linear-probe",
        "clean_acc": 0.9,
    }
    return base | values


def test_findings_detect_reproduced_and_not_reproduced() -> None:
    good = [
        _record(encoder="s", pretraining="standard", mean_shift=5.0, attacked_robust_acc=0.3),
        _record(encoder="a", pretraining="adversarial", mean_shift=2.0, attacked_robust_acc=0.6),
    ]
    bad = [
        _record(encoder="s", pretraining="standard", mean_shift=2.0, attacked_robust_acc=0.6),
        _record(encoder="a", pretraining="adversarial", mean_shift=5.0, attacked_robust_acc=0.3),
    ]
    assert findings.adversarial_vs_standard(good).holds is True
    assert findings.adversarial_vs_standard(bad).holds is False
    assert findings.adversarial_vs_standard(good[:1]).holds is None
    evidence = findings.adversarial_vs_standard(good).evidence
    assert evidence.startswith("In 1/1 (task, threat, eps, encoder pair) comparisons")
    assert "a shift 2 vs s 5; robust acc 0.600 vs 0.300" in evidence


def test_spearman() -> None:
    assert findings.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert findings.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert findings.spearman([1, 1, 1], [1, 2, 3]) is None
    assert findings.spearman([1, 2], [1, 2]) is None


def test_tables_render_nulls_and_numbers() -> None:
    rows = [{"encoder": "a", "eps": 0.1, "certified_robust_acc": None, "weight_gap": 12.345}]
    columns = [
        ("encoder", "enc"),
        ("eps", "eps"),
        ("certified_robust_acc", "cert"),
        ("weight_gap", "D"),
    ]
    md = tables.markdown(rows, columns)
    assert md.splitlines()[2] == "| a | 0.100 | - | 12.3 |"
    plain = tables.text(rows, columns)
    assert "enc" in plain.splitlines()[0]
    assert plain.splitlines()[2].split() == ["a", "0.100", "-", "12.3"]


def test_records_carry_every_certifier_and_the_tightest() -> None:
    """Two certifiers side by side: per-method fields, and the tightest per sample."""
    arrays = _classification_arrays(lipschitz=True)
    loose = arrays["certified_shift"] * 2.0
    arrays |= {
        "certified_shift@lipschitz": arrays["certified_shift"],
        "certified_shift@loose": loose,
    }
    margin, correct = arrays["margin"], arrays["correct"]
    arrays["certified_robust@lipschitz"] = arrays["certified_robust"]
    arrays["certified_robust@loose"] = correct & (margin > loose)
    record = aggregate(arrays)
    assert record["certifiers"] == ["lipschitz", "loose", "ibp"]  # tightest first
    assert record["certified_robust_acc"] == record["certified_robust_acc@lipschitz"]
    assert record["certified_robust_acc@loose"] <= record["certified_robust_acc"]  # type: ignore[operator]
    assert record["certified_but_broken@loose"] == 0


def test_certified_transfer_finding_counts_encoders_built_lipschitz_only() -> None:
    def row(encoder: str, adaptation: str, certified: float, constant: float | None) -> dict:
        return _record(
            encoder=encoder,
            threat="L2",
            adaptation=adaptation,
            certified_robust_acc=certified,
            attacked_robust_acc=0.8,
            lipschitz_l2=constant,
        )

    lipschitz = [row("lip", "linear-probe", 0.3, 1.0), row("lip", "certified-probe", 0.6, 1.0)]
    loose = [row("cnn", "linear-probe", 0.0, None), row("cnn", "certified-probe", 0.0, None)]
    finding = findings.certified_transfer(lipschitz + loose * 3)
    assert finding.holds is True
    assert "raises it in 1/1" in finding.evidence
    assert findings.certified_transfer(loose).holds is None


def test_records_measure_tightness_and_flag_collapsed_heads() -> None:
    arrays = _classification_arrays(lipschitz=True)
    record = aggregate(arrays)
    ratio = (arrays["certified_shift"] / arrays["shift"]).median()
    assert record["certified_tightness"] == pytest.approx(float(ratio))
    assert record["certified_tightness"] >= 1.0  # type: ignore[operator]
    assert record["certified_tightness@lipschitz"] == record["certified_tightness"]
    varied = arrays | {"prediction": torch.arange(len(arrays["label"])) % 3}
    assert aggregate(varied)["collapsed_head"] is False
    constant = arrays | {"prediction": torch.zeros_like(arrays["prediction"])}
    assert aggregate(constant)["collapsed_head"] is True
    one_label = constant | {"label": torch.zeros_like(arrays["label"])}
    assert aggregate(one_label)["collapsed_head"] is False
