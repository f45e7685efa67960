"""The command line's parser: its commands and options, and the argument types that
check every value where it is parsed (one line of error, never a usage dump)."""

from __future__ import annotations

import argparse

from ..attacks.representation import METHODS as REPRESENTATION_METHODS
from ..core.checks import (
    EPOCHS,
    POINTS,
    RESTARTS,
    STEPS,
)
from ..core.runtime import Precision
from ..data.sources import FORMS as DATA_FORMS
from ..models.specs import FORMS
from ..theory.threat import parse_eps
from ..training.protocols import AdaptProtocol, Adversary, NormStats
from .arguments import (
    ADAPT_FILE,
    ENCODER_FILE,
    HEAD_FILE,
    PROBE_FILE,
    PROBES,
    Parser,
    argument,
    count,
    default_cache,
    folder,
    json_target,
    real,
    seed,
    threat_name,
    train_points,
)
from .plan_command import plan_options


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N"
    )


def _study_runtime_options(parser: argparse.ArgumentParser) -> None:
    _device_option(parser)
    plan_options(parser)
    parser.add_argument(
        "--precision",
        choices=[precision.value for precision in Precision],
        default=Precision.FP32.value,
        help="arithmetic of the attacks' search (bf16: autocast, for GPUs); reported "
        "numbers and certificates are always computed in float32",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the encoders for attacks and feature extraction",
    )


def _encoder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", required=True, help=f"an encoder spec: {FORMS}")
    parser.add_argument(
        "--checkpoint", help="weights for the encoder's architecture (.safetensors or .pt)"
    )
    parser.add_argument(
        "--layer", help="cut the features at this module ('penultimate': the last linear input)"
    )
    parser.add_argument(
        "--resize", action="store_true", help="resize inputs to the encoder's input size"
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow pickled weights that need code execution (only for trusted files)",
    )
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="call a package.module:factory that is neither an nn.Module class nor "
        "annotated to return one (only for code you trust)",
    )


def _single_step_options(parser: argparse.ArgumentParser, *, head: bool) -> None:
    _encoder_options(parser)
    _device_option(parser)
    if head:
        parser.add_argument(
            "--head", required=True, help="safetensors file with 'weight' (K, m) and 'bias' (K,)"
        )
    parser.add_argument(
        "--data",
        required=True,
        help=f"a data spec: {DATA_FORMS}",
    )
    parser.add_argument("--threat", type=argument(threat_name), default="Linf", help="Linf or L2")
    parser.add_argument(
        "--eps", type=argument(parse_eps), nargs="+", default=[0.1], help="radii, e.g. 8/255 0.1"
    )
    parser.add_argument(
        "--n",
        type=count(POINTS),
        default=500,
        help="N points of the data: a seeded sample, classes in proportion",
    )
    parser.add_argument("--steps", type=count(STEPS), default=50)
    parser.add_argument("--restarts", type=count(RESTARTS), default=1)
    parser.add_argument("--batch-size", type=count(POINTS), default=250)
    parser.add_argument("--seed", type=argument(seed), default=0)
    parser.add_argument(
        "--json", type=argument(json_target), help="also write the rows to this JSON file"
    )


def _head_training_options(parser: argparse.ArgumentParser, files: str) -> None:
    """The encoder, the data and the output folder of a command that trains a head."""
    _encoder_options(parser)
    parser.add_argument("--data", required=True, help=f"training data: {DATA_FORMS}")
    parser.add_argument(
        "--test-data", help="held-out data (default: 20%% of --data per class, kept out)"
    )
    parser.add_argument("--out", type=argument(folder), required=True, help=f"folder for {files}")


def _adapt_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    adapt = commands.add_parser(
        "adapt",
        help="adapt an encoder to your data by one protocol, clean or adversarial, and save "
        "the adapted encoder and head as safetensors",
    )
    _head_training_options(
        adapt, f"{HEAD_FILE}, {ENCODER_FILE} (when the encoder moved) and {ADAPT_FILE}"
    )
    adapt.add_argument(
        "--protocol",
        choices=[p.value for p in AdaptProtocol if p is not AdaptProtocol.CERTIFIED_PROBE],
        default=AdaptProtocol.LP_FT.value,
        help="with an --adversary: linear-probe is the adversarial probe, lp-ft is RoLI",
    )
    adapt.add_argument(
        "--adversary", choices=[a.value for a in Adversary], default=Adversary.NONE.value
    )
    adapt.add_argument("--threat", type=argument(threat_name), default="Linf", help="Linf or L2")
    adapt.add_argument(
        "--eps", type=argument(parse_eps), default=0.1, help="what it trains against"
    )
    adapt.add_argument("--attack-steps", type=count(STEPS), default=5)
    adapt.add_argument(
        "--eps-warmup",
        type=argument(lambda value: real(value, inclusive=True, most=0.99)),
        default=0.0,
        help="share of the steps over which eps ramps up from 0",
    )
    adapt.add_argument(
        "--norm-stats", choices=[n.value for n in NormStats], default=NormStats.ADAPTIVE.value
    )
    adapt.add_argument("--epochs", type=count(EPOCHS), default=3)
    adapt.add_argument(
        "--lr", type=argument(lambda value: real(value, inclusive=False)), default=5e-4
    )
    adapt.add_argument("--lora-rank", type=count(POINTS), default=4)
    adapt.add_argument(
        "--advise",
        action="store_true",
        help="first measure the frozen encoder and say which recipe to try (about two "
        "linear probes' time)",
    )
    adapt.add_argument("--n", type=count(POINTS), default=50_000, help="at most N training points")
    adapt.add_argument(
        "--eval-points", type=count(POINTS), default=200, help="held-out points attacked"
    )
    adapt.add_argument("--batch-size", type=count(POINTS), default=128)
    adapt.add_argument("--seed", type=argument(seed), default=0)
    adapt.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_option(adapt)


