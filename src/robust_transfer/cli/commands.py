"""The ``robust-transfer`` command line: whole studies, or one step on your own models."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attacks import attack_classifier
from ..attacks.reference import attack_autoattack
from ..attacks.settings import AttackSettings
from ..core.atomic import atomic_write_text
from ..core.errors import InputError, MissingFileError, ResultsFormatError, RobustTransferError
from ..core.runtime import Runtime, release_processes
from ..core.schema import RESULTS_FILE, Array, Field, Record, check_results
from ..data.dataset import ImageDataset
from ..data.sources import load_dataset
from ..data.tasks import stratified_sample
from ..estimates.evaluate import attacked_shift
from ..estimates.measurement import Measurement, measure
from ..models import load_head
from ..models.heads import save_head
from ..pipeline import run_study
from ..report.render import write_report
from ..report.tables import text
from ..study.config import default_config, default_config_text, load_config, parse_config
from ..study.folder import refuse_a_file
from ..study.spec import StudyConfig
from ..theory.threat import ThreatModel
from ..training.adapt import adapt, head_accuracy
from ..training.protocols import AdaptConfig, AdaptProtocol
from .adapt_command import run_adapt
from .arguments import HEAD_FILE, PROBE_FILE, default_cache
from .common import check_held_out, encoder_of, runtime_of, training_split
from .parser import build_parser
from .plan_command import planned, run_plan


def _study_runtime(args: argparse.Namespace) -> Runtime:
    """A study's runtime: it may share its work among the processes of ``torchrun``."""
    return Runtime.detect(args.device, precision=args.precision, compile=args.compile, shared=True)


def study_config(args: argparse.Namespace) -> tuple[StudyConfig, Path]:
    """The study a ``run``, ``demo`` or ``transfer`` command names, and its cache."""
    if args.command == "run":
        config = load_config(args.config)
        return config, args.cache or config.cache_dir or default_cache()
    if args.command == "demo":
        return default_config(), args.cache or default_cache()
    return parse_config(_transfer_config(args), base=Path.cwd()), args.cache or default_cache()


