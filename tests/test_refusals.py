"""Hostile input at the command line, by kind: each ends in one line on stderr and exit
code 2 (130 for Ctrl-C), writes nothing outside ``--out`` and leaves no partial result;
several examples of each kind, not only the one a probe found."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from robust_transfer import cli
from robust_transfer.cli import commands
from robust_transfer.core import atomic
from robust_transfer.models import SmallCNN
from robust_transfer.models.checkpoint import save_checkpoint, sidecar_path


@pytest.fixture
def where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Inputs in ``tmp_path``; commands run from an empty folder, checked empty after."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "enc.safetensors", SmallCNN(feature_dim=8).eval(), {})
    save_file({"weight": torch.randn(3, 8), "bias": torch.zeros(3)}, tmp_path / "head.safetensors")
    rng = np.random.default_rng(0)
    x = rng.random((12, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "pts.npz", x=x, y=np.arange(12) % 3)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield tmp_path
    assert sorted(os.listdir(cwd)) == [], "a refused command wrote into the current folder"


def _refused(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = cli.main(args)
    except SystemExit as stop:  # argparse's own errors
        code = int(stop.code or 0)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0]
    assert message in lines[0], lines[0]
    return lines[0]


def _no_results(out: Path) -> None:
    """A refused study leaves no result behind (at most its folder claim)."""
    if out.exists():
        assert not (out / "results.json").exists()
        assert not list(out.rglob("*.safetensors"))


def _common(where: Path) -> list[str]:
    return ["--encoder", str(where / "enc.safetensors"), "--data", str(where / "pts.npz")]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--n", "-5", "--n: the value must be a positive integer, got -5"),
        ("--n", "0", "--n: the value must be a positive integer"),
        ("--n", "1e3", "--n: expected an integer"),
        ("--steps", str(2**63 - 1), "--steps: the value 9223372036854775807 exceeds 10,000"),
        ("--restarts", "1000000", "--restarts: the value 1000000 exceeds 100,"),
        ("--eps", "1e-100000000", "--eps: eps must be positive and finite"),
        ("--eps", "3/0", "--eps: cannot parse eps '3/0'"),
        ("--batch-size", "-1", "--batch-size: the value must be a positive integer"),
        ("--seed", "1234567890123456789012345", "--seed: seed must be an integer from 0"),
        ("--seed", "-1", "--seed: seed must be an integer from 0"),
        ("--eps", "1e309", "--eps: eps must be positive and finite"),
        ("--eps", "1" + "0" * 400, "--eps: eps must be positive and finite"),
        ("--eps", "nan", "--eps: cannot parse eps 'nan'"),
        ("--eps", "1/2/3", "--eps: cannot parse eps '1/2/3'"),
        ("--eps", "abc", "--eps: cannot parse eps 'abc'"),
        ("--threat", "L3", "--threat: unknown norm 'L3'"),
        ("--device", "meta", "device 'meta' cannot run the work"),
        ("--device", "banana", "unknown device 'banana'"),
        ("--json", "", "--json: an empty path"),
    ],
)
def test_numbers_and_names_are_checked_where_parsed(
    where: Path, option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _refused(["vulnerability", *_common(where), option, value], message, capsys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threat", "L2", "--eps", "1e39"], "L2 eps 1e+39 exceeds 10000"),
        (["--threat", "L2", "--eps", "1e300"], "L2 eps 1e+300 exceeds 10000"),
        (["--threat", "Linf", "--eps", "8"], "Linf eps 8 exceeds 1"),
    ],
)
def test_radii_beyond_the_box(
    where: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _refused(["vulnerability", *_common(where), *extra], message, capsys)


@pytest.mark.parametrize(
    "extra",
    [
        ["--n", "-5"],
        ["--steps", "0"],
        ["--seed", str(2**64)],
        ["--linf", "1e309"],
        ["--l2", "-1"],
        ["--out", ""],
        ["--out", "   "],
    ],
)
def test_transfer_refuses_before_its_folder(
    where: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = where / "out"
    args = ["transfer", *_common(where), "--out", str(out), "--quiet", *extra]
    _refused(args, "error:", capsys)
    _no_results(out)


def _one_class(where: Path) -> list[Path]:
    """Three kinds of one-class training data: one label, one label of several named
    classes, and an image folder with one class folder."""
    x = np.random.default_rng(1).random((10, 1, 28, 28)).astype(np.float32)
    zeros = where / "zeros.npz"
    np.savez(zeros, x=x, y=np.zeros(10, np.int64))
    named = where / "named.npz"
    np.savez(named, x=x, y=np.full(10, 2), classes=np.array(["a", "b", "c"]))
    folder = where / "images" / "only"
    folder.mkdir(parents=True)
    for k in range(6):
        Image.fromarray((x[k, 0] * 255).astype(np.uint8)).save(folder / f"{k}.png")
    return [zeros, named, folder.parent]


def test_one_class_data_is_refused_by_probe_and_transfer(
    where: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for data in _one_class(where):
        spec = f"folder:{data}" if data.is_dir() else str(data)
        encoder = ["--encoder", str(where / "enc.safetensors")]
        out = where / f"out-{data.name}"
        message = "a classifier needs training points of at least two classes"
        _refused(["probe", *encoder, "--data", spec, "--out", str(out)], message, capsys)
        assert not out.exists()
        transfer = ["transfer", *encoder, "--data", spec, "--out", str(out), "--quiet"]
        _refused([*transfer, "--steps", "1", "--linf", "0.1", "--l2"], message, capsys)
        assert not out.exists()


def _write_config(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


_STUDY = """
name = "s"
[threats]
Linf = ["1/10"]
[encoders.e]
{encoder}
[adaptations.lp]
protocol = "linear-probe"
[[tasks]]
name = "mnist-5-9"
"""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('name = "caf\xe9"\n'.encode("latin-1"), "is not UTF-8 text"),
        ('name = "s"\n'.encode("utf-16"), "is not UTF-8 text"),
        (bytes(range(256)), "is not UTF-8 text"),
        ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "nests tables or arrays too deeply"),
        ("seed = " + "9" * 25 + "\n", "seed must be an integer from 0"),
        ("[attack]\nsteps = 9223372036854775807\n", "steps 9223372036854775807 exceeds"),
        ("[threats]\nL2 = [1e309]\n", "eps must be positive and finite"),
        ("[threats]\nL2 = [" + "9" * 400 + "]\n", "eps must be positive and finite"),
        (_STUDY.format(encoder='spec = ".models:SmallCNN"'), "an absolute module path"),
        (_STUDY.format(encoder='spec = "os:system"\noptions = {command = "touch ../pwned"}'), ""),
        (
            _STUDY.format(
                encoder='protocol = "standard"\npretrain_task = "mnist-5-9"\n'
                "feature_dim = 100000000000"
            ),
            "feature_dim 100000000000 exceeds",
        ),
    ],
)
def test_configs_are_refused_in_one_line(
    where: Path, content: str | bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write_config(where / "study.toml", content)
    out = where / "out"
    if not message:  # a factory that could run anything: refused, its payload never run
        message = "refused: system is neither an nn.Module class"
    _refused(["run", str(config), "--out", str(out), "--quiet"], message, capsys)
    _no_results(out)
    assert not (where / "pwned").exists()


def test_output_folders_that_cannot_be_used(
    where: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dangling = where / "link"
    dangling.symlink_to(where / "nowhere")
    common = [*_common(where), "--quiet", "--steps", "1", "--linf", "0.1", "--l2"]
    _refused(["transfer", *common, "--out", str(dangling)], "symbolic link to nothing", capsys)
    assert not (where / "nowhere").exists()
    blocker = where / "file"
    blocker.write_text("mine")
    _refused(["transfer", *common, "--out", str(blocker / "out")], "Not a directory", capsys)
    assert blocker.read_text() == "mine"


def test_failed_writes_name_the_path_and_a_rerun_resumes(
    where: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk (then a read-only folder) mid-run: one line naming the file and the
    cause; once writable, the same command finishes from what was stored."""
    out = where / "out"
    args = ["transfer", *_common(where), "--out", str(out), "--quiet", "--steps", "1"]
    args += ["--linf", "0.1", "--l2", "--adaptations", "linear-probe", "--n", "6"]
    replace = os.replace
    for code in (errno.ENOSPC, errno.EROFS):
        calls = {"n": 0}

        def failing(source: str, target: str, code: int = code, calls: dict = calls) -> None:  # type: ignore[type-arg]
            calls["n"] += 1
            if calls["n"] > 4:
                raise OSError(code, os.strerror(code), target)
            replace(source, target)

        monkeypatch.setattr(atomic.os, "replace", failing)
        line = _refused(args, os.strerror(code), capsys)
        assert str(out) in line
        assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(atomic.os, "replace", replace)
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["records"]) == 1


