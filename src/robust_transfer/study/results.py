"""``results.json``: config, versions, git revision, seeds, encoders, records, findings."""

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
from ..report.findings import findings
from ..report.render import write_report
from ..report.tables import text
from .config import ConfigError, StudyConfig
from .records import aggregate
from .runner import StudyRun

RESULTS_FORMAT = 1


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


def run_study(
    config: StudyConfig, out: str | Path, *, cache_dir: Path, progress: bool = True
) -> dict[str, object]:
    """Run (or resume) ``config`` into ``out``: store, ``results.json`` and the reports."""
    out = Path(out)
    _claim(out, config)
    started = time.perf_counter()
    run = StudyRun(config, out, cache_dir, progress=progress, log=print if progress else _quiet)
    units = run.run()
    records = []
    for task, encoder, adaptation, threat, arrays, meta in units:
        info = run.encoders.info(encoder)
        pretraining = config.encoders[encoder].pretraining
        record: dict[str, object] = {
            "encoder": encoder,
            "pretraining": pretraining,
            "task": task.name,
            "adaptation": adaptation,
            "threat": threat.norm.value,
            "eps": threat.eps,
            "kind": task.kind.value,
            "loss": None if task.loss is None else task.loss.value,
            "weight_gap": meta.get("weight_gap"),
            "lipschitz_l2": info.get("lipschitz_l2"),
            **aggregate(arrays),
            "store_key": list(run.unit_key(task, encoder, adaptation, threat)),
        }
        records.append(record)
    results: dict[str, object] = {
        "format": RESULTS_FORMAT,
        "name": config.name,
        "config": config.source,
        "seed": config.seed,
        "versions": versions(),
        "git_revision": git_revision(),
        "device": str(run.device),
        "seconds": time.perf_counter() - started,
        "encoders": run.encoder_info(),
        "records": records,
        "findings": [finding.to_dict() for finding in findings(records)],
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_report(results, out)
    if progress:
        print(text(records))
        for finding in results["findings"]:  # type: ignore[attr-defined]
            verdict = {True: "reproduced", False: "NOT reproduced", None: "not tested"}
            print(f"[{verdict[finding['holds']]}] {finding['claim']}")
        print(f"results: {out / 'results.json'}\nreport: {out / 'report.html'}")
    return results


def _claim(out: Path, config: StudyConfig) -> None:
    """Mark ``out`` as this study's folder; refuse one that holds another study's units,
    whose stored results would otherwise be resumed as if they were this study's."""
    fingerprint = hashlib.sha256(
        json.dumps(config.source, sort_keys=True, default=str).encode()
    ).hexdigest()
    marker = out / "study.json"
    if marker.is_file():
        stored = json.loads(marker.read_text()).get("fingerprint")
        if stored != fingerprint:
            raise ConfigError(
                f"{out} holds the results of a different study configuration; "
                "choose another --out folder or delete this one"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "name": config.name}))


def _quiet(_: str) -> None:
    return None
