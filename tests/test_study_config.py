"""Study configurations: the embedded default parses, bad ones fail with the key and reason."""

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from robust_transfer.study.config import (
    ConfigError,
    default_config,
    default_config_text,
    load_config,
    parse_config,
)
from robust_transfer.study.spec import Radius, RadiusRule, TaskKind
from robust_transfer.theory.threat import ThreatModel


def _minimal() -> dict[str, Any]:
    return {
        "threats": {"Linf": ["1/10"]},
        "encoders": {"std": {"protocol": "standard", "pretrain_task": "mnist-5-9"}},
        "adaptations": {"lp": {"protocol": "linear-probe"}},
        "tasks": [{"name": "mnist-5-9"}],
    }


def test_default_config_covers_what_the_demo_promises() -> None:
    config = default_config()
    protocols = {spec.pretraining for spec in config.encoders.values()}
    assert {
        "standard",
        "adversarial",
        "trades",
        "simclr",
        "adversarial-contrastive",
        "lipschitz",
        "random",
    } <= protocols
    architectures = {
        spec.pretrain.architecture for spec in config.encoders.values() if spec.pretrain
    }
    assert {"lipschitz-cnn", "lipschitz-sll"} <= architectures
    adaptations = {(spec.protocol.value, spec.adversarial) for spec in config.adaptations.values()}
    assert {("linear-probe", False), ("finetune", False), ("certified-probe", False)} <= (
        adaptations
    )
    # Every adversarial recipe, on the encoders the comparison promises.
    assert {("linear-probe", True), ("lp-ft", True), ("finetune", True)} <= adaptations
    assert {("bitfit", True), ("lora", True)} <= adaptations
    compared = [t for t in config.tasks if "roli" in t.adaptations]
    assert compared
    assert {"standard", "adversarial", "simclr", "lipschitz"} <= set(compared[0].encoders)
    probe_task = config.tasks[0]
    for norm in ("Linf", "L2"):
        assert len({t.eps for t in probe_task.threats if t.norm.value == norm}) >= 3
    assert any(task.kind is TaskKind.REGRESSION for task in config.tasks)
    assert {task.name for task in config.tasks} >= {"mnist-5-9", "digits8x8-5-9"}
    assert tomllib.loads(default_config_text())["name"] == "demo"


def test_minimal_config_and_defaults() -> None:
    config = parse_config(_minimal())
    assert config.tasks[0].encoders == ("std",)
    assert config.tasks[0].adaptations == ("lp",)
    assert config.eval_points == 500
    assert config.encoders["std"].pretrain is not None
    assert config.encoders["std"].pretrain.seed == config.seed


def _broken(path: list[str | int], value: object) -> dict[str, Any]:
    source = _minimal()
    target: Any = source
    for part in path[:-1]:
        target = target[part]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return source


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (["colour"], "red", "at colour: unknown key"),
        (["seed"], "zero", "at seed: seed must be an integer from 0"),
        (["eval_points"], 0, "at eval_points: eval_points must be a positive integer"),
        (["threats", "Linf"], ["-1/10"], r"threats\.Linf\[0\]: eps must be positive"),
        (["threats", "Linf"], ["8/0"], r"threats\.Linf\[0\]: cannot parse eps"),
        (["threats", "L3"], [1.0], r"threats\.L3: unknown norm"),
        (["encoders", "std", "protocol"], "magic", r"encoders\.std\.protocol: unknown protocol"),
        (["encoders", "std", "pretrain_task"], "imagenet", "unknown task 'imagenet'"),
        (["encoders", "std", "epochz"], 3, r"encoders\.std\.epochz: unknown key"),
        (["encoders", "std", "checkpoint"], "x.safetensors", "exactly one of"),
        (["adaptations", "lp", "protocol"], "prompt-tuning", r"adaptations\.lp\.protocol"),
        (["adaptations", "lp", "radius_quantile"], 2.0, "radius_quantile 2.0 exceeds 1"),
        (["adaptations", "lp", "radius"], 0.3, "only the certified probe takes a radius"),
        (["certifiers"], ["crown-magic"], r"certifiers\[0\]: unknown certifier"),
        (["certifiers"], ["lipschitz", "lipschitz"], "named twice"),
        (["encoders", "std"], {"spec": "no_colon"}, r"encoders\.std\.spec: unknown encoder spec"),
        (["encoders", "std"], {"factory": "x.safetensors"}, "not found"),
        (["tasks", 0, "name"], "cifar-1000", "unknown task 'cifar-1000'"),
        (["tasks", 0, "encoders"], ["nope"], r"tasks\[0\]\.encoders: 'nope' is not defined"),
        (["tasks", 0, "kind"], "ranking", r"tasks\[0\]\.kind"),
        (["tasks", 0, "loss"], "absolute", "only regression tasks take a loss"),
        (["tasks", 0, "data"], "missing.npz", "no such file"),
        (["tasks", 0, "test_data"], "missing.npz", "no such file"),
        (["tasks", 0, "test_data"], "torchvision:cifar10:test", r"test_data: give 'data' too"),
        (["tasks", 0, "data_options"], {"root": "x"}, r"data_options: give 'data' too"),
        (["tasks", 0, "data_options"], "root=x", r"data_options: expected a table"),
        (["attack", "steps"], 0, r"at attack: steps must be a positive integer"),
        (["attack", "steps"], 2**63 - 1, r"at attack: steps 9223372036854775807 exceeds"),
        (["seed"], 10**25, "at seed: seed must be an integer from 0 to 4294967295"),
        (["eval_points"], 2**63, "at eval_points: eval_points .* exceeds"),
        (["threats", "Linf"], [10**400], r"threats\.Linf\[0\]: eps must be positive and finite"),
        (["threats", "L2"], [float("inf")], r"threats\.L2\[0\]: eps must be positive and finite"),
        (["encoders", "std", "epochs"], 2**62, r"encoders\.std: epochs .* exceeds"),
        (["encoders", "std", "feature_dim"], 10**12, r"encoders\.std: feature_dim .* exceeds"),
        (["encoders", "std", "lr"], float("nan"), r"encoders\.std: lr must be a finite number"),
        (["adaptations", "lp", "epochs"], 10**9, r"adaptations\.lp: epochs .* exceeds"),
        (["adaptations", "lp", "adversary"], "fgsm", r"adaptations\.lp: unknown adversary"),
        (["adaptations", "lp", "threat"], {"norm": "L2", "eps": 0.5}, "only by adversarial"),
        (["adaptations", "lp", "eps_warmup"], 1.5, r"adaptations\.lp: eps_warmup"),
        (["encoders", "std"], {"spec": ".models:SmallCNN"}, "an absolute module path"),
        (["tasks"], [], "no task given"),
    ],
)
def test_bad_configs_name_the_key(path: list[str | int], value: object, match: str) -> None:
    if path == ["attack", "steps"]:
        source = _minimal() | {"attack": {"steps": value}}
    else:
        source = _broken(path, value)
    with pytest.raises(ConfigError, match=match):
        parse_config(source, base=Path("/nonexistent"))


