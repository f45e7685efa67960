"""A small study end to end: records, invariants, report, resume after a kill, and the CLI."""

import copy
import importlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from browser import render
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression

from robust_transfer.certify import base as certify_base
from robust_transfer.cli import commands as cli
from robust_transfer.core.errors import ResultsFormatError, SoundnessError
from robust_transfer.core.runtime import Runtime
from robust_transfer.core.schema import RESULTS_FILE, StoreKind
from robust_transfer.core.store import Store
from robust_transfer.data.tasks import get_task, stratified_sample
from robust_transfer.estimates.measurement import measure
from robust_transfer.models import head_from_arrays, load_encoder, load_head
from robust_transfer.models.features import extract_features
from robust_transfer.pipeline import run_study
from robust_transfer.study import runner
from robust_transfer.study.config import ConfigError, parse_config

SMALL: dict[str, Any] = {
    "name": "small",
    "eval_points": 40,
    "train_points": 400,
    "curve_points": 7,
    "radius_points": 20,
    "attack": {
        "steps": 3,
        "targeted_restarts": 1,
        "representation_steps": 4,
        "batch_size": 40,
    },
    "threats": {"Linf": ["1/10"], "L2": [0.5, 0.75]},
    "encoders": {
        "std": {"protocol": "standard", "pretrain_task": "mnist-5-9", "epochs": 1, "limit": 300},
        "adv": {
            "protocol": "adversarial",
            "pretrain_task": "mnist-5-9",
            "epochs": 1,
            "limit": 300,
            "attack_steps": 2,
            "threat": {"norm": "Linf", "eps": 0.1},
        },
        "lip": {
            "protocol": "lipschitz",
            "pretrain_task": "mnist-5-9",
            "epochs": 1,
            "limit": 300,
            "threat": {"norm": "L2", "eps": 1.0},
        },
        "shapes": {
            "protocol": "standard",
            "pretrain_task": "dsprites-latents",
            "epochs": 1,
            "limit": 200,
        },
    },
    "adaptations": {
        "linear-probe": {"protocol": "linear-probe"},
        "certified-probe": {"protocol": "certified-probe"},
        "finetune": {"protocol": "finetune", "epochs": 1},
        "adv-probe": {
            "protocol": "linear-probe",
            "adversary": "trades",
            "attack_steps": 2,
            "eps_warmup": 0.5,
        },
        "roli": {"protocol": "lp-ft", "adversary": "pgd", "epochs": 1, "attack_steps": 2},
        "adv-finetune": {
            "protocol": "finetune",
            "adversary": "pgd",
            "epochs": 1,
            "attack_steps": 2,
        },
    },
    "tasks": [
        {
            "name": "mnist-5-9",
            "encoders": ["std", "adv", "lip"],
            "adaptations": ["linear-probe", "certified-probe"],
        },
        {
            "name": "mnist-5-9",
            "encoders": ["std"],
            "adaptations": ["finetune", "adv-probe", "roli", "adv-finetune"],
            "threats": {"L2": [1.0], "Linf": ["1/10"]},
        },
        {
            "name": "dsprites-latents",
            "kind": "regression",
            "encoders": ["shapes"],
            "adaptations": ["linear-probe"],
            "threats": {"L2": [0.5]},
        },
    ],
}

