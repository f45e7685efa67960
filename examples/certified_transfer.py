"""Certified transfer: a 1-Lipschitz encoder, a certified probe, and guarantees.

    python examples/certified_transfer.py [--epochs 2] [--points 200]

Pretrains a 1-Lipschitz CNN (AOL layers) on MNIST 0-4, then on the downstream task MNIST
5-9 trains a plain linear probe and a certified probe (a head trained for margins above
the certified shift of its training points) and compares their certified robust accuracy
under L2, a guarantee for every point counted, with what attacks leave.
"""

from __future__ import annotations

import argparse

import robust_transfer as rt
from robust_transfer.data import get_task
from robust_transfer.training.linear_probe import train_certified_probe
from robust_transfer.training.pretrain import PretrainConfig, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="pretraining points")
    parser.add_argument("--points", type=int, default=200, help="evaluation points")
    parser.add_argument("--eps", type=float, default=0.5, help="L2 radius")
    args = parser.parse_args()

    task = get_task("mnist-5-9")
    threat = rt.ThreatModel("L2", args.eps)
    config = PretrainConfig("lipschitz", epochs=args.epochs, limit=args.limit, threat=threat)
    encoder = pretrain(config, task.pretrain.train, progress=True).encoder.eval()

    train, test = task.downstream.train, task.downstream.test
    features = rt.extract_features(encoder, train.x[:1000])
    # The radius the certified probe defends in feature space: the median certified shift
    # of its own training points (a bound for every head, computed once).
    radius = rt.certified_shift(encoder, train.x[:200], threat).median().item()
    heads = {
        "linear probe": rt.train_linear_probe(features, train.y[:1000]),
        "certified probe": train_certified_probe(features, train.y[:1000], radius),
    }
    measured = rt.measure(encoder, test.x[: args.points], [threat], certifiers=["lipschitz"])
    print(f"certified feature radius {radius:.3f} at L2 eps {args.eps}")
    for name, head in heads.items():
        frame = measured.evaluate(head, test.y[: args.points], attack=True).to_frame()
        row = frame.iloc[0]
        print(
            f"{name:16s} clean {row['clean_acc']:.3f}  certified {row['certified_robust_acc']:.3f}"
            f"  attacked {row['attacked_robust_acc']:.3f}"
        )
        # A certificate is a lower bound on robust accuracy, an attack an upper one.
        assert row["certified_robust_acc"] <= row["attacked_robust_acc"]


if __name__ == "__main__":
    main()
