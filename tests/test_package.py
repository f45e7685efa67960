"""The package as a user installs it: a wheel built from this tree, installed into a
fresh virtual environment beside (not over) the dependencies, imported and run."""

import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import robust_transfer


def _readme_quick_start(root: Path) -> tuple[str, list[str]]:
    """The README's command-line quick start: the command, and the table rows it shows
    (whitespace collapsed, up to where the README cuts the columns)."""
    section = (root / "README.md").read_text().split("## Quick start: the command line")[1]
    command = re.search(r"```sh\n(.*?)```", section, re.S)
    output = re.search(r"```text\n(.*?)```", section, re.S)
    assert command is not None
    assert output is not None
    rows = [
        " ".join(line.split("...")[0].split())
        for line in output.group(1).splitlines()
        if line.split()[:1] in (["linear-probe"], ["certified-probe"])
    ]
    return command.group(1).replace("\\\n", " ").strip(), rows


ROOT = Path(__file__).resolve().parents[1]
# The installed copy runs without this tree on its path.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A fresh environment with the wheel built from this tree, and its site-packages."""
    tmp_path = tmp_path_factory.mktemp("package")
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
            str(ROOT),
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
    return env_dir, site


def test_the_wheel_installs_beside_its_dependencies_and_runs(
    installed: tuple[Path, str], tmp_path: Path
) -> None:
    env_dir, site = installed
    python = env_dir / "bin" / "python"
    found = subprocess.run(
        [python, "-c", "import robust_transfer as rt; print(rt.__file__); print(rt.__version__)"],
        check=True,
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        cwd=tmp_path,
    ).stdout.split()
    assert found[0].startswith(site), found  # the wheel's copy, not this tree
    assert found[1] == robust_transfer.__version__
    help_text = subprocess.run(
        [env_dir / "bin" / "robust-transfer", "--help"],
        check=True,
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
    ).stdout
    assert "transfer" in help_text


@pytest.mark.slow
def test_the_installed_wheel_runs_the_readme_quick_start(
    installed: tuple[Path, str], tmp_path: Path
) -> None:
    """The README's command-line quick start, as a user would paste it, prints the
    README's numbers."""
    env_dir, _ = installed
    command = env_dir / "bin" / "robust-transfer"
    command_line, printed = _readme_quick_start(ROOT)
    words = shlex.split(command_line)
    assert words[0] == "robust-transfer"
    done = subprocess.run(
        [command, *words[1:]],
        check=True,
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        cwd=tmp_path,
    )
    shown = [" ".join(line.split()) for line in done.stdout.splitlines()]
    for row in printed:
        assert any(row in line for line in shown), (row, done.stdout[-3000:])
    out = tmp_path / "runs" / "first"
    results = json.loads((out / "results.json").read_text())
    assert results["versions"]["robust_transfer"] == robust_transfer.__version__
    assert {record["n"] for record in results["records"]} == {100}
    assert (out / "report.html").is_file()
