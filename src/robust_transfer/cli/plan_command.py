"""``robust-transfer plan`` and what every study command takes from it: ``--dry-run``
(print the plan, run nothing), ``--budget`` (refuse a study the plan prices over it,
unless ``--force``) and ``--stand-in`` (time another spec in an encoder's place)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ..core.atomic import atomic_write_text
from ..core.errors import InputError
from ..core.runtime import Runtime
from ..report.tables import text
from ..study.config import load_config
from ..study.forecast import Forecast, check_budget, duration, parse_budget
from ..study.pricing import forecast
from ..study.spec import StudyConfig


def _budget(value: str) -> float:
    try:
        return parse_budget(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _stand_in(value: str) -> tuple[str, str]:
    name, equals, spec = value.partition("=")
    if not equals or not name or not spec:
        raise argparse.ArgumentTypeError(f"a stand-in is NAME=SPEC, got {value!r}")
    return name, spec


def plan_options(parser: argparse.ArgumentParser, *, plan_only: bool = False) -> None:
    """The plan's options; on a study command also ``--dry-run``, ``--budget``, ``--force``."""
    parser.add_argument(
        "--stand-in",
        type=_stand_in,
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="time the encoder spec SPEC in the place of the study's encoder NAME (an "
        "architecture whose weights cannot be had here: cost does not depend on weights)",
    )
    if plan_only:
        return
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan (time, memory) and run nothing"
    )
    parser.add_argument(
        "--budget",
        type=_budget,
        help="refuse to start when the plan expects more than this (90s, 15m, 2h): exit "
        "code 3, also with --dry-run",
    )
    parser.add_argument("--force", action="store_true", help="run even past --budget")


def show(priced: Forecast) -> None:
    rows = priced.rows()
    print(text(rows, [(key, key) for key in rows[0]]) if rows else "no work")
    for name, c in priced.calibrations.items():
        print(
            f"{name}: {c.features} features; forward {c.forward * 1e3:.3g} ms, backward "
            f"{c.backward * 1e3:.3g} ms per image on {priced.device} (batch {c.batch})"
        )
    for note in priced.notes:
        print(note)
    most = ""
    if priced.most_seconds > 1.05 * priced.seconds:
        most = (
            f" (at most {duration(priced.most_seconds)} if the expected robust accuracy "
            "attacks every point, not the share near a head's boundary)"
        )
    print(
        f"plan: {priced.units} units, about {duration(priced.seconds)}{most} and "
        f"{priced.peak / 2**30:.1f} GiB at the peak on {priced.device}"
    )


def priced(
    config: StudyConfig,
    args: argparse.Namespace,
    cache: Path,
    runtime: Runtime,
    out: Path | None = None,
) -> Forecast:
    """The plan of ``config``; with ``out``, of what its folder does not hold yet."""
    return forecast(config, cache, runtime, stand_ins=dict(args.stand_in), out=out)


def planned(
    config: StudyConfig,
    args: argparse.Namespace,
    cache: Path,
    runtime: Runtime,
    run: Callable[[], object],
) -> int:
    """A study command: the plan first when asked (``--dry-run``, ``--budget``), then
    ``run`` unless the plan stops it."""
    if args.stand_in and not (args.dry_run or args.budget):
        raise InputError("--stand-in prices a plan: give --dry-run or --budget too")
    if args.dry_run or args.budget is not None:
        plan = priced(config, args, cache, runtime, Path(args.out))
        show(plan)
        # A dry run with a budget answers whether the run would start, as its exit code.
        if args.budget is not None and not args.force:
            check_budget(plan, args.budget)
        if args.dry_run:
            return 0
    run()
    return 0


def run_plan(args: argparse.Namespace, cache: Path) -> int:
    config = load_config(args.config)
    plan = priced(
        config, args, args.cache or config.cache_dir or cache, Runtime.detect(args.device)
    )
    show(plan)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(plan.to_dict(), indent=2, default=str) + "\n")
        print(f"written: {args.json}")
    return 0
