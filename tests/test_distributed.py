"""A study shared among processes by ``torchrun`` (gloo on the CPU) gives the records of
a single-process run; shards change nothing; a failure in one process ends them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from robust_transfer.core.schema import RESULTS_FILE
from robust_transfer.pipeline import run_study
from robust_transfer.study.config import parse_config

CONFIG = """
name = "shared"
eval_points = 24
radius_points = 24
shard_points = 10
train_points = 200
curve_points = 0
[attack]
steps = 3
targeted_restarts = 1
representation_steps = 4
batch_size = 20
[threats]
Linf = ["1/10"]
L2 = [0.5]
[encoders.std]
protocol = "standard"
pretrain_task = "mnist-5-9"
epochs = 1
limit = 300
[encoders.random]
protocol = "random"
pretrain_task = "mnist-5-9"
[adaptations.lp]
protocol = "linear-probe"
[adaptations.ft]
protocol = "finetune"
epochs = 1
[[tasks]]
name = "mnist-5-9"
"""
BIN = Path(sys.executable).parent
# torchrun gives each process one thread; the single-process reference gets the same,
# as the order of a float sum (and so the last bit) may depend on the thread count.
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}


def _records(out: Path) -> list[dict[str, Any]]:
    results = json.loads((out / RESULTS_FILE).read_text())
    return [
        {k: v for k, v in r.items() if k not in ("seconds", "train_seconds")}
        for r in results["records"]
    ]


def _run(
    config: Path, out: Path, cache: Path, *, processes: int
) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "robust-transfer"), "run", str(config), "--out", str(out)]
    command += ["--cache", str(cache), "--quiet", "--device", "cpu"]
    if processes > 1:
        launch = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={processes}"]
        command = [*launch, "--no-python", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=ONE_THREAD)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shared") / "shared.toml"
    path.write_text(CONFIG)
    return path


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_records(
    config_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    single = _run(config_file, tmp_path / "single", cache, processes=1)
    assert single.returncode == 0, single.stderr
    shared = _run(config_file, tmp_path / "shared", cache, processes=2)
    assert shared.returncode == 0, shared.stderr
    assert _records(tmp_path / "shared") == _records(tmp_path / "single")
    runtime = json.loads((tmp_path / "shared" / RESULTS_FILE).read_text())["runtime"]
    assert runtime["world_size"] == 2
    assert runtime["device"] == "cpu"
    # Three shards of 10, 10 and 4 points per unit, each unit joined by rank 0.
    shards = sorted((tmp_path / "shared" / "store" / "unit-shards").rglob("*.safetensors"))
    assert len(shards) == 3 * 8
    assert {p.name for p in shards} == {
        "shard000000.safetensors",
        "shard000001.safetensors",
        "shard000002.safetensors",
    }


def test_a_failure_in_one_process_stops_all_with_its_message(
    config_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    failed = _run(config_file, out, tmp_path / "cache", processes=2)
    assert failed.returncode != 0
    assert "notes.txt" in failed.stderr  # rank 0's refusal, and rank 1 names it too
    assert "process 0 of 2 failed: InputError" in failed.stderr
    # One line from each process; the only traceback is torchrun's own report.
    assert "src/robust_transfer/" not in failed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_single_step_commands_refuse_torchrun(tmp_path: Path) -> None:
    env = os.environ | {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    command = [sys.executable, "-m", "robust_transfer.cli", "vulnerability"]
    command += ["--encoder", "torchvision:resnet18", "--data", "digits8x8", "--n", "4"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "does not share its work among processes" in done.stderr
    assert "Traceback" not in done.stderr


def test_shard_size_changes_no_record(tmp_path: Path) -> None:
    """Per-sample random starts, and refinements started at each point's own first-order
    worst case: how the points are cut into shards leaves every number as it was (up to float
    summation order across batch compositions)."""
    source = tomllib.loads(CONFIG)
    del source["encoders"]["std"]  # pretraining is not what this is about
    records = []
    for shard_points in (7, 40):
        config = parse_config(source | {"shard_points": shard_points})
        out = tmp_path / f"shards{shard_points}"
        run_study(config, out, cache_dir=tmp_path / "cache", progress=False)
        records.append(_records(out))
    for a, b in zip(*records, strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            else:
                assert b[key] == value, key
