"""Join the latest result of every benchmark into ``benchmarks/RESULTS.md``: a table of
when, where and how each was measured, then each benchmark's own tables.

    python benchmarks/collect.py [--results benchmarks/results] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _record import RESULTS, describe

# In the order a reader wants them: the limit and the peers, the tail, what the theory
# saves, certificates, adaptation, scaling (small and mid-size encoders), the profile,
# the plan against the run, big encoders, the GPU.
ORDER = (
    "bench_attack",
    "bench_tail",
    "bench_expected",
    "bench_expected_encoders",
    "bench_certify",
    "bench_certify_full",
    "bench_adapt",
    "bench_scale",
    "bench_scale_wrn16",
    "bench_profile",
    "bench_plan_demo",
    "bench_plan_resnet50",
    "bench_plan_wrn16_1000",
    "bench_big",
    "bench_gpu",
)


def _where(record: dict[str, object]) -> str:
    env = record.get("environment")
    if isinstance(env, dict):
        return describe(env)
    # Older records kept a few fields at the top level or under settings.
    flat = {**record, **(record.get("settings") or {})}  # type: ignore[dict-item]
    return ", ".join(
        f"{key} {flat[key]}" for key in ("machine", "torch", "threads", "device") if key in flat
    )


def collect(results: Path) -> str:
    found = [name for name in ORDER if (results / f"{name}.md").exists()]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (each benchmark, then `python benchmarks/collect.py`). Every "
        "ratio inside a section was measured in that section's one run. Each section says "
        "whether its times are medians of repeats or single runs (where many heads, threats "
        "or sizes are the repeats), where it was measured, and the command that reproduces it. "
        "Records made before 0.5.1 name robust-transfer 0.1.0 whatever the code was (an "
        "editable install's metadata keeps the version it was made at); their dates place "
        "them in CHANGELOG.md.",
        "",
        "| benchmark | measured with |",
        "| --- | --- |",
    ]
    for name in found:
        record = json.loads((results / f"{name}.json").read_text())
        lines.append(f"| [{name}](#{name.replace('_', '-')}) | {_where(record)} |")
    for name in found:
        lines += ["", f'<a id="{name.replace("_", "-")}"></a>', ""]
        for line in (results / f"{name}.md").read_text().splitlines():
            lines.append(f"#{line}" if line.startswith("#") else line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS.parent / "RESULTS.md")
    args = parser.parse_args(argv)
    text = collect(args.results)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
