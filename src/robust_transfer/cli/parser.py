"""The command line's parser: its commands and options, and the argument types that
check every value where it is parsed (one line of error, never a usage dump)."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from ..core.checks import (
    EPOCHS,
    POINTS,
    RESTARTS,
    STEPS,
    Limit,
    check_number,
    check_positive_int,
    check_seed,
)
from ..core.errors import InputError
from ..core.runtime import Precision
from ..data.sources import FORMS as DATA_FORMS
from ..models.specs import FORMS
from ..theory.threat import Norm, parse_eps
from ..training.protocols import AdaptProtocol, Adversary, NormStats

T = TypeVar("T")

PROBE_FILE, HEAD_FILE = "probe.json", "head.safetensors"
ADAPT_FILE, ENCODER_FILE = "adapt.json", "encoder.safetensors"
PROBES = (AdaptProtocol.LINEAR_PROBE, AdaptProtocol.CERTIFIED_PROBE)


def default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "robust-transfer" / "encoders"


def _json_target(value: str) -> Path:
    """``--json FILE``, checked before any work: a folder or a missing parent would only
    fail once the results are computed."""
    if not value.strip():
        raise InputError("an empty path: name a file")
    path = Path(value)
    if path.is_dir():
        raise InputError(f"{value} is a folder: name a file")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent} does not exist")
    try:  # found now, not once the rows are computed
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise InputError(f"cannot write into {path.parent}: {err.strerror}") from err
    return path


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse type whose errors keep their reason (argparse words any
    other exception as "invalid <function name> value")."""

    def checked(value: str) -> T:
        try:
            return parse(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    checked.__name__ = parse.__name__
    return checked


def _threat(norm: str) -> str:
    Norm.parse(norm)
    return norm


def _integer(value: str) -> int:
    try:
        return int(value)
    except ValueError as err:
        raise InputError(f"expected an integer, got {value!r}") from err


def _count(limit: Limit) -> Callable[[str], int]:
    """A positive integer at most ``limit``, checked where it is parsed."""
    return _argument(lambda value: check_positive_int(_integer(value), "the value", limit))


def _train_points(value: str) -> int | None:
    """A count of training points, or ``all``."""
    if value == "all":
        return None
    return check_positive_int(_integer(value), "the value", POINTS)


def _seed(value: str) -> int:
    return check_seed(_integer(value))


def _real(value: str, *, inclusive: bool, most: float = 1e15) -> float:
    try:
        number = float(value)
    except ValueError as err:
        raise InputError(f"expected a number, got {value!r}") from err
    return check_number(number, "the value", inclusive=inclusive, most=most)


def _folder(value: str) -> Path:
    """An output folder, named: an empty string is not the current folder."""
    if not value.strip():
        raise InputError("an empty path: name a folder")
    path = Path(value)
    if path.is_symlink() and not path.exists():
        raise InputError(f"{value} is a symbolic link to nothing: name a folder")
    return path


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N"
    )


def _study_runtime_options(parser: argparse.ArgumentParser) -> None:
    _device_option(parser)
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
    parser.add_argument("--threat", type=_argument(_threat), default="Linf", help="Linf or L2")
    parser.add_argument(
        "--eps", type=_argument(parse_eps), nargs="+", default=[0.1], help="radii, e.g. 8/255 0.1"
    )
    parser.add_argument(
        "--n",
        type=_count(POINTS),
        default=500,
        help="N points of the data: a seeded sample, classes in proportion",
    )
    parser.add_argument("--steps", type=_count(STEPS), default=50)
    parser.add_argument("--restarts", type=_count(RESTARTS), default=1)
    parser.add_argument("--batch-size", type=_count(POINTS), default=250)
    parser.add_argument("--seed", type=_argument(_seed), default=0)
    parser.add_argument(
        "--json", type=_argument(_json_target), help="also write the rows to this JSON file"
    )


