"""Where the hot paths spend their time: the representation attack, feature extraction,
the certificates and the expected-robustness estimator, each under cProfile.

For each path: its wall time, the share spent inside torch's compiled operators (the
work itself) against Python (ours and torch's module machinery), and the functions
with the most time of their own. A hot path with a large Python share has a per-sample
loop or per-call overhead worth removing.

    python benchmarks/bench_profile.py [--encoder standard] [--points 256]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _encoders import encoder_named
from _record import RESULTS, command, describe, environment, write

from robust_transfer import (
    attack_representation,
    certify_all,
    extract_features,
    profile_encoder,
    train_linear_probe,
)
from robust_transfer.data.tasks import get_task
from robust_transfer.study.config import default_config

# The default study's eps grid of digits 5-9.
CERTIFIERS = ("lipschitz", "ibp", "crown")
THREATS = next(task for task in default_config().tasks if task.name == "mnist-5-9").threats


def _compiled(filename: str, name: str) -> bool:
    """One of torch's compiled functions (its operators, the autograd engine): cProfile
    files C functions under ``~``; Python's own (``list.append``, ``time``) do not count."""
    return filename == "~" and "torch" in name


def profiled(run: Callable[[], object], top: int) -> dict[str, object]:
    run()  # warm-up: one-time costs (allocations, lazy imports) are not the hot path
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    run()
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    own = [
        (tottime, f"{Path(filename).name}:{line}({name})" if filename != "~" else name, filename)
        for (filename, line, name), (_, _, tottime, _, _) in stats.items()
    ]
    compiled = sum(t for t, label, filename in own if _compiled(filename, label))
    total = sum(t for t, _, _ in own)
    own.sort(reverse=True)
    return {
        "wall_s": wall,
        "compiled_share": compiled / total if total else 0.0,
        "top": [{"function": label, "own_s": t} for t, label, _ in own[:top]],
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="standard")
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--certify-points", type=int, default=16)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_profile")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    encoder = encoder_named(args.encoder)
    split = get_task("mnist-5-9").downstream
    x, y = split.test.x[: args.points], split.test.y[: args.points]
    features = extract_features(encoder, split.train.x)
    heads = [
        train_linear_probe(features, (split.train.y + shift) % 5).eval()
        for shift in range(args.heads)
    ]
    profile = profile_encoder(encoder, x)

    def estimator() -> None:
        for shift, head in enumerate(heads):
            for threat in THREATS:
                profile.expected_robust(head, (y + shift) % 5, threat)

    paths: dict[str, Callable[[], object]] = {
        f"representation attack (PGD, 20 steps, {args.points} points)": lambda: (
            attack_representation(encoder, x, THREATS[2], steps=20)
        ),
        f"feature extraction ({len(split.train.x)} points)": lambda: extract_features(
            encoder, split.train.x
        ),
        f"certificates (lipschitz, ibp and crown; {args.certify_points} points)": lambda: (
            certify_all(encoder, x[: args.certify_points], THREATS[2], CERTIFIERS)
        ),
        f"estimator profile (Jacobian, {args.points} points)": lambda: profile_encoder(encoder, x),
        f"estimator, {args.heads} heads x {len(THREATS)} threats": estimator,
    }
    record: dict[str, object] = {
        "environment": environment(),
        "command": command("bench_profile.py", argv),
        "encoder": args.encoder,
        "paths": {name: profiled(run, args.top) for name, run in paths.items()},
    }
    write(args.out, record, markdown(record))
    return record


def markdown(record: dict[str, object]) -> str:
    lines = [
        "# Where the hot paths spend their time",
        "",
        describe(record["environment"]),  # type: ignore[arg-type]
        f"Reproduce: `{record['command']}`. One profiled run per path after a warm-up, "
        f"{record['encoder']} encoder; compiled = the share of time inside torch's compiled "
        "functions (operators, the autograd engine), the rest is Python (cProfile's own "
        "overhead included, so the Python share is an upper bound).",
        "",
        "| path | wall s | compiled share | most own time |",
        "| --- | ---: | ---: | --- |",
    ]
    paths = record["paths"]
    assert isinstance(paths, dict)
    for name, path in paths.items():
        top = "; ".join(f"`{t['function']}` {t['own_s']:.2f} s" for t in path["top"][:3])
        lines.append(
            f"| {name} | {path['wall_s']:.2f} | {100 * path['compiled_share']:.0f}% | {top} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
