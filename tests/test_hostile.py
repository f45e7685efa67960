"""The command line under hostile input: every case ends in one line on stderr and exit
code 2, found before the work it would spoil, or in a note where input is only odd."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from robust_transfer import cli
from robust_transfer.core.errors import ConfigError, InputError
from robust_transfer.models import SmallCNN
from robust_transfer.models.checkpoint import save_checkpoint
from robust_transfer.study.config import parse_config
from robust_transfer.theory.threat import ThreatModel


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    torch.manual_seed(0)
    encoder = tmp_path / "enc.safetensors"
    save_checkpoint(encoder, SmallCNN(feature_dim=8).eval(), {})
    head = tmp_path / "head.safetensors"
    save_file({"weight": torch.randn(3, 8), "bias": torch.zeros(3)}, head)
    data = tmp_path / "points.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((6, 1, 28, 28)).astype(np.float32), y=np.arange(6) % 3)
    return {"encoder": str(encoder), "head": str(head), "data": str(data)}


def _exit_code(args: list[str]) -> int:
    try:
        return cli.main(args)
    except SystemExit as stop:  # argparse's own errors
        return int(stop.code or 0)


def _fails(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    # One line says it (argparse prints its usage above it).
    assert message in err.splitlines()[-1]
    assert "error:" in err.splitlines()[-1]


def test_one_line_errors_before_any_work(
    inputs: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--encoder", inputs["encoder"], "--data", inputs["data"], "--steps", "1"]
    folder = tmp_path / "rows"
    folder.mkdir()
    _fails(["vulnerability", *common, "--json", str(folder)], "is a folder: name a file", capsys)
    _fails(
        ["vulnerability", *common, "--json", str(tmp_path / "no" / "r.json")],
        "does not exist",
        capsys,
    )
    _fails(["vulnerability", *common, "--eps", "0.1", "1/10"], "names a radius twice", capsys)
    _fails(["vulnerability", *common, "--eps", "8"], "Linf eps 8 exceeds 1", capsys)
    _fails(["vulnerability", *common, "--eps", "-0.1"], "eps", capsys)
    head = ["--head", inputs["head"]]
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((4, 1, 28, 28), np.float32), y=np.array([0, 1, 2, 5]))
    attack = ["attack", "--encoder", inputs["encoder"], "--data", str(labels), *head]
    _fails(attack, "the data has class 5, the head only 3 classes", capsys)
    wide = tmp_path / "wide.safetensors"
    save_file({"weight": torch.randn(3, 9), "bias": torch.zeros(3)}, wide)
    _fails(
        ["attack", *common, "--head", str(wide)], "takes 9 features, the encoder gives 8", capsys
    )
    nan = tmp_path / "nan.safetensors"
    save_file({"weight": torch.full((3, 8), float("nan")), "bias": torch.zeros(3)}, nan)
    _fails(["bound", *common, "--head", str(nan)], "NaN or infinite", capsys)
    out = tmp_path / "o"
    out.write_text("a file")
    _fails(
        ["transfer", "--encoder", inputs["encoder"], "--data", inputs["data"], "--out", str(out)],
        "is a file, not a folder",
        capsys,
    )
    assert out.read_text() == "a file"


def test_odd_but_valid_input_is_said(
    inputs: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.json"
    args = ["vulnerability", "--encoder", inputs["encoder"], "--data", inputs["data"]]
    assert cli.main([*args, "--n", "100000", "--steps", "1", "--json", str(rows)]) == 0
    assert "holds 6 points, fewer than --n 100000: using all" in capsys.readouterr().out
    assert json.loads(rows.read_text())[0]["n"] == 6


def test_config_radii_are_checked() -> None:
    base = {
        "encoders": {"std": {"protocol": "standard", "pretrain_task": "mnist-5-9"}},
        "adaptations": {"lp": {"protocol": "linear-probe"}},
        "tasks": [{"name": "mnist-5-9"}],
    }
    with pytest.raises(ConfigError, match=r"threats\.Linf\[1\]: Linf\(eps=0.1\) is given twice"):
        parse_config(base | {"threats": {"Linf": ["1/10", 0.1]}})
    with pytest.raises(ConfigError, match=r"threats\.Linf\[0\]: Linf eps 8 exceeds 1"):
        parse_config(base | {"threats": {"Linf": [8]}})
    assert ThreatModel("L2", 8).eps == 8.0  # an L2 ball may be wider than 1
    with pytest.raises(InputError, match="8/255, not 8"):
        ThreatModel("Linf", "8")