class _Parser(argparse.ArgumentParser):
    """Says what is wrong with the command line in one line, as every other error is
    said (``--help`` still prints the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _head_training_options(parser: argparse.ArgumentParser, files: str) -> None:
    """The encoder, the data and the output folder of a command that trains a head."""
    _encoder_options(parser)
    parser.add_argument("--data", required=True, help=f"training data: {DATA_FORMS}")
    parser.add_argument(
        "--test-data", help="held-out data (default: 20%% of --data per class, kept out)"
    )
    parser.add_argument("--out", type=_argument(_folder), required=True, help=f"folder for {files}")


def _adapt_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
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
    adapt.add_argument("--threat", type=_argument(_threat), default="Linf", help="Linf or L2")
    adapt.add_argument(
        "--eps", type=_argument(parse_eps), default=0.1, help="what it trains against"
    )
    adapt.add_argument("--attack-steps", type=_count(STEPS), default=5)
    adapt.add_argument(
        "--eps-warmup",
        type=_argument(lambda value: _real(value, inclusive=True, most=0.99)),
        default=0.0,
        help="share of the steps over which eps ramps up from 0",
    )
    adapt.add_argument(
        "--norm-stats", choices=[n.value for n in NormStats], default=NormStats.ADAPTIVE.value
    )
    adapt.add_argument("--epochs", type=_count(EPOCHS), default=3)
    adapt.add_argument(
        "--lr", type=_argument(lambda value: _real(value, inclusive=False)), default=5e-4
    )
    adapt.add_argument("--lora-rank", type=_count(POINTS), default=4)
    adapt.add_argument(
        "--advise",
        action="store_true",
        help="first measure the frozen encoder and say which recipe to try (about two "
        "linear probes' time)",
    )
    adapt.add_argument("--n", type=_count(POINTS), default=50_000, help="at most N training points")
    adapt.add_argument(
        "--eval-points", type=_count(POINTS), default=200, help="held-out points attacked"
    )
    adapt.add_argument("--batch-size", type=_count(POINTS), default=128)
    adapt.add_argument("--seed", type=_argument(_seed), default=0)
    adapt.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_option(adapt)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
            type=_argument(_folder),
            required=default_out is None,
            default=default_out,
            help="output folder (results.json, report.html, report.md, store/)",
        )
        sub.add_argument(
            "--cache",
            type=_argument(_folder),
            help="where pretrained encoders are cached (default: the config's cache_dir, "
            f"else {default_cache()})",
        )
        sub.add_argument("--quiet", action="store_true", help="no progress bars or tables")
        _study_runtime_options(sub)

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
        "--out", type=_argument(_folder), required=True, help="output folder (as a study's)"
    )
    transfer.add_argument("--linf", nargs="*", default=["2/255", "4/255", "8/255"])
    transfer.add_argument("--l2", nargs="*", default=["0.25", "0.5", "1.0"])
    transfer.add_argument(
        "--adaptations",
        nargs="+",
        default=["linear-probe", "certified-probe"],
        help="adaptation protocols (linear-probe, certified-probe, finetune, lp-ft, ...)",
    )
    transfer.add_argument("--n", type=_count(POINTS), default=500, help="evaluation points")
    transfer.add_argument(
        "--train-points",
        type=_argument(_train_points),
        default=1000,
        help="training points of the heads, a stratified sample (default 1000; 'all': the "
        "whole training split)",
    )
    transfer.add_argument("--steps", type=_count(STEPS), default=10, help="PGD steps on each head")
    transfer.add_argument("--autoattack", action="store_true", help="AutoAttack on every head")
    transfer.add_argument("--seed", type=_argument(_seed), default=0)
    transfer.add_argument(
        "--cache", type=_argument(_folder), help="where pretrained encoders are cached"
    )
    transfer.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    _study_runtime_options(transfer)
    transfer.add_argument("--test-data", help="held-out data (then --data is all training)")
    probe = commands.add_parser(
        "probe", help="train a linear or certified probe on an encoder and save the head"
    )
    _head_training_options(probe, f"{HEAD_FILE} (weight, bias) and {PROBE_FILE}")
    probe.add_argument(
        "--protocol", choices=[p.value for p in PROBES], default=AdaptProtocol.LINEAR_PROBE.value
    )
    probe.add_argument(
        "--radius",
        type=_argument(lambda value: _real(value, inclusive=True)),
        help="certified probe: feature-space radius",
    )
    probe.add_argument(
        "--eps",
        type=_argument(parse_eps),
        help="certified probe: radius = median attacked shift at this eps (with --threat)",
    )
    probe.add_argument(
        "--threat", type=_argument(_threat), default="Linf", help="Linf or L2 (with --eps)"
    )
    probe.add_argument(
        "--steps", type=_count(STEPS), default=20, help="representation attack steps"
    )
    probe.add_argument("--radius-points", type=_count(POINTS), default=200)
    probe.add_argument(
        "--weight-decay",
        type=_argument(lambda value: _real(value, inclusive=True)),
        default=1e-4,
    )
    probe.add_argument(
        "--robust-weight",
        type=_argument(lambda value: _real(value, inclusive=False, most=1.0)),
        default=0.5,
        help="certified probe: the robust term's share of the loss, in (0, 1]",
    )
    probe.add_argument("--n", type=_count(POINTS), default=50_000, help="at most N training points")
    probe.add_argument("--batch-size", type=_count(POINTS), default=250)
    probe.add_argument("--seed", type=_argument(_seed), default=0)
    probe.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_option(probe)
    _adapt_parser(commands)
    report = commands.add_parser("report", help="redraw report.html / report.md of a study")
    report.add_argument("dir", type=_argument(_folder), help="the study's output folder")
    return parser
