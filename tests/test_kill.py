"""SIGKILL at random moments of a small study, pretraining into the cache included, then
a resume: the records equal an uninterrupted run's, nothing half-written is left. Units
come in shards of 20 points, so kills also land between the shards of one unit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from robust_transfer.core.schema import RESULTS_FILE
from robust_transfer.models.checkpoint import load_checkpoint
from robust_transfer.pipeline import run_study
from robust_transfer.study.config import parse_config

# Over a minute: the slow tier (`make test-all`), see pyproject.toml.
pytestmark = pytest.mark.slow

CONFIG = """
name = "kills"
eval_points = 40
radius_points = 40
shard_points = 20
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
[encoders.adv]
protocol = "adversarial"
pretrain_task = "mnist-5-9"
epochs = 1
limit = 300
attack_steps = 2
threat = { norm = "Linf", eps = 0.1 }
[adaptations.lp]
protocol = "linear-probe"
[adaptations.cp]
protocol = "certified-probe"
[[tasks]]
name = "mnist-5-9"
"""
KILLS = 4


def _records(results: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(
        (
            {k: v for k, v in r.items() if k not in ("seconds", "train_seconds")}
            for r in results["records"]
        ),
        key=lambda r: (r["encoder"], r["adaptation"], r["threat"], r["eps"]),
    )


def test_sigkills_at_random_moments_lose_nothing(tmp_path: Path) -> None:
    config_file = tmp_path / "kills.toml"
    config_file.write_text(CONFIG)
    reference = run_study(
        parse_config(tomllib.loads(CONFIG)),
        tmp_path / "reference",
        cache_dir=tmp_path / "reference-cache",
        progress=False,
    )
    cache = tmp_path / "cache"
    # The runs use the reference's thread count: pretraining's sums depend on it.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    rng = random.Random(20261125)
    kills, rounds = 0, 0
    # Python and torch take about 2 s to start: kills land in imports, pretraining into
    # the cache, units and the report, each run getting a little further. A study that
    # finishes before all kills (a fast machine) starts over in a new folder.
    while kills < KILLS:
        out = tmp_path / f"out{rounds}"
        command = [sys.executable, "-m", "robust_transfer.cli", "run", str(config_file)]
        command += ["--out", str(out), "--cache", str(cache), "--quiet"]
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        time.sleep(rng.uniform(1.5, 4.5))
        if run.poll() is not None:
            assert run.returncode == 0, run.stderr.read() if run.stderr else ""
            rounds += 1
            continue
        run.send_signal(signal.SIGKILL)
        run.wait()
        kills += 1
    final = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert final.returncode == 0, final.stderr
    resumed = json.loads((out / RESULTS_FILE).read_text())
    for new, old in zip(_records(resumed), _records(reference), strict=True):
        for key, value in old.items():
            if isinstance(value, float):
                assert new[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
            else:
                assert new[key] == value, key
    # Nothing half-written: no temporary files in the study, every cached encoder whole.
    assert not list(out.rglob("*.tmp"))
    assert not list(cache.glob(".*.tmp"))
    checkpoints = sorted(cache.glob("*.safetensors"))
    assert len(checkpoints) == 2
    for path in checkpoints:
        load_checkpoint(path)
