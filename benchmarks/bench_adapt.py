"""Adaptation: a linear probe on cached features against training the same head end to
end, at equal accuracy.

The probe (the study's): the frozen encoder's features computed once, then full-batch
L-BFGS. End to end: the same linear head trained by mini-batch Adam with the frozen
encoder in the loop (a forward pass per batch and epoch, no gradient through it: the
cheapest end-to-end variant, so the ratio is a lower bound on what caching saves),
until its held-out accuracy is within ``--tolerance`` points of the probe's. Times are
medians of ``--repeats`` runs (after a warm-up of the probe); evaluation is not timed.
Where some runs never reach the probe's accuracy, the ratio is a lower bound (``>=``).

    python benchmarks/bench_adapt.py [--encoders standard,adversarial] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _encoders import encoder_named
from _record import RESULTS, command, describe, environment, write
from torch import nn

from robust_transfer import extract_features, train_linear_probe
from robust_transfer.data.dataset import ImageDataset
from robust_transfer.data.tasks import get_task
from robust_transfer.training.adapt import head_accuracy


def probe(encoder: nn.Module, train: ImageDataset) -> tuple[nn.Linear, float]:
    start = time.perf_counter()
    head = train_linear_probe(
        extract_features(encoder, train.x), train.y, num_classes=train.num_classes
    )
    return head, time.perf_counter() - start


def end_to_end(
    encoder: nn.Module,
    train: ImageDataset,
    test: ImageDataset,
    target: float,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
) -> tuple[float, float, int]:
    """Train a head through the encoder until ``target`` held-out accuracy: (seconds,
    accuracy, epochs), the clock stopped while evaluating."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        features = encoder(train.x[:1]).flatten(1).shape[1]
    head = nn.Linear(features, train.num_classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    seconds, accuracy = 0.0, 0.0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(len(train.x), generator=generator)
        for index in order.split(batch):
            with torch.no_grad():
                z = encoder(train.x[index]).flatten(1)
            loss = F.cross_entropy(head(z), train.y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds += time.perf_counter() - start
        accuracy = 100 * head_accuracy(encoder, head, test)
        if accuracy >= target:
            return seconds, accuracy, epoch
    return seconds, accuracy, epochs


def bench(name: str, args: argparse.Namespace) -> dict[str, object]:
    encoder = encoder_named(name)
    split = get_task("mnist-5-9").downstream
    probe(encoder, split.train)  # warm-up
    probes = [probe(encoder, split.train) for _ in range(args.repeats)]
    probe_seconds = statistics.median(seconds for _, seconds in probes)
    probe_accuracy = 100 * head_accuracy(encoder, probes[0][0], split.test)
    target = probe_accuracy - args.tolerance
    runs = [
        end_to_end(
            encoder,
            split.train,
            split.test,
            target,
            epochs=args.epochs,
            batch=args.batch,
            lr=args.lr,
            seed=seed,
        )
        for seed in range(args.repeats)
    ]
    seconds = statistics.median(run[0] for run in runs)
    return {
        "encoder": name,
        "train_points": len(split.train.x),
        "probe_seconds": probe_seconds,
        "probe_accuracy": probe_accuracy,
        "end_to_end_seconds": seconds,
        "end_to_end_accuracy": statistics.median(run[1] for run in runs),
        "end_to_end_epochs": statistics.median(run[2] for run in runs),
        "reached": sum(run[1] >= target for run in runs),
        "ratio": seconds / probe_seconds,
    }


def markdown(record: dict[str, object]) -> str:
    settings = record["settings"]
    assert isinstance(settings, dict)
    lines = [
        "# Adaptation: linear probe on cached features against end-to-end head training",
        "",
        describe(record["environment"]),  # type: ignore[arg-type]
        f"Reproduce: `{settings['command']}`. Digits 5-9, medians of {settings['repeats']} "
        f"runs; end to end stops once within {settings['tolerance']} points of the probe's "
        f"held-out accuracy (at most {settings['epochs']} epochs, batch {settings['batch']}, "
        f"Adam at {settings['lr']}). Where runs never get there, the ratio is a lower bound "
        "at a lower accuracy.",
        "",
        "| encoder | train points | probe s | probe acc. % | end-to-end s | end-to-end acc. % "
        "| epochs | runs reaching the probe | end-to-end / probe |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in record["rows"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {row['encoder']} | {row['train_points']} | {row['probe_seconds']:.2f} | "
            f"{row['probe_accuracy']:.1f} | {row['end_to_end_seconds']:.2f} | "
            f"{row['end_to_end_accuracy']:.1f} | {row['end_to_end_epochs']:g} | "
            f"{row['reached']}/{settings['repeats']} | "
            f"{'' if row['reached'] == settings['repeats'] else '>= '}"
            f"{row['ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default="standard,adversarial")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    # The best of 1e-3, 3e-3, 1e-2 and 3e-2 on the standard encoder (60 epochs: 80.4%,
    # 86.2%, 87.6% at 30 epochs, 89.8%; the probe: 93.4%).
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_adapt")
    args = parser.parse_args(argv)
    record: dict[str, object] = {
        "environment": environment(),
        "settings": {
            "command": command("bench_adapt.py", argv),
            "repeats": args.repeats,
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "tolerance": args.tolerance,
        },
        "rows": [bench(name, args) for name in args.encoders.split(",")],
    }
    text = markdown(record)
    write(args.out, record, text)
    print(text)
    return record


if __name__ == "__main__":
    main()
