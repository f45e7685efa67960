"""The plan against the run it priced: ``robust-transfer plan`` (or ``--dry-run``) says
what each stage will take; the run then records what each took (the seconds stored with
every piece of work, the pretraining seconds of each encoder). Each stage, the total
wall time and the peak resident memory side by side, for the default study (from an
empty cache, so pretraining counts), for one ``transfer`` command or for a study's
config. Results go to ``benchmarks/results/bench_plan_<name>.json`` and ``.md``.

    python benchmarks/bench_plan.py demo
    python benchmarks/bench_plan.py --name wrn16 run -- study.toml
    python benchmarks/bench_plan.py --name resnet50 transfer -- --encoder torchvision:resnet50 \\
        --resize --data task:mnist-5-9 --n 100 ...
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _record import RESULTS, command, describe, environment, write

from robust_transfer.cli.commands import study_config
from robust_transfer.cli.parser import build_parser
from robust_transfer.cli.plan_command import priced, show
from robust_transfer.core.runtime import Runtime
from robust_transfer.core.schema import ENCODERS_DIR, STORE_DIR, Meta, StoreKind
from robust_transfer.core.store import Store

# The stages of a plan that one kind of stored work holds (an evaluation's shard holds
# the head's attacks, its certificate, the profile and the refinement).
GROUPS = {
    "pretraining": ("pretraining",),
    StoreKind.TRAIN_FEATURES.value: ("train features",),
    StoreKind.ADVICE.value: ("advice",),
    "radius": ("radius",),
    StoreKind.HEADS.value: ("heads",),
    StoreKind.SHIFT.value: ("representation attack",),
    StoreKind.CERTIFICATES.value: ("certificates",),
    StoreKind.UNIT_SHARDS.value: (
        "PGD on heads",
        "refinement",
        "head certificates",
        "profile",
        "AutoAttack",
    ),
}
_RADIUS = (StoreKind.TRAIN_SHIFT.value, StoreKind.TRAIN_CERTIFICATES.value)


def measured(out: Path) -> dict[str, float]:
    """Seconds per group, as the run stored them."""
    seconds = dict.fromkeys(GROUPS, 0.0)
    store = Store(out / STORE_DIR)
    for key in store.keys():  # noqa: SIM118 (a Store, not a dict)
        group = "radius" if key[0] in _RADIUS else key[0]
        if group not in seconds:
            continue
        loaded = store.load(key)
        assert loaded is not None
        seconds[group] += float(loaded[1].get(Meta.SECONDS, 0.0))  # type: ignore[arg-type]
    for info in (out / ENCODERS_DIR).glob("*.json"):
        seconds["pretraining"] += float(json.loads(info.read_text()).get(Meta.PRETRAIN_SECONDS, 0))
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("study", choices=["demo", "transfer", "run"])
    parser.add_argument("--name", help="results file suffix (default: the study)")
    parser.add_argument("--out", type=Path, help="results file, without suffix")
    parser.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        help="the transfer command's options, or run's config, after --",
    )
    args = parser.parse_args(argv)
    args.rest = [arg for arg in args.rest if arg != "--"]
    name = args.name or args.study
    cli = [sys.executable, "-m", "robust_transfer.cli"]
    with tempfile.TemporaryDirectory() as folder:
        where = Path(folder)
        common = ["--out", str(where / "out"), "--cache", str(where / "cache")]
        study = [args.study, *args.rest, *common]
        # The plan, on the same machine a moment before the run.
        plan = _plan(study)
        start = time.perf_counter()
        subprocess.run([*cli, *study, "--quiet"], check=True)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024.0
        actual = measured(where / "out")
    rows = []
    for group, stages in GROUPS.items():
        expected = sum(row["seconds"] for row in plan["stages"] if row["stage"] in stages)
        rows.append(
            {
                "stored as": group,
                "stages": ", ".join(stages),
                "plan s": expected,
                "run s": actual[group],
            }
        )
    record = {
        "environment": environment(),
        "command": command("bench_plan.py", argv),
        "study": study,
        "plan_seconds": plan["seconds"],
        "plan_most_seconds": plan["most_seconds"],
        "plan_notes": plan["notes"],
        "run_seconds": wall,
        "ratio": plan["seconds"] / wall,
        "plan_peak_bytes": plan["peak_bytes"],
        "run_peak_bytes": peak,
        "stages": rows,
    }
    lines = [
        f"# The plan against the run: {name}",
        "",
        describe(record["environment"]),  # type: ignore[arg-type]
        "",
        f"`robust-transfer {' '.join(study[:1] + args.rest)}`",
        "",
        f"Plan {plan['seconds']:.0f} s, run {wall:.0f} s "
        f"(plan / run = {plan['seconds'] / wall:.2f}); "
        f"peak memory: plan {plan['peak_bytes'] / 2**30:.2f} GiB, run {peak / 2**30:.2f} GiB.",
        "",
        "| stored as | stages of the plan | plan s | run s |",
        "| --- | --- | ---: | ---: |",
        *(
            f"| {r['stored as']} | {r['stages']} | {r['plan s']:.1f} | {r['run s']:.1f} |"
            for r in rows
        ),
        "",
        "Stored seconds do not count loading, joining and the report: the total row is the "
        "command's wall time.",
    ]
    write(args.out or RESULTS / f"bench_plan_{name}", record, "\n".join(lines))
    print("\n".join(lines))


def _plan(study: list[str]) -> dict[str, Any]:
    """What ``--dry-run`` prints for ``study``, as numbers."""
    args = build_parser().parse_args([*study, "--dry-run"])
    config, cache = study_config(args)
    plan = priced(config, args, cache, Runtime.detect(args.device))
    show(plan)
    return plan.to_dict()


if __name__ == "__main__":
    main()
