"""A study's output folder under hostile use: names that climb out of it, a user's files
in it, changed inputs, a failed run, two runs at once, a killed run's lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from robust_transfer import cli
from robust_transfer.core.errors import ConfigError, InputError
from robust_transfer.core.schema import LOCK_FILE, STUDY_MARKER
from robust_transfer.study import folder
from robust_transfer.study.config import default_config_text, parse_config
from robust_transfer.study.folder import claimed


def _config(data: Path | None = None, **top: Any) -> dict[str, Any]:
    task: dict[str, Any] = {"name": "mnist-5-9"}
    if data is not None:
        task = {"name": "mine", "data": str(data)}
    return {
        "threats": {"Linf": ["1/10"]},
        "encoders": {"std": {"protocol": "standard", "pretrain_task": "mnist-5-9"}},
        "adaptations": {"lp": {"protocol": "linear-probe"}},
        "tasks": [task],
    } | top


def _write_points(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.random((10, 1, 28, 28)).astype(np.float32), y=np.arange(10) % 2)
    return path


def _enter(out: Path, source: dict[str, Any], base: Path | None = None) -> None:
    with claimed(out, parse_config(source, base=base)):
        pass


def _fail_before_any_result(out: Path, source: dict[str, Any]) -> None:
    with claimed(out, parse_config(source)):
        (out / "encoders").mkdir()
        (out / "encoders" / "std.json").write_text("{}")
        raise RuntimeError("a bad checkpoint")


def _fake_result(out: Path) -> None:
    unit = out / "store" / "units" / "u.safetensors"
    unit.parent.mkdir(parents=True)
    unit.write_bytes(b"a unit")


@pytest.mark.parametrize(
    ("where", "name"),
    [("encoders", "../../../x"), ("adaptations", "a/b"), ("tasks", ".hidden"), ("tasks", "")],
)
def test_names_that_are_not_file_names_are_refused(tmp_path: Path, where: str, name: str) -> None:
    source = _config()
    if where == "tasks":
        source["tasks"] = [{"name": name, "data": str(_write_points(tmp_path / "p.npz", 0))}]
    else:
        source[where] = {name: next(iter(source[where].values()))}
    with pytest.raises(ConfigError, match="use letters, digits"):
        parse_config(source)


def test_a_name_climbing_out_of_out_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "study.toml"
    config.write_text(
        '[threats]\nLinf = [0.1]\n[encoders."../../../x"]\nprotocol = "standard"\n'
        'pretrain_task = "mnist-5-9"\n[adaptations.lp]\nprotocol = "linear-probe"\n'
        '[[tasks]]\nname = "mnist-5-9"\n'
    )
    out = tmp_path / "a" / "b" / "out"
    assert cli.main(["run", str(config), "--out", str(out)]) == 2
    assert "encoders.'../../../x'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["study.toml"]


def test_out_naming_a_file_or_a_folder_of_other_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(InputError, match="is a file, not a folder"):
        _enter(afile, _config())
    with pytest.raises(InputError, match=r"holds other files \(notes.txt\)"):
        _enter(tmp_path, _config())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    toml = tmp_path / "s.toml"
    toml.write_text(default_config_text())
    assert cli.main(["run", str(toml), "--out", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "mine"


def test_changed_input_files_make_another_study(tmp_path: Path) -> None:
    data = _write_points(tmp_path / "points.npz", 0)
    out = tmp_path / "out"
    with claimed(out, parse_config(_config(data))):
        _fake_result(out)
    _enter(out, _config(data))  # the same inputs: resumed
    _write_points(data, 1)
    with pytest.raises(ConfigError, match="different input files"):
        _enter(out, _config(data))


def test_a_run_that_failed_before_any_result_does_not_block_its_fix(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="a bad checkpoint"):
        _fail_before_any_result(out, _config(seed=1))
    _enter(out, _config(seed=1))  # its lock was released
    with claimed(out, parse_config(_config(seed=2))):  # the corrected config
        assert not (out / "encoders").exists()
        _fake_result(out)
    with pytest.raises(ConfigError, match="different study configuration"):
        _enter(out, _config(seed=3))
    assert (out / STUDY_MARKER).is_file()


def test_two_runs_into_one_folder_the_second_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from robust_transfer.study.config import parse_config\n"
        "from robust_transfer.study.folder import claimed\n"
        f"with claimed(Path(sys.argv[1]), parse_config({_config()!r})):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"another run \\(pid {first.pid} "):
            _enter(out, _config())
    finally:
        first.kill()
        first.wait()
    # Killed: the kernel released its lock; the file only names the last holder.
    assert (out / LOCK_FILE).is_file()
    with claimed(out, parse_config(_config())):
        assert f"pid {os.getpid()} " in (out / LOCK_FILE).read_text()
    _enter(out, _config())


def test_a_moved_project_resumes_and_an_older_marker_is_renewed(tmp_path: Path) -> None:
    first = tmp_path / "a"
    first.mkdir()
    data = _write_points(first / "points.npz", 0)
    weights = first / "w.ckpt"  # any suffix: what torch.load reads is hashed
    weights.write_bytes(b"weights")
    source = _config(data) | {"encoders": {"own": {"spec": "os:getcwd", "weights": "w.ckpt"}}}
    source["tasks"][0]["data"] = "points.npz"
    out = first / "out"
    with claimed(out, parse_config(source, base=first)):
        _fake_result(out)
    moved = tmp_path / "b"
    first.rename(moved)
    _enter(moved / "out", source, base=moved)  # the same inputs elsewhere: resumed
    (moved / "w.ckpt").write_bytes(b"other weights")
    with pytest.raises(ConfigError, match="different input files"):
        _enter(moved / "out", source, base=moved)
    # A folder marked before input files counted (same config): marked again, resumed.
    old = moved / "out" / STUDY_MARKER
    marker = json.loads(old.read_text())
    config = parse_config(source, base=moved)
    marker["fingerprint"] = folder._fingerprint_before_inputs(config)
    old.write_text(json.dumps(marker))
    _enter(moved / "out", source, base=moved)
    assert json.loads(old.read_text())["fingerprint"] == folder.fingerprint(config)
