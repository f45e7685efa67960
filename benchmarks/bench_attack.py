"""Attack cost against its limit, and our classifier PGD against its peers at equal
strength.

The limit: per step, the representation attack (PGD and APGD) against a bare loop of
forward and backward passes of the same encoder and batch, for the default study's
small CNN and a ResNet-18 (weights do not change the cost, so it is built untrained).
The peers: our classifier PGD, torchattacks' and foolbox's on the same model (the
pretrained encoder and a linear probe on digits 5-9), the same held-out points, steps,
step size and one random start, under Linf and L2: time and robust accuracy. The runs
compared are timed in ``--repeats`` interleaved rounds after a warm-up (a drift of the
machine's speed then hits them alike): a ratio is the median of the per-round ratios.

    python benchmarks/bench_attack.py [--batch 256] [--steps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import foolbox
import torch
import torchattacks
from _encoders import encoder_named
from _record import RESULTS, command, describe, environment, interleaved, median_ratio, write
from torch import Tensor, nn

from robust_transfer import (
    ThreatModel,
    attack_classifier,
    attack_representation,
    extract_features,
    train_linear_probe,
)
from robust_transfer.data.tasks import get_task
from robust_transfer.models.registry import build_encoder
from robust_transfer.theory.threat import Norm

THREATS = (ThreatModel(Norm.LINF, 0.1), ThreatModel(Norm.L2, 1.0))


def _bare_loop(model: nn.Module, x: Tensor, steps: int, loss: Callable[[Tensor], Tensor]) -> None:
    """The floor of any gradient attack: ``steps`` forward and backward passes, nothing
    else. It starts, as the attacks do, from a random point of the threat set: at the
    clean point the gradients of the shift are tiny, and on a CPU their subnormal
    floats can make a backward pass several times slower than an attack's."""
    x_adv = (x + THREATS[0].eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(model(x_adv)), x_adv)
        x_adv = (x_adv.detach() + 1e-3 * grad.sign()).clamp(0, 1)


def limit(
    name: str, encoder: nn.Module, x: Tensor, steps: int, repeats: int
) -> list[dict[str, object]]:
    """Per step: the representation attack against the bare loop, same encoder and batch."""
    with torch.no_grad():
        clean = encoder(x)
    threat = THREATS[0]
    runs: dict[str, Callable[[], object]] = {
        "bare": lambda: _bare_loop(encoder, x, steps, lambda f: (f - clean).pow(2).sum())
    }
    for method in ("pgd", "apgd"):
        runs[method] = lambda method=method: attack_representation(
            encoder, x, threat, steps=steps, seed=0, method=method, batch_size=len(x)
        )
    times = interleaved(repeats, runs)
    rows = []
    for method in ("pgd", "apgd"):
        rows.append(
            {
                "encoder": name,
                "batch": len(x),
                "method": method,
                "bare_ms_per_step": 1000 * statistics.median(times["bare"]) / steps,
                "attack_ms_per_step": 1000 * statistics.median(times[method]) / steps,
                "ratio": median_ratio(times, method, "bare"),
            }
        )
    return rows


Attack = Callable[[Tensor, Tensor], Tensor]


def _torchattacks_pgd(model: nn.Module, threat: ThreatModel, steps: int, alpha: float) -> Attack:
    kind = torchattacks.PGD if threat.norm is Norm.LINF else torchattacks.PGDL2
    return kind(model, eps=threat.eps, alpha=alpha, steps=steps)


def _foolbox_pgd(model: nn.Module, threat: ThreatModel, steps: int, alpha: float) -> Attack:
    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    kind = foolbox.attacks.LinfPGD if threat.norm is Norm.LINF else foolbox.attacks.L2PGD
    attack = kind(abs_stepsize=alpha, steps=steps, random_start=True)

    def run(x: Tensor, y: Tensor) -> Tensor:
        _, clipped, _ = attack(fmodel, x, y, epsilons=threat.eps)
        return clipped

    return run


# Each peer at our settings, as (model, threat, steps, step size) -> (x, y) -> x_adv.
PEERS: dict[str, Callable[[nn.Module, ThreatModel, int, float], Attack]] = {
    "torchattacks": _torchattacks_pgd,
    "foolbox": _foolbox_pgd,
}


class _Watched(nn.Module):
    """The model, noting which points were ever misclassified at a batch the attack sent
    it. Ours counts a point broken at any iterate, the peers only at their last: scoring
    the peers through this wrapper counts their every iterate too."""

    def __init__(self, model: nn.Module, y: Tensor) -> None:
        super().__init__()
        self.model, self.y = model, y
        self.broken = torch.zeros_like(y, dtype=torch.bool)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model(x)
        if len(x) == len(self.y):
            self.broken |= logits.detach().argmax(dim=1) != self.y
        return logits


