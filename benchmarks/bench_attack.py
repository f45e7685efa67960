"""Cost of our attacks against the floor (a bare forward+backward loop) and torchattacks.

Every figure is measured in this one run, on this machine, with the same model, batch
and number of steps, so the ratios compare like with like. Results go to
``benchmarks/results/bench_attack.json`` and ``.md`` (cited by the README).

    python benchmarks/bench_attack.py [--batch 256] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from robust_transfer import ThreatModel, attack_classifier, attack_representation
from robust_transfer.models import Classifier, SmallCNN

RESULTS = Path(__file__).resolve().parent / "results"


def _best_of(repeats: int, run: Callable[[], object]) -> float:
    """The fastest of ``repeats`` timed runs after one warm-up: the least disturbed one."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _bare_loop(model: nn.Module, x: Tensor, steps: int, loss: Callable[[Tensor], Tensor]) -> None:
    """The floor of any gradient attack: ``steps`` forward and backward passes, nothing else."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(model(x_adv)), x_adv)
        x_adv = (x_adv.detach() + 1e-3 * grad.sign()).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = SmallCNN().to(device).eval()
    model = Classifier(encoder, 10).to(device).eval()
    x = torch.rand(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    with torch.no_grad():
        clean_features = encoder(x)
    threat = ThreatModel("Linf", 0.1)
    alpha = 2.5 * threat.eps / args.steps
    steps = args.steps

    timings = {
        "bare_forward_backward_encoder": _best_of(
            args.repeats,
            lambda: _bare_loop(encoder, x, steps, lambda f: (f - clean_features).pow(2).sum()),
        ),
        "attack_representation": _best_of(
            args.repeats, lambda: attack_representation(encoder, x, threat, steps=steps, seed=0)
        ),
        "bare_forward_backward_classifier": _best_of(
            args.repeats, lambda: _bare_loop(model, x, steps, lambda z: F.cross_entropy(z, y))
        ),
        "attack_classifier": _best_of(
            args.repeats,
            lambda: attack_classifier(model, x, y, threat, steps=steps, step_size=alpha, seed=0),
        ),
        "torchattacks_pgd": _best_of(
            args.repeats,
            lambda: torchattacks.PGD(model, eps=threat.eps, alpha=alpha, steps=steps)(x, y),
        ),
    }
    per_step_ms = {name: 1000 * seconds / steps for name, seconds in timings.items()}
    ratios = {
        "representation_vs_bare": timings["attack_representation"]
        / timings["bare_forward_backward_encoder"],
        "classifier_vs_bare": timings["attack_classifier"]
        / timings["bare_forward_backward_classifier"],
        "classifier_vs_torchattacks": timings["attack_classifier"] / timings["torchattacks_pgd"],
    }
    record = {
        "settings": {
            "model": "SmallCNN (robust_transfer.models), 1x28x28, 10 classes",
            "batch": args.batch,
            "steps": steps,
            "threat": str(threat),
            "repeats": args.repeats,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "torchattacks": torchattacks.__version__,
            "machine": platform.platform(),
        },
        "per_step_ms": per_step_ms,
        "ratios": ratios,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_attack.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Attack cost (one run; best of repeats)",
        "",
        f"SmallCNN, batch {args.batch}, {steps} steps, {threat}, {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| what | ms per step |",
        "| --- | ---: |",
        *(f"| {name} | {ms:.1f} |" for name, ms in per_step_ms.items()),
        "",
        "| ratio | value |",
        "| --- | ---: |",
        *(f"| {name} | {value:.2f} |" for name, value in ratios.items()),
        "",
    ]
    (RESULTS / "bench_attack.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