def test_ctrl_c_is_one_line(
    where: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "run_study", interrupted)
    assert cli.main(["transfer", *_common(where), "--out", str(where / "o"), "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "interrupted" in err[0]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array(["a", "b"] * 6), "y must hold numbers, got numpy dtype <U1 (text)"),
        (np.array([0] * 11 + [10**9]), "labels must be class indices from 0 to 9999"),
        (np.array([0] * 11 + [-3]), "labels must be class indices from 0 to 9999"),
        (np.array([0] * 11 + [900_000]), "labels must be class indices from 0 to 9999"),
        (np.arange(12).reshape(3, 4), "y must have shape (12,)"),
        (np.array([b"x"] * 12), "(text)"),
        (np.array([None] * 12, dtype=object), "Object arrays cannot be loaded"),
    ],
)
def test_label_arrays(
    where: Path, labels: np.ndarray, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = where / "labels.npz"
    x = np.random.default_rng(0).random((12, 1, 28, 28)).astype(np.float32)
    np.savez(data, x=x, y=labels)
    args = ["vulnerability", "--encoder", str(where / "enc.safetensors"), "--data", str(data)]
    _refused([*args, "--steps", "1"], message, capsys)


def test_big_endian_arrays_read_as_native(where: Path) -> None:
    x = np.random.default_rng(0).random((12, 1, 28, 28))
    y = np.arange(12) % 3
    np.savez(where / "native.npz", x=x.astype(np.float32), y=y)
    np.savez(where / "swapped.npz", x=x.astype(">f4"), y=y.astype(">i8"))
    from robust_transfer.data.files import load_array_file

    native, swapped = load_array_file(where / "native.npz"), load_array_file(where / "swapped.npz")
    assert torch.equal(native.x, swapped.x)
    assert torch.equal(native.y, swapped.y)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no points"),
        ({"x": np.zeros((0, 1, 28, 28), np.float32), "y": np.zeros(0, int)}, "holds no points"),
        ({"x": np.float32(0.5), "y": np.zeros(1, int)}, "holds no points"),
        ({"x": np.zeros((20, 0, 28, 28), np.float32), "y": np.zeros(20, int)}, "no pixels"),
        ({"x": np.zeros((20, 1, 0, 28), np.float32), "y": np.zeros(20, int)}, "no pixels"),
    ],
)
def test_empty_data(
    where: Path, content: object, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = where / "empty.npz"
    if isinstance(content, bytes):
        data.write_bytes(content)
        message = "cannot read"
    else:
        np.savez(data, **content)  # type: ignore[arg-type]
    args = ["vulnerability", "--encoder", str(where / "enc.safetensors"), "--data", str(data)]
    _refused([*args, "--steps", "1"], message, capsys)


@pytest.mark.parametrize("pixels", [1600, 10_000])
def test_decompression_bombs_are_refused(
    where: Path, pixels: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Above PIL's pixel limit (warned up to twice it, refused beyond): both refused. The
    limit is lowered so that the test's bomb is small."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for label in ("a", "b"):
        (where / "bomb" / label).mkdir(parents=True)
        Image.new("L", (28, 28)).save(where / "bomb" / label / "ok.png")
    side = int(pixels**0.5)
    Image.new("L", (side, side)).save(where / "bomb" / "b" / "big.png")
    args = ["vulnerability", "--encoder", str(where / "enc.safetensors")]
    _refused([*args, "--data", f"folder:{where / 'bomb'}", "--steps", "1"], "big.png", capsys)


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        (b"\xff\xfe\x00garbage", "unreadable sidecar"),
        (json.dumps({"arch": "small-cnn", "config": "x", "sha256": "0"}).encode(), "config must"),
        (json.dumps({"arch": 3, "config": {}, "sha256": "0"}).encode(), "arch must be a str"),
        (json.dumps({"arch": "small-cnn", "config": {}}).encode(), "lacks 'sha256'"),
        (b"[" * 100_000 + b"]" * 100_000, "unreadable sidecar"),
    ],
)
def test_broken_sidecars(
    where: Path, sidecar: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sidecar_path(where / "enc.safetensors").write_bytes(sidecar)
    _refused(["vulnerability", *_common(where), "--steps", "1"], message, capsys)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getcwd, ())


