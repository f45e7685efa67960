"""The ``robust-transfer`` command line: whole studies, or one step on your own models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .atomic import atomic_write_text
from .attacks import attack_classifier
from .attacks.reference import attack_autoattack
from .attacks.settings import AttackSettings
from .bounds import adversarial_cross_entropy_bound, certify, normalized_margin, weight_gap
from .data.dataset import ImageDataset
from .data.sources import load_dataset
from .models import CheckpointError, load_encoder
from .report.render import write_report
from .report.tables import text
from .runtime import default_device
from .study.config import ConfigError, default_config, default_config_text, load_config
from .study.evaluate import measure_shift
from .study.results import run_study
from .threat import ThreatModel


def _default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "robust-transfer" / "encoders"


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    run_study(config, args.out, cache_dir=args.cache, progress=not args.quiet)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.print_config:
        print(default_config_text())
        return 0
    run_study(default_config(), args.out, cache_dir=args.cache, progress=not args.quiet)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    path = Path(args.dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {args.dir}: run a study there first")
    md, page = write_report(json.loads(path.read_text()), Path(args.dir))
    print(f"report: {page}\n        {md}")
    return 0


def _data(args: argparse.Namespace) -> ImageDataset:
    data = load_dataset(args.data)
    return data.subset(list(range(min(args.n, len(data)))))


def _head(path: str) -> nn.Linear:
    """A linear head from a safetensors file with ``weight`` (K, m) and ``bias`` (K,)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"head file not found: {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read head {path}: {err}") from err
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or weight.dim() != 2 or bias.shape != weight.shape[:1]:
        raise ValueError(f"{path} must hold 'weight' (K, m) and 'bias' (K,) tensors")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.eval()


def _threats(args: argparse.Namespace) -> list[ThreatModel]:
    return [ThreatModel(args.threat, eps) for eps in args.eps]


def _settings(args: argparse.Namespace) -> AttackSettings:
    return AttackSettings(
        steps=args.steps,
        restarts=args.restarts,
        representation_steps=args.steps,
        representation_restarts=args.restarts,
        batch_size=args.batch_size,
    )


def _emit(rows: list[dict[str, object]], args: argparse.Namespace) -> int:
    print(text(rows, [(key, key) for key in rows[0]]))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0


def _cmd_vulnerability(args: argparse.Namespace) -> int:
    device = default_device()
    encoder = load_encoder(args.encoder).to(device).eval()
    x = _data(args).x.to(device)
    rows = []
    for threat in _threats(args):
        arrays = measure_shift(encoder, x, threat, _settings(args), seed=args.seed, progress=True)
        shift = arrays["shift"]
        row: dict[str, object] = {
            "threat": threat.norm.value,
            "eps": threat.eps,
            "n": len(shift),
            "mean_shift": float(shift.mean()),
            "median_shift": float(shift.median()),
            "q90_shift": float(shift.quantile(0.9)),
            "max_shift": float(shift.max()),
            "certified_shift": (
                float(arrays["certified_shift"].max()) if "certified_shift" in arrays else None
            ),
        }
        rows.append(row)
    return _emit(rows, args)


def _labelled(args: argparse.Namespace) -> tuple[nn.Module, nn.Linear, Tensor, Tensor]:
    device = default_device()
    encoder = load_encoder(args.encoder).to(device).eval()
    head = _head(args.head).to(device)
    data = _data(args)
    return encoder, head, data.x.to(device), data.y.to(device)


def _cmd_bound(args: argparse.Namespace) -> int:
    encoder, head, x, y = _labelled(args)
    rows = []
    for threat in _threats(args):
        arrays = measure_shift(encoder, x, threat, _settings(args), seed=args.seed, progress=True)
        features, shift = arrays["features"], arrays["shift"]
        correct = head(features).argmax(dim=1) == y
        row: dict[str, object] = {
            "threat": threat.norm.value,
            "eps": threat.eps,
            "clean_acc": float(correct.float().mean()),
            "weight_gap": float(weight_gap(head)),
            "mean_shift": float(shift.mean()),
            "median_margin": float(normalized_margin(head, features).median()),
            "predicted_robust_acc": float(
                (correct & certify(head, features, shift)).float().mean()
            ),
            "loss_bound": float(adversarial_cross_entropy_bound(head, features, y, shift).mean()),
        }
        if "certified_shift" in arrays:
            certified = arrays["certified_shift"]
            row["certified_robust_acc"] = float(
                (correct & certify(head, features, certified)).float().mean()
            )
            row["certified_loss_bound"] = float(
                adversarial_cross_entropy_bound(head, features, y, certified).mean()
            )
        rows.append(row)
    return _emit(rows, args)


