"""What the theory saves: K heads on one encoder, amortised vs attacking every head.

For each built-in encoder named, over the default study's eps grid (both threat
models): the amortised path (``profile_encoder`` once, then per head arithmetic and a
short refinement of the points near the boundary) against the study's
PGD on every head and against AutoAttack "standard" on every head. Heads are linear
probes on held-out label sets of digits 5-9 (random groupings of the five classes into
2-5 labels; the estimator was never tuned on them). Every time and every robust
accuracy comes from this one run. AutoAttack runs on ``--aa-heads`` heads and the
first ``--aa-points`` points at every eps (its cost per head and threat is the mean of
those runs, scaled to ``--points`` points); the accuracy table compares each estimate
with the study's PGD on every head and with PGD and AutoAttack together on that subset.

A wide encoder: a ResNet-18 (512 features) pretrained here on digits 0-4, profiled with
the full Jacobian and with the span route (no Jacobian up front, each head adds its
class-difference directions), against the study's PGD on 5 heads.

    python benchmarks/bench_expected.py [--points 200] [--encoders standard,simclr]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import _encoders
import numpy as np
import torch
from _record import RESULTS, command, describe, environment, write
from torch import Tensor, nn

from robust_transfer import (
    AttackSettings,
    ThreatModel,
    extract_features,
    profile_encoder,
    train_linear_probe,
)
from robust_transfer.attacks.reference import attack_autoattack
from robust_transfer.core.schema import Array
from robust_transfer.data.tasks import get_task
from robust_transfer.estimates.evaluate import classification_theory, measure_shift, study_pgd
from robust_transfer.study.config import default_config
from robust_transfer.study.spec import StudyConfig
from robust_transfer.training.pretrain import PretrainConfig, cached_pretrain

T = TypeVar("T")

ESTIMATES = {
    "expected": Array.EXPECTED_ROBUST,
    "predicted (criterion, attacked shift)": Array.PREDICTED_ROBUST,
    "task-agnostic perturbation": Array.ROBUST_TASK_AGNOSTIC,
    "certified (task-agnostic)": Array.CERTIFIED_ROBUST,
}


def timed(run: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, float]:
    start = time.perf_counter()
    value = run(*args, **kwargs)
    return value, time.perf_counter() - start


def _groupings(classes: int) -> int:
    """How many groupings of ``classes`` labels into at least 2 exist (Bell number - 1)."""
    row = [1]
    for _ in range(classes - 1):
        nxt = [row[-1]]
        for value in row:
            nxt.append(nxt[-1] + value)
        row = nxt
    return row[-1] - 1


def label_sets(classes: int, count: int, seed: int) -> list[Tensor]:
    """``count`` distinct groupings of ``classes`` labels into 2..classes new labels (all
    of them, when fewer exist)."""
    count = min(count, _groupings(classes))
    generator = torch.Generator().manual_seed(seed)
    found: list[Tensor] = [torch.arange(classes)]
    seen = {tuple(found[0].tolist())}
    while len(found) < count:
        groups = int(torch.randint(2, classes + 1, (1,), generator=generator))
        mapping = torch.randint(0, groups, (classes,), generator=generator)
        if len(mapping.unique()) < 2:
            continue
        canonical = torch.unique(mapping, return_inverse=True)[1]
        # Relabel by first appearance so that equal partitions compare equal.
        order = {int(v): i for i, v in enumerate(dict.fromkeys(canonical.tolist()))}
        key = tuple(order[int(v)] for v in canonical)
        if key not in seen:
            seen.add(key)
            found.append(torch.tensor(key))
    return found


@dataclass
class Heads:
    """Linear probes for each label set, and the test labels they are scored on."""

    heads: list[nn.Linear]
    labels: list[Tensor]


def fit_heads(encoder: nn.Module, count: int, points: int, seed: int) -> tuple[Tensor, Heads]:
    split = get_task("mnist-5-9").downstream
    train, test = split.train, split.test
    features = extract_features(encoder, train.x)
    sets = label_sets(len(train.classes), count, seed)
    generator = torch.Generator().manual_seed(seed)
    heads, labels = [], []
    for index in range(count):
        mapping = sets[index % len(sets)]
        # Once every grouping has a head, further heads learn them again from random
        # halves of the training set: other heads for the same task.
        rows = (
            torch.arange(len(features))
            if index < len(sets)
            else torch.randperm(len(features), generator=generator)[: len(features) // 2]
        )
        heads.append(train_linear_probe(features[rows], mapping[train.y[rows]]).eval())
        labels.append(mapping[test.y[:points]])
    return test.x[:points], Heads(heads, labels)


def accuracy(robust: Tensor) -> float:
    return 100.0 * float(robust.float().mean())


@dataclass
class Errors:
    """Per estimator: signed errors in points over (head, threat) pairs."""

    against: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, estimate: Tensor, reference: Tensor) -> None:
        self.against.setdefault(name, []).append(accuracy(estimate) - accuracy(reference))

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "mean_abs": sum(abs(e) for e in errors) / len(errors),
                "worst_abs": max(abs(e) for e in errors),
                "mean_signed": sum(errors) / len(errors),
                "pairs": len(errors),
            }
            for name, errors in self.against.items()
        }


def bench_encoder(
    name: str, config: StudyConfig, threats: tuple[ThreatModel, ...], args: argparse.Namespace
) -> dict[str, object]:
    settings = config.attack
    encoder = _encoders.encoder_named(name)
    x, heads = fit_heads(encoder, max(args.heads), args.points, args.seed)

    profile, t_jacobian = timed(profile_encoder, encoder, x)
    shifts, t_shift = {}, 0.0
    for threat in threats:
        shifts[threat], seconds = timed(measure_shift, encoder, x, threat, settings, seed=args.seed)
        t_shift += seconds

    t_head, t_theory, t_pgd, t_aa = [], [], [], []
    vs_pgd, vs_aa = Errors(), Errors()
    by_threat = {str(threat): Errors() for threat in threats}
    subset = slice(0, args.aa_points)
    # AutoAttack's targeted attacks need at least 4 classes.
    aa_heads = [i for i, head in enumerate(heads.heads) if head.out_features >= 4][: args.aa_heads]
    for index, (head, y) in enumerate(zip(heads.heads, heads.labels, strict=True)):
        model = nn.Sequential(encoder, head).eval()
        head_seconds = theory_seconds = pgd_seconds = 0.0
        for threat in threats:
            shift = shifts[threat]
            (expected, _), seconds = timed(profile.assess, head, y, threat)
            head_seconds += seconds
            arrays, seconds = timed(classification_theory, head, shift[Array.FEATURES], y, shift)
            theory_seconds += seconds
            with torch.no_grad():
                agnostic = head(shift[Array.FEATURES_ADV]).argmax(dim=1) == y
            arrays[Array.EXPECTED_ROBUST] = expected
            arrays[Array.ROBUST_TASK_AGNOSTIC] = arrays[Array.CORRECT] & agnostic
            (ce, targeted), seconds = timed(
                study_pgd, model, x, y, threat, settings, seed=args.seed
            )
            pgd_seconds += seconds
            robust_pgd = ce.robust & targeted.robust
            by_threat[str(threat)].add("expected", expected, robust_pgd)
            for estimator, key in ESTIMATES.items():
                if key in arrays:
                    vs_pgd.add(estimator, arrays[key], robust_pgd)
            if index in aa_heads:
                aa, seconds = timed(attack_autoattack, model, x[subset], y[subset], threat)
                t_aa.append(seconds * len(x) / len(x[subset]))
                reference = robust_pgd[subset] & aa.attack.robust
                for estimator, key in ESTIMATES.items():
                    if key in arrays:
                        vs_aa.add(estimator, arrays[key][subset], reference)
                vs_aa.add("study PGD", robust_pgd[subset], reference)
        t_head.append(head_seconds)
        t_theory.append(theory_seconds)
        t_pgd.append(pgd_seconds)
        print(f"{name}: head {index + 1}/{len(heads.heads)} done", flush=True)

    aa_per_head = len(threats) * sum(t_aa) / max(1, len(t_aa))
    once = t_jacobian
    rows = []
    for k in args.heads:
        expected_path = once + sum(t_head[:k])
        full_path = expected_path + t_shift + sum(t_theory[:k])
        pgd, aa = sum(t_pgd[:k]), k * aa_per_head
        rows.append(
            {
                "heads": k,
                "expected_path_s": expected_path,
                "full_amortised_path_s": full_path,
                "study_pgd_s": pgd,
                "autoattack_s": aa,
                "pgd_over_expected": pgd / expected_path,
                "autoattack_over_expected": aa / expected_path,
                "autoattack_over_full": aa / full_path,
            }
        )
    every = list(range(1, len(t_head) + 1))
    return {
        "encoder": name,
        "points": len(x),
        # Least-squares lines, seconds = once + per_head * K, over every K measured.
        "fitted_s": {
            "expected_path": _line(every, [once + sum(t_head[:k]) for k in every]),
            "study_pgd": _line(every, [sum(t_pgd[:k]) for k in every]),
        },
        "once_per_encoder_s": {
            "jacobian": t_jacobian,
            "representation_attack_and_certificates": t_shift,
        },
        "per_head_over_grid_s": {
            "expected": sum(t_head) / len(t_head),
            "study_pgd": sum(t_pgd) / len(t_pgd),
            "autoattack": aa_per_head,
        },
        "timing": rows,
        "errors_vs_study_pgd": vs_pgd.summary(),
        "expected_vs_study_pgd_per_threat": {
            threat: errors.summary()["expected"] for threat, errors in by_threat.items()
        },
        "errors_vs_autoattack": vs_aa.summary(),
    }


def bench_wide(
    threats: tuple[ThreatModel, ...], settings: AttackSettings, args: argparse.Namespace
) -> dict[str, object]:
    pretrain = get_task("mnist-5-9").pretrain
    assert pretrain is not None
    config = PretrainConfig(
        protocol="standard", arch="resnet18", feature_dim=512, epochs=1, limit=args.wide_train
    )
    encoder = cached_pretrain(config, pretrain.train, _encoders.CACHE).encoder.eval()
    x, heads = fit_heads(encoder, 5, args.wide_points, args.seed)
    features = int(extract_features(encoder, x[:1]).shape[1])

    full, t_full = timed(profile_encoder, encoder, x)
    span, t_span = timed(profile_encoder, encoder, x, directions=torch.zeros(0, features))
    t_span_heads, t_pgd, errors = 0.0, 0.0, Errors()
    for head, y in zip(heads.heads, heads.labels, strict=True):
        model = nn.Sequential(encoder, head).eval()
        for threat in threats:
            (expected, _), seconds = timed(span.assess, head, y, threat)
            t_span_heads += seconds
            (ce, targeted), seconds = timed(
                study_pgd, model, x, y, threat, settings, seed=args.seed
            )
            t_pgd += seconds
            robust = ce.robust & targeted.robust
            errors.add("expected (span route)", expected, robust)
            errors.add("expected (full Jacobian)", full.expected_robust(head, y, threat), robust)
    return {
        "encoder": "ResNet-18 (CIFAR layout, 1x28x28), standard pretraining on digits 0-4",
        "features": features,
        "points": len(x),
        "full_jacobian_once_s": t_full,
        "full_jacobian_backward_passes": full.backward_passes,
        "span_route_once_s": t_span,
        "span_route_five_heads_s": t_span_heads,
        "span_route_backward_passes_five_heads": span.backward_passes,
        "study_pgd_five_heads_s": t_pgd,
        "full_once_over_pgd_five_heads": t_full / t_pgd,
        "span_once_plus_five_heads_over_pgd_five_heads": (t_span + t_span_heads) / t_pgd,
        "errors_vs_study_pgd": errors.summary(),
    }


def _line(heads: list[int], seconds: list[float]) -> dict[str, float]:
    if len(heads) < 2:
        return {"once": seconds[0], "per_head": 0.0}
    per_head, once = np.polyfit(heads, seconds, 1)
    return {"once": float(once), "per_head": float(per_head)}


def markdown(record: dict[str, object]) -> str:
    settings = record["settings"]
    assert isinstance(settings, dict)
    lines = [
        "# What the theory saves: amortised expected robust accuracy vs attacking each head",
        "",
        describe(record["environment"]),  # type: ignore[arg-type]
        f"Reproduce: `{settings['command']}`. Every time is one run (the heads and threats "
        f"are the repeats). Threats: {', '.join(settings['threats'])}. Heads: linear "
        "probes on held-out groupings of digits 5-9. AutoAttack's times "
        "are extrapolated: its mean time per head and threat on the subset it ran on, scaled "
        "to every point and head.",
        "",
    ]
    encoders = record["encoders"]
    assert isinstance(encoders, list)
    for result in encoders:
        lines += [
            f"## {result['encoder']} ({result['points']} points)",
            "",
            f"Once per encoder: {json.dumps(_rounded(result['once_per_encoder_s']))} s. "
            f"Per head over the grid: {json.dumps(_rounded(result['per_head_over_grid_s']))} s.",
            "",
            "| heads | expected path s | + attack, certificates, criterion s | study PGD s "
            "| AutoAttack s (extrapolated) | PGD / expected | AutoAttack / expected "
            "| AutoAttack / full |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in result["timing"]:
            lines.append(
                f"| {row['heads']} | {row['expected_path_s']:.1f} "
                f"| {row['full_amortised_path_s']:.1f} | {row['study_pgd_s']:.1f} "
                f"| {row['autoattack_s']:.0f} | {row['pgd_over_expected']:.1f}x "
                f"| {row['autoattack_over_expected']:.0f}x | {row['autoattack_over_full']:.0f}x |"
            )
        per_threat = result["expected_vs_study_pgd_per_threat"]
        assert isinstance(per_threat, dict)
        fitted = result["fitted_s"]
        assert isinstance(fitted, dict)
        lines += [
            "",
            "Fitted over every K measured (seconds = once + per head x K): "
            + "; ".join(
                f"{path} {line['once']:.1f} + {line['per_head']:.2f} K"
                for path, line in fitted.items()
            )
            + ".",
            "",
            _error_table(result),
            "",
            "Expected vs study PGD per threat (points): "
            + "; ".join(
                f"{threat} mean {e['mean_abs']:.2f}, worst {e['worst_abs']:.1f}"
                for threat, e in per_threat.items()
            )
            + ".",
            "",
        ]
    wide = record.get("wide")
    if isinstance(wide, dict):
        lines += [
            f"## {wide['encoder']}: {wide['features']} features, {wide['points']} points",
            "",
            f"- Full Jacobian once ({wide['full_jacobian_backward_passes']} backward passes) "
            f"{wide['full_jacobian_once_s']:.0f} s; the study's PGD on 5 "
            f"heads: {wide['study_pgd_five_heads_s']:.0f} s "
            f"(ratio {wide['full_once_over_pgd_five_heads']:.2f}).",
            f"- Span route: features once {wide['span_route_once_s']:.0f} s, 5 heads "
            f"{wide['span_route_five_heads_s']:.0f} s "
            f"({wide['span_route_backward_passes_five_heads']} backward passes in all; "
            f"ratio to PGD {wide['span_once_plus_five_heads_over_pgd_five_heads']:.2f}).",
            "",
            _error_table({"errors_vs_study_pgd": wide["errors_vs_study_pgd"]}),
            "",
        ]
    return "\n".join(lines)


def _error_table(result: dict[str, object]) -> str:
    lines = [
        "| estimate | reference | mean abs. error (points) | worst | mean signed | pairs |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for key, reference in (
        ("errors_vs_study_pgd", "study PGD, every head"),
        ("errors_vs_autoattack", "PGD + AutoAttack, subset"),
    ):
        table = result.get(key, {})
        assert isinstance(table, dict)
        for name, e in table.items():
            lines.append(
                f"| {name} | {reference} | {e['mean_abs']:.2f} | {e['worst_abs']:.1f} "
                f"| {e['mean_signed']:+.2f} | {e['pairs']} |"
            )
    return "\n".join(lines)


def _rounded(values: object) -> object:
    assert isinstance(values, dict)
    return {key: round(value, 2) for key, value in values.items()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 5, 20, 100])
    parser.add_argument("--encoders", default="standard,simclr")
    parser.add_argument("--aa-heads", type=int, default=2)
    parser.add_argument("--aa-points", type=int, default=100)
    parser.add_argument("--wide-points", type=int, default=32, help="0 skips the ResNet-18")
    parser.add_argument("--wide-train", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threats", help="NORM:EPS,... (default: the default study's grid)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_expected")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    config = default_config()
    threats = (
        tuple(ThreatModel(*item.split(":", 1)) for item in args.threats.split(","))
        if args.threats
        else next(task for task in config.tasks if task.name == "mnist-5-9").threats
    )
    record: dict[str, object] = {
        "environment": environment(),
        "settings": {
            "command": command("bench_expected.py", argv),
            "threats": [str(t) for t in threats],
            "attack": dataclasses.asdict(config.attack),
        },
        "encoders": [
            bench_encoder(name, config, threats, args) for name in args.encoders.split(",")
        ],
    }
    if args.wide_points > 0:
        record["wide"] = bench_wide(threats, config.attack, args)
    write(args.out, record, markdown(record))
    return record


if __name__ == "__main__":
    main()
