"""How far the representation attack is from its limit, sample by sample.

The criterion and the expected robust accuracy are per sample, so a shift that falls
short on a few points matters even when the median is right. For built-in encoders
(pretrained as the default study pretrains them) and one eps per threat model, the
representation attack at the default study's budget (PGD, APGD, both with the polish,
and PGD with the cost of both ascents) and at the library's default budget
(``AttackSettings()``, twice the study's steps) is compared with a reference: 10
restarts of 500-step APGD and 10 of 500-step PGD, per sample the largest shift any run
found. Reported per setting: the median, 5th percentile and minimum of shift /
reference, and each method's time.

    python benchmarks/bench_tail.py [--points 100] [--encoders standard,simclr,random]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _encoders import encoder_named
from _record import RESULTS, command, describe, environment, write
from torch import Tensor, nn

from robust_transfer import AttackSettings, ThreatModel, attack_representation
from robust_transfer.data.tasks import get_task
from robust_transfer.study.config import default_config

THREATS = (ThreatModel("Linf", 0.1), ThreatModel("L2", 1.0))


def held_out_points(points: int) -> Tensor:
    split = get_task("mnist-5-9").downstream
    return split.test.x[:points]


def shift(
    encoder: nn.Module, x: Tensor, threat: ThreatModel, method: str, steps: int, restarts: int
) -> tuple[Tensor, float]:
    start = time.perf_counter()
    found = attack_representation(
        encoder, x, threat, steps=steps, restarts=restarts, method=method, seed=0
    ).shift
    return found.double(), time.perf_counter() - start


def tail(ratio: Tensor) -> dict[str, float]:
    return {
        "median": float(ratio.median()),
        "q05": float(ratio.quantile(0.05)),
        "min": float(ratio.min()),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--encoders", default="standard,adversarial,simclr,random")
    parser.add_argument("--reference-steps", type=int, default=500)
    parser.add_argument("--reference-restarts", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_tail")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    study, library = default_config().attack, AttackSettings()
    steps, restarts = study.representation_steps, study.representation_restarts
    budget_name = f"{steps} steps x {restarts}"
    # (method, steps, restarts) per label
    methods = {
        f"pgd {budget_name}": ("pgd", steps, restarts),
        f"apgd {budget_name}": ("apgd", steps, restarts),
        f"pgd+apgd {budget_name} (the default study's)": ("pgd+apgd", steps, restarts),
        f"pgd {steps} steps x {2 * restarts} (the pair's ascents' cost)": (
            "pgd",
            steps,
            2 * restarts,
        ),
        f"pgd+apgd {library.representation_steps} steps x {library.representation_restarts} "
        "(the library default)": (
            library.representation_method,
            library.representation_steps,
            library.representation_restarts,
        ),
    }
    x = held_out_points(args.points)
    rows = []
    for name in args.encoders.split(","):
        encoder = encoder_named(name)
        for threat in THREATS:
            found = {
                label: shift(encoder, x, threat, method, method_steps, method_restarts)
                for label, (method, method_steps, method_restarts) in methods.items()
            }
            reference = torch.stack(
                [
                    shift(
                        encoder,
                        x,
                        threat,
                        method,
                        args.reference_steps,
                        args.reference_restarts,
                    )[0]
                    for method in ("apgd", "pgd")
                ]
                + [value for value, _ in found.values()]
            ).amax(dim=0)
            for label, (value, seconds) in found.items():
                ratio = value / reference.clamp_min(1e-12)
                rows.append(
                    {"encoder": name, "threat": str(threat), "method": label, "seconds": seconds}
                    | tail(ratio)
                )
                print(rows[-1], flush=True)
    summary = {}
    for label in methods:
        ratios = [row for row in rows if row["method"] == label]
        summary[label] = {
            "worst_q05": min(float(row["q05"]) for row in ratios),
            "mean_q05": sum(float(row["q05"]) for row in ratios) / len(ratios),
            "worst_median": min(float(row["median"]) for row in ratios),
        }
    report = {
        "environment": environment(),
        "command": command("bench_tail.py", argv),
        "points": args.points,
        "reference": f"{args.reference_restarts} restarts x {args.reference_steps} steps of "
        "APGD and of PGD, per sample the largest shift of any run",
        "rows": rows,
        "summary": summary,
    }
    lines = [
        "# Representation attack against a 10-restart, 500-step reference",
        "",
        describe(report["environment"]),  # type: ignore[arg-type]
        f"Reproduce: `{report['command']}`. {args.points} held-out digits 5-9, encoders "
        f"pretrained as the default study does. Reference: {report['reference']}. Ratio = "
        "shift / reference per sample; seconds are one run.",
        "",
        "| encoder | threat | method | median | 5th pct | min | seconds |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['encoder']} | {r['threat']} | {r['method']} | {r['median']:.3f} | "
            f"{r['q05']:.3f} | {r['min']:.3f} | {r['seconds']:.1f} |"
            for r in rows
        ),
        "",
        "| method | worst 5th pct | mean 5th pct | worst median |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {label} | {s['worst_q05']:.3f} | {s['mean_q05']:.3f} | {s['worst_median']:.3f} |"
            for label, s in summary.items()
        ),
    ]
    write(args.out, report, "\n".join(lines))
    return report


if __name__ == "__main__":
    main()
