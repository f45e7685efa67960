"""What every benchmark writes beside its figures: the machine, the versions and the
command that reproduces it; timings as medians of repeated runs; one JSON file for
machines and one Markdown file for people (``benchmarks/collect.py`` joins the latter
into ``benchmarks/RESULTS.md``)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

import robust_transfer

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = ("torchattacks", "foolbox", "pyautoattack")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, object]:
    """The machine and the versions a figure was measured with."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The package's own version from its code: an editable install's metadata keeps the
    # version it was installed at.
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "robust-transfer": robust_transfer.__version__,
    }
    for package in PEERS:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "machine": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def describe(env: dict[str, object]) -> str:
    """One line for a results file's header."""
    versions = env["versions"]
    assert isinstance(versions, dict)
    listed = ", ".join(f"{name} {version}" for name, version in versions.items())
    return (
        f"{env['date']}; {env['cpu']} ({env['cores']} cores, {env['threads']} torch threads), "
        f"{env['device']}; {listed}."
    )


def command(script: str, argv: list[str] | None) -> str:
    """How to rerun ``script`` with the arguments it ran with."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{script}", *args])


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(repeats: int, runs: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Seconds of each run in ``repeats`` rounds after one untimed warm-up each. Every
    round times every run once, in an order rotated from round to round, so a drift of
    the machine's speed (a shared host) hits all runs alike: compare them by the median
    of their per-round ratios. On a GPU each run is timed to the end of its kernels."""
    names = list(runs)
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(max(1, repeats)):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize()
            start = time.perf_counter()
            runs[name]()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """The median over rounds of ``name``'s time over ``reference``'s."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))


def write(out: Path, record: dict[str, object], markdown: str) -> None:
    """``out.json`` and ``out.md`` (``out`` without a suffix)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown.rstrip() + "\n")
