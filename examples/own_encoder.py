"""Your encoder and your data: a model you define (or load) and arrays you have.

    python examples/own_encoder.py --out runs/own-encoder [--points 200]

Writes the data as an ``.npz`` of ``x`` (N, C, H, W) in [0, 1] and ``y`` (N,) labels, the
format ``--data FILE.npz`` reads, loads it back, puts a linear probe on the encoder and
prints its robustness under two threats and its robustness curve.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import robust_transfer as rt
from robust_transfer.data.sources import load_split


def my_encoder() -> nn.Sequential:
    """Any torch module from images in [0, 1] to a feature vector: yours goes here (load
    its weights with ``load_state_dict``, or name it to ``rt.load_encoder``). Certifiers
    read compositions of the layers they know (``nn.Sequential`` of convolutions,
    linear maps, ReLUs, ...); a module with its own ``forward`` they refuse, saying so,
    unless its type is registered (``robust_transfer.certify.register_layer``)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/own-encoder"))
    parser.add_argument("--points", type=int, default=200, help="evaluation points")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # Your data: 8x8 digits as (N, 1, 8, 8) floats in [0, 1] with integer labels.
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    np.savez(args.out / "digits.npz", x=x, y=digits.target.astype(np.int64))
    split = load_split(str(args.out / "digits.npz"))  # 80/20 per class

    torch.manual_seed(0)
    encoder = my_encoder().eval()
    features = rt.extract_features(encoder, split.train.x)
    head = rt.train_linear_probe(features, split.train.y)

    x_eval, y_eval = split.test.x[: args.points], split.test.y[: args.points]
    # Certifiers bound the shift from above where they can read the encoder's layers.
    measured = rt.measure(
        encoder, x_eval, ["Linf:2/255", "L2:0.1"], certifiers=["lipschitz", "ibp"]
    )
    result = measured.evaluate(head, y_eval, attack=True)
    print(result)
    refused = {str(threat): why for threat, why in measured.refused.items() if why}
    print("certifiers that refused:", refused or "none")
    frame = result.to_frame()
    # An attacked robust accuracy is an upper bound, a certified one a lower bound.
    assert (frame["certified_robust_acc"] <= frame["attacked_robust_acc"]).all()

    curve = measured.curve(head, y_eval, "L2", 0.5)
    for eps in (0.1, 0.2, 0.3, 0.4, 0.5):
        print(f"L2 eps {eps}: expected robust accuracy {curve.at(eps):.3f}")
    print(f"mean over [0, 0.5]: {curve.area:.3f}")
    (args.out / "result.json").write_text(result.to_json())


if __name__ == "__main__":
    main()