# Wall-clock fields: the only ones two runs of one study may differ in.
TIMING = ("seconds", "train_seconds")
KEYS = ("encoder", "pretraining", "task", "adaptation", "threat", "eps")
METRICS = (
    "clean_acc",
    "pgd_robust_acc",
    "predicted_robust_acc",
    "certified_robust_acc",
    "task_agnostic_robust_acc",
    "clean_loss",
    "adv_loss",
    "loss_bound",
    "mean_shift",
    "weight_gap",
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("study")
    config = parse_config(SMALL)
    results = run_study(config, root / "out", cache_dir=root / "cache", progress=False)
    return root, results


def _without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_records_have_the_promised_keys_and_invariants(study: tuple[Path, dict[str, Any]]) -> None:
    _, results = study
    records = results["records"]
    assert len(records) == 3 * 2 * 3 + 4 * 2 + 1
    for record in records:
        assert all(key in record for key in (*KEYS, *METRICS))
        assert record["threat"] in ("Linf", "L2")
        if record["kind"] == "regression":
            assert record["clean_acc"] is None
            assert record["loss"] == "absolute"
            assert record["adv_loss"] >= record["clean_loss"]
            continue
        assert 0.0 <= record["attacked_robust_acc"] <= record["pgd_robust_acc"]
        assert record["pgd_robust_acc"] <= record["clean_acc"]
        assert 0.0 <= record["expected_robust_acc"] <= record["clean_acc"]
        assert record["expected_error"] == pytest.approx(
            record["expected_robust_acc"] - record["attacked_robust_acc"]
        )
        assert record["directional_share"] > 0.0
        assert record["relative_shift"] == pytest.approx(
            record["mean_shift"] / record["feature_scale"]
        )
        assert record["distance_ratio"] > 0.0
        if record["lipschitz_l2"] is not None:  # the ratio can never beat the constant
            assert record["distance_ratio"] <= record["lipschitz_l2"] * (1 + 1e-6)
        if record["certified_robust_acc"] is not None:
            assert record["certified_robust_acc"] <= record["attacked_robust_acc"]
            assert record["certified_but_broken"] == 0
            assert record["certified_loss_bound_exceeded"] == 0.0
            assert record["adv_loss"] <= record["certified_loss_bound"] + 1e-6
        else:
            assert record["encoder"] != "lip"
    # Every eps is its own unit: the shift grows with the radius.
    for encoder in ("std", "adv", "lip"):
        rows = [r for r in records if r["encoder"] == encoder and r["threat"] == "L2"]
        rows = [r for r in rows if r["adaptation"] == "linear-probe"]
        assert [r["eps"] for r in rows] == [0.5, 0.75]
        assert rows[0]["mean_shift"] < rows[1]["mean_shift"]
    # The expected robust accuracy against the study's attacks, on every encoder (the
    # fine-tuned one included) and eps. This study's 3-step attacks on 40 points are weak,
    # so the estimate may sit below them by a few points; above them it must not (the
    # default study's figures, mean 0.4 and worst 4.5 points, are in the README).
    errors = [r["expected_error"] for r in records if r["kind"] == "classification"]
    assert max(errors) <= 0.05
    assert sum(abs(e) for e in errors) / len(errors) <= 0.03
    lipschitz = [r for r in records if r["encoder"] == "lip"]
    assert all(r["certified_robust_acc"] is not None for r in lipschitz)
    assert {"versions", "git_revision", "config", "seed", "findings"} <= set(results)
    assert results["encoders"]["lip"]["lipschitz_l2"] == 1.0


def test_each_norm_s_largest_eps_unit_carries_the_curve(
    study: tuple[Path, dict[str, Any]],
) -> None:
    """The curve spans [0, largest eps] per norm; at the smaller eps of the grid it is
    checked against the attacks and certificates of those units (the study's own units
    at those eps, attacked independently of the curve)."""
    root, results = study
    store = Store(root / "out" / "store")
    records = [r for r in results["records"] if r["kind"] == "classification"]
    gaps: list[float] = []
    for record in records:
        same = [
            r
            for r in records
            if (r["task"], r["encoder"], r["adaptation"], r["threat"])
            == (record["task"], record["encoder"], record["adaptation"], record["threat"])
        ]
        if record["eps"] < max(r["eps"] for r in same):
            assert record["curve_area"] is None
            continue
        arrays, _ = store.load(tuple(record["store_key"]))
        robust = arrays["curve_robust"]
        assert robust.shape == (record["n"], 7)
        # Robust at an eps means robust at every smaller one; eps 0 is clean accuracy.
        assert (robust[:, 1:] <= robust[:, :-1]).all()
        accuracy = robust.float().mean(dim=0)
        assert float(accuracy[0]) == pytest.approx(record["clean_acc"])
        assert 0.0 <= record["curve_area"] <= record["clean_acc"]
        assert float(accuracy[-1]) == pytest.approx(record["expected_robust_acc"])
        for other in same:
            if other is not record and other["adaptation"] == "certified-probe":
                continue  # its head is trained per threat: another head at another eps
            step = other["eps"] / record["eps"] * 6
            if abs(step - round(step)) > 1e-6:
                continue
            value = float(accuracy[round(step)])
            # This study's 3-step attacks are weak: the curve's own short attacks may
            # break points they miss, but it must not claim points they broke.
            assert value <= other["attacked_robust_acc"] + 0.05
            if other["certified_robust_acc"] is not None:
                assert value >= other["certified_robust_acc"]
            gaps.append(abs(value - other["expected_robust_acc"]))
    # Each curve at its own eps (where it ends on the single-eps estimate), and the
    # linear probes' L2 curves at 0.5 too (grid step 0.125).
    assert len(gaps) >= 6 + 3
    assert sum(gaps) / len(gaps) <= 0.03


def test_reports_are_written(study: tuple[Path, dict[str, Any]]) -> None:
    root, results = study
    out = root / "out"
    assert json.loads((out / "results.json").read_text())["records"] == json.loads(
        json.dumps(results["records"])
    )
    markdown = (out / "report.md").read_text()
    assert markdown.index("## The answer:") < markdown.index("## Expected robust accuracy")
    assert markdown.index("## Expected robust accuracy") < markdown.index("## Findings")
    assert "expected-vs-attacked" in markdown
    assert "## Task mnist-5-9" in markdown
    assert "## Regression task dsprites-latents" in markdown
    assert "figures/curves-mnist-5-9.png" in markdown
    assert "## Reference evaluation and sanity checks" in markdown
    assert "AutoAttack did not run in this study" in markdown
    certificates = markdown.split("## Certificates: task-agnostic vs head-specific")[1]
    assert "the task-agnostic route certifies" in certificates.split("##")[0]
    images = re.findall(r"\]\((figures/[^)]+\.png)\)", markdown)
    assert len(images) >= 4
    for image in images:
        assert (out / image).stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert "<table>" in page


def test_adaptations_are_advised_first_and_compared(
    study: tuple[Path, dict[str, Any]],
) -> None:
    root, results = study
    out = root / "out"
    group = [
        r
        for r in results["records"]
        if r["task"] == "mnist-5-9"
        and r["encoder"] == "std"
        and r["threat"] == "L2"
        and r["eps"] == 1.0
    ]
    by_name = {r["adaptation"]: r for r in group}
    assert set(by_name) == {"finetune", "adv-probe", "roli", "adv-finetune"}
    # Adversarial heads say what they trained against and what it cost; clean ones not.
    assert by_name["finetune"]["trained_against"] is None
    assert by_name["roli"]["trained_against"] == "pgd L2(eps=1), 2 steps"
    assert by_name["adv-finetune"]["trained_against"] == "pgd L2(eps=1), 2 steps"
    warmed = "trades L2(eps=1), 2 steps, eps warm-up 0.5"
    assert by_name["adv-probe"]["trained_against"] == warmed
    assert [by_name[a]["recipe"] for a in ("adv-probe", "roli", "adv-finetune")] == [
        "adversarial-probe",
        "roli",
        "adversarial-finetune",
    ]
    for record in group:
        assert record["cost"] == record["encoder_forwards"] + record["encoder_backwards"]
        assert record["train_seconds"] > 0

    # The Pareto front, recomputed here: no head on it is beaten on all three axes.
    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        ours = (a["clean_acc"], a["attacked_robust_acc"], -a["cost"])
        theirs = (b["clean_acc"], b["attacked_robust_acc"], -b["cost"])
        return all(x >= y for x, y in zip(ours, theirs, strict=True)) and ours != theirs

    for record in group:
        assert record["pareto"] == (not any(beats(other, record) for other in group))
    advised = {r["advice_first"] for r in group}
    assert len(advised) == 1
    assert advised <= {"adversarial-probe", "roli", "adversarial-finetune"}
    held = any(r["pareto"] for r in group if r["recipe"] == group[0]["advice_first"])
    assert all(r["advice_held"] == held for r in group)
    # The advice was stored before any head of its encoder and threat was trained.
    advice = next(out.glob("store/advice/mnist-5-9/std/L2/*.safetensors"))
    heads = list(out.glob("store/heads/mnist-5-9/std/*/L2/*.safetensors"))
    assert heads
    assert all(advice.stat().st_mtime < head.stat().st_mtime for head in heads)
    claims = {f["claim"][:5]: f for f in results["findings"]}
    assert "Over 2 settings" in claims["RoLI:"]["evidence"]  # L2 and Linf, trained alike
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Which adaptation keeps robustness")[1].split("\n## ")[0]
    assert "figures/pareto-mnist-5-9.png" in section
    assert section.count("| std |") >= 5


def test_report_renders_in_a_browser(study: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = study
    out = root / "out"
    markdown = (out / "report.md").read_text()
    page = render(out / "report.html", screenshot=tmp_path / "report.png")
    # Every Markdown table of every section is a table on the page, and no Markdown
    # syntax is left in what a reader sees.
    assert page.tables == len(re.findall(r"^\| --- \|", markdown, re.MULTILINE)) >= 5
    assert "|" not in page.text
    assert "**" not in page.text
    assert "](" not in page.text
    assert page.images == len(re.findall(r"!\[", markdown)) >= 4
    assert not page.broken_images
    assert not page.console_errors
    assert not page.dead_links
    assert not page.unexplained_columns  # every column heading links to its glossary entry
    assert page.headings[0].startswith("The answer")
    assert page.headings[-1] == "Glossary"
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_killed_run_resumes_to_the_same_results(
    study: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root, results = study
    config = parse_config(SMALL)
    # The finished study less one encoder's units, as a run killed before them leaves
    # it: the resume is killed again after one shard, then resumed to the end.
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (out / RESULTS_FILE).unlink()
    for kind in ("units", "unit-shards"):
        shutil.rmtree(out / "store" / kind / "mnist-5-9" / "lip")
    original = runner.StudyRun._evaluate
    calls = {"n": 0}

    def dying(self: runner.StudyRun, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        original(self, *args)

    monkeypatch.setattr(runner.StudyRun, "_evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, out, cache_dir=root / "cache", progress=False)
    assert calls["n"] == 2
    assert not (out / RESULTS_FILE).exists()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(runner.StudyRun, "_evaluate", original)
    resumed = run_study(config, out, cache_dir=root / "cache", progress=False)
    # Equal up to the rounding of multi-threaded CPU kernels (exactly equal on one thread).
    again, first = _without_timing(resumed["records"]), _without_timing(results["records"])
    assert len(again) == len(first)
    for new, old in zip(again, first, strict=True):
        assert new.keys() == old.keys()
        for key, value in old.items():
            if isinstance(value, float):
                assert new[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
            else:
                assert new[key] == value, key


def _write_cli_inputs(root: Path) -> tuple[str, str, str]:
    checkpoint = next((root / "cache").glob("lipschitz-*.safetensors"))
    head = root / "head.safetensors"
    save_file({"weight": torch.randn(5, 64), "bias": torch.zeros(5)}, head)
    data = root / "points.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((12, 1, 28, 28)).astype(np.float32), y=np.arange(12) % 5)
    return str(checkpoint), str(head), str(data)


def test_cli_single_steps(
    study: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = study
    encoder, head, data = _write_cli_inputs(root)
    common = [
        "--encoder",
        encoder,
        "--data",
        data,
        "--threat",
        "L2",
        "--eps",
        "0.5",
        "1",
        "--steps",
        "3",
    ]
    out = tmp_path / "v.json"
    assert cli.main(["vulnerability", *common, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["eps"] for row in rows] == [0.5, 1.0]
    assert all(row["max_shift"] <= row["certified_shift"] + 1e-5 for row in rows)
    assert cli.main(["bound", *common, "--head", head]) == 0
    printed = capsys.readouterr().out
    assert "certified_robust_acc" in printed
    assert "expected_robust_acc" in printed
    assert cli.main(["attack", *common, "--head", head, "--loss", "targeted"]) == 0
    assert "pgd-targeted" in capsys.readouterr().out
    assert cli.main(["report", str(root / "out")]) == 0
    wide = tmp_path / "wide.safetensors"
    save_file({"weight": torch.randn(5, 65), "bias": torch.zeros(5)}, wide)
    capsys.readouterr()
    assert cli.main(["bound", *common, "--head", str(wide)]) == 2
    assert "takes 65 features, the encoder gives 64" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[encoders.a]\nprotocol = "standard"\npretrain_task = "mnist-5-9"\nepochs = -1\n'
        '[adaptations.lp]\nprotocol = "linear-probe"\n[[tasks]]\nname = "mnist-5-9"\n'
        "[threats]\nLinf = [0.1]\n"
    )
    assert cli.main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "encoders.a" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli.main(["vulnerability", "--encoder", "missing.safetensors", "--data", "mnist"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert cli.main(["demo", "--print-config"]) == 0
    assert 'name = "demo"' in capsys.readouterr().out


def test_output_folder_of_another_study_is_refused(study: tuple[Path, dict[str, Any]]) -> None:
    root, _ = study
    other = parse_config(SMALL | {"seed": 1})
    with pytest.raises(ConfigError, match="different study configuration"):
        run_study(other, root / "out", cache_dir=root / "cache", progress=False)


def test_stored_fine_tuned_encoder_is_reused(study: tuple[Path, dict[str, Any]]) -> None:
    """A unit lost after its fine-tuned encoder was stored is recomputed from that encoder."""
    root, results = study
    out = root / "out"
    unit = next(out.glob("store/units/mnist-5-9/std/finetune/L2/*.safetensors"))
    unit.unlink()
    (out / "results.json").unlink()
    again = run_study(parse_config(SMALL), out, cache_dir=root / "cache", progress=False)
    old = next(r for r in results["records"] if r["adaptation"] == "finetune")
    new = next(r for r in again["records"] if r["adaptation"] == "finetune")
    assert new["clean_acc"] == old["clean_acc"]
    assert new["mean_shift"] == pytest.approx(old["mean_shift"], rel=1e-5)
    assert new["pgd_robust_acc"] == old["pgd_robust_acc"]


def test_certificates_per_method_and_radius_rule(study: tuple[Path, dict[str, Any]]) -> None:
    root, results = study
    assert results["format"] == 5
    assert results["runtime"]["world_size"] == 1
    lip = [r for r in results["records"] if r["encoder"] == "lip"]
    assert lip
    for r in lip:
        assert r["certifiers"] == ["lipschitz", "ibp"]  # tightest first
        assert r["certified_robust_acc@lipschitz"] == r["certified_robust_acc"]
        assert r["certified_robust_acc@ibp"] <= r["certified_robust_acc"]
        assert r["certified_but_broken@lipschitz"] == r["certified_but_broken@ibp"] == 0
    # Every SmallCNN is certified too, by the layer-wise constant and IBP, uselessly.
    others = [r for r in results["records"] if r["encoder"] == "std"]
    assert all(set(r["certifiers"]) == {"lipschitz", "ibp"} for r in others)
    assert all(r["refused"] == {} and r["certified_shift"] > r["max_shift"] for r in others)
    store = Store(root / "out" / "store")
    rules = {}
    for encoder in ("std", "lip"):
        loaded = store.load(("heads", "mnist-5-9", encoder, "certified-probe", "L2", "0.5"))
        assert loaded is not None
        rules[encoder] = loaded[1]["radius_rule"]
    # One epoch on 300 images leaves features so close together (median distance below
    # the certified radius) that the certified rule falls back to the quantile, with the
    # reason, for the Lipschitz encoder as for the standard one.
    fallback = (
        r"quantile 0.5 of the attacked shift \(the best certificate, [0-9.e+-]+, exceeds the "
        r"median feature distance [0-9.e+-]+ and would certify nothing\)"
    )
    assert re.fullmatch(fallback, rules["lip"])
    assert re.fullmatch(fallback, rules["std"])
    probes = [r for r in lip if r["adaptation"] == "certified-probe"]
    assert all(r["radius_rule"] == rules["lip"] for r in probes if r["eps"] == 0.5)
    assert all(r["radius"] > 0 for r in probes)
    stored = store.load(("certificates", "mnist-5-9", "std", "L2", "0.5", "shard000000"))
    assert stored is not None
    assert stored[1]["refused"] == {}


def test_results_of_an_older_format_are_refused(
    study: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, results = study
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({**results, "format": 1}))
    assert cli.main(["report", str(old)]) == 2
    assert "results format 1" in capsys.readouterr().err
    assert not (old / "report.html").exists()
    (old / "study.json").write_text(json.dumps({"fingerprint": "x", "name": "small"}))
    with pytest.raises(ResultsFormatError, match="results of format 1"):
        run_study(parse_config(SMALL), old, cache_dir=root / "cache", progress=False)


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli._COMMANDS, "demo", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["demo"])


def test_cli_probe_trains_and_saves_a_head(
    study: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = study
    checkpoint = str(_mnist_checkpoint(root, "standard"))
    data = ["--data", "task:mnist-5-9:train", "--test-data", "task:mnist-5-9:test"]
    base = ["probe", "--encoder", checkpoint, *data, "--n", "400", "--quiet"]
    out = tmp_path / "probe"
    assert cli.main([*base, "--out", str(out)]) == 0
    record = json.loads((out / cli.PROBE_FILE).read_text())
    head = load_head(out / cli.HEAD_FILE)
    assert (record["train_points"], record["test_points"]) == (400, 500)
    # Recomputed from the saved files alone: the accuracy the command reported.
    test = get_task("mnist-5-9").downstream.test
    encoder = load_encoder(checkpoint)
    predicted = head(extract_features(encoder, test.x)).argmax(dim=1)
    assert float((predicted == test.y).float().mean()) == pytest.approx(record["test_acc"])
    # A second solver of the same convex objective (mean CE + wd/2 ||W||^2, bias free)
    # finds no better head: the saved one is the optimum, not a stopped iterate.
    train = stratified_sample(get_task("mnist-5-9").downstream.train, 400, seed=0)
    features = extract_features(encoder, train.x).double().numpy()
    wd = record["config"]["weight_decay"]
    reference = LogisticRegression(C=1.0 / (len(features) * wd), tol=1e-10, max_iter=10_000)
    reference.fit(features, train.y.numpy())

    def objective(weight: np.ndarray, bias: np.ndarray) -> float:
        logits = torch.from_numpy(features @ weight.T + bias)
        loss = torch.nn.functional.cross_entropy(logits, train.y)
        return float(loss) + 0.5 * wd * float((weight**2).sum())

    ours = objective(head.weight.double().numpy(), head.bias.double().numpy())
    assert ours <= objective(reference.coef_, reference.intercept_) + 1e-4
    assert (
        cli.main(
            [
                "bound",
                "--encoder",
                checkpoint,
                "--head",
                str(out / cli.HEAD_FILE),
                "--data",
                "task:mnist-5-9",
                "--n",
                "20",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    # The certified probe: a fixed radius, or the median attacked shift at an eps.
    certified = [*base, "--protocol", "certified-probe", "--out"]
    assert cli.main([*certified, str(tmp_path / "c"), "--eps", "0.1", "--steps", "3"]) == 0
    record = json.loads((tmp_path / "c" / cli.PROBE_FILE).read_text())
    assert record["config"]["radius"] > 0
    assert record["radius_rule"].startswith("median attacked shift of 200 training points")
    for wrong, message in (
        ([*certified, str(tmp_path / "d")], "needs --radius R or --eps E"),
        ([*base, "--out", str(tmp_path / "e"), "--radius", "1"], "certified probe's radius only"),
        ([*base, "--out", str(out / cli.PROBE_FILE)], "is a file, not a folder"),
        (
            [*base[:4], "task:mnist-5-9", "--test-data", "task:mnist-5-9", "--out", str(out)],
            "names the training data",
        ),
    ):
        assert cli.main(wrong) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def _mnist_checkpoint(root: Path, protocol: str) -> Path:
    """A cached encoder of the small study pretrained on 28 x 28 digits."""
    return next(
        path
        for path in (root / "cache").glob(f"{protocol}-*.safetensors")
        if json.loads(path.with_suffix(".json").read_text())["config"]["image_shape"] == [1, 28, 28]
    )


def test_cli_transfer_runs_a_one_task_study_from_a_checkpoint(
    study: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = study
    checkpoint = _mnist_checkpoint(root, "standard")
    out = tmp_path / "transfer"
    args = ["transfer", "--encoder", str(checkpoint), "--data", "task:mnist-5-9", "--out"]
    options = ["--n", "16", "--steps", "2", "--linf", "1/20", "--l2", "--quiet"]
    assert cli.main([*args, str(out), *options, "--adaptations", "linear-probe"]) == 0
    results = json.loads((out / RESULTS_FILE).read_text())
    (record,) = results["records"]
    assert record["task"] == "mnist-5-9"
    assert record["adaptation"] == "linear-probe"
    assert 0.0 <= record["expected_robust_acc"] <= 1.0
    assert (out / "report.html").is_file()
    assert cli.main([*args, str(tmp_path / "none"), "--linf", "--l2"]) == 2
    # Training and held-out data named apart: the held-out points are the evaluation's.
    parts = ["--data", "task:mnist-5-9:train", "--test-data", "task:mnist-5-9:test"]
    own = ["transfer", "--encoder", str(checkpoint), *parts, "--out", str(tmp_path / "own")]
    assert cli.main([*own, *options, "--adaptations", "linear-probe"]) == 0
    (record,) = json.loads((tmp_path / "own" / RESULTS_FILE).read_text())["records"]
    assert (record["task"], record["n"]) == ("transfer", 16)
    builtin_and_test = [*args, str(tmp_path / "x"), "--test-data", "task:mnist-5-9:test"]
    assert cli.main(builtin_and_test) == 2


class _Unsound:
    """A certifier that bounds every shift by 1e-3, far below what any attack finds."""

    name = "unsound-for-test"
    by_default = False

    def certify(self, encoder: torch.nn.Module, x: torch.Tensor, threat: Any) -> torch.Tensor:
        return torch.full((len(x),), 1e-3, device=x.device)


def test_an_unsound_certificate_stops_the_run_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(certify_base._REGISTRY, _Unsound.name, _Unsound())
    config = parse_config(
        {
            "name": "unsound",
            "eval_points": 20,
            "radius_points": 20,
            "certifiers": [_Unsound.name],
            "attack": {"steps": 2, "targeted_restarts": 1, "representation_steps": 3},
            "threats": {"Linf": ["1/10"]},
            "encoders": {
                "rand": {"protocol": "random", "pretrain_task": "mnist-5-9", "limit": 100}
            },
            "adaptations": {"lp": {"protocol": "linear-probe"}},
            "tasks": [{"name": "mnist-5-9"}],
        }
    )
    with pytest.raises(SoundnessError, match="unsound certificate in mnist-5-9 / rand / lp") as e:
        run_study(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert "unsound-for-test's certified shift is below the attacked shift on 20 point" in str(
        e.value
    )
    assert not list((tmp_path / "out").rglob("unit-shards/**/*.safetensors"))


def test_soundness_violations_name_each_kind() -> None:
    from robust_transfer.estimates.records import soundness_violations

    sound = {
        "shift": torch.tensor([1.0, 2.0]),
        "certified_shift@ibp": torch.tensor([1.0, 2.5]),
        "certified_robust@ibp": torch.tensor([True, False]),
        "head_certified_robust": torch.tensor([True, False]),
        "robust_attacked": torch.tensor([True, False]),
    }
    assert soundness_violations(sound) == []
    broken = sound | {
        "certified_shift@ibp": torch.tensor([0.5, 2.5]),
        "head_certified_robust": torch.tensor([True, True]),
    }
    found = soundness_violations(broken)
    assert len(found) == 2
    assert "ibp's certified shift is below the attacked shift on 1 point(s)" in found[0]
    assert "1 point(s) of head_certified_robust were broken" in found[1]


_SAME = (
    "clean_acc",
    "pgd_robust_acc",
    "attacked_robust_acc",
    "task_agnostic_robust_acc",
    "expected_robust_acc",
    "predicted_robust_acc",
    "certified_robust_acc",
    "head_certified_robust_acc",
    "loss_bound",
    "certified_loss_bound",
    "adv_loss",
    "mean_shift",
    "certified_shift",
    "weight_gap",
    "directional_share",
)


def test_the_entry_point_reports_what_the_study_reports(
    study: tuple[Path, dict[str, Any]],
) -> None:
    """``measure`` + ``evaluate`` on the study's own encoders, points, heads and settings
    give every number the study's records give."""
    root, results = study
    config = parse_config(SMALL)
    run = runner.StudyRun(config, root / "out", root / "cache", Runtime.detect("cpu"), False)
    task = config.tasks[0]
    test = get_task(task.name).downstream.test
    x, y = test.x[: config.eval_points], test.y[: config.eval_points]
    for encoder_name in task.encoders:
        encoder, _ = run.encoders.get(encoder_name)
        key = (StoreKind.HEADS, task.name, encoder_name, "linear-probe")
        stored = run.store.load(key)
        assert stored is not None
        head = head_from_arrays(stored[0], "the study's head")
        measured = measure(encoder, x, task.threats, settings=config.attack, seed=config.seed)
        evaluation = measured.evaluate(head, y, attack=True)
        for mine in evaluation.records:
            (theirs,) = [
                r
                for r in results["records"]
                if (r["task"], r["encoder"], r["adaptation"], r["threat"], r["eps"])
                == (task.name, encoder_name, "linear-probe", mine["threat"], mine["eps"])
            ]
            for field in _SAME:
                assert mine[field] == pytest.approx(theirs[field], abs=1e-9), field
    # A head trained against each threat fine-tuned an encoder per threat: each unit is
    # its own encoder's numbers, in shards that hold both threats' units.
    for unit in run.units():
        if unit.adaptation != "roli":
            continue
        encoder, head, _ = run.heads.get(run._split(unit.task), unit)
        measured = measure(encoder, x, [unit.threat], settings=config.attack, seed=config.seed)
        (mine,) = measured.evaluate(head, y, attack=True).records
        (theirs,) = [
            r
            for r in results["records"]
            if (r["task"], r["encoder"], r["adaptation"], r["threat"], r["eps"])
            == (unit.task.name, unit.encoder, "roli", mine["threat"], mine["eps"])
        ]
        for field in _SAME:
            assert mine[field] == pytest.approx(theirs[field], abs=1e-9), field


def test_heads_train_on_the_points_asked_for_and_share_one_feature_pass(
    study: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``train_points`` bounds the heads' training set (a stratified sample), and every
    probe on an encoder reads one stored pass of its features over those points."""
    from robust_transfer.models import features as features_module
    from robust_transfer.study import stored

    adapt_module = importlib.import_module("robust_transfer.training.adapt")

    root, _ = study
    source = copy.deepcopy(SMALL)
    source |= {"train_points": 120, "eval_points": 20, "curve_points": 0}
    source["encoders"] = {"std": source["encoders"]["std"]}
    source["tasks"] = [dict(source["tasks"][0], encoders=["std"], threats={"L2": [0.5, 0.75]})]
    sizes: list[int] = []
    original = features_module.extract_features

    def counted(encoder: Any, x: Any, **kwargs: Any) -> Any:
        sizes.append(len(x))
        return original(encoder, x, **kwargs)

    monkeypatch.setattr(stored, "extract_features", counted)
    monkeypatch.setattr(adapt_module, "extract_features", counted)
    results = run_study(
        parse_config(source), tmp_path / "out", cache_dir=root / "cache", progress=False
    )
    # One pass over the 120 training points for two probes at two eps (the certified
    # probe's heads are per threat): none of the whole split's 4,000.
    assert sizes.count(120) == 1
    assert max(sizes) == 120
    store = Store(tmp_path / "out" / "store")
    loaded = store.load(("train-features", "mnist-5-9", "std", "n120"))
    assert loaded is not None
    assert loaded[0]["features"].shape[0] == 120
    heads = [r for r in results["records"] if r["adaptation"] == "linear-probe"]
    assert heads
    assert all(r["clean_acc"] > 0.6 for r in heads)
    # A stratified sample: every class is there in proportion.
    from robust_transfer.data.tasks import get_task, stratified_sample

    sample = stratified_sample(get_task("mnist-5-9").downstream.train, 120)
    assert torch.bincount(sample.y).min() >= 20
