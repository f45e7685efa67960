"""``results.json``: config, versions, git revision, runtime, encoders, records, findings."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from .._version import __version__
from ..atomic import atomic_write_text
from ..certify import default_certifier_names
from ..errors import ConfigError, ResultsFormatError
from ..findings import findings
from ..schema import RESULTS_FORMAT, STUDY_MARKER, Arrays, Field, Key, Meta, Record, Results
from .config import StudyConfig
from .records import aggregate
from .runner import StudyRun, Unit


def versions() -> dict[str, str]:
    return {
        "robust_transfer": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
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
        Field.LIPSCHITZ_L2: info.get(Field.LIPSCHITZ_L2),
        **aggregated,
        Field.FEATURE_SCALE: scale,
        Field.RELATIVE_SHIFT: relative,
        Field.STORE_KEY: list(unit.key()),
    }


def results(run: StudyRun, started: float) -> Results:
    """Run (or resume) ``run`` and return its whole ``results.json``; ``started`` is the
    :func:`time.perf_counter` reading when the run began."""
    records = [record(run, *unit) for unit in run.run()]
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


def claim(out: Path, config: StudyConfig) -> None:
    """Mark ``out`` as this study's folder; refuse one that holds another study's units
    (or this study's, written by another results format), whose stored results would
    otherwise be resumed as if they were this study's."""
    # The certifiers a default config runs depend on what is registered: part of it too.
    certifiers = list(config.certifiers or default_certifier_names())
    fingerprint = hashlib.sha256(
        json.dumps([config.source, certifiers], sort_keys=True, default=str).encode()
    ).hexdigest()
    marker = out / STUDY_MARKER
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text())
        except json.JSONDecodeError as err:
            raise ResultsFormatError(f"{marker} is damaged: {err}; choose another folder") from err
        if not isinstance(stored, dict) or stored.get(Key.FORMAT) != RESULTS_FORMAT:
            found = stored.get(Key.FORMAT, 1) if isinstance(stored, dict) else None
            raise ResultsFormatError(
                f"{out} holds results of format {found!r}, this "
                f"robust-transfer writes format {RESULTS_FORMAT}; choose another --out folder"
            )
        if stored.get(Key.FINGERPRINT) != fingerprint:
            raise ConfigError(
                f"{out} holds the results of a different study configuration; "
                "choose another --out folder or delete this one"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        marker,
        json.dumps(
            {Key.FINGERPRINT: fingerprint, Key.NAME: config.name, Key.FORMAT: RESULTS_FORMAT}
        ),
    )
