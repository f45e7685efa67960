"""Each benchmark runs end to end on tiny sizes and writes its tables (the figures
themselves come from `make bench`-sized runs, not from the test suite)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoders pretrained here go to the test's folder, not the benchmarks' cache."""
    import _encoders

    monkeypatch.setattr(_encoders, "CACHE", tmp_path / "cache")


def test_the_tail_benchmark_runs_small(tmp_path: Path) -> None:
    import bench_tail

    out = tmp_path / "tail"
    report = bench_tail.main(
        [
            "--points",
            "4",
            "--encoders",
            "random",
            "--reference-steps",
            "3",
            "--reference-restarts",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = report["rows"]
    assert isinstance(rows, list)
    assert len(rows) == 2 * 5  # two threats, five budgets
    # The reference includes every method's own shift: no ratio can exceed 1.
    assert all(0 < row["min"] <= row["median"] <= 1 + 1e-9 for row in rows)
    assert json.loads(out.with_suffix(".json").read_text())["points"] == 4
    assert "| method | worst 5th pct |" in out.with_suffix(".md").read_text()


def test_the_certificate_benchmark_runs_small(tmp_path: Path) -> None:
    import bench_certify

    out = tmp_path / "certify"
    report = bench_certify.main(["--points", "6", "--encoders", "random", "--out", str(out)])
    rows = report["rows"]
    assert isinstance(rows, list)
    assert len(rows) == len(bench_certify.THREATS)
    for row in rows:
        for method in bench_certify.METHODS:
            assert row[method]["tightness"] >= 1 - 1e-4  # a bound is never below the attack
        assert row["head_specific_certified_acc"] >= row["task_agnostic_certified_acc"]
        assert row["head_specific_certified_acc"] <= row["pgd_robust_acc"]
    assert "| encoder | threat | lipschitz |" in out.with_suffix(".md").read_text()