def _transfer_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    transfer = commands.add_parser(
        "transfer",
        help="an encoder and a downstream data set to the full report (probe, shift, bounds, "
        "criterion, expected robust accuracy, certificates, attacks) in one command",
    )
    _encoder_options(transfer)
    transfer.add_argument(
        "--data", required=True, help=f"a data spec, split 80/20 per class: {DATA_FORMS}"
    )
    transfer.add_argument(
        "--out", type=argument(folder), required=True, help="output folder (as a study's)"
    )
    transfer.add_argument("--linf", nargs="*", default=["2/255", "4/255", "8/255"])
    transfer.add_argument("--l2", nargs="*", default=["0.25", "0.5", "1.0"])
    transfer.add_argument(
        "--adaptations",
        nargs="+",
        default=["linear-probe", "certified-probe"],
        help="adaptation protocols (linear-probe, certified-probe, finetune, lp-ft, ...)",
    )
    transfer.add_argument("--n", type=count(POINTS), default=500, help="evaluation points")
    transfer.add_argument(
        "--train-points",
        type=argument(train_points),
        default=1000,
        help="training points of the heads, a stratified sample (default 1000; 'all': the "
        "whole training split)",
    )
    transfer.add_argument(
        "--steps",
        type=count(STEPS),
        default=10,
        help="steps of PGD on each head and of the representation attack",
    )
    transfer.add_argument(
        "--restarts",
        type=count(RESTARTS),
        default=2,
        help="restarts of PGD on each head (cross-entropy and targeted) and of the "
        "representation attack",
    )
    transfer.add_argument(
        "--representation",
        choices=REPRESENTATION_METHODS,
        default="pgd+apgd",
        help="the representation attack: pgd+apgd (both, then a polish) or one of them "
        "(cheaper, for big encoders)",
    )
    transfer.add_argument("--autoattack", action="store_true", help="AutoAttack on every head")
    transfer.add_argument("--seed", type=argument(seed), default=0)
    transfer.add_argument(
        "--cache", type=argument(folder), help="where pretrained encoders are cached"
    )
    transfer.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    _study_runtime_options(transfer)
    transfer.add_argument("--test-data", help="held-out data (then --data is all training)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
            type=argument(folder),
            required=default_out is None,
            default=default_out,
            help="output folder (results.json, report.html, report.md, store/)",
        )
        sub.add_argument(
            "--cache",
            type=argument(folder),
            help="where pretrained encoders are cached (default: the config's cache_dir, "
            f"else {default_cache()})",
        )
        sub.add_argument("--quiet", action="store_true", help="no progress bars or tables")
        _study_runtime_options(sub)

    plan = commands.add_parser(
        "plan", help="a study's stages, passes, expected time and peak memory, before any work"
    )
    plan.add_argument("config", help="study TOML file")
    plan.add_argument("--cache", type=argument(folder), help="where pretrained encoders are cached")
    plan.add_argument(
        "--json", type=argument(json_target), help="also write the plan to this JSON file"
    )
    _device_option(plan)
    plan_options(plan, plan_only=True)
    vulnerability = commands.add_parser(
        "vulnerability", help="the task-independent representation shift of an encoder"
    )
    _single_step_options(vulnerability, head=False)
    bound = commands.add_parser(
        "bound", help="loss bound, robustness criterion and expected robust accuracy for a head"
    )
    _single_step_options(bound, head=True)
    attack = commands.add_parser("attack", help="PGD robust accuracy of encoder + head")
    _single_step_options(attack, head=True)
    attack.add_argument("--loss", default="ce", help="ce, margin or targeted")
    attack.add_argument(
        "--autoattack", action="store_true", help="AutoAttack 'standard' instead of PGD"
    )
    _transfer_parser(commands)
    probe = commands.add_parser(
        "probe", help="train a linear or certified probe on an encoder and save the head"
    )
    _head_training_options(probe, f"{HEAD_FILE} (weight, bias) and {PROBE_FILE}")
    probe.add_argument(
        "--protocol", choices=[p.value for p in PROBES], default=AdaptProtocol.LINEAR_PROBE.value
    )
    probe.add_argument(
        "--radius",
        type=argument(lambda value: real(value, inclusive=True)),
        help="certified probe: feature-space radius",
    )
    probe.add_argument(
        "--eps",
        type=argument(parse_eps),
        help="certified probe: radius = median attacked shift at this eps (with --threat)",
    )
    probe.add_argument(
        "--threat", type=argument(threat_name), default="Linf", help="Linf or L2 (with --eps)"
    )
    probe.add_argument("--steps", type=count(STEPS), default=20, help="representation attack steps")
    probe.add_argument("--radius-points", type=count(POINTS), default=200)
    probe.add_argument(
        "--weight-decay",
        type=argument(lambda value: real(value, inclusive=True)),
        default=1e-4,
    )
    probe.add_argument(
        "--robust-weight",
        type=argument(lambda value: real(value, inclusive=False, most=1.0)),
        default=0.5,
        help="certified probe: the robust term's share of the loss, in (0, 1]",
    )
    probe.add_argument("--n", type=count(POINTS), default=50_000, help="at most N training points")
    probe.add_argument("--batch-size", type=count(POINTS), default=250)
    probe.add_argument("--seed", type=argument(seed), default=0)
    probe.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_option(probe)
    _adapt_parser(commands)
    report = commands.add_parser("report", help="redraw report.html / report.md of a study")
    report.add_argument("dir", type=argument(folder), help="the study's output folder")
    return parser