def _cmd_attack(args: argparse.Namespace) -> int:
    encoder, head, x, y = _labelled(args)
    model = nn.Sequential(encoder, head).eval()
    rows: list[dict[str, object]] = []
    for threat in _threats(args):
        if args.autoattack:
            result = attack_autoattack(
                model, x, y, threat, seed=args.seed, batch_size=args.batch_size
            )
        else:
            result = attack_classifier(
                model,
                x,
                y,
                threat,
                steps=args.steps,
                restarts=args.restarts,
                loss=args.loss,
                seed=args.seed,
                batch_size=args.batch_size,
                progress=True,
            )
        rows.append(
            {
                "threat": threat.norm.value,
                "eps": threat.eps,
                "attack": "autoattack" if args.autoattack else f"pgd-{args.loss}",
                "clean_acc": result.clean_accuracy,
                "robust_acc": result.robust_accuracy,
            }
        )
    return _emit(rows, args)


def _single_step_options(parser: argparse.ArgumentParser, *, head: bool) -> None:
    parser.add_argument(
        "--encoder",
        required=True,
        help="a checkpoint (.safetensors with its .json sidecar) or 'package.module:factory'",
    )
    if head:
        parser.add_argument(
            "--head", required=True, help="safetensors file with 'weight' (K, m) and 'bias' (K,)"
        )
    parser.add_argument(
        "--data",
        required=True,
        help="mnist | digits8x8 | dsprites | torchvision:NAME | folder:PATH | FILE.npz | FILE.pt",
    )
    parser.add_argument("--threat", default="Linf", help="Linf or L2")
    parser.add_argument("--eps", nargs="+", default=["1/10"], help="radii, e.g. 8/255 0.1")
    parser.add_argument("--n", type=int, default=500, help="the first N points of the data")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robust-transfer",
        description="How much adversarial robustness a pretrained encoder passes on to the "
        "linear heads put on it: measured, bounded and certified.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or resume) a study from a TOML file")
    run.add_argument("config", help="study TOML file")
    demo = commands.add_parser("demo", help="run the embedded default study")
    demo.add_argument("--print-config", action="store_true", help="print its TOML and exit")
    for sub, default_out in ((run, None), (demo, "runs/demo")):
        sub.add_argument(
            "--out",
            required=default_out is None,
            default=default_out,
            help="output folder (results.json, report.html, report.md, store/)",
        )
        sub.add_argument(
            "--cache",
            type=Path,
            default=_default_cache(),
            help="where pretrained encoders are cached (default: %(default)s)",
        )
        sub.add_argument("--quiet", action="store_true", help="no progress bars or tables")

    vulnerability = commands.add_parser(
        "vulnerability", help="the task-independent representation shift of an encoder"
    )
    _single_step_options(vulnerability, head=False)
    bound = commands.add_parser("bound", help="loss bound and robustness criterion for a head")
    _single_step_options(bound, head=True)
    attack = commands.add_parser("attack", help="PGD robust accuracy of encoder + head")
    _single_step_options(attack, head=True)
    attack.add_argument("--loss", default="ce", help="ce, margin or targeted")
    attack.add_argument(
        "--autoattack", action="store_true", help="AutoAttack 'standard' instead of PGD"
    )
    report = commands.add_parser("report", help="redraw report.html / report.md of a study")
    report.add_argument("dir", help="the study's output folder")
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "demo": _cmd_demo,
    "report": _cmd_report,
    "vulnerability": _cmd_vulnerability,
    "bound": _cmd_bound,
    "attack": _cmd_attack,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"robust-transfer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
