"""Every stage of a study on a big encoder at its real input size, on the CPU: a
torchvision ResNet-50 and a small timm ViT with random weights (what they cost does not
depend on their weights), 28x28 digits resized to 224x224 inside the encoder, 100
points. Each stage runs in a fresh process, so its peak resident memory is its own
(beyond the encoder and the points, which the process holds before the stage starts).
Results go to ``benchmarks/results/bench_big.json`` and ``.md``.

    python benchmarks/bench_big.py [--points 100] [--steps 5] [--encoders resnet50 vit]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _record import RESULTS, command, describe, environment, write

ENCODERS = {
    "resnet50": "torchvision:resnet50",
    "vit": "timm:vit_tiny_patch16_224",
}
STAGES = (
    "features",
    "representation attack",
    "profile",
    "PGD on a head",
    "expected robust accuracy",
    "certifiers",
)
THREAT = "Linf 4/255"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(encoder_name: str, stage: str, points: int, steps: int) -> dict[str, object]:
    """Run one stage in this process; its seconds and the peak memory it added."""
    import torch
    from torch import nn

    from robust_transfer import ThreatModel, load_encoder
    from robust_transfer.attacks import attack_representation
    from robust_transfer.attacks.settings import AttackSettings
    from robust_transfer.certify import certify_all, margin_lower_bounds
    from robust_transfer.data.tasks import get_task
    from robust_transfer.estimates.evaluate import study_pgd
    from robust_transfer.estimates.expected import profile_encoder
    from robust_transfer.models.features import extract_features
    from robust_transfer.study.calibration import bounded_batch

    torch.manual_seed(0)
    encoder = load_encoder(ENCODERS[encoder_name], resize=True).eval()
    test = get_task("mnist-5-9").downstream.test
    x, y = test.x[:points], test.y[:points]
    threat = ThreatModel("Linf", 4 / 255)
    features = extract_features(encoder, x[:2])
    head = nn.Linear(features.shape[1], len(test.classes))
    # The batch a study takes: activations of its backward passes within 2 GiB.
    batch = bounded_batch(encoder, x, 250)
    base = _peak_mb()
    note = ""
    start = time.perf_counter()
    if stage == "features":
        extract_features(encoder, x)
    elif stage == "representation attack":
        attack_representation(
            encoder, x, threat, steps=steps, restarts=1, method="pgd", batch_size=batch
        )
    elif stage == "profile":
        profile = profile_encoder(encoder, x, batch_size=batch)
        profile.head_drops(head, threat)  # one backward pass per class difference
        note = f"{profile.backward_passes} backward passes per point"
    elif stage == "PGD on a head":
        settings = AttackSettings(steps=steps, restarts=1, targeted_restarts=1, batch_size=batch)
        study_pgd(nn.Sequential(encoder, head).eval(), x, y, threat, settings, seed=0)
    elif stage == "expected robust accuracy":
        profile = profile_encoder(encoder, x, batch_size=batch)
        robust = profile.expected_robust(head, y, threat)
        note = (
            f"profile and refinement; expected robust accuracy {float(robust.float().mean()):.2f}"
        )
    elif stage == "certifiers":
        refused = dict(certify_all(encoder, x, threat, ["lipschitz", "ibp", "crown"]).refused)
        margins = margin_lower_bounds(encoder, head, x, threat)
        if not isinstance(margins, torch.Tensor):
            refused["head-crown"] = margins.reason
        note = "; ".join(f"{name}: {why}" for name, why in refused.items())
    seconds = time.perf_counter() - start
    return {
        "encoder": encoder_name,
        "stage": stage,
        "points": points,
        "seconds": seconds,
        "peak_mb": _peak_mb(),
        "added_mb": _peak_mb() - base,
        "note": note,
        "batch": batch,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_big")
    parser.add_argument("--one", nargs=2, metavar=("ENCODER", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.points, args.steps)))
        return
    rows = []
    for name in args.encoders:
        for stage in STAGES:
            run = [sys.executable, __file__, "--points", str(args.points)]
            run += ["--steps", str(args.steps), "--one", name, stage]
            done = subprocess.run(run, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    record = {
        "environment": environment(),
        "command": command("bench_big.py", argv),
        "threat": THREAT,
        "rows": rows,
    }
    lines = [
        "# Big encoders at 224 x 224 on the CPU: every stage's time and memory",
        "",
        describe(record["environment"]),  # type: ignore[arg-type]
        f"Reproduce: `{record['command']}`. {args.points} digits resized to 224 x 224 "
        f"inside the encoder, random weights, {THREAT}, {args.steps} attack steps, one "
        "restart; each stage in a fresh process (added: its peak resident memory beyond "
        "the encoder and the points).",
        "",
        "| encoder | stage | batch | seconds | ms / point | peak MiB | added MiB | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        *(
            f"| {r['encoder']} ({ENCODERS[str(r['encoder'])]}) | {r['stage']} | {r['batch']} | "
            f"{r['seconds']:.1f} | {1000 * float(r['seconds']) / args.points:.0f} | "  # type: ignore[arg-type]
            f"{r['peak_mb']:.0f} | {r['added_mb']:.0f} | {r['note']} |"
            for r in rows
        ),
    ]
    write(args.out, record, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
