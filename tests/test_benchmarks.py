"""Each benchmark runs end to end on tiny sizes and writes its tables (the figures
themselves come from `make bench`-sized runs, not from the test suite)."""

import json
import sys
from pathlib import Path

import pytest

from robust_transfer.study.config import default_config

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


@pytest.mark.slow
def test_the_certificate_benchmark_runs_small(tmp_path: Path) -> None:
    import bench_certify

    out = tmp_path / "certify"
    argv = ["--points", "6", "--encoders", "random", "--threats", "Linf:1/40,L2:0.5"]
    report = bench_certify.main([*argv, "--out", str(out)])
    rows = report["rows"]
    assert isinstance(rows, list)
    assert len(rows) == 2
    for row in rows:
        for method in bench_certify.METHODS:
            assert row[method]["tightness"] >= 1 - 1e-4  # a bound is never below the attack
        assert row["head_specific_certified_acc"] >= row["task_agnostic_certified_acc"]
        assert row["head_specific_certified_acc"] <= row["pgd_robust_acc"]
    assert "| encoder | threat | lipschitz |" in out.with_suffix(".md").read_text()
    argv = ["--points", "1", "--encoders", "random", "--methods", "ibp,crown-full"]
    report = bench_certify.main([*argv, "--threats", "Linf:1/40", "--out", str(out)])
    (row,) = report["rows"]  # type: ignore[misc]
    assert 1 - 1e-4 <= row["crown-full"]["tightness"] < row["ibp"]["tightness"]
    assert "| ibp | crown-full |" in out.with_suffix(".md").read_text()


def test_the_attack_benchmark_runs_small(tmp_path: Path) -> None:
    import bench_attack

    out = tmp_path / "attack"
    argv = ["--encoder", "random", "--batch", "8", "--resnet-batch", "2", "--steps", "2"]
    record = bench_attack.main([*argv, "--repeats", "1", "--out", str(out)])
    limit, peers = record["limit"], record["peers"]
    assert isinstance(limit, list)
    assert isinstance(peers, list)
    assert [row["method"] for row in limit] == ["pgd", "apgd"] * 2
    assert {row["attack"] for row in peers} == {"robust-transfer", "torchattacks", "foolbox"}
    for row in peers:
        # A peer's every iterate holds its last: scoring all of them breaks at least as many.
        if row["attack"] != "robust-transfer":
            assert row["robust_acc_any_iterate"] <= row["robust_acc_last_iterate"]
    assert "| threat | attack | ms/step |" in out.with_suffix(".md").read_text()


def test_the_adaptation_benchmark_runs_small(tmp_path: Path) -> None:
    import bench_adapt

    out = tmp_path / "adapt"
    record = bench_adapt.main(
        ["--encoders", "random", "--repeats", "1", "--epochs", "1", "--out", str(out)]
    )
    (row,) = record["rows"]  # type: ignore[misc]
    assert row["ratio"] == pytest.approx(row["end_to_end_seconds"] / row["probe_seconds"])
    assert row["probe_accuracy"] > 40  # even random features separate five digits well
    assert "| encoder | train points | probe s |" in out.with_suffix(".md").read_text()


def test_the_expected_benchmark_runs_small_and_counts_heads_past_the_groupings(
    tmp_path: Path,
) -> None:
    import bench_expected

    # Five labels group in 51 ways; heads past that relearn groupings from other data.
    assert bench_expected._groupings(5) == 51
    assert len(bench_expected.label_sets(5, 60, seed=0)) == 51
    out = tmp_path / "expected"
    argv = ["--encoders", "random", "--points", "6", "--heads", "1", "3", "--aa-heads", "1"]
    record = bench_expected.main(
        [*argv, "--aa-points", "1", "--wide-points", "0", "--out", str(out)]
    )
    (result,) = record["encoders"]  # type: ignore[misc]
    assert [row["heads"] for row in result["timing"]] == [1, 3]
    grid = len(next(t for t in default_config().tasks if t.name == "mnist-5-9").threats)
    assert result["errors_vs_study_pgd"]["expected"]["pairs"] == 3 * grid
    assert result["errors_vs_autoattack"]["study PGD"]["pairs"] == grid  # one head
    assert result["fitted_s"]["study_pgd"]["per_head"] > 0
    assert "Fitted over every K measured" in out.with_suffix(".md").read_text()


