"""Certificates: how long each certifier takes and how far its bound is from the attack.

For built-in encoders pretrained as the default study pretrains them and held-out
digits 5-9: per certifier (layer-wise Lipschitz, IBP, CROWN) and threat, the time and
the median over points of certified / attacked shift (1 would be exact; the attacked
shift is the study's representation attack); then a linear probe's certified robust
accuracy by the task-agnostic route (the tightest certified shift against its
normalised margins) and by the head-specific one (CROWN on its own margins), beside
the study's PGD robust accuracy. Every certified point is checked against the attacks:
a certificate an attack beats stops the benchmark.

    python benchmarks/bench_certify.py [--points 100] [--encoders standard,lipschitz]
        [--methods lipschitz,ibp,crown,crown-full] [--threats Linf:1/40,L2:0.1]

With ``crown-full`` among the methods, the head-specific certificate uses CROWN's own
intermediate bounds too (as a study naming ``head-crown-full`` does).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _encoders import encoder_named
from _record import RESULTS, command, describe, environment, write
from torch import Tensor, nn

from robust_transfer import ThreatModel, extract_features, train_linear_probe
from robust_transfer.certify import certify_all, get_certifier, margin_lower_bounds
from robust_transfer.certify.base import Refusal
from robust_transfer.certify.crown import Intermediate
from robust_transfer.core.errors import SoundnessError
from robust_transfer.core.schema import Array, Arrays, per_method
from robust_transfer.data.tasks import get_task
from robust_transfer.estimates.evaluate import attacked_shift, study_pgd
from robust_transfer.estimates.records import soundness_violations
from robust_transfer.study.config import default_config
from robust_transfer.theory.bounds import criterion_holds

THREATS = (
    ThreatModel("Linf", "1/40"),
    ThreatModel("Linf", "1/10"),
    ThreatModel("L2", 0.1),
    ThreatModel("L2", 0.5),
    ThreatModel("L2", 1.0),
)
METHODS = ("lipschitz", "ibp", "crown")


def timed_bounds(
    encoder: nn.Module, x: Tensor, threat: ThreatModel, methods: Sequence[str]
) -> dict[str, object]:
    """Each certifier's per-point bound (or its refusal) and seconds."""
    found: dict[str, object] = {}
    for method in methods:
        start = time.perf_counter()
        certificates = certify_all(encoder, x, threat, [method])
        seconds = time.perf_counter() - start
        found[method] = (certificates.bounds.get(method), seconds, certificates.refused.get(method))
    return found


