"""The package as a user installs it: a wheel built from this tree, installed into a
fresh virtual environment beside (not over) the dependencies, imported and run."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import robust_transfer

TINY = """
from torch import nn


def make() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 8))
"""


def test_the_wheel_installs_imports_and_runs_ten_points(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("robust_transfer-*.whl")
    assert wheel.name.startswith(f"robust_transfer-{robust_transfer.__version__}-")
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # The dependencies come from this environment's site-packages (after the fresh
    # environment's own): only the wheel is installed, nothing is downloaded.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    installed = subprocess.run(
        [python, "-c", "import robust_transfer as rt; print(rt.__file__); print(rt.__version__)"],
        check=True,
        capture_output=True,
        text=True,
        env=clean_env,
        cwd=tmp_path,
    ).stdout.split()
    assert installed[0].startswith(site), installed  # the wheel's copy, not this tree
    assert installed[1] == robust_transfer.__version__
    command = env_dir / "bin" / "robust-transfer"
    help_text = subprocess.run(
        [command, "--help"], check=True, capture_output=True, text=True, env=clean_env
    ).stdout
    assert "transfer" in help_text
    # Ten points of a user's own encoder on the built-in 8x8 digits, end to end.
    (tmp_path / "tiny.py").write_text(TINY)
    out = tmp_path / "run"
    subprocess.run(
        [
            command,
            "transfer",
            "--encoder",
            "tiny:make",
            "--data",
            "task:digits8x8-5-9",
            "--out",
            str(out),
            "--n",
            "10",
            "--linf",
            "1/10",
            "--l2",
            "--steps",
            "2",
            "--quiet",
            "--adaptations",
            "linear-probe",
            "--train-points",
            "200",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=clean_env | {"PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["versions"]["robust_transfer"] == robust_transfer.__version__
    (record,) = results["records"]
    assert record["n"] == 10
    assert (out / "report.html").is_file()
