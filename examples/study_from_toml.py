"""A study from TOML: encoders x adaptations x tasks x threats, resumable, with a report.

    python examples/study_from_toml.py --out runs/example-study [--points 200]

The same study runs from the command line as ``robust-transfer run study.toml --out
DIR``; ``robust-transfer demo --print-config`` prints the default study to start from.
Killed and rerun, it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from robust_transfer.pipeline import run_study
from robust_transfer.study.config import load_config

STUDY = """
name = "example"
eval_points = {points}
train_points = 500

[attack]
steps = {steps}

[threats]
Linf = ["1/20"]
L2 = [0.5]

[encoders.standard]
protocol = "standard"
pretrain_task = "mnist-5-9"
epochs = {epochs}
limit = {limit}

[encoders.adversarial]
protocol = "adversarial"
pretrain_task = "mnist-5-9"
epochs = {epochs}
limit = {limit}
attack_steps = 3
threat = {{ norm = "Linf", eps = 0.1 }}

[adaptations.linear-probe]
protocol = "linear-probe"

[[tasks]]
name = "mnist-5-9"
encoders = ["standard", "adversarial"]
adaptations = ["linear-probe"]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/example-study"))
    parser.add_argument("--points", type=int, default=200, help="evaluation points")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=5000, help="pretraining points")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    toml = args.out.parent / f"{args.out.name}.toml"
    toml.write_text(
        STUDY.format(points=args.points, epochs=args.epochs, limit=args.limit, steps=args.steps)
    )

    results = run_study(load_config(toml), args.out, cache_dir=args.out / "encoders")
    for record in results["records"]:
        print(
            f"{record['encoder']:12s} {record['threat']:5s} {record['eps']:.3f}  "
            f"clean {record['clean_acc']:.3f}  expected {record['expected_robust_acc']:.3f}  "
            f"attacked {record['attacked_robust_acc']:.3f}"
        )
    print("report:", args.out / "report.html")
    print(json.dumps(results["findings"][0], indent=1))


if __name__ == "__main__":
    main()