def bench(
    name: str,
    encoder: nn.Module,
    x: Tensor,
    y: Tensor,
    probe: nn.Linear,
    threats: Sequence[ThreatModel],
    methods: Sequence[str],
) -> list[dict[str, object]]:
    settings = default_config().attack
    features = extract_features(encoder, x)
    intermediate: Intermediate = "crown" if "crown-full" in methods else "ibp"
    rows = []
    for threat in threats:
        attacked = attacked_shift(encoder, x, threat, settings, seed=0)[Array.SHIFT]
        row: dict[str, object] = {"encoder": name, "threat": str(threat), "points": len(x)}
        arrays: Arrays = {Array.SHIFT: attacked}
        bounds = []
        for method, (bound, seconds, refused) in timed_bounds(encoder, x, threat, methods).items():
            if not isinstance(bound, Tensor):
                row[method] = {"refused": refused}
                continue
            ratio = bound.double() / attacked.double().clamp_min(1e-12)
            row[method] = {"seconds": seconds, "tightness": float(ratio.median())}
            arrays[per_method(Array.CERTIFIED_SHIFT, method)] = bound
            bounds.append(bound)
        ce, targeted = study_pgd(
            nn.Sequential(encoder, probe).eval(), x, y, threat, settings, seed=0
        )
        robust = ce.robust & targeted.robust
        correct = probe(features).argmax(dim=1) == y
        task_agnostic = (
            correct & criterion_holds(probe, features, torch.stack(bounds).amin(dim=0))
            if bounds
            else torch.zeros_like(correct)
        )
        start = time.perf_counter()
        margins = margin_lower_bounds(encoder, probe, x, threat, intermediate)
        head_seconds = time.perf_counter() - start
        head = task_agnostic | (
            torch.zeros_like(correct)
            if isinstance(margins, Refusal)
            else correct & (margins > 0).all(dim=1)
        )
        arrays |= {
            Array.CERTIFIED_ROBUST: task_agnostic,
            Array.HEAD_CERTIFIED_ROBUST: head,
            Array.ROBUST_ATTACKED: robust,
        }
        violations = soundness_violations(arrays)
        if violations:
            raise SoundnessError(f"{name} under {threat}: {'; '.join(violations)}")
        row |= {
            "pgd_robust_acc": float(robust.float().mean()),
            "task_agnostic_certified_acc": float(task_agnostic.float().mean()),
            "head_specific_certified_acc": float(head.float().mean()),
            "head_specific_seconds": head_seconds,
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(report: dict[str, object]) -> str:
    rows, methods = report["rows"], report["methods"]
    assert isinstance(rows, list)
    assert isinstance(methods, list)

    def cell(row: dict[str, object], method: str) -> str:
        value = row[method]
        assert isinstance(value, dict)
        if "refused" in value:
            return "refused"
        return f"{value['tightness']:.3g} ({value['seconds']:.2f} s)"

    def share(value: object) -> str:
        assert isinstance(value, float)
        return f"{100 * value:.1f}%"

    lines = [
        "# Certificates: time and tightness",
        "",
        describe(report["environment"]),  # type: ignore[arg-type]
        f"Reproduce: `{report['command']}`. {report['points']} held-out digits 5-9, encoders "
        "pretrained as the default study does; times are one run. Tightness: median "
        "over points of certified / attacked shift (1 = exact); the attacked shift is the "
        "study's representation attack. Certified accuracies are of a linear probe on "
        "digits 5-9; head-specific = CROWN on the probe's margins (with CROWN's own "
        "intermediate bounds where crown-full is run), united with the task-agnostic "
        "certificate.",
        "",
        f"| encoder | threat | {' | '.join(methods)} | task-agnostic cert. | "
        "head-specific cert. | PGD robust |",
        f"| --- | --- | {'---: | ' * len(methods)}---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['encoder']} | {row['threat']} | "
            f"{' | '.join(cell(row, method) for method in methods)} | "
            f"{share(row['task_agnostic_certified_acc'])} | "
            f"{share(row['head_specific_certified_acc'])} | {share(row['pgd_robust_acc'])} |"
        )
    gains = [
        row["head_specific_certified_acc"] - row["task_agnostic_certified_acc"] for row in rows
    ]
    lines += [
        "",
        f"Head-specific minus task-agnostic certified accuracy: mean "
        f"{100 * statistics.mean(gains):.1f} points, largest {100 * max(gains):.1f}. No "
        "certified shift was below an attacked one and no certified point was broken.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--encoders", default="standard,adversarial,lipschitz,lipschitz-sll")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threats", help="NORM:EPS,... (default: the five of THREATS)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_certify")
    args = parser.parse_args(argv)
    methods = list(dict.fromkeys(args.methods.split(",")))
    for method in methods:
        get_certifier(method)  # an unknown name fails now, not after the first probe
    threats = (
        [ThreatModel(*item.split(":", 1)) for item in args.threats.split(",")]
        if args.threats
        else list(THREATS)
    )
    torch.manual_seed(0)
    downstream = get_task("mnist-5-9").downstream
    x, y = downstream.test.x[: args.points], downstream.test.y[: args.points]
    rows = []
    for name in args.encoders.split(","):
        encoder = encoder_named(name)
        probe = train_linear_probe(
            extract_features(encoder, downstream.train.x), downstream.train.y
        ).eval()
        rows += bench(name, encoder, x, y, probe, threats, methods)
    report: dict[str, object] = {
        "environment": environment(),
        "command": command("bench_certify.py", argv),
        "points": args.points,
        "encoders": args.encoders,
        "methods": methods,
        "rows": rows,
    }
    write(args.out, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
