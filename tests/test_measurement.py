"""The entry point: an encoder measured once, heads evaluated on it, whole robustness
curves; checked against attacks at each eps (the independent computation) and against
certificates (a lower bound the curve may never fall below)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import robust_transfer as rt
from robust_transfer.attacks.settings import AttackSettings
from robust_transfer.core.errors import InputError
from robust_transfer.data.tasks import get_task
from robust_transfer.training import AdaptConfig, adapt

_SETTINGS = AttackSettings(
    steps=20, targeted_restarts=2, representation_steps=5, representation_restarts=1
)


@pytest.fixture(scope="module")
def setting() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[nn.Linear]]:
    """A random MLP on 8x8 digits 5-9 and three heads trained on the training split
    (held out from the points they are evaluated on)."""
    torch.manual_seed(0)
    split = get_task("digits8x8-5-9").downstream
    pixels = split.train.x[0].numel()
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 64), nn.ReLU(), nn.Linear(64, 32))
    encoder.eval()
    heads = [
        adapt(encoder, split.train, AdaptConfig(protocol="linear-probe", weight_decay=wd)).head
        for wd in (1e-4, 1e-2)
    ]
    config = AdaptConfig(protocol="certified-probe", radius=0.05, robust_weight=0.5)
    heads.append(adapt(encoder, split.train, config).head)
    return encoder, split.test.x[:120], split.test.y[:120], heads


@pytest.mark.parametrize(("norm", "eps_max"), [("Linf", 0.04), ("L2", 0.6)])
def test_curves_agree_with_attacks_at_every_eps(
    setting: tuple[nn.Module, torch.Tensor, torch.Tensor, list[nn.Linear]],
    norm: str,
    eps_max: float,
) -> None:
    encoder, x, y, heads = setting
    checked = [eps_max * k / 5 for k in range(1, 6)]
    measured = rt.measure(
        encoder, x, [rt.ThreatModel(norm, e) for e in checked], settings=_SETTINGS
    )
    errors = []
    for head in heads:
        curve = measured.curve(head, y, norm, eps_max, points=21)
        assert curve.accuracy[0] == pytest.approx(
            float((head(encoder(x)).argmax(1) == y).float().mean())
        )
        assert bool((curve.accuracy[1:] <= curve.accuracy[:-1]).all())  # never rises with eps
        assert 0.0 <= curve.area <= float(curve.accuracy[0]) + 1e-9
        for record in measured.evaluate(head, y, attack=True).records:
            value = curve.at(float(record["eps"]))
            errors.append(abs(value - float(record["attacked_robust_acc"])))
            certified = record["certified_robust_acc"]
            if certified is not None:  # a guarantee: the curve never falls below it
                assert value >= certified - 1e-9
            assert value >= float(record["head_certified_robust_acc"] or 0.0) - 1e-9
        # Refinement is per point near its own radius, not per point per eps.
        assert curve.attacked_points <= 4 * len(x)
    assert sum(errors) / len(errors) <= 0.02, errors


def test_results_print_and_convert(
    setting: tuple[nn.Module, torch.Tensor, torch.Tensor, list[nn.Linear]],
) -> None:
    encoder, x, y, heads = setting
    measured = rt.measure(encoder, x[:30], ["Linf:1/100", "L2:0.25"], settings=_SETTINGS)
    result = measured.evaluate(heads[0], y[:30], name="probe")
    shown = str(result)
    assert shown.startswith("probe\n")
    assert "expected_robust_acc" in shown
    assert "pgd_robust_acc" not in shown  # not asked for: not computed, not shown
    frame = result.to_frame()
    assert list(frame["eps"]) == [0.01, 0.25]
    assert set(frame["head"]) == {"probe"}
    assert json.loads(result.to_json())["records"][1]["threat"] == "L2"
    summary = measured.summary()
    assert [row["n"] for row in summary] == [30, 30]


def test_bad_input_to_the_entry_point(
    setting: tuple[nn.Module, torch.Tensor, torch.Tensor, list[nn.Linear]],
) -> None:
    encoder, x, y, heads = setting
    with pytest.raises(InputError, match="'NORM:EPS'"):
        rt.measure(encoder, x[:4], ["8/255"])
    with pytest.raises(InputError, match="at least one threat model"):
        rt.measure(encoder, x[:4], [])
    measured = rt.measure(encoder, x[:4], ["L2:0.5"], settings=_SETTINGS)
    with pytest.raises(InputError, match="takes 7 features, the encoder gives 32"):
        measured.evaluate(nn.Linear(7, 2), y[:4])
    with pytest.raises(InputError, match="labels"):
        measured.evaluate(heads[0], y[:3])
    with pytest.raises(InputError, match="at least 3 points"):
        measured.curve(heads[0], y[:4], "L2", 1.0, points=2)
