"""Fuzzed configs, encoder specs and data: any input ends in a result or in one of the
library's own errors, never in an exception from inside tomllib, numpy or torch.
Bounded examples and a fixed seed keep it repeatable and within the suite's budget."""

from __future__ import annotations

import contextlib
import copy
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from robust_transfer import cli
from robust_transfer.core.errors import RobustTransferError
from robust_transfer.data.sources import load_dataset
from robust_transfer.models.specs import resolve_encoder, resolve_spec
from robust_transfer.study.config import default_config_text, load_config, parse_config

_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_VALID: dict[str, Any] = {
    "name": "fuzz",
    "eval_points": 10,
    "threats": {"Linf": ["1/10"], "L2": [0.5]},
    "attack": {"steps": 2},
    "encoders": {
        "std": {"protocol": "standard", "pretrain_task": "mnist-5-9"},
        "zoo": {"spec": "torchvision:resnet18", "resize": True},
    },
    "adaptations": {
        "lp": {"protocol": "linear-probe"},
        "cp": {"protocol": "certified-probe", "radius": {"rule": "quantile", "quantile": 0.5}},
    },
    "tasks": [
        {"name": "mnist-5-9", "adaptations": ["lp", "cp"]},
        {"name": "mine", "data": "torchvision:cifar10:train", "data_options": {"root": "x"}},
    ],
}

_words = st.sampled_from(
    ["name", "protocol", "spec", "data", "eps", "radius", "rule", "Linf", "L2", "../x", "", "é"]
)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | _words
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(_words | st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into the nested tables and lists of a config."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


_ALL_PATHS = _paths(_VALID)


@seed(20261125)
@_SETTINGS
@given(st.lists(st.tuples(st.sampled_from(_ALL_PATHS), _values), min_size=1, max_size=3))
def test_mutated_configs_parse_or_fail_cleanly(changes: list[tuple[tuple[Any, ...], Any]]) -> None:
    source = copy.deepcopy(_VALID)
    for path, value in changes:
        target: Any = source
        try:
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change replaced a parent of this path
    with contextlib.suppress(RobustTransferError):
        parse_config(source, base=Path("/nonexistent"))


@seed(20261125)
@_SETTINGS
@given(st.text(max_size=80), st.integers(min_value=0, max_value=2000))
def test_toml_text_loads_or_fails_cleanly(noise: str, at: int) -> None:
    text = default_config_text()
    at = min(at, len(text))
    path = Path(f"/tmp/robust-transfer-fuzz-{at}.toml")
    path.write_text(text[:at] + noise + text[at:], encoding="utf-8")
    try:
        load_config(path)
    except RobustTransferError:
        pass
    finally:
        path.unlink()


_spec_alphabet = string.ascii_letters + string.digits + ":/._-"
_prefixes = st.sampled_from(
    ["", "torchvision:", "timm:", "robustbench:", "open_clip:", "checkpoint:", "os:", "x.y:"]
)


@seed(20261125)
@_SETTINGS
@given(_prefixes, st.text(alphabet=_spec_alphabet, max_size=30))
def test_encoder_specs_resolve_or_fail_cleanly(prefix: str, rest: str) -> None:
    spec = prefix + rest
    try:
        resolve_spec(spec, Path("/nonexistent"))
    except RobustTransferError:
        return
    if prefix in {"torchvision:", "timm:", "robustbench:", "open_clip:"}:
        # Zoo specs load offline: an unknown model or missing weights is a clean error.
        with contextlib.suppress(RobustTransferError):
            resolve_encoder(spec)


_data_prefixes = st.sampled_from(["", "torchvision:", "folder:", "task:", "mnist", "x."])


@seed(20261125)
@_SETTINGS
@given(_data_prefixes, st.text(alphabet=_spec_alphabet, max_size=20))
def test_data_specs_load_or_fail_cleanly(prefix: str, rest: str) -> None:
    try:
        data = load_dataset(
            prefix + rest, **({"root": "/nonexistent"} if prefix == "torchvision:" else {})
        )
    except RobustTransferError:
        return
    assert float(data.x.min()) >= 0.0
    assert float(data.x.max()) <= 1.0


@seed(20261125)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.sampled_from([".npz", ".pt"]),
    st.binary(max_size=300),
    st.sampled_from(["garbage", "arrays"]),
    st.integers(min_value=0, max_value=4),
)
def test_data_files_load_or_fail_cleanly(suffix: str, payload: bytes, kind: str, rank: int) -> None:
    path = Path(f"/tmp/robust-transfer-fuzz{suffix}")
    try:
        if kind == "garbage":
            path.write_bytes(payload)
        else:
            # Well-formed files of the wrong shapes, types and values.
            rng = np.random.default_rng(len(payload))
            x = np.asarray(rng.normal(size=(3,) * rank) * 2)
            y = rng.integers(-2, 5, size=3)
            if suffix == ".npz":
                np.savez(path, x=x, y=y)
            else:
                torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
        with contextlib.suppress(RobustTransferError):
            load_dataset(str(path))
    finally:
        path.unlink(missing_ok=True)