def peers(
    model: nn.Module, x: Tensor, y: Tensor, steps: int, repeats: int
) -> list[dict[str, object]]:
    """Time and robust accuracy of our classifier PGD and the peers', same settings."""
    with torch.no_grad():
        clean = model(x).argmax(dim=1) == y
    rows = []
    for threat in THREATS:
        alpha = 2.5 * threat.eps / steps

        def ours(threat: ThreatModel = threat, alpha: float = alpha) -> Tensor:
            return attack_classifier(
                model, x, y, threat, steps=steps, step_size=alpha, seed=0, batch_size=len(x)
            ).robust

        robust: dict[str, tuple[Tensor, Tensor | None]] = {"robust-transfer": (ours(), None)}
        runs: dict[str, Callable[[], object]] = {"robust-transfer": ours}
        for name, make in PEERS.items():
            watched = _Watched(model, y).eval()
            x_adv = make(watched, threat, steps, alpha)(x, y)
            with torch.no_grad():
                last = clean & (watched(x_adv).argmax(dim=1) == y)
            robust[name] = (clean & ~watched.broken, last)
            attack = make(model, threat, steps, alpha)
            runs[name] = lambda attack=attack: attack(x, y)
        times = interleaved(repeats, runs)
        for name, (any_step, last_step) in robust.items():
            rows.append(
                {
                    "threat": str(threat),
                    "attack": name,
                    "ms_per_step": 1000 * statistics.median(times[name]) / steps,
                    "time_vs_ours": median_ratio(times, name, "robust-transfer"),
                    "robust_acc_any_iterate": 100 * float(any_step.float().mean()),
                    "robust_acc_last_iterate": None
                    if last_step is None
                    else 100 * float(last_step.float().mean()),
                }
            )
    return rows


def markdown(record: dict[str, object]) -> str:
    settings = record["settings"]
    assert isinstance(settings, dict)
    lines = [
        "# Attack cost: the limit and the peers",
        "",
        f"{describe(record['environment'])}",  # type: ignore[arg-type]
        f"Reproduce: `{settings['command']}`. {settings['steps']} steps. After a warm-up, "
        f"the runs compared are timed in {settings['repeats']} interleaved rounds: times are "
        "medians over rounds, ratios the medians of the per-round ratios.",
        "",
        "## The limit: representation attack per step against a bare forward and backward",
        "",
        "| encoder | batch | method | bare ms/step | attack ms/step | ratio (target <= 1.10) |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in record["limit"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {row['encoder']} | {row['batch']} | {row['method']} | "
            f"{row['bare_ms_per_step']:.1f} | {row['attack_ms_per_step']:.1f} | "
            f"{row['ratio']:.2f} |"
        )
    lines += [
        "",
        f"## Classifier PGD against its peers ({settings['points']} held-out digits 5-9, "
        f"{settings['encoder']} encoder and a linear probe; step size 2.5 eps / steps, one "
        "random start, cross-entropy)",
        "",
        "| threat | attack | ms/step | time / ours | robust acc. %, any iterate "
        "| robust acc. %, last iterate |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in record["peers"]:  # type: ignore[attr-defined]
        last = row["robust_acc_last_iterate"]
        lines.append(
            f"| {row['threat']} | {row['attack']} | {row['ms_per_step']:.1f} | "
            f"{row['time_vs_ours']:.2f} | {row['robust_acc_any_iterate']:.1f} | "
            f"{'-' if last is None else f'{last:.1f}'} |"
        )
    lines += [
        "",
        "Ours counts a point broken at any iterate; the peers keep only their last, so their "
        "every iterate is also scored (through a wrapper that watches each batch they send "
        "the model; the times come from runs without it). Random starts differ between "
        "libraries, and torchattacks' L2 start is not uniform in the ball.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resnet-batch", type=int, default=64, help="0 skips the ResNet-18")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--encoder", default="standard")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_attack")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder_named(args.encoder).to(device)
    split = get_task("mnist-5-9").downstream
    head = train_linear_probe(extract_features(encoder, split.train.x), split.train.y)
    model = nn.Sequential(encoder, head.to(device)).eval()
    x, y = split.test.x[: args.batch].to(device), split.test.y[: args.batch].to(device)

    rows = limit(f"SmallCNN ({args.encoder})", encoder, x, args.steps, args.repeats)
    if args.resnet_batch:
        resnet = build_encoder("resnet18", feature_dim=512).to(device).eval()
        images = torch.rand(args.resnet_batch, 3, 32, 32, device=device)
        rows += limit("ResNet-18 (3x32x32)", resnet, images, args.steps, args.repeats)
    record: dict[str, object] = {
        "environment": environment(),
        "settings": {
            "command": command("bench_attack.py", argv),
            "steps": args.steps,
            "repeats": args.repeats,
            "points": len(x),
            "encoder": args.encoder,
        },
        "limit": rows,
        "peers": peers(model, x, y, args.steps, args.repeats),
    }
    text = markdown(record)
    write(args.out, record, text)
    print(text)
    return record


if __name__ == "__main__":
    main()
