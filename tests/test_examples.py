"""Every script in examples/ runs, on tiny sizes, and prints what it promises."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from test_zoo import _robustbench_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, monkeypatch: pytest.MonkeyPatch, *arguments: str) -> None:
    monkeypatch.setattr(sys, "argv", [script, *arguments])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def test_every_example_is_tested() -> None:
    tested = {"own_encoder.py", "zoo_encoder.py", "study_from_toml.py"}
    tested |= {"certified_transfer.py", "adaptation.py"}
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


def test_own_encoder_and_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run("own_encoder.py", monkeypatch, "--out", str(tmp_path), "--points", "30")
    printed = capsys.readouterr().out
    assert "attacked_robust_acc" in printed
    assert "L2 eps 0.5: expected robust accuracy" in printed
    assert (tmp_path / "digits.npz").is_file()
    assert (tmp_path / "result.json").is_file()


def test_zoo_encoder_from_robustbench_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Random weights where RobustBench keeps downloaded ones: no network needed.
    name = "Sehwag2021Proxy_R18"
    model, path = _robustbench_file(tmp_path, name)
    torch.save({"state_dict": model.state_dict()}, path)
    arguments = ["--model-dir", str(tmp_path), "--points", "1", "--train-points", "20"]
    _run("zoo_encoder.py", monkeypatch, *arguments, "--steps", "1")
    printed = capsys.readouterr().out
    assert "Linf" in printed
    assert "expected_robust_acc" in printed


def test_study_from_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    arguments = ["--points", "20", "--epochs", "1", "--limit", "200", "--steps", "2"]
    _run("study_from_toml.py", monkeypatch, "--out", str(out), *arguments)
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if "expected" in line and "attacked" in line]
    assert len([row for row in rows if row.startswith(("standard ", "adversarial "))]) == 4
    assert (out / "report.html").is_file()


def test_certified_transfer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--epochs", "1", "--limit", "300", "--points", "30"]
    _run("certified_transfer.py", monkeypatch, *arguments)
    printed = capsys.readouterr().out
    assert "certified probe" in printed
    assert "certified feature radius" in printed


def test_adaptation(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--epochs", "1", "--limit", "200", "--train-points", "200", "--points", "30"]
    _run("adaptation.py", monkeypatch, *arguments)
    printed = capsys.readouterr().out
    for protocol in ("linear-probe", "lp-ft", "finetune"):
        assert protocol in printed