@pytest.mark.parametrize("payload", [_Payload(), {"w": _Payload()}, [torch.zeros(2), _Payload()]])
def test_pickles_that_run_code_say_how_to_trust_them(
    where: Path, payload: object, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = where / "w.pt"
    torch.save(payload, weights)
    args = ["vulnerability", "--encoder", "robust_transfer.models:SmallCNN"]
    args += ["--checkpoint", str(weights), "--data", str(where / "pts.npz")]
    _refused(args, "--trust-checkpoint", capsys)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
        ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK 5 is not below WORLD_SIZE 2"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x'"),
        ({"WORLD_SIZE": "2"}, "RANK is missing"),
    ],
)
def test_malformed_process_variables(
    where: Path,
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = where / "out"
    _refused(["transfer", *_common(where), "--out", str(out), "--quiet"], message, capsys)
    _no_results(out)


def _record(findings: object = None, **changes: object) -> bytes:
    """A results file of one classification record, with ``changes`` to it."""
    record = {
        "kind": "classification",
        "encoder": "e",
        "task": "t",
        "adaptation": "a",
        "threat": "L2",
        "eps": 0.5,
        "clean_acc": 0.9,
    }
    results = {"format": 4, "records": [record | changes], "findings": findings}
    return json.dumps(results).encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nests objects too deeply"),
        (b"\xff\xfe{}", "is not valid JSON"),
        (
            json.dumps(
                {
                    "format": 4,
                    "records": [
                        {
                            "kind": "classification",
                            "encoder": "e",
                            "task": "t",
                            "adaptation": "a",
                            "threat": "L2",
                            "eps": 0.5,
                        }
                    ],
                }
            ).encode(),
            "a classification record needs a number for clean_acc",
        ),
        (json.dumps({"format": 4, "records": [{"encoder": "e"}]}).encode(), "kind is None"),
        (json.dumps({"format": 4, "records": [3]}).encode(), "is not a record"),
        (_record(adaptation="x/../../../OUTSIDE"), "is not a name a study writes"),
        (_record(encoder="<script>"), "is not a name a study writes"),
        (_record(task="t\x00"), "is not a name a study writes"),
        (_record(store_key=5), "store_key has an unexpected value 5"),
        (_record(store_key=[1, 2]), "store_key has an unexpected value"),
        (_record(attacked_robust_acc="high"), "attacked_robust_acc has an unexpected value"),
        (_record(threat="L3"), "threat must be Linf or L2"),
        (_record(findings=[1]), "findings[0] must hold a claim"),
        (_record(findings=[{}]), "findings[0] must hold a claim"),
    ],
)
def test_reports_of_broken_results(
    where: Path, content: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from robust_transfer.core.schema import RESULTS_FORMAT

    folder = where / "study"
    folder.mkdir()
    content = content.replace(b'"format": 4', f'"format": {RESULTS_FORMAT}'.encode())
    (folder / "results.json").write_bytes(content)
    _refused(["report", str(folder)], message, capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["results.json"]
    made = {"cwd", "enc.json", "enc.safetensors", "head.safetensors", "pts.npz", "study"}
    assert {p.name for p in where.iterdir()} == made


def test_probe_settings_are_checked_before_its_attack(
    where: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    probe = ["probe", *_common(where), "--out", str(where / "o"), "--protocol", "certified-probe"]
    _refused([*probe, "--eps", "0.1", "--robust-weight", "2"], "exceeds 1", capsys)
    _refused([*probe, "--eps", "0.1", "--weight-decay", "1e300"], "exceeds 1e+15", capsys)
    _refused([*probe, "--radius", "1e308"], "exceeds 1e+15", capsys)
    assert not (where / "o").exists()


def test_json_targets_that_cannot_be_written(
    where: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/proc takes no new files, even from root: refused before the attack runs."""
    args = ["vulnerability", *_common(where), "--steps", "1", "--json", "/proc/rt.json"]
    _refused(args, "cannot write into /proc", capsys)


def test_negative_limits_are_refused() -> None:
    from robust_transfer.core.errors import DataError
    from robust_transfer.data.sources import load_dataset

    with pytest.raises(DataError, match="must be a positive integer, got -5"):
        load_dataset("torchvision:fashion-mnist:train", root="/nonexistent", limit=-5)
    with pytest.raises(DataError, match="must be a positive integer, got -5"):
        load_dataset("folder:/nonexistent", limit_per_class=-5)