def test_collect_joins_the_results_with_where_they_were_measured(tmp_path: Path) -> None:
    import bench_adapt
    import collect

    results = tmp_path / "results"
    bench_adapt.main(
        [
            "--encoders",
            "random",
            "--repeats",
            "1",
            "--epochs",
            "1",
            "--out",
            str(results / "bench_adapt"),
        ]
    )
    (results / "bench_scale.json").write_text(json.dumps({"settings": {"torch": "x"}}))
    (results / "bench_scale.md").write_text("# Scale\n\nbody\n")
    text = collect.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    assert text == (tmp_path / "RESULTS.md").read_text()
    assert text.index("## Adaptation") < text.index("## Scale")  # headings one level down
    assert "torch 2." in text
    assert "| [bench_scale](#bench-scale) | torch x |" in text


@pytest.mark.slow
def test_the_scale_benchmark_runs_small_on_a_named_encoder(tmp_path: Path) -> None:
    import bench_scale

    out = tmp_path / "scale"
    argv = ["--sizes", "8", "12", "--shard", "8", "--steps", "1", "--no-unsharded"]
    argv += ["--encoder", "wide_resnet:wrn_16_4_grey", "--classes", "2"]
    argv += ["--representation", "pgd", "--restarts", "1", "--train-points", "60"]
    # torchrun's launches cost most of a run this small; tests/test_distributed.py runs
    # the same launches, so the smoke test leaves them out.
    record = bench_scale.main([*argv, "--torchrun-points", "0", "--out", str(out)])
    assert [run["points"] for run in record["runs"]] == [8, 12]  # type: ignore[attr-defined]
    assert record["settings"]["encoder"] == "wide_resnet:wrn_16_4_grey"  # type: ignore[index]
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Memory and time against the number of evaluation points: wide_")
    assert "2 classes" in text
    assert "(pgd, restarts 1), 60 training points" in text
    assert "Fitted over the sharded sizes: time ~ points^" in text


def test_the_scale_benchmark_writes_its_study_for_the_plan(tmp_path: Path) -> None:
    import bench_scale

    from robust_transfer.study.config import load_config

    argv = ["--sizes", "30", "--classes", "2", "--encoder", "wide_resnet:wrn_16_4_grey"]
    assert bench_scale.main([*argv, "--write-study", str(tmp_path / "study")]) == {}
    config = load_config(tmp_path / "study" / "scale.toml")
    assert config.eval_points == 30
    assert config.encoders["cnn"].source == "wide_resnet:wrn_16_4_grey"
    assert sorted(p.name for p in (tmp_path / "study").glob("*.npz")) == ["test.npz", "train.npz"]


def test_the_profile_benchmark_runs_small(tmp_path: Path) -> None:
    import bench_profile

    out = tmp_path / "profile"
    argv = ["--encoder", "random", "--points", "8", "--certify-points", "2", "--heads", "1"]
    record = bench_profile.main([*argv, "--out", str(out)])
    paths = record["paths"]
    assert isinstance(paths, dict)
    assert len(paths) == 5
    # The attack and the estimator's profile are backward passes, inside torch's engine.
    for name, path in paths.items():
        if name.startswith(("representation attack", "estimator profile")):
            assert any("run_backward" in t["function"] for t in path["top"])
            assert path["compiled_share"] > 0.5
    assert "| path | wall s | compiled share |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_the_plan_benchmark_sets_a_plan_beside_its_run(tmp_path: Path) -> None:
    import bench_plan

    out = tmp_path / "plan"
    transfer = ["--encoder", "robust_transfer.models:SmallCNN", "--data", "task:mnist-5-9"]
    transfer += ["--n", "4", "--train-points", "20", "--steps", "1", "--restarts", "1"]
    bench_plan.main(["--out", str(out), "transfer", "--", *transfer, "--linf", "0.05", "--l2"])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["plan_seconds"] > 0
    assert record["run_seconds"] > 0
    rows = {row["stored as"]: row for row in record["stages"]}
    assert "train-features" in rows
    for kind in ("shift", "unit-shards"):
        assert rows[kind]["plan s"] > 0, kind
        assert rows[kind]["run s"] > 0, kind
    assert "| unit-shards |" in out.with_suffix(".md").read_text()


def test_the_big_encoder_benchmark_runs_a_stage_and_records_refusals() -> None:
    import bench_big

    features = bench_big.one("vit", "features", 2, 1)
    assert features["seconds"] > 0
    certifiers = bench_big.one("vit", "certifiers", 2, 1)
    # A ViT's attention is not a layer any certifier reads: each says so in its line.
    for name in ("lipschitz", "ibp", "crown", "head-crown"):
        assert f"{name}: " in str(certifiers["note"])