def test_the_autoattack_plan() -> None:
    plain = parse_config(_minimal()).attack
    assert plain.autoattack is None
    assert plain.representation_method == "pgd+apgd"
    every = parse_config(_minimal() | {"attack": {"autoattack": True}}).attack.autoattack
    assert every is not None
    assert every.covers("mnist-5-9", "std", "lp", ThreatModel("L2", 3.0))
    assert every.rows(torch.tensor([0, 10_000])).all()
    table = {
        "points": 5,
        "tasks": ["mnist-5-9"],
        "encoders": ["std"],
        "adaptations": ["lp"],
        "threats": {"Linf": ["1/10"]},
    }
    plan = parse_config(_minimal() | {"attack": {"autoattack": table}}).attack.autoattack
    assert plan is not None
    linf = ThreatModel("Linf", "1/10")
    assert plan.covers("mnist-5-9", "std", "lp", linf)
    assert not plan.covers("mnist-5-9", "std", "lp", ThreatModel("Linf", "1/20"))
    assert not plan.covers("mnist-5-9", "std", "ft", linf)
    assert not plan.covers("mnist-5-9", "adv", "lp", linf)
    assert not plan.covers("digits8x8-5-9", "std", "lp", linf)
    assert plan.rows(torch.tensor([3, 4, 5, 6])).tolist() == [True, True, False, False]
    default = default_config().attack.autoattack
    assert default is not None
    assert default.points is not None


