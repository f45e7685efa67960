"""The CUDA path, for a machine with a GPU: one script, run as it is.

1. A small study (a SmallCNN, 20 digits) on the CPU and on the GPU in float32: the
   records must agree within float noise.
2. ``transfer`` on a torchvision ResNet-50 at 224 x 224 and on the paper's CIFAR-100
   WideResNet-34-10 (``benchmarks/wide_resnet.py``), random weights, 100 points, in
   float32, bf16 (``--precision bf16``) and float32 with ``--compile``: the plan, the
   wall time, every stage's stored seconds and the peak GPU memory.
3. The ResNet-50 run under ``torchrun`` with one process (nccl).

Results go to ``benchmarks/results/bench_gpu.json`` and ``.md``, marked with the GPU.

    python benchmarks/bench_gpu.py [--points 100]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _record import RESULTS, command, describe, environment, write
from bench_plan import GROUPS, measured

from robust_transfer.core.schema import RESULTS_FILE, records_of

HERE = Path(__file__).resolve().parent
ENCODERS = {
    "resnet50": ["--encoder", "torchvision:resnet50", "--resize"],
    "wrn-34-10": ["--encoder", "wide_resnet:wrn_34_10"],
}
MODES = {"fp32": [], "bf16": ["--precision", "bf16"], "compile": ["--compile"]}


def _cifar_like(where: Path) -> Path:
    """3 x 32 x 32 images in 10 classes for the CIFAR WideResNet (no download here)."""
    import numpy as np

    path = where / "cifar_like.npz"
    if not path.is_file():
        rng = np.random.default_rng(0)
        x = rng.random((1000, 3, 32, 32), dtype=np.float32)
        np.savez(path, x=x, y=np.arange(1000) % 10)
    return path


def _transfer(where: Path, name: str, extra: list[str], device: str, points: int) -> list[str]:
    where.mkdir(parents=True, exist_ok=True)
    data = ["--data", "task:mnist-5-9"]
    if name == "wrn-34-10":
        data = ["--data", str(_cifar_like(where))]
    return [
        "transfer", *ENCODERS[name], *data, "--n", str(points), "--train-points", "200",
        "--steps", "5", "--restarts", "1", "--representation", "pgd", "--linf", "4/255",
        "--l2", "--device", device, "--out", str(where / "out"), "--cache", str(where / "c"),
        "--quiet", *extra,
    ]  # fmt: skip


def _run(args: list[str], *, torchrun: bool = False) -> float:
    binary = Path(sys.executable).parent
    launch = [str(binary / "robust-transfer")]
    if torchrun:
        launch = [str(binary / "torchrun"), "--standalone", "--nproc-per-node=1", "--no-python"]
        launch.append(str(binary / "robust-transfer"))
    env = os.environ | {"PYTHONPATH": str(HERE)}
    start = time.perf_counter()
    subprocess.run([*launch, *args], check=True, env=env)
    return time.perf_counter() - start


def _peak_gpu(args: list[str]) -> float:
    """The same run in this process, for its peak GPU memory."""
    from robust_transfer.cli import main

    sys.path.insert(0, str(HERE))
    torch.cuda.reset_peak_memory_stats()
    assert main(args) == 0
    return torch.cuda.max_memory_allocated() / 2**30


def _records(out: Path) -> list[dict[str, object]]:
    loaded = records_of(json.loads((out / RESULTS_FILE).read_text()))
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in loaded]


def _agree(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_agree(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_agree(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=100)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py measures the CUDA path: no GPU here")
    record: dict[str, object] = {
        "environment": environment(),
        "command": command("bench_gpu.py", argv),
    }
    with tempfile.TemporaryDirectory() as folder:
        small = ["--encoder", "robust_transfer.models:SmallCNN", "--data", "task:mnist-5-9"]
        small += ["--n", "20", "--train-points", "100", "--linf", "1/40", "--l2", "0.5", "--quiet"]
        outs = {}
        for device in ("cpu", "cuda"):
            outs[device] = Path(folder) / device
            _run(["transfer", *small, "--device", device, "--out", str(outs[device])])
        record["small_case_agrees"] = _agree(_records(outs["cpu"]), _records(outs["cuda"]))
    rows = []
    for name in ENCODERS:
        for mode, extra in MODES.items():
            with tempfile.TemporaryDirectory() as folder:
                where = Path(folder)
                args_ = _transfer(where, name, extra, "cuda", args.points)
                plan = subprocess.run(
                    [str(Path(sys.executable).parent / "robust-transfer"), *args_, "--dry-run"],
                    check=True, capture_output=True, text=True,
                    env=os.environ | {"PYTHONPATH": str(HERE)},
                ).stdout.strip().splitlines()[-1]  # fmt: skip
                wall = _run(args_)
                stages = measured(where / "out")
                peak = _peak_gpu(_transfer(where / "again", name, extra, "cuda", args.points))
            rows.append({"encoder": name, "mode": mode, "plan": plan, "seconds": wall,
                         "peak_gpu_gib": peak, "stages": stages})  # fmt: skip
            print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as folder:
        nccl = _run(_transfer(Path(folder), "resnet50", [], "cuda", args.points), torchrun=True)
    record |= {"rows": rows, "torchrun_nccl_one_process_seconds": nccl}
    lines = [
        f"# The CUDA path on {torch.cuda.get_device_name()}",
        "",
        describe(record["environment"]),  # type: ignore[arg-type]
        "",
        f"Small study, CPU against GPU (float32): records agree within 1e-3: "
        f"{'yes' if record['small_case_agrees'] else 'NO'}.",
        "",
        "| encoder | mode | seconds | peak GPU GiB | plan | " + " | ".join(GROUPS) + " |",
        "| --- | --- | ---: | ---: | --- |" + " ---: |" * len(GROUPS),
        *(
            f"| {r['encoder']} | {r['mode']} | {r['seconds']:.0f} | {r['peak_gpu_gib']:.1f} | "
            f"{r['plan']} | " + " | ".join(f"{r['stages'][g]:.0f}" for g in GROUPS) + " |"  # type: ignore[index]
            for r in rows
        ),
        "",
        f"ResNet-50 under torchrun, one process (nccl): {nccl:.0f} s.",
    ]
    write(RESULTS / "bench_gpu", record, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
