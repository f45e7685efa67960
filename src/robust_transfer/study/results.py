"""``results.json``: config, versions, git revision, runtime, encoders, records, findings."""

from __future__ import annotations

import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..core.schema import RESULTS_FORMAT, Arrays, Field, Key, Meta, Record, Results
from ..estimates.records import aggregate
from .findings import compare_adaptations, findings
from .plan import Unit
from .runner import StudyRun


def versions() -> dict[str, str]:
    return {
        "robust_transfer": __version__,
        "torch": torch.__version__,
        "torchvision": metadata.version("torchvision"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def git_revision() -> str | None:
    """The checkout's commit (with ``-dirty`` for local changes), None outside git."""
    here = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision or None


def record(run: StudyRun, unit: Unit, arrays: Arrays, meta: dict[str, object]) -> Record:
    """One unit's record: what it is, then the aggregation of its per-sample arrays."""
    info = run.encoders.info(unit.encoder)
    task = unit.task
    head = meta.get(Meta.HEAD)
    head = head if isinstance(head, dict) else {}
    aggregated = aggregate(arrays)
    metrics = head.get(Meta.METRICS)
    metrics = metrics if isinstance(metrics, dict) else {}
    stored_advice = run.store.load(run.heads.advice_key(unit))
    advice = stored_advice[1] if stored_advice is not None else {}
    config = meta.get(Meta.ADAPTATION_CONFIG)
    adaptation = run.config.adaptations[unit.adaptation].config_for(0.0, unit.threat)
    scale, shift = meta.get(Meta.FEATURE_SCALE), aggregated.get(Field.MEAN_SHIFT)
    relative = (
        shift / scale
        if isinstance(scale, float) and scale > 0 and isinstance(shift, float)
        else None
    )
    return {
        Field.ENCODER: unit.encoder,
        Field.PRETRAINING: run.config.encoders[unit.encoder].pretraining,
        Field.TASK: task.name,
        Field.ADAPTATION: unit.adaptation,
        Field.THREAT: unit.threat.norm.value,
        Field.EPS: unit.threat.eps,
        Field.KIND: task.kind.value,
        Field.LOSS: None if task.loss is None else task.loss.value,
        Field.WEIGHT_GAP: meta.get(Meta.WEIGHT_GAP),
        Field.REFUSED: meta.get(Meta.REFUSED, {}),
        Field.RADIUS: head.get(Meta.RADIUS),
        Field.RADIUS_RULE: head.get(Meta.RADIUS_RULE),
        Field.RECIPE: None if adaptation.recipe is None else adaptation.recipe.value,
        Field.TRAINED_AGAINST: trained_against(config if isinstance(config, dict) else {}),
        Field.TRAIN_SECONDS: head.get(Meta.SECONDS),
        Field.ENCODER_FORWARDS: metrics.get("encoder_forwards"),
        Field.ENCODER_BACKWARDS: metrics.get("encoder_backwards"),
        Field.ADVICE_FIRST: advice.get("first"),
        Field.ADVICE_FINETUNING: advice.get("finetuning"),
        Field.ADVICE_REACH: advice.get("reach"),
        Field.ADVICE_REASON: advice.get("reason"),
        Field.LIPSCHITZ_L2: info.get(Field.LIPSCHITZ_L2),
        **aggregated,
        Field.FEATURE_SCALE: scale,
        Field.RELATIVE_SHIFT: relative,
        Field.DISTANCE_RATIO: meta.get(Meta.DISTANCE_RATIO),
        Field.STORE_KEY: list(unit.key()),
    }


def trained_against(config: dict[str, object]) -> str | None:
    """What an adaptation trained against, from its stored config: ``"pgd Linf(eps=0.1),
    5 steps, eps warm-up 0.5"``; None for clean training."""
    adversary, threat = config.get("adversary", "none"), config.get("threat")
    if adversary == "none" or not isinstance(threat, dict):
        return None
    text = f"{adversary} {threat['norm']}(eps={float(threat['eps']):.4g})"
    text += f", {config['attack_steps']} steps"
    warmup = config.get("eps_warmup")
    return text + (f", eps warm-up {warmup:g}" if isinstance(warmup, float) and warmup else "")


def results(run: StudyRun, started: float) -> Results:
    """Run (or resume) ``run`` and return its whole ``results.json``; ``started`` is the
    :func:`time.perf_counter` reading when the run began."""
    records = [record(run, *unit) for unit in run.run()]
    compare_adaptations(records)
    return {
        Key.FORMAT: RESULTS_FORMAT,
        Key.NAME: run.config.name,
        Key.CONFIG: run.config.source,
        Key.SEED: run.config.seed,
        Key.VERSIONS: versions(),
        Key.GIT_REVISION: git_revision(),
        Key.RUNTIME: run.runtime.to_dict(),
        Key.SECONDS: time.perf_counter() - started,
        Key.ENCODERS: run.encoder_info(),
        Key.RECORDS: records,
        Key.FINDINGS: [finding.to_dict() for finding in findings(records)],
    }