def _study(args: argparse.Namespace) -> int:
    """Run (or resume) the study, priced first when ``--dry-run`` or ``--budget`` asks."""
    config, cache = study_config(args)
    runtime = _study_runtime(args)
    return planned(
        config,
        args,
        cache,
        runtime,
        lambda: run_study(
            config, args.out, cache_dir=cache, runtime=runtime, progress=not args.quiet
        ),
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.print_config:
        print(default_config_text())
        return 0
    return _study(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    return run_plan(args, default_cache())


def _transfer_config(args: argparse.Namespace) -> dict[str, object]:
    """A one-task study, as TOML would give it, from the command line's options."""
    encoder: dict[str, object] = {"spec": args.encoder}
    if args.checkpoint:
        encoder["weights"] = str(Path(args.checkpoint).resolve())
    if args.layer:
        encoder["layer"] = args.layer
    encoder |= {
        "resize": args.resize,
        "trust_checkpoint": args.trust_checkpoint,
        "trust_code": args.trust_code,
    }
    threats = {norm: eps for norm, eps in (("Linf", args.linf), ("L2", args.l2)) if eps}
    if not threats:
        raise InputError("give at least one radius with --linf or --l2")
    name, colon, _ = args.data.removeprefix("task:").partition(":")
    builtin = args.data.startswith("task:") and not colon
    task: dict[str, object] = {"name": name} if builtin else {"name": "transfer", "data": args.data}
    if args.test_data:
        if builtin:
            raise InputError("a built-in task has its own test data: drop --test-data")
        task["test_data"] = args.test_data
    return {
        "name": "transfer",
        "seed": args.seed,
        "eval_points": args.n,
        # Not tied to --n: the heads, and so every point's answers, do not depend on
        # how many points are evaluated.
        "radius_points": 100,
        **({} if args.train_points is None else {"train_points": args.train_points}),
        "attack": {
            "steps": args.steps,
            "restarts": args.restarts,
            "targeted_restarts": args.restarts,
            "representation_steps": args.steps,
            "representation_restarts": args.restarts,
            "representation_method": args.representation,
            "autoattack": args.autoattack,
        },
        "encoders": {"encoder": encoder},
        "adaptations": {protocol: {"protocol": protocol} for protocol in args.adaptations},
        "tasks": [task | {"threats": threats}],
    }


def _probe_radius(
    args: argparse.Namespace, encoder: nn.Module, x_train: Tensor, device: torch.device
) -> tuple[float | None, str | None]:
    """The certified probe's feature radius: ``--radius``, or the median attacked shift
    of training points at ``--threat``/``--eps`` (the study's quantile rule)."""
    if args.protocol != AdaptProtocol.CERTIFIED_PROBE:
        if args.radius is not None or args.eps is not None:
            raise InputError("--radius and --eps set the certified probe's radius only")
        return None, None
    if (args.radius is None) == (args.eps is None):
        raise InputError("the certified probe needs --radius R or --eps E (one of them)")
    if args.radius is not None:
        return args.radius, "fixed"
    threat = ThreatModel(args.threat, args.eps)
    settings = AttackSettings(representation_steps=args.steps, batch_size=args.batch_size)
    points = x_train[: args.radius_points].to(device)
    shift = attacked_shift(
        encoder, points, threat, settings, seed=args.seed, progress=not args.quiet
    )
    radius = float(shift[Array.SHIFT].float().quantile(0.5))
    return radius, f"median attacked shift of {len(points)} training points at {threat}"


def _cmd_probe(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_a_file(out)
    check_held_out(args)
    settings = {
        "protocol": args.protocol,
        "seed": args.seed,
        "weight_decay": args.weight_decay,
        "robust_weight": args.robust_weight,
    }
    certified = args.protocol == AdaptProtocol.CERTIFIED_PROBE
    AdaptConfig(**settings, radius=0.0 if certified else None)  # checked before any work
    runtime = runtime_of(args)
    encoder = encoder_of(args, runtime)
    train, split = training_split(args)
    radius, how = _probe_radius(args, encoder, train.x, runtime.device)
    config = AdaptConfig(**settings, radius=radius)
    adapted = adapt(encoder, train, config, progress=not args.quiet)
    record: dict[str, object] = {
        "encoder": args.encoder,
        "checkpoint": args.checkpoint,
        "layer": args.layer,
        "resize": args.resize,
        "data": args.data,
        "test_data": args.test_data,
        "classes": list(train.classes),
        "features": adapted.head.in_features,
        "train_points": len(train),
        "test_points": len(split.test),
        "train_acc": adapted.metrics["train_acc"],
        "test_acc": head_accuracy(encoder, adapted.head, split.test),
        "radius_rule": how,
        "seconds": adapted.metrics["seconds"],
        "config": config.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    head = save_head(adapted.head, out / HEAD_FILE, {"classes": json.dumps(record["classes"])})
    atomic_write_text(out / PROBE_FILE, json.dumps(record, indent=2) + "\n")
    row: Record = {"protocol": config.protocol.value, "radius": radius}
    row |= {key: record[key] for key in ("train_points", "test_points", "train_acc", "test_acc")}
    print(text([row], [(key, key) for key in row]))
    print(f"head: {head}\n      {out / PROBE_FILE}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    path = Path(args.dir) / RESULTS_FILE
    if not path.is_file():
        raise MissingFileError(f"no {RESULTS_FILE} in {args.dir}: run a study there first")
    try:
        loaded = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsFormatError(f"{path} is not valid JSON: {err}") from err
    except RecursionError as err:
        raise ResultsFormatError(f"{path} nests objects too deeply to be results") from err
    md, page = write_report(check_results(loaded, str(path)), Path(args.dir))
    print(f"report: {page}\n        {md}")
    return 0


def _data(args: argparse.Namespace) -> ImageDataset:
    data = load_dataset(args.data)
    if args.n > len(data):
        print(f"note: {args.data} holds {len(data)} points, fewer than --n {args.n}: using all")
    return stratified_sample(data, args.n, seed=args.seed)


def _settings(args: argparse.Namespace) -> AttackSettings:
    return AttackSettings(
        steps=args.steps,
        restarts=args.restarts,
        representation_steps=args.steps,
        representation_restarts=args.restarts,
        batch_size=args.batch_size,
    )


def _emit(rows: list[Record], args: argparse.Namespace) -> int:
    print(text(rows, [(key, key) for key in rows[0]]))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0


def _threats(args: argparse.Namespace) -> list[ThreatModel]:
    threats = [ThreatModel(args.threat, eps) for eps in args.eps]
    if len(set(threats)) < len(threats):
        raise InputError(f"--eps names a radius twice: {' '.join(map(str, args.eps))}")
    return threats


def _measured(args: argparse.Namespace, encoder: nn.Module, x: Tensor) -> Measurement:
    """The entry point's measurement of the encoder on ``x`` at each ``--eps``."""
    return measure(
        encoder, x, _threats(args), settings=_settings(args), seed=args.seed, progress=True
    )


def _row(record: Record, fields: tuple[Field, ...]) -> Record:
    """A CLI row: the threat and the record's fields that were computed."""
    row: Record = {Field.THREAT: record[Field.THREAT], Field.EPS: record[Field.EPS]}
    return row | {key: record[key] for key in fields if record.get(key) is not None}


_VULNERABILITY_FIELDS = (
    Field.N,
    Field.MEAN_SHIFT,
    Field.MEDIAN_SHIFT,
    Field.Q90_SHIFT,
    Field.MAX_SHIFT,
    Field.CERTIFIED_SHIFT,
)
_BOUND_FIELDS = (
    Field.CLEAN_ACC,
    Field.EXPECTED_ROBUST_ACC,
    Field.DIRECTIONAL_SHARE,
    Field.MEAN_SHIFT,
    Field.MEDIAN_MARGIN,
    Field.PREDICTED_ROBUST_ACC,
    Field.LOSS_BOUND,
    Field.CERTIFIED_ROBUST_ACC,
    Field.HEAD_CERTIFIED_ROBUST_ACC,
    Field.CERTIFIED_LOSS_BOUND,
)


def _cmd_vulnerability(args: argparse.Namespace) -> int:
    runtime = runtime_of(args)
    encoder = encoder_of(args, runtime)
    x = _data(args).x.to(runtime.device)
    rows = [_row(record, _VULNERABILITY_FIELDS) for record in _measured(args, encoder, x).summary()]
    return _emit(rows, args)


def _labelled(args: argparse.Namespace) -> tuple[nn.Module, nn.Linear, Tensor, Tensor]:
    runtime = runtime_of(args)
    encoder = encoder_of(args, runtime)
    head = load_head(args.head).to(runtime.device)
    data = _data(args)
    x, y = data.x.to(runtime.device), data.y.to(runtime.device)
    with torch.no_grad():
        dim = encoder(x[:1]).flatten(1).shape[1]
    if dim != head.in_features:
        raise InputError(
            f"the head {args.head} takes {head.in_features} features, the encoder gives {dim}"
        )
    if int(y.max()) >= head.out_features:
        raise InputError(
            f"the data has class {int(y.max())}, the head only {head.out_features} classes"
        )
    return encoder, head, x, y


def _cmd_bound(args: argparse.Namespace) -> int:
    encoder, head, x, y = _labelled(args)
    evaluation = _measured(args, encoder, x).evaluate(head, y)
    rows = [_row(record, (*_BOUND_FIELDS, Field.WEIGHT_GAP)) for record in evaluation.records]
    return _emit(rows, args)


def _cmd_attack(args: argparse.Namespace) -> int:
    encoder, head, x, y = _labelled(args)
    model = nn.Sequential(encoder, head).eval()
    rows: list[Record] = []
    for threat in _threats(args):
        if args.autoattack:
            result = attack_autoattack(
                model, x, y, threat, seed=args.seed, batch_size=args.batch_size
            ).attack
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
                Field.THREAT: threat.norm.value,
                Field.EPS: threat.eps,
                Field.ATTACK: "autoattack" if args.autoattack else f"pgd-{args.loss}",
                Field.CLEAN_ACC: result.clean_accuracy,
                Field.ROBUST_ACC: result.robust_accuracy,
            }
        )
    return _emit(rows, args)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _study,
    "demo": _cmd_demo,
    "plan": _cmd_plan,
    "report": _cmd_report,
    "transfer": _study,
    "probe": _cmd_probe,
    "adapt": run_adapt,
    "vulnerability": _cmd_vulnerability,
    "bound": _cmd_bound,
    "attack": _cmd_attack,
}


_STUDIES = ("run", "demo", "transfer")


def _failure(err: BaseException) -> str | None:
    """The one line for a failure that is not a bug, or None for a bug (a traceback)."""
    if isinstance(err, RobustTransferError):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        # A write refused (read-only, full disk) or a path the system would not open.
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    if isinstance(err, RecursionError):
        return "the input is nested too deeply to read"
    if isinstance(err, MemoryError):
        return "out of memory: use fewer points or a smaller batch size"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            f"robust-transfer {args.command}: interrupted; what was stored so far is kept, "
            "the same command resumes",
            file=sys.stderr,
        )
        return 130
    except (RobustTransferError, OSError, RecursionError, MemoryError) as err:
        line = _failure(err)
        if line is None:
            raise
        if isinstance(err, OSError) and args.command in _STUDIES:
            line += "; what was stored so far is kept, and the same command resumes from it"
        print(f"robust-transfer {args.command}: error: {line}", file=sys.stderr)
        return err.exit_code if isinstance(err, RobustTransferError) else 2
    finally:
        release_processes()