@pytest.mark.parametrize(
    ("attack", "match"),
    [
        ({"autoattack": "yes"}, r"attack\.autoattack: expected true, false or a table"),
        ({"autoattack": {"points": 0}}, r"attack\.autoattack\.points: points must be a positive"),
        ({"autoattack": {"adaptations": ["ft"]}}, "unknown adaptation 'ft'"),
        ({"autoattack": {"tasks": ["cifar10"]}}, r"autoattack\.tasks: unknown task 'cifar10'"),
        ({"autoattack": {"tasks": "mnist-5-9"}}, r"autoattack\.tasks: expected a list"),
        ({"autoattack": {"encoders": ["adv"]}}, r"autoattack\.encoders: unknown encoder 'adv'"),
        ({"autoattack": {"threats": {"L3": [1]}}}, r"attack\.autoattack\.threats\.L3"),
        ({"autoattack": {"colour": 1}}, "unknown key"),
        ({"autoattack": {"threats": {"Linf": ["1/20"]}}}, r"Linf\(eps=0.05\) is in no task's"),
        ({"autoatack": {"points": 5}}, r"attack\.autoatack: unknown key"),
        ({"representation_method": "fgsm"}, r"representation_method 'fgsm' is not one of"),
    ],
)
def test_bad_attack_tables_name_the_key(attack: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(_minimal() | {"attack": attack})


def test_duplicate_units_and_regression_adaptations_are_refused() -> None:
    source = _minimal()
    source["tasks"] = [{"name": "mnist-5-9"}, {"name": "mnist-5-9"}]
    with pytest.raises(ConfigError, match="appears twice"):
        parse_config(source)
    source = _minimal()
    source["adaptations"]["ft"] = {"protocol": "finetune"}
    source["tasks"] = [{"name": "dsprites-latents", "kind": "regression", "adaptations": ["ft"]}]
    with pytest.raises(ConfigError, match="linear probes only"):
        parse_config(source)
    source["adaptations"]["ft"] = {"protocol": "linear-probe", "adversary": "pgd"}
    with pytest.raises(ConfigError, match="clean linear probes only"):
        parse_config(source)


def test_adversarial_adaptations_train_against_the_unit_threat_unless_given_one() -> None:
    source = _minimal()
    source["threats"] = {"Linf": ["1/10"], "L2": [0.5]}
    source["adaptations"] |= {
        "roli": {"protocol": "lp-ft", "adversary": "pgd"},
        "fixed": {"protocol": "lp-ft", "adversary": "trades", "threat": {"norm": "L2", "eps": 1}},
    }
    config = parse_config(source)
    roli, fixed = config.adaptations["roli"], config.adaptations["fixed"]
    assert roli.per_threat
    assert not fixed.per_threat
    assert not config.adaptations["lp"].per_threat
    unit = ThreatModel("Linf", "1/10")
    assert roli.config_for(None, unit).threat == unit
    assert fixed.config_for(None, unit).threat == ThreatModel("L2", 1.0)


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("radius", "expected"),
    [
        (None, ("certified", None, "best", 0.5)),
        (0.3, ("fixed", 0.3, "best", 0.5)),
        ({"rule": "quantile", "quantile": 0.9}, ("quantile", None, "best", 0.9)),
        ({"rule": "certified", "method": "lipschitz"}, ("certified", None, "lipschitz", 0.5)),
    ],
)
def test_certified_probe_radius_rules(radius: object, expected: tuple[object, ...]) -> None:
    source = _minimal()
    source["adaptations"]["cp"] = {"protocol": "certified-probe"}
    if radius is not None:
        source["adaptations"]["cp"]["radius"] = radius
    rule = parse_config(source).adaptations["cp"].radius
    assert rule is not None
    assert (rule.rule.value, rule.value, rule.method, rule.quantile) == expected


@pytest.mark.parametrize(
    ("radius", "match"),
    [
        ({"rule": "magic"}, r"radius\.rule: unknown radius rule"),
        ({"rule": "fixed"}, r"radius\.value: the fixed rule needs a value"),
        ({"rule": "certified", "method": "ibp-x"}, r"radius\.method: unknown certifier"),
        ({"rule": "quantile", "quantile": 3}, r"radius\.quantile: quantile 3 exceeds 1"),
        ({"rule": "fixed", "value": -1.0}, r"radius\.value: value must be a finite number at"),
        ({"rule": "fixed", "value": 10**400}, r"radius\.value: value must be a finite number"),
        ({"rule": "fixed", "value": 1e300}, r"radius\.value: value 1e\+300 exceeds 1e\+15"),
        ({"rule": "quantile", "value": 0.3}, r"radius\.value: only the fixed rule takes a value"),
    ],
)
def test_bad_radius_rules(radius: object, match: str) -> None:
    source = _minimal()
    source["adaptations"]["cp"] = {"protocol": "certified-probe", "radius": radius}
    with pytest.raises(ConfigError, match=match):
        parse_config(source)


def test_settings_built_in_python_check_themselves() -> None:
    """The checks live in the types, so a study made without TOML is checked too."""
    config = default_config()
    with pytest.raises(ConfigError, match=r"certifiers\[0\]: unknown certifier 'nope'"):
        dataclasses.replace(config, certifiers=("nope",))
    with pytest.raises(ConfigError, match="appears twice"):
        dataclasses.replace(config, tasks=(config.tasks[0], config.tasks[0]))
    with pytest.raises(ConfigError, match="eval_points"):
        dataclasses.replace(config, eval_points=0)
    with pytest.raises(ConfigError, match="is not defined"):
        dataclasses.replace(config, encoders={})
    with pytest.raises(ConfigError, match="radius value: the fixed rule needs a value"):
        Radius(RadiusRule.FIXED)
    with pytest.raises(ConfigError, match="radius quantile"):
        Radius(RadiusRule.QUANTILE, quantile=1.5)
    assert Radius(RadiusRule.FIXED, value=0.3).value == 0.3


def test_train_and_curve_points_are_checked() -> None:
    base = tomllib.loads(default_config_text())
    assert parse_config(base).train_points == 600
    everything = {key: value for key, value in base.items() if key != "train_points"}
    assert parse_config(everything).train_points is None
    assert parse_config(base | {"train_points": 300}).train_points == 300
    assert parse_config(base | {"curve_points": 0}).curve_points == 0
    for key, value, reason in (
        ("train_points", 0, "positive integer"),
        ("train_points", "all", "positive integer"),
        ("curve_points", 2, "at least 3 points"),
        ("curve_points", -1, "positive integer"),
        ("curve_points", 10**6, "curve points"),
    ):
        with pytest.raises(ConfigError, match=f"{key}.*{reason}"):
            parse_config(base | {key: value})