_DTYPES = ["float32", "float64", ">f4", "uint8", "int64", ">i8", "int8", "uint64", "bool", "<U2"]


@seed(20261206)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.sampled_from(_DTYPES),
    st.sampled_from(_DTYPES),
    st.lists(st.integers(min_value=0, max_value=3), max_size=5),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.booleans(),
)
def test_data_arrays_load_or_fail_cleanly(
    x_dtype: str, y_dtype: str, shape: list[int], label: int, with_classes: bool
) -> None:
    """Arrays of every dtype (big-endian, text, bool), rank and label range: a data set
    that keeps the container's promises, or one of the library's errors."""
    path = Path("/tmp/robust-transfer-fuzz-arrays.npz")
    rng = np.random.default_rng(abs(label) % 1000)
    x = (rng.random(shape) * 1.2).astype(x_dtype) if x_dtype != "<U2" else np.full(shape, "a")
    n = shape[0] if shape else 1
    y = np.array([label] + [0] * (n - 1))
    arrays = {"x": x, "y": y.astype(y_dtype) if y_dtype != "<U2" else y.astype(str)}
    if with_classes:
        arrays["classes"] = np.array(["a", "b"])
    np.savez(path, **arrays)  # type: ignore[arg-type]
    try:
        data = load_dataset(str(path))
    except RobustTransferError:
        return
    finally:
        path.unlink(missing_ok=True)
    assert data.x.dtype == torch.float32
    assert data.x.dim() == 4
    assert int(data.y.min()) >= 0
    assert int(data.y.max()) < data.num_classes


_path_parts = st.sampled_from(["", " ", ".", "..", "a", "é", "x/y", "/", "-", "--json", "\t"])


@seed(20261206)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(name=st.lists(_path_parts, max_size=4).map("".join))
def test_output_paths_are_used_or_refused_cleanly(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Any path as ``report``'s folder or ``--json``'s file: a result, or one line and
    exit code 2; never a write outside the folder the command runs in."""
    root = tmp_path_factory.mktemp("paths")
    data = root / "d.npz"
    np.savez(data, x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, 1]))
    cwd = root / "cwd"
    cwd.mkdir()
    before = sorted(p.name for p in root.iterdir())
    vulnerability = ["vulnerability", "--encoder", "torch.nn:Flatten", "--data", str(data)]
    with contextlib.chdir(cwd):
        for args in (
            ["report", name],
            [*vulnerability, "--n", "2", "--steps", "1", "--eps", "0.1", "--json", name],
        ):
            try:
                code = cli.main(args)
            except SystemExit as stop:
                code = int(stop.code or 0)
            assert code in (0, 2)
    assert sorted(p.name for p in root.iterdir()) == before
